"""The recorder client against real `govledger serve` processes on the test database:
killed and restarted mid-stream, behind a proxy that refuses the WebSocket upgrade or
loses answers, with rejected records, bad tokens and a slow check endpoint."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from govledger_client import (
    Checker,
    CheckRequest,
    CheckResult,
    Recorder,
    RecorderError,
    RejectedRecord,
    UsageRecord,
)

ADMIN = "adm-client-test"
RECORDER = "rec-client-test"
COST = Decimal("0.001")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`govledger serve` as a subprocess on a fixed port, so a restart keeps the URL."""

    def __init__(self, dsn: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GOVLEDGER_")},
            "DATABASE_URL": dsn,
            "GOVLEDGER_HOST": "127.0.0.1",
            "GOVLEDGER_PORT": str(self.port),
            "GOVLEDGER_ADMIN_TOKENS": ADMIN,
            "GOVLEDGER_RECORDER_TOKENS": RECORDER,
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service",
                "serve",
                env=self.env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise RuntimeError(f"serve exited:\n{self.log_path.read_text()}")
                try:
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)  # start-up poll, bounded by the deadline
        raise RuntimeError(f"serve was not ready in 30 s:\n{self.log_path.read_text()}")

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to any connection."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(15):
                    await self.process.wait()
            except TimeoutError:
                await self.kill()


@pytest.fixture
async def server(database, tmp_path) -> AsyncIterator[Server]:
    """A started server; tests may kill and start it again."""
    server = Server(database, tmp_path / "serve.log")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Key(msgspec.Struct, frozen=True):
    id: str
    value: str


async def create_key(url: str, **fields: Any) -> Key:
    """A virtual key (with `fields`, e.g. budgets, in its create body), in the read
    model and in the server's enforcement cache."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(headers=admin) as session:
        async with session.post(
            f"{url}/api/governance/virtual-keys", json={"name": "gateway", **fields}
        ) as response:
            assert response.status == 201, await response.text()
            created = await response.json()
        key = Key(created["virtual_key"]["id"], created["virtual_key"]["value"])
        position = created["position"]
        async with session.get(
            f"{url}/api/governance/virtual-keys/{key.id}",
            params={"min_position": position},
        ) as response:
            assert response.status == 200
        async with session.post(
            f"{url}/api/governance/check",
            json={"virtual_key_id": key.id, "min_position": position},
        ) as response:
            assert (await response.json())["allowed"] is True
    return key


async def record(recorder: Recorder, key: Key, **fields: Any) -> str:
    return await recorder.record(
        **{
            "virtual_key": key.value,
            "provider": "openai",
            "model": "gpt-4o",
            "cost": COST,
            "input_tokens": 10,
            "output_tokens": 2,
            **fields,
        }
    )


async def stored(pool) -> list[str]:
    """The event_ids of every UsageRecorded row, sorted."""
    rows = await pool.fetch(
        "SELECT event_id::text AS id FROM events WHERE type = 'UsageRecorded'"
    )
    return sorted(row["id"] for row in rows)


async def stored_cost(pool) -> Decimal:
    total = await pool.fetchval(
        "SELECT coalesce(sum((data->>'cost')::numeric), 0) FROM events"
        " WHERE type = 'UsageRecorded'"
    )
    return Decimal(total)


# --- exactly once across kills -------------------------------------------------------


async def test_a_server_killed_and_restarted_mid_stream_loses_and_doubles_nothing(
    server, pool
):
    key = await create_key(server.url)
    ids: list[str] = []
    halfway = asyncio.Event()

    async def produce(count: int) -> None:
        for n in range(count):
            ids.append(await record(recorder, key))
            if n == count // 2:
                halfway.set()

    async with Recorder(
        server.url, token=RECORDER, max_buffer=1000, max_backoff=0.5
    ) as recorder:
        await produce(3000)  # the buffer holds 1000: most are acknowledged by now
        await server.kill()  # with up to 1000 records unacknowledged
        producer = asyncio.create_task(produce(4000))
        await server.start()
        await halfway.wait()
        await server.kill()  # again, while the producer streams
        await server.start()
        await producer
        async with asyncio.timeout(30):
            await recorder.flush()
        stats = recorder.stats

    assert len(ids) == 7000
    assert await stored(pool) == sorted(ids)
    assert await stored_cost(pool) == 7000 * COST
    assert (stats.acked, stats.accepted + stats.duplicates, stats.buffered) == (
        7000,
        7000,
        0,
    )
    assert stats.rejected == {}
    assert stats.failures >= 2, stats
    assert stats.transport == "websocket"


async def test_record_waits_while_the_buffer_is_full_and_resumes_once_the_server_is_up(
    server, pool
):
    key = await create_key(server.url)
    await server.kill()
    async with Recorder(
        server.url, token=RECORDER, batch_size=10, max_buffer=50, max_backoff=0.2
    ) as recorder:
        ids = [await record(recorder, key) for _ in range(50)]
        blocked = asyncio.create_task(record(recorder, key))
        done, _ = await asyncio.wait({blocked}, timeout=0.3)
        assert not done  # the 51st waits: nothing is dropped to make room
        assert recorder.stats.buffered == 50

        await server.start()
        ids.append(await blocked)
        await recorder.flush()
        stats = recorder.stats

    assert await stored(pool) == sorted(ids)
    assert (stats.accepted, stats.buffered, stats.rejected) == (51, 0, {})
    assert stats.failures >= 1


# --- fallback and retries through a proxy --------------------------------------------

HOP_BY_HOP = frozenset(
    {
        "connection",
        "upgrade",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "host",
        "content-length",
    }
)


class Proxy:
    """A plain HTTP/1.1 reverse proxy in front of the service. It drops hop-by-hop
    headers, so a WebSocket upgrade reaches the service as a plain GET; it can also
    lose the answers to the first `lose` POSTs after forwarding them (a 502, or a
    stall longer than the client waits)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[str] = []
        self.lose = 0
        self.fault = "502"
        self.released = asyncio.Event()
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{path:.*}", self.forward)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def forward(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path}")
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
        }
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                self.upstream + str(request.rel_url),
                headers=headers,
                data=await request.read(),
            ) as answer,
        ):
            body = await answer.read()
            status = answer.status
            content_type = answer.headers.get("Content-Type", "text/plain")
        if request.method == "POST" and self.lose:
            self.lose -= 1
            if self.fault == "stall":
                # Outlasts the client's ack_timeout; released at teardown.
                await self.released.wait()
            return web.Response(status=502, text="bad gateway")
        return web.Response(
            status=status, body=body, headers={"Content-Type": content_type}
        )


