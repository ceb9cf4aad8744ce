"""Security properties against real processes: every route answers every kind of
credential exactly as API.md's rights say; a virtual key's secret appears in no
event, table, log line or answer but the create and rotate answers; SQL is built from
parameters (an allow-list of quoted identifier interpolations); `serve` refuses to run
open off loopback; the event log refuses UPDATE and DELETE to an application role."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.config import Settings
from service.web.app import create_app
from service.web.http import ROLE_RIGHTS, Right
from service.web.keys import rights_key
from tests.api import Api, conformance
from tests.commands import govledger, said
from tests.served import CHECK, CUSTOMERS, KEYS, TEAMS, Fleet, Served, hierarchy, ndjson

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {"admin": "adm-7f3e", "recorder": "rec-91ab", "reader": "read-5c2d"}
TOKEN_ENV = {
    "GOVLEDGER_ADMIN_TOKENS": TOKENS["admin"],
    "GOVLEDGER_RECORDER_TOKENS": TOKENS["recorder"],
    "GOVLEDGER_READER_TOKENS": TOKENS["reader"],
}
# Every way to present (or not) a credential; None: no Authorization header.
CREDENTIALS: dict[str, str | None] = {
    "admin": f"Bearer {TOKENS['admin']}",
    "recorder": f"Bearer {TOKENS['recorder']}",
    "reader": f"Bearer {TOKENS['reader']}",
    "no token": None,
    "wrong token": "Bearer not-a-token",
    "no Bearer prefix": TOKENS["admin"],
}
SECRET = re.compile(r"sk-gl-[A-Za-z0-9_-]{32}")


@pytest.fixture
def fleet(database: str) -> Iterator[Fleet]:
    with Fleet(database) as fleet:
        yield fleet


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def remote(session: aiohttp.ClientSession, served: Served) -> Api:
    """The served process, its answers checked against the OpenAPI document."""
    return Api(session, served.url, await conformance(session, served.url))


# --- rights ----------------------------------------------------------------------


def api_md_right(method: str, path: str) -> Right:
    """The right API.md gives a route: /healthz, /readyz and /api/openapi.json are
    public; /api/events is admin only; recorders record usage, check and release
    reservations (a reserving check needs the record right too: checked in
    tests/test_reservations.py); readers check and GET; commands are admin's. The
    dashboard's static page (GETs outside /api/ other than /metrics) is public: it
    holds no data, its data stream needs the reader right. A HEAD is its GET's."""
    if method == "HEAD":
        method = "GET"
    if path in ("/healthz", "/readyz", "/api/openapi.json"):
        return Right.PUBLIC
    if path == "/api/events":
        return Right.ADMIN
    if path == "/api/governance/check":
        return Right.CHECK
    if path.startswith(("/api/usage", "/api/governance/reservations")):
        return Right.RECORD
    if method == "GET" and path != "/metrics" and not path.startswith("/api/"):
        return Right.PUBLIC
    if method == "GET":
        return Right.READ
    return Right.ADMIN


def route_table() -> list[tuple[str, str, Right]]:
    """(method, path, right) of every route of the app `serve` runs."""
    app = create_app(Settings(admin_tokens=frozenset({"x"})), "postgresql://unused")
    return sorted(
        (route.method, route.resource.canonical, right)
        for route, right in app[rights_key].items()
        if route.resource is not None
    )


def test_every_route_requires_the_right_api_md_gives_it():
    table = route_table()
    assert len(table) >= 20
    assert [(m, p, r) for m, p, r in table if r is not api_md_right(m, p)] == []


def expected_status(right: Right, credential: str) -> str:
    """'pass' (any answer but 401/403), 'unauthorized' or 'forbidden'."""
    if right is Right.PUBLIC:
        return "pass"
    if credential not in ROLE_RIGHTS:
        return "unauthorized"
    return "pass" if right in ROLE_RIGHTS[credential] else "forbidden"


