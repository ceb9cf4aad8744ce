"""Idempotency-Key at the HTTP edge: the request's key and fingerprint, the replay of
an answer kept for it, and keeping a new one (`service.idempotency` seals and stores).

Governance commands keep their answer in the transaction that appends their events
(`service.commands`). Commands that append through the usage writer (a reserving
check, a release, usage) keep it once the writer has committed (`once`): a retry
that comes before then, in this process, waits for the first attempt's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from service import commands, idempotency
from service.errors import BodyTooLarge, ServiceError, UnsupportedMediaType
from service.idempotency import Idempotency, Reply
from service.web import http
from service.web.answers import Error, ErrorDetail, encode
from service.web.http import ERROR_CODE, header, status_of
from service.web.keys import in_flight_key, pool_key, settings_key


def request_key(request: web.Request, raw: bytes) -> Idempotency | None:
    """The request's Idempotency-Key with its fingerprint (method, path, If-Match,
    body); None without the header, a 400 when the header is malformed."""
    key = header(request, "Idempotency-Key")
    if key is None:
        return None
    settings = request.app[settings_key]
    return idempotency.from_request(
        key,
        method=request.method,
        path=request.path,
        if_match=header(request, "If-Match"),
        body=raw,
        sealer=idempotency.sealer(settings.secret_key, settings.data_dir),
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """`http.read_body`, whose refusals of the body itself (413: too large, 415: not
    JSON) are answers like any other: kept under the request's Idempotency-Key, its
    fingerprint naming the refusal where the body would be (none was read), so the
    key used again for another request is a 422 and the same request gets the same
    answer. A 408 or a body cut short is not kept: a retry may well get through."""
    try:
        return await http.read_body(request, limit)
    except (BodyTooLarge, UnsupportedMediaType) as exc:
        key = request_key(request, b"\x00refused " + exc.message.encode())
        if key is not None:
            pool = request.app[pool_key]
            if await idempotency.replay(pool, key) is None:  # 422 for another
                answer = refusal(exc)
                assert answer is not None  # a 4xx
                await commands.keep(pool, key, answer)
        raise


def respond(reply: Reply) -> web.Response:
    """The answer of a reply; a replayed one says so in `Idempotent-Replayed`."""
    response = web.Response(
        body=reply.body, status=reply.status, content_type="application/json"
    )
    if reply.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if reply.status >= 400:  # for the request's log line
        response[ERROR_CODE] = msgspec.json.decode(reply.body, type=Error).error.code
    return response


def refusal(exc: ServiceError) -> Reply | None:
    """What a refusal answers, to keep for a key; None for a 5xx (never kept)."""
    status = status_of(type(exc))
    if status >= 500:
        return None
    detail = ErrorDetail(code=exc.code, message=exc.message)
    return Reply(status, encode(Error(error=detail)))


async def once(
    request: web.Request,
    raw: bytes,
    run: Callable[[], Awaitable[web.Response]],
) -> web.Response:
    """`run` the command, unless an answer is kept for the request's Idempotency-Key
    (then that answer, byte for byte; 422 for a different request under the key);
    whatever it answers but a 5xx is kept for the key, refusals included."""
    key = request_key(request, raw)
    if key is None:
        return await run()
    pool = request.app[pool_key]
    making = request.app[in_flight_key]
    while (first := making.get(key.key)) is not None:
        await first.wait()  # the same key in flight here: its answer, once kept
    done = making[key.key] = asyncio.Event()  # no await since the loop's test
    try:
        if (kept := await idempotency.replay(pool, key)) is not None:
            return respond(kept)
        try:
            response = await run()
        except ServiceError as exc:
            reply = refusal(exc)
            if reply is None:
                raise
        else:
            if response.status >= 500 or not isinstance(response.body, bytes):
                return response
            reply = Reply(response.status, response.body)
        return respond(await commands.keep(pool, key, reply))
    finally:
        del making[key.key]
        done.set()
