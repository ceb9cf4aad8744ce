"""The OpenAPI 3.1 document of the HTTP API: one entry per route saying what the route
takes and answers, and the generator joining them to the routes of an app. Bodies and
answers are described by the very structs that decode and encode them (the answers
are service.web.answers')."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

import msgspec
from aiohttp import web

from service.domain.bounds import NO_NUL_PATTERN, ONE_OWNER_RULE, RATE_LIMIT_PAIRS
from service.domain.budgets import CALENDAR_ALIGNMENT_RULE
from service.domain.commands import (
    CustomerBody,
    CustomerChanges,
    TeamBody,
    TeamChanges,
    VirtualKeyBody,
    VirtualKeyChanges,
)
from service.domain.numbers import schema_hook
from service.domain.usage import KEPT_MONEY_SCHEMA, KEY_CHOICE_SCHEMA, UsageRecord
from service.idempotency import MAX_KEY_LENGTH
from service.web.answers import (
    BatchAnswer,
    BudgetList,
    BudgetPeriods,
    CheckAnswer,
    CustomerFound,
    CustomerList,
    CustomerSaved,
    Deleted,
    Error,
    EventPage,
    Health,
    Readiness,
    Released,
    TeamFound,
    TeamList,
    TeamSaved,
    UsageAccepted,
    UsageFrameAck,
    UsageFrameError,
    VirtualKeyFound,
    VirtualKeyIssued,
    VirtualKeyList,
    VirtualKeySaved,
)
from service.web.http import MAX_QUERY_INT, ROLE_RIGHTS, Right
from service.web.keys import rights_key
from service.web.routes.check import CheckRequest
from service.web.routes.dashboard import MODULES as DASHBOARD_MODULES
from service.web.routes.usage import UsageFrame

JSON = "application/json"
NDJSON = "application/x-ndjson"
REF = "#/components/schemas/{name}"

# Every answer is a struct of service.web.answers. msgspec describes Decimal as a
# "decimal" string; _money() turns those marked x-number (Money) into plain JSON
# numbers, which is what the encoder writes.

# --- parameters --------------------------------------------------------------------


class Param(NamedTuple):
    name: str
    where: Literal["path", "query", "header"]
    schema: Mapping[str, Any]
    description: str
    required: bool = False  # a path parameter always is

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.where,
            "required": self.where == "path" or self.required,
            "description": self.description,
            "schema": dict(self.schema),
        }


def _or_empty(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A query parameter's schema: the value, or empty, which means not given."""
    return {"anyOf": [dict(schema), {"type": "string", "maxLength": 0}]}


def _count(minimum: int) -> dict[str, Any]:
    # query_int refuses what no bigint holds.
    return _or_empty({"type": "integer", "minimum": minimum, "maximum": MAX_QUERY_INT})


