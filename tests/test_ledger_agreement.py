"""Every consumer of the one budget ledger agrees, on real PostgreSQL: random
histories of definitions (current and legacy), usage around reset instants, time
moving, restarts and replays; after every step the read model's current usage, the
cache (its meters and its checks), the command answer, a cache restored from the
read model and a replay from position 0 read the same for every budget and rate
limit."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import reduce
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections import cache_loader, governance, governance_reads, replay
from projections.cache import GovernanceCache
from projections.cache_entries import Owner
from projections.runner import Projector
from service import eventstore
from service.config import Settings
from service.domain import customers, teams, virtual_keys
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerUpdated,
    ProviderConfig,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamUpdated,
    UsageRecorded,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyUpdated,
)
from service.domain.ledger import advance, meters, to_money
from service.eventstore import Executed
from service.records import Checkpoint, NewEvent
from service.web.keys import governance_projector_key
from service.web.routes import governance_answers
from tests.api import serve
from tests.builders import sha256

T0 = datetime(2026, 3, 9, 9, 0, tzinfo=UTC)  # a Monday
TICK = timedelta(microseconds=1)
CUSTOMER = "c1000000-0000-4000-8000-000000000001"
TEAM = "71000000-0000-4000-8000-000000000001"
KEY = "a1000000-0000-4000-8000-000000000001"
CONFIG = "b1000000-0000-4000-8000-000000000001"
SECRET = "sk-gl-" + "q" * 32
OWNERS = ("customer", "team", "virtual_key", "provider_config")
IDS = {
    "customer": CUSTOMER,
    "team": TEAM,
    "virtual_key": KEY,
    "provider_config": CONFIG,
}
STREAMS = {
    "customer": f"customer-{CUSTOMER}",
    "team": f"team-{TEAM}",
    "virtual_key": f"virtual_key-{KEY}",
}
EVOLVE = {
    "customer": customers.evolve,
    "team": teams.evolve,
    "virtual_key": virtual_keys.evolve,
}
DURATIONS = ("1h", "90m", "1d", "1w", "1M")
RATE_DURATIONS = ("1m", "1h", "1d")
# Two budget ids per owner: a budget's shape, limit and alignment change under its id.
BUDGET_IDS = {
    owner: (str(uuid.UUID(int=n * 2 + 1)), str(uuid.UUID(int=n * 2 + 2)))
    for n, owner in enumerate(OWNERS)
}

# --- histories -------------------------------------------------------------------

budget_specs = st.lists(
    st.tuples(
        st.integers(0, 1),  # which id
        st.sampled_from(("1", "4", "10")),
        st.sampled_from(DURATIONS),
        st.booleans(),  # calendar_aligned
        st.booleans(),  # reset_usage
    ),
    max_size=2,
    unique_by=(lambda s: s[0], lambda s: s[2]),  # ids and durations are distinct
)
halves = st.none() | st.tuples(
    st.sampled_from((3, 8, 50)), st.sampled_from(RATE_DURATIONS)
)
rate_limits = st.none() | st.tuples(halves, halves)
ticks = st.sampled_from(
    (
        TICK,
        timedelta(seconds=1),
        timedelta(minutes=7),
        timedelta(hours=1),
        timedelta(hours=13),
        timedelta(days=1),
        timedelta(days=9),
    )
)
# When a record occurred: minutes from now (past, or a little ahead), or right at,
# before or after the last definition's instant, a midnight or an hour.
occurrences = st.one_of(
    st.tuples(st.just("now"), st.integers(-3 * 24 * 60, 120)),
    st.tuples(st.sampled_from(("defined", "midnight", "hour")), st.integers(-1, 1)),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("budgets"), st.sampled_from(OWNERS), budget_specs),
        st.tuples(
            st.just("legacy"),
            st.sampled_from(("customer", "team", "virtual_key")),
            st.tuples(
                st.integers(0, 1),
                st.sampled_from(("1", "4", "10")),
                st.sampled_from(DURATIONS),
                st.booleans(),
            ),
        ),
        st.tuples(st.just("rate"), st.sampled_from(OWNERS), rate_limits),
        st.tuples(st.just("config"), st.booleans()),
        st.tuples(
            st.just("usage"),
            st.sampled_from(("0.5", "1", "3", "0.000000001")),
            st.integers(0, 6),
            st.integers(0, 2),
            occurrences,
            st.booleans(),  # through the provider config
        ),
        st.tuples(st.just("tick"), ticks),
        st.tuples(st.just("restart")),
        st.tuples(st.just("replay")),
    ),
    min_size=1,
    max_size=10,
)


def _budgets(owner: str, specs: Any) -> tuple[Budget, ...]:
    return tuple(
        Budget(
            budget_id=BUDGET_IDS[owner][slot],
            max_limit=Decimal(limit),
            reset_duration=duration,
            calendar_aligned=aligned,
            reset_usage=reset,
        )
        for slot, limit, duration, aligned, reset in specs
    )


def _rate_limit(spec: Any) -> RateLimit | None:
    if spec is None:
        return None
    token, request = spec
    return RateLimit(
        token_max_limit=None if token is None else token[0],
        token_reset_duration=None if token is None else token[1],
        request_max_limit=None if request is None else request[0],
        request_reset_duration=None if request is None else request[1],
    )


class World:
    """The log as the service writes it, its read model, and a running cache."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.now = T0
        self.defined = T0
        self.projector = Projector(pool, "governance", governance.APPLIER)
        self.cache = GovernanceCache()
        self.checkpoint = Checkpoint()
        self.key_rate: RateLimit | None = None
        self.config: ProviderConfig | None = None
        self.answers: list[dict[tuple[str, str], Any]] = []

    async def start(self) -> None:
        await self.define(
            "customer", CustomerCreated(customer_id=CUSTOMER, name="acme")
        )
        await self.define(
            "team", TeamCreated(team_id=TEAM, name="platform", customer_id=CUSTOMER)
        )
        self.config = ProviderConfig(provider_config_id=CONFIG, provider="openai")
        await self.define(
            "virtual_key",
            VirtualKeyCreated(
                virtual_key_id=KEY,
                name="gateway",
                value_sha256=sha256(SECRET),
                value_hint=SECRET[-4:],
                team_id=TEAM,
                provider_configs=(self.config,),
            ),
        )

    # --- writing ---------------------------------------------------------------

    async def define(self, owner: str, event: AnyEvent) -> None:
        """Append a definition as a command would, and keep its answer (read in the
        command's transaction, before the read model applied it: it lags by this
        event only)."""
        await self.projector.catch_up()
        self.now += TICK  # recorded_at is unique per event, as the database's clock
        self.defined = self.now
        await eventstore.append(
            self.pool,
            STREAMS[owner],
            None,
            [NewEvent(event=event)],
            recorded_at=self.now,
        )
        await self._answer(owner)

    async def legacy(self, owner: str, spec: Any) -> None:
        """A legacy `*BudgetUpdated` v1 (the owner's one budget becomes the set)."""
        await self.projector.catch_up()
        slot, limit, duration, aligned = spec
        self.now += TICK
        self.defined = self.now
        owner_key = {"virtual_key": "virtual_key_id"}.get(owner, f"{owner}_id")
        data = {
            owner_key: IDS[owner],
            "budget_id": BUDGET_IDS[owner][slot],
            "max_limit": limit,
            "reset_duration": duration,
            "calendar_aligned": aligned,
        }
        kind = {"customer": "Customer", "team": "Team", "virtual_key": "VirtualKey"}
        await self.pool.fetch(
            "SELECT * FROM append_events($1, NULL, $2, $3, $4, $5, $6, $7)",
            STREAMS[owner],
            [uuid.uuid4()],
            [f"{kind[owner]}BudgetUpdated"],
            [1],
            [msgspec.json.encode(data)],
            [b"{}"],
            self.now,
        )
        await self._answer(owner)

    async def budgets(self, owner: str, specs: Any) -> None:
        budgets = _budgets(owner, specs)
        if owner == "provider_config":
            if self.config is None:
                return
            self.config = msgspec.structs.replace(self.config, budgets=budgets)
            await self.update_key()
            return
        event: AnyEvent = {
            "customer": lambda: CustomerBudgetsReplaced(
                customer_id=CUSTOMER, budgets=budgets
            ),
            "team": lambda: TeamBudgetsReplaced(team_id=TEAM, budgets=budgets),
            "virtual_key": lambda: VirtualKeyBudgetsReplaced(
                virtual_key_id=KEY, budgets=budgets
            ),
        }[owner]()
        await self.define(owner, event)

    async def rate(self, owner: str, spec: Any) -> None:
        rate_limit = _rate_limit(spec)
        if owner == "customer":
            event: AnyEvent = CustomerUpdated(
                customer_id=CUSTOMER, name="acme", rate_limit=rate_limit
            )
            await self.define(owner, event)
        elif owner == "team":
            event = TeamUpdated(
                team_id=TEAM,
                name="platform",
                customer_id=CUSTOMER,
                rate_limit=rate_limit,
            )
            await self.define(owner, event)
        elif owner == "virtual_key":
            self.key_rate = rate_limit
            await self.update_key()
        elif self.config is not None:
            self.config = msgspec.structs.replace(self.config, rate_limit=rate_limit)
            await self.update_key()

    async def toggle_config(self, present: bool) -> None:
        if present and self.config is None:
            self.config = ProviderConfig(provider_config_id=CONFIG, provider="openai")
        elif not present:
            self.config = None
        await self.update_key()

    async def update_key(self) -> None:
        await self.define(
            "virtual_key",
            VirtualKeyUpdated(
                virtual_key_id=KEY,
                name="gateway",
                value_sha256=sha256(SECRET),
                value_hint=SECRET[-4:],
                team_id=TEAM,
                rate_limit=self.key_rate,
                provider_configs=() if self.config is None else (self.config,),
            ),
        )

    async def usage(
        self, cost: str, tokens: int, requests: int, when: Any, configured: bool
    ) -> None:
        where, offset = when
        if where == "now":
            at = self.now + timedelta(minutes=offset)
        else:
            base = {
                "defined": self.defined,
                "midnight": self.now.replace(hour=0, minute=0, second=0, microsecond=0),
                "hour": self.now.replace(minute=0, second=0, microsecond=0),
            }[where]
            at = base + offset * TICK
        self.now += TICK
        event = UsageRecorded(
            virtual_key_id=KEY,
            provider="openai",
            model="gpt-4o",
            cost=Decimal(cost),
            input_tokens=tokens,
            requests=requests,
            occurred_at=at,
            provider_config_id=CONFIG if configured and self.config else None,
            team_id=TEAM,
            customer_id=CUSTOMER,
        )
        await eventstore.append(
            self.pool,
            f"usage-{KEY}",
            None,
            [NewEvent(event=event)],
            recorded_at=self.now,
        )

    # --- reading ---------------------------------------------------------------

    async def _answer(self, owner: str) -> None:
        """What the command answers now, by (kind, id)."""
        version, history = await eventstore.read_stream(self.pool, STREAMS[owner])
        events = [r.event for r in history]
        step: Executed[Any] = Executed(
            reduce(EVOLVE[owner], events, None),
            [(r.event, r.recorded_at) for r in history],
            version,
            history[-1].global_position,
        )
        async with self.pool.acquire() as conn, conn.transaction():
            if owner == "customer":
                saved: Any = (
                    await governance_answers.customer_saved(conn, step, self.now)
                ).customer
            elif owner == "team":
                saved = (await governance_answers.team_saved(conn, step, self.now)).team
            else:
                saved = (
                    await governance_answers.virtual_key_saved(conn, step, self.now)
                ).virtual_key
        views = [(owner, saved)]
        if owner == "virtual_key":
            views += [("provider_config", c) for c in saved.provider_configs]
        self.answers.append(_usages(views))

    async def read_model(self) -> dict[tuple[str, str], Any]:
        async with self.pool.acquire() as conn:
            views: list[tuple[str, Any]] = [
                ("customer", c)
                for c in await governance_reads.list_customers(conn, self.now)
            ]
            views += [
                ("team", t) for t in await governance_reads.list_teams(conn, self.now)
            ]
            for key in await governance_reads.list_virtual_keys(conn, self.now):
                views.append(("virtual_key", key))
                views += [("provider_config", c) for c in key.provider_configs]
        return _usages(views)

    async def tail(self) -> None:
        for record in await eventstore.read_all(self.pool, self.checkpoint, 1000):
            self.cache.apply(record)
            self.checkpoint = record.checkpoint

    async def verify(self) -> None:
        answers, self.answers = self.answers, []
        await self.projector.catch_up()
        await self.tail()
        expected = await self.read_model()
        for answer in answers:  # each answer as of its own command: same `now`
            assert answer == {k: expected[k] for k in answer}
        assert _cached(self.cache, self.now) == expected
        async with self.pool.acquire() as conn:
            restored, _ = await cache_loader.load(conn, self.now)
        assert _cached(restored, self.now) == expected
        self._checks(expected)

    def _checks(self, expected: dict[tuple[str, str], Any]) -> None:
        """The cache's checks name what the read model reads: the usage of the limit
        that blocks, or the smallest headroom as `remaining`."""
        for provider in ("openai", "anthropic"):
            result = self.cache.check(
                virtual_key_sha256=sha256(SECRET),
                virtual_key_id=None,
                provider=provider,
                model="gpt-4o",
                estimated_cost=None,
                now=self.now,
            )
            if result.reason == "budget_exceeded":
                assert result.budget_id is not None
                assert result.current_usage == expected["budget", result.budget_id][0]
            elif result.reason == "rate_limited":
                assert result.rate_limit is not None
                assert result.owner_id is not None
                half = expected[result.rate_limit, result.owner_id]
                assert result.current_usage == Decimal(half)
            elif result.reason == "ok" and result.remaining is not None:
                chain = [CUSTOMER, TEAM, KEY] + (
                    [CONFIG] if provider == "openai" and self.config else []
                )
                left = [
                    limit - usage
                    for (kind, _), (usage, _, limit, owner_id) in _budget_rows(expected)
                    if owner_id in chain
                ]
                assert result.remaining == min(left)


