"""Reservations: a reserving check holds its estimate in memory at once and in the log
after commit; usage settles it, a release drops it, expiry lapses it; every budget
in reads shows `held` (real PostgreSQL, real aiohttp server)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from projections import cache_loader, replay
from projections.cache import GovernanceCache
from service.domain.events import (
    Budget,
    ReservationHeld,
    VirtualKeyCreated,
)
from service.records import Checkpoint, RecordedEvent
from service.web.routes.check import held_event_id
from tests.api import bearer, serve
from tests.reserving import (
    CHECK,
    KEYS,
    TEAMS,
    TOKENS,
    budget,
    check_at,
    key_under_team,
    reserve,
    usage_record,
)


@pytest.fixture
async def api(database):
    async with serve(database, TOKENS, bearer("adm")) as api:
        yield api


async def test_a_hold_counts_until_usage_settles_it(api):
    key_id, _, budget_id = await key_under_team(api, limit=10)

    status, held = await reserve(api, key_id, "4")
    second = await reserve(api, key_id, "4")
    third = await reserve(api, key_id, "4")
    shown = await budget(api, budget_id, second[1]["position"])

    assert (status, held["allowed"], held["remaining"]) == (200, True, 6)
    assert uuid.UUID(held["reservation_id"]).version == 4
    assert (second[1]["allowed"], second[1]["remaining"]) == (True, 2)
    assert (third[1]["allowed"], third[1]["reason"]) == (False, "budget_exceeded")
    assert (shown["held"], shown["current_usage"]) == (Decimal(8), Decimal(0))

    _, recorded = await api.call(
        "POST",
        "/api/usage",
        {
            "event_id": str(uuid.uuid4()),
            "virtual_key_id": key_id,
            "provider": "openai",
            "model": "gpt",
            "cost": "3",
            "reservation_id": held["reservation_id"].upper(),
        },
        headers=bearer("rec"),
    )
    settled = await budget(api, budget_id, recorded["position"])
    _, after = await check_at(api, key_id, recorded["position"])

    assert (settled["held"], settled["current_usage"]) == (Decimal(4), Decimal(3))
    assert after["remaining"] == 3


async def test_a_check_blocked_by_holds_says_what_they_hold(api):
    key_id, _, budget_id = await key_under_team(api, limit=10)
    await reserve(api, key_id, "6.5")
    _, last = await reserve(api, key_id, "3.5")
    team_id = (await budget(api, budget_id, last["position"]))["owner_id"]

    status, blocked = await check_at(api, key_id, last["position"], exact=True)

    assert status == 200
    assert blocked == {
        "allowed": False,
        "reason": "budget_exceeded",
        "http_status": 402,
        "budget_id": budget_id,
        "owner_type": "team",
        "owner_id": team_id,
        "current_usage": 0,
        "max_limit": 10,
        "held": Decimal(10),
        "position": blocked["position"],
    }


async def test_a_check_blocked_by_held_tokens_says_how_many_are_held(api):
    key = await api.create(
        KEYS,
        {
            "name": "k",
            "rate_limit": {"token_max_limit": 100, "token_reset_duration": "1h"},
        },
    )
    key_id = key["virtual_key"]["id"]
    await api.caught_up(key["position"])
    _, held = await reserve(api, key_id, "0", estimated_tokens=100)

    _, blocked = await check_at(api, key_id, held["position"])

    assert held["allowed"] is True
    assert blocked == {
        "allowed": False,
        "reason": "rate_limited",
        "http_status": 429,
        "owner_type": "virtual_key",
        "owner_id": key_id,
        "current_usage": 0,
        "max_limit": 100,
        "rate_limit": "tokens",
        "held": 100,
        "position": blocked["position"],
    }


async def test_concurrent_reserving_checks_admit_exactly_what_fits(api):
    key_id, _, budget_id = await key_under_team(api, limit=10)

    answers = await asyncio.gather(*(reserve(api, key_id, "3") for _ in range(12)))

    admitted = [a for s, a in answers if a["allowed"]]
    assert [s for s, _ in answers] == [200] * 12
    assert len(admitted) == 3  # min(12, floor(10 / 3))
    top = max(a["position"] for a in admitted)
    assert (await budget(api, budget_id, top))["held"] == Decimal(9)


async def test_a_release_drops_the_hold_once_and_unknown_ids_are_404(api, pool):
    key_id, _, budget_id = await key_under_team(api, limit=10)
    _, held = await reserve(api, key_id, "6")
    path = f"/api/governance/reservations/{held['reservation_id']}/release"

    first = await api.call("POST", path, headers=bearer("rec"))
    # Counted in the table: GET /api/events shows only what is below every open
    # transaction's horizon, which a projector's batch may hold back a moment.
    before = await pool.fetch("SELECT type FROM events ORDER BY global_position")
    again = await api.call("POST", path, headers=bearer("rec"))
    after = await pool.fetch("SELECT type FROM events ORDER BY global_position")
    unknown = await api.call(
        "POST",
        f"/api/governance/reservations/{uuid.uuid4()}/release",
        headers=bearer("rec"),
    )
    # Ids of other events are no reservation's either.
    record = usage_record(key_id)
    await api.call("POST", "/api/usage", record, headers=bearer("rec"))
    created = await pool.fetchval(
        "SELECT event_id::text FROM events WHERE type = 'VirtualKeyCreated'"
        " AND stream_id = $1",
        f"virtual_key-{key_id}",
    )
    others = [
        await api.call(
            "POST",
            f"/api/governance/reservations/{other}/release",
            headers=bearer("rec"),
        )
        for other in (record["event_id"], created)
    ]

    assert first[0] == 200
    assert (await budget(api, budget_id, first[1]["position"]))["held"] == 0
    assert again[0] == 200
    assert after == before
    assert [r["type"] for r in after[-2:]] == [
        "ReservationHeld",
        "ReservationReleased",
    ]
    assert (unknown[0], unknown[1]["error"]["code"]) == (404, "not_found")
    assert [(o[0], o[1]["error"]["code"]) for o in others] == [(404, "not_found")] * 2


async def test_a_usage_record_may_take_the_reservation_id_as_its_event_id(api):
    """One id for the call: the hold's own event has an id of its own, so the
    record is counted and settles the hold, not taken for a repeat of the hold."""
    key_id, _, budget_id = await key_under_team(api, limit=10)
    _, first = await reserve(api, key_id, "4")
    _, second = await reserve(api, key_id, "4")
    one, two = first["reservation_id"], second["reservation_id"]

    single = await api.call(
        "POST",
        "/api/usage",
        {**usage_record(key_id, "3"), "event_id": one, "reservation_id": one},
        headers=bearer("rec"),
    )
    batch = await api.call(
        "POST",
        "/api/usage/batch",
        data=json.dumps(
            {**usage_record(key_id, "2"), "event_id": two, "reservation_id": two}
        ).encode(),
        content_type="application/x-ndjson",
        headers=bearer("rec"),
    )
    top = max(single[1]["position"], batch[1]["position"])
    shown = await budget(api, budget_id, top)

    assert (single[0], single[1]["duplicate"]) == (202, False)
    assert single[1]["position"] > second["position"]
    assert (batch[1]["accepted"], batch[1]["duplicates"]) == (1, 0)
    assert (shown["held"], shown["current_usage"]) == (Decimal(0), Decimal(5))


async def test_a_hold_stored_under_its_reservation_id_is_still_released(api, pool):
    """Holds appended before a hold's event had an id of its own carry the
    reservation id as their event id: a release still finds them."""
    key_id, _, budget_id = await key_under_team(api, limit=10)
    _, held = await reserve(api, key_id, "4")
    reservation_id = held["reservation_id"]
    async with pool.acquire() as conn, conn.transaction():
        # The log refuses updates through its trigger; this one writes the old form.
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE events SET event_id = $1::uuid WHERE event_id = $2::uuid",
            reservation_id,
            str(held_event_id(reservation_id)),
        )

    status, released = await api.call(
        "POST",
        f"/api/governance/reservations/{reservation_id}/release",
        headers=bearer("rec"),
    )

    assert status == 200
    assert released["position"] > held["position"]
    assert (await budget(api, budget_id, released["position"]))["held"] == 0


async def test_an_idempotent_retry_names_the_same_reservation(api, pool):
    key_id, _, _ = await key_under_team(api, limit=10)
    again = {"Idempotency-Key": "call-1", **bearer("rec")}

    first = await api.call(
        "POST",
        CHECK,
        {"virtual_key_id": key_id, "estimated_cost": "2", "reserve": True},
        headers=again,
    )
    second = await api.call(
        "POST",
        CHECK,
        {"virtual_key_id": key_id, "estimated_cost": "2", "reserve": True},
        headers=again,
    )
    held = await pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'ReservationHeld'"
    )

    assert first[1]["reservation_id"] == second[1]["reservation_id"]
    assert first[1]["expires_at"] == second[1]["expires_at"]
    assert held == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"reserve": True}, "invalid_request"),
        ({"estimated_cost": "1", "ttl_s": 60}, "invalid_request"),
        ({"estimated_cost": "1", "reserve": True, "ttl_s": 0}, "invalid_request"),
        ({"estimated_cost": "1", "reserve": True, "ttl_s": 3601}, "invalid_request"),
    ],
)
async def test_malformed_reserving_checks_are_400(api, body, code):
    key_id, _, _ = await key_under_team(api)

    status, answer = await api.call(
        "POST", CHECK, {"virtual_key_id": key_id, **body}, headers=bearer("rec")
    )

    assert (status, answer["error"]["code"]) == (400, code)


@pytest.mark.parametrize(
    ("extra", "status"),
    [({"estimated_tokens": 500}, 200), ({"estimated_tokens": -1}, 400)],
)
async def test_a_plain_check_takes_estimated_tokens_and_holds_nothing(
    api, pool, extra, status
):
    key_id, _, _ = await key_under_team(api)
    body = {"virtual_key_id": key_id, "estimated_cost": "1", **extra}

    answer = await api.call("POST", CHECK, body, headers=bearer("rec"))
    plain = await api.call(
        "POST", CHECK, {"virtual_key_id": key_id}, headers=bearer("rec")
    )
    held = await pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'ReservationHeld'"
    )

    if status == 200:
        assert (answer[0], {**answer[1], "position": 0}) == (
            200,
            {
                "allowed": True,
                "reason": "ok",
                "http_status": 200,
                "remaining": 10,
                "position": 0,
            },
        )
    else:
        assert (answer[0], answer[1]["error"]["code"]) == (400, "invalid_request")
    assert (plain[1]["remaining"], held) == (10, 0)


async def test_a_reader_may_check_but_not_reserve(api):
    key_id, _, _ = await key_under_team(api)

    plain = await api.call(
        "POST", CHECK, {"virtual_key_id": key_id}, headers=bearer("read")
    )
    reserving = await api.call(
        "POST",
        CHECK,
        {"virtual_key_id": key_id, "estimated_cost": "1", "reserve": True},
        headers=bearer("read"),
    )

    assert plain[0] == 200
    assert (reserving[0], reserving[1]["error"]["code"]) == (403, "forbidden")


SPELLINGS = ["not-a-uuid", "{%s}", "urn:uuid:%s", "%s"]


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_a_usage_record_whose_reservation_id_is_no_uuid_is_rejected(
    api, spelling
):
    """Only the 36-character form is a UUID here (docs/API.md), in a record as in
    a path; 32 hex digits were taken by the batch's fast path and the WebSocket."""
    key_id, _, _ = await key_under_team(api)
    _, held = await reserve(api, key_id, "1")
    given = spelling.replace("%s", held["reservation_id"].replace("-", ""))
    record = {
        "virtual_key_id": key_id,
        "provider": "p",
        "model": "m",
        "cost": "1",
        "reservation_id": given,
    }

    single = await api.call(
        "POST",
        "/api/usage",
        {"event_id": str(uuid.uuid4()), **record},
        headers=bearer("rec"),
    )
    batch = await api.call(
        "POST",
        "/api/usage/batch",
        data=json.dumps({"event_id": str(uuid.uuid4()), **record}).encode(),
        content_type="application/x-ndjson",
        headers=bearer("rec"),
    )

    assert (single[0], single[1]["error"]["code"]) == (400, "invalid_record")
    assert batch[0] == 200
    assert (batch[1]["accepted"], [r["code"] for r in batch[1]["rejected"]]) == (
        0,
        ["invalid_record"],
    )