_UUID = {"type": "string", "format": "uuid"}
PATH_ID = Param("id", "path", _UUID, "The entity's id, a UUID in any letter case")
LATEST = Param("limit", "query", _count(1), "Only the latest this many")
MIN_POSITION = Param(
    "min_position",
    "query",
    _count(0),
    "Wait up to 2 s for the read model to reach this position, else 503 projection_lag",
)
LOG_POSITION = Param(
    "min_position",
    "query",
    _count(0),
    "Wait up to 2 s for the log to hold this position, else 503 projection_lag",
)
AFTER = Param("after", "query", _count(0), "Events after this position")
LIMIT = Param(
    "limit",
    "query",
    _count(1),
    "At most this many events (capped at 10000; default 1000)",
)
STREAM_ID = Param(
    "stream_id",
    "query",
    {"type": "string", "pattern": NO_NUL_PATTERN},  # routes.events refuses U+0000
    "Only this stream",
)
# A list's page, in the list's order; without them, every match.
PAGE = (
    Param("limit", "query", _count(1), "At most this many"),
    Param("offset", "query", _count(0), "Skip this many first"),
)
OWNER_TYPE = Param(
    "owner_type",
    "query",
    _or_empty(
        {
            "type": "string",
            "enum": ["customer", "team", "virtual_key", "provider_config"],
        }
    ),
    "Only budgets of this kind of owner",
)
OWNER_ID = Param("owner_id", "query", _or_empty(_UUID), "Only budgets of this owner")
TEAM_ID = Param("team_id", "query", _or_empty(_UUID), "Only keys of this team")
CUSTOMER_ID = Param(
    "customer_id", "query", _or_empty(_UUID), "Only those of this customer"
)
IF_MATCH = Param(
    "If-Match",
    "header",
    # The bare integer; quotes around it, as an ETag has them, are taken too.
    {"type": "string", "pattern": '^"?[0-9]{1,18}"?$'},
    "The entity's version; another version is a 409",
)
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "pattern": f"^[\\x20-\\x7e]{{1,{MAX_KEY_LENGTH}}}$"},
    "1 to 255 printable ASCII characters. Every answer but a 5xx is kept for it: a"
    " retry with the same key returns that answer byte for byte and appends"
    " nothing; the key with another request is a 422",
)
# What aiohttp's handshake requires of a WebSocket upgrade (else a 400).
UPGRADE = (
    Param(
        "Upgrade",
        "header",
        {"type": "string", "pattern": "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$"},
        "websocket",
        required=True,
    ),
    Param(
        "Connection",
        "header",
        {"type": "string", "pattern": "[Uu][Pp][Gg][Rr][Aa][Dd][Ee]"},
        "A list that holds Upgrade",
        required=True,
    ),
    Param(
        "Sec-WebSocket-Version",
        "header",
        {"type": "string", "enum": ["13", "8", "7"]},
        "The WebSocket protocol version",
        required=True,
    ),
    Param(
        "Sec-WebSocket-Key",
        "header",
        {"type": "string", "pattern": "^[A-Za-z0-9+/]{21}[AQgw]==$"},
        "16 random bytes in base64",
        required=True,
    ),
)

# --- operations --------------------------------------------------------------------


class Documented(NamedTuple):
    """One answer an operation documents: its status, body type and media type."""

    status: int
    type: Any  # a struct (or type msgspec describes); None: no body
    media: str = JSON
    description: str = ""


class Operation(NamedTuple):
    """What one route takes and answers; the generator adds 401/403 from its right,
    400/413 from its body and 404 from an id in its path."""

    id: str
    summary: str
    answer: Documented
    other_answers: tuple[Documented, ...] = ()
    body: Any = None
    body_media: str = JSON
    parameters: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    description: str = ""
    tags: tuple[str, ...] = ()
    extensions: Mapping[str, Any] = {}


READ = (MIN_POSITION,)
COMMAND = (IDEMPOTENCY_KEY,)
CHANGE = (PATH_ID, IF_MATCH, IDEMPOTENCY_KEY)
READ_ERRORS = (400, 503)
COMMAND_ERRORS = (409, 422, 503)
# A command without a body still reads one sent (a form is refused, 415).
UNWANTED_BODY = (408, 413, 415)
_GOV = ("governance",)
_CUSTOMERS = "/api/governance/customers"
_TEAMS = "/api/governance/teams"
_KEYS = "/api/governance/virtual-keys"

_STREAM_DESCRIPTION = """\
A WebSocket (send the usual upgrade headers; the bearer token goes in the handshake).
Each client **text** frame is a JSON object `{"seq": n, "records": [record, ...]}`
(schema `UsageFrame`, each record a `UsageRecord`, at most 10000 records and 4 MiB per
frame). The server answers every client frame with exactly one text frame, in the order
the frames came, after the frame's records committed (frames may be pipelined):
`{"seq", "accepted", "duplicates", "rejected": [{"index", "code", "message"}],
"position"}` (schema `UsageFrameAck`; `index` is 0-based). A frame that is not such an
object, or a binary frame, is answered with an error frame
`{"seq"?, "error": {"code", "message"}}` (schema `UsageFrameError`, code
`invalid_frame`) and the socket stays open."""

