"""POST/PUT/DELETE of customers, teams and virtual keys: decode the request, build
the command, run it on the command path (`service.commands`), answer.

The answer is rendered in the command's transaction (`governance_answers`) and encoded
here; a replayed one (same Idempotency-Key) says so in `Idempotent-Replayed: true`.
"""

from __future__ import annotations

import contextlib
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
    ids_needed,
)
from service.errors import Invalid
from service.eventstore import Connection, Executed
from service.idempotency import Reply
from service.web.answers import Deleted, encode
from service.web.http import Right, decode_bytes, path_id, read_body
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


# --- virtual key secrets -----------------------------------------------------------

_SECRET_ALPHABET = string.ascii_letters + string.digits + "-_"


def new_secret() -> str:
    """`sk-gl-` and 32 random url-safe characters."""
    return "sk-gl-" + "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(32))


def digest(value: str) -> KeyDigest:
    """What is stored of a secret: the hex SHA-256 of its UTF-8 bytes, its last 4."""
    return KeyDigest(sha256=hashlib.sha256(value.encode()).hexdigest(), hint=value[-4:])


# --- the request -------------------------------------------------------------------


def _if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    text = raw.strip().removeprefix('"').removesuffix('"')
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise Invalid(f"If-Match must be the entity's version, an integer; got {raw!r}")
    return int(text)


def _call(request: web.Request, body: bytes, *, if_match: bool) -> Call:
    """How the request asks for its command; If-Match only counts when `if_match`
    (a create has no version to match)."""
    expected = _if_match(request) if if_match else None
    return Call(
        at=datetime.now(UTC),
        request_id=structlog.contextvars.get_contextvars().get("request_id"),
        idempotency=idempotency.from_request(
            request.headers.get("Idempotency-Key"),
            method=request.method,
            path=request.path,
            if_match=request.headers.get("If-Match"),
            body=body,
        ),
        expected_version=expected,
    )


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


def _path_id(request: web.Request, entity: Entity[Any, Any]) -> str:
    return path_id(request, entity.name.replace("_", " "))


def _respond(reply: Reply) -> web.Response:
    response = web.Response(
        body=reply.body, status=reply.status, content_type="application/json"
    )
    if reply.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


# --- handlers ----------------------------------------------------------------------


async def _save(
    request: web.Request,
    raw: bytes,
    entity: Entity[S, C],
    entity_id: str,
    command: Callable[[frozenset[str]], C],
    render: Render[S],
    *,
    body: AnyBody,
    created: bool,
) -> web.Response:
    """Create or update one entity; `command` gets the unknown references."""
    call = _call(request, raw, if_match=not created)

    async def saved(conn: Connection, executed: Executed[S]) -> Reply:
        answer = await render(conn, executed, call.at)
        return Reply(201 if created else 200, encode(answer))

    reply = await commands.save(
        request.app[pool_key],
        entity,
        entity_id,
        command,
        call,
        saved,
        customer_id=getattr(body, "customer_id", None),
        team_id=getattr(body, "team_id", None),
    )
    return _respond(reply)


async def _delete(
    request: web.Request, entity: Entity[S, C], command: Callable[[str], C]
) -> web.Response:
    """Delete one entity and detach what pointed at it, in one transaction."""
    entity_id = _path_id(request, entity)
    call = _call(request, b"", if_match=True)
    reply = await commands.delete(
        request.app[pool_key],
        entity,
        entity_id,
        command(entity_id),
        call,
        lambda position: Reply(200, encode(Deleted(position=position))),
    )
    return _respond(reply)


async def create_customer(request: web.Request) -> web.Response:
    raw, body = await _decode(request, CustomerBody)
    new_id = str(uuid.uuid4())
    return await _save(
        request,
        raw,
        CUSTOMER,
        new_id,
        lambda _: CreateCustomer(customer_id=new_id, body=body, new_ids=_new_ids(body)),
        customer_saved,
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
        customer_saved,
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
        team_saved,
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
        team_saved,
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
        lambda conn, executed, at: virtual_key_issued(conn, executed, at, value),
        body=body,
        created=True,
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
        lambda conn, executed, at: virtual_key_saved(conn, executed, at, value),
        body=changes,
        created=False,
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