async def test_every_route_answers_each_credential_as_its_rights_say(fleet, session):
    served = fleet.start(name="rights", env=TOKEN_ENV)
    await served.ready(session)
    api = await remote(session, served)
    got: dict[tuple[str, str, str], str] = {}
    want: dict[tuple[str, str, str], str] = {}
    for method, path, _ in route_table():
        right = api_md_right(method, path)
        concrete = path.replace("{id}", str(uuid.uuid4()))
        for credential, header in CREDENTIALS.items():
            headers = {} if header is None else {"Authorization": header}
            body: dict[str, Any] | None = (
                None if method in ("GET", "HEAD", "DELETE") else {}
            )
            # A stream (SSE) is left unread and closed: it stays open otherwise.
            async with asyncio.timeout(15):
                response = await api.request(method, concrete, body, headers=headers)
            status = response.status
            code = (
                (await response.json())["error"]["code"]
                if status in (401, 403) and method != "HEAD"  # HEAD: no body
                else None
            )
            response.close()
            want[method, path, credential] = expected_status(right, credential)
            got[method, path, credential] = {
                401: "unauthorized",
                403: "forbidden",
            }.get(status, "pass")
            if code is not None:
                assert code == got[method, path, credential]
            assert status < 500, (method, path, credential, status)
    assert got == want


# --- secrets ---------------------------------------------------------------------


async def test_virtual_key_secrets_appear_only_in_create_and_rotate_answers(
    fleet, session, pool
):
    served = fleet.start(name="secrets", env=TOKEN_ENV)
    await served.ready(session)
    url = served.url
    api = await remote(session, served)
    admin = {"Authorization": CREDENTIALS["admin"] or ""}
    recorder = {"Authorization": CREDENTIALS["recorder"] or ""}
    reader = {"Authorization": CREDENTIALS["reader"] or ""}
    may_show: list[Any] = []  # the create and rotate answers
    others: list[Any] = []  # every other answer

    tree = await hierarchy(
        session,
        url,
        keys=1,
        key_limit=100,
        team_limit=1000,
        customer_limit=10000,
        headers=admin,
    )
    for name, answer in tree.answers.items():
        path = {"customer": CUSTOMERS, "team": TEAMS}.get(name, KEYS)
        api.conformance.check_answer("POST", path, 201, answer)
        (may_show if "virtual_key" in answer else others).append(answer)
    key = tree.keys[0]
    first = key["value"]
    # A create under an Idempotency-Key: its answer is kept (sealed) for retries.
    keyed = {**admin, "Idempotency-Key": "create-once"}
    status, idem = await api.call("POST", KEYS, {"name": "idem"}, headers=keyed)
    assert status == 201, idem
    status, replayed = await api.call("POST", KEYS, {"name": "idem"}, headers=keyed)
    assert replayed == idem
    may_show += [idem, replayed]
    status, rotated = await api.call(
        "PUT", f"{KEYS}/{key['id']}", {"rotate_value": True}, headers=admin
    )
    assert status == 200, rotated
    may_show.append(rotated)
    second = rotated["virtual_key"]["value"]
    secrets = {first, second, idem["virtual_key"]["value"]}
    assert len(secrets) == 3
    assert all(SECRET.fullmatch(s) for s in secrets)

    # Everything else a client can do with or about the key.
    at = "2026-01-01T00:00:00Z"
    record = {"provider": "openai", "model": "gpt-4o", "cost": 0.5, "occurred_at": at}
    calls: list[tuple[str, str, Any, dict[str, str]]] = [
        ("PUT", f"{KEYS}/{key['id']}", {"name": "renamed"}, admin),
        ("GET", f"{KEYS}/{key['id']}", None, reader),
        ("GET", KEYS, None, reader),
        ("GET", "/api/governance/budgets", None, reader),
        (
            "POST",
            CHECK,
            {"virtual_key": second, "min_position": rotated["position"]},
            recorder,
        ),
        ("POST", CHECK, {"virtual_key": first}, recorder),  # rotated out: unknown
        (
            "POST",
            "/api/usage",
            {"event_id": str(uuid.uuid4()), "virtual_key": second, **record},
            recorder,
        ),
        (
            "POST",
            "/api/usage",
            {"event_id": str(uuid.uuid4()), "virtual_key": first, **record},
            recorder,
        ),
        ("POST", "/api/usage", {"virtual_key": second, "cost": "x"}, recorder),
        ("GET", "/api/events", None, admin),
        ("GET", "/metrics", None, reader),
    ]
    for method, path, body, headers in calls:
        status, answer = await api.call(method, path, body, headers=headers)
        assert status < 500, (path, answer)
        others.append(answer)
    status, answer = await api.call(
        "POST",
        "/api/usage/batch",
        data=ndjson(
            [
                {"event_id": str(uuid.uuid4()), "virtual_key": s, **record}
                for s in (first, second)
            ]
        ),
        content_type="application/x-ndjson",
        headers=recorder,
    )
    others.append(answer)
    async with api.socket(headers=recorder) as ws:
        records = [
            {"event_id": str(uuid.uuid4()), "virtual_key": s, **record}
            for s in (first, second)
        ]
        await ws.send_str(json.dumps({"seq": 1, "records": records}))
        others.append(await ws.receive_json(timeout=15))

    # The answers: only create and rotate show a secret, each its own.
    assert all(SECRET.search(json.dumps(a)) for a in may_show)
    assert [a for a in others if SECRET.search(json.dumps(a))] == []
    # Every table, every row, as text.
    tables = await pool.fetch(
        "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables"
        " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
    )
    assert len(tables) >= 10
    leaks, digests = [], 0
    digest = hashlib.sha256(second.encode()).hexdigest()
    for table in tables:
        rows = await pool.fetch(f"SELECT t::text AS row FROM {table['name']} t")
        leaks += [(table["name"], r["row"]) for r in rows if SECRET.search(r["row"])]
        digests += sum(digest in r["row"] for r in rows)
    assert leaks == []
    assert digests >= 2  # the scan sees the key's rows: its digest, in event and table
    # The service's own log lines: no secret and no bearer token.
    served.stop()
    log = served.log_text()
    assert "request_finished" in log
    assert SECRET.findall(log) == []
    assert [t for t in TOKENS.values() if t in log] == []


