"""Checks: `Checker` asks POST /api/governance/check within a deadline, and answers by
the fail-open or fail-closed policy when the server does not; a reserving check's
hold is released through it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from decimal import Decimal

import aiohttp

from .errors import RecorderError
from .reservations import Releaser
from .wire import (
    CHECK_PATH,
    CheckRequest,
    CheckResult,
    Reservation,
    decode_check,
    encode,
    error_of,
    money,
    service_url,
)

__all__ = ["Checker"]

_JSON = {"Content-Type": "application/json"}


class Checker:
    """May this key spend more? Asks the server, giving it `timeout` seconds.

    Past that, or when the server cannot be reached or answers 5xx or 429,
    `fail_open` decides: allowed (HTTP status 200), or blocked with 503; either way
    the result has `fallback` true and `reason` "timeout" or "unavailable", and
    `fallbacks` counts it. A 4xx answer (a bad request, a bad token) raises
    RecorderError.

    `check(..., reserve=True, estimated_cost=...)` also holds the estimate: the
    result's `reservation` is settled by a usage record naming its id, or dropped by
    `release()`. A reserving check whose answer is lost (a timeout, a dropped
    connection) is asked again in the background with the same Idempotency-Key and
    its hold, if it took one, released.

    Use it as `async with Checker(url, token=...) as checker:` (or call `close()`).
    `session`, when given, supplies the HTTP session (with its token) instead: a
    `Recorder` shares its own this way, and then `close()` leaves it open.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        *,
        token: str | None = None,
        timeout: float = 0.05,
        fail_open: bool = True,
        session: Callable[[], aiohttp.ClientSession] | None = None,
    ) -> None:
        self.url = service_url(url)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._fail_open = fail_open
        self._shared = session
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.fallbacks = 0
        self.releaser = Releaser(self.url, self._client)

    async def __aenter__(self) -> Checker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace: float = 5.0) -> None:
        """Give running releases `grace` seconds, then close the session this
        checker opened (not a shared one)."""
        await self.releaser.close(grace)
        self._closed = True
        if self._session is not None:
            await self._session.close()

    def release(self, reservation: Reservation | str) -> asyncio.Task[bool]:
        """Drop a hold in the background (see `Releaser.release`): returns at once,
        never raises; a repeat while it runs returns the same task."""
        return self.releaser.release(reservation)

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
        """The server's answer if it comes within `within` seconds (default: the
        checker's timeout), else the fail-open or fail-closed policy's. Pass exactly
        one of `virtual_key` (the secret) and `virtual_key_id`; `min_position` (a
        position a command answered with) makes the server wait until its cache has
        applied that event.

        `reserve=True` (with `estimated_cost`; `estimated_tokens` and `ttl_s`, 1 to
        3600 seconds, optional) holds the estimate: an allowed answer carries a
        `reservation`. A reserving check writes, so give it more than a cache
        read's time (`within`). It is sent with `idempotency_key` (default: a new
        uuid4) so that a lost answer can be recovered."""
        if reserve and estimated_cost is None:
            raise ValueError("a reserving check needs estimated_cost")
        if not reserve and (ttl_s is not None or estimated_tokens is not None):
            raise ValueError("ttl_s and estimated_tokens go with reserve=True")
        body = encode(
            CheckRequest(
                virtual_key=virtual_key,
                virtual_key_id=virtual_key_id,
                provider=provider,
                model=model,
                estimated_cost=None
                if estimated_cost is None
                else money(estimated_cost),
                min_position=min_position,
                reserve=reserve,
                estimated_tokens=estimated_tokens,
                ttl_s=ttl_s,
            )
        )
        headers = _JSON
        if reserve:
            idempotency_key = idempotency_key or str(uuid.uuid4())
        if idempotency_key is not None:
            headers = {**_JSON, "Idempotency-Key": idempotency_key}
        session = self._client()
        try:
            async with asyncio.timeout(self._timeout if within is None else within):
                async with session.post(
                    self.url + CHECK_PATH, data=body, headers=headers
                ) as response:
                    status = response.status
                    raw = await response.read()
        except TimeoutError:
            if reserve and idempotency_key is not None:
                self.releaser.recover(body, idempotency_key)
            return self._fallback("timeout")
        except aiohttp.ClientConnectorError:  # never reached the server
            return self._fallback("unavailable")
        except (aiohttp.ClientError, OSError):  # it may have arrived
            if reserve and idempotency_key is not None:
                self.releaser.recover(body, idempotency_key)
            return self._fallback("unavailable")
        if status == 200:
            return decode_check(raw)
        if status >= 500 or status == 429:
            return self._fallback("unavailable")
        code, message = error_of(raw, status)
        raise RecorderError(message, code=code, status=status)

    def _fallback(self, reason: str) -> CheckResult:
        self.fallbacks += 1
        if self._fail_open:
            return CheckResult(
                allowed=True, reason=reason, http_status=200, fallback=True
            )
        return CheckResult(allowed=False, reason=reason, http_status=503, fallback=True)

    def _client(self) -> aiohttp.ClientSession:
        if self._shared is not None:
            return self._shared()
        if self._closed:
            raise RecorderError("the checker is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session