# The `data` of the dashboard's `snapshot` event: the read views of every entity,
# with what the page adds (next resets, what blocks a key).
_ENTITIES = {
    "type": "array",
    "items": {"type": "object", "required": ["id", "name", "budgets", "rate_limit"]},
}
_SNAPSHOT = {
    "type": "object",
    "required": ["position", "generated_at", "customers", "teams", "virtual_keys"],
    "properties": {
        "position": {"type": "integer", "minimum": 0},
        "generated_at": {"type": "string", "format": "date-time"},
        "customers": _ENTITIES,
        "teams": _ENTITIES,
        "virtual_keys": _ENTITIES,
    },
}

OPERATIONS: Mapping[tuple[str, str], Operation] = {
    ("GET", "/healthz"): Operation(
        "healthz", "Liveness", Documented(200, Health), tags=("operations",)
    ),
    ("GET", "/readyz"): Operation(
        "readyz",
        "Readiness: caught up with the log head seen at start",
        Documented(200, Readiness),
        other_answers=(
            Documented(503, Readiness, description="A projection is still catching up"),
        ),
        tags=("operations",),
    ),
    ("GET", "/metrics"): Operation(
        "metrics",
        "Prometheus metrics: ingest rate, check latency, projection lag",
        Documented(200, str, "text/plain", "The Prometheus text exposition format"),
        tags=("operations",),
    ),
    ("GET", "/api/openapi.json"): Operation(
        "openapi",
        "This document",
        Documented(200, dict[str, Any]),
        tags=("operations",),
    ),
    ("GET", "/api/events"): Operation(
        "list_events",
        "The event log, upcast on read",
        Documented(200, EventPage),
        parameters=(AFTER, LIMIT, STREAM_ID, LOG_POSITION),
        errors=READ_ERRORS,
        tags=("events",),
    ),
    # --- the dashboard (beyond API.md)
    ("GET", "/"): Operation(
        "dashboard",
        "The live governance dashboard page",
        Documented(200, str, "text/html"),
        tags=("dashboard",),
    ),
    ("GET", "/dashboard.js"): Operation(
        "dashboard_script",
        "The dashboard's script",
        Documented(200, str, "text/javascript"),
        tags=("dashboard",),
    ),
    ("GET", "/dashboard.css"): Operation(
        "dashboard_style",
        "The dashboard's style sheet",
        Documented(200, str, "text/css"),
        tags=("dashboard",),
    ),
    **{
        ("GET", f"/dashboard/{name}"): Operation(
            f"dashboard_module_{name.removesuffix('.js')}",
            f"A module of the dashboard's script: {name}",
            Documented(200, str, "text/javascript"),
            tags=("dashboard",),
        )
        for name in DASHBOARD_MODULES
    },
    ("GET", "/api/dashboard/events"): Operation(
        "dashboard_events",
        "Server-Sent Events: a `snapshot` of the read model at once, then one per"
        " change",
        Documented(200, str, "text/event-stream"),
        description="Each event is `event: snapshot`, `id: <position>` and `data:`"
        " `{position, generated_at, customers, teams, virtual_keys}` (the entities"
        " as the governance reads answer them; `x-events` gives the schema of"
        " `data`). The stream stays open.",
        errors=(503,),
        tags=("dashboard",),
        extensions={
            "x-events": {"snapshot": {"id": "data.position", "data": _SNAPSHOT}}
        },
    ),
    ("GET", "/api/governance/budgets/{id}/periods"): Operation(
        "list_budget_periods",
        "A budget's spend per period",
        Documented(200, BudgetPeriods),
        parameters=(PATH_ID, LATEST, *READ),
        errors=READ_ERRORS,
        tags=_GOV,
    ),
    # --- governance commands
    ("POST", _CUSTOMERS): Operation(
        "create_customer",
        "Create a customer",
        Documented(201, CustomerSaved),
        body=CustomerBody,
        parameters=COMMAND,
        errors=COMMAND_ERRORS,
        tags=_GOV,
    ),
    ("PUT", _CUSTOMERS + "/{id}"): Operation(
        "update_customer",
        "Change a customer (omitted fields unchanged; budgets: the full set)",
        Documented(200, CustomerSaved),
        body=CustomerChanges,
        parameters=CHANGE,
        errors=COMMAND_ERRORS,
        tags=_GOV,
    ),
    ("DELETE", _CUSTOMERS + "/{id}"): Operation(
        "delete_customer",
        "Delete a customer and its budgets; its teams and keys are detached",
        Documented(200, Deleted),
        parameters=CHANGE,
        errors=(400, *COMMAND_ERRORS, *UNWANTED_BODY),
        tags=_GOV,
    ),
    ("POST", _TEAMS): Operation(
        "create_team",
        "Create a team",
        Documented(201, TeamSaved),
        body=TeamBody,
        parameters=COMMAND,
        errors=COMMAND_ERRORS,
        tags=_GOV,
    ),
    ("PUT", _TEAMS + "/{id}"): Operation(
        "update_team",
        "Change a team (omitted fields unchanged; customer_id null detaches)",
        Documented(200, TeamSaved),
        body=TeamChanges,
        parameters=CHANGE,
        errors=COMMAND_ERRORS,
        tags=_GOV,
    ),
    ("DELETE", _TEAMS + "/{id}"): Operation(
        "delete_team",
        "Delete a team and its budgets; its keys are detached",
        Documented(200, Deleted),
        parameters=CHANGE,
        errors=(400, *COMMAND_ERRORS, *UNWANTED_BODY),
        tags=_GOV,
    ),
    ("POST", _KEYS): Operation(
        "create_virtual_key",
        "Create a virtual key; the answer carries its secret `value`, once",
        Documented(201, VirtualKeyIssued),
        body=VirtualKeyBody,
        parameters=COMMAND,
        errors=COMMAND_ERRORS,
        tags=_GOV,
    ),
    ("PUT", _KEYS + "/{id}"): Operation(
        "update_virtual_key",
        "Change a virtual key; `rotate_value: true` returns a new secret",
        Documented(200, VirtualKeySaved),
        body=VirtualKeyChanges,
        parameters=CHANGE,
        errors=COMMAND_ERRORS,
        tags=_GOV,
    ),
    ("DELETE", _KEYS + "/{id}"): Operation(
        "delete_virtual_key",
        "Delete a virtual key with its budgets and provider configs",
        Documented(200, Deleted),
        parameters=CHANGE,
        errors=(400, *COMMAND_ERRORS, *UNWANTED_BODY),
        tags=_GOV,
    ),
    # --- governance reads
    ("GET", _CUSTOMERS): Operation(
        "list_customers",
        "Every customer",
        Documented(200, CustomerList),
        parameters=(*PAGE, *READ),
        errors=READ_ERRORS,
        tags=_GOV,
    ),
    ("GET", _CUSTOMERS + "/{id}"): Operation(
        "get_customer",
        "One customer",
        Documented(200, CustomerFound),
        parameters=(PATH_ID, *READ),
        errors=READ_ERRORS,
        tags=_GOV,
    ),
    ("GET", _TEAMS): Operation(
        "list_teams",
        "Every team, or a customer's",
        Documented(200, TeamList),
        parameters=(CUSTOMER_ID, *PAGE, *READ),
        errors=READ_ERRORS,
        tags=_GOV,
    ),
    ("GET", _TEAMS + "/{id}"): Operation(
        "get_team",
        "One team",
        Documented(200, TeamFound),
        parameters=(PATH_ID, *READ),
        errors=READ_ERRORS,
        tags=_GOV,
    ),
    ("GET", _KEYS): Operation(
        "list_virtual_keys",
        "Every virtual key, or a team's or customer's",
        Documented(200, VirtualKeyList),
        parameters=(TEAM_ID, CUSTOMER_ID, *PAGE, *READ),
        errors=READ_ERRORS,
        tags=_GOV,
    ),
    ("GET", _KEYS + "/{id}"): Operation(
        "get_virtual_key",
        "One virtual key (without its secret)",
        Documented(200, VirtualKeyFound),
        parameters=(PATH_ID, *READ),
        errors=READ_ERRORS,
        tags=_GOV,
    ),
    ("GET", "/api/governance/budgets"): Operation(
        "list_budgets",
        "Every budget, or those of an owner or a kind of owner",
        Documented(200, BudgetList),
        parameters=(OWNER_TYPE, OWNER_ID, *PAGE, *READ),
        errors=READ_ERRORS,
        tags=_GOV,
    ),
    ("POST", "/api/governance/check"): Operation(
        "check",
        "May this key spend more? Answered from the in-memory cache",
        Documented(200, CheckAnswer),
        body=CheckRequest,
        parameters=COMMAND,
        errors=(422, 503),
        description="`min_position` in the body waits up to 2 s for the cache to"
        " reach it, else 503 projection_lag. With `reserve: true` (recorder right)"
        " an allowed check holds `estimated_cost` (and a request plus"
        " `estimated_tokens` against the rate limits) on every budget of the chain"
        " until a usage record names its `reservation_id`, a release, or"
        " `expires_at` (receive time + `ttl_s`, default 600); it answers after the"
        " hold is committed. A reserving check is a command: its answer, a refusal"
        " included, is kept for its `Idempotency-Key` and replayed byte for byte"
        " (`Idempotent-Replayed: true`); the key with another request is a 422. A"
        " plain check ignores the header.",
        tags=("enforcement",),
    ),
    ("POST", "/api/governance/reservations/{id}/release"): Operation(
        "release_reservation",
        "Drop an open hold without recording usage",
        Documented(200, Released),
        parameters=(PATH_ID, IDEMPOTENCY_KEY),
        errors=(400, 404, 422, 503, *UNWANTED_BODY),
        description="Repeating it, or releasing a settled or expired hold, answers"
        " 200 and appends nothing; an id no reserving check answered is a 404.",
        tags=("enforcement",),
    ),
    # --- usage
    ("POST", "/api/usage"): Operation(
        "record_usage",
        "Record one usage record",
        Documented(202, UsageAccepted),
        body=UsageRecord,
        parameters=COMMAND,
        errors=(422, 503),
        description="A rejected record is a 400 whose code says why: `invalid_record`,"
        " `negative_cost`, `invalid_cost`, `occurred_at_out_of_range` or"
        " `unknown_virtual_key` (given only once the cache has seen the log as it"
        " was when the record arrived; while it lags, a 503 `projection_lag` says"
        " retry). An acknowledged record is durable.",
        tags=("usage",),
    ),
    ("POST", "/api/usage/batch"): Operation(
        "record_usage_batch",
        "Record an NDJSON batch, one usage record a line",
        Documented(200, BatchAnswer),
        body=str,
        body_media=NDJSON,
        parameters=COMMAND,
        errors=(422, 503),
        description="Each line is a `UsageRecord`. A line that is not valid JSON, or"
        " not a valid record, is a rejected line (`line` is 1-based); the valid lines"
        " commit even when others are rejected. Body limit 16 MiB.",
        tags=("usage",),
        extensions={"x-line-schema": {"$ref": REF.format(name="UsageRecord")}},
    ),
    ("GET", "/api/usage/stream"): Operation(
        "usage_stream",
        "Record usage over a WebSocket",
        Documented(101, None, description="Switching Protocols: the WebSocket is open"),
        parameters=UPGRADE,
        errors=(400,),
        description=_STREAM_DESCRIPTION,
        tags=("usage",),
        extensions={
            "x-websocket": {
                "client_frame": {"$ref": REF.format(name="UsageFrame")},
                "ack_frame": {"$ref": REF.format(name="UsageFrameAck")},
                "error_frame": {"$ref": REF.format(name="UsageFrameError")},
            }
        },
    ),
}