@pytest.fixture
async def proxy(server) -> AsyncIterator[Proxy]:
    proxy = Proxy(server.url)
    await proxy.server.start_server()
    try:
        yield proxy
    finally:
        proxy.released.set()
        await proxy.server.close()


async def test_a_proxy_that_refuses_the_upgrade_makes_the_recorder_post_batches(
    server, proxy, pool
):
    key = await create_key(server.url)
    async with Recorder(proxy.url, token=RECORDER, batch_size=100) as recorder:
        ids = [await record(recorder, key) for _ in range(1200)]
        await recorder.flush()
        stats = recorder.stats

    assert await stored(pool) == sorted(ids)
    assert (stats.transport, stats.accepted, stats.duplicates, stats.failures) == (
        "batch",
        1200,
        0,
        0,
    )
    assert proxy.requests[0] == "GET /api/usage/stream"
    assert proxy.requests[1:] == ["POST /api/usage/batch"] * 12


@pytest.mark.parametrize("fault", ["502", "stall"])
async def test_an_answer_lost_after_commit_is_retried_with_the_same_event_ids(
    server, proxy, pool, fault
):
    key = await create_key(server.url)
    proxy.lose, proxy.fault = 1, fault
    async with Recorder(
        proxy.url,
        token=RECORDER,
        use_websocket=False,
        batch_size=100,
        max_in_flight=1,
        ack_timeout=0.5,
    ) as recorder:
        ids = [await record(recorder, key) for _ in range(300)]
        await recorder.flush()
        stats = recorder.stats

    assert await stored(pool) == sorted(ids)
    assert await stored_cost(pool) == 300 * COST
    # The first batch was stored, its answer lost, and sent again: duplicates.
    assert (stats.accepted, stats.duplicates, stats.retries, stats.failures) == (
        200,
        100,
        100,
        1,
    )
    assert proxy.requests == ["POST /api/usage/batch"] * 4


