"""POST /api/governance/check: may this key spend more? Answered from the in-memory
enforcement cache only; the database is touched at most to wait for min_position."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from projections.cache import CheckResult
from service import metrics
from service.errors import Invalid, InvalidPosition
from service.web.answers import CheckAnswer
from service.web.http import MAX_QUERY_INT, Right, decode, json_response
from service.web.keys import cache_key, cache_projector_key, settings_key

T = TypeVar("T")


class CheckRequest(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """The body: exactly one of `virtual_key` (the secret) and `virtual_key_id`."""

    virtual_key: str | None = None
    virtual_key_id: str | None = None
    provider: str | None = None
    model: str | None = None
    estimated_cost: Decimal | None = None
    min_position: int | None = None


def _validate(body: CheckRequest) -> None:
    if (body.virtual_key is None) == (body.virtual_key_id is None):
        raise Invalid("send exactly one of virtual_key and virtual_key_id")
    cost = body.estimated_cost
    if cost is not None and not (cost.is_finite() and cost >= 0):
        raise Invalid(f"estimated_cost must be a finite number ≥ 0, got {cost}")
    if body.min_position is not None and not 0 <= body.min_position <= MAX_QUERY_INT:
        raise InvalidPosition(f"min_position must be from 0 to {MAX_QUERY_INT}")


async def check(request: web.Request) -> web.Response:
    body = await decode(request, CheckRequest)
    _validate(body)
    app = request.app
    if body.min_position:
        await app[cache_projector_key].wait_for(
            body.min_position, app[settings_key].min_position_wait_s
        )
    cache = app[cache_key]
    secret = body.virtual_key
    started = time.perf_counter()
    result = cache.check(
        virtual_key_sha256=(
            None if secret is None else hashlib.sha256(secret.encode()).hexdigest()
        ),
        virtual_key_id=body.virtual_key_id,
        provider=body.provider,
        model=body.model,
        estimated_cost=body.estimated_cost,
        now=datetime.now(UTC),
    )
    metrics.observe_check(time.perf_counter() - started, result.reason)
    # The cache cannot read the log right now: the answer is as of `position`.
    stale = app[cache_projector_key].failing
    return json_response(answer(result, cache.position, stale))


def answer(result: CheckResult, position: int, stale: bool) -> CheckAnswer:
    """The cache's decision as the route answers it."""
    return CheckAnswer(
        allowed=result.allowed,
        reason=result.reason,
        http_status=result.http_status,
        budget_id=_given(result.budget_id),
        owner_type=_given(result.owner_type),
        owner_id=_given(result.owner_id),
        current_usage=_given(result.current_usage),
        max_limit=_given(result.max_limit),
        remaining=_given(result.remaining),
        rate_limit=_given(result.rate_limit),
        position=position,
        stale=True if stale else UNSET,
    )


def _given(value: T | None) -> T | UnsetType:
    return UNSET if value is None else value


ROUTES = [("POST", "/api/governance/check", check, Right.CHECK)]
