"""The check's answer on the wire: written whole in one message
(`service.web.prepared.JsonAnswer`), it must keep HTTP's rules as aiohttp's own
responses do: keep-alive by version and `Connection`, pipelined requests answered in
order, and the headers the edge's guard sets."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from tests.api import Api

BODY = json.dumps({"virtual_key": "sk-none-such", "provider": "openai"}).encode()


def request(version: str = "1.1", *extra: str) -> bytes:
    head = [
        f"POST /api/governance/check HTTP/{version}",
        "Host: localhost",
        "Content-Type: application/json",
        f"Content-Length: {len(BODY)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + BODY


async def answers(
    api: Api, sent: bytes, count: int
) -> tuple[list[tuple[str, dict[str, str], dict]], bool]:
    """`count` answers read off one connection after sending `sent`, and whether
    the server then closed it (EOF within a second)."""
    address = urlsplit(api.base_url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(sent)
        read = []
        for _ in range(count):
            status = (await reader.readline()).decode().rstrip("\r\n")
            headers = {}
            while (line := (await reader.readline()).decode().rstrip("\r\n")) != "":
                name, _, value = line.partition(": ")
                assert name.lower() not in headers, f"{name} twice"
                headers[name.lower()] = value
            body = await reader.readexactly(int(headers["content-length"]))
            read.append((status, headers, json.loads(body)))
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