# --- rejections, tokens, checks ------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "batch"])
async def test_rejected_records_are_reported_with_their_codes_and_not_retried(
    server, pool, transport
):
    key = await create_key(server.url)
    reported: list[RejectedRecord] = []
    callback = reported.append if transport == "websocket" else None
    async with Recorder(
        server.url,
        token=RECORDER,
        use_websocket=transport == "websocket",
        on_rejected=callback,
    ) as recorder:
        good = await record(recorder, key)
        unknown = await record(recorder, key, virtual_key="sk-gl-" + "x" * 32)
        future = await record(
            recorder, key, occurred_at=datetime.now(UTC) + timedelta(hours=1)
        )
        negative = await record(recorder, key, cost=Decimal("-1"))
        incomplete = await recorder.record_raw({"provider": "openai"})
        await recorder.flush()
        stats = recorder.stats
    if callback is None:
        reported = recorder.rejections

    assert sorted((r.event_id, r.code) for r in reported) == sorted(
        [
            (unknown, "unknown_virtual_key"),
            (future, "occurred_at_out_of_range"),
            (negative, "negative_cost"),
            (incomplete, "invalid_record"),
        ]
    )
    assert all(
        msgspec.json.decode(r.record)["event_id"] == r.event_id for r in reported
    )
    assert stats.rejected == {
        "unknown_virtual_key": 1,
        "occurred_at_out_of_range": 1,
        "negative_cost": 1,
        "invalid_record": 1,
    }
    assert (stats.accepted, stats.retries, stats.failures, stats.transport) == (
        1,
        0,
        0,
        transport,
    )
    assert await stored(pool) == [good]


async def test_a_blocked_answer_explains_what_blocks_it_with_what_is_held(server):
    key = await create_key(
        server.url,
        budgets=[{"max_limit": "1", "reset_duration": "1d"}],
        rate_limit={"token_max_limit": 50, "token_reset_duration": "1h"},
    )
    async with Recorder(server.url, token=RECORDER) as recorder:
        held = await recorder.check(
            virtual_key=key.value, estimated_cost="0.75", reserve=True, within=5
        )
        over_budget = await recorder.check(
            virtual_key=key.value, estimated_cost="0.5", min_position=held.position
        )
        tokens = await recorder.check(
            virtual_key=key.value,
            estimated_cost="0",
            estimated_tokens=50,
            reserve=True,
            within=5,
        )
        rate_limited = await recorder.check(
            virtual_key=key.value, min_position=tokens.position
        )

    assert (held.allowed, tokens.allowed) == (True, True)
    assert over_budget.explanation == (
        f"govledger: budget exceeded (budget {over_budget.budget_id} of virtual_key"
        f" {key.id}: 0, 0.75 held of 1)"
    )
    assert rate_limited.explanation == (
        "govledger: rate limited (tokens: 0, 50 held of 50)"
    )
    unheld = msgspec.structs.replace(rate_limited, held=None)
    assert unheld.explanation == "govledger: rate limited (tokens: 0 of 50)"


NOT_A_SERVICE_URL = (
    "the service URL must be http:// or https:// with a host and at most a path"
)


@pytest.mark.parametrize(
    "url",
    [
        "notaurl",
        "127.0.0.1:8080",
        "ftp://gov",
        "http://",
        "http://gov:port",
        "http://gov?x=1",
    ],
)
def test_a_service_url_no_request_could_reach_is_refused_at_once(url):
    for client in (Recorder, Checker):
        with pytest.raises(ValueError, match=r"^the service URL must be") as refused:
            client(url)
        assert str(refused.value) == NOT_A_SERVICE_URL


def test_a_service_url_keeps_its_path_without_the_trailing_slash():
    assert [
        Recorder(url).url
        for url in ("http://127.0.0.1:8080/", "https://gw.example/govledger/")
    ] == ["http://127.0.0.1:8080", "https://gw.example/govledger"]


