"""POST/PUT/DELETE of customers, teams and virtual keys: decode, decide, append, answer.

A command runs in one REPEATABLE READ transaction: read the streams it touches, decide
(pure), append at the versions it read, and keep the answer of an Idempotency-Key
request beside the events. A concurrent change to any of those streams aborts it
(VersionConflict or a serialization failure); without If-Match it is retried afresh.
The answer is rendered from the folded streams, not from the read model: budgets and
rate limits show their definition and current period, with usage 0 (usage lives in
the read model).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import string
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from functools import reduce
from typing import Any, Generic, NamedTuple, TypeVar

import asyncpg
import msgspec
import structlog
from aiohttp import web

from service import eventstore
from service.domain import customers, teams, virtual_keys
from service.domain.budgets import parse_duration, period_start
from service.domain.commands import (
    AnyBody,
    CreateCustomer,
    CreateTeam,
    CreateVirtualKey,
    CustomerBody,
    CustomerChanges,
    DeleteCustomer,
    DeleteTeam,
    DeleteVirtualKey,
    DetachTeam,
    DetachVirtualKey,
    KeyDigest,
    TeamBody,
    TeamChanges,
    UpdateCustomer,
    UpdateTeam,
    UpdateVirtualKey,
    VirtualKeyBody,
    VirtualKeyChanges,
    ids_needed,
)
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    ProviderConfig,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyUpdated,
)
from service.errors import IdempotencyConflict, Invalid, NotFound, VersionConflict
from service.eventstore import Executed, Executor
from service.http import Right, decode_bytes, json_response, read_body, settings_key
from service.state import pool_key

log = structlog.get_logger()

S = TypeVar("S")
C = TypeVar("C")
Answer = tuple[int, dict[str, Any]]
Run = Callable[[Executor, datetime], Awaitable[Answer]]

# Without If-Match a conflicting command is decided again on fresh state.
ATTEMPTS = 8
MAX_IDEMPOTENCY_KEY_LENGTH = 255


# --- one stream: read, decide, append ----------------------------------------------


async def _step(
    conn: Executor,
    stream_id: str,
    command: C,
    decide: Callable[[C, S | None], Sequence[AnyEvent]],
    evolve: Callable[[S | None, AnyEvent], S | None],
    at: datetime,
    expected_version: int | None = None,
) -> Executed[S]:
    metadata = {
        "command": type(command).__name__,
        "request_id": structlog.contextvars.get_contextvars().get("request_id"),
    }
    return await eventstore.execute(
        conn,
        stream_id,
        command,
        decide,
        evolve,
        recorded_at=at,
        expected_version=expected_version,
        metadata=metadata,
    )


async def _exists(
    conn: Executor, stream_id: str, evolve: Callable[[S | None, AnyEvent], S | None]
) -> bool:
    _, history = await eventstore.read_stream(conn, stream_id)
    return reduce(evolve, (r.event for r in history), None) is not None


async def _unknown_references(
    conn: Executor, *, customer_id: object = None, team_id: object = None
) -> frozenset[str]:
    """The customer and team ids a body names that do not exist (None, UNSET: none)."""
    unknown: set[str] = set()
    if isinstance(customer_id, str) and not await _exists(
        conn, f"customer-{customer_id}", customers.evolve
    ):
        unknown.add(customer_id)
    if isinstance(team_id, str) and not await _exists(
        conn, f"team-{team_id}", teams.evolve
    ):
        unknown.add(team_id)
    return frozenset(unknown)


# Every stream whose entity events ever named the id; the partial indexes of
# migration 0004 serve exactly these type lists. Folding each stream tells which
# still point at it.
_STREAMS_NAMING_CUSTOMER = """
SELECT DISTINCT stream_id FROM events
WHERE type IN ('TeamCreated', 'TeamUpdated', 'VirtualKeyCreated', 'VirtualKeyUpdated')
  AND data ->> 'customer_id' = $1
