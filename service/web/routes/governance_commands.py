"""POST/PUT/DELETE of customers, teams and virtual keys: decode the request, build
the command, run it on the command path (`service.commands`), answer.

Every answer but a 5xx is kept for the request's Idempotency-Key, refusals included
(a 400, 404, 409 decided now is the answer of every retry, whatever happens in
between); a replayed one says so in `Idempotent-Replayed: true`. The answer of a
saved entity is rendered in the command's transaction (`governance_answers`).
"""

from __future__ import annotations

import hashlib
import secrets
import string
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from service import commands, idempotency
from service.commands import CUSTOMER, TEAM, VIRTUAL_KEY, Call, Entity
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
    body_decoder,
    canonical_references,
    ids_needed,
    strict_decode,
)
from service.errors import Invalid, ServiceError
from service.eventstore import Connection, Executed
from service.idempotency import Reply
from service.web import keyed
from service.web.answers import Deleted, encode
from service.web.http import (
    Right,
    header,
    path_id,
)
from service.web.keys import pool_key, settings_key
from service.web.routes.governance_answers import (
    customer_saved,
    team_saved,
    virtual_key_issued,
    virtual_key_saved,
)

S = TypeVar("S")
C = TypeVar("C")
B = TypeVar("B", bound=AnyBody)
# Renders the answer struct of a saved entity, as of the command's time.
Render = Callable[[Connection, Executed[S], datetime], Awaitable[msgspec.Struct]]
# What a command does once its request is read: the body's bytes and the call.
Run = Callable[[bytes, Call], Awaitable[Reply]]

# --- virtual key secrets -----------------------------------------------------------

_SECRET_ALPHABET = string.ascii_letters + string.digits + "-_"


def new_secret() -> str:
    """`sk-gl-` and 32 random url-safe characters."""
    return "sk-gl-" + "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(32))


def digest(value: str) -> KeyDigest:
    """What is stored of a secret: the hex SHA-256 of its UTF-8 bytes, its last 4."""
    return KeyDigest(sha256=hashlib.sha256(value.encode()).hexdigest(), hint=value[-4:])


# --- the request -------------------------------------------------------------------


async def _command(
    request: web.Request, run: Run, *, body: bool = True
) -> web.Response:
    """Read the request, replay the answer kept for its Idempotency-Key if there is
    one, else `run` it; whatever it answers but a 5xx is kept for the key."""
    app = request.app
    settings = app[settings_key]
    raw = await keyed.read_body(request, settings.max_body_bytes)
    if not body:
        # A DELETE takes no body: one sent is read only to refuse a form (415), and
        # is no part of the request a retry must repeat.
        raw = b""
    key = keyed.request_key(request, raw)
    pool = app[pool_key]
    if key is not None and (replayed := await idempotency.replay(pool, key)):
        return keyed.respond(replayed)
    call = Call(
        at=datetime.now(UTC),
        request_id=structlog.contextvars.get_contextvars().get("request_id"),
        idempotency=key,
        expected_version=None,
    )
    try:
        reply = await run(raw, call)
    except ServiceError as exc:
        refusal = None if key is None else keyed.refusal(exc)
        if key is None or refusal is None:
            raise
        reply = await commands.keep(pool, key, refusal)
    return keyed.respond(reply)


def _expected_version(request: web.Request, call: Call) -> Call:
    """The call with the version If-Match names (the bare integer, or quoted)."""
    raw = header(request, "If-Match")
    if raw is None:
        return call
    text = raw.strip().removeprefix('"').removesuffix('"')
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise Invalid(f"If-Match must be the entity's version, an integer; got {raw!r}")
    return call._replace(expected_version=int(text))


_CUSTOMER_BODY = body_decoder(CustomerBody)
_CUSTOMER_CHANGES = body_decoder(CustomerChanges)
_TEAM_BODY = body_decoder(TeamBody)
_TEAM_CHANGES = body_decoder(TeamChanges)
_VIRTUAL_KEY_BODY = body_decoder(VirtualKeyBody)
_VIRTUAL_KEY_CHANGES = body_decoder(VirtualKeyChanges)


def _decode(raw: bytes, decoder: msgspec.json.Decoder[B]) -> B:
    """The strict decoding of a body (money exact), references in their stored
    spelling: a UUID is taken in any letter case."""
    return canonical_references(strict_decode(decoder, raw))


def _new_ids(body: AnyBody) -> tuple[str, ...]:
    return tuple(str(uuid.uuid4()) for _ in range(ids_needed(body)))


def _path_id(request: web.Request, entity: Entity[Any, Any]) -> str:
    return path_id(request, entity.name.replace("_", " "))


# --- handlers ----------------------------------------------------------------------