async def test_the_record_command_refuses_a_url_that_is_none_without_retrying(
    tmp_path,
):
    path = tmp_path / "usage.ndjson"
    path.write_bytes(b'{"virtual_key": "sk-gl-x", "provider": "o", "model": "m"}\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "record",
        str(path),
        "--url",
        "user:secret@gov",
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)

    assert process.returncode == 2
    assert err.decode().splitlines() == [f"govledger record: {NOT_A_SERVICE_URL}"]


async def test_a_token_is_sent_as_bearer_and_a_wrong_one_rejects_records_and_checks(
    server, pool
):
    key = await create_key(server.url)
    async with Recorder(server.url, token=RECORDER) as recorder:
        allowed = await recorder.check(
            virtual_key=key.value,
            provider="openai",
            model="gpt-4o",
            estimated_cost="0.01",
            within=5,
        )
        unknown = await recorder.check(virtual_key="sk-gl-nope", within=5)

    async with Recorder(server.url, token="wrong") as intruder:
        ids = [await record(intruder, key) for _ in range(3)]
        await intruder.flush()
        with pytest.raises(RecorderError) as refused:
            await intruder.check(virtual_key=key.value, within=5)
        stats = intruder.stats

    assert msgspec.structs.replace(allowed, position=None) == CheckResult(
        allowed=True, reason="ok", http_status=200
    )
    assert msgspec.structs.replace(unknown, position=None) == CheckResult(
        allowed=False, reason="unknown_virtual_key", http_status=401
    )
    assert sorted(r.event_id for r in intruder.rejections) == sorted(ids)
    assert (stats.rejected, stats.accepted, stats.transport) == (
        {"unauthorized": 3},
        0,
        "batch",  # the upgrade was refused with 401; the batch too
    )
    assert (refused.value.code, refused.value.status) == ("unauthorized", 401)
    assert await stored(pool) == []


@pytest.fixture
async def slow_check() -> AsyncIterator[str]:
    """A real HTTP server whose check answers only at teardown."""
    released = asyncio.Event()

    async def check(request: web.Request) -> web.Response:
        await released.wait()
        return web.json_response({"allowed": True, "reason": "ok", "http_status": 200})

    app = web.Application()
    app.router.add_post("/api/governance/check", check)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        released.set()
        await server.close()


@pytest.mark.parametrize(
    ("fail_open", "expected"),
    [
        (
            True,
            CheckResult(allowed=True, reason="timeout", http_status=200, fallback=True),
        ),
        (
            False,
            CheckResult(
                allowed=False, reason="timeout", http_status=503, fallback=True
            ),
        ),
    ],
)
async def test_a_check_past_its_timeout_follows_the_fail_open_or_closed_policy(
    slow_check, fail_open, expected
):
    async with Recorder(slow_check, check_timeout=0.05, fail_open=fail_open) as rec:
        started = time.monotonic()
        result = await rec.check(virtual_key="sk-gl-any", estimated_cost=1)
        elapsed = time.monotonic() - started
        assert rec.stats.check_fallbacks == 1

    assert result == expected
    assert 0.05 <= elapsed < 0.5


async def test_a_check_against_no_server_follows_the_policy_too():
    async with Recorder(f"http://127.0.0.1:{free_port()}", fail_open=False) as rec:
        result = await rec.check(virtual_key="sk-gl-any")

    assert result == CheckResult(
        allowed=False, reason="unavailable", http_status=503, fallback=True
    )


# --- govledger record ----------------------------------------------------------------

SUMMARY = re.compile(
    r"record: (\d+) records, (\d+) accepted, (\d+) duplicates, (\d+) rejected"
    r" in [\d.]+ s \(\d+ records/s\)"
)


def summary_counts(line: str) -> tuple[str, ...]:
    """(records, accepted, duplicates, rejected) of a summary line."""
    match = SUMMARY.fullmatch(line)
    assert match, line
    return match.groups()