async def test_holds_survive_a_restart_and_replay(api, pool):
    key_id, _, budget_id = await key_under_team(api, limit=10)
    _, held = await reserve(api, key_id, "7")
    await api.caught_up(held["position"])

    async with pool.acquire() as conn:
        restored, _ = await cache_loader.load(conn)
    report = await replay.rebuild(pool, "governance", verify=True)

    assert set(restored.holds) == {held["reservation_id"]}
    assert report.differences == []
    assert (await budget(api, budget_id, held["position"]))["held"] == Decimal(7)


async def renamed_and_read(api, path: str, name: str) -> tuple[dict, dict]:
    """PUT `name` on the entity at `path`: its answer's entity, and the entity a GET
    shows once the projection has the PUT."""
    status, answer = await api.call("PUT", path, {"name": name}, exact=True)
    assert status == 200, answer
    [entity] = [v for k, v in answer.items() if k != "position"]
    _, read = await api.call(
        "GET", f"{path}?min_position={answer['position']}", exact=True
    )
    [shown] = read.values()
    return entity, shown


def holds_of(entity: dict) -> list:
    """Every budget's `held` and the rate limit's `(token_held, request_held)`, the
    key's provider configs' after its own."""
    rate = entity["rate_limit"]
    return [
        [b["held"] for b in entity["budgets"]],
        None if rate is None else (rate["token_held"], rate["request_held"]),
        *(holds_of(c) for c in entity.get("provider_configs", [])),
    ]


