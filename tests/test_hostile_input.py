"""Hostile input against a real server and PostgreSQL: schemathesis over the service's
own OpenAPI document, then abuse made by hand — bodies over the limit, deep nesting,
huge NDJSON lines, invalid UTF-8, NUL characters, wrong content types, ids that are not
UUIDs, extreme numbers, and WebSocket frames that are not JSON. Never a 5xx; every
4xx in the error shape of API.md; a refused body commits nothing."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import hypothesis
import jsonschema_rs
import pytest
import schemathesis
from aiohttp import WSMsgType
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.parameters import ParameterLocation
from schemathesis.core.result import Ok

from service.config import Settings
from service.web import openapi
from service.web.app import create_app
from service.web.http import Right
from tests.api import Api, serve

ADMIN_TOKEN = "adm-hostile"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# A min_position ahead of the log is a 503 after this wait: short, for the fuzzer.
SETTINGS = Settings(admin_tokens=frozenset({ADMIN_TOKEN}), min_position_wait_s=0.05)
CUSTOMERS = "/api/governance/customers"
TEAMS = "/api/governance/teams"
KEYS = "/api/governance/virtual-keys"
JSON = "application/json"
NDJSON = "application/x-ndjson"
CODE = re.compile(r"^[a-z][a-z0-9_]*$")

# Examples per operation and generation mode: ~30 operations x 2 modes take ~60 s.
EXAMPLES = 30
load_all_checks()
ALL_CHECKS = CHECKS.get_all()

# The batch body is text: one record a line.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")


@pytest.fixture
async def api(database: str) -> AsyncIterator[Api]:
    """The service with an admin token, sent with every request."""
    async with serve(database, SETTINGS, headers=ADMIN) as api:
        yield api


def assert_error(status: int, answer: Any, expected: int, code: str | None = None):
    """An answer in the error shape: exactly {"error": {"code", "message"}}."""
    assert status == expected, answer
    assert isinstance(answer, dict), answer
    assert list(answer) == ["error"], answer
    assert sorted(answer["error"]) == ["code", "message"], answer
    assert CODE.match(answer["error"]["code"]), answer
    assert isinstance(answer["error"]["message"], str), answer
    assert answer["error"]["message"], answer
    if code is not None:
        assert answer["error"]["code"] == code, answer


async def event_count(api: Api) -> int:
    status, page = await api.call("GET", "/api/events?limit=10000")
    assert status == 200, page
    return len(page["events"])


async def seed(api: Api) -> dict[str, str]:
    """A customer, a team under it, a key under the team; read model and cache
    caught up with them."""
    status, created = await api.call(
        "POST",
        CUSTOMERS,
        {"name": "acme", "budgets": [{"max_limit": 100, "reset_duration": "1M"}]},
    )
    assert status == 201, created
    customer = created["customer"]["id"]
    status, created = await api.call(
        "POST", TEAMS, {"name": "platform", "customer_id": customer}
    )
    assert status == 201, created
    team = created["team"]["id"]
    status, created = await api.call(
        "POST",
        KEYS,
        {
            "name": "gateway",
            "team_id": team,
            "budgets": [{"max_limit": "5", "reset_duration": "1d"}],
            "provider_configs": [{"provider": "openai"}],
        },
    )
    assert status == 201, created
    key = created["virtual_key"]
    position = created["position"]
    await api.caught_up(position)
    status, checked = await api.call(
        "POST",
        "/api/governance/check",
        {"virtual_key_id": key["id"], "provider": "openai"},
    )
    assert (status, checked["allowed"]) == (200, True), checked
    return {
        "customer": customer,
        "team": team,
        "virtual_key": key["id"],
        "secret": key["value"],
    }


# --- the OpenAPI document -----------------------------------------------------------


def test_every_route_of_the_app_has_an_openapi_entry():
    routes = openapi.routes_of(create_app(SETTINGS, "postgresql://unused"))

    assert openapi.missing(routes) == []
    assert {(m, p) for m, p, _ in routes} == set(openapi.OPERATIONS)


def test_a_route_without_an_entry_cannot_be_documented():
    routes = [
        ("GET", "/healthz", Right.PUBLIC),
        ("GET", "/nowhere", Right.READ),
    ]

    with pytest.raises(LookupError, match="/nowhere"):
        openapi.document(routes)


async def test_the_document_describes_every_endpoint_with_rights_and_bodies(api):
    anonymous = api.with_headers({})  # no token
    response = await anonymous.request("GET", "/api/openapi.json")

    assert response.status == 200
    assert response.content_type == "application/json"
    spec = await response.json()
    assert spec["openapi"] == "3.1.0"
    paths = spec["paths"]
    assert sorted((m.upper(), p) for p, ops in paths.items() for m in ops) == sorted(
        openapi.OPERATIONS
    )
    check = paths["/api/governance/check"]["post"]
    assert check["security"] == [{"bearer": ["check"]}]
    assert check["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CheckRequest"
    }
    assert paths["/healthz"]["get"]["security"] == []
    assert paths["/api/events"]["get"]["security"] == [{"bearer": ["admin"]}]
    batch = paths["/api/usage/batch"]["post"]["requestBody"]["content"]
    assert batch == {
        "application/x-ndjson": {
            "schema": {"type": "string", "contentMediaType": "application/x-ndjson"}
        }
    }
    stream = paths["/api/usage/stream"]["get"]
    assert "WebSocket" in stream["description"]
    assert stream["security"] == [{"bearer": ["record"]}]
    put = paths[f"{KEYS}/{{id}}"]["put"]
    assert {p["name"]: p["in"] for p in put["parameters"]} == {
        "id": "path",
        "If-Match": "header",
        "Idempotency-Key": "header",
    }
    assert put["parameters"][0]["schema"] == {"type": "string", "format": "uuid"}
    for code in ("400", "401", "403", "404", "409", "413", "422"):
        assert put["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
    assert list(stream["responses"]) == ["101", "400", "401", "403"]
    assert [(p["name"], p["required"]) for p in stream["parameters"]] == [
        ("Upgrade", True),
        ("Connection", True),
        ("Sec-WebSocket-Version", True),
        ("Sec-WebSocket-Key", True),
    ]
    schemas = spec["components"]["schemas"]
    assert schemas["UsageRecord"]["properties"]["cost"] == {
        "anyOf": [
            {
                "type": "number",
                "minimum": 0,
                "exclusiveMaximum": 1e12,
                "multipleOf": 1e-9,
            },
            {
                "type": "string",
                "pattern": r"^(?:0*[0-9]{1,12}(?:\.[0-9]{1,9}0*)?|-0+(?:\.0+)?)$",
                "maxLength": 64,
            },
        ],
        "description": "At least 0 and below 10^12, at most 9 fractional digits",
    }
    assert schemas["UsageFrame"]["properties"]["records"]["maxItems"] == 10_000
    assert [sorted(b["required"]) for b in schemas["UsageRecord"]["oneOf"]] == [
        ["virtual_key"],
        ["virtual_key_id"],
    ]
    name = schemas["CustomerBody"]["properties"]["name"]
    assert (name["minLength"], name["maxLength"]) == (1, 256)
    assert schemas["VirtualKeyBody"]["properties"]["provider_configs"]["maxItems"] == 64
    assert schemas["BudgetView"]["properties"]["current_usage"] == {"type": "number"}
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # The same bytes every time: encoded once per app.
    again = await anonymous.request("GET", "/api/openapi.json")
    assert await again.read() == await response.read()


# --- schemathesis -------------------------------------------------------------------
# Every check schemathesis has (`--checks all`): no server error, status codes, content
# types, response headers and bodies as documented, schema-valid requests accepted,
# schema-violating ones refused, authentication not ignored, unsupported methods
# refused. What a schema cannot express is named below, each with its reason; nothing
# else is let through.

# Answers to a schema-valid request that the document cannot foretell: each depends
# on what the log holds, or on a rule JSON Schema has no word for.
STATEFUL_REFUSALS = {
    # a customer, team or key id that names nothing (yet)
    "unknown_reference": "any",
    "unknown_virtual_key": "any",
    # a key moved to a customer while it keeps its team: depends on the key
    "conflicting_owner": "PUT",
    # a rate-limit half named by one field keeps the other field's current value
    "invalid_rate_limit": "PUT",
    # unique by one property within a list (uniqueItems compares whole items)
    "duplicate_reset_duration": "any",
    "duplicate_provider": "any",
    # occurred_at is bounded by the receive time (and 2000-01-01): no JSON Schema
    # keyword bounds a date-time
    "occurred_at_out_of_range": "any",
}
# The WebSocket's handshake needs `Connection: Upgrade`, a hop-by-hop header that
# schemathesis's HTTP transport does not send: the socket has its own tests here and in
# tests/test_api_usage.py. The dashboard's event stream never ends: its first event is
# checked against the document by test_the_dashboard_stream_matches_its_schema.
NOT_HTTP = frozenset({"/api/dashboard/events", "/api/usage/stream"})


def error_shape_problem(status: int, body: bytes) -> str | None:
    if status < 400:
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:200]!r}"
    try:
        assert_error(status, answer, status)
    except AssertionError:
        return f"{status} not in the error shape: {answer!r}"
    return None


def stateful_refusal(response: Any) -> bool:
    if response.status_code != 400:
        return False
    try:
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    method = STATEFUL_REFUSALS.get(code)
    return method in ("any", response.request.method)


def lagging_answer(response: Any) -> bool:
    """The documented 503 of a min_position the log has not reached, or of a key the
    cache has not seen while it has not reached the head in time (SETTINGS waits
    only 0.05 s, which a busy machine can exceed)."""
    request = response.request
    body = request.body or b""
    asked = "min_position" in request.url or b"min_position" in body
    keyed = b"virtual_key" in body
    try:
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return response.status_code == 503 and code == "projection_lag" and (asked or keyed)


def lenient_query(case: Any, response: Any) -> bool:
    """A negative case whose request, as HTTP queries are read, is valid: its
    negation did not survive the wire (a null sent as an empty value, which means
    "not given"), or it is only a parameter the operation does not declare (ignored)
    or a repeated one (the first value counts). Every declared parameter's first
    value must be valid."""
    if response.request.method != "GET":
        return False
    declared = case.operation.get_parameter_set(ParameterLocation.QUERY).schema.get(
        "properties", {}
    )
    query = urllib.parse.parse_qsl(
        urllib.parse.urlsplit(response.request.url).query, keep_blank_values=True
    )
    first: dict[str, str] = {}
    for name, value in query:
        first.setdefault(name, value)
    for name, value in first.items():
        if name not in declared:
            continue
        wire = int(value) if re.fullmatch(r"-?[0-9]+", value) else value
        if not jsonschema_rs.validator_for(declared[name]).is_valid(wire):
            return False
    return True


def fuzz(base_url: str, known: dict[str, str]) -> list[str]:
    """Run every operation of the live document; the problems found, described."""
    schema = schemathesis.openapi.from_url(
        f"{base_url}/api/openapi.json", headers=ADMIN
    )
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the document itself is valid
        if result.ok().path not in NOT_HTTP:
            operations.append(result.ok())
    # Deletes last, so the seeded entities live through the other operations.
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    problems: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            problems += fuzz_operation(operation, mode, base_url, known)
    return problems


def fuzz_operation(
    operation: Any, mode: GenerationMode, base_url: str, known: dict[str, str]
) -> list[str]:
    problems: list[str] = []
    label = f"{operation.method.upper()} {operation.path} ({mode.value})"

    @hypothesis.settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(
        case=operation.as_strategy(generation_mode=mode), aim=st.booleans()
    )
    def run(case: Any, aim: bool) -> None:
        if mode is GenerationMode.POSITIVE:
            if aim:
                aim_at(case, known)
            fresh_idempotency_key(case)
        response = case.call(base_url=base_url, headers=ADMIN, timeout=60)
        found: list[str] = []
        try:
            case.validate_response(response, checks=ALL_CHECKS, headers=ADMIN)
        except AssertionError as exc:
            found.append(str(exc).strip().splitlines()[0])
        except BaseExceptionGroup as group:
            found += [str(e).strip().splitlines()[0] for e in group.exceptions]
        found = [
            problem
            for problem in found
            if not (
                (problem == "Server error" and lagging_answer(response))
                or (
                    problem == "Schema-valid request rejected"
                    and stateful_refusal(response)
                )
                or (
                    problem == "Schema-violating request accepted"
                    and (case.media_type == NDJSON or lenient_query(case, response))
                )
            )
        ]
        problem = error_shape_problem(response.status_code, response.content)
        if problem:
            found.append(problem)
        for problem in found:
            if len(problems) < 5:
                request = response.request
                problems.append(
                    f"{label}: {problem}\n    request: {request.method} {request.url}"
                    f" {request.body!r:.300}\n    answer: {response.status_code}"
                    f" {response.content[:300]!r}"
                )

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing to negate: the operation takes no parameters and no body.
        assert mode is GenerationMode.NEGATIVE, label
    return problems


def fresh_idempotency_key(case: Any) -> None:
    """A generated Idempotency-Key, made unique to its case: the fuzzer draws "0"
    for many different requests, which the service rightly answers with a 422."""
    if case.headers and "Idempotency-Key" in case.headers:
        key = f"{case.headers['Idempotency-Key']}-{uuid.uuid4().hex}"
        case.headers["Idempotency-Key"] = key[-255:]


def aim_at(case: Any, known: dict[str, str]) -> None:
    """Point a generated case at the seeded entities, so it goes past the 404s."""
    path = case.operation.path
    for prefix, name in (
        (CUSTOMERS, "customer"),
        (TEAMS, "team"),
        (KEYS, "virtual_key"),
    ):
        if path == f"{prefix}/{{id}}":
            case.path_parameters = {"id": known[name]}
    if isinstance(case.body, dict):
        if "virtual_key_id" in case.body or "virtual_key" in case.body:
            case.body = {
                **{k: v for k, v in case.body.items() if k != "virtual_key"},
                "virtual_key_id": known["virtual_key"],
                "provider": "openai",
            }
            if "event_id" in case.body:  # a usage record: one the service can take
                case.body = {**case.body, "cost": "0.01", "occurred_at": None}
        for name in ("team_id", "customer_id"):
            if case.body.get(name) is not None and path.startswith(KEYS):
                case.body = {**case.body, name: None}
            elif case.body.get(name) is not None:
                case.body = {**case.body, name: known[name.removesuffix("_id")]}


@pytest.mark.slow
async def test_schemathesis_with_every_check_finds_no_problem(api):
    known = await seed(api)
    base_url = api.url("").rstrip("/")

    problems = await asyncio.to_thread(fuzz, base_url, known)

    assert problems == [], "\n".join(problems)


async def test_the_dashboard_stream_matches_its_schema(api):
    await seed(api)
    spec = await (await api.request("GET", "/api/openapi.json")).json()
    documented = spec["paths"]["/api/dashboard/events"]["get"]["x-events"]["snapshot"]

    async with api.session.get(
        api.url("/api/dashboard/events"), headers=ADMIN
    ) as response:
        head = b""
        while not head.endswith(b"\n\n"):
            head += await response.content.readline()
    fields = dict(
        line.split(": ", 1) for line in head.decode().splitlines() if ": " in line
    )
    data = json.loads(fields["data"])

    assert response.status == 200
    assert response.content_type == "text/event-stream"
    assert fields["event"] == "snapshot"
    assert int(fields["id"]) == data["position"]
    validator = jsonschema_rs.validator_for(documented["data"], validate_formats=True)
    assert [e.message for e in validator.iter_errors(data)] == []
    assert [c["name"] for c in data["customers"]] == ["acme"]


# --- explicit abuse -----------------------------------------------------------------

JSON_BODIES = [
    ("POST", CUSTOMERS),
    ("PUT", CUSTOMERS + "/{customer}"),
    ("POST", TEAMS),
    ("PUT", TEAMS + "/{team}"),
    ("POST", KEYS),
    ("PUT", KEYS + "/{virtual_key}"),
    ("POST", "/api/governance/check"),
    ("POST", "/api/usage"),
]
MIB = 1 << 20


def usage_record(key: dict[str, str], **fields: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "virtual_key_id": key["virtual_key"],
        "provider": "openai",
        "model": "gpt-4o",
        "cost": "0.01",
        **fields,
    }


def ndjson(*lines: dict[str, Any] | bytes) -> bytes:
    return b"\n".join(
        line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines
    )


async def send(
    api: Api,
    method: str,
    path: str,
    data: Any,
    content_type: str | None = JSON,
    **headers: str,
) -> tuple[int, Any]:
    """Send raw bytes (or a stream of them) as the body, with this content type."""
    if content_type is not None:
        headers["Content-Type"] = content_type
    if isinstance(data, bytes):
        data = io.BytesIO(data)  # aiohttp warns about large bytes bodies
    return await api.call(method, path, data=data, headers=headers)


async def chunks(body: bytes, size: int = 64 << 10) -> AsyncIterator[bytes]:
    """A body without Content-Length: sent chunked."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize(("method", "path"), JSON_BODIES)
