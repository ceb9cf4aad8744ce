"""The check's answer on the wire: written whole in one message
(`service.web.prepared.JsonAnswer`), it must keep HTTP's rules as aiohttp's own
responses do: keep-alive by version and `Connection`, pipelined requests answered in
order, and the headers the edge's guard sets. The answers of one turn of the event
loop go out together (`Outbox`): each still reaches its own connection, in order."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from service.web.prepared import Outbox, may_hold
from tests.api import Api

BODY = json.dumps({"virtual_key": "sk-none-such", "provider": "openai"}).encode()


def request(
    version: str = "1.1",
    *extra: str,
    body: bytes = BODY,
    path: str = "/api/governance/check",
) -> bytes:
    head = [
        f"POST {path} HTTP/{version}",
        "Host: localhost",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


Answer = tuple[str, dict[str, str], dict]


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    status = (await reader.readline()).decode().rstrip("\r\n")
    headers = {}
    while (line := (await reader.readline()).decode().rstrip("\r\n")) != "":
        name, _, value = line.partition(": ")
        assert name.lower() not in headers, f"{name} twice"
        headers[name.lower()] = value
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, json.loads(body)


async def answers(api: Api, sent: bytes, count: int) -> tuple[list[Answer], bool]:
    """`count` answers read off one connection after sending `sent`, and whether
    the server then closed it (EOF within a second)."""
    address = urlsplit(api.base_url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(sent)
        read = [await read_answer(reader) for _ in range(count)]
        try:
            closed = await asyncio.wait_for(reader.read(1), 1.0) == b""
        except TimeoutError:
            closed = False
        return read, closed
    finally:
        writer.close()


UNKNOWN = {
    "allowed": False,
    "reason": "unknown_virtual_key",
    "http_status": 401,
}


async def test_pipelined_checks_are_answered_in_order_and_the_connection_kept(api):
    read, closed = await answers(api, request() + request(), 2)

    assert [status for status, _, _ in read] == ["HTTP/1.1 200 OK"] * 2
    for _, headers, body in read:
        assert headers["content-type"] == "application/json"
        assert "connection" not in headers  # HTTP/1.1: kept alive by default
        assert headers["date"].endswith(" GMT")
        assert headers["server"].startswith("Python/")
        assert len(headers["x-request-id"]) > 0
        assert {k: body[k] for k in UNKNOWN} == UNKNOWN
    assert read[0][1]["x-request-id"] != read[1][1]["x-request-id"]
    assert closed is False


async def test_connection_close_is_said_and_done(api):
    [(status, headers, _)], closed = await answers(
        api, request("1.1", "Connection: close"), 1
    )

    assert (status, headers["connection"], closed) == ("HTTP/1.1 200 OK", "close", True)


async def test_http_1_0_is_closed_unless_kept_alive_on_request(api):
    [(plain_status, plain, _)], plain_closed = await answers(api, request("1.0"), 1)
    [(kept_status, kept, _)], kept_closed = await answers(
        api, request("1.0", "Connection: keep-alive"), 1
    )

    assert (plain_status, plain.get("connection"), plain_closed) == (
        "HTTP/1.0 200 OK",
        None,
        True,
    )
    assert (kept_status, kept["connection"], kept_closed) == (
        "HTTP/1.0 200 OK",
        "keep-alive",
        False,
    )


async def test_pipelined_answers_of_every_kind_keep_their_order(api):
    """A check's answer (held for the end of a turn, or not) and answers aiohttp
    writes itself (an error, an unknown path) on one connection, in the order asked."""
    sent = b"".join(
        [
            request("1.1", "X-Request-Id: first"),
            request("1.1", "X-Request-Id: second", body=b'{"virtual_key": 5}'),
            request("1.1", "X-Request-Id: third"),
            request("1.1", "X-Request-Id: fourth", path="/api/none-such"),
            request("1.1", "X-Request-Id: fifth"),
        ]
    )

    read, closed = await answers(api, sent, 5)

    assert [(status, headers["x-request-id"]) for status, headers, _ in read] == [
        ("HTTP/1.1 200 OK", "first"),
        ("HTTP/1.1 400 Bad Request", "second"),
        ("HTTP/1.1 200 OK", "third"),
        ("HTTP/1.1 404 Not Found", "fourth"),
        ("HTTP/1.1 200 OK", "fifth"),
    ]
    assert closed is False


async def test_checks_of_many_connections_at_once_each_get_their_own_answer(api):
    address = urlsplit(api.base_url)
    connections = [
        await asyncio.open_connection(address.hostname, address.port) for _ in range(40)
    ]
    try:
        for rounds in range(3):  # and again on the same connections
            for n, (_, writer) in enumerate(connections):
                writer.write(request("1.1", f"X-Request-Id: c{n}-r{rounds}"))
            read = [await read_answer(reader) for reader, _ in connections]
            got = [(status, headers["x-request-id"]) for status, headers, _ in read]

            assert got == [("HTTP/1.1 200 OK", f"c{n}-r{rounds}") for n in range(40)]
            assert all({k: body[k] for k in UNKNOWN} == UNKNOWN for *_, body in read)
    finally:
        for _, writer in connections:
            writer.close()


class Transport:
    """What the outbox writes to, recording it."""

    def __init__(self, closing: bool = False) -> None:
        self.written: list[bytes] = []
        self.closing = closing

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing


async def next_turn() -> None:
    """Until the event loop's next turn has run what this one scheduled before."""
    loop = asyncio.get_running_loop()
    turn = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn


async def test_the_first_answer_of_a_turn_goes_at_once_the_others_when_it_ends():
    outbox = Outbox()
    first, second, gone = Transport(), Transport(), Transport(closing=True)

    outbox.send(first, b"a")
    outbox.send(second, b"b")
    outbox.send(gone, b"c")
    outbox.send(second, b"d")
    during = (list(first.written), list(second.written))
    await next_turn()
    after = (list(first.written), list(second.written), list(gone.written))
    outbox.send(second, b"e")  # a new turn: at once again

    assert during == ([b"a"], [])
    assert after == ([b"a"], [b"b", b"d"], [])
    assert second.written == [b"b", b"d", b"e"]


class Protocol:
    def __init__(self, *, writing_paused: bool, messages: list[object]) -> None:
        self.writing_paused = writing_paused
        self._messages = messages


def test_an_answer_is_held_only_while_its_client_reads_and_sent_nothing_more():
    assert may_hold(Protocol(writing_paused=False, messages=[])) is True
    # The client does not read: the writer's own write waits for it.
    assert may_hold(Protocol(writing_paused=True, messages=[])) is False
    # Its next request is already in: aiohttp may answer that one this turn.
    assert may_hold(Protocol(writing_paused=False, messages=["next"])) is False
    # A protocol that does not say: never held.
    assert may_hold(object()) is False