def _budget_rows(expected: dict[tuple[str, str], Any]) -> list[Any]:
    return [(k, v) for k, v in expected.items() if k[0] == "budget"]


def _usages(views: list[tuple[str, Any]]) -> dict[tuple[str, str], Any]:
    """(kind, id) → usage: budgets with (usage, last_reset, limit, owner id), rate
    halves (by owner id) with their usage."""
    found: dict[tuple[str, str], Any] = {}
    for _, view in views:
        for b in view.budgets:
            found["budget", b.id] = (
                b.current_usage,
                b.last_reset,
                b.max_limit,
                view.id,
            )
        rate = view.rate_limit
        if rate is not None:
            if rate.token_max_limit is not None:
                found["tokens", view.id] = rate.token_current_usage
            if rate.request_max_limit is not None:
                found["requests", view.id] = rate.request_current_usage
    return found


def _cached(cache: GovernanceCache, now: datetime) -> dict[tuple[str, str], Any]:
    """The cache's meters, rolled to `now`, in the read model's terms."""
    owners: list[Owner] = [*cache.customers.values(), *cache.teams.values()]
    for key in cache.keys.values():
        owners += [key, *(key.providers or ())]
    found: dict[tuple[str, str], Any] = {}
    for owner in owners:
        advance(owner.ledger, now)
        for meter in meters(owner.ledger):
            if meter.kind == "budget":
                found["budget", meter.id] = (
                    to_money(meter.used),
                    meter.start,
                    to_money(meter.limit),
                    owner.id,
                )
            else:
                found[meter.kind, owner.id] = meter.used
    return found


