"""A 200 JSON answer written as one HTTP message: the check's hot path, where
aiohttp's general response machinery (a payload, a header multidict prepared and
serialized, a writer's header buffering) cost more than the check itself."""

from __future__ import annotations

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
    them; prepared and written whole in one write on the request's writer."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._json = body
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
        await writer.write_eof(message)
        return writer

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("a JsonAnswer is written whole when it is prepared")

    async def write_eof(self, data: bytes = b"") -> None:
        if data:
            raise RuntimeError("a JsonAnswer is written whole when it is prepared")


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
