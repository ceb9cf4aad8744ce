"""Releasing holds: `Releaser` drops reservations in the background, and recovers
the hold of a reserving check whose answer was lost, so that no call leaves a hold
behind until it expires.

A release is POST /api/governance/reservations/{id}/release: idempotent on the
server (a repeat, or the release of a settled or expired hold, answers 200 and
appends nothing), so it is simply sent again after a 5xx, a 429, a timeout or a
refused connection, with a jittered back-off, until the server answers or the hold
would have expired anyway. Nothing here raises into the caller: a release runs as a
task whose result says whether the hold is gone.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

import aiohttp
import msgspec

from .errors import RecorderError
from .wire import CHECK_PATH, RELEASE_PATH, Reservation, decode_check, error_of

__all__ = ["Releaser"]

log = logging.getLogger(__name__)

# How long to keep trying when the hold's expiry is unknown: the longest ttl_s.
MAX_TTL: Final = timedelta(seconds=3600)
_JSON: Final = {"Content-Type": "application/json"}


class _Retry(Exception):
    """An attempt another may succeed at: a 5xx, a 429, no answer."""


class Releaser:
    """Releases holds in the background, each until the server has answered.

    `release()` returns at once with the task doing it (awaiting it is optional;
    it never raises): True once the hold is gone (released now, or already settled,
    released, expired or unknown), False if the server refused the release (a bad
    token) or the hold expired before the server could be reached. Releasing the
    same reservation again while a release runs returns the same task.

    `session` supplies the HTTP session (with its token); `timeout` bounds each
    attempt; the back-off between attempts doubles from `min_backoff` to
    `max_backoff`.
    """

    def __init__(
        self,
        url: str,
        session: Callable[[], aiohttp.ClientSession],
        *,
        timeout: float = 2.0,
        min_backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self._timeout = timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._running: dict[str, asyncio.Task[bool]] = {}
        self.released = 0  # holds this releaser saw gone
        self.abandoned = 0  # holds it gave up on (they expire on their own)

    def release(self, reservation: Reservation | str) -> asyncio.Task[bool]:
        """Drop the hold (a `Reservation`, or its id) in the background."""
        if isinstance(reservation, Reservation):
            rid, until = reservation.id, reservation.expires_at
        else:
            rid, until = reservation, datetime.now(UTC) + MAX_TTL
        running = self._running.get(rid)
        if running is not None:
            return running
        task = asyncio.create_task(self._release(rid, until), name=f"release-{rid}")
        self._running[rid] = task
        task.add_done_callback(lambda _: self._running.pop(rid, None))
        return task

    def recover(self, body: bytes, idempotency_key: str) -> asyncio.Task[bool]:
        """A reserving check whose answer was lost may have taken a hold: ask again
        with the same Idempotency-Key (the server answers the same reservation, or,
        if the first never arrived, takes one now) and release what it names."""
        task = asyncio.create_task(
            self._recover(body, idempotency_key), name=f"recover-{idempotency_key}"
        )
        self._running[f"recover:{idempotency_key}"] = task
        task.add_done_callback(
            lambda _: self._running.pop(f"recover:{idempotency_key}", None)
        )
        return task

    @property
    def pending(self) -> int:
        """Releases (and recoveries) still running."""
        return len(self._running)

    async def close(self, grace: float) -> None:
        """Give the running releases `grace` seconds, then stop them (their holds
        expire on their own)."""
        tasks = list(self._running.values())
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if late:
            log.warning("releases_abandoned_at_close: %d", len(late))

    # --- the attempts ---

    async def _release(self, rid: str, until: datetime) -> bool:
        path = RELEASE_PATH.format(rid)
        backoff = self._min_backoff
        while True:
            try:
                status, raw = await self._post(path, b"{}", {})
            except _Retry as exc:
                if datetime.now(UTC) >= until:
                    self.abandoned += 1
                    log.warning("release_abandoned: %s expired first (%s)", rid, exc)
                    return False
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, self._max_backoff)
                continue
            if status in (200, 404):  # 404: the server holds nothing by that id
                self.released += 1
                return True
            if status == 0:
                self.abandoned += 1
                return False
            code, message = error_of(raw, status)
            self.abandoned += 1
            log.error("release_refused: %s: %s %s: %s", rid, status, code, message)
            return False

    async def _recover(self, body: bytes, idempotency_key: str) -> bool:
        until = datetime.now(UTC) + MAX_TTL
        headers = {"Idempotency-Key": idempotency_key}
        backoff = self._min_backoff
        while True:
            try:
                status, raw = await self._post(CHECK_PATH, body, headers)
                break
            except _Retry:
                if datetime.now(UTC) >= until:
                    self.abandoned += 1
                    return False
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, self._max_backoff)
        if status == 0:
            self.abandoned += 1
            return False
        if status != 200:
            return True  # refused: no hold was taken
        try:
            reservation = decode_check(raw).reservation
        except msgspec.MsgspecError:
            return False
        if reservation is None:
            return True  # blocked: no hold was taken
        return await self.release(reservation)

    async def _post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """One attempt: (status, body) of an answer that another attempt would not
        change; _Retry for the others."""
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session().post(
                    self.url + path, data=body, headers={**_JSON, **headers}
                ) as response,
            ):
                status = response.status
                raw = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _Retry(str(exc) or type(exc).__name__) from exc
        except RecorderError:  # closed meanwhile: the hold expires on its own
            return 0, b""
        if status >= 500 or status in (408, 429):
            raise _Retry(f"HTTP {status}")
        return status, raw