async def truncate(pool: Any) -> None:
    tables = await pool.fetch(
        "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables"
        " WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
    )
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        names = ", ".join(r["name"] for r in tables)
        await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")


async def run_history(pool: Any, ops: list[tuple[Any, ...]]) -> None:
    await truncate(pool)
    world = World(pool)
    await world.start()
    await world.verify()
    for op in ops:
        match op:
            case ("budgets", owner, specs):
                await world.budgets(owner, specs)
            case ("legacy", owner, spec):
                await world.legacy(owner, spec)
            case ("rate", owner, spec):
                await world.rate(owner, spec)
            case ("config", present):
                await world.toggle_config(present)
            case ("usage", cost, tokens, requests, when, configured):
                await world.usage(cost, tokens, requests, when, configured)
            case ("tick", delta):
                world.now += delta
            case ("restart",):
                async with pool.acquire() as conn:
                    world.cache, world.checkpoint = await cache_loader.load(
                        conn, world.now
                    )
            case ("replay",):
                await world.projector.catch_up()
                await replay.rebuild(pool)
        await world.verify()
    await world.projector.catch_up()
    before = await world.read_model()
    await replay.rebuild(pool)
    assert await world.read_model() == before


SETTINGS = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
    ],
}


@pytest.mark.timeout(600)
@settings(max_examples=5, **SETTINGS)
@given(ops=operations)
async def test_every_consumer_reads_what_the_read_model_reads(pool, ops):
    await run_history(pool, ops)