async def _save(
    request: web.Request,
    call: Call,
    entity: Entity[S, C],
    entity_id: str,
    command: Callable[[frozenset[str]], C],
    render: Render[S],
    *,
    body: AnyBody,
    created: bool,
) -> Reply:
    """Create or update one entity; `command` gets the unknown references."""

    async def saved(conn: Connection, executed: Executed[S]) -> Reply:
        answer = await render(conn, executed, call.at)
        return Reply(201 if created else 200, encode(answer))

    return await commands.save(
        request.app[pool_key],
        entity,
        entity_id,
        command,
        call,
        saved,
        customer_id=getattr(body, "customer_id", None),
        team_id=getattr(body, "team_id", None),
    )


async def _delete(
    request: web.Request, entity: Entity[S, C], command: Callable[[str], C]
) -> web.Response:
    """Delete one entity and detach what pointed at it, in one transaction."""

    async def run(_raw: bytes, call: Call) -> Reply:
        entity_id = _path_id(request, entity)
        return await commands.delete(
            request.app[pool_key],
            entity,
            entity_id,
            command(entity_id),
            _expected_version(request, call),
            lambda position: Reply(200, encode(Deleted(position=position))),
        )

    return await _command(request, run, body=False)


async def create_customer(request: web.Request) -> web.Response:
    async def run(raw: bytes, call: Call) -> Reply:
        body = _decode(raw, _CUSTOMER_BODY)
        new_id = str(uuid.uuid4())
        return await _save(
            request,
            call,
            CUSTOMER,
            new_id,
            lambda _: CreateCustomer(
                customer_id=new_id, body=body, new_ids=_new_ids(body)
            ),
            customer_saved,
            body=body,
            created=True,
        )

    return await _command(request, run)


async def update_customer(request: web.Request) -> web.Response:
    async def run(raw: bytes, call: Call) -> Reply:
        customer_id = _path_id(request, CUSTOMER)
        changes = _decode(raw, _CUSTOMER_CHANGES)
        return await _save(
            request,
            _expected_version(request, call),
            CUSTOMER,
            customer_id,
            lambda _: UpdateCustomer(
                customer_id=customer_id, changes=changes, new_ids=_new_ids(changes)
            ),
            customer_saved,
            body=changes,
            created=False,
        )

    return await _command(request, run)


async def delete_customer(request: web.Request) -> web.Response:
    return await _delete(request, CUSTOMER, lambda i: DeleteCustomer(customer_id=i))


async def create_team(request: web.Request) -> web.Response:
    async def run(raw: bytes, call: Call) -> Reply:
        body = _decode(raw, _TEAM_BODY)
        new_id = str(uuid.uuid4())
        return await _save(
            request,
            call,
            TEAM,
            new_id,
            lambda unknown: CreateTeam(
                team_id=new_id,
                body=body,
                new_ids=_new_ids(body),
                unknown_references=unknown,
            ),
            team_saved,
            body=body,
            created=True,
        )

    return await _command(request, run)


async def update_team(request: web.Request) -> web.Response:
    async def run(raw: bytes, call: Call) -> Reply:
        team_id = _path_id(request, TEAM)
        changes = _decode(raw, _TEAM_CHANGES)
        return await _save(
            request,
            _expected_version(request, call),
            TEAM,
            team_id,
            lambda unknown: UpdateTeam(
                team_id=team_id,
                changes=changes,
                new_ids=_new_ids(changes),
                unknown_references=unknown,
            ),
            team_saved,
            body=changes,
            created=False,
        )

    return await _command(request, run)


async def delete_team(request: web.Request) -> web.Response:
    return await _delete(request, TEAM, lambda i: DeleteTeam(team_id=i))


async def create_virtual_key(request: web.Request) -> web.Response:
    async def run(raw: bytes, call: Call) -> Reply:
        body = _decode(raw, _VIRTUAL_KEY_BODY)
        new_id, value = str(uuid.uuid4()), new_secret()
        return await _save(
            request,
            call,
            VIRTUAL_KEY,
            new_id,
            lambda unknown: CreateVirtualKey(
                virtual_key_id=new_id,
                body=body,
                value=digest(value),
                new_ids=_new_ids(body),
                unknown_references=unknown,
            ),
            lambda conn, executed, at: virtual_key_issued(conn, executed, at, value),
            body=body,
            created=True,
        )

    return await _command(request, run)


async def update_virtual_key(request: web.Request) -> web.Response:
    async def run(raw: bytes, call: Call) -> Reply:
        key_id = _path_id(request, VIRTUAL_KEY)
        changes = _decode(raw, _VIRTUAL_KEY_CHANGES)
        value = new_secret() if changes.rotate_value else None
        return await _save(
            request,
            _expected_version(request, call),
            VIRTUAL_KEY,
            key_id,
            lambda unknown: UpdateVirtualKey(
                virtual_key_id=key_id,
                changes=changes,
                new_value=None if value is None else digest(value),
                new_ids=_new_ids(changes),
                unknown_references=unknown,
            ),
            lambda conn, executed, at: virtual_key_saved(conn, executed, at, value),
            body=changes,
            created=False,
        )

    return await _command(request, run)


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