async def test_a_body_over_the_limit_is_a_413_in_the_error_shape_and_commits_nothing(
    api, method, path
):
    known = await seed(api)
    before = await event_count(api)
    path = path.format(**known)
    # Valid JSON: only the limit stands between it and a commit.
    body = json.dumps({"name": "n" * MIB}).encode()

    for data in (body, chunks(body)):
        status, answer = await send(api, method, path, data)

        assert_error(status, answer, 413, "body_too_large")
    assert await event_count(api) == before


async def test_a_batch_over_16_mib_is_a_413_in_the_error_shape_and_commits_nothing(
    api,
):
    known = await seed(api)
    before = await event_count(api)
    line = ndjson(usage_record(known, model="m" * 200))
    body = ndjson(*([line] * (16 * MIB // len(line) + 1)))
    assert len(body) > 16 * MIB

    for data in (body, chunks(body, MIB)):
        status, answer = await send(api, "POST", "/api/usage/batch", data, NDJSON)

        assert_error(status, answer, 413, "body_too_large")
    assert await event_count(api) == before


async def test_a_gzip_bomb_is_stopped_at_the_limit(api):
    await seed(api)
    before = await event_count(api)
    bomb = gzip.compress(b'{"name": "' + b"n" * (64 * MIB) + b'"}')
    assert len(bomb) < MIB

    status, answer = await send(
        api, "POST", CUSTOMERS, bomb, **{"Content-Encoding": "gzip"}
    )

    assert_error(status, answer, 413, "body_too_large")
    assert await event_count(api) == before


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decompress_is_a_400(api, encoding):
    await seed(api)
    before = await event_count(api)

    for path, content_type in [
        (CUSTOMERS, JSON),
        ("/api/usage", JSON),
        ("/api/usage/batch", NDJSON),
        ("/api/governance/check", JSON),
    ]:
        status, answer = await send(
            api,
            "POST",
            path,
            b"this is not compressed",
            content_type,
            # The server closes a connection whose body it could not read.
            **{"Content-Encoding": encoding, "Connection": "close"},
        )

        assert_error(status, answer, 400)
    assert await event_count(api) == before


DEEP = b"[" * 100_000


@pytest.mark.parametrize(("method", "path"), JSON_BODIES)
async def test_deeply_nested_json_is_a_400(api, method, path):
    known = await seed(api)
    path = path.format(**known)

    for body in (DEEP, b'{"name": ' + DEEP, b'{"budgets": [' + DEEP):
        status, answer = await send(api, method, path, body)

        assert_error(status, answer, 400)


async def test_a_deeply_nested_batch_line_is_a_rejected_line(api):
    known = await seed(api)

    status, answer = await send(
        api,
        "POST",
        "/api/usage/batch",
        ndjson(DEEP, usage_record(known), b'{"event_id": ' + DEEP),
        NDJSON,
    )

    assert status == 200, answer
    assert answer["accepted"] == 1
    assert [(r["line"], r["code"]) for r in answer["rejected"]] == [
        (1, "invalid_record"),
        (3, "invalid_record"),
    ]


async def test_huge_ndjson_lines_are_rejected_lines_and_do_not_echo_back(api):
    known = await seed(api)
    huge_record = usage_record(known, model="m" * (6 * MIB))
    garbage = b"x" * (6 * MIB)

    response = await api.request(
        "POST",
        "/api/usage/batch",
        data=io.BytesIO(ndjson(huge_record, garbage, usage_record(known))),
        headers={"Content-Type": NDJSON},
    )

    assert response.status == 200
    assert len(await response.read()) < 4096
    answer = await response.json()
    assert answer["accepted"] == 1
    assert [(r["line"], r["code"]) for r in answer["rejected"]] == [
        (1, "invalid_record"),
        (2, "invalid_record"),
    ]


INVALID_UTF8 = [b'{"name": "\xff\xfe"}', b"\xff", b'{"name": "caf\xc3"}']


@pytest.mark.parametrize(("method", "path"), JSON_BODIES)
async def test_invalid_utf8_is_a_400_and_commits_nothing(api, method, path):
    known = await seed(api)
    before = await event_count(api)
    path = path.format(**known)
    bodies = [*INVALID_UTF8]
    if path == "/api/usage":
        bodies.append(
            json.dumps(usage_record(known, model="MODEL"))
            .encode()
            .replace(b"MODEL", b"\xff")
        )
    if path == "/api/governance/check":
        bodies.append(b'{"virtual_key": "\xff"}')

    for body in bodies:
        status, answer = await send(api, method, path, body)

        assert_error(status, answer, 400)
    assert await event_count(api) == before


async def test_an_invalid_utf8_batch_line_is_a_rejected_line(api):
    known = await seed(api)
    bad = json.dumps(usage_record(known, model="MODEL")).encode()

    status, answer = await send(
        api,
        "POST",
        "/api/usage/batch",
        ndjson(bad.replace(b"MODEL", b"\xff\xfe"), usage_record(known)),
        NDJSON,
    )

    assert status == 200, answer
    assert answer["accepted"] == 1
    assert [(r["line"], r["code"]) for r in answer["rejected"]] == [
        (1, "invalid_record")
    ]


async def test_a_lone_surrogate_is_a_400(api):
    await seed(api)

    status, answer = await send(api, "POST", CUSTOMERS, b'{"name": "\\ud800"}')

    assert_error(status, answer, 400)


NUL_BODIES = [
    (CUSTOMERS, {"name": "a\u0000b"}),
    (TEAMS, {"name": "a\u0000b"}),
    (KEYS, {"name": "a\u0000b"}),
    (KEYS, {"name": "k", "provider_configs": [{"provider": "open\u0000ai"}]}),
    (
        KEYS,
        {
            "name": "k",
            "provider_configs": [{"provider": "x", "allowed_models": ["\0"]}],
        },
    ),
    (TEAMS, {"name": "t", "customer_id": "\u0000"}),
    (KEYS, {"name": "k", "team_id": "\u0000"}),
    (CUSTOMERS, {"name": "c", "budgets": [{"max_limit": 1, "reset_duration": "1d\0"}]}),
]


@pytest.mark.parametrize(("path", "body"), NUL_BODIES)
async def test_a_nul_character_in_a_governance_string_is_a_400(api, path, body):
    known = await seed(api)
    before = await event_count(api)

    status, answer = await api.call("POST", path, body)
    assert_error(status, answer, 400)
    entity = {CUSTOMERS: "customer", TEAMS: "team", KEYS: "virtual_key"}[path]
    status, answer = await api.call("PUT", f"{path}/{known[entity]}", body)
    assert_error(status, answer, 400)

    assert await event_count(api) == before


async def test_a_nul_character_in_usage_or_check_strings_is_refused_cleanly(api):
    known = await seed(api)
    before = await event_count(api)

    for field in ("provider", "model"):
        status, answer = await api.call(
            "POST", "/api/usage", usage_record(known, **{field: "a\0b"})
        )
        assert_error(status, answer, 400, "invalid_record")
    status, answer = await api.call(
        "POST", "/api/usage", usage_record(known, virtual_key_id="\0")
    )
    assert_error(status, answer, 400, "invalid_record")  # not a UUID
    status, answer = await api.call(
        "POST", "/api/governance/check", {"virtual_key": "sk-\0"}
    )
    assert (status, answer["reason"]) == (200, "unknown_virtual_key")
    assert await event_count(api) == before


@pytest.mark.parametrize(
    "path",
    [
        "/api/events?stream_id=%00",
        "/api/governance/budgets?owner_type=%00",
        "/api/governance/budgets?owner_id=%00",
        "/api/governance/teams?customer_id=%00",
        "/api/governance/customers/%00",
    ],
)
async def test_a_nul_character_in_a_query_or_path_never_reaches_the_database(api, path):
    status, answer = await api.call("GET", path)

    assert status < 500, answer
    if status >= 400:
        assert_error(status, answer, status)


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/x-www-form-urlencoded", b"name=acme", 415),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\n'
            b"acme\r\n--b--\r\n",
            415,
        ),
        ("text/plain", b'{"name": "acme"}', 415),
        ("application/json; charset=latin-1", b'{"name": "caf\xe9"}', 400),
    ],
)
async def test_a_body_of_another_content_type_is_a_4xx_and_commits_nothing(
    api, content_type, body, expected
):
    await seed(api)
    before = await event_count(api)

    status, answer = await send(api, "POST", CUSTOMERS, body, content_type)

    assert_error(status, answer, expected)
    assert await event_count(api) == before