ORDER BY stream_id
"""
_STREAMS_NAMING_TEAM = """
SELECT DISTINCT stream_id FROM events
WHERE type IN ('VirtualKeyCreated', 'VirtualKeyUpdated') AND data ->> 'team_id' = $1
ORDER BY stream_id
"""


async def _detach(conn: Executor, at: datetime, owner: str, owner_id: str) -> list[int]:
    """Detach the teams and keys that point at a deleted customer or team."""
    if owner == "customer":
        rows = await conn.fetch(_STREAMS_NAMING_CUSTOMER, owner_id)
    elif owner == "team":
        rows = await conn.fetch(_STREAMS_NAMING_TEAM, owner_id)
    else:
        return []
    customer_id = owner_id if owner == "customer" else None
    team_id = owner_id if owner == "team" else None
    positions: list[int] = []
    for row in rows:  # ordered by stream id: concurrent deletes lock in one order
        stream_id: str = row["stream_id"]
        if stream_id.startswith("team-") and customer_id is not None:
            team = DetachTeam(team_id=stream_id[5:], customer_id=customer_id)
            step = await _step(conn, stream_id, team, teams.decide, teams.evolve, at)
            positions.append(step.position)
        elif stream_id.startswith("virtual_key-"):
            key = DetachVirtualKey(
                virtual_key_id=stream_id[12:], team_id=team_id, customer_id=customer_id
            )
            detached = await _step(
                conn, stream_id, key, virtual_keys.decide, virtual_keys.evolve, at
            )
            positions.append(detached.position)
    return positions


# --- answers -----------------------------------------------------------------------


def _budgets_in(event: AnyEvent) -> Iterator[Budget]:
    match event:
        case (
            CustomerCreated()
            | CustomerBudgetsReplaced()
            | TeamCreated()
            | TeamBudgetsReplaced()
            | VirtualKeyBudgetsReplaced()
        ):
            yield from event.budgets
        case VirtualKeyCreated():
            yield from event.budgets
            for config in event.provider_configs:
                yield from config.budgets
        case VirtualKeyUpdated():
            for config in event.provider_configs:
                yield from config.budgets


class _View(NamedTuple):
    """What rendering needs beside an entity's state."""

    anchors: dict[str, datetime]  # budget id → recorded_at of the event creating it
    now: datetime

    def budgets(
        self, budgets: Sequence[Budget], owner_type: str, owner_id: str
    ) -> list[dict[str, Any]]:
        return [
            {
                "id": b.budget_id,
                "max_limit": b.max_limit,
                "reset_duration": b.reset_duration,
                "calendar_aligned": b.calendar_aligned,
                "current_usage": Decimal(0),
                "last_reset": period_start(
                    self.now,
                    anchor=self.anchors.get(b.budget_id, self.now),
                    duration=parse_duration(b.reset_duration),
                    calendar_aligned=b.calendar_aligned,
                ),
                "owner_type": owner_type,
                "owner_id": owner_id,
            }
            for b in budgets
        ]


def _view(step: Executed[Any], now: datetime) -> _View:
    anchors: dict[str, datetime] = {}
    for event, recorded_at in step.timeline:
        for budget in _budgets_in(event):
            anchors.setdefault(budget.budget_id, recorded_at)
    return _View(anchors, now)


def _rate_limit(rate_limit: RateLimit | None) -> dict[str, Any] | None:
    if rate_limit is None:
        return None
    return msgspec.structs.asdict(rate_limit) | {
        "token_current_usage": 0,
        "request_current_usage": 0,
    }


def _stamps(step: Executed[Any]) -> dict[str, Any]:
    return {
        "version": step.version,
        "created_at": step.timeline[0][1],
        "updated_at": step.timeline[-1][1],
    }


def render_customer(
    step: Executed[customers.Customer], now: datetime
) -> dict[str, Any]:
    customer = step.state
    assert customer is not None
    return {
        "id": customer.id,
        "name": customer.name,
        "budgets": _view(step, now).budgets(customer.budgets, "customer", customer.id),
        "rate_limit": _rate_limit(customer.rate_limit),
        **_stamps(step),
    }


def render_team(step: Executed[teams.Team], now: datetime) -> dict[str, Any]:
    team = step.state
    assert team is not None
    return {
        "id": team.id,
        "name": team.name,
        "customer_id": team.customer_id,
        "budgets": _view(step, now).budgets(team.budgets, "team", team.id),
        "rate_limit": _rate_limit(team.rate_limit),
        **_stamps(step),
    }


