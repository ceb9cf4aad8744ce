"""The live dashboard: its page and assets, the snapshot stream (rights, exact
snapshots, blocked keys as the check sees them, live updates), a budget's spend per
period, and the page itself in a real headless Chromium driven by Playwright."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
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

from projections import dashboard, runner
from service import eventstore
from service.config import Settings
from service.domain.events import AnyEvent, Budget, TeamCreated, UsageRecorded
from service.records import NewEvent
from service.web.app import create_app
from service.web.keys import pool_key
from service.web.routes.dashboard import MODULES
from tests.api import Api, bearer, serve
from tests.builders import against_commit_order

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
    assert '<script type="module" src="/dashboard.js"></script>' in page
    assert '<link rel="stylesheet" href="/dashboard.css">' in page


async def test_the_script_modules_are_served_beside_the_page(api):
    """Every module the page imports is served, and nothing else is: the page
    needs no build step."""
    imported: set[str] = set()
    pending = ["/dashboard.js"]
    while pending:
        path = pending.pop()
        response = await api.request("GET", path)
        assert (response.status, response.content_type) == (200, "text/javascript")
        base = path.rsplit("/", 1)[0] if path.count("/") > 1 else "/dashboard"
        for name in re.findall(
            r'from "\./(?:dashboard/)?([a-z]+\.js)"', await response.text()
        ):
            if f"{base}/{name}" not in imported:
                imported.add(f"{base}/{name}")
                pending.append(f"{base}/{name}")
    assert imported == {f"/dashboard/{name}" for name in MODULES}
    response = await api.request("GET", "/dashboard/nope.js")
    assert response.status == 404


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


async def test_a_snapshot_is_as_of_the_highest_position_the_read_model_applied(api):
    # Applied in commit order, the later position first: the checkpoint ends on
    # the earlier one, and a client waiting for `position >= second` must see it.
    first, second = await against_commit_order(api.app[pool_key])
    await api.caught_up(second)
    async with event_stream(api) as response:
        snapshot = await next_snapshot(response)
    assert snapshot["position"] == second
    async with api.app[pool_key].acquire() as conn:
        checkpoint = await runner.load_checkpoint(conn, "governance")
    assert checkpoint.position == first


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
                # The key has no budget of its own (its team's still apply), never a
                # 0% bar.
                await expect(key_row.locator(".unlimited")).to_have_text(
                    "No budget of its own"
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


async def test_the_page_shows_money_exactly_as_the_service_keeps_it(api, chromium):
    """Every digit, from the snapshot stream too: 0.999999999 of 1 is not "1 / 1 ·
    100%" (nor full), and a limit of 18 integer digits is not a float's."""
    from playwright.async_api import expect

    team = await create_team(
        api,
        {"max_limit": 1, "reset_duration": "1d"},
        {"max_limit": "123456789012345678.123456789", "reset_duration": "1w"},
    )
    day, week = (b["id"] for b in team["budgets"])
    key = await create_key(api, team_id=team["id"])
    await record(api, key["value"], "0.999999999")
    async with browser_for(chromium) as browser:
        reader = await signed_in(browser, api, READER)

        def meter(budget_id: str, part: str) -> Any:
            return reader.page.locator(f'[data-budget-id="{budget_id}"] {part}')

        await expect(meter(day, ".amount")).to_have_text(
            "0.999999999 / 1", timeout=10_000
        )
        await expect(meter(day, ".pct")).to_have_text("99.9%")
        await expect(meter(day, ".fill.ok, .fill.warn")).to_have_count(1)
        await expect(meter(week, ".amount")).to_have_text(
            "0.999999999 / 123,456,789,012,345,678.123456789"
        )
        await expect(reader.row(key["id"])).to_have_attribute("data-status", "ok")
        assert reader.errors == []


# --- the page's pure modules, under node ------------------------------------------

STATIC_TESTS = Path(__file__).parent / "static"