async def govledger_record(
    server: Server, *args: str, stdin: bytes | None = None
) -> tuple[int, list[Any], str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "record",
        *args,
        "--url",
        server.url,
        env={**server.env, "GOVLEDGER_TOKEN": RECORDER},
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(stdin)
    assert process.returncode is not None
    lines = [msgspec.json.decode(line) for line in out.splitlines()]
    return process.returncode, lines, err.decode().splitlines()[-1]


def records_of_key(key: Key, count: int) -> list[dict[str, Any]]:
    """`count` usage records of the key for a file, each with a fresh event id
    and costing one nano; the n-th has n input tokens."""
    return [
        {
            "event_id": str(uuid.uuid4()),
            "virtual_key": key.value,
            "provider": "openai",
            "model": "gpt-4o",
            "cost": "0.000000001",
            "input_tokens": n,
        }
        for n in range(count)
    ]


async def test_the_record_command_sends_a_file_or_stdin_and_ends_with_a_summary(
    server, pool, tmp_path
):
    key = await create_key(server.url)
    good = records_of_key(key, 20)
    unknown = {**good[0], "event_id": str(uuid.uuid4()), "virtual_key": "sk-gl-nope"}
    lines = [msgspec.json.encode(r) for r in good] + [
        b"",
        b"not json",
        msgspec.json.encode(unknown),
    ]
    path = tmp_path / "usage.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")

    first = await govledger_record(server, str(path), "--token", RECORDER)
    again = await govledger_record(server, "-", stdin=path.read_bytes())

    rejections = [
        {"line": 22, "code": "invalid_record"},
        {"event_id": unknown["event_id"], "code": "unknown_virtual_key"},
    ]
    for status, out, _ in (first, again):
        assert status == 1
        assert [{k: v for k, v in r.items() if k != "message"} for r in out] == (
            rejections
        )
    assert [summary_counts(first[2]), summary_counts(again[2])] == [
        ("22", "20", "0", "2"),
        ("22", "0", "20", "2"),
    ]
    assert await stored(pool) == sorted(str(r["event_id"]) for r in good)
    assert await stored_cost(pool) == Decimal("0.000000020")


async def test_the_record_command_takes_a_file_with_a_byte_order_mark_and_crlf(
    server, pool, tmp_path
):
    key = await create_key(server.url)
    records = records_of_key(key, 3)
    path = tmp_path / "usage.ndjson"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + b"\r\n".join(msgspec.json.encode(r) for r in records)
        + b"\r\n"
    )

    status, rejected, summary = await govledger_record(server, str(path))

    assert (status, rejected) == (0, [])
    assert summary_counts(summary) == ("3", "3", "0", "0")
    assert await stored(pool) == sorted(r["event_id"] for r in records)


async def test_the_record_command_refuses_a_line_past_1_mib_and_goes_on(
    server, pool, tmp_path
):
    key = await create_key(server.url)
    [good] = records_of_key(key, 1)
    path = tmp_path / "usage.ndjson"
    path.write_bytes(b"x" * (3 << 20) + b"\n" + msgspec.json.encode(good) + b"\n")

    status, rejected, summary = await govledger_record(server, str(path))

    assert status == 1
    assert rejected == [
        {
            "line": 1,
            "code": "invalid_record",
            "message": "line 1 is not a usage record: a line takes at most 1048576"
            " bytes",
        }
    ]
    assert summary_counts(summary) == ("2", "1", "0", "1")
    assert await stored(pool) == [good["event_id"]]


# --- the client's structs against the server's contract ------------------------------
#
# The client is a separate distribution that imports nothing of the server, so its
# wire structs are checked against what the server publishes (GET /api/openapi.json)
# and, for the check answer, against what real answers hold: the document may lag the
# server (it lacks `stale`, sent while the server cannot read its log).

# CheckResult fields the client fills in itself; no server sends them.
CLIENT_ONLY = frozenset({"fallback"})
# JSON value kinds; a JSON number is an "integer" or a "fraction".
KINDS = frozenset(
    {"string", "integer", "fraction", "boolean", "array", "object", "null"}
)
_OF_TYPE = {
    "string": {"string"},
    "integer": {"integer"},
    "number": {"integer", "fraction"},
    "boolean": {"boolean"},
    "array": {"array"},
    "object": {"object"},
    "null": {"null"},
}