def render_virtual_key(
    step: Executed[virtual_keys.VirtualKey], now: datetime
) -> dict[str, Any]:
    key = step.state
    assert key is not None
    view = _view(step, now)
    return {
        "id": key.id,
        "name": key.name,
        "team_id": key.team_id,
        "customer_id": key.customer_id,
        "is_active": key.is_active,
        "budgets": view.budgets(key.budgets, "virtual_key", key.id),
        "rate_limit": _rate_limit(key.rate_limit),
        "provider_configs": [_provider_config(c, view) for c in key.provider_configs],
        "value_hint": key.value_hint,
        **_stamps(step),
    }


def _provider_config(config: ProviderConfig, view: _View) -> dict[str, Any]:
    return {
        "id": config.provider_config_id,
        "provider": config.provider,
        "allowed_models": (
            ["*"] if config.allowed_models is None else list(config.allowed_models)
        ),
        "budgets": view.budgets(
            config.budgets, "provider_config", config.provider_config_id
        ),
        "rate_limit": _rate_limit(config.rate_limit),
    }


# --- virtual key secrets -----------------------------------------------------------

_SECRET_ALPHABET = string.ascii_letters + string.digits + "-_"


def new_secret() -> str:
    """`sk-gl-` and 32 random url-safe characters."""
    return "sk-gl-" + "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(32))


def digest(value: str) -> KeyDigest:
    """What is stored of a secret: the hex SHA-256 of its UTF-8 bytes, its last 4."""
    return KeyDigest(sha256=hashlib.sha256(value.encode()).hexdigest(), hint=value[-4:])


# --- the command path: idempotency, transaction, retries ---------------------------


def _if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    text = raw.strip().removeprefix('"').removesuffix('"')
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise Invalid(f"If-Match must be the entity's version, an integer; got {raw!r}")
    return int(text)


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise Invalid(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters"
        )
    return key


def _fingerprint(request: web.Request, body: bytes) -> str:
    head = f"{request.method}\0{request.path}\0{request.headers.get('If-Match', '')}\0"
    return hashlib.sha256(head.encode() + body).hexdigest()


def _key_column(key: str) -> str:
    return hashlib.sha256(b"govledger idempotency key\0" + key.encode()).hexdigest()


def _keystream(key: str, nonce: bytes, size: int) -> bytes:
    seed = b"govledger command result\0" + nonce + key.encode()
    return hashlib.shake_256(seed).digest(size)


def _seal(key: str, body: bytes) -> bytes:
    """The answer XOR a SHAKE-256 keystream of (nonce, key); the nonce leads."""
    nonce = secrets.token_bytes(16)
    return nonce + _xor(body, _keystream(key, nonce, len(body)))


def _unseal(key: str, sealed: bytes) -> bytes:
    nonce, body = sealed[:16], sealed[16:]
    return _xor(body, _keystream(key, nonce, len(body)))


def _xor(data: bytes, stream: bytes) -> bytes:
    mixed = int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")
    return mixed.to_bytes(len(data), "big")


async def _replay(conn: Executor, key: str, fingerprint: str) -> web.Response | None:
    row = await conn.fetchrow(
        "SELECT request_fingerprint, status, body FROM command_results"
        " WHERE idempotency_key = $1",
        _key_column(key),
    )
    if row is None:
        return None
    if row["request_fingerprint"] != fingerprint:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used for a different request"
        )
    response = web.Response(
        body=_unseal(key, row["body"]),
        status=row["status"],
        content_type="application/json",
    )
    response.headers["Idempotent-Replayed"] = "true"
    return response


_RETRIED = (VersionConflict, asyncpg.SerializationError, asyncpg.DeadlockDetectedError)


async def _execute(
    request: web.Request, body: bytes, run: Run, *, retry: bool
) -> web.Response:
    pool = request.app[pool_key]
    key = _idempotency_key(request)
    fingerprint = _fingerprint(request, body)
    at = datetime.now(UTC)
    for attempt in range(1, ATTEMPTS + 1):
        if key is not None and (replayed := await _replay(pool, key, fingerprint)):
            return replayed
        try:
            async with (
                pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read"),
            ):
                status, answer = await run(conn, at)
                response = json_response(answer, status)
                if key is not None:
                    assert isinstance(response.body, bytes)
                    await conn.execute(
                        "INSERT INTO command_results (idempotency_key,"
                        " request_fingerprint, status, body) VALUES ($1, $2, $3, $4)",
                        _key_column(key),
                        fingerprint,
                        status,
                        _seal(key, response.body),
                    )
        except asyncpg.UniqueViolationError as exc:
            # The same key committed first in a concurrent request: answer as it did.
            if key is None or exc.constraint_name != "command_results_pkey":
                raise
            if (replayed := await _replay(pool, key, fingerprint)) is None:
                raise
            return replayed
        except _RETRIED as exc:
            if retry and attempt < ATTEMPTS:
                log.info("command_retried", attempt=attempt, error=type(exc).__name__)
                continue
            # What moved the stream may be a concurrent request with this same key.
            if key is not None and (replayed := await _replay(pool, key, fingerprint)):
                return replayed
            if isinstance(exc, VersionConflict):
                raise
            raise VersionConflict(
                f"{request.path} was changed by someone else meanwhile; reload it"
            ) from exc
        structlog.contextvars.bind_contextvars(position=answer["position"])
        return response
    raise AssertionError("unreachable: the last attempt returns or raises")