@pytest.mark.soak
@pytest.mark.timeout(3600)
@settings(max_examples=1500, **SETTINGS)
@given(ops=operations)
async def test_soak_every_consumer_reads_what_the_read_model_reads(pool, ops):
    await run_history(pool, ops)


# --- the cases, pinned ----------------------------------------------------


async def _one_budget(pool: Any) -> World:
    await truncate(pool)
    world = World(pool)
    await world.start()
    await world.budgets("virtual_key", [(0, "10", "1d", False, False)])
    await world.verify()
    return world


def _key_usage(expected: dict[tuple[str, str], Any]) -> Decimal:
    return Decimal(expected["budget", BUDGET_IDS["virtual_key"][0]][0])


async def test_a_legacy_update_turning_calendar_alignment_on_resets_usage(pool):
    world = await _one_budget(pool)
    await world.usage("3", 0, 1, ("now", -1), False)
    world.now += timedelta(hours=1)
    await world.legacy("virtual_key", (0, "10", "1d", True))
    await world.verify()  # the answer, the cache, a restored cache agree
    assert _key_usage(await world.read_model()) == 0


async def test_a_legacy_update_reshaping_a_budget_starts_it_anew_everywhere(pool):
    world = await _one_budget(pool)
    await world.usage("3", 0, 1, ("now", -1), False)
    world.now += timedelta(hours=1)
    await world.legacy("virtual_key", (0, "10", "1w", False))
    await world.verify()
    assert _key_usage(await world.read_model()) == 0


