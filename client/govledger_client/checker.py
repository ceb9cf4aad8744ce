"""Checks: `Checker` asks POST /api/governance/check within a deadline, and answers by
the fail-open or fail-closed policy when the server does not."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal

import aiohttp

from .errors import RecorderError
from .wire import (
    CHECK_PATH,
    CheckRequest,
    CheckResult,
    decode_check,
    encode,
    error_of,
    money,
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
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._fail_open = fail_open
        self._shared = session
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.fallbacks = 0

    async def __aenter__(self) -> Checker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session this checker opened (not a shared one)."""
        self._closed = True
        if self._session is not None:
            await self._session.close()

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
    ) -> CheckResult:
        """The server's answer if it comes within `within` seconds (default: the
        checker's timeout), else the fail-open or fail-closed policy's. Pass exactly
        one of `virtual_key` (the secret) and `virtual_key_id`; `min_position` (a
        position a command answered with) makes the server wait until its cache has
        applied that event."""
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
            )
        )
        session = self._client()
        try:
            async with asyncio.timeout(self._timeout if within is None else within):
                async with session.post(
                    self.url + CHECK_PATH, data=body, headers=_JSON
                ) as response:
                    status = response.status
                    raw = await response.read()
        except TimeoutError:
            return self._fallback("timeout")
        except (aiohttp.ClientError, OSError):
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