async def test_form_and_text_bodies_are_refused_by_every_body_endpoint(api):
    """A browser sends these content types cross-site without asking first: no
    request that could come from a foreign page may change anything."""
    known = await seed(api)
    before = await event_count(api)
    record = json.dumps(usage_record(known)).encode()

    for content_type in (
        "text/plain",
        "Text/Plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ):
        for method, path, body in [
            ("POST", CUSTOMERS, b'{"name": "acme"}'),
            ("PUT", f"{CUSTOMERS}/{known['customer']}", b'{"name": "evil"}'),
            ("POST", "/api/usage", record),
            ("POST", "/api/usage/batch", record),
            ("POST", "/api/governance/check", b'{"virtual_key": "x"}'),
        ]:
            status, answer = await send(api, method, path, body, content_type)

            assert_error(status, answer, 415, "unsupported_media_type")
    assert await event_count(api) == before


@pytest.mark.parametrize(
    "path",
    [
        CUSTOMERS + "/not-a-uuid",
        TEAMS + "/123",
        KEYS + "/" + "f" * 4000,
        KEYS + "/%2e%2e%2f%2e%2e",
        CUSTOMERS + "/%F0%9F%92%A5",
        "/api/governance/budgets/nope/periods",
    ],
)
async def test_an_id_in_the_path_that_is_not_a_uuid_is_a_404(api, path):
    for method in ("GET", "PUT", "DELETE"):
        if method != "GET" and "periods" in path:
            continue
        status, answer = await api.call(method, path, {"name": "x"})

        assert_error(status, answer, 404)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        (TEAMS + "?customer_id=nope", "invalid_request"),
        (KEYS + "?team_id=1", "invalid_request"),
        (KEYS + "?customer_id=" + "a" * 5000, "invalid_request"),
        ("/api/governance/budgets?owner_id=x", "invalid_request"),
        ("/api/governance/budgets?owner_type=robot", "invalid_request"),
        (CUSTOMERS + "?min_position=abc", "invalid_position"),
        (CUSTOMERS + "?min_position=-1", "invalid_position"),
        (CUSTOMERS + "?min_position=1e3", "invalid_position"),
        (CUSTOMERS + "?min_position=" + "9" * 30, "invalid_position"),
        (CUSTOMERS + "?min_position=" + "9" * 5000, "invalid_position"),
        # int() takes these spellings; the contract's integer is decimal digits.
        (CUSTOMERS + "?min_position=1_000", "invalid_position"),
        (CUSTOMERS + "?min_position=%20 7", "invalid_position"),
        (CUSTOMERS + "?min_position=%2B7", "invalid_position"),
        (CUSTOMERS + "?min_position=%EF%BC%97", "invalid_position"),  # fullwidth 7
        ("/api/events?limit=%D9%A7", "invalid_request"),  # Arabic-Indic 7
        ("/api/events?after=" + "9" * 30, "invalid_request"),
        ("/api/events?after=NaN", "invalid_request"),
        ("/api/events?limit=0", "invalid_request"),
        ("/api/events?limit=" + "9" * 30, "invalid_request"),
        (
            "/api/governance/budgets/"
            + str(uuid.uuid4())
            + "/periods?limit="
            + "9" * 30,
            "invalid_request",
        ),
    ],
)
async def test_a_bad_query_parameter_is_a_400(api, path, code):
    status, answer = await api.call("GET", path)

    assert_error(status, answer, 400, code)