async def test_command_answers_show_open_holds_as_get_does(api):
    per_minute = {"request_max_limit": 100, "request_reset_duration": "1m"}
    customer = await api.create(
        "/api/governance/customers",
        {
            "name": "c",
            "budgets": [{"max_limit": 100, "reset_duration": "1w"}],
            "rate_limit": {
                "token_max_limit": 1000,
                "token_reset_duration": "1h",
                **per_minute,
            },
        },
    )
    customer_id = customer["customer"]["id"]
    team = await api.create(
        TEAMS,
        {
            "name": "t",
            "customer_id": customer_id,
            "budgets": [{"max_limit": 50, "reset_duration": "1d"}],
            "rate_limit": per_minute,
        },
    )
    team_id = team["team"]["id"]
    key = await api.create(
        KEYS,
        {
            "name": "k",
            "team_id": team_id,
            "budgets": [{"max_limit": 10, "reset_duration": "1d"}],
            "rate_limit": per_minute,
            "provider_configs": [
                {
                    "provider": "openai",
                    "budgets": [{"max_limit": 8, "reset_duration": "1d"}],
                }
            ],
        },
    )
    key_id = key["virtual_key"]["id"]
    await api.caught_up(key["position"])
    paths = [
        f"{KEYS}/{key_id}",
        f"{TEAMS}/{team_id}",
        f"/api/governance/customers/{customer_id}",
    ]

    _, held = await reserve(
        api, key_id, "5", provider="openai", model="gpt", estimated_tokens=7
    )
    await api.caught_up(held["position"])
    while_open = [await renamed_and_read(api, path, "held") for path in paths]

    assert held["allowed"] is True
    assert [holds_of(answer) for answer, _ in while_open] == [
        [[5], (7, 1), [[5], None]],  # the key, then its openai config
        [[5], (7, 1)],  # the team
        [[5], (7, 1)],  # the customer
    ]
    assert [answer for answer, _ in while_open] == [shown for _, shown in while_open]

    _, released = await api.call(
        "POST",
        f"/api/governance/reservations/{held['reservation_id']}/release",
        headers=bearer("rec"),
    )
    await api.caught_up(released["position"])
    after = [await renamed_and_read(api, path, "released") for path in paths]

    assert [holds_of(answer) for answer, _ in after] == [
        [[0], (0, 0), [[0], None]],
        [[0], (0, 0)],
        [[0], (0, 0)],
    ]
    assert [answer for answer, _ in after] == [shown for _, shown in after]


