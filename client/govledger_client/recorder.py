"""The recorder: `Recorder` streams usage records to govledger until each one is
acknowledged or rejected, exactly once.

It batches records (by count and by age), sends them over the WebSocket
`GET /api/usage/stream` (or as NDJSON to `POST /api/usage/batch` when the server or a
proxy refuses the upgrade), and sends them again, with the same event_ids, after a
disconnect, a 5xx or a timeout, until the server acknowledges them: the server dedupes
by event_id, so nothing is lost and nothing is counted twice. Its buffer is bounded:
`record()` waits while it is full and never drops. A record the server refuses is
reported (callback or list) and not sent again.

The buffer lives in memory: what is not yet acknowledged when the process dies is
lost (a graceful `close()` waits for it); everything acknowledged is durable.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from operator import attrgetter
from typing import Any, Final

import aiohttp
import msgspec

from .checker import Checker
from .errors import RecorderError
from .wire import (
    BATCH_PATH,
    STREAM_PATH,
    TRANSIENT_CODES,
    CheckResult,
    Reservation,
    UsageRecord,
    decode_batch_answer,
    decode_stream_ack,
    encode,
    error_of,
    money,
    service_url,
)

__all__ = ["Recorder", "RecorderStats", "RejectedRecord"]

log = logging.getLogger(__name__)

# The server takes at most 10,000 records and 4 MiB in a frame; stay well inside.
MAX_BATCH_RECORDS: Final = 10_000
MAX_BATCH_BYTES: Final = 1 << 20
MAX_RECORD_BYTES: Final = 64 << 10
_NDJSON = {"Content-Type": "application/x-ndjson"}


class RejectedRecord(msgspec.Struct, frozen=True):
    """A record the server refused; it is never sent again."""

    event_id: str
    code: str
    message: str
    record: bytes  # the record as sent (JSON)


class RecorderStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a recorder's counters."""

    recorded: int  # records taken by record() / record_raw()
    acked: int  # accepted + duplicates
    accepted: int  # stored by this recorder's sends
    duplicates: int  # acknowledged as already stored (an earlier attempt got through)
    rejected: dict[str, int]  # refused records, per error code
    buffered: int  # recorded, neither acknowledged nor rejected yet
    retries: int  # records sent again after a failed attempt
    failures: int  # failed attempts: disconnects, refused connections, 5xx, timeouts
    last_error: str | None  # why the latest attempt failed
    transport: str  # "websocket" or "batch"
    position: int  # the highest global position acknowledged (for min_position)
    check_fallbacks: int  # checks decided by the fail-open/fail-closed policy
    released: int = 0  # holds released (or found gone) by release()
    releasing: int = 0  # releases still running
    releases_abandoned: int = 0  # holds given up on (they expire on their own)


# --- the buffer --------------------------------------------------------------------


class _Entry(msgspec.Struct, gc=False):
    serial: int  # order of recording: flush() waits for every serial up to its own
    event_id: str
    payload: bytes
    queued_at: float


class _Batch(msgspec.Struct):
    seq: int
    entries: list[_Entry]
    sent_at: float


class _Transient(Exception):
    """An attempt failed in a way a later one may not: send the same records again."""


# --- the recorder --------------------------------------------------------------------