async def test_a_check_min_position_beyond_any_position_is_a_400(api):
    for position in (2**63, 10**40, -1):
        status, answer = await api.call(
            "POST",
            "/api/governance/check",
            {"virtual_key": "x", "min_position": position},
        )

        assert_error(status, answer, 400, "invalid_position")


@pytest.mark.parametrize(
    "max_limit",
    [
        b"1e999",
        b"-1e999",
        b'"1e999"',
        b'"NaN"',
        b'"Infinity"',
        b'"-Infinity"',
        b"-0",
        b'"-0"',
        b"0",
        b"1e-999",
        b'"1e-999999999"',
        b'"1e999999999"',
        b"9" * 5000,
        b"1" + b"0" * 18,
        b"true",
        b"null",
        b"[1]",
    ],
)
async def test_a_max_limit_that_is_not_a_sane_positive_amount_is_a_400(api, max_limit):
    await seed(api)
    before = await event_count(api)
    body = b'{"name": "n", "budgets": [{"max_limit": %s, "reset_duration": "1d"}]}'

    status, answer = await send(api, "POST", CUSTOMERS, body % max_limit)

    assert_error(status, answer, 400)
    assert await event_count(api) == before


@pytest.mark.parametrize(
    ("cost", "code"),
    [
        (b"1e999", "invalid_cost"),
        # a string is plain decimal digits: no exponent
        (b'"1e999999999"', "invalid_record"),
        (b'"1e-999999999"', "invalid_record"),
        (b'"NaN"', "invalid_cost"),
        (b'"sNaN"', "invalid_cost"),
        (b'"-Infinity"', "invalid_cost"),
        (b"-1e999", "negative_cost"),
        (b"9" * 5000, "invalid_record"),  # an integer past 64 bits is no amount
        (b"NaN", "invalid_record"),
        (b"Infinity", "invalid_record"),
    ],
)
async def test_a_cost_that_is_not_a_sane_amount_is_rejected(api, cost, code):
    known = await seed(api)
    before = await event_count(api)
    body = json.dumps(usage_record(known, cost="COST")).encode()
    body = body.replace(b'"COST"', cost)

    status, answer = await send(api, "POST", "/api/usage", body)

    assert_error(status, answer, 400, code)
    assert await event_count(api) == before