def value_kinds(value: Any) -> frozenset[str]:
    """The kind of a decoded JSON value (fractions decoded as Decimal)."""
    if isinstance(value, bool):
        return frozenset({"boolean"})
    if isinstance(value, int):
        return frozenset({"integer"})
    if isinstance(value, float | Decimal):
        return frozenset({"fraction"})
    if isinstance(value, str):
        return frozenset({"string"})
    if isinstance(value, list):
        return frozenset({"array"})
    if isinstance(value, dict):
        return frozenset({"object"})
    assert value is None, value
    return frozenset({"null"})


def schema_kinds(schema: dict[str, Any], components: dict[str, Any]) -> frozenset[str]:
    """The kinds of JSON value a schema of the document admits."""
    if "$ref" in schema:
        return schema_kinds(resolve(schema, components), components)
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            return frozenset().union(
                *(schema_kinds(s, components) for s in schema[combinator])
            )
    if "enum" in schema:
        return frozenset().union(*(value_kinds(v) for v in schema["enum"]))
    if "const" in schema:
        return value_kinds(schema["const"])
    declared = schema.get("type")
    if declared is None:
        return KINDS
    names = [declared] if isinstance(declared, str) else declared
    return frozenset().union(*(_OF_TYPE[name] for name in names))


def client_kinds(t: msgspec.inspect.Type, *, sending: bool) -> frozenset[str]:
    """The kinds of JSON value a client field writes (`sending`) or reads."""
    inspect = msgspec.inspect
    if isinstance(t, inspect.UnionType):
        return frozenset().union(*(client_kinds(m, sending=sending) for m in t.types))
    if isinstance(t, inspect.LiteralType):
        return frozenset().union(*(value_kinds(v) for v in t.values))
    if isinstance(t, inspect.DecimalType):
        # Written as a number (decimal_format="number"); read from a number or string.
        return frozenset({"integer", "fraction"} | (set() if sending else {"string"}))
    kinds: list[tuple[tuple[type, ...], set[str]]] = [
        ((inspect.NoneType,), {"null"}),
        ((inspect.BoolType,), {"boolean"}),
        ((inspect.IntType,), {"integer"}),
        ((inspect.FloatType,), {"integer", "fraction"}),
        (
            (inspect.StrType, inspect.DateTimeType, inspect.DateType, inspect.UUIDType),
            {"string"},
        ),
        (
            (
                inspect.ListType,
                inspect.TupleType,
                inspect.VarTupleType,
                inspect.SetType,
                inspect.FrozenSetType,
            ),
            {"array"},
        ),
        ((inspect.DictType, inspect.StructType, inspect.TypedDictType), {"object"}),
        ((inspect.AnyType,), set(KINDS)),
    ]
    for types, names in kinds:
        if isinstance(t, types):
            return frozenset(names)
    raise AssertionError(f"no JSON kind for the client type {t!r}")


def fields_of(struct: type[msgspec.Struct]) -> dict[str, msgspec.inspect.Field]:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.encode_name: f for f in info.fields}


def resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        prefix = "#/components/schemas/"
        assert schema["$ref"].startswith(prefix), schema
        schema = components[schema["$ref"].removeprefix(prefix)]
    return schema


def json_schema(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """The object schema of a request body or an answer of the document."""
    schema = resolve(
        node["content"]["application/json"]["schema"],
        document["components"]["schemas"],
    )
    assert schema["type"] == "object", schema
    return schema


_decode_exact = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal).decode