class Recorder:
    """Streams usage records to govledger until each is acknowledged or rejected.

    Use it as `async with Recorder(url, token=...) as recorder:` (or call `close()`);
    it connects on the first record. Records go out when `batch_size` are buffered or
    the oldest has waited `flush_interval` seconds; at most `max_in_flight` batches
    await their ack at once. `record()` waits while `max_buffer` records are not yet
    acknowledged. After a failure the recorder waits a jittered backoff, doubling from
    `min_backoff` to `max_backoff` (reset by the next ack), and sends the same records
    again; a batch unacknowledged after `ack_timeout` seconds counts as failed.

    `check()` gives the server `check_timeout` seconds; past that (or when it cannot be
    reached, or answers 5xx) `fail_open` decides: allowed, or blocked with 503.
    A reserving check's hold is settled by `record(..., reservation_id=...)` or
    dropped by `release()`. Rejected records go to `on_rejected` when given, else to
    `rejections`.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        *,
        token: str | None = None,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        max_buffer: int = 10_000,
        max_in_flight: int = 8,
        ack_timeout: float = 10.0,
        min_backoff: float = 0.05,
        max_backoff: float = 2.0,
        check_timeout: float = 0.05,
        fail_open: bool = True,
        use_websocket: bool = True,
        on_rejected: Callable[[RejectedRecord], object] | None = None,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_RECORDS:
            raise ValueError(f"batch_size must be within 1..{MAX_BATCH_RECORDS}")
        if max_buffer < batch_size:
            raise ValueError("max_buffer must be at least batch_size")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if not 0 < min_backoff <= max_backoff:
            raise ValueError("need 0 < min_backoff <= max_backoff")
        self.url = service_url(url)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_buffer = max_buffer
        self._max_in_flight = max_in_flight
        self._ack_timeout = ack_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._backoff = min_backoff
        self._checker = Checker(
            self.url, timeout=check_timeout, fail_open=fail_open, session=self._client
        )
        self._websocket = use_websocket
        self._on_rejected = on_rejected
        self.rejections: list[RejectedRecord] = []

        # Pending entries stay sorted by serial; every batch's entries too.
        self._pending: deque[_Entry] = deque()
        self._inflight: dict[int, _Batch] = {}
        self._unsettled = 0  # pending + in flight
        self._serial = 0
        self._seq = 0
        self._flushes: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()  # work, room in the window, flush or close
        self._space = asyncio.Event()  # the buffer has room again

        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._closing = False
        self._closed = False

        self._recorded = 0
        self._accepted = 0
        self._duplicates = 0
        self._rejected: Counter[str] = Counter()
        self._retries = 0
        self._failures = 0
        self._last_error: str | None = None
        self._position = 0

    async def __aenter__(self) -> Recorder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- recording ---

    async def record(
        self,
        *,
        provider: str,
        model: str,
        cost: Decimal | int | float | str,
        virtual_key: str | None = None,
        virtual_key_id: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        requests: int = 1,
        occurred_at: datetime | None = None,
        event_id: str | uuid.UUID | None = None,
        reservation_id: str | None = None,
    ) -> str:
        """Buffer one record (waiting while the buffer is full); return its event_id.

        Pass exactly one of `virtual_key` (the secret) and `virtual_key_id`.
        `event_id` defaults to a new uuid4, `occurred_at` to now (so a record sent
        again later still counts in the period it happened in). A float `cost` is
        rounded to 9 fractional digits; pass a Decimal or a str to keep it exact.
        `reservation_id` (a reserving check's) settles that hold.
        """
        if (virtual_key is None) == (virtual_key_id is None):
            raise ValueError("pass exactly one of virtual_key and virtual_key_id")
        eid = str(uuid.uuid4() if event_id is None else event_id)
        payload = encode(
            UsageRecord(
                event_id=eid,
                provider=provider,
                model=model,
                cost=money(cost),
                virtual_key=virtual_key,
                virtual_key_id=virtual_key_id,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                requests=requests,
                occurred_at=occurred_at or datetime.now(UTC),
                reservation_id=reservation_id,
            )
        )
        await self._enqueue(eid, payload)
        return eid

    async def record_raw(self, record: Mapping[str, Any]) -> str:
        """Buffer a record in its wire form, as given (an event_id is added when it
        has none; the server validates the rest); return its event_id."""
        event_id = record.get("event_id")
        if event_id is None:
            event_id = str(uuid.uuid4())
            record = {**record, "event_id": event_id}
        await self._enqueue(str(event_id), encode(dict(record)))
        return str(event_id)

    async def _enqueue(self, event_id: str, payload: bytes) -> None:
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"a record takes at most {MAX_RECORD_BYTES} bytes")
        self._start()
        while self._unsettled >= self._max_buffer:
            self._space.clear()
            await self._space.wait()
            self._start()  # it may have been closed or failed meanwhile
        self._serial += 1
        self._recorded += 1
        self._unsettled += 1
        pending = self._pending
        pending.append(
            _Entry(self._serial, event_id, payload, asyncio.get_running_loop().time())
        )
        if len(pending) == 1 or len(pending) >= self._batch_size:
            self._wake.set()

    async def flush(self) -> None:
        """Wait until every record buffered so far is acknowledged or rejected."""
        self._raise_if_failed()
        target = self._serial
        if self._task is None or self._lowest_unsettled() > target:
            return
        future = asyncio.get_running_loop().create_future()
        self._flushes.append((target, future))
        self._wake.set()
        await future

    async def close(self, grace: float | None = None) -> None:
        """Stop taking records, wait until everything buffered is acknowledged (at
        most `grace` seconds: then TimeoutError, with the rest unsent), and hang up.
        Running releases get `grace` seconds too (5 s if None)."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        self._space.set()  # blocked record() calls raise: the recorder is closing
        task = self._task
        try:
            await self._checker.releaser.close(5.0 if grace is None else grace)
            if task is not None:
                done, _ = await asyncio.wait({task}, timeout=grace)
                if not done:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    self._fail_waiters(RecorderError("the recorder was closed"))
                    raise TimeoutError(
                        f"{self._unsettled} records were not acknowledged in {grace} s"
                    )
            self._raise_if_failed()
        finally:
            self._closed = True
            if self._session is not None:
                await self._session.close()

    @property
    def stats(self) -> RecorderStats:
        return RecorderStats(
            recorded=self._recorded,
            acked=self._accepted + self._duplicates,
            accepted=self._accepted,
            duplicates=self._duplicates,
            rejected=dict(self._rejected),
            buffered=self._unsettled,
            retries=self._retries,
            failures=self._failures,
            last_error=self._last_error,
            transport="websocket" if self._websocket else "batch",
            position=self._position,
            check_fallbacks=self._checker.fallbacks,
            released=self._checker.releaser.released,
            releasing=self._checker.releaser.pending,
            releases_abandoned=self._checker.releaser.abandoned,
        )

    # --- checking ---

    async def check(
        self,
        *,
        virtual_key: str | None = None,
        virtual_key_id: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        estimated_cost: Decimal | int | float | str | None = None,
        min_position: int | None = None,
        within: float | None = None,
        reserve: bool = False,
        estimated_tokens: int | None = None,
        ttl_s: int | None = None,
        idempotency_key: str | None = None,
    ) -> CheckResult:
        """May this key spend more? The server's answer if it comes within `within`
        seconds (default: the recorder's check_timeout), else the fail-open or
        fail-closed policy's. A 4xx (bad request, bad token) raises RecorderError.
        `reserve=True` holds the estimate (the result's `reservation`). See
        `Checker.check`; this one shares the recorder's session and token."""
        return await self._checker.check(
            virtual_key=virtual_key,
            virtual_key_id=virtual_key_id,
            provider=provider,
            model=model,
            estimated_cost=estimated_cost,
            min_position=min_position,
            within=within,
            reserve=reserve,
            estimated_tokens=estimated_tokens,
            ttl_s=ttl_s,
            idempotency_key=idempotency_key,
        )

    def release(self, reservation: Reservation | str) -> asyncio.Task[bool]:
        """Drop a hold in the background: returns at once with the task (True once
        the hold is gone), never raises; see `Releaser.release`."""
        return self._checker.release(reservation)

    # --- lifetime ---

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RecorderError("the recorder is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._ack_timeout
                ),
            )
        return self._session

    def _start(self) -> None:
        self._raise_if_failed()
        if self._closing:
            raise RecorderError("the recorder is closed")
        if self._task is None:
            self._client()
            self._task = asyncio.create_task(self._guard(), name="govledger-recorder")

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RecorderError(f"the recorder stopped: {self._failure!r}")

    async def _guard(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a defect, not a network failure: stop visibly
            log.exception("recorder_failed")
            self._failure = exc
            self._fail_waiters(RecorderError(f"the recorder stopped: {exc!r}"))

    def _fail_waiters(self, error: RecorderError) -> None:
        while self._flushes:
            _, future = self._flushes.popleft()
            if not future.done():
                future.set_exception(error)
        self._space.set()

    async def _run(self) -> None:
        """One session (a stream, or a run of batch posts) after another, with a
        backoff between failed ones, until closed and drained."""
        while await self._has_work():
            try:
                if self._websocket:
                    await self._stream()
                else:
                    await self._post_batches()
            except Exception as exc:
                reason = _transient(exc)
                if reason is None:
                    raise
                self._requeue(reason)
                await asyncio.sleep(self._next_backoff())

    async def _has_work(self) -> bool:
        while not self._pending:
            if self._closing:
                return False
            self._wake.clear()
            await self._wake.wait()
        return True

    def _requeue(self, reason: str) -> None:
        """After a failed attempt: what was in flight goes back, in recording order."""
        entries = sorted(
            (e for batch in self._inflight.values() for e in batch.entries),
            key=attrgetter("serial"),
        )
        self._inflight.clear()
        if entries:
            self._pending = deque(
                heapq.merge(entries, self._pending, key=attrgetter("serial"))
            )
        self._retries += len(entries)
        self._failures += 1
        self._last_error = reason
        self._wake.set()

    def _next_backoff(self) -> float:
        delay = self._backoff
        self._backoff = min(delay * 2, self._max_backoff)
        return random.uniform(delay / 2, delay)

    async def _next_batch(self) -> _Batch | None:
        """The next batch once it is due (full, old enough, or flushed) and the window
        has room; None once closing and nothing is left to send or to await."""
        loop = asyncio.get_running_loop()
        while True:
            pending = self._pending
            if not pending and self._closing and not self._inflight:
                return None
            delay: float | None = None
            if pending and len(self._inflight) < self._max_in_flight:
                if len(pending) >= self._batch_size or self._flushes or self._closing:
                    break
                delay = pending[0].queued_at + self._flush_interval - loop.time()
                if delay <= 0:
                    break
            self._wake.clear()
            if delay is None:
                await self._wake.wait()
            else:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        entries: list[_Entry] = []
        size = 0
        while pending and len(entries) < self._batch_size:
            size += len(pending[0].payload) + 1
            if entries and size > MAX_BATCH_BYTES:
                break
            entries.append(pending.popleft())
        self._seq += 1
        batch = _Batch(self._seq, entries, loop.time())
        self._inflight[batch.seq] = batch
        return batch

    def _settle(
        self,
        batch: _Batch,
        accepted: int,
        duplicates: int,
        refusals: list[tuple[int, str, str]],
        position: int,
    ) -> None:
        """A batch's answer: count it, report its rejected records, free its room."""
        del self._inflight[batch.seq]
        self._accepted += accepted
        self._duplicates += duplicates
        for index, code, message in refusals:
            if 0 <= index < len(batch.entries):
                self._reject(batch.entries[index], code, message)
        self._unsettled -= len(batch.entries)
        self._position = max(self._position, position)
        self._backoff = self._min_backoff
        self._space.set()
        self._wake.set()
        low = self._lowest_unsettled()
        flushes = self._flushes
        while flushes and flushes[0][0] < low:
            _, future = flushes.popleft()
            if not future.done():
                future.set_result(None)

    def _reject(self, entry: _Entry, code: str, message: str) -> None:
        self._rejected[code] += 1
        rejected = RejectedRecord(entry.event_id, code, message, entry.payload)
        if self._on_rejected is None:
            self.rejections.append(rejected)
            return
        try:
            self._on_rejected(rejected)
        except Exception:  # the caller's callback must not stop the recorder
            log.exception("on_rejected_failed")

    def _lowest_unsettled(self) -> int:
        low = self._pending[0].serial if self._pending else self._serial + 1
        for batch in self._inflight.values():
            low = min(low, batch.entries[0].serial)
        return low

    # --- over the WebSocket ---

    async def _stream(self) -> None:
        session = self._client()
        try:
            async with asyncio.timeout(self._ack_timeout):
                ws = await session.ws_connect(
                    self.url + STREAM_PATH,
                    heartbeat=self._ack_timeout,
                    compress=0,
                    # After a failure, hang up without waiting long for a goodbye.
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0),
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status >= 500 or exc.status in (408, 429):
                raise _Transient(f"the stream was refused: {exc.status}") from exc
            # Answered, but not upgraded (a proxy without WebSocket, an old server).
            log.warning(
                "the WebSocket upgrade was refused (HTTP %s): sending NDJSON batches",
                exc.status,
            )
            self._websocket = False
            return
        async with ws, asyncio.TaskGroup() as group:
            reader = group.create_task(self._read_acks(ws))
            while (batch := await self._next_batch()) is not None:
                frame = b'{"seq":%d,"records":[%b]}' % (
                    batch.seq,
                    b",".join(e.payload for e in batch.entries),
                )
                await ws.send_frame(frame, aiohttp.WSMsgType.TEXT)
            reader.cancel()

    async def _read_acks(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._ack_timeout
            if self._inflight:
                oldest = next(iter(self._inflight.values()))
                wait = max(oldest.sent_at + self._ack_timeout - loop.time(), 0.001)
            try:
                message = await ws.receive(wait)
            except TimeoutError:
                if self._inflight and _overdue(self._inflight, self._ack_timeout, loop):
                    raise _Transient(
                        f"no ack within {self._ack_timeout} s on the stream"
                    ) from None
                continue
            if message.type is aiohttp.WSMsgType.TEXT:
                self._on_ack(message.data)
            elif message.type is not aiohttp.WSMsgType.BINARY:
                raise _Transient(f"the stream closed (code {ws.close_code})")

    def _on_ack(self, data: str) -> None:
        try:
            ack = decode_stream_ack(data)
        except msgspec.MsgspecError as exc:
            raise _Transient(f"an unreadable ack: {exc}") from exc
        batch = None if ack.seq is None else self._inflight.get(ack.seq)
        if ack.error is not None:
            code, message = ack.error.code, ack.error.message
            if batch is None or code in TRANSIENT_CODES:
                raise _Transient(f"{code}: {message}")
            # The frame itself was refused: so is each of its records.
            self._settle(batch, 0, 0, _all(batch, code, message), ack.position)
        elif batch is not None:  # else an ack of a frame already given up on
            refusals = [(r.index, r.code, r.message) for r in ack.rejected]
            self._settle(batch, ack.accepted, ack.duplicates, refusals, ack.position)

    # --- as NDJSON batches ---

    async def _post_batches(self) -> None:
        async with asyncio.TaskGroup() as group:
            while (batch := await self._next_batch()) is not None:
                group.create_task(self._post(batch))

    async def _post(self, batch: _Batch) -> None:
        body = b"\n".join(e.payload for e in batch.entries)
        async with self._client().post(
            self.url + BATCH_PATH,
            data=body,
            headers=_NDJSON,
            timeout=aiohttp.ClientTimeout(total=self._ack_timeout),
        ) as response:
            status = response.status
            raw = await response.read()
        if status >= 500 or status in (408, 429):
            code, message = error_of(raw, status)
            raise _Transient(f"{status} {code}: {message}")
        if status != 200:
            code, message = error_of(raw, status)
            self._settle(batch, 0, 0, _all(batch, code, message), 0)
            return
        try:
            answer = decode_batch_answer(raw)
        except msgspec.MsgspecError as exc:
            raise _Transient(f"an unreadable batch answer: {exc}") from exc
        refusals = [(r.line - 1, r.code, r.message) for r in answer.rejected]
        self._settle(
            batch, answer.accepted, answer.duplicates, refusals, answer.position
        )


def _all(batch: _Batch, code: str, message: str) -> list[tuple[int, str, str]]:
    return [(index, code, message) for index in range(len(batch.entries))]


def _overdue(
    inflight: dict[int, _Batch], ack_timeout: float, loop: asyncio.AbstractEventLoop
) -> bool:
    oldest = next(iter(inflight.values()))
    return loop.time() >= oldest.sent_at + ack_timeout


def _transient(exc: BaseException) -> str | None:
    """Why an attempt failed, if another may succeed; None for a defect."""
    leaves: list[BaseException] = []
    stack = [exc]
    while stack:
        current = stack.pop()
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        else:
            leaves.append(current)
    for leaf in leaves:
        if not isinstance(
            leaf, _Transient | aiohttp.ClientError | OSError | TimeoutError
        ):
            return None
    return "; ".join(str(leaf) or type(leaf).__name__ for leaf in leaves)