async def test_a_cost_of_minus_zero_is_recorded_as_zero(api):
    known = await seed(api)
    body = json.dumps(usage_record(known, cost="COST")).encode()

    status, answer = await send(
        api, "POST", "/api/usage", body.replace(b'"COST"', b"-0")
    )

    assert status == 202, answer
    status, page = await api.call("GET", f"/api/events?after={answer['position'] - 1}")
    assert page["events"][0]["data"]["cost"] == 0


@pytest.mark.parametrize(
    "estimated_cost",
    [
        b"1e999",
        b'"1e999999999"',
        b'"1e-999999999"',
        b'"-1e999999999"',
        b"-0",
        b"9" * 5000,
    ],
)
async def test_an_extreme_estimated_cost_is_answered_without_a_server_error(
    api, estimated_cost
):
    known = await seed(api)
    body = b'{"virtual_key_id": "%s", "provider": "openai", "estimated_cost": %s}'

    status, answer = await send(
        api,
        "POST",
        "/api/governance/check",
        body % (known["virtual_key"].encode(), estimated_cost),
    )

    assert status in (200, 400), answer
    if status == 400:
        assert_error(status, answer, 400)
    else:
        assert answer["allowed"] is (estimated_cost in (b"-0", b'"1e-999999999"'))


@pytest.mark.parametrize(
    "tokens",
    [2**31, 2**63, 2**64, 10**30, 10**400, -1, 1.5, "1"],
)
async def test_a_token_count_out_of_range_is_an_invalid_record(api, tokens):
    known = await seed(api)
    before = await event_count(api)
    body = json.dumps(usage_record(known, input_tokens=tokens)).encode()

    status, answer = await send(api, "POST", "/api/usage", body)

    assert_error(status, answer, 400, "invalid_record")
    assert await event_count(api) == before


