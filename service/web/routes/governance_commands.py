"""POST/PUT/DELETE of customers, teams and virtual keys: decode, decide, append, answer.

A command runs in one REPEATABLE READ transaction: read the streams it touches, decide
(pure), append at the versions it read, render the answer
(`service.web.routes.governance_answers`) and keep it beside the events when the request
has an Idempotency-Key (`service.idempotency`). A concurrent change to any of those
streams aborts it (VersionConflict or a serialization failure); without If-Match it
is retried afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import string
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, TypeVar

import asyncpg
import msgspec
import structlog
from aiohttp import web

from service import idempotency
from service.domain import customers, teams, virtual_keys
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
from service.domain.events import AnyEvent
from service.errors import Invalid, VersionConflict
from service.eventstore import Connection, Executed
from service.web.http import Right, decode_bytes, json_response, path_id, read_body
from service.web.keys import pool_key, settings_key
from service.web.routes import governance_streams
from service.web.routes.governance_answers import (
    render_customer,
    render_team,
    render_virtual_key,
)

log = structlog.get_logger()

S = TypeVar("S")
C = TypeVar("C")
Answer = tuple[int, dict[str, Any]]
Run = Callable[[Connection, datetime], Awaitable[Answer]]

# Without If-Match a conflicting command is decided again on fresh state.
ATTEMPTS = 8


# --- virtual key secrets -----------------------------------------------------------

_SECRET_ALPHABET = string.ascii_letters + string.digits + "-_"


def new_secret() -> str:
    """`sk-gl-` and 32 random url-safe characters."""
    return "sk-gl-" + "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(32))


def digest(value: str) -> KeyDigest:
    """What is stored of a secret: the hex SHA-256 of its UTF-8 bytes, its last 4."""
    return KeyDigest(sha256=hashlib.sha256(value.encode()).hexdigest(), hint=value[-4:])


# --- the command path: transaction, retries, idempotency ---------------------------


def _if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    text = raw.strip().removeprefix('"').removesuffix('"')
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise Invalid(f"If-Match must be the entity's version, an integer; got {raw!r}")
    return int(text)


_RETRIED = (VersionConflict, asyncpg.SerializationError, asyncpg.DeadlockDetectedError)


async def _execute(
    request: web.Request, body: bytes, run: Run, *, retry: bool
) -> web.Response:
    pool = request.app[pool_key]
    keyed = idempotency.from_request(request, body)
    at = datetime.now(UTC)
    for attempt in range(1, ATTEMPTS + 1):
        if keyed is not None and (replayed := await idempotency.replay(pool, keyed)):
            return replayed
        try:
            async with (
                pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read"),
            ):
                status, answer = await run(conn, at)
                response = json_response(answer, status)
                if keyed is not None:
                    await idempotency.remember(conn, keyed, response)
        except asyncpg.UniqueViolationError as exc:
            # The same key committed first in a concurrent request: answer as it did.
            if keyed is None or not idempotency.is_taken(exc):
                raise
            if (replayed := await idempotency.replay(pool, keyed)) is None:
                raise
            return replayed
        except _RETRIED as exc:
            if retry and attempt < ATTEMPTS:
                log.info("command_retried", attempt=attempt, error=type(exc).__name__)
                continue
            # What moved the stream may be a concurrent request with this same key.
            if keyed is not None and (
                replayed := await idempotency.replay(pool, keyed)
            ):
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
    render: Callable[[Connection, Executed[S], datetime], Awaitable[dict[str, Any]]]


CUSTOMER = Entity("customer", customers.decide, customers.evolve, render_customer)
TEAM = Entity("team", teams.decide, teams.evolve, render_team)
VIRTUAL_KEY = Entity(
    "virtual_key", virtual_keys.decide, virtual_keys.evolve, render_virtual_key
)
B = TypeVar("B", bound=AnyBody)


def _path_id(request: web.Request, entity: Entity[Any, Any]) -> str:
    return path_id(request, entity.name.replace("_", " "))


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

    async def run(conn: Connection, at: datetime) -> Answer:
        unknown = await governance_streams.unknown_references(
            conn,
            customer_id=getattr(body, "customer_id", None),
            team_id=getattr(body, "team_id", None),
        )
        step = await governance_streams.step(
            conn,
            f"{entity.name}-{entity_id}",
            command(unknown),
            entity.decide,
            entity.evolve,
            at,
            expected,
        )
        rendered = await entity.render(conn, step, at)
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

    async def run(conn: Connection, at: datetime) -> Answer:
        step = await governance_streams.step(
            conn,
            f"{entity.name}-{entity_id}",
            command(entity_id),
            entity.decide,
            entity.evolve,
            at,
            expected,
        )
        detached = await governance_streams.detach(conn, at, entity.name, entity_id)
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