def test_the_page_s_pure_modules_pass_their_node_tests():
    """The reconciliation preview, the error locator, the idempotency keys and the
    bar shares, each tested under `node --test` (tests/static/)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("tests/static/ needs node (20 or later) on PATH", pytrace=False)
    files = sorted(STATIC_TESTS.glob("*.test.mjs"))
    declared = sum(len(re.findall(r"^test\(", f.read_text(), re.M)) for f in files)
    result = subprocess.run(
        [node, "--test", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.findall(r"^# (pass|fail) (\d+)$", result.stdout, re.M) == [
        ("pass", str(declared)),
        ("fail", "0"),
    ]


# --- managing governance from the page ----------------------------------------------


class Tab:
    """One signed-in page, with the script errors it raised."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    @property
    def editor(self) -> Any:
        return self.page.locator("#editor")

    @property
    def confirm(self) -> Any:
        return self.page.locator("#confirm-dialog")

    def field(self, path: str) -> Any:
        return self.page.locator(f'[data-path="{path}"]')

    def row(self, entity_id: str) -> Any:
        return self.page.locator(f'.row[data-id="{entity_id}"]')

    def action(self, verb: str, entity_id: str) -> Any:
        return self.page.locator(f'button[data-action="{verb}"][data-id="{entity_id}"]')

    def pct(self, budget_id: str) -> Any:
        return self.page.locator(f'[data-budget-id="{budget_id}"] .pct')

    async def announced(self, text: str) -> None:
        from playwright.async_api import expect

        await expect(self.page.locator("#announce")).to_have_text(text, timeout=10_000)

    async def add_budget(self, limit: str, duration: str, scope: str = "$") -> None:
        """Add a budget row to the open editor (of the owner, or of `scope`)."""
        rows = await self.page.locator(
            f'[data-path^="{scope}.budgets["][data-path$="].max_limit"]'
        ).count()
        box = self.editor if scope == "$" else self.editor.locator("section.provider")
        await box.get_by_role("button", name="Add budget").last.click()
        await self.field(f"{scope}.budgets[{rows}].max_limit").fill(limit)
        await self.field(f"{scope}.budgets[{rows}].reset_duration").fill(duration)


