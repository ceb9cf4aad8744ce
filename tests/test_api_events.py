"""GET /api/events and the auth rules of API.md, through a real aiohttp server."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from service import eventstore
from service.config import ConfigError, Settings, check_exposure
from service.domain.events import Budget, TeamCreated
from service.records import NewEvent
from tests.api import serve

TOKENS: dict[str, Any] = {
    "admin_tokens": frozenset({"adm-secret"}),
    "recorder_tokens": frozenset({"rec-secret"}),
    "reader_tokens": frozenset({"read-secret"}),
}


async def append_team(pool) -> int:
    [appended] = await eventstore.append(
        pool,
        "team-t1",
        0,
        [
            NewEvent(
                event=TeamCreated(
                    team_id="t1",
                    name="platform",
                    budgets=(
                        Budget(
                            budget_id="b1",
                            max_limit=Decimal("12.000000001"),
                            reset_duration="1M",
                        ),
                    ),
                ),
                event_id="00000000-0000-4000-8000-000000000001",
            )
        ],
    )
    return appended.global_position


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        (None, 401, "unauthorized"),
        ("adm-secret", 401, "unauthorized"),  # no Bearer prefix
        ("Bearer nope", 401, "unauthorized"),
        ("Bearer rec-secret", 403, "forbidden"),
        ("Bearer read-secret", 403, "forbidden"),
    ],
)
async def test_events_refuse_callers_without_the_admin_right(
    database, pool, header, status, code
):
    async with serve(database, Settings(**TOKENS)) as api:
        headers = {"Authorization": header} if header else {}
        response = await api.request("GET", "/api/events", headers=headers)
        body = await response.json()

    assert response.status == status
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_events_list_the_log_for_an_admin_with_exact_money(database, pool):
    position = await append_team(pool)
    async with serve(database, Settings(**TOKENS)) as api:
        response = await api.request(
            "GET", "/api/events?after=0", headers={"Authorization": "Bearer adm-secret"}
        )
        text = await response.text()
        body = await response.json()

    assert response.status == 200
    assert '"max_limit":12.000000001' in text
    [event] = body["events"]
    assert {k: v for k, v in event.items() if k != "recorded_at"} == {
        "global_position": position,
        "event_id": "00000000-0000-4000-8000-000000000001",
        "stream_id": "team-t1",
        "stream_version": 1,
        "type": "TeamCreated",
        "schema_version": 2,
        "data": {
            "team_id": "t1",
            "name": "platform",
            "customer_id": None,
            "budgets": [
                {
                    "budget_id": "b1",
                    "max_limit": 12.000000001,
                    "reset_duration": "1M",
                    "calendar_aligned": False,
                    "reset_usage": False,
                }
            ],
            "rate_limit": None,
        },
        "metadata": {},
    }
    assert event["recorded_at"].endswith(("Z", "+00:00"))
    assert body["next_after"] == position


async def test_events_page_by_after_and_filter_by_stream(database, pool):
    position = await append_team(pool)
    async with serve(database) as api:
        after = await (await api.request("GET", f"/api/events?after={position}")).json()
        other = await (await api.request("GET", "/api/events?stream_id=team-zz")).json()
        bad = await api.request("GET", "/api/events?after=x")
        bad_body = await bad.json()

    assert after == {"events": [], "next_after": position}
    assert other == {"events": [], "next_after": 0}
    assert bad.status == 400
    assert bad_body["error"]["code"] == "invalid_request"


async def test_an_acknowledged_event_is_listed_while_an_older_transaction_is_open(
    database, pool
):
    # A page reads below the oldest open transaction id. One that took its id
    # before the append (a projector's batch) hides the acknowledged event until
    # it ends: the page waits for it instead of answering without the event.
    async with pool.acquire() as older, serve(database) as api:
        transaction = older.transaction()
        await transaction.start()
        await older.fetchval("SELECT pg_current_xact_id()")
        position = await append_team(pool)
        listing = asyncio.create_task(api.request("GET", "/api/events?after=0"))
        done, _ = await asyncio.wait({listing}, timeout=0.3)
        assert not done, "answered while the acknowledged event was still hidden"
        await transaction.rollback()
        body = await (await listing).json()

    assert [e["global_position"] for e in body["events"]] == [position]
    assert body["next_after"] == position


async def test_a_page_answers_after_its_wait_when_an_older_transaction_stays_open(
    database, pool, monkeypatch
):
    monkeypatch.setattr(eventstore, "SETTLE_WAIT_S", 0.2)
    async with pool.acquire() as older, serve(database) as api, older.transaction():
        await older.fetchval("SELECT pg_current_xact_id()")
        await append_team(pool)
        response = await api.request("GET", "/api/events?after=0")
        body = await response.json()

    # Nothing past the horizon: a later commit could still fill a gap before it.
    assert response.status == 200
    assert body == {"events": [], "next_after": 0}


async def test_the_service_is_open_on_loopback_when_no_token_is_configured(
    database, pool
):
    async with serve(database) as api:
        response = await api.request("GET", "/api/events")

    assert response.status == 200


async def test_health_needs_no_token_and_unknown_paths_are_404_in_the_error_shape(
    database, pool
):
    async with serve(database, Settings(**TOKENS)) as api:
        health = await api.request("GET", "/healthz")
        health_body = await health.json()
        missing = await api.request("GET", "/nope")
        missing_body = await missing.json()

    assert (health.status, health_body) == (200, {"status": "ok"})
    assert missing.status == 404
    assert missing_body["error"]["code"] == "not_found"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_the_service_refuses_to_start_open_on_a_non_loopback_address(host):
    with pytest.raises(ConfigError, match="without tokens"):
        check_exposure(Settings(host=host))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_the_service_may_start_open_on_loopback(host):
    check_exposure(Settings(host=host))
    check_exposure(Settings(host="0.0.0.0", admin_tokens=frozenset({"t"})))


async def test_events_take_min_position_as_every_read(database):
    """The log holds a position once the cache (which applies every event) has
    it; a bad value is a 400 and one past the head a 503, as on every read."""
    async with serve(database) as api:
        created = await api.create("/api/governance/customers", {"name": "c"})
        head = created["position"]
        reached = await api.call(
            "GET", f"/api/events?min_position={head}&after={head - 1}"
        )
        bad = await api.call("GET", "/api/events?min_position=abc")
        beyond = await api.call("GET", f"/api/events?min_position={head + 1000}")

    assert reached[0] == 200
    assert [e["global_position"] for e in reached[1]["events"]] == [head]
    assert (bad[0], bad[1]["error"]["code"]) == (400, "invalid_position")
    assert (beyond[0], beyond[1]["error"]["code"]) == (503, "projection_lag")