# --- the cache alone: expiry is computed, not run -------------------------------------

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
KEY = "00000000-0000-4000-8000-00000000000b"
BUDGET = "00000000-0000-4000-8000-00000000000c"


def cache_with_key(limit: int) -> GovernanceCache:
    cache = GovernanceCache()
    event = VirtualKeyCreated(
        virtual_key_id=KEY,
        name="k",
        value_sha256="0" * 64,
        value_hint="sk-gl-...",
        budgets=(
            Budget(budget_id=BUDGET, max_limit=Decimal(limit), reset_duration="1d"),
        ),
    )
    cache.apply(
        RecordedEvent(
            global_position=1,
            tx_id=1,
            event_id=str(uuid.uuid4()),
            stream_id=f"virtual_key-{KEY}",
            stream_version=1,
            schema_version=type(event).schema_version,
            event=event,
            metadata={},
            recorded_at=NOW - timedelta(hours=1),
        )
    )
    return cache


def test_a_hold_lapses_at_its_expiry_without_any_job():
    cache = cache_with_key(limit=10)
    hold = ReservationHeld(
        reservation_id=str(uuid.uuid4()),
        virtual_key_id=KEY,
        budget_ids=(BUDGET,),
        amount=Decimal(10),
        expires_at=NOW + timedelta(seconds=60),
    )
    cache.hold(hold)

    def check(at: datetime) -> bool:
        return cache.check(
            virtual_key_sha256=None,
            virtual_key_id=KEY,
            provider=None,
            model=None,
            estimated_cost=Decimal(1),
            now=at,
        ).allowed

    assert check(NOW + timedelta(seconds=59)) is False
    assert check(NOW + timedelta(seconds=60)) is True
    assert cache.holds == {}
    cache.hold(hold)  # a late redelivery lapses again at the next check
    assert check(NOW + timedelta(seconds=61)) is True