@asynccontextmanager
async def browser_for(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


async def signed_in(browser: Any, api: Api, token: str, **context: Any) -> Tab:
    """A new tab of its own (sessionStorage is per tab) signed in with `token`."""
    from playwright.async_api import expect

    page = await (await browser.new_context(**context)).new_page()
    tab = Tab(page)
    await page.goto(api.url("/"))
    await page.fill("#token", token)
    await page.click("#token-form button[type=submit]")
    role = "Admin" if token == ADMIN else "Read-only"
    await expect(page.locator("#role")).to_have_text(role, timeout=10_000)
    await expect(page.locator("#board")).to_be_visible()
    return tab


async def hold(api: Api, secret: str, cost: str) -> None:
    """A reservation of `cost` on the key's chain, left open."""
    status, answer = await api.call(
        "POST",
        "/api/governance/check",
        {"virtual_key": secret, "reserve": True, "estimated_cost": cost},
        headers=bearer(RECORDER),
    )
    assert (status, answer["allowed"]) == (200, True), answer


async def settled(api: Api) -> None:
    """Return once the read model and the cache have applied the whole log: the
    page's writes carry positions the test does not see."""
    status, page = await api.call(
        "GET", "/api/events?limit=10000", headers=bearer(ADMIN)
    )
    assert status == 200, page
    await api.caught_up(page["next_after"])


async def read(api: Api, path: str) -> Any:
    """GET `path` as a reader, once everything written so far is applied."""
    await settled(api)
    status, answer = await api.call("GET", path, headers=bearer(READER), exact=True)
    assert status == 200, answer
    return answer


def limits_of(entity: Any) -> list[tuple[Any, str, bool]]:
    return [
        (b["max_limit"], b["reset_duration"], b["calendar_aligned"])
        for b in entity["budgets"]
    ]


@pytest.mark.slow
@pytest.mark.browser
async def test_an_admin_builds_a_team_and_key_and_a_raised_limit_unblocks_it(
    api, chromium
):
    """Customer → team with two budgets → key; its secret copied once; usage
    recorded through the API moves the bars and blocks the key; raising the limit
    from the page unblocks it."""
    from playwright.async_api import expect

    async with browser_for(chromium) as browser:
        tab = await signed_in(
            browser, api, ADMIN, permissions=["clipboard-read", "clipboard-write"]
        )
        page = tab.page
        await page.get_by_role("button", name="New customer").click()
        await tab.editor.get_by_label("Name", exact=True).fill("Acme")
        await tab.editor.get_by_role("button", name="Create customer").click()
        await tab.announced("Customer Acme created.")
        [customer] = (await read(api, "/api/governance/customers"))["customers"]

        await page.get_by_role("button", name="New team").click()
        await tab.editor.get_by_label("Name", exact=True).fill("platform")
        await tab.editor.get_by_label("Customer").select_option(label="Acme")
        await tab.add_budget("10", "1d")
        await tab.add_budget("100", "1M")
        await tab.editor.get_by_label("Budget 2 Calendar aligned").check()
        previews = tab.editor.locator(".budget-row .preview")
        await expect(previews).to_have_text(
            ["A new budget: its usage starts at 0."] * 2
        )
        await tab.editor.get_by_role("button", name="Create team").click()
        await tab.announced("Team platform created.")
        [team] = (await read(api, "/api/governance/teams"))["teams"]
        assert (team["name"], team["customer_id"], limits_of(team)) == (
            "platform",
            customer["id"],
            [(10, "1d", False), (100, "1M", True)],
        )
        day, month = (b["id"] for b in team["budgets"])

        await page.get_by_role("button", name="New virtual key").click()
        await tab.editor.get_by_label("Name", exact=True).fill("ci")
        await tab.editor.get_by_label("Belongs to").select_option(label="platform")
        await tab.editor.get_by_role("button", name="Create virtual key").click()
        dialog = page.locator("#secret-dialog")
        await expect(dialog).to_be_visible(timeout=10_000)
        await expect(dialog.locator("#secret-title")).to_have_text(
            "Secret of the new key ci"
        )
        await expect(dialog.locator("#secret-warning")).to_contain_text(
            "Shown only this once."
        )
        secret = await page.locator("#secret-value").input_value()
        assert re.fullmatch(r"sk-gl-[A-Za-z0-9_-]{32}", secret)
        await dialog.get_by_role("button", name="Copy").click()
        await expect(page.locator("#secret-status")).to_have_text(
            "Copied to the clipboard."
        )
        copied = await page.evaluate("navigator.clipboard.readText()")
        stored = await page.evaluate(
            "JSON.stringify([{...sessionStorage}, {...localStorage}])"
        )
        assert (copied, secret in stored) == (secret, False)
        await dialog.get_by_role("button", name="Done, I have stored it").click()
        await expect(dialog).to_be_hidden()
        await tab.announced("Virtual key ci created.")
        assert await page.locator("#secret-value").input_value() == ""
        assert secret not in await page.content()
        [key] = (await read(api, "/api/governance/virtual-keys"))["virtual_keys"]
        assert (key["name"], key["team_id"], key["value_hint"]) == (
            "ci",
            team["id"],
            secret[-4:],
        )

        await record(api, copied, "2.5")
        await expect(tab.pct(day)).to_have_text("25%", timeout=10_000)
        await expect(tab.pct(month)).to_have_text("2.5%", timeout=10_000)
        # An open reservation shows as a second shade after the spent part.
        await hold(api, copied, "1")
        held = page.locator(f'[data-budget-id="{day}"] .fill.held')
        await expect(held).to_have_attribute("style", "width: 10%;", timeout=10_000)
        await expect(page.locator(f'[data-budget-id="{day}"] .amount')).to_have_text(
            "2.5 + 1 held / 10"
        )
        await record(api, copied, "7.5")
        await expect(tab.pct(day)).to_have_text("100%", timeout=10_000)
        await expect(tab.row(key["id"])).to_have_attribute(
            "data-status", "blocked", timeout=10_000
        )

        await tab.action("edit", team["id"]).click()
        await tab.field("$.budgets[0].max_limit").fill("20")
        await expect(previews.first).to_have_text(
            "Usage kept: the current usage (10) stays; the limit changes from 10 to 20."
        )
        await tab.editor.get_by_role("button", name="Save").click()
        await tab.announced("Team platform saved.")
        await expect(tab.pct(day)).to_have_text("50%", timeout=10_000)
        await expect(tab.row(key["id"])).to_have_attribute(
            "data-status", "ok", timeout=10_000
        )
        await settled(api)
        answer = await check(api, key["id"])
        assert (answer["allowed"], answer["remaining"]) == (True, 9)
        assert tab.errors == []


@pytest.mark.slow
@pytest.mark.browser
async def test_an_edit_saved_in_another_tab_meanwhile_gets_the_409_path(api, chromium):
    from playwright.async_api import expect

    team = await create_team(api, {"max_limit": 10, "reset_duration": "1d"})
    opened = team["version"]
    async with browser_for(chromium) as browser:
        first = await signed_in(browser, api, ADMIN)
        second = await signed_in(browser, api, ADMIN)
        for tab in (first, second):
            await tab.action("edit", team["id"]).click()
            await expect(tab.editor.locator(".version")).to_have_text(
                f"version {opened}"
            )

        await second.field("$.name").fill("platform-b")
        await second.editor.get_by_role("button", name="Save").click()
        await second.announced("Team platform-b saved.")

        await first.field("$.budgets[0].max_limit").fill("25")
        await first.editor.get_by_role("button", name="Save").click()
        alert = first.editor.locator(".form-alert")
        await expect(alert).to_contain_text(
            "Someone else changed this team after you opened it (you opened"
            f" version {opened}). Nothing was changed"
        )
        reload = alert.get_by_role("button", name="Reload the latest version")
        await expect(reload).to_be_focused()
        found = (await read(api, f"/api/governance/teams/{team['id']}"))["team"]
        assert (found["name"], limits_of(found), found["version"]) == (
            "platform-b",
            [(10, "1d", False)],
            opened + 1,
        )

        await reload.click()
        await expect(first.editor.locator(".form-note")).to_have_text(
            f"Reloaded: this is team platform-b at version {opened + 1}."
        )
        await expect(first.field("$.name")).to_have_value("platform-b")
        await expect(first.editor.locator(".version")).to_have_text(
            f"version {opened + 1}"
        )
        await first.field("$.budgets[0].max_limit").fill("25")
        await first.editor.get_by_role("button", name="Save").click()
        await first.announced("Team platform-b saved.")
        found = (await read(api, f"/api/governance/teams/{team['id']}"))["team"]
        assert (found["name"], limits_of(found), found["version"]) == (
            "platform-b",
            [(25, "1d", False)],
            opened + 2,
        )
        assert first.errors + second.errors == []


@pytest.mark.slow
@pytest.mark.browser
async def test_a_reader_sees_no_edit_controls_and_the_service_refuses_it_anyway(
    api, chromium
):
    from playwright.async_api import expect

    team = await create_team(api, {"max_limit": 10, "reset_duration": "1d"})
    key = await create_key(api, team_id=team["id"])
    editing = re.compile(r"^(New|Edit|Delete|Deactivate|Activate|Rotate)\b")
    async with browser_for(chromium) as browser:
        reader = await signed_in(browser, api, READER)
        await expect(reader.row(key["id"])).to_be_visible()
        await expect(reader.page.locator("button[data-action]")).to_have_count(0)
        await expect(reader.page.get_by_role("button", name=editing)).to_have_count(0)
        # Signed out, the header keeps nothing of the session: no role, no time.
        await expect(reader.page.locator("#role")).to_have_text("Read-only")
        await reader.page.locator("#signout").click()
        await expect(reader.page.locator("#login")).to_be_visible()
        await expect(reader.page.locator("#role")).to_be_hidden()
        await expect(reader.page.locator("#updated")).to_have_text("")
        # The same board for an admin: the new buttons, then Edit and Delete for
        # the team, Edit, Deactivate, Rotate and Delete for the key.
        admin = await signed_in(browser, api, ADMIN)
        await expect(admin.row(key["id"])).to_be_visible()
        await expect(admin.page.get_by_role("button", name=editing)).to_have_text(
            [
                "New customer",
                "New team",
                "Edit",
                "Delete",
                "New virtual key",
                "Edit",
                "Deactivate",
                "Rotate secret",
                "Delete",
            ]
        )
        assert reader.errors + admin.errors == []
    status, answer = await api.call(
        "PUT",
        f"/api/governance/teams/{team['id']}",
        {"name": "renamed"},
        headers=bearer(READER),
    )
    assert (status, answer["error"]["code"]) == (403, "forbidden")


@pytest.mark.slow
@pytest.mark.browser
async def test_a_refused_value_is_shown_beside_its_field_with_code_and_message(
    api, chromium
):
    from playwright.async_api import expect

    async with browser_for(chromium) as browser:
        tab = await signed_in(browser, api, ADMIN)
        await tab.page.get_by_role("button", name="New team").click()
        await tab.editor.get_by_label("Name", exact=True).fill("platform")
        await tab.add_budget("0", "1d")
        await tab.add_budget("5", "2d")
        await tab.editor.get_by_label("Budget 2 Calendar aligned").check()
        create = tab.editor.get_by_role("button", name="Create team")
        await create.click()
        limit = tab.field("$.budgets[0].max_limit")
        await expect(limit).to_have_attribute("aria-invalid", "true")
        await expect(limit).to_be_focused()
        await expect(tab.editor.locator(".field-error:visible")).to_have_text(
            [
                "invalid_max_limit: max_limit of the '1d' budget must be greater"
                " than 0, got '0'"
            ]
        )
        await expect(limit).to_have_accessible_description(
            re.compile("^invalid_max_limit: ")
        )

        await limit.fill("5")
        await create.click()
        aligned = tab.field("$.budgets[1].calendar_aligned")
        await expect(aligned).to_have_attribute("aria-invalid", "true")
        await expect(limit).not_to_have_attribute("aria-invalid", "true")
        await expect(tab.editor.locator(".field-error:visible")).to_have_text(
            [
                "invalid_calendar_alignment: calendar_aligned needs a"
                " reset_duration of 1d, 1w, 1M, 1Q or 1Y, got '2d'"
            ]
        )

        await aligned.uncheck()
        await create.click()
        await tab.announced("Team platform created.")
        [team] = (await read(api, "/api/governance/teams"))["teams"]
        assert limits_of(team) == [(5, "1d", False), (5, "2d", False)]
        assert tab.errors == []


@pytest.mark.slow
@pytest.mark.browser
async def test_a_retry_after_a_lost_answer_and_a_double_click_each_act_once(
    api, chromium
):
    from playwright.async_api import expect

    async with browser_for(chromium) as browser:
        tab = await signed_in(browser, api, ADMIN)
        page = tab.page
        sent: list[tuple[str, str]] = []
        page.on(
            "request",
            lambda request: (
                sent.append(
                    (request.post_data_json["name"], request.headers["idempotency-key"])
                )
                if request.method == "POST"
                else None
            ),
        )
        lost: list[int] = []

        async def lose_the_answer(route: Any) -> None:
            # The request reaches the service and commits; its answer never
            # reaches the page.
            lost.append((await route.fetch()).status)
            await route.abort("connectionreset")

        await page.route("**/api/governance/customers", lose_the_answer, times=1)
        await page.get_by_role("button", name="New customer").click()
        await tab.editor.get_by_label("Name", exact=True).fill("Acme")
        create = tab.editor.get_by_role("button", name="Create customer")
        await create.click()
        await expect(tab.editor.locator(".form-alert")).to_contain_text(
            "Trying again without changing anything is safe: it sends the same"
            " request with the same Idempotency-Key"
        )
        assert lost == [201]
        await create.click()
        await tab.announced("Customer Acme created.")

        await page.get_by_role("button", name="New customer").click()
        await tab.editor.get_by_label("Name", exact=True).fill("Globex")
        await tab.editor.get_by_role("button", name="Create customer").dblclick()
        await tab.announced("Customer Globex created.")

        customers = (await read(api, "/api/governance/customers"))["customers"]
        assert sorted(c["name"] for c in customers) == ["Acme", "Globex"]
        assert [name for name, _ in sent] == ["Acme", "Acme", "Globex"]
        assert sent[0][1] == sent[1][1] != sent[2][1]
        assert tab.errors == []


@pytest.mark.slow
@pytest.mark.browser
async def test_a_key_is_deactivated_rotated_given_a_provider_and_deleted(api, chromium):
    from playwright.async_api import expect

    key = await create_key(api)
    async with browser_for(chromium) as browser:
        tab = await signed_in(browser, api, ADMIN)
        row = tab.row(key["id"])
        confirm = tab.confirm.get_by_role("button")

        await tab.action("deactivate", key["id"]).click()
        await expect(tab.confirm.locator("h2")).to_have_text("Deactivate key ci?")
        await confirm.filter(has_text="Deactivate").click()
        await tab.announced("Virtual key ci deactivated.")
        await expect(row).to_have_attribute("data-status", "inactive", timeout=10_000)
        await settled(api)
        assert (await check(api, key["id"]))["reason"] == "key_inactive"
        await tab.action("activate", key["id"]).click()
        await confirm.filter(has_text="Activate").click()
        await tab.announced("Virtual key ci activated.")
        await expect(row).to_have_attribute("data-status", "ok", timeout=10_000)

        await tab.action("rotate", key["id"]).click()
        await confirm.filter(has_text="Rotate secret").click()
        secret = tab.page.locator("#secret-dialog")
        await expect(secret.locator("#secret-title")).to_have_text(
            "New secret of key ci"
        )
        rotated = await tab.page.locator("#secret-value").input_value()
        # Shown only this once: Escape does not throw it away.
        await tab.page.keyboard.press("Escape")
        await expect(secret).to_be_visible()
        await expect(secret.locator("#secret-status")).to_contain_text(
            "Store the secret first"
        )
        assert await tab.page.locator("#secret-value").input_value() == rotated
        await secret.get_by_role("button", name="Done, I have stored it").click()
        await tab.announced("Virtual key ci rotated.")
        assert re.fullmatch(r"sk-gl-[A-Za-z0-9_-]{32}", rotated)
        assert rotated != key["value"]
        await settled(api)
        await record(api, rotated, "0.5")
        status, answer = await api.call(
            "POST",
            "/api/governance/check",
            {"virtual_key": key["value"]},
            headers=bearer(READER),
        )
        assert (status, answer["reason"]) == (200, "unknown_virtual_key")

        await tab.action("edit", key["id"]).click()
        await tab.editor.get_by_role("button", name="Add provider").click()
        await tab.field("$.provider_configs[0].provider").fill("openai")
        await tab.editor.get_by_label("Provider 1 All models").uncheck()
        await tab.field("$.provider_configs[0].allowed_models").fill("gpt-4o, o3")
        await tab.add_budget("5", "1d", scope="$.provider_configs[0]")
        await tab.field("$.provider_configs[0].rate_limit.token_max_limit").fill("1000")
        await tab.field("$.provider_configs[0].rate_limit.token_reset_duration").fill(
            "1h"
        )
        await tab.field("$.rate_limit.request_max_limit").fill("60")
        await tab.field("$.rate_limit.request_reset_duration").fill("1m")
        await tab.editor.get_by_role("button", name="Save").click()
        await tab.announced("Virtual key ci saved.")
        await expect(row.locator(".subhead")).to_have_text("openai gpt-4o, o3")
        found = (await read(api, f"/api/governance/virtual-keys/{key['id']}"))[
            "virtual_key"
        ]
        [config] = found["provider_configs"]
        assert (
            config["provider"],
            config["allowed_models"],
            limits_of(config),
            config["rate_limit"]["token_max_limit"],
            config["rate_limit"]["token_reset_duration"],
            found["rate_limit"]["request_max_limit"],
            found["rate_limit"]["request_reset_duration"],
            found["rate_limit"]["token_max_limit"],
        ) == (
            "openai",
            ["gpt-4o", "o3"],
            [(5, "1d", False)],
            1000,
            "1h",
            60,
            "1m",
            None,
        )

        # Left out of the list, or renamed, a provider config goes with its budgets
        # and their usage: the form says so before anything is saved.
        await tab.action("edit", key["id"]).click()
        await tab.field("$.provider_configs[0].provider").fill("azure")
        removed = tab.editor.locator(".providers > .dropped li")
        await expect(removed).to_have_text(
            "Provider openai is removed: its 1d budget (usage 0) and its rate limit"
            " are deleted with their usage."
        )
        await tab.field("$.provider_configs[0].provider").fill("openai")
        await expect(removed).to_have_count(0)
        await tab.editor.get_by_role("button", name="Remove provider openai").click()
        await expect(removed).to_have_count(1)
        await tab.editor.get_by_role("button", name="Cancel").click()

        await tab.action("delete", key["id"]).click()
        await expect(tab.confirm.locator("h2")).to_have_text("Delete virtual key ci?")
        await confirm.filter(has_text="Delete").click()
        await tab.announced("Virtual key ci deleted.")
        await expect(row).to_have_count(0, timeout=10_000)
        status, _ = await api.call(
            "GET", f"/api/governance/virtual-keys/{key['id']}", headers=bearer(READER)
        )
        assert status == 404
        assert tab.errors == []


@pytest.mark.slow
@pytest.mark.browser
async def test_the_forms_work_from_the_keyboard_and_every_control_has_a_label(
    api, chromium
):
    from playwright.async_api import expect

    async with browser_for(chromium) as browser:
        tab = await signed_in(browser, api, ADMIN)
        page = tab.page
        new = page.get_by_role("button", name="New team")
        await new.focus()
        await page.keyboard.press("Enter")
        name = tab.editor.get_by_label("Name", exact=True)
        create = tab.editor.get_by_role("button", name="Create team")
        await expect(name).to_be_focused()
        # Tab stays inside the dialog, both ways round.
        await page.keyboard.press("Shift+Tab")
        await expect(create).to_be_focused()
        await page.keyboard.press("Tab")
        await expect(name).to_be_focused()
        # Escape closes it, and focus goes back to what opened it.
        await page.keyboard.press("Escape")
        await expect(tab.editor).to_be_hidden()
        await expect(new).to_be_focused()

        await page.keyboard.press("Enter")
        await expect(name).to_be_focused()
        await page.keyboard.type("platform")
        await page.keyboard.press("Tab")  # the customer
        await page.keyboard.press("Tab")  # add a budget
        await expect(
            tab.editor.get_by_role("button", name="Add budget")
        ).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(tab.editor.get_by_label("Budget 1 Max limit")).to_be_focused()
        await page.keyboard.type("10")
        await page.keyboard.press("Tab")
        await expect(tab.editor.get_by_label("Budget 1 Reset duration")).to_be_focused()
        await page.keyboard.type("1d")
        await page.keyboard.press("Enter")  # submits the form
        await tab.announced("Team platform created.")
        await expect(new).to_be_focused()
        [team] = (await read(api, "/api/governance/teams"))["teams"]
        assert (team["name"], limits_of(team)) == ("platform", [(10, "1d", False)])

        # Every control of the largest form is named by its label.
        await page.get_by_role("button", name="New virtual key").click()
        await tab.editor.get_by_role("button", name="Add budget").first.click()
        await tab.editor.get_by_role("button", name="Add provider").click()
        await tab.add_budget("1", "1d", scope="$.provider_configs[0]")
        controls = tab.editor.locator("input, select")
        labels = await controls.evaluate_all(
            "els => els.map(e => [...e.labels].map(l => l.textContent).join())"
        )
        assert labels == [
            "Name",
            "Belongs to",
            "Active",
            "Budget 1 Max limit",
            "Budget 1 Reset duration",
            "Budget 1 Calendar aligned",
            "Token limit",
            "Token window",
            "Request limit",
            "Request window",
            "Provider 1 Provider",
            "Provider 1 All models",
            "Provider 1 Allowed models",
            "Provider 1 budget 1 Max limit",
            "Provider 1 budget 1 Reset duration",
            "Provider 1 budget 1 Calendar aligned",
            "Provider 1 Token limit",
            "Provider 1 Token window",
            "Provider 1 Request limit",
            "Provider 1 Request window",
        ]
        buttons = await tab.editor.get_by_role("button").all_text_contents()
        assert all(text.strip() for text in buttons), buttons
        assert tab.errors == []
