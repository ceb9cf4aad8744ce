"""`make screenshot`: the dashboard with demo data, rendered by headless Chromium
into docs/dashboard.png, and beside it the main screens of managing governance:
docs/dashboard-manage.png (a team's edit form, each budget saying what saving does to
its usage) and docs/dashboard-secret.png (a new key's one-time secret).

Starts a throwaway PostgreSQL, appends two weeks of demo history (2 customers,
3 teams, 5 keys; usage that leaves bars at various levels and one key blocked),
takes one open reservation, serves the app on a free loopback port and drives the
page as an administrator through Playwright and Debian's chromium
(`/usr/bin/chromium`).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from aiohttp import ClientSession, web

from service import eventstore, pgcluster
from service.config import Settings
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerCreated,
    ProviderConfig,
    RateLimit,
    TeamCreated,
    UsageRecorded,
    VirtualKeyCreated,
)
from service.migrate import migrate
from service.records import NewEvent
from service.web.app import create_app
from service.web.keys import governance_projector_key

CHROMIUM = "/usr/bin/chromium"
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
TOKEN = "demo-admin"
HISTORY_DAYS = 14


def _id(name: str) -> str:
    """A stable id per demo name, so reruns draw the same picture."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"govledger:demo:{name}"))


def _budget(name: str, max_limit: int, duration: str, aligned: bool = True) -> Budget:
    return Budget(
        budget_id=_id(f"budget:{name}"),
        max_limit=Decimal(max_limit),
        reset_duration=duration,
        calendar_aligned=aligned,
    )


def _key(name: str, **fields: object) -> VirtualKeyCreated:
    secret = f"sk-gl-demo-{name}"
    return VirtualKeyCreated(
        virtual_key_id=_id(f"key:{name}"),
        name=name,
        value_sha256=hashlib.sha256(secret.encode()).hexdigest(),
        value_hint=hashlib.sha256(name.encode()).hexdigest()[:4],
        **fields,  # type: ignore[arg-type]
    )


ACME, GLOBEX = _id("customer:acme"), _id("customer:globex")
PLATFORM, RESEARCH, DATA = _id("team:platform"), _id("team:research"), _id("team:data")
OPENAI = _id("config:analytics-etl:openai")

ENTITIES: Sequence[tuple[str, AnyEvent]] = (
    (
        f"customer-{ACME}",
        CustomerCreated(
            customer_id=ACME,
            name="Acme Corp",
            budgets=(_budget("acme:month", 5000, "1M"),),
        ),
    ),
    (
        f"customer-{GLOBEX}",
        CustomerCreated(
            customer_id=GLOBEX,
            name="Globex",
            budgets=(_budget("globex:month", 1500, "1M"),),
        ),
    ),
    (
        f"team-{PLATFORM}",
        TeamCreated(
            team_id=PLATFORM,
            name="Platform",
            customer_id=ACME,
            budgets=(
                _budget("platform:day", 150, "1d"),
                _budget("platform:month", 3000, "1M"),
            ),
        ),
    ),
    (
        f"team-{RESEARCH}",
        TeamCreated(
            team_id=RESEARCH,
            name="Research",
            customer_id=ACME,
            budgets=(_budget("research:day", 40, "1d"),),
        ),
    ),
    (
        f"team-{DATA}",
        TeamCreated(
            team_id=DATA,
            name="Data Science",
            customer_id=GLOBEX,
            budgets=(_budget("data:week", 420, "1w"),),
            rate_limit=RateLimit(token_max_limit=2_000_000, token_reset_duration="1h"),
        ),
    ),
    (
        f"virtual_key-{_id('key:prod-gateway')}",
        _key(
            "prod-gateway",
            team_id=PLATFORM,
            budgets=(_budget("prod-gateway:day", 100, "1d", aligned=False),),
            rate_limit=RateLimit(request_max_limit=10_000, request_reset_duration="1h"),
        ),
    ),
    (f"virtual_key-{_id('key:ci-pipeline')}", _key("ci-pipeline", team_id=PLATFORM)),
    (
        f"virtual_key-{_id('key:notebooks')}",
        _key(
            "notebooks",
            team_id=RESEARCH,
            budgets=(_budget("notebooks:day", 60, "1d"),),
        ),
    ),
    (
        f"virtual_key-{_id('key:analytics-etl')}",
        _key(
            "analytics-etl",
            team_id=DATA,
            provider_configs=(
                ProviderConfig(
                    provider_config_id=OPENAI,
                    provider="openai",
                    allowed_models=("gpt-4o", "gpt-4o-mini"),
                    budgets=(_budget("analytics-etl:openai:day", 50, "1d"),),
                ),
                ProviderConfig(
                    provider_config_id=_id("config:analytics-etl:anthropic"),
                    provider="anthropic",
                ),
            ),
        ),
    ),
    (
        f"virtual_key-{_id('key:legacy-batch')}",
        _key(
            "legacy-batch",
            customer_id=GLOBEX,
            is_active=False,
            budgets=(_budget("legacy-batch:month", 200, "1M"),),
        ),
    ),
)

