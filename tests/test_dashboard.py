"""The live dashboard: its page and assets, the snapshot stream (rights, exact
snapshots, blocked keys as the check sees them, live updates), a budget's spend per
period, and the page itself in a real headless Chromium driven by Playwright."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession
from aiohttp.test_utils import TestServer

from projections import dashboard
from service import eventstore
from service.config import Settings
from service.domain.events import AnyEvent, Budget, TeamCreated, UsageRecorded
from service.records import NewEvent
from service.web.app import create_app
from service.web.keys import pool_key
from tests.api import Api, bearer, serve

ADMIN, RECORDER, READER = "adm-secret", "rec-secret", "read-secret"
TOKENS: dict[str, Any] = {
    "admin_tokens": frozenset({ADMIN}),
    "recorder_tokens": frozenset({RECORDER}),
    "reader_tokens": frozenset({READER}),
}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MISSING = "00000000-0000-4000-8000-00000000dead"


@pytest.fixture
async def api(database) -> AsyncIterator[Api]:
    async with serve(database, Settings(**TOKENS)) as api:
        yield api


async def command(api: Api, method: str, path: str, body: Any) -> Any:
    status, answer = await api.call(
        method, path, body, headers=bearer(ADMIN), exact=True
    )
    assert status in (200, 201), answer
    return answer


async def create_team(api: Api, *budgets: dict[str, Any], **fields: Any) -> Any:
    body = {"name": "platform", "budgets": list(budgets), **fields}
    return (await command(api, "POST", "/api/governance/teams", body))["team"]


async def create_key(api: Api, **fields: Any) -> Any:
    body = {"name": "ci", **fields}
    answer = await command(api, "POST", "/api/governance/virtual-keys", body)
    # Usage is resolved by the enforcement cache: it must know the key first.
    await api.caught_up(answer["position"])
    return answer["virtual_key"]


async def record(api: Api, secret: str, cost: str, **fields: Any) -> int:
    body = {
        "event_id": str(uuid.uuid4()),
        "virtual_key": secret,
        "provider": "openai",
        "model": "gpt-4o",
        "cost": cost,
        **fields,
    }
    status, answer = await api.call(
        "POST", "/api/usage", body, headers=bearer(RECORDER)
    )
    assert status == 202, answer
    return int(answer["position"])


async def check(api: Api, key_id: str) -> Any:
    _, answer = await api.call(
        "POST",
        "/api/governance/check",
        {"virtual_key_id": key_id},
        headers=bearer(READER),
        exact=True,
    )
    return answer


@asynccontextmanager
async def event_stream(api: Api) -> AsyncIterator[ClientResponse]:
    response = await api.request("GET", "/api/dashboard/events", headers=bearer(READER))
    try:
        assert response.status == 200
        yield response
    finally:
        response.close()


async def next_snapshot(response: ClientResponse) -> Any:
    """The next `snapshot` event of the stream (keep-alive comments skipped)."""
    event: str | None = None
    data: list[str] = []
    async with asyncio.timeout(10):
        while True:
            line = (await response.content.readline()).decode()
            assert line, "the stream ended"
            if line == "\n":
                if event == "snapshot":
                    return json.loads("".join(data), parse_float=Decimal)
                event, data = None, []
            elif line.startswith("event: "):
                event = line[len("event: ") : -1]
            elif line.startswith("data: "):
                data.append(line[len("data: ") : -1])


async def snapshot_where(response: ClientResponse, ready: Any) -> Any:
    """The first snapshot for which `ready(snapshot)` holds."""
    async with asyncio.timeout(10):
        while not ready(snapshot := await next_snapshot(response)):
            pass
    return snapshot


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


def first_of_next_month(moment: datetime) -> datetime:
    year, month = divmod(moment.year * 12 + moment.month, 12)
    return datetime(year, month + 1, 1, tzinfo=UTC)


# --- the page ----------------------------------------------------------------------


async def test_the_page_and_its_assets_need_no_token(api):
    expected = {
        "/": "text/html",
        "/dashboard.js": "text/javascript",
        "/dashboard.css": "text/css",
    }
    for path, content_type in expected.items():
        response = await api.request("GET", path)
        body = await response.text()
        assert (response.status, response.content_type) == (200, content_type)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Content-Security-Policy"].startswith(
            "default-src 'self';"
        )
        assert body
    page = await (await api.request("GET", "/")).text()
    assert '<script src="/dashboard.js" defer></script>' in page
    assert '<link rel="stylesheet" href="/dashboard.css">' in page


async def test_the_event_stream_needs_the_reader_right(api):
    response = await api.request("GET", "/api/dashboard/events")
    assert (response.status, (await response.json())["error"]["code"]) == (
        401,
        "unauthorized",
    )
    response = await api.request(
        "GET", "/api/dashboard/events", headers=bearer(RECORDER)
    )
    assert (response.status, (await response.json())["error"]["code"]) == (
        403,
        "forbidden",
    )


# --- the snapshot stream -----------------------------------------------------------


async def test_the_stream_opens_with_a_snapshot_of_the_read_model(api):
    team = await create_team(
        api,
        {"max_limit": 10, "reset_duration": "1d"},
        {"max_limit": 100, "reset_duration": "1M", "calendar_aligned": True},
    )
    key = await create_key(api, team_id=team["id"])
    position = await record(api, key["value"], "2.5")
    await api.caught_up(position)
    async with event_stream(api) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        snapshot = await next_snapshot(response)
    created = instant(team["created_at"])
    day, month = (b["id"] for b in team["budgets"])
    assert snapshot["position"] == position
    assert snapshot["customers"] == []
    [shown_team] = snapshot["teams"]
    assert [
        (
            b["id"],
            b["current_usage"],
            b["max_limit"],
            instant(b["last_reset"]),
            instant(b["next_reset"]),
        )
        for b in shown_team["budgets"]
    ] == [
        (day, Decimal("2.5"), 10, created, created + timedelta(days=1)),
        (
            month,
            Decimal("2.5"),
            100,
            created.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
            first_of_next_month(created),
        ),
    ]
    [shown_key] = snapshot["virtual_keys"]
    assert (shown_key["id"], shown_key["team_id"], shown_key["blocked"]) == (
        key["id"],
        team["id"],
        None,
    )
    assert "value" not in shown_key


async def test_the_stream_sends_a_new_snapshot_when_usage_is_applied(api):
    team = await create_team(api, {"max_limit": 10, "reset_duration": "1d"})
    key = await create_key(api, team_id=team["id"])
    await api.caught_up(await record(api, key["value"], "2.5"))
    async with event_stream(api) as response:
        first = await next_snapshot(response)
        position = await record(api, key["value"], "1.25")
        later = await snapshot_where(response, lambda s: s["position"] >= position)
    assert first["teams"][0]["budgets"][0]["current_usage"] == Decimal("2.5")
    assert later["position"] == position
    assert later["teams"][0]["budgets"][0]["current_usage"] == Decimal("3.75")


async def test_a_key_is_blocked_by_an_exhausted_team_budget_as_the_check_says(api):
    team = await create_team(
        api,
        {"max_limit": 10, "reset_duration": "1d"},
        {"max_limit": 100, "reset_duration": "1M"},
    )
    key = await create_key(api, team_id=team["id"])
    await api.caught_up(await record(api, key["value"], "10"))
    async with event_stream(api) as response:
        snapshot = await next_snapshot(response)
    answer = await check(api, key["id"])
    day = team["budgets"][0]["id"]
    assert snapshot["virtual_keys"][0]["blocked"] == {
        "reason": "budget_exceeded",
        "owner_type": "team",
        "owner_id": team["id"],
        "budget_id": day,
        "current_usage": 10,
        "max_limit": 10,
    }
    assert (answer["reason"], answer["budget_id"], answer["owner_id"]) == (
        "budget_exceeded",
        day,
        team["id"],
    )


async def test_rate_limits_block_before_budgets_and_inactive_keys_are_blocked(api):
    team = await create_team(api, {"max_limit": 1, "reset_duration": "1d"})
    key = await create_key(
        api,
        team_id=team["id"],
        rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"},
    )
    idle = await create_key(api, name="idle", is_active=False)
    await api.caught_up(await record(api, key["value"], "5"))
    async with event_stream(api) as response:
        snapshot = await next_snapshot(response)
    answer = await check(api, key["id"])
    blocked = {k["id"]: k["blocked"] for k in snapshot["virtual_keys"]}
    assert blocked == {
        key["id"]: {
            "reason": "rate_limited",
            "owner_type": "virtual_key",
            "owner_id": key["id"],
            "rate_limit": "requests",
            "current_usage": 1,
            "max_limit": 1,
        },
        idle["id"]: {"reason": "key_inactive"},
    }
    assert (answer["reason"], answer["rate_limit"]) == ("rate_limited", "requests")


async def test_an_open_stream_does_not_hold_up_shutdown(database):
    server = TestServer(create_app(Settings(**TOKENS), database), host="127.0.0.1")
    await server.start_server()
    async with ClientSession() as session:
        response = await session.get(
            server.make_url("/api/dashboard/events"), headers=bearer(READER)
        )
        await next_snapshot(response)
        # Without the on_shutdown hook this waits out aiohttp's 60 s shutdown_timeout.
        async with asyncio.timeout(5):
            await server.close()
        assert await response.content.read() == b""


def test_a_key_with_providers_is_blocked_only_when_every_provider_is():
    now = datetime(2026, 11, 2, 12, tzinfo=UTC)

    def config(config_id: str, used: str) -> dict[str, Any]:
        budget = {
            "id": f"b-{config_id}",
            "max_limit": Decimal(1),
            "reset_duration": "1d",
            "calendar_aligned": True,
            "current_usage": Decimal(used),
        }
        return {"id": config_id, "budgets": [budget], "rate_limit": None}

    def key(*configs: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "k",
            "team_id": None,
            "customer_id": None,
            "is_active": True,
            "budgets": [],
            "rate_limit": None,
            "provider_configs": list(configs),
        }

    partly = key(config("openai", "1"), config("anthropic", "0.5"))
    fully = key(config("openai", "1"), config("anthropic", "2"))
    dashboard.dress([], [], [partly, fully], {}, {}, now)
    openai_blocked = {
        "reason": "budget_exceeded",
        "owner_type": "provider_config",
        "owner_id": "openai",
        "budget_id": "b-openai",
        "current_usage": Decimal(1),
        "max_limit": Decimal(1),
    }
    assert [c["blocked"] for c in partly["provider_configs"]] == [openai_blocked, None]
    assert partly["blocked"] is None
    assert fully["blocked"] == openai_blocked


# --- budget periods ----------------------------------------------------------------


async def append(api: Api, stream_id: str, event: AnyEvent, at: datetime) -> int:
    appended = await eventstore.append(
        api.app[pool_key], stream_id, None, [NewEvent(event=event)], recorded_at=at
    )
    return appended[-1].global_position


async def test_budget_periods_list_the_spend_of_each_past_period(api):
    team_id, budget_id, key_id = (str(uuid.uuid4()) for _ in range(3))
    start = (datetime.now(UTC) - timedelta(days=3)).replace(microsecond=0)
    budget = Budget(budget_id=budget_id, max_limit=Decimal(10), reset_duration="1d")
    await append(
        api,
        f"team-{team_id}",
        TeamCreated(team_id=team_id, name="platform", budgets=(budget,)),
        start,
    )
    for hours, cost in ((1, "1"), (25, "2"), (26, "0.5"), (49, "4")):
        at = start + timedelta(hours=hours)
        usage = UsageRecorded(
            virtual_key_id=key_id,
            team_id=team_id,
            provider="openai",
            model="gpt-4o",
            cost=Decimal(cost),
            occurred_at=at,
        )
        position = await append(api, f"usage-{key_id}", usage, at)
    path = f"/api/governance/budgets/{budget_id}/periods"

    response = await api.request(
        "GET", f"{path}?min_position={position}", headers=bearer(READER)
    )
    assert response.status == 200
    assert await response.json(loads=lambda s: json.loads(s, parse_float=Decimal)) == {
        "periods": [
            {"period_start": iso(start), "spend": 1},
            {"period_start": iso(start + timedelta(days=1)), "spend": Decimal("2.5")},
            {"period_start": iso(start + timedelta(days=2)), "spend": 4},
        ]
    }
    response = await api.request("GET", f"{path}?limit=2", headers=bearer(READER))
    assert [p["period_start"] for p in (await response.json())["periods"]] == [
        iso(start + timedelta(days=1)),
        iso(start + timedelta(days=2)),
    ]


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_budget_periods_answer_404_for_an_unknown_budget_and_need_a_reader(
    api,
):
    path = f"/api/governance/budgets/{MISSING}/periods"
    response = await api.request("GET", path, headers=bearer(READER))
    assert (response.status, (await response.json())["error"]["code"]) == (
        404,
        "not_found",
    )
    response = await api.request(
        "GET", "/api/governance/budgets/nope/periods", headers=bearer(READER)
    )
    assert response.status == 404
    response = await api.request("GET", f"{path}?limit=0", headers=bearer(READER))
    assert response.status == 400
    response = await api.request("GET", path)
    assert response.status == 401


# --- the page in a browser ---------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, which CI installs before the tests (a test installs
    nothing): without it the browser test fails, saying what to do."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"the browser test needs Debian's chromium at {CHROMIUM}: install it"
            " (`apt-get install chromium`, as CI does), or leave the browser tests"
            " out with -m 'not browser'",
            pytrace=False,
        )
    return str(CHROMIUM)


@pytest.mark.slow
@pytest.mark.browser
async def test_the_page_shows_budget_bars_and_follows_usage_live(database, chromium):
    from playwright.async_api import async_playwright, expect

    async with serve(database, Settings(**TOKENS)) as api:
        team = await create_team(
            api,
            {"max_limit": 10, "reset_duration": "1d"},
            {"max_limit": 100, "reset_duration": "1M"},
        )
        day, month = (b["id"] for b in team["budgets"])
        key = await create_key(api, team_id=team["id"])
        await record(api, key["value"], "2.5")
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium, args=CHROMIUM_ARGS
            )
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                await page.goto(api.url("/"))
                await expect(page.locator("#login")).to_be_visible(timeout=10_000)
                await page.fill("#token", READER)
                await page.click("#token-form button[type=submit]")

                def pct(budget_id: str) -> Any:
                    return page.locator(f'[data-budget-id="{budget_id}"] .pct')

                key_row = page.locator(f'.row[data-id="{key["id"]}"]')
                await expect(pct(day)).to_have_text("25%", timeout=10_000)
                await expect(pct(month)).to_have_text("2.5%", timeout=10_000)
                await expect(key_row).to_have_attribute("data-status", "ok")
                # The key has no budget of its own: "Unlimited", never a 0% bar.
                await expect(key_row.locator(".unlimited")).to_have_text(
                    "Unlimited · no budget"
                )
                await expect(key_row.locator(".meter")).to_have_count(0)

                await record(api, key["value"], "2.5")
                await expect(pct(day)).to_have_text("50%", timeout=10_000)
                await expect(pct(month)).to_have_text("5%", timeout=10_000)

                await record(api, key["value"], "5")
                await expect(pct(day)).to_have_text("100%", timeout=10_000)
                await expect(key_row).to_have_attribute(
                    "data-status", "blocked", timeout=10_000
                )
                await expect(key_row.locator(".reason")).to_have_text(
                    "Budget exceeded: team platform 1d budget (10 / 10)"
                )
                assert errors == []
            finally:
                await browser.close()