@pytest.mark.parametrize("limit", [0, -5, 2**63, 10**30, 10**400, 1.5, "7"])
async def test_a_rate_limit_out_of_range_is_a_400(api, limit):
    await seed(api)
    before = await event_count(api)
    body = {
        "name": "c",
        "rate_limit": {"token_max_limit": limit, "token_reset_duration": "1m"},
    }

    status, answer = await api.call("POST", CUSTOMERS, body)

    assert_error(status, answer, 400)
    assert await event_count(api) == before


async def test_bad_websocket_frames_get_error_frames_and_the_socket_stays_usable(
    api,
):
    known = await seed(api)

    # Each frame with the seq its error frame carries: a client matches an error to
    # its frame by it (without it, the client took it for a passing failure and
    # sent the same frame again and again).
    deep = "[" * 990 + "]" * 990
    async with api.socket() as ws:
        for frame, seq in (
            ("not json", None),
            ("", None),
            ("\u0000", None),
            ("[" * 100_000, None),
            ('{"seq": 1, "records": [' + "[" * 100_000 + "]}", 1),
            ('{"seq": ' + "9" * 5000 + ', "records": []}', None),
            ('{"seq": 2, "records": {}}', 2),
            ('{"seq": 3}', 3),
            ('{"seq": 4, "deep": ' + "[" * 100_000 + "}", 4),
            ('{"seq": 6, "records": [{"x": ' + deep + "}]}", 6),
            ('{"seq": 7, "deep": ' + deep + ', "records": []}', 7),
            ("[]", None),
        ):
            await ws.send_str(frame)
            answer = await ws.receive_json(timeout=10)
            assert_error(400, {"error": answer["error"]}, 400, "invalid_frame")
            assert set(answer) <= {"seq", "error"}
            assert answer.get("seq") == seq, (frame[:40], answer)
        for data in (b"\x00\xff", b'{"seq": 4, "records": []}'):
            await ws.send_bytes(data)
            answer = await ws.receive_json(timeout=10)
            assert answer["error"]["code"] == "invalid_frame"
        await ws.send_str(
            json.dumps(
                {
                    "seq": 5,
                    "records": [
                        usage_record(known),
                        usage_record(known, input_tokens=2**64),
                        usage_record(known, model="a\0b"),
                    ],
                }
            )
        )
        ack = await ws.receive_json(timeout=10)

        assert ws.closed is False
    assert (ack["seq"], ack["accepted"], ack["duplicates"]) == (5, 1, 0)
    assert [(r["index"], r["code"]) for r in ack["rejected"]] == [
        (1, "invalid_record"),
        (2, "invalid_record"),
    ]


