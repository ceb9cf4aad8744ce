"""Usage recording: one record, an NDJSON batch, or a WebSocket stream of frames."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Annotated

import msgspec
import structlog
from aiohttp import WSMsgType, web
from msgspec import UNSET

from service import eventstore, metrics
from service.domain.bounds import explained
from service.domain.numbers import decimal_number, decode_hook
from service.domain.usage import (
    Rejected,
    UsageRecord,
    decode_lines,
    decode_record,
    invalid_record,
)
from service.errors import Invalid, ServiceError
from service.ingest import Outcome, Submitted, queue_records, reach_head
from service.web import keyed
from service.web.answers import (
    BatchAnswer,
    ErrorDetail,
    RejectedElement,
    RejectedLine,
    UsageAccepted,
    UsageFrameAck,
    UsageFrameError,
)
from service.web.http import (
    Right,
    as_service_error,
    error_response,
    json_response,
    status_of_code,
)
from service.web.keys import (
    cache_projector_key,
    pool_key,
    resolver_key,
    settings_key,
    writer_key,
)

log = structlog.get_logger()

MAX_FRAME_BYTES = 4 << 20
MAX_FRAME_RECORDS = 10_000
# Frames read but not yet acknowledged; past this the socket is not read (backpressure).
MAX_PIPELINED = 32

_encode = msgspec.json.Encoder(decimal_format="number").encode


class UsageFrame(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A client text frame of GET /api/usage/stream."""

    seq: int
    # Stated, not enforced here: a longer list is answered too_many_records.
    records: Annotated[
        list[UsageRecord],
        msgspec.Meta(extra_json_schema={"maxItems": MAX_FRAME_RECORDS}),
    ]


