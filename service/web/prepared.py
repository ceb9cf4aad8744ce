"""A 200 JSON answer written as one HTTP message: the check's hot path, where
aiohttp's general response machinery (a payload, a header multidict prepared and
serialized, a writer's header buffering) cost more than the check itself.

The answers of one turn of the event loop go out together (`Outbox`): the first at
once, the others when the turn ends. Written one by one, under load, each answer
reached a client that had gone back to sleep since the previous one, and waking it
cost the kernel more than the answer's own write."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE

_TYPE = b"Content-Type: application/json\r\n"
_SERVER = b"Server: " + SERVER_SOFTWARE.encode() + b"\r\n"
# aiohttp's own rule: HTTP/1.1 is kept alive unless said otherwise, 1.0 only if asked.
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"


class JsonAnswer(web.StreamResponse):
    """Status 200, `body` as application/json, the headers set on it before it is
    prepared, then Content-Length, Date, Server and Connection as aiohttp writes
    them; prepared and written whole in one write: through `outbox` with the other
    answers of its turn of the event loop, or on the request's writer when it may
    not wait (`may_hold`) or the connection closes after it."""

    def __init__(self, body: bytes, outbox: Outbox) -> None:
        super().__init__()
        self._json = body
        self._outbox = outbox
        self._sent = False
        self._alive: bool | None = None

    @property
    def prepared(self) -> bool:
        return self._sent

    @property
    def keep_alive(self) -> bool | None:
        return self._alive

    def force_close(self) -> None:
        self._alive = False

    @property
    def body_length(self) -> int:
        return len(self._json) if self._sent else 0

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._sent:
            return None
        match_info = getattr(request, "match_info", None)  # a web.Request's
        if match_info is not None:  # on_response_prepare, as aiohttp sends it
            for app in match_info.apps:
                if app.on_response_prepare:
                    await app.on_response_prepare.send(request, self)
        if self._alive is None:
            self._alive = request.keep_alive
        version = request.version
        if version == HttpVersion11:
            connection = b"" if self._alive else _CLOSE
        else:
            connection = (
                _KEEP_ALIVE if self._alive and version == HttpVersion10 else b""
            )
        headers = self.headers
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a header holds a newline or carriage return")
        message = b"HTTP/%d.%d 200 OK\r\n%b%bContent-Length: %d\r\n%b%b%b\r\n%b" % (
            *version,
            _TYPE,
            lines.encode(),
            len(self._json),
            _date(),
            _SERVER,
            connection,
            self._json,
        )
        self._sent = True
        writer = request.writer
        transport = request.transport
        if (
            self._alive
            and transport is not None
            and not transport.is_closing()
            and may_hold(request.protocol)
        ):
            # As the writer's own write counts it (aiohttp reads output_size).
            writer.buffer_size += len(message)
            writer.output_size += len(message)
            self._outbox.send(transport, message)
        else:
            await writer.write_eof(message)  # waits while writing is paused
        return writer

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("a JsonAnswer is written whole when it is prepared")

    async def write_eof(self, data: bytes = b"") -> None:
        if data:
            raise RuntimeError("a JsonAnswer is written whole when it is prepared")


def may_hold(protocol: object) -> bool:
    """Whether an answer on this connection may wait for the end of the turn: not
    while the client is not reading (writing paused: the writer then waits for
    it), and not while the connection's next request is already parsed (a
    pipelined one, which aiohttp may answer in this same turn, by its own writer,
    when its tasks start eagerly)."""
    if getattr(protocol, "writing_paused", True):
        return False
    return not getattr(protocol, "_messages", True)


class Outbox:
    """An application's answers written together, a turn of the event loop at a
    time.

    The first answer of a turn is written at once, so a lone request waits for
    nothing; the others of the same turn are held and written, in the order they
    came, by a callback that runs first in the next turn: before any connection
    goes on to its next request (aiohttp resumes a connection's task only in a
    later turn than its handler's end), so no answer overtakes an earlier one on
    its connection. A client then wakes once for a turn's answers instead of once
    for each (docs/BENCHMARKS.md, the check)."""

    __slots__ = ("_held", "_open")

    def __init__(self) -> None:
        self._held: list[tuple[asyncio.Transport, bytes]] = []
        self._open = False  # this turn has written its first answer

    def send(self, transport: asyncio.Transport, message: bytes) -> None:
        if self._open:
            self._held.append((transport, message))
            return
        self._open = True
        asyncio.get_running_loop().call_soon(self._turn_ended)
        transport.write(message)

    def _turn_ended(self) -> None:
        self._open = False
        held, self._held = self._held, []
        for transport, message in held:
            if not transport.is_closing():  # else the client has gone
                transport.write(message)


class _Date:
    """The Date line, formatted once a second."""

    second = -1
    line = b""


def _date() -> bytes:
    now = int(time.time())
    if now != _Date.second:
        _Date.line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        _Date.second = now
    return _Date.line