async def test_a_websocket_frame_over_the_limit_closes_that_socket_only(api):
    known = await seed(api)

    async with api.socket() as ws:
        # The server may close (1009) and reset the connection mid-send.
        with contextlib.suppress(ConnectionError):
            await ws.send_str('{"seq": 1, "records": ["' + "x" * (5 * MIB) + '"]}')
            message = await ws.receive(timeout=10)
            assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), message
            assert ws.close_code == 1009

    async with api.socket() as ws:
        await ws.send_str(json.dumps({"seq": 2, "records": [usage_record(known)]}))
        ack = await ws.receive_json(timeout=10)
    assert (ack["seq"], ack["accepted"]) == (2, 1)


# --- ids in any letter case ---------------------------------------------------------


async def test_a_key_id_in_upper_case_is_the_same_key_on_every_path(api):
    known = await seed(api)
    loud = {**known, "virtual_key": known["virtual_key"].upper()}

    status, checked = await api.call(
        "POST",
        "/api/governance/check",
        {"virtual_key_id": loud["virtual_key"], "provider": "openai"},
    )
    one = await api.call("POST", "/api/usage", usage_record(loud))
    batch = await send(
        api, "POST", "/api/usage/batch", ndjson(usage_record(loud)), NDJSON
    )
    async with api.socket() as ws:
        await ws.send_json({"seq": 1, "records": [usage_record(loud)]})
        ack = await ws.receive_json()

    assert (status, checked["allowed"]) == (200, True)
    assert one[0] == 202
    assert (batch[0], batch[1]["accepted"], batch[1]["rejected"]) == (200, 1, [])
    assert (ack["accepted"], ack["rejected"]) == (1, [])
    status, page = await api.call(
        "GET", f"/api/events?stream_id=usage-{known['virtual_key']}"
    )
    assert [e["data"]["virtual_key_id"] for e in page["events"]] == [
        known["virtual_key"]
    ] * 3


