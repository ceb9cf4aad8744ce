"""The HTTP server: aiohttp's, with its answer to a request that is not HTTP made
the service's.

aiohttp answers a request it cannot parse (a bad request line or method, a header
that is not a token, a Content-Length that is not a number, a broken chunk size, a
line past 8190 bytes) itself, before any route or guard sees it: a text/plain 400
whose body echoes the offending bytes, and an error-level log line with a
traceback. Here that answer is the one every other refusal gets: a JSON 400
`invalid_request` with a sentence, an X-Request-Id, and one info line in the
request log. The connection still closes after it (where the next request would
start is unknown). A body coding aiohttp knows but cannot decode here (`br`, `zstd`
without their libraries) is a 415 `unsupported_media_type` naming the codings that
are (RFC 9110, 12.5.3), not a parse error.

aiohttp builds that answer in its connection protocol (`RequestHandler.
handle_error`), which only a runner can choose: `AppRunner` here makes the server
with this module's protocol, and `run` serves an application with it as
`web.run_app` would. The runner's request factory also reads a CONNECT target as
a path, so the router answers it (aiohttp reads it as `host:port`, with no path
for any route, the catch-all included, to match).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from typing import Any

import structlog
from aiohttp import hdrs, web, web_protocol, web_server
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import ContentEncodingError, InvalidURLError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from yarl import URL

from service.config import ConfigError
from service.errors import Invalid, ServiceError, UnsupportedMediaType
from service.web import http

log = structlog.get_logger()

# Longest sentence taken from aiohttp's description of what it could not parse.
_MAX_REASON = 200
# The request body codings aiohttp decodes without optional libraries.
DECODED = ("gzip", "deflate")


def reason(description: str | None) -> str:
    """What aiohttp found wrong, as one line without the request's bytes it quotes:
    "Bad status line:\\n  Invalid HTTP version:\\n\\n  b'GET / HTTP/7.1'\\n  ^"
    becomes "bad status line: invalid HTTP version"."""
    parts = []
    for line in (description or "").splitlines():
        line = line.strip()
        for quote in ("b'", 'b"'):
            line = line.split(f": {quote}", 1)[0]
        line = line.rstrip(":. ")
        if not line or line.startswith(("b'", 'b"')) or not line.strip("^ "):
            continue
        first = line.split(" ", 1)[0]
        if first.isalpha() and first[1:].islower():  # "Invalid", not "Content-Length"
            line = line[:1].lower() + line[1:]
        parts.append(line)
    text = ": ".join(parts)[:_MAX_REASON]
    return text or "it cannot be parsed"


# aiohttp's description quotes the bytes it could not read as b'…' or b"…".
_QUOTES_BYTES = re.compile(r"""(^|\s)b['"]""")


def _what(exc: BaseException | None, message: str | None) -> str:
    """The sentence's account of what could not be read. A target that is no URL
    (`GET *`, `http://[…`) is described by aiohttp with the target alone, which
    the sentence never repeats (it could hold a secret)."""
    if isinstance(exc, InvalidURLError) and not _QUOTES_BYTES.search(message or ""):
        return "the request target is neither a path nor an absolute URL"
    return reason(message)


class _Connection(web_protocol.RequestHandler):
    """aiohttp's HTTP/1.1 protocol; its own error answers in the service's shape."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of an answer is out: nothing else can be sent (as aiohttp).
            return super().handle_error(request, status, exc, message)
        request_id = http.next_request_id()
        headers = {}
        if isinstance(exc, ContentEncodingError):
            # A coding aiohttp knows but cannot decode here (br, zstd: their
            # libraries are not installed); a body that does not decode is the
            # route's 400. RFC 9110, 12.5.3: say which codings are taken.
            error: ServiceError = UnsupportedMediaType(
                "the body's Content-Encoding is not one this service decodes: send"
                f" it as {' or '.join(DECODED)}, or without one"
            )
            status = http.status_of(UnsupportedMediaType)
            headers["Accept-Encoding"] = ", ".join(DECODED)
        elif 400 <= status < 500:
            error = Invalid(
                f"the request is not well-formed HTTP/1.1: {_what(exc, message)}"
            )
        else:  # a failure no guard caught: the guard answers every route's errors
            error = ServiceError("the server failed on this request")
        if status < 500:
            log.info(
                "request_finished",
                request_id=request_id,
                status=status,
                code=error.code,
                error=error.message,
            )
        else:
            log.error("request_failed", request_id=request_id, exc_info=exc)
        response = http.error_response(status, error.code, error.message)
        response.headers.update(headers)
        response.headers["X-Request-Id"] = request_id
        response.force_close()
        return response


class _Server(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


def _connect_as_path(
    make: web_protocol._RequestFactory,
) -> web_protocol._RequestFactory:
    """`make` (the application's request factory), with a CONNECT request's
    target read as a path. aiohttp reads CONNECT's target as an authority
    (`host:port`), so its path is empty and the router tries no resource, not
    even the catch-all: the answer was aiohttp's plain-text 404. Read as a path,
    the target is routed as any other (`CONNECT /healthz` → 405 with `Allow`,
    `CONNECT example.com:443` → 404, both in the error shape). This service is no
    proxy: no route takes CONNECT."""

    def make_request(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web_protocol.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if message.method == hdrs.METH_CONNECT:
            message = message._replace(url=URL.build(path=message.path, encoded=True))
        return make(message, payload, protocol, writer, task)

    return make_request


class AppRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparsable requests as the service
    answers every refusal."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _Server(
            made.request_handler,
            request_factory=_connect_as_path(made.request_factory),
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )


def run(
    app: web.Application,
    *,
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    reuse_port: bool = False,
    shutdown_timeout: float = 10,
    **kwargs: Any,
) -> None:
    """Serve `app` on `loop` until SIGINT or SIGTERM, then shut down gracefully
    (open requests get `shutdown_timeout` seconds) and close the loop: what
    `web.run_app(app, loop=…, host=…, port=…, print=None, access_log=None)` does,
    with this module's runner. `kwargs` go to the runner (`keepalive_timeout`)."""

    async def serve() -> None:
        runner = AppRunner(
            app,
            handle_signals=True,
            access_log=None,
            shutdown_timeout=shutdown_timeout,
            **kwargs,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
            try:
                await site.start()
            except OSError as exc:  # in use, not this machine's, not permitted
                raise ConfigError(
                    f"cannot listen on {host}:{port} ({_bind_failure(exc)}): free that"
                    " port or set GOVLEDGER_HOST and GOVLEDGER_PORT"
                ) from None
            await asyncio.Event().wait()  # until a signal ends the loop's run
        finally:
            await runner.cleanup()

    main = loop.create_task(serve())
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():  # else its own traceback stands
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)  # the runner's cleanup, in order
        finally:
            _cancel_rest(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _bind_failure(error: OSError) -> str:
    """The system's words for a failed bind ("Address already in use"), without the
    loop's wrapping of them; a resolver's error as it says it."""
    if error.errno is not None and error.errno > 0:
        return os.strerror(error.errno)
    return str(error.strerror or error)


def _cancel_rest(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still open at exit and wait for them to end."""
    rest = asyncio.all_tasks(loop)
    for task in rest:
        task.cancel()
    if rest:
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