# Described in the document although no operation answers or takes them directly.
FRAME_TYPES: tuple[type, ...] = (UsageFrame, UsageFrameAck, UsageFrameError)

_REASONS = {
    400: "A client mistake: bad JSON, wrong types, unknown fields, invalid values",
    401: "Missing or unknown bearer token",
    403: "The token lacks the right this operation needs",
    404: "No entity with this id",
    408: "The declared body did not arrive in time (body_timeout); nothing committed",
    409: "If-Match differs from the entity's version, or a concurrent change won",
    413: "The body is over the limit (1 MiB; 16 MiB for a batch); nothing committed",
    415: "The body is declared as a form or plain text, or, in open mode, not as"
    " application/json (application/x-ndjson for a batch): unsupported_media_type",
    422: "The Idempotency-Key was already used for a different request",
    503: "Retry later (Retry-After): the projection did not reach min_position in"
    " time, or the cache has not yet seen a key that may have been created a moment"
    " ago (projection_lag); or the database is unavailable",
}

# What the decoding of a body cannot say and its handler enforces: stated beside the
# struct's own schema, so a request the document calls valid is one the service takes.
_RESERVE = {"properties": {"reserve": {"const": True}}, "required": ["reserve"]}
BODY_RULES: Mapping[str, Mapping[str, Any]] = {
    "UsageRecord": KEY_CHOICE_SCHEMA,  # domain.usage.validate
    "RateLimitSpec": RATE_LIMIT_PAIRS,  # domain.budgets.validate_rate_limit
    "BudgetSpec": CALENDAR_ALIGNMENT_RULE,  # domain.budgets
    "VirtualKeyBody": ONE_OWNER_RULE,  # domain.virtual_keys
    "VirtualKeyChanges": ONE_OWNER_RULE,
    # routes.check._validate
    "CheckRequest": {
        "allOf": [
            KEY_CHOICE_SCHEMA,
            {
                "if": _RESERVE,
                "then": {
                    "required": ["estimated_cost"],
                    # Kept exactly while held: routes.check._validate (invalid_cost).
                    "properties": {"estimated_cost": KEPT_MONEY_SCHEMA},
                },
                "else": {"properties": {"ttl_s": {"type": "null"}}},
            },
        ]
    },
}

