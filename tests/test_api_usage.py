"""Usage ingest and /metrics through a real aiohttp server and PostgreSQL (API.md)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from aiohttp import WSMsgType, WSServerHandshakeError

from service import eventstore
from service.config import Settings
from service.domain.events import UsageRecorded
from service.records import RecordedEvent
from service.web.app import create_app
from service.web.keys import resolver_key, writer_key
from tests.api import JSON, NDJSON, Api, bearer, serve, serving
from tests.builders import (
    CONFIG_ID,
    CUSTOMER_ID,
    KEY_ID,
    SECRET,
    SOLO_KEY_ID,
    TEAM_ID,
    governance,
)
from tests.test_ingest import blocked_on_lock, events_locked, until

TOKENS: dict[str, Any] = {
    "admin_tokens": frozenset({"adm-secret"}),
    "recorder_tokens": frozenset({"rec-secret"}),
    "reader_tokens": frozenset({"read-secret"}),
}


@asynccontextmanager
async def resolved(
    database: str, pool, settings: Settings | None = None
) -> AsyncIterator[Api]:
    """The service with its usage resolver folded from `governance(pool)`."""
    app = create_app(settings or Settings(), database)
    app[resolver_key] = await governance(pool)
    async with serving(app) as api:
        yield api


@pytest.fixture
async def api(database, pool) -> AsyncIterator[Api]:
    async with resolved(database, pool) as api:
        yield api


def record(**fields: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "virtual_key": SECRET,
        "provider": "openai",
        "model": "gpt-4o",
        "cost": 0.0123,
        "input_tokens": 100,
        "output_tokens": 20,
        "requests": 1,
        "occurred_at": "2026-11-28T10:00:00Z",
        **fields,
    }


def ndjson(*records: dict[str, Any] | bytes) -> bytes:
    return b"\n".join(
        r if isinstance(r, bytes) else msgspec.json.encode(r) for r in records
    )


async def usage_rows(pool) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT event_id::text, global_position, tx_id::text, data, metadata"
            " FROM events WHERE type = 'UsageRecorded' ORDER BY global_position"
        )
    )


async def usage_events(pool) -> list[RecordedEvent]:
    """Every stored usage event, in position order (committed ones, without waiting
    for older transactions elsewhere to finish, unlike the tailing reads)."""
    streams = await pool.fetch(
        "SELECT DISTINCT stream_id FROM events WHERE type = 'UsageRecorded'"
    )
    events = [e for s in streams for e in (await eventstore.read_stream(pool, s[0]))[1]]
    return sorted(events, key=lambda e: e.global_position)


# --- POST /api/usage ----------------------------------------------------------------


async def test_a_record_is_accepted_after_commit_and_charged_to_its_chain(api, pool):
    body = record(cost="0.000000001")

    response = await api.request("POST", "/api/usage", body)

    assert response.status == 202
    [stored] = await usage_events(pool)
    assert await response.json() == {
        "position": stored.global_position,
        "duplicate": False,
    }
    assert (stored.event_id, stored.stream_id, stored.stream_version) == (
        body["event_id"],
        f"usage-{KEY_ID}",
        stored.global_position,
    )
    assert stored.event == UsageRecorded(
        virtual_key_id=KEY_ID,
        provider="openai",
        model="gpt-4o",
        cost=Decimal("0.000000001"),
        input_tokens=100,
        output_tokens=20,
        requests=1,
        occurred_at=datetime(2026, 11, 28, 10, 0, tzinfo=UTC),
        provider_config_id=CONFIG_ID,
        team_id=TEAM_ID,
        customer_id=CUSTOMER_ID,
    )


async def test_a_repeated_record_is_a_duplicate_with_the_original_position(api, pool):
    body = record()
    first = await (await api.request("POST", "/api/usage", body)).json()

    response = await api.request("POST", "/api/usage", {**body, "cost": 5})

    assert response.status == 202
    assert await response.json() == {"position": first["position"], "duplicate": True}
    assert len(await usage_rows(pool)) == 1


async def test_virtual_key_id_may_replace_the_secret_and_defaults_apply(api, pool):
    before = datetime.now(UTC)
    body = {
        "event_id": str(uuid.uuid4()),
        "virtual_key_id": SOLO_KEY_ID,
        "provider": "anthropic",
        "model": "claude",
        "cost": "1.5",
    }

    response = await api.request("POST", "/api/usage", body)

    assert response.status == 202
    [stored] = await usage_events(pool)
    occurred_at = stored.event.occurred_at  # type: ignore[union-attr]
    assert before <= occurred_at <= datetime.now(UTC)
    assert stored.event == UsageRecorded(
        virtual_key_id=SOLO_KEY_ID,
        provider="anthropic",
        model="claude",
        cost=Decimal("1.5"),
        input_tokens=0,
        output_tokens=0,
        requests=1,
        occurred_at=occurred_at,
        customer_id=CUSTOMER_ID,
    )


async def test_zero_requests_and_occurred_at_up_to_5_minutes_ahead_are_accepted(
    api, pool
):
    ahead = (datetime.now(UTC) + timedelta(minutes=4, seconds=50)).isoformat()

    response = await api.request(
        "POST", "/api/usage", record(requests=0, cost=0, occurred_at=ahead)
    )

    assert response.status == 202
    [stored] = await usage_events(pool)
    assert (stored.event.requests, stored.event.cost) == (0, Decimal(0))  # type: ignore[union-attr]


def _in(minutes: int) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"cost": -0.01}, "negative_cost"),
        ({"cost": "-1"}, "negative_cost"),
        ({"cost": "0.0000000001"}, "invalid_cost"),
        ({"cost": "NaN"}, "invalid_cost"),
        ({"cost": 1e300}, "invalid_cost"),
        ({"occurred_at": "future"}, "occurred_at_out_of_range"),
        ({"virtual_key": "sk-gl-not-a-key"}, "unknown_virtual_key"),
        (
            {"virtual_key": None, "virtual_key_id": str(uuid.uuid4())},
            "unknown_virtual_key",
        ),
        ({"virtual_key_id": KEY_ID}, "invalid_record"),  # both
        ({"virtual_key": None}, "invalid_record"),  # neither
        ({"colour": "red"}, "invalid_record"),
        ({"event_id": "not-a-uuid"}, "invalid_record"),
        ({"input_tokens": -1}, "invalid_record"),
        ({"requests": 1.5}, "invalid_record"),
        ({"cost": True}, "invalid_record"),
        ({"provider": ""}, "invalid_record"),
        ({"model": "gpt\u0000"}, "invalid_record"),
        ({"occurred_at": "2026-11-28T10:00:00"}, "invalid_record"),  # no zone
        ({"cost": None}, "invalid_record"),
    ],
)
async def test_a_rejected_record_is_a_400_with_its_code_and_stores_nothing(
    api, pool, change, code
):
    if change.get("occurred_at") == "future":
        change = {"occurred_at": _in(6)}
    body = {k: v for k, v in {**record(), **change}.items() if v is not None}

    response = await api.request("POST", "/api/usage", body)

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == code
    assert error["message"]
    assert await usage_rows(pool) == []


@pytest.mark.parametrize(
    "occurred_at",
    [
        "2026-06-30T23:59:60Z",  # a leap second: RFC 3339 allows it, datetime cannot
        "2026-02-30T10:00:00Z",
        "2026-11-28T24:00:00Z",
        "yesterday",
    ],
)
async def test_an_unreadable_timestamp_is_refused_with_what_a_timestamp_must_be(
    api, pool, occurred_at
):
    response = await api.request("POST", "/api/usage", record(occurred_at=occurred_at))

    assert response.status == 400
    assert (await response.json())["error"] == {
        "code": "invalid_record",
        "message": "the record is invalid: Expected an RFC 3339 timestamp such as"
        " 2026-12-05T10:00:00Z, with a date that exists, an hour below 24 and seconds"
        " below 60 (a leap second cannot be stored) - at `$.occurred_at`",
    }
    assert await usage_rows(pool) == []


async def test_a_body_that_is_not_json_is_an_invalid_record(api):
    response = await api.request("POST", "/api/usage", data=b"{nope", content_type=JSON)

    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_record"


async def test_a_single_record_over_1_mib_is_a_413(api, pool):
    body = msgspec.json.encode(record(padding="x" * (1 << 20)))

    response = await api.request(
        "POST", "/api/usage", data=io.BytesIO(body), content_type=JSON
    )

    assert response.status == 413
    assert (await response.json())["error"]["code"] == "body_too_large"
    assert await usage_rows(pool) == []


async def test_the_request_id_is_kept_in_the_event_metadata(api, pool):
    await api.request(
        "POST", "/api/usage", record(), headers={"X-Request-Id": "req-42"}
    )

    [stored] = await usage_events(pool)
    assert stored.metadata == {"request_id": "req-42"}


# --- POST /api/usage/batch ----------------------------------------------------------


async def test_a_batch_commits_its_valid_lines_and_names_the_rejected_ones(api, pool):
    first = record()
    body = ndjson(
        first,
        b"{not json",
        b"",
        record(cost="2.5"),
        record(virtual_key="sk-gl-unknown"),
        record(cost=-1),
        {**first, "cost": 9},  # a repeat of line 1
        record(colour="red"),
        b"   ",
    )

    response = await api.request(
        "POST", "/api/usage/batch", data=body, content_type=NDJSON
    )

    assert response.status == 200
    answer = await response.json()
    rows = await usage_rows(pool)
    assert [r["event_id"] for r in rows] == [first["event_id"], rows[1]["event_id"]]
    assert [m.pop("message") != "" for m in answer["rejected"]] == [True] * 4
    assert answer == {
        "accepted": 2,
        "duplicates": 1,
        "rejected": [
            {"line": 2, "code": "invalid_record"},
            {"line": 5, "code": "unknown_virtual_key"},
            {"line": 6, "code": "negative_cost"},
            {"line": 8, "code": "invalid_record"},
        ],
        "position": rows[1]["global_position"],
    }


async def test_a_batch_sent_again_is_all_duplicates_at_the_original_positions(
    api, pool
):
    body = ndjson(*(record() for _ in range(5)))
    first = await (
        await api.request("POST", "/api/usage/batch", data=body, content_type=NDJSON)
    ).json()

    again = await (
        await api.request("POST", "/api/usage/batch", data=body, content_type=NDJSON)
    ).json()

    assert first["accepted"] == 5
    assert again == {
        "accepted": 0,
        "duplicates": 5,
        "rejected": [],
        "position": first["position"],
    }
    assert len(await usage_rows(pool)) == 5


async def test_a_batch_with_nothing_to_write_answers_the_head_position(api, pool):
    await api.request("POST", "/api/usage", record())
    head = await eventstore.max_position(pool)

    rejected = await (
        await api.request(
            "POST",
            "/api/usage/batch",
            data=ndjson(record(cost=-1)),
            content_type=NDJSON,
        )
    ).json()
    empty = await (
        await api.request("POST", "/api/usage/batch", data=b"", content_type=NDJSON)
    ).json()

    assert rejected["position"] == empty["position"] == head
    assert empty == {"accepted": 0, "duplicates": 0, "rejected": [], "position": head}


async def test_a_batch_over_16_mib_is_a_413_and_commits_nothing(api, pool):
    line = msgspec.json.encode(record())
    body = ndjson(*[line] * ((16 << 20) // len(line) + 1))
    assert len(body) > 16 << 20

    response = await api.request(
        "POST", "/api/usage/batch", data=io.BytesIO(body), content_type=NDJSON
    )

    assert response.status == 413
    assert (await response.json())["error"]["code"] == "body_too_large"
    assert await usage_rows(pool) == []


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~40 s on an idle 2-core machine
async def test_money_stays_exact_over_a_million_records(api, pool):
    """1,000,000 records of 0.000001 sum to exactly 1 in the log."""
    key_lines = 10_000

    async def send(batch: int) -> None:
        body = ndjson(
            *(
                b'{"event_id":"%s","virtual_key_id":"%s","provider":"openai",'
                b'"model":"gpt-4o","cost":0.000001}'
                % (str(uuid.UUID(int=batch * key_lines + i)).encode(), KEY_ID.encode())
                for i in range(key_lines)
            )
        )
        response = await api.request(
            "POST", "/api/usage/batch", data=io.BytesIO(body), content_type=NDJSON
        )
        answer = await response.json()
        assert (answer["accepted"], answer["rejected"]) == (key_lines, [])

    batches = iter(range(100))

    async def worker() -> None:
        for batch in batches:
            await send(batch)

    await asyncio.gather(*(worker() for _ in range(4)))

    total = await pool.fetchval(
        "SELECT sum((data->>'cost')::numeric) FROM events WHERE type = 'UsageRecorded'"
    )
    assert total == Decimal(1)
    assert await pool.fetchval("SELECT count(*) FROM events") == 1_000_000 + 4


# --- GET /api/usage/stream ----------------------------------------------------------


async def test_stream_acks_pipelined_frames_in_order_after_commit(api, pool):
    frames: list[dict[str, Any]] = [
        {"seq": seq, "records": [record() for _ in range(size)]}
        for seq, size in ((1, 3), (2, 1), (3, 2))
    ]
    async with api.socket() as ws:
        for frame in frames:
            await ws.send_str(msgspec.json.encode(frame).decode())
        acks = []
        for _ in frames:
            acks.append(await ws.receive_json())
            # Its records (at least) are committed when its ack arrives.
            assert len(await usage_rows(pool)) >= sum(
                len(f["records"]) for f in frames[: len(acks)]
            )

    position = {r["event_id"]: r["global_position"] for r in await usage_rows(pool)}
    assert acks == [
        {
            "seq": f["seq"],
            "accepted": len(f["records"]),
            "duplicates": 0,
            "rejected": [],
            "position": max(position[r["event_id"]] for r in f["records"]),
        }
        for f in frames
    ]


async def test_stream_names_rejected_records_by_index(api, pool):
    good = record()
    frame = {
        "seq": 7,
        "records": [
            record(cost=-2),
            good,
            {"event_id": 3},
            good,
            record(virtual_key="x"),
        ],
    }
    async with api.socket() as ws:
        await ws.send_str(msgspec.json.encode(frame).decode())
        ack = await ws.receive_json()

    [row] = await usage_rows(pool)
    assert [r.pop("message") != "" for r in ack["rejected"]] == [True] * 3
    assert ack == {
        "seq": 7,
        "accepted": 1,
        "duplicates": 1,
        "rejected": [
            {"index": 0, "code": "negative_cost"},
            {"index": 2, "code": "invalid_record"},
            {"index": 4, "code": "unknown_virtual_key"},
        ],
        "position": row["global_position"],
    }


async def test_stream_answers_bad_frames_with_error_frames_and_stays_open(api, pool):
    too_many = {"seq": 4, "records": [record()] * 10_001}
    async with api.socket() as ws:
        await ws.send_str("{not json")
        await ws.send_str('{"records": []}')
        await ws.send_bytes(b'{"seq": 3, "records": []}')
        await ws.send_str(msgspec.json.encode(too_many).decode())
        await ws.send_str(
            msgspec.json.encode({"seq": 5, "records": [record()]}).decode()
        )
        answers = [await ws.receive_json() for _ in range(5)]

    assert [a.get("seq") for a in answers] == [None, None, None, 4, 5]
    assert [a["error"]["code"] for a in answers[:4]] == [
        "invalid_frame",
        "invalid_frame",
        "invalid_frame",
        "too_many_records",
    ]
    assert answers[4]["accepted"] == 1
    assert len(await usage_rows(pool)) == 1


async def test_stream_closes_a_socket_whose_frame_is_over_4_mib(api, pool):
    big = '{"seq": 1, "records": [], "pad": "' + "x" * (4 << 20) + '"}'
    async with api.socket() as ws:
        # The server closes (1009) as soon as the frame header shows the size, so the
        # rest of this send may meet a reset connection.
        with contextlib.suppress(ConnectionError):
            await ws.send_str(big)
        message = await ws.receive()

    assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    if message.type is WSMsgType.CLOSE:
        assert message.data == 1009
    assert await usage_rows(pool) == []


# --- across the three paths ---------------------------------------------------------


async def test_one_event_id_sent_three_ways_is_stored_once(api, pool):
    body = record()
    single = await (await api.request("POST", "/api/usage", body)).json()
    batch = await (
        await api.request(
            "POST", "/api/usage/batch", data=ndjson(body, body), content_type=NDJSON
        )
    ).json()
    async with api.socket() as ws:
        await ws.send_str(msgspec.json.encode({"seq": 1, "records": [body]}).decode())
        ack = await ws.receive_json()

    assert single["duplicate"] is False
    assert (batch["accepted"], batch["duplicates"]) == (0, 2)
    assert (ack["accepted"], ack["duplicates"]) == (0, 1)
    assert single["position"] == batch["position"] == ack["position"]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM events WHERE event_id = $1",
            uuid.UUID(body["event_id"]),
        )
        == 1
    )


async def test_concurrent_requests_share_one_group_commit(api, database, pool):
    writer = api.app[writer_key]
    async with events_locked(database):
        first = asyncio.create_task(api.request("POST", "/api/usage", record()))
        await until(lambda: writer.backend_pid is not None)
        await blocked_on_lock(pool, writer)
        others = [
            asyncio.create_task(
                api.request(
                    "POST",
                    "/api/usage/batch",
                    data=ndjson(record(), record()),
                    content_type=NDJSON,
                )
            )
            for _ in range(3)
        ] + [asyncio.create_task(api.request("POST", "/api/usage", record()))]
        await until(lambda: writer.backlog == 7)
    await first
    answers = [await (await task).json() for task in others]

    tx_of = {r["global_position"]: r["tx_id"] for r in await usage_rows(pool)}
    assert len(tx_of) == 8
    assert len({tx_of[a["position"]] for a in answers}) == 1


# --- rights and /metrics ------------------------------------------------------------


async def test_recorders_record_readers_may_not_and_readers_scrape_metrics(
    database, pool
):
    async with resolved(database, pool, Settings(**TOKENS)) as api:

        async def post(token: str) -> int:
            response = await api.request(
                "POST",
                "/api/usage",
                record(),
                headers=bearer(token),
            )
            return response.status

        async def scrape(token: str | None) -> int:
            headers = bearer(token) if token else {}
            return (await api.request("GET", "/metrics", headers=headers)).status

        assert [await post("rec-secret"), await post("adm-secret")] == [202, 202]
        assert await post("read-secret") == 403
        assert [await scrape("read-secret"), await scrape("adm-secret")] == [200, 200]
        assert [await scrape("rec-secret"), await scrape(None)] == [403, 401]
        reader = bearer("read-secret")
        with pytest.raises(WSServerHandshakeError) as refused:
            async with api.socket(headers=reader):
                pass
        assert refused.value.status == 403
        recorder = bearer("rec-secret")
        async with api.socket(headers=recorder) as ws:
            await ws.send_str(json.dumps({"seq": 1, "records": [record()]}))
            assert (await ws.receive_json())["accepted"] == 1


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_ingested_records_by_result(api):
    async def read() -> str:
        response = await api.request("GET", "/metrics")
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(await response.text())

    names = [
        'ingest_records_total{result="accepted"}',
        'ingest_records_total{result="duplicate"}',
        'ingest_records_total{result="rejected"}',
        "ingest_groups_total",
        "ingest_group_size_sum",
    ]
    before = await read()
    body = record()
    await api.request(
        "POST",
        "/api/usage/batch",
        data=ndjson(body, record(), body, b"nope"),
        content_type=NDJSON,
    )
    after = await read()

    assert [_sample(after, n) - _sample(before, n) for n in names] == [2, 1, 1, 1, 2]
    assert "ingest_commit_seconds_bucket" in after
    assert "check_seconds" in after


async def test_usage_for_a_key_created_a_moment_ago_is_accepted_on_every_path(
    database, pool
):
    """The cache may not have applied a new key yet: ingest catches it up once."""
    async with serve(database) as api:
        accepted: list[tuple[Any, ...]] = []
        for path in ("single", "batch", "stream"):
            created = await api.request(
                "POST", "/api/governance/virtual-keys", {"name": f"fresh-{path}"}
            )
            secret = (await created.json())["virtual_key"]["value"]
            usage = record(virtual_key=secret)
            if path == "single":
                response = await api.request("POST", "/api/usage", usage)
                accepted.append((response.status, (await response.json())["duplicate"]))
            elif path == "batch":
                response = await api.request(
                    "POST",
                    "/api/usage/batch",
                    data=json.dumps(usage).encode(),
                    content_type=NDJSON,
                )
                body = await response.json()
                accepted.append((response.status, body["accepted"], body["rejected"]))
            else:
                async with api.socket() as ws:
                    await ws.send_str(json.dumps({"seq": 1, "records": [usage]}))
                    ack = await ws.receive_json()
                accepted.append((ack["seq"], ack["accepted"], ack["rejected"]))

    assert accepted == [(202, False), (200, 1, []), (1, 1, [])]


async def test_a_repeat_is_a_duplicate_after_its_key_was_rotated_or_deleted(database):
    """A gateway whose ack was lost sends the record again; if the key's secret was
    rotated (or the key deleted) meanwhile, the repeat is still the duplicate it
    is, on every path, while a new record with the old secret is refused."""
    keys = "/api/governance/virtual-keys"
    async with serve(database) as api:
        created = await api.create(keys, {"name": "rotated"})
        key = created["virtual_key"]
        await api.caught_up(created["position"])
        first = record(virtual_key=key["value"])
        by_id = record(virtual_key=None, virtual_key_id=key["id"])
        taken = await api.call("POST", "/api/usage", first)
        taken_by_id = await api.call("POST", "/api/usage", by_id)
        status, rotated = await api.call(
            "PUT", f"{keys}/{key['id']}", {"rotate_value": True}
        )
        assert status == 200, rotated
        await api.caught_up(rotated["position"])

        single = await api.call("POST", "/api/usage", first)
        batch = await api.call(
            "POST", "/api/usage/batch", data=ndjson(first), content_type=NDJSON
        )
        async with api.socket() as ws:
            await ws.send_str(
                msgspec.json.encode({"seq": 1, "records": [first]}).decode()
            )
            frame = await ws.receive_json()
        new = await api.call("POST", "/api/usage", record(virtual_key=key["value"]))
        status, deleted = await api.call("DELETE", f"{keys}/{key['id']}")
        assert status == 200, deleted
        await api.caught_up(deleted["position"])
        after_delete = await api.call("POST", "/api/usage", by_id)

    position = taken[1]["position"]
    assert single == (202, {"position": position, "duplicate": True})
    assert batch[1] == {
        "accepted": 0,
        "duplicates": 1,
        "rejected": [],
        "position": position,
    }
    assert (frame["duplicates"], frame["rejected"], frame["position"]) == (
        1,
        [],
        position,
    )
    assert (new[0], new[1]["error"]["code"]) == (400, "unknown_virtual_key")
    assert after_delete == (
        202,
        {"position": taken_by_id[1]["position"], "duplicate": True},
    )