def test_a_checkpoint_is_unchanged_by_holding_in_memory():
    cache = cache_with_key(limit=10)
    before = cache.checkpoint

    cache.hold(
        ReservationHeld(
            reservation_id=str(uuid.uuid4()),
            virtual_key_id=KEY,
            budget_ids=(BUDGET,),
            amount=Decimal(1),
            expires_at=NOW,
        )
    )

    assert cache.checkpoint == before == Checkpoint(1, 1)


async def test_money_in_answers_is_spelled_one_way(api):
    """A limit is answered as it reads, whoever spelled it (1E+2, 15.00) and
    however PostgreSQL hands it back (100000000000 came back as 1.000E+11), and a
    sum of holds without trailing zeros (4.25 + 10.75 held was 15.00)."""
    body = (
        b'{"name": "k", "budgets": [{"max_limit": 1E+2, "reset_duration": "1d"},'
        b' {"max_limit": "100000000000", "reset_duration": "1M"},'
        b' {"max_limit": "15.00", "reset_duration": "1w"}]}'
    )
    response = await api.request(
        "POST", KEYS, data=body, content_type="application/json"
    )
    created = await response.read()
    key = json.loads(created)
    key_id = key["virtual_key"]["id"]
    await reserve(api, key_id, "4.25")
    _, last = await reserve(api, key_id, "10.75")
    read = await api.request("GET", f"{KEYS}/{key_id}?min_position={last['position']}")
    shown = await read.read()

    limits = [b'"max_limit":100,', b'"max_limit":100000000000,', b'"max_limit":15,']
    assert [limit in created for limit in limits] == [True] * 3
    assert [limit in shown for limit in limits] == [True] * 3
    assert shown.count(b'"held":15}') == 3  # the key's three budgets