# --- handlers ----------------------------------------------------------------------


class Entity(NamedTuple, Generic[S, C]):
    """One aggregate as the handlers see it; `name` prefixes its streams and answers."""

    name: str
    decide: Callable[[C, S | None], Sequence[AnyEvent]]
    evolve: Callable[[S | None, AnyEvent], S | None]
    render: Callable[[Executed[S], datetime], dict[str, Any]]


CUSTOMER = Entity("customer", customers.decide, customers.evolve, render_customer)
TEAM = Entity("team", teams.decide, teams.evolve, render_team)
VIRTUAL_KEY = Entity(
    "virtual_key", virtual_keys.decide, virtual_keys.evolve, render_virtual_key
)
B = TypeVar("B", bound=AnyBody)


def _path_id(request: web.Request, entity: Entity[Any, Any]) -> str:
    """The canonical spelling of the UUID in the path; anything else names nothing."""
    raw = request.match_info["id"]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        what = entity.name.replace("_", " ")
        raise NotFound(f"{what} {raw!r} does not exist") from None


async def _decode(request: web.Request, type_: type[B]) -> tuple[bytes, B]:
    """The raw body and its strict decoding, references in their stored spelling."""
    raw = await read_body(request, request.app[settings_key].max_body_bytes)
    body = decode_bytes(raw, type_)
    if _has_nul(msgspec.to_builtins(body)):
        # PostgreSQL's text and jsonb cannot hold U+0000.
        raise Invalid("strings in the body must not contain the character U+0000")
    references = {
        name: _canonical(getattr(body, name))
        for name in ("team_id", "customer_id")
        if name in body.__struct_fields__
    }
    return raw, msgspec.structs.replace(body, **references)


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def _canonical(reference: object) -> object:
    """A UUID in the spelling ids are stored in; anything else as sent (it names
    nothing, so it is an unknown reference)."""
    if isinstance(reference, str):
        with contextlib.suppress(ValueError):
            return str(uuid.UUID(reference))
    return reference


def _new_ids(body: AnyBody) -> tuple[str, ...]:
    return tuple(str(uuid.uuid4()) for _ in range(ids_needed(body)))


async def _save(
    request: web.Request,
    raw: bytes,
    entity: Entity[S, C],
    entity_id: str,
    command: Callable[[frozenset[str]], C],
    *,
    body: AnyBody,
    created: bool,
    value: str | None = None,
) -> web.Response:
    """Create or update one entity; `command` gets the unknown references."""
    expected = None if created else _if_match(request)

    async def run(conn: Executor, at: datetime) -> Answer:
        unknown = await _unknown_references(
            conn,
            customer_id=getattr(body, "customer_id", None),
            team_id=getattr(body, "team_id", None),
        )
        step = await _step(
            conn,
            f"{entity.name}-{entity_id}",
            command(unknown),
            entity.decide,
            entity.evolve,
            at,
            expected,
        )
        rendered = entity.render(step, at)
        if value is not None:
            rendered["value"] = value
        return 201 if created else 200, {
            entity.name: rendered,
            "position": step.position,
        }

    return await _execute(request, raw, run, retry=expected is None)


async def _delete(
    request: web.Request, entity: Entity[S, C], command: Callable[[str], C]
) -> web.Response:
    """Delete one entity and detach what pointed at it, in one transaction."""
    entity_id = _path_id(request, entity)
    expected = _if_match(request)

    async def run(conn: Executor, at: datetime) -> Answer:
        step = await _step(
            conn,
            f"{entity.name}-{entity_id}",
            command(entity_id),
            entity.decide,
            entity.evolve,
            at,
            expected,
        )
        detached = await _detach(conn, at, entity.name, entity_id)
        return 200, {"position": max([step.position, *detached])}

    return await _execute(request, b"", run, retry=expected is None)


