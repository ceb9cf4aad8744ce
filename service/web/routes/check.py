"""POST /api/governance/check: may this key spend more? Answered from the in-memory
enforcement cache only; the database is touched at most to wait for min_position."""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, TypeVar, get_args

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from projections.cache import GovernanceCache
from projections.cache_entries import CheckResult
from service import eventstore, idempotency, metrics
from service.domain.bounds import MAX_NAME, NO_NUL_PATTERN, Id
from service.domain.commands import strict_decode
from service.domain.events import ReservationHeld, ReservationReleased
from service.domain.numbers import (
    Money,
    Whole,
    decimal_number,
    decode_hook,
    money_schema,
)
from service.domain.usage import Name, Row, Secret, cost_rejection, kept_money
from service.errors import Forbidden, Invalid, InvalidCost, InvalidPosition, NotFound
from service.eventstore import Queryable, encode_event
from service.ingest import reach_head
from service.records import RecordedEvent
from service.web import keyed
from service.web.answers import CheckAnswer, Released
from service.web.encoded import check_body
from service.web.http import (
    MAX_QUERY_INT,
    ROLE_RIGHTS,
    Right,
    authenticate,
    authorization,
    event_metadata,
    header,
    json_response,
    path_id,
    read_body,
)
from service.web.keys import (
    cache_key,
    cache_projector_key,
    outbox_key,
    pool_key,
    settings_key,
    writer_key,
)
from service.web.prepared import JsonAnswer

T = TypeVar("T")


# Enforced by _validate, which names the error (invalid_request).
EstimatedCost = Annotated[
    Money,
    msgspec.Meta(
        extra_json_schema=money_schema(
            number={"minimum": 0},
            text="^(?:[0-9]+(?:\\.[0-9]+)?|-0+(?:\\.0+)?)$",
            description="At least 0",
        )
    ),
]
MAX_TOKENS = 2**31 - 1
MAX_TTL_S = 3600
_RANGE_TOKENS = {"minimum": 0, "maximum": MAX_TOKENS}
_RANGE_TTL = {"minimum": 1, "maximum": MAX_TTL_S}
# Enforced by _validate, which names the error (invalid_position).
MinPosition = Annotated[
    Whole, msgspec.Meta(extra_json_schema={"minimum": 0, "maximum": MAX_QUERY_INT})
]