# --- retryable or final -------------------------------------------------------------


@contextlib.asynccontextmanager
async def lagging_cache(database: str) -> AsyncIterator[None]:
    """While this is open the enforcement cache cannot apply anything committed
    after it opened: projectors read below the oldest open transaction (a late
    commit is delivered late, never skipped), and this one stays open."""
    conn = await asyncpg.connect(database)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.fetchval("SELECT pg_current_xact_id()")
        yield
        await transaction.rollback()
    finally:
        await conn.close()


async def test_a_key_the_lagging_cache_has_not_seen_is_a_503_then_known(api, database):
    async with lagging_cache(database):
        status, created = await api.call("POST", KEYS, {"name": "new"})
        key = {"virtual_key": created["virtual_key"]["id"]}
        check = {"virtual_key_id": key["virtual_key"]}
        record = usage_record(key)

        refused = [
            await api.call("POST", "/api/governance/check", check),
            await api.call("POST", "/api/usage", record),
            await send(api, "POST", "/api/usage/batch", ndjson(record), NDJSON),
        ]
        async with api.socket() as ws:
            await ws.send_json({"seq": 7, "records": [record]})
            frame = await ws.receive_json()

    assert status == 201
    for status, answer in refused:
        assert_error(status, answer, 503, "projection_lag")
    assert frame == {
        "seq": 7,
        "error": {"code": "projection_lag", "message": frame["error"]["message"]},
    }
    await api.caught_up(created["position"])
    status, checked = await api.call("POST", "/api/governance/check", check)
    assert (status, checked["allowed"]) == (200, True)
    assert (await api.call("POST", "/api/usage", record))[0] == 202


async def test_a_503_refusal_carries_retry_after_and_a_resend_is_taken_whole(
    api, database
):
    known = await seed(api)
    taken = usage_record(known)

    async with lagging_cache(database):
        status, created = await api.call("POST", KEYS, {"name": "new"})
        unseen = usage_record({"virtual_key": created["virtual_key"]["id"]})
        response = await api.request(
            "POST",
            "/api/usage/batch",
            data=ndjson(taken, unseen),
            content_type=NDJSON,
        )

    assert (status, response.status) == (201, 503)
    assert response.headers["Retry-After"] == "1"
    await api.caught_up(created["position"])
    status, again = await send(
        api, "POST", "/api/usage/batch", ndjson(taken, unseen), NDJSON
    )
    assert (status, again["accepted"], again["duplicates"]) == (200, 2, 0)


async def test_a_key_that_does_not_exist_is_final_once_the_cache_is_at_the_head(api):
    await seed(api)
    nobody = {"virtual_key": str(uuid.uuid4())}

    status, checked = await api.call(
        "POST", "/api/governance/check", {"virtual_key_id": nobody["virtual_key"]}
    )
    one = await api.call("POST", "/api/usage", usage_record(nobody))

    assert (status, checked["reason"]) == (200, "unknown_virtual_key")
    assert_error(*one, 400, "unknown_virtual_key")


@pytest.mark.parametrize("quote", [b'"', b""])
async def test_money_spelled_in_half_a_megabyte_is_a_400_that_stores_nothing(
    api, quote
):
    """Every number a request carries has a bound on its spelling (64 characters):
    1 followed by 500,000 zeros after the point was taken whole into the log."""
    key = await seed(api)
    before = await event_count(api)
    long = quote + b"1." + b"0" * 500_000 + quote
    limit = b'{"name": "big", "budgets": [{"max_limit": %s, "reset_duration": "1d"}]}'
    record = json.dumps(usage_record(key, cost="COST")).encode()
    line = record.replace(b'"COST"', long)

    created = await send(api, "POST", CUSTOMERS, limit % long)
    single = await send(api, "POST", "/api/usage", line)
    batch = await send(api, "POST", "/api/usage/batch", line, NDJSON)

    assert_error(*created, 400, "invalid_request")
    assert "at most 64 characters, got 500,002" in created[1]["error"]["message"]
    assert_error(*single, 400, "invalid_record")
    assert batch[0] == 200
    assert [r["code"] for r in batch[1]["rejected"]] == ["invalid_record"]
    assert await event_count(api) == before