class _RawFrame(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    seq: int
    records: list[msgspec.Raw]


class _Seq(msgspec.Struct, frozen=True):
    seq: int


_decode_frame = msgspec.json.Decoder(
    UsageFrame, dec_hook=decode_hook, float_hook=decimal_number
).decode
_decode_raw_frame = msgspec.json.Decoder(_RawFrame).decode
_decode_seq = msgspec.json.Decoder(_Seq).decode


def _metadata(request: web.Request) -> bytes:
    """The events' metadata: the request id that log lines carry too."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return _encode({"request_id": request_id}) if request_id else b"{}"


async def _head(request: web.Request) -> int:
    return await eventstore.max_position(request.app[pool_key])


def _refresher(request: web.Request) -> Callable[[], Awaitable[None]]:
    """Bring this replica's cache up to the log head: a key created a moment ago,
    perhaps through another replica, is then known; ProjectionLag (503) when it
    cannot within the wait of min_position (ingest.reach_head)."""

    async def refresh() -> None:
        projector = request.app.get(cache_projector_key)
        if projector is None:  # an app without the cache's tail (some tests)
            return
        app = request.app
        await reach_head(
            app[pool_key], projector, app[settings_key].min_position_wait_s
        )

    return refresh


def _summary(outcomes: Iterable[Outcome]) -> tuple[int, int, int]:
    """(accepted, duplicates, highest position) of written rows."""
    accepted = duplicates = top = 0
    for outcome in outcomes:
        if outcome.duplicate:
            duplicates += 1
        else:
            accepted += 1
        if outcome.position > top:
            top = outcome.position
    return accepted, duplicates, top


# --- POST /api/usage ---------------------------------------------------------------


async def record_one(request: web.Request) -> web.Response:
    body = await keyed.read_body(request, request.app[settings_key].max_body_bytes)
    return await keyed.once(request, body, lambda: _record_one(request, body))


async def _record_one(request: web.Request, body: bytes) -> web.Response:
    try:
        record = decode_record(body)
    except msgspec.MsgspecError as exc:
        metrics.count_records(rejected=1)
        why = invalid_record(exc)
        return error_response(status_of_code(why.code), why.code, why.message)
    submitted, rejected = await queue_records(
        request.app[writer_key],
        [(0, record)],
        request.app[resolver_key],
        _now(),
        _metadata(request),
        _refresher(request),
        request.app[pool_key],
    )
    if rejected:
        metrics.count_records(rejected=1)
        why = rejected[0].why
        return error_response(status_of_code(why.code), why.code, why.message)
    [outcome] = await submitted.outcomes()
    return json_response(
        UsageAccepted(position=outcome.position, duplicate=outcome.duplicate), 202
    )


# --- POST /api/usage/batch ---------------------------------------------------------


async def record_batch(request: web.Request) -> web.Response:
    limit = request.app[settings_key].max_batch_body_bytes
    body = await keyed.read_body(request, limit)
    return await keyed.once(request, body, lambda: _record_batch(request, body))


async def _record_batch(request: web.Request, body: bytes) -> web.Response:
    records, bad = decode_lines(body)
    submitted, rejected = await queue_records(
        request.app[writer_key],
        records,
        request.app[resolver_key],
        _now(),
        _metadata(request),
        _refresher(request),
        request.app[pool_key],
    )
    rejected = _merge(bad, rejected)
    if rejected:
        metrics.count_records(rejected=len(rejected))
    outcomes = await submitted.outcomes()
    accepted, duplicates, position = _summary(outcomes)
    return json_response(
        BatchAnswer(
            accepted=accepted,
            duplicates=duplicates,
            rejected=[
                RejectedLine(line=r.where, code=r.why.code, message=r.why.message)
                for r in rejected
            ],
            position=position if outcomes else await _head(request),
        )
    )


# --- GET /api/usage/stream ---------------------------------------------------------


async def stream(request: web.Request) -> web.WebSocketResponse:
    """Each text frame `{seq, records}` gets one ack frame after its records
    committed, in the order the frames came; frames may be pipelined."""
    # aiohttp refuses a message of max_msg_size bytes itself: a frame of exactly
    # MAX_FRAME_BYTES is allowed.
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES + 1)
    if not ws.can_prepare(request).ok:
        raise Invalid(
            "this endpoint takes a WebSocket: a GET with the headers"
            " Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13 and"
            " Sec-WebSocket-Key (16 bytes in base64)"
        )
    await ws.prepare(request)
    acks: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue(MAX_PIPELINED)
    sender = asyncio.create_task(_send_acks(ws, acks))
    metadata = _metadata(request)
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                ack = await _accept_frame(request, message.data, metadata)
            elif message.type is WSMsgType.BINARY:
                ack = _ready(_error_frame("invalid_frame", "send text frames of JSON"))
            else:
                continue
            await acks.put(ack)
    finally:
        await acks.put(None)
        await sender
    return ws


async def _accept_frame(
    request: web.Request, data: str, metadata: bytes
) -> asyncio.Future[bytes]:
    """Screen a frame and queue its records; the returned future is its ack."""
    try:
        frame = _decode_frame(data)
        records = list(enumerate(frame.records))
        bad: list[Rejected] = []
    except msgspec.MsgspecError:
        try:
            raw = _decode_raw_frame(data)
        except msgspec.MsgspecError as exc:
            return _ready(_frame_error(data, exc))
        except RecursionError:  # msgspec.Raw skips nested values recursively
            message = "the frame is not valid JSON: it is nested too deeply"
            return _ready(_error_frame("invalid_frame", message, _leading_seq(data)))
        frame = UsageFrame(raw.seq, [])
        records, bad = _decode_elements(raw.records)
    if len(records) + len(bad) > MAX_FRAME_RECORDS:
        return _ready(
            _error_frame(
                "too_many_records",
                f"a frame holds at most {MAX_FRAME_RECORDS} records",
                frame.seq,
            )
        )
    try:
        submitted, rejected = await queue_records(
            request.app[writer_key],
            records,
            request.app[resolver_key],
            _now(),
            metadata,
            _refresher(request),
            request.app[pool_key],
        )
    except Exception as exc:  # the socket is upgraded: no HTTP answer can follow
        return _ready(_failed_frame(exc, frame.seq))
    rejected = _merge(bad, rejected)
    if rejected:
        metrics.count_records(rejected=len(rejected))
    return asyncio.ensure_future(_ack(request, frame.seq, rejected, submitted))


def _decode_elements(
    raws: list[msgspec.Raw],
) -> tuple[list[tuple[int, UsageRecord]], list[Rejected]]:
    good: list[tuple[int, UsageRecord]] = []
    bad: list[Rejected] = []
    for index, raw in enumerate(raws):
        try:
            good.append((index, decode_record(raw)))
        except msgspec.MsgspecError as exc:
            bad.append(Rejected(index, invalid_record(exc)))
    return good, bad


async def _ack(
    request: web.Request,
    seq: int,
    rejected: list[Rejected],
    submitted: Submitted,
) -> bytes:
    try:
        outcomes = await submitted.outcomes()
        accepted, duplicates, position = _summary(outcomes)
        if not outcomes:
            position = await _head(request)
    except Exception as exc:
        return _failed_frame(exc, seq)
    return _encode(
        UsageFrameAck(
            seq=seq,
            accepted=accepted,
            duplicates=duplicates,
            rejected=[
                RejectedElement(index=r.where, code=r.why.code, message=r.why.message)
                for r in rejected
            ],
            position=position,
        )
    )


async def _send_acks(
    ws: web.WebSocketResponse, acks: asyncio.Queue[asyncio.Future[bytes] | None]
) -> None:
    """Send acks in frame order; once the client is gone, keep draining so every
    queued record is still committed and every future awaited."""
    while (ack := await acks.get()) is not None:
        try:
            data = await ack
        except Exception:
            log.exception("usage_stream_ack_failed")
            data = _error_frame(ServiceError.code, "the server failed on this frame")
        if ws.closed:
            continue
        try:
            await ws.send_str(data.decode())
        except ConnectionError:
            continue


def _failed_frame(exc: Exception, seq: int) -> bytes:
    """A frame whose records could not be taken, as the HTTP paths would answer it
    (a lost database is a retryable `database_unavailable`), in an error frame."""
    error = as_service_error(exc)
    if type(error) is ServiceError:
        log.error("usage_stream_frame_failed", error=repr(exc))
    return _error_frame(error.code, error.message, seq)


# A frame that starts with its seq, as every client writes it: read even when the
# rest is past what the decoder takes (nested too deeply).
_SEQ_FIRST = re.compile(r'\s*\{\s*"seq"\s*:\s*(-?[0-9]{1,19})\s*[,}]')


def _leading_seq(data: str) -> int | None:
    found = _SEQ_FIRST.match(data)
    return None if found is None else int(found.group(1))


def _frame_error(data: str, exc: msgspec.MsgspecError) -> bytes:
    try:
        seq: int | None = _decode_seq(data).seq
    except (msgspec.MsgspecError, RecursionError):  # deep unknown fields are skipped
        seq = _leading_seq(data)
    if isinstance(exc, msgspec.ValidationError):
        message = f'the frame must be {{"seq": n, "records": [...]}}: {explained(exc)}'
    else:
        message = f"the frame is not valid JSON: {exc}"
    return _error_frame("invalid_frame", message, seq)


def _error_frame(code: str, message: str, seq: int | None = None) -> bytes:
    return _encode(
        UsageFrameError(
            seq=UNSET if seq is None else seq,
            error=ErrorDetail(code=code, message=message),
        )
    )


def _ready(data: bytes) -> asyncio.Future[bytes]:
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    future.set_result(data)
    return future


def _merge(bad: list[Rejected], rejected: list[Rejected]) -> list[Rejected]:
    """Both kinds of rejection, in line (or index) order."""
    return sorted([*bad, *rejected], key=lambda r: r.where) if bad else rejected


def _now() -> datetime:
    return datetime.now(UTC)


ROUTES = [
    ("POST", "/api/usage", record_one, Right.RECORD),
    ("POST", "/api/usage/batch", record_batch, Right.RECORD),
    ("GET", "/api/usage/stream", stream, Right.RECORD),
]