# key → (team, customer, provider config, typical daily spend, spend today)
SPENDERS = {
    "prod-gateway": (PLATFORM, ACME, None, Decimal(60), Decimal("42.30")),
    "ci-pipeline": (PLATFORM, ACME, None, Decimal(55), Decimal("54.85")),
    "notebooks": (RESEARCH, ACME, None, Decimal(30), Decimal(40)),
    "analytics-etl": (DATA, GLOBEX, OPENAI, Decimal(42), Decimal("47.60")),
    "legacy-batch": (None, GLOBEX, None, Decimal(4), Decimal(0)),
}


def _usage(
    name: str, cost: Decimal, at: datetime, requests: int = 1, tokens: int = 0
) -> UsageRecorded:
    team, customer, config, _, _ = SPENDERS[name]
    return UsageRecorded(
        virtual_key_id=_id(f"key:{name}"),
        provider="openai",
        model="gpt-4o",
        cost=cost,
        input_tokens=tokens * 3 // 4,
        output_tokens=tokens - tokens * 3 // 4,
        requests=requests,
        occurred_at=at,
        provider_config_id=config,
        team_id=team,
        customer_id=customer,
    )


def demo_history(now: datetime) -> list[tuple[datetime, str, AnyEvent]]:
    """(recorded_at, stream, event) in log order: the entities, then the usage."""
    # Rolling windows (the 1h rate limits, the rolling 1d budget) start 30 min ago.
    created = now - timedelta(days=HISTORY_DAYS + 6, minutes=30)
    log: list[tuple[datetime, str, AnyEvent]] = [
        (created, stream, event) for stream, event in ENTITIES
    ]
    rng = random.Random(7)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    for day in range(HISTORY_DAYS + 5, 0, -1):
        for name, (*_, typical, _today) in SPENDERS.items():
            factor = Decimal(rng.randint(55, 135)) / 100
            cost = (typical * factor).quantize(Decimal("0.01"))
            at = today - timedelta(days=day) + timedelta(hours=rng.randint(8, 18))
            log.append((at, f"usage-{_id('key:' + name)}", _usage(name, cost, at)))
    # Today, in the last 20 minutes: the current windows of every limit.
    recent = now - timedelta(minutes=20)
    for name, (*_, today_spend) in SPENDERS.items():
        if not today_spend:
            continue
        for i, share in enumerate((Decimal("0.5"), Decimal("0.3"), Decimal("0.2"))):
            at = recent + timedelta(minutes=5 * i, seconds=rng.randint(0, 59))
            usage = _usage(
                name,
                today_spend * share,
                at,
                requests=2_630 if name == "prod-gateway" else 40,
                tokens=413_000 if name == "analytics-etl" else 9_000,
            )
            log.append((at, f"usage-{_id('key:' + name)}", usage))
    return log