# --- SQL is built from parameters --------------------------------------------------

# SQL text: it starts with a statement's verb, or names two SQL keywords (a
# fragment such as "(SELECT ... FROM ...)"); prose that mentions COPY is not SQL.
SQL_VERB = re.compile(
    r"\s*\(?\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|TRUNCATE|COPY|LOCK"
    r"|COMMENT|GRANT|REVOKE|WITH)\b"
)
SQL_WORD = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|TRUNCATE|COPY|FROM|WHERE"
    r"|VALUES|JOIN|SET|INTO|TABLE|SCHEMA)\b"
)


def is_sql(text: str) -> bool:
    return bool(SQL_VERB.match(text)) or len(set(SQL_WORD.findall(text))) >= 2


# Quoting functions: an identifier or a literal through them cannot break out.
QUOTING = frozenset({"_ident", "_literal"})
# (file, interpolated expression) → why it is no request data. Anything new that
# interpolates into SQL text must be reviewed and listed here.
ALLOWED: dict[tuple[str, str], str] = {
    ("service/eventstore.py", "_LEGACY"): "a constant list of legacy types",
    ("service/eventstore.py", "_COLUMNS"): "a column-list constant",
    ("service/pgcluster.py", "database"): "matched against _NAME first",
    ("projections/governance_limits.py", "_UPSERT_BUDGETS"): "a statement constant",
    ("projections/governance.py", "INSERT_BUDGETS"): "governance_limits' constant",
    ("projections/governance_readings.py", "_READING_AFTER_TWO"): "a constant",
    ("projections/governance_readings.py", "STORED_LEDGERS"): "a constant",
    ("tools/bench/ingest.py", "RAW_TABLE"): "a table-name constant",
    ("tools/bench/lag.py", "ingest_bench.RAW_TABLE"): "the same constant",
    ("tools/bench/runner.py", "names"): "format('%I.%I') of pg_tables: quoted",
    # replay and its shadow schemas: schema names made of a known projection's
    # name and digits; table, column and constraint names from the catalog, quoted.
    ("projections/replay.py", "schema"): "audit_ + projection + digits",
    ("projections/replay.py", "shadow"): "replay_ + a known projection name",
    ("projections/replay.py", "retired"): "replay_retired_ + a projection name",
    ("projections/replay.py", "qualified"): "public. + _ident(table), joined",
    ("projections/shadow.py", "schema"): "as in replay.py",
    ("projections/shadow.py", "natural"): "_literal/_ident of catalog names",
    ("projections/shadow.py", "expression.format(schema=schema)"): "the same",
    ("projections/shadow.py", "side[one]"): "a SELECT built as above",
    ("projections/shadow.py", "side[other]"): "a SELECT built as above",
    ("projections/shadow.py", "c['definition']"): "pg_get_constraintdef output",
    ("projections/shadow.py", "_with(options.get(table))"): "a WITH clause as below",
    (
        "projections/shadow.py",
        "', '.join(quoted)",
    ): "reloptions through _ident/_literal",
}