async def real_check_answers(server: Server, pool) -> list[dict[str, Any]]:
    """The answers of real checks: allowed with `remaining`, blocked by a budget,
    blocked by a rate limit, and answered while the server cannot read its log."""
    budgeted = await create_key(
        server.url, budgets=[{"max_limit": "1", "reset_duration": "1d"}]
    )
    limited = await create_key(
        server.url,
        rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"},
    )
    async with Recorder(server.url, token=RECORDER) as recorder:
        await record(recorder, limited)
        await recorder.flush()
        position = recorder.stats.position
    bodies: list[dict[str, Any]] = [
        {"virtual_key_id": budgeted.id, "estimated_cost": "0.5"},
        {"virtual_key_id": budgeted.id, "estimated_cost": "2"},
        {"virtual_key_id": limited.id, "min_position": position},
    ]
    answers: list[dict[str, Any]] = []
    bearer = {"Authorization": f"Bearer {RECORDER}"}
    async with aiohttp.ClientSession(headers=bearer) as session:

        async def check(body: dict[str, Any]) -> dict[str, Any]:
            async with session.post(
                f"{server.url}/api/governance/check", json=body
            ) as response:
                assert response.status == 200, await response.text()
                raw = await response.read()
            answer = _decode_exact(raw)
            # Whatever the server sends, the client reads, each field as sent.
            result = msgspec.json.decode(raw, type=CheckResult)
            assert {k: getattr(result, k, "missing") for k in answer} == answer
            return answer

        answers.extend([await check(body) for body in bodies])
        # An event no code version knows stops the server's projectors where it
        # lies: checks go on from the cache, marked stale (the table is emptied
        # after the test).
        await pool.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, type, data)"
            " VALUES ($1, $2, 1, 'ContractTestUnknownEvent', '{}')",
            uuid.uuid4(),
            f"contract-test-{uuid.uuid4()}",
        )
        for _ in range(600):  # 30 s at most: until the projector has failed once
            stale = await check(bodies[0])
            if "stale" in stale:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no stale answer in 30 s: {stale}")
        answers.append(stale)

    assert [(a["reason"], a.get("rate_limit"), a.get("stale")) for a in answers] == [
        ("ok", None, None),
        ("budget_exceeded", None, None),
        ("rate_limited", "requests", None),
        ("ok", None, True),
    ], answers
    assert "remaining" in answers[0]
    return answers


async def test_the_client_structs_match_the_openapi_document_and_real_answers(
    server, pool
):
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/api/openapi.json") as response,
    ):
        assert response.status == 200
        document = await response.json()
    components = document["components"]["schemas"]
    check = document["paths"]["/api/governance/check"]["post"]
    usage = document["paths"]["/api/usage"]["post"]
    mismatches: list[str] = []

    # What the server answers: documented, and seen in real answers.
    answer = json_schema(document, check["responses"]["200"])
    served = {
        name: schema_kinds(schema, components)
        for name, schema in answer["properties"].items()
    }
    for real in await real_check_answers(server, pool):
        for name, value in real.items():
            served[name] = served.get(name, frozenset()) | value_kinds(value)
    fields = fields_of(CheckResult)
    for name, kinds in sorted(served.items()):
        if name not in fields:
            mismatches.append(f"CheckResult lacks {name!r} ({sorted(kinds)})")
        elif not kinds <= (read := client_kinds(fields[name].type, sending=False)):
            mismatches.append(
                f"CheckResult.{name} reads {sorted(read)}, gets {sorted(kinds)}"
            )
    for name in sorted(fields.keys() - served.keys() - CLIENT_ONLY):
        mismatches.append(f"CheckResult.{name} is never sent")
    for name, field in fields.items():
        if field.required and name not in answer.get("required", ()):
            mismatches.append(f"CheckResult.{name} is required but may be absent")

    # What the client sends: the server refuses unknown fields (and says so).
    for struct, node in ((UsageRecord, usage), (CheckRequest, check)):
        body = json_schema(document, node["requestBody"])
        assert body.get("additionalProperties") is False, body
        fields = fields_of(struct)
        properties = body["properties"]
        for name in sorted(properties.keys() - fields.keys()):
            mismatches.append(f"{struct.__name__} lacks {name!r}")
        for name, field in sorted(fields.items()):
            if name not in properties:
                mismatches.append(f"{struct.__name__}.{name} is refused as unknown")
                continue
            sent = client_kinds(field.type, sending=True)
            taken = schema_kinds(properties[name], components)
            if not sent <= taken:
                mismatches.append(f"{struct.__name__}.{name} sends {sorted(sent)}")
        for name in body.get("required", ()):
            if name in fields and not fields[name].required:
                mismatches.append(f"{struct.__name__}.{name} may be left out")

    assert mismatches == []