async def _populate(dsn: str, now: datetime) -> int:
    pool = await eventstore.create_pool(dsn, min_size=1, max_size=2)
    position = 0
    try:
        for at, stream, event in demo_history(now):
            appended = await eventstore.append(
                pool, stream, None, [NewEvent(event=event)], recorded_at=at
            )
            position = appended[-1].global_position
    finally:
        await pool.close()
    return position


def shots(out: Path) -> tuple[Path, Path, Path]:
    """The board, the edit form and the secret dialog: `out` and two beside it."""
    return (
        out,
        out.with_name(f"{out.stem}-manage{out.suffix}"),
        out.with_name(f"{out.stem}-secret{out.suffix}"),
    )


async def _shoot(url: str, out: Path) -> None:
    from playwright.async_api import async_playwright, expect

    board, manage, secret = shots(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            await page.goto(url)
            await page.fill("#token", TOKEN)
            await page.click("#token-form button[type=submit]")
            await page.wait_for_selector(".row[data-id] .actions", timeout=15_000)
            for budget in ("platform:day", "research:day"):
                await page.click(f'[data-budget-id="{_id("budget:" + budget)}"]')
            # Locators, not wait_for_function: the page's CSP forbids eval.
            await expect(page.locator(".chart svg")).to_have_count(2, timeout=15_000)
            await page.screenshot(path=str(board), full_page=True)

            # A team's form: a raised limit (usage kept), a budget turned rolling
            # (this calendar period's usage kept), a new weekly budget (usage 0).
            await page.set_viewport_size({"width": 1360, "height": 1020})
            await page.click(f'button[data-action="edit"][data-id="{PLATFORM}"]')
            editor = page.locator("#editor")
            await page.fill('[data-path="$.budgets[0].max_limit"]', "200")
            await page.uncheck('[data-path="$.budgets[1].calendar_aligned"]')
            await editor.get_by_role("button", name="Add budget").click()
            await page.fill('[data-path="$.budgets[2].max_limit"]', "900")
            await page.fill('[data-path="$.budgets[2].reset_duration"]', "1w")
            await page.locator('[data-path="$.budgets[2].reset_duration"]').blur()
            await expect(editor.locator('.preview[data-kind="new"]')).to_have_count(1)
            await page.screenshot(path=str(manage))
            await page.keyboard.press("Escape")

            # A new key under Platform: its secret, shown once.
            await page.set_viewport_size({"width": 1360, "height": 720})
            await page.click('button[data-action="new"][data-kind="virtual_key"]')
            await page.fill('[data-path="$.name"]', "staging-gateway")
            await page.select_option('[data-path="$.team_id"]', f"team:{PLATFORM}")
            await editor.get_by_role("button", name="Create virtual key").click()
            await expect(page.locator("#secret-dialog")).to_be_visible(timeout=15_000)
            await page.screenshot(path=str(secret))
        finally:
            await browser.close()


async def _hold(base: str) -> int:
    """An open reservation on prod-gateway's chain (the second shade of its bars),
    taken as a gateway takes one; the position of the hold."""
    async with (
        ClientSession() as session,
        session.post(
            f"{base}/api/governance/check",
            json={
                "virtual_key_id": _id("key:prod-gateway"),
                "reserve": True,
                "estimated_cost": "12",
                "estimated_tokens": 1500,
                "ttl_s": 3600,
            },
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as response,
    ):
        answer = await response.json()
    if not answer.get("allowed"):
        raise RuntimeError(f"the demo reservation was refused: {answer}")
    return int(answer["position"])


async def screenshot(dsn: str, out: Path) -> None:
    await migrate(dsn)
    position = await _populate(dsn, datetime.now(UTC))
    app = create_app(Settings(admin_tokens=frozenset({TOKEN})), dsn)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        await app[governance_projector_key].wait_for(position, 60)
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        await app[governance_projector_key].wait_for(await _hold(base), 60)
        await _shoot(f"{base}/", out)
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] = sys.argv[1:]) -> None:
    out = Path(argv[0] if argv else "docs/dashboard.png")
    with pgcluster.throwaway() as dsn:
        asyncio.run(screenshot(dsn, out))
    for path in shots(out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