def sql_interpolations() -> Iterator[tuple[str, int, str]]:
    """(file, line, expression) of every value formatted into SQL-looking text:
    f-strings, str.format, % and + with a string constant."""
    for path in sorted(
        [
            *ROOT.glob("service/**/*.py"),
            *ROOT.glob("projections/**/*.py"),
            *ROOT.glob("tools/**/*.py"),
        ]
    ):
        name = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), name)):
            text, values = "", []
            if isinstance(node, ast.JoinedStr):
                text = "".join(
                    str(v.value) for v in node.values if isinstance(v, ast.Constant)
                )
                values = [
                    v.value for v in node.values if isinstance(v, ast.FormattedValue)
                ]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "format"
                and isinstance(node.func.value, ast.Constant)
            ):
                text = str(node.func.value.value)
                values = [*node.args, *(k.value for k in node.keywords)]
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
                for side, other in ((node.left, node.right), (node.right, node.left)):
                    if isinstance(side, ast.Constant) and not isinstance(
                        other, ast.Constant
                    ):
                        text, values = str(side.value), [other]
            if not is_sql(text):
                continue
            for value in values:
                quoted = (
                    isinstance(value, ast.Call)
                    and isinstance(value.func, ast.Name)
                    and value.func.id in QUOTING
                )
                if not quoted:
                    yield name, getattr(node, "lineno", 0), ast.unparse(value)


def test_sql_text_interpolates_only_reviewed_constants_and_quoted_names():
    found = list(sql_interpolations())
    assert found, "the scanner found nothing: it no longer sees the code"
    # A new entry here: check that the value cannot come from a request, then add
    # (file, expression) to ALLOWED with the reason; code that moved: move its entry.
    assert [
        (name, line, expr) for name, line, expr in found if (name, expr) not in ALLOWED
    ] == []
    # The list stays narrow: an entry nothing needs any more goes.
    assert set(ALLOWED) - {(name, expr) for name, _, expr in found} == set()


def test_the_quoting_functions_double_what_would_end_the_quote():
    from projections.shadow import _ident, _literal
    from service.eventstore import _literal as store_literal

    assert _ident('a"; DROP TABLE events; --') == '"a""; DROP TABLE events; --"'
    assert _literal("x'; DELETE FROM events; --") == "'x''; DELETE FROM events; --'"
    assert store_literal("it's") == "'it''s'"


# --- the service refuses to run open off loopback ---------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_serve_refuses_to_run_without_tokens_on_a_non_loopback_address(host):
    done = govledger(
        "serve",
        GOVLEDGER_HOST=host,
        DATABASE_URL="postgresql://nobody@/nowhere?host=/nonexistent",
    )

    assert done.returncode == 2
    assert said(done.stderr) == [
        f"govledger: refusing to serve on {host} without tokens: set"
        " GOVLEDGER_ADMIN_TOKENS (and recorder/reader tokens) or bind to 127.0.0.1"
    ]


# --- append-only ------------------------------------------------------------------


async def test_the_event_log_refuses_update_and_delete_to_an_application_role(pool):
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, type, data)"
            " VALUES ($1, 'team-x', 1, 'TeamCreated', '{}')",
            uuid.uuid4(),
        )
        # Roles are cluster-wide: create, grant and use inside one transaction that
        # rolls back, so the role never outlives the test.
        tx = conn.transaction()
        await tx.start()
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = 'govledger_app'"
            )
            if not exists:
                await conn.execute("CREATE ROLE govledger_app NOLOGIN")
            await conn.execute("GRANT SELECT, INSERT ON events TO govledger_app")
            await conn.execute("SET LOCAL ROLE govledger_app")
            assert await conn.fetchval("SELECT count(*) FROM events") == 1
            for statement in (
                "UPDATE events SET type = 'Forged'",
                "DELETE FROM events",
                "TRUNCATE events",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    async with conn.transaction():
                        await conn.execute(statement)
            # Even granted UPDATE and DELETE, the trigger refuses them.
            await conn.execute("RESET ROLE")
            await conn.execute("GRANT UPDATE, DELETE ON events TO govledger_app")
            await conn.execute("SET LOCAL ROLE govledger_app")
            for statement, operation in (
                ("UPDATE events SET type = 'Forged'", "UPDATE"),
                ("DELETE FROM events", "DELETE"),
            ):
                with pytest.raises(asyncpg.PostgresError) as refused:
                    async with conn.transaction():
                        await conn.execute(statement)
                assert (refused.value.sqlstate, str(refused.value)) == (
                    "GL003",
                    f"events is append-only: {operation} refused",
                )
            assert await conn.fetchval("SELECT type FROM events") == "TeamCreated"
        finally:
            await tx.rollback()