async def test_usage_stamped_after_a_reset_but_committed_before_it_counts(pool):
    world = await _one_budget(pool)
    await world.usage("2", 0, 1, ("now", 10), False)  # occurs 10 minutes ahead
    world.now += timedelta(minutes=5)
    await world.budgets("virtual_key", [(0, "10", "1d", False, True)])  # reset
    world.now += timedelta(minutes=10)
    await world.verify()
    assert _key_usage(await world.read_model()) == 2
    await replay.rebuild(pool)
    assert _key_usage(await world.read_model()) == 2


async def test_turning_calendar_alignment_off_agrees_over_http(database, pool):
    """The issue's example: a 1d aligned budget of 5 made yesterday at 09:00, 6 spent
    yesterday at 20:00 and 1 today; a PUT turns alignment off. GET, the check, the
    PUT's answer and a restarted service all say the same."""
    await truncate(pool)
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    created = today - timedelta(hours=15)  # yesterday 09:00
    late = today + (now - today) / 2  # earlier today
    budget_id = str(uuid.uuid4())
    await eventstore.append(
        pool,
        STREAMS["virtual_key"],
        0,
        [
            NewEvent(
                event=VirtualKeyCreated(
                    virtual_key_id=KEY,
                    name="gateway",
                    value_sha256=sha256(SECRET),
                    value_hint=SECRET[-4:],
                    budgets=(
                        Budget(
                            budget_id=budget_id,
                            max_limit=Decimal(5),
                            reset_duration="1d",
                            calendar_aligned=True,
                        ),
                    ),
                )
            )
        ],
        recorded_at=created,
    )
    for cost, at in (("6", today - timedelta(hours=4)), ("1", late)):
        event = UsageRecorded(
            virtual_key_id=KEY,
            provider="openai",
            model="gpt-4o",
            cost=Decimal(cost),
            occurred_at=at,
        )
        await eventstore.append(
            pool,
            f"usage-{KEY}",
            None,
            [NewEvent(event=event)],
            recorded_at=at + TICK,
        )
    check = {"virtual_key": SECRET, "provider": "openai", "model": "gpt-4o"}
    path = f"/api/governance/virtual-keys/{KEY}"
    unaligned = {"max_limit": 5, "reset_duration": "1d", "calendar_aligned": False}
    # The rolling day from yesterday 09:00 that holds the PUT: the usage of today's
    # calendar day stays only where that rolling day holds it.
    rolling_start = created + timedelta(days=(now - created).days)
    after = 1 if late >= rolling_start else 0

    async with serve(database, Settings()) as api:
        await api.app[governance_projector_key].catch_up()
        await api.caught_up(await eventstore.max_position(pool))
        _, before = await api.call("GET", path)
        assert before["virtual_key"]["budgets"][0]["current_usage"] == 1
        assert (await api.call("POST", "/api/governance/check", check))[1][
            "remaining"
        ] == 4
        status, put = await api.call("PUT", path, {"budgets": [unaligned]})
        assert status == 200, put
        assert put["virtual_key"]["budgets"][0]["current_usage"] == after
        await api.caught_up(put["position"])
        _, got = await api.call("GET", path)
        assert got["virtual_key"]["budgets"][0]["current_usage"] == after
        _, checked = await api.call("POST", "/api/governance/check", check)
        assert (checked["allowed"], checked["remaining"]) == (True, 5 - after)
    async with serve(database, Settings()) as restarted:
        await restarted.caught_up(put["position"])
        _, checked = await restarted.call("POST", "/api/governance/check", check)
        assert (checked["allowed"], checked["remaining"]) == (True, 5 - after)