async def create_customer(request: web.Request) -> web.Response:
    raw, body = await _decode(request, CustomerBody)
    new_id = str(uuid.uuid4())
    return await _save(
        request,
        raw,
        CUSTOMER,
        new_id,
        lambda _: CreateCustomer(customer_id=new_id, body=body, new_ids=_new_ids(body)),
        body=body,
        created=True,
    )


async def update_customer(request: web.Request) -> web.Response:
    customer_id = _path_id(request, CUSTOMER)
    raw, changes = await _decode(request, CustomerChanges)
    return await _save(
        request,
        raw,
        CUSTOMER,
        customer_id,
        lambda _: UpdateCustomer(
            customer_id=customer_id, changes=changes, new_ids=_new_ids(changes)
        ),
        body=changes,
        created=False,
    )


async def delete_customer(request: web.Request) -> web.Response:
    return await _delete(request, CUSTOMER, lambda i: DeleteCustomer(customer_id=i))


async def create_team(request: web.Request) -> web.Response:
    raw, body = await _decode(request, TeamBody)
    new_id = str(uuid.uuid4())
    return await _save(
        request,
        raw,
        TEAM,
        new_id,
        lambda unknown: CreateTeam(
            team_id=new_id,
            body=body,
            new_ids=_new_ids(body),
            unknown_references=unknown,
        ),
        body=body,
        created=True,
    )


async def update_team(request: web.Request) -> web.Response:
    team_id = _path_id(request, TEAM)
    raw, changes = await _decode(request, TeamChanges)
    return await _save(
        request,
        raw,
        TEAM,
        team_id,
        lambda unknown: UpdateTeam(
            team_id=team_id,
            changes=changes,
            new_ids=_new_ids(changes),
            unknown_references=unknown,
        ),
        body=changes,
        created=False,
    )


async def delete_team(request: web.Request) -> web.Response:
    return await _delete(request, TEAM, lambda i: DeleteTeam(team_id=i))


async def create_virtual_key(request: web.Request) -> web.Response:
    raw, body = await _decode(request, VirtualKeyBody)
    new_id, value = str(uuid.uuid4()), new_secret()
    return await _save(
        request,
        raw,
        VIRTUAL_KEY,
        new_id,
        lambda unknown: CreateVirtualKey(
            virtual_key_id=new_id,
            body=body,
            value=digest(value),
            new_ids=_new_ids(body),
            unknown_references=unknown,
        ),
        body=body,
        created=True,
        value=value,
    )


async def update_virtual_key(request: web.Request) -> web.Response:
    key_id = _path_id(request, VIRTUAL_KEY)
    raw, changes = await _decode(request, VirtualKeyChanges)
    value = new_secret() if changes.rotate_value else None
    return await _save(
        request,
        raw,
        VIRTUAL_KEY,
        key_id,
        lambda unknown: UpdateVirtualKey(
            virtual_key_id=key_id,
            changes=changes,
            new_value=None if value is None else digest(value),
            new_ids=_new_ids(changes),
            unknown_references=unknown,
        ),
        body=changes,
        created=False,
        value=value,
    )


async def delete_virtual_key(request: web.Request) -> web.Response:
    return await _delete(
        request, VIRTUAL_KEY, lambda i: DeleteVirtualKey(virtual_key_id=i)
    )


ROUTES = [
    ("POST", "/api/governance/customers", create_customer, Right.ADMIN),
    ("PUT", "/api/governance/customers/{id}", update_customer, Right.ADMIN),
    ("DELETE", "/api/governance/customers/{id}", delete_customer, Right.ADMIN),
    ("POST", "/api/governance/teams", create_team, Right.ADMIN),
    ("PUT", "/api/governance/teams/{id}", update_team, Right.ADMIN),
    ("DELETE", "/api/governance/teams/{id}", delete_team, Right.ADMIN),
    ("POST", "/api/governance/virtual-keys", create_virtual_key, Right.ADMIN),
    ("PUT", "/api/governance/virtual-keys/{id}", update_virtual_key, Right.ADMIN),
    ("DELETE", "/api/governance/virtual-keys/{id}", delete_virtual_key, Right.ADMIN),
]