# --- the document ------------------------------------------------------------------

RouteEntry = tuple[str, str, Right]


def routes_of(app: web.Application) -> list[RouteEntry]:
    """(method, path, right) of every route of an app made by create_app."""
    entries: list[RouteEntry] = []
    for route, right in app[rights_key].items():
        assert route.resource is not None
        if route.method == "HEAD":  # every GET's twin (create_app), left implied
            continue
        entries.append((route.method, route.resource.canonical, right))
    return entries


def missing(routes: Iterable[RouteEntry]) -> list[tuple[str, str]]:
    """The routes OPERATIONS has no entry for."""
    return [(m, p) for m, p, _ in routes if (m, p) not in OPERATIONS]


def document(routes: Iterable[RouteEntry]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of these routes; each needs an entry in OPERATIONS."""
    routes = sorted(routes, key=lambda r: (r[1], _METHOD_ORDER.get(r[0], 9)))
    if gaps := missing(routes):
        raise LookupError(f"openapi.OPERATIONS has no entry for {gaps}")
    entries = [
        (method, path, right, OPERATIONS[method, path])
        for method, path, right in routes
    ]
    types = _unique(
        [Error]
        + [t for *_, op in entries for t in _types(op) if t is not None]
        + list(FRAME_TYPES)
    )
    schemas, components = msgspec.json.schema_components(
        types, schema_hook=schema_hook, ref_template=REF
    )
    for name, rules in BODY_RULES.items():
        if name in components:
            components[name] = {**components[name], **rules}
    schema_of = {t: _money(s) for t, s in zip(types, schemas, strict=True)}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, right, op in entries:
        paths.setdefault(path, {})[method.lower()] = _operation(op, right, schema_of)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "govledger",
            "version": "1",
            "description": "Event-sourced budget and rate-limit governance for LLM"
            ' gateways. Errors are `{"error": {"code", "message"}}`; money is a'
            " JSON number on output and a number or decimal string on input, exact"
            " to 9 fractional digits; timestamps are RFC 3339 UTC.",
        },
        "tags": [
            {"name": t} for t in _unique([t for *_, o in entries for t in o.tags])
        ],
        "paths": paths,
        "components": {
            "schemas": _money(components),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "GOVLEDGER_ADMIN_TOKENS, GOVLEDGER_RECORDER_TOKENS"
                    " or GOVLEDGER_READER_TOKENS; an operation's security names the"
                    " right it needs",
                }
            },
        },
    }


def encode(routes: Iterable[RouteEntry]) -> bytes:
    return msgspec.json.encode(document(routes))


_METHOD_ORDER = {"GET": 0, "POST": 1, "PUT": 2, "DELETE": 3}


def _operation(
    op: Operation, right: Right, schema_of: Mapping[Any, Any]
) -> dict[str, Any]:
    holders = sorted(role for role, rights in ROLE_RIGHTS.items() if right in rights)
    public = right is Right.PUBLIC
    note = f"Needs the `{right.value}` right (roles: {', '.join(holders)})."
    if public:
        note = "No token needed."
    spec: dict[str, Any] = {
        "operationId": op.id,
        "summary": op.summary,
        "description": f"{op.description}\n\n{note}".strip(),
        "tags": list(op.tags),
        "security": [] if public else [{"bearer": [right.value]}],
        "x-right": right.value,
    }
    if op.parameters:
        spec["parameters"] = [p.spec() for p in op.parameters]
    errors = set(op.errors)
    if op.body is not None:
        errors |= {400, 408, 413, 415}
        spec["requestBody"] = {
            "required": True,
            "content": {op.body_media: {"schema": _body_schema(op, schema_of)}},
        }
    if not public:
        errors |= {401, 403}
    if any(p.where == "path" for p in op.parameters):
        errors.add(404)
    responses: dict[str, Any] = {str(op.answer.status): _answer(op.answer, schema_of)}
    for other in op.other_answers:
        responses[str(other.status)] = _answer(other, schema_of)
        errors.discard(other.status)
    for status in sorted(errors):
        responses[str(status)] = {
            "description": _REASONS[status],
            "content": {JSON: {"schema": schema_of[Error]}},
        }
    spec["responses"] = responses
    spec.update(op.extensions)
    return spec


def _body_schema(op: Operation, schema_of: Mapping[Any, Any]) -> dict[str, Any]:
    if op.body_media == NDJSON:
        return {"type": "string", "contentMediaType": NDJSON}
    return dict(schema_of[op.body])


def _answer(answer: Documented, schema_of: Mapping[Any, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"description": answer.description or "Success"}
    if answer.type is not None:
        spec["content"] = {answer.media: {"schema": schema_of[answer.type]}}
    return spec


_NUMBER = "x-number"
# A decimal string as the request decoders take one (numbers are taken too).
_DECIMAL_STRING = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$"}


def _money(node: Any) -> Any:
    """msgspec's Decimal schema, rewritten: a plain number in answers (x-number),
    a number or a decimal string in requests."""
    if isinstance(node, list):
        return [_money(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("format") == "decimal":
        rest = {
            k: _money(v)
            for k, v in node.items()
            if k not in ("format", "type", _NUMBER)
        }
        if node.get(_NUMBER):
            return {"type": "number", **rest}
        return {"anyOf": [{"type": "number"}, _DECIMAL_STRING], **rest}
    return {k: _money(v) for k, v in node.items()}


def _types(op: Operation) -> list[Any]:
    return [op.body, op.answer.type, *(a.type for a in op.other_answers)]


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))