class CheckRequest(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """The body: exactly one of `virtual_key` (the secret) and `virtual_key_id` (a
    UUID in any letter case)."""

    virtual_key: Secret | None = None
    virtual_key_id: Id | None = None
    provider: Name | None = None
    model: Name | None = None
    estimated_cost: EstimatedCost | None = None
    min_position: MinPosition | None = None
    # Hold the estimate until a usage record names the reservation, a release, or
    # `ttl_s` seconds pass (docs/API.md, "Reservations").
    reserve: bool = False
    # Whole numbers (5.0 is 5), their ranges enforced by _validate.
    estimated_tokens: (
        Annotated[Whole, msgspec.Meta(extra_json_schema=_RANGE_TOKENS)] | None
    ) = None
    ttl_s: Annotated[Whole, msgspec.Meta(extra_json_schema=_RANGE_TTL)] | None = None


DEFAULT_TTL_S = 600
# A reservation id made from the key and the client's Idempotency-Key: a retry of a
# reserving check names the same reservation. Its events' ids are made from it too.
_RESERVATIONS = uuid.UUID("5c6f0e1a-9a53-4d0e-8f0b-7a0c2f3b8e11")


def held_event_id(reservation_id: str) -> uuid.UUID:
    """The event id of a reservation's ReservationHeld: made from the reservation
    id, never that id itself, so a gateway may give the call's usage record the
    reservation's id as its event_id (the log's event ids are unique: a record
    under the hold's own id would be taken for a repeat of it)."""
    return uuid.uuid5(_RESERVATIONS, f"{reservation_id}:held")


async def _stored_hold(pool: Queryable, reservation_id: str) -> RecordedEvent | None:
    """The ReservationHeld of `reservation_id` in the log, under its own event id
    or, held before the two ids differed, under the reservation id."""
    return await eventstore.read_event_of(
        pool, "ReservationHeld", [str(held_event_id(reservation_id)), reservation_id]
    )


def _validate(body: CheckRequest) -> None:
    if (body.virtual_key is None) == (body.virtual_key_id is None):
        raise Invalid("send exactly one of virtual_key and virtual_key_id")
    cost = body.estimated_cost
    if cost is not None and not (cost.is_finite() and cost >= 0):
        raise Invalid(f"estimated_cost must be a finite number ≥ 0, got {cost}")
    if body.min_position is not None and not 0 <= body.min_position <= MAX_QUERY_INT:
        raise InvalidPosition(f"min_position must be from 0 to {MAX_QUERY_INT}")
    tokens = body.estimated_tokens
    if tokens is not None and not 0 <= tokens <= MAX_TOKENS:
        raise Invalid(f"estimated_tokens must be from 0 to {MAX_TOKENS}")
    if not body.reserve:
        # A plain check takes estimated_tokens too (a gateway may send it on every
        # check) and, holding nothing, weighs it as a reserving check does: not at
        # all (a rate limit blocks on what was used and is held).
        if body.ttl_s is not None:
            raise Invalid("ttl_s goes with reserve: true")
        return
    if body.estimated_cost is None:
        raise Invalid("a reserving check needs estimated_cost (0 holds no money)")
    if cost_rejection(body.estimated_cost) is not None:  # a hold is kept exactly
        raise InvalidCost(
            "the estimated_cost of a reserving check must be below 10^12 with at"
            " most 9 fractional digits"
        )
    if body.ttl_s is not None and not 1 <= body.ttl_s <= MAX_TTL_S:
        raise Invalid(f"ttl_s must be from 1 to {MAX_TTL_S}")


_decode_check = msgspec.json.Decoder(
    CheckRequest, dec_hook=decode_hook, float_hook=decimal_number
)

# The same bounds on a name but its pattern (no U+0000), which msgspec checks with a
# Python regex call per field: `_decoded` checks it itself.
_NamePatternUnchecked = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
# What `_decoded` assumes of the names: a change to Name must change it too.
if get_args(Name) != (
    str,
    msgspec.Meta(min_length=1, max_length=MAX_NAME, pattern=NO_NUL_PATTERN),
):
    raise RuntimeError("Name changed: update _LenientCheckRequest and _decoded")


class _LenientCheckRequest(CheckRequest, frozen=True, kw_only=True):
    """A CheckRequest decoded without the names' pattern."""

    provider: _NamePatternUnchecked | None = None
    model: _NamePatternUnchecked | None = None


# Decimal is immutable: the decoding of a money string is the same Decimal each time.
_costs: dict[str, Decimal] = {}
_MAX_COSTS = 1024


def _check_hook(type_: type, value: object) -> object:
    if type_ is Money and isinstance(value, str):
        cost = _costs.get(value)
        if cost is None:
            cost = decode_hook(type_, value)  # type: ignore[assignment]
            if len(_costs) >= _MAX_COSTS:
                _costs.clear()
            _costs[value] = cost  # type: ignore[assignment]
        return cost
    return decode_hook(type_, value)


_decode_lenient = msgspec.json.Decoder(
    _LenientCheckRequest, dec_hook=_check_hook, float_hook=decimal_number
)


def _decoded(raw: bytes) -> CheckRequest:
    """The body, strictly decoded (money exact), the key's id in lower case.

    Decoded without the names' pattern first; a body that breaks it, or fails to
    decode at all, is decoded again strictly, so its error is the strict decoding's."""
    try:
        body: CheckRequest = _decode_lenient.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        body = strict_decode(_decode_check, raw)
    else:
        provider = body.provider
        model = body.model
        if (provider is not None and "\x00" in provider) or (
            model is not None and "\x00" in model
        ):
            body = strict_decode(_decode_check, raw)
    key_id = body.virtual_key_id
    if key_id is not None:  # a hyphenated UUID: lower case is its stored spelling
        body = msgspec.structs.replace(body, virtual_key_id=key_id.lower())
    return body


async def check(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[settings_key]
    # Not kept for a key: whether the check is a command shows only in its body.
    raw = await read_body(request, settings.max_body_bytes)
    body = _decoded(raw)
    if body.reserve:
        # A command: it writes (the recorder right) and honours Idempotency-Key.
        if not settings.is_open:
            role = authenticate(settings, authorization(request))
            if Right.RECORD not in ROLE_RIGHTS[role]:
                raise Forbidden(
                    f"the {role} role may not reserve: a reservation writes"
                )
        return await keyed.once(request, raw, lambda: _reserving(request, body))
    # A plain check is no command: its Idempotency-Key is checked, then ignored.
    if (key := header(request, "Idempotency-Key")) is not None:
        idempotency.check_key(key)
    _validate(body)
    projector = app[cache_projector_key]
    if body.min_position:
        await projector.wait_for(body.min_position, settings.min_position_wait_s)
    cache = app[cache_key]
    sha256 = _sha256(body.virtual_key)
    started = time.perf_counter()
    result = _decide(cache, body, sha256)
    if result.reason == "unknown_virtual_key":
        # Unknown only once the cache has seen the log as it was when asked: a key
        # created a moment ago (through any replica) is then known; else a 503.
        await _reach_head(app)
        started = time.perf_counter()
        result = _decide(cache, body, sha256)
    metrics.observe_check(time.perf_counter() - started, result.reason)
    # The cache cannot read the log right now: the answer is as of `position`.
    encoded = check_body(result, cache.position, projector.failing, answer)
    return JsonAnswer(encoded, app[outbox_key])


async def _reserving(request: web.Request, body: CheckRequest) -> web.Response:
    _validate(body)
    app = request.app
    if body.min_position:
        await app[cache_projector_key].wait_for(
            body.min_position, app[settings_key].min_position_wait_s
        )
    sha256 = _sha256(body.virtual_key)
    resolved = app[cache_key].resolve_usage(
        virtual_key_sha256=sha256, virtual_key_id=body.virtual_key_id, provider=None
    )
    if resolved is None:
        await _reach_head(app)
    return await _reserve(request, body, sha256)


def _decide(
    cache: GovernanceCache, body: CheckRequest, sha256: str | None
) -> CheckResult:
    return cache.check(
        virtual_key_sha256=sha256,
        virtual_key_id=body.virtual_key_id,
        provider=body.provider,
        model=body.model,
        estimated_cost=body.estimated_cost,
        now=datetime.now(UTC),
    )


async def _reach_head(app: web.Application) -> None:
    await reach_head(
        app[pool_key], app[cache_projector_key], app[settings_key].min_position_wait_s
    )


async def _reserve(
    request: web.Request, body: CheckRequest, sha256: str | None
) -> web.Response:
    """A reserving check: decided and held in memory at once (so concurrent checks
    see the hold), then the hold's event is appended through the usage writer and
    answered after its commit; a failed append drops the hold and answers 503."""
    app = request.app
    cache = app[cache_key]
    now = datetime.now(UTC)
    idempotency_key = header(request, "Idempotency-Key")
    key = cache._key(sha256, body.virtual_key_id)
    if idempotency_key is None or key is None:
        reservation_id = str(uuid.uuid4())
    else:
        # Named by the key and the Idempotency-Key: an attempt whose hold committed
        # but whose answer was not kept (the process stopped between) finds it.
        reservation_id = str(uuid.uuid5(_RESERVATIONS, f"{key.id}:{idempotency_key}"))
        open_hold = cache.holds.get(reservation_id)
        if open_hold is not None:
            return json_response(
                _same_reservation(reservation_id, cache.position, open_hold.expires_at)
            )
        stored = await _stored_hold(app[pool_key], reservation_id)
        if stored is not None and isinstance(stored.event, ReservationHeld):
            return json_response(
                _same_reservation(
                    reservation_id, stored.global_position, stored.event.expires_at
                )
            )
    assert body.estimated_cost is not None  # _validate
    result, event = cache.reserve(
        virtual_key_sha256=sha256,
        virtual_key_id=body.virtual_key_id,
        provider=body.provider,
        model=body.model,
        estimated_cost=kept_money(body.estimated_cost),
        estimated_tokens=body.estimated_tokens or 0,
        reservation_id=reservation_id,
        expires_at=now + timedelta(seconds=body.ttl_s or DEFAULT_TTL_S),
        now=now,
    )
    stale = app[cache_projector_key].failing
    if event is None:
        return json_response(answer(result, cache.position, stale))
    held_id = held_event_id(reservation_id)
    row = Row(
        key=held_id.int,
        event_id=str(held_id),
        stream_id="usage-" + event.virtual_key_id,
        data=encode_event(event),
        type="ReservationHeld",
    )
    try:
        submitted = await app[writer_key].submit([row], event_metadata())
        [outcome] = await submitted.outcomes()
    except BaseException:
        cache.release(reservation_id, event.virtual_key_id)
        raise
    reserved = answer(result, outcome.position, stale)
    return json_response(
        msgspec.structs.replace(
            reserved, reservation_id=reservation_id, expires_at=event.expires_at
        )
    )


def _same_reservation(
    reservation_id: str, position: int, expires_at: datetime
) -> CheckAnswer:
    """The answer of a reservation held before under the same Idempotency-Key."""
    return CheckAnswer(
        allowed=True,
        reason="ok",
        http_status=200,
        position=position,
        reservation_id=reservation_id,
        expires_at=expires_at,
    )


async def release(request: web.Request) -> web.Response:
    """POST /api/governance/reservations/{id}/release: drop an open hold (200 with
    the release's position); a closed one answers 200 and appends nothing; an id
    no check ever answered is a 404. It takes no body: one declared as a form or,
    in open mode, as anything but JSON is refused (415) as on every command."""
    reservation_id = path_id(request, "reservation")
    raw = await keyed.read_body(request, request.app[settings_key].max_body_bytes)
    return await keyed.once(request, raw, lambda: _release(request, reservation_id))


async def _release(request: web.Request, reservation_id: str) -> web.Response:
    app = request.app
    cache = app[cache_key]
    hold = cache.holds.get(reservation_id)
    if hold is None:
        stored = await _stored_hold(app[pool_key], reservation_id)
        if stored is None:
            raise NotFound(f"reservation {reservation_id} does not exist")
        # Held through another replica: wait until this cache has seen it.
        await app[cache_projector_key].wait_for(
            stored.global_position, app[settings_key].min_position_wait_s
        )
        hold = cache.holds.get(reservation_id)
    if hold is None or hold.expires_at <= datetime.now(UTC):
        # Settled, released or expired (lapsed, though not yet swept): nothing to do.
        return json_response(Released(position=cache.position))
    event = ReservationReleased(
        reservation_id=reservation_id, virtual_key_id=hold.virtual_key_id
    )
    released_id = uuid.uuid5(_RESERVATIONS, f"{reservation_id}:released")
    row = Row(
        key=released_id.int,
        event_id=str(released_id),
        stream_id="usage-" + hold.virtual_key_id,
        data=encode_event(event),
        type="ReservationReleased",
    )
    submitted = await app[writer_key].submit([row], event_metadata())
    [outcome] = await submitted.outcomes()
    cache.release(reservation_id, hold.virtual_key_id)
    return json_response(Released(position=outcome.position))


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
        held=_given(result.held),
        position=position,
        stale=True if stale else UNSET,
    )


def _sha256(secret: str | None) -> str | None:
    return None if secret is None else hashlib.sha256(secret.encode()).hexdigest()


def _given(value: T | None) -> T | UnsetType:
    return UNSET if value is None else value


ROUTES = [
    ("POST", "/api/governance/check", check, Right.CHECK),
    ("POST", "/api/governance/reservations/{id}/release", release, Right.RECORD),
]
