"""The governance projection and its runner against a real PostgreSQL: each event's
effect on the tables, usage per period, exactly-once batches, gap safety, replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from projections import governance, governance_reads
from projections.governance_views import BudgetView, CustomerView, RateLimitView
from projections.runner import (
    ROWS_BATCH_SIZE,
    Listener,
    Projector,
    Tail,
    Wake,
    load_checkpoint,
)
from service import eventstore
from service.domain.events import (
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerDeleted,
    CustomerUpdated,
    ProviderConfig,
    RateLimit,
    ReservationHeld,
    TeamCreated,
    TeamDeleted,
    TeamUpdated,
    UsageRecorded,
    VirtualKeyBudgetsReplaced,
    VirtualKeyDeleted,
    VirtualKeyUpdated,
)
from service.errors import NotFound, ProjectionLag
from service.records import Checkpoint, RecordedEvent
from tests.builders import (
    append,
    behind_an_older_transaction,
    budget,
    key_created,
    uid,
    usage_event,
)

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # a Monday
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


async def record_usage(pool, *events: UsageRecorded, at: datetime = T0) -> int:
    position = 0
    for event in events:
        stream = f"usage-{event.virtual_key_id}"
        position = await append(pool, stream, event, at=at)
    return position


async def a_customer(pool, name: str = "a") -> tuple[str, int]:
    """A customer created at T0: its id and the event's position."""
    customer_id = uid()
    position = await append(
        pool,
        f"customer-{customer_id}",
        CustomerCreated(customer_id=customer_id, name=name),
        at=T0,
    )
    return customer_id, position


async def spend_rows(pool) -> list[tuple[str, datetime, Decimal]]:
    rows = await pool.fetch(
        "SELECT budget_id, period_start, spend FROM governance_budget_spend"
        " ORDER BY budget_id, period_start"
    )
    return [tuple(r) for r in rows]


async def usage_of(pool, budget_id: str, now: datetime) -> tuple[Decimal, datetime]:
    """(current_usage, last_reset) of one budget as of `now`."""
    async with pool.acquire() as conn:
        budgets = await governance_reads.list_budgets(conn, now)
    [found] = [b for b in budgets if b.id == budget_id]
    return found.current_usage, found.last_reset


async def snapshot(pool) -> dict[str, list[tuple[Any, ...]]]:
    tables = (
        "governance_customers",
        "governance_teams",
        "governance_virtual_keys",
        "governance_provider_configs",
        "governance_budgets",
        "governance_budget_spend",
        "governance_rate_limits",
        "governance_rate_limit_usage",
        "governance_usage_streams",
        "governance_ledgers",
        "governance_pending_usage",
    )
    return {
        t: [tuple(r) for r in await pool.fetch(f"SELECT * FROM {t} ORDER BY 1, 2")]
        for t in tables
    }


@pytest.fixture
def projector(pool) -> Projector:
    return Projector(pool, "governance", governance.APPLIER)


# --- entities ----------------------------------------------------------------------


async def test_customer_created_reads_back_with_its_budgets_and_rate_limit(
    pool, projector
):
    customer_id, budget_id = uid(), uid()
    await append(
        pool,
        f"customer-{customer_id}",
        CustomerCreated(
            customer_id=customer_id,
            name="acme",
            budgets=(budget(budget_id, "100.500000001", "1d"),),
            rate_limit=RateLimit(token_max_limit=1000, token_reset_duration="1h"),
        ),
        at=T0,
    )
    await projector.catch_up()

    async with pool.acquire() as conn:
        customer = await governance_reads.fetch_customer(conn, customer_id, T0 + HOUR)
    assert customer == CustomerView(
        id=customer_id,
        name="acme",
        budgets=[
            BudgetView(
                id=budget_id,
                max_limit=Decimal("100.500000001"),
                reset_duration="1d",
                calendar_aligned=False,
                current_usage=Decimal(0),
                last_reset=T0,
                owner_type="customer",
                owner_id=customer_id,
            )
        ],
        rate_limit=RateLimitView(
            token_max_limit=1000,
            token_reset_duration="1h",
            request_max_limit=None,
            request_reset_duration=None,
            token_current_usage=0,
            request_current_usage=0,
        ),
        version=1,
        created_at=T0,
        updated_at=T0,
    )


async def test_catch_up_applies_what_was_committed_behind_an_older_open_transaction(
    pool, projector
):
    # The appended event is not below the gap-safe head until the older transaction
    # ends; catch_up waits for that.
    customer_id = uid()
    await behind_an_older_transaction(
        pool,
        lambda: append(
            pool,
            f"customer-{customer_id}",
            CustomerCreated(customer_id=customer_id, name="acme"),
            at=T0,
        ),
        projector.catch_up,
    )

    assert (
        await pool.fetchval(
            "SELECT name FROM governance_customers WHERE id = $1", customer_id
        )
        == "acme"
    )


async def test_customer_update_and_budget_replacement_reconcile_and_bump_version(
    pool, projector
):
    customer_id, daily, monthly, weekly = uid(), uid(), uid(), uid()
    stream = f"customer-{customer_id}"
    await append(
        pool,
        stream,
        CustomerCreated(
            customer_id=customer_id,
            name="acme",
            budgets=(budget(daily, "10", "1d"), budget(monthly, "20", "1M")),
            rate_limit=RateLimit(request_max_limit=5, request_reset_duration="1m"),
        ),
        at=T0,
    )
    await append(
        pool,
        stream,
        CustomerUpdated(customer_id=customer_id, name="acme2"),
        at=T0 + HOUR,
    )
    await append(
        pool,
        stream,
        CustomerBudgetsReplaced(
            customer_id=customer_id,
            budgets=(budget(daily, "50", "1d"), budget(weekly, "5", "1w")),
        ),
        at=T0 + 2 * HOUR,
    )
    await projector.catch_up()

    async with pool.acquire() as conn:
        customer = await governance_reads.fetch_customer(
            conn, customer_id, T0 + 3 * HOUR
        )
    assert customer.name == "acme2"
    assert customer.rate_limit is None
    assert (customer.version, customer.created_at, customer.updated_at) == (
        3,
        T0,
        T0 + 2 * HOUR,
    )
    assert [
        (b.id, b.max_limit, b.reset_duration, b.last_reset) for b in customer.budgets
    ] == [
        (daily, Decimal(50), "1d", T0),  # kept: same id, same anchor
        (weekly, Decimal(5), "1w", T0 + 2 * HOUR),  # new: anchored at its event
    ]


async def test_deleting_a_customer_removes_its_budgets_and_detaches_teams_and_keys(
    pool, projector
):
    customer_id, team_id, key_id = uid(), uid(), uid()
    await append(
        pool,
        f"customer-{customer_id}",
        CustomerCreated(
            customer_id=customer_id, name="acme", budgets=(budget(uid(), "1", "1d"),)
        ),
        at=T0,
    )
    await append(
        pool,
        f"team-{team_id}",
        TeamCreated(team_id=team_id, name="ml", customer_id=customer_id),
        at=T0,
    )
    await append(
        pool,
        f"virtual_key-{key_id}",
        key_created(key_id, customer_id=customer_id),
        at=T0,
    )
    await append(
        pool, f"customer-{customer_id}", CustomerDeleted(customer_id=customer_id), at=T0
    )
    await projector.catch_up()

    async with pool.acquire() as conn:
        with pytest.raises(NotFound):
            await governance_reads.fetch_customer(conn, customer_id, T0)
        team = await governance_reads.fetch_team(conn, team_id, T0)
        key = await governance_reads.fetch_virtual_key(conn, key_id, T0)
        assert await governance_reads.list_budgets(conn, T0) == []
    assert (team.customer_id, key.customer_id) == (None, None)


async def test_a_reference_to_a_missing_parent_is_stored_as_none(pool, projector):
    team_id, key_id = uid(), uid()
    await append(
        pool,
        f"team-{team_id}",
        TeamCreated(team_id=team_id, name="ml", customer_id=uid()),
        at=T0,
    )
    await append(
        pool, f"virtual_key-{key_id}", key_created(key_id, team_id=uid()), at=T0
    )
    await projector.catch_up()

    async with pool.acquire() as conn:
        team = await governance_reads.fetch_team(conn, team_id, T0)
        assert team.customer_id is None
        key = await governance_reads.fetch_virtual_key(conn, key_id, T0)
    assert (key.team_id, key.customer_id) == (None, None)


async def test_team_update_moves_it_between_customers_and_delete_removes_it(
    pool, projector
):
    first, second, team_id = uid(), uid(), uid()
    for customer_id in (first, second):
        await append(
            pool,
            f"customer-{customer_id}",
            CustomerCreated(customer_id=customer_id, name="c"),
            at=T0,
        )
    stream = f"team-{team_id}"
    await append(
        pool, stream, TeamCreated(team_id=team_id, name="ml", customer_id=first), at=T0
    )
    await append(
        pool,
        stream,
        TeamUpdated(team_id=team_id, name="ml2", customer_id=second),
        at=T0 + HOUR,
    )
    await projector.catch_up()
    async with pool.acquire() as conn:
        assert [t.id for t in await governance_reads.list_teams(conn, T0, first)] == []
        [team] = await governance_reads.list_teams(conn, T0, second)
    assert (team.name, team.version, team.updated_at) == ("ml2", 2, T0 + HOUR)

    await append(pool, stream, TeamDeleted(team_id=team_id), at=T0 + 2 * HOUR)
    await projector.catch_up()
    async with pool.acquire() as conn:
        assert await governance_reads.list_teams(conn, T0) == []


async def test_virtual_key_with_provider_configs_reads_back_in_the_wire_shape(
    pool, projector
):
    key_id, key_budget, openai, openai_budget, anthropic = (uid() for _ in range(5))
    await append(
        pool,
        f"virtual_key-{key_id}",
        key_created(
            key_id,
            is_active=False,
            budgets=(budget(key_budget, "7", "1w", calendar_aligned=True),),
            rate_limit=RateLimit(request_max_limit=60, request_reset_duration="1m"),
            provider_configs=(
                ProviderConfig(
                    provider_config_id=openai,
                    provider="openai",
                    allowed_models=("gpt-4o",),
                    budgets=(budget(openai_budget, "3", "1d"),),
                ),
                ProviderConfig(provider_config_id=anthropic, provider="anthropic"),
            ),
        ),
        at=T0,
    )
    await projector.catch_up()

    async with pool.acquire() as conn:
        key = await governance_reads.fetch_virtual_key(conn, key_id, T0 + HOUR)
    # As the answer's JSON has it, field for field (money and times kept as such).
    assert msgspec.to_builtins(key, builtin_types=(Decimal, datetime)) == {
        "id": key_id,
        "name": "ci",
        "team_id": None,
        "customer_id": None,
        "is_active": False,
        "budgets": [
            {
                "id": key_budget,
                "max_limit": Decimal(7),
                "reset_duration": "1w",
                "calendar_aligned": True,
                "current_usage": Decimal(0),
                "last_reset": datetime(2026, 11, 2, tzinfo=UTC),  # ISO week: Monday
                "owner_type": "virtual_key",
                "owner_id": key_id,
                "held": Decimal(0),
            }
        ],
        "rate_limit": {
            "token_max_limit": None,
            "token_reset_duration": None,
            "request_max_limit": 60,
            "request_reset_duration": "1m",
            "token_current_usage": 0,
            "request_current_usage": 0,
            "token_held": 0,
            "request_held": 0,
        },
        "provider_configs": [
            {
                "id": openai,
                "provider": "openai",
                "allowed_models": ["gpt-4o"],
                "budgets": [
                    {
                        "id": openai_budget,
                        "max_limit": Decimal(3),
                        "reset_duration": "1d",
                        "calendar_aligned": False,
                        "current_usage": Decimal(0),
                        "last_reset": T0,
                        "owner_type": "provider_config",
                        "owner_id": openai,
                        "held": Decimal(0),
                    }
                ],
                "rate_limit": None,
            },
            {
                "id": anthropic,
                "provider": "anthropic",
                "allowed_models": ["*"],
                "budgets": [],
                "rate_limit": None,
            },
        ],
        "value_hint": "abcd",
        "version": 1,
        "created_at": T0,
        "updated_at": T0,
    }


async def test_virtual_key_update_replaces_provider_configs_and_delete_cascades(
    pool, projector
):
    key_id, openai, anthropic = uid(), uid(), uid()
    stream = f"virtual_key-{key_id}"
    configs = (
        ProviderConfig(
            provider_config_id=openai,
            provider="openai",
            budgets=(budget(uid(), "3", "1d"),),
        ),
        ProviderConfig(
            provider_config_id=anthropic,
            provider="anthropic",
            budgets=(budget(uid(), "4", "1d"),),
            rate_limit=RateLimit(token_max_limit=9, token_reset_duration="1h"),
        ),
    )
    await append(pool, stream, key_created(key_id, provider_configs=configs), at=T0)
    await append(
        pool,
        stream,
        VirtualKeyUpdated(
            virtual_key_id=key_id,
            name="renamed",
            value_sha256="rotated",
            value_hint="wxyz",
            provider_configs=(
                ProviderConfig(
                    provider_config_id=openai, provider="openai", allowed_models=()
                ),
            ),
        ),
        VirtualKeyBudgetsReplaced(
            virtual_key_id=key_id, budgets=(budget(uid(), "8", "1M"),)
        ),
        at=T0 + HOUR,
    )
    await projector.catch_up()

    async with pool.acquire() as conn:
        key = await governance_reads.fetch_virtual_key(conn, key_id, T0 + HOUR)
    assert (key.name, key.value_hint, key.version) == ("renamed", "wxyz", 3)
    assert [
        (c.provider, c.allowed_models, c.budgets) for c in key.provider_configs
    ] == [("openai", [], [])]
    assert [b.max_limit for b in key.budgets] == [Decimal(8)]
    assert await pool.fetchval("SELECT value_sha256 FROM governance_virtual_keys") == (
        "rotated"
    )

    await append(pool, stream, VirtualKeyDeleted(virtual_key_id=key_id), at=T0 + DAY)
    await projector.catch_up()
    assert (
        await pool.fetchval(
            "SELECT (SELECT count(*) FROM governance_virtual_keys)"
            " + (SELECT count(*) FROM governance_provider_configs)"
            " + (SELECT count(*) FROM governance_budgets)"
            " + (SELECT count(*) FROM governance_rate_limits)"
        )
        == 0
    )


# --- usage into periods ------------------------------------------------------------


async def keyed_budget(pool, *budgets: Budget, at: datetime = T0, **fields) -> str:
    key_id = uid()
    await append(
        pool,
        f"virtual_key-{key_id}",
        key_created(key_id, budgets=budgets, **fields),
        at=at,
    )
    return key_id


async def test_usage_on_two_days_lands_in_two_spend_rows(pool, projector):
    daily = uid()
    key_id = await keyed_budget(pool, budget(daily, "100", "1d"))
    await record_usage(
        pool,
        usage_event(key_id, "1.25", T0 + HOUR),
        usage_event(key_id, "2.5", T0 + 25 * HOUR),
        usage_event(key_id, "0.000000001", T0 + 26 * HOUR),
        at=T0 + 27 * HOUR,  # recorded after it occurred: filed, not pending
    )
    await projector.catch_up()

    assert await spend_rows(pool) == [
        (daily, T0, Decimal("1.25")),
        (daily, T0 + DAY, Decimal("2.500000001")),
    ]
    assert await usage_of(pool, daily, T0 + 30 * HOUR) == (
        Decimal("2.500000001"),
        T0 + DAY,
    )


async def test_a_late_event_lands_in_its_own_past_period(pool, projector):
    daily = uid()
    key_id = await keyed_budget(pool, budget(daily, "100", "1d"))
    now = T0 + 26 * HOUR
    await record_usage(pool, usage_event(key_id, "2", T0 + 25 * HOUR), at=now)
    await record_usage(pool, usage_event(key_id, "1", T0 + 2 * HOUR), at=now)  # late
    await projector.catch_up()

    assert await spend_rows(pool) == [
        (daily, T0, Decimal(1)),
        (daily, T0 + DAY, Decimal(2)),
    ]
    assert await usage_of(pool, daily, T0 + 26 * HOUR) == (Decimal(2), T0 + DAY)


async def test_usage_before_the_usage_floor_is_not_counted(pool, projector):
    daily = uid()
    key_id = await keyed_budget(pool, budget(daily, "100", "1d"))
    await record_usage(pool, usage_event(key_id, "5", T0 - timedelta(seconds=1)))
    await projector.catch_up()

    assert await spend_rows(pool) == []
    assert await usage_of(pool, daily, T0) == (Decimal(0), T0)


async def test_reset_usage_shows_zero_at_once_and_keeps_the_spend_before_it(
    pool, projector
):
    monthly = uid()
    key_id = await keyed_budget(pool, budget(monthly, "100", "1M"))
    await record_usage(pool, usage_event(key_id, "5", T0 + DAY), at=T0 + DAY)
    reset_at = T0 + 2 * DAY
    await append(
        pool,
        f"virtual_key-{key_id}",
        VirtualKeyBudgetsReplaced(
            virtual_key_id=key_id,
            budgets=(budget(monthly, "100", "1M", reset_usage=True),),
        ),
        at=reset_at,
    )
    await projector.catch_up()
    assert await usage_of(pool, monthly, reset_at) == (Decimal(0), T0)

    await record_usage(
        pool,
        usage_event(key_id, "1", T0 + 3 * DAY),
        usage_event(key_id, "7", reset_at - HOUR),  # late, from before the reset
        at=T0 + 4 * DAY,
    )
    await projector.catch_up()
    assert await usage_of(pool, monthly, T0 + 4 * DAY) == (Decimal(1), T0)
    assert await spend_rows(pool) == [
        (monthly, T0, Decimal(5)),
        (monthly, reset_at, Decimal(1)),
    ]


async def test_turning_calendar_alignment_on_resets_and_aligns_the_periods(
    pool, projector
):
    daily = uid()
    key_id = await keyed_budget(pool, budget(daily, "100", "1d"))
    await record_usage(pool, usage_event(key_id, "5", T0 + HOUR))
    await append(
        pool,
        f"virtual_key-{key_id}",
        VirtualKeyBudgetsReplaced(
            virtual_key_id=key_id,
            budgets=(
                budget(daily, "100", "1d", calendar_aligned=True, reset_usage=True),
            ),
        ),
        at=T0 + 2 * HOUR,
    )
    await projector.catch_up()

    midnight = datetime(2026, 11, 2, tzinfo=UTC)
    assert await usage_of(pool, daily, T0 + 3 * HOUR) == (Decimal(0), midnight)


async def test_turning_calendar_alignment_off_keeps_the_current_periods_usage(
    pool, projector
):
    daily = uid()
    key_id = await keyed_budget(pool, budget(daily, "100", "1d", calendar_aligned=True))
    await record_usage(pool, usage_event(key_id, "3", T0 + DAY + HOUR))  # Nov 3, 10:00
    switched_at = T0 + DAY + 2 * HOUR
    await append(
        pool,
        f"virtual_key-{key_id}",
        VirtualKeyBudgetsReplaced(
            virtual_key_id=key_id, budgets=(budget(daily, "100", "1d"),)
        ),
        at=switched_at,
    )
    await projector.catch_up()

    # Rolling from the 09:00 anchor now: the period is Nov 3 09:00 to Nov 4 09:00.
    assert await usage_of(pool, daily, switched_at + HOUR) == (Decimal(3), T0 + DAY)


async def test_usage_charges_every_existing_owner_the_event_names(pool, projector):
    customer_id, team_id, key_id, config_id = uid(), uid(), uid(), uid()
    on_customer, on_team, on_key, on_config = uid(), uid(), uid(), uid()
    await append(
        pool,
        f"customer-{customer_id}",
        CustomerCreated(
            customer_id=customer_id,
            name="acme",
            budgets=(budget(on_customer, "10", "1d"),),
        ),
        at=T0,
    )
    await append(
        pool,
        f"team-{team_id}",
        TeamCreated(
            team_id=team_id,
            name="ml",
            customer_id=customer_id,
            budgets=(budget(on_team, "10", "1M"),),
        ),
        at=T0,
    )
    await append(
        pool,
        f"virtual_key-{key_id}",
        key_created(
            key_id,
            team_id=team_id,
            budgets=(budget(on_key, "10", "1w"),),
            provider_configs=(
                ProviderConfig(
                    provider_config_id=config_id,
                    provider="openai",
                    budgets=(budget(on_config, "10", "1h"),),
                ),
            ),
        ),
        at=T0,
    )
    chain = {"provider_config_id": config_id, "team_id": team_id}
    await record_usage(
        pool,
        usage_event(key_id, "1.5", at_seconds(1), customer_id=customer_id, **chain),
        usage_event(
            key_id, "0.25", at_seconds(2), customer_id=uid(), **chain
        ),  # no such customer
        usage_event(key_id, "2", at_seconds(3)),  # names only the key
    )
    await projector.catch_up()

    now = T0 + timedelta(minutes=1)
    assert [await usage_of(pool, b, now) for b in (on_customer, on_team)] == [
        (Decimal("1.5"), T0),
        (Decimal("1.75"), T0),
    ]
    assert [await usage_of(pool, b, now) for b in (on_key, on_config)] == [
        (Decimal("3.75"), T0),
        (Decimal("1.75"), T0),
    ]


async def test_rate_limits_count_tokens_and_requests_in_their_own_periods(
    pool, projector
):
    key_id = await keyed_budget(
        pool,
        rate_limit=RateLimit(
            token_max_limit=1000,
            token_reset_duration="1h",
            request_max_limit=10,
            request_reset_duration="1m",
        ),
    )
    await record_usage(
        pool,
        usage_event(key_id, "0", at_seconds(10), input_tokens=100, output_tokens=20),
        usage_event(key_id, "0", at_seconds(20), input_tokens=30, requests=2),
        usage_event(key_id, "0", at_seconds(70), output_tokens=5),
    )
    await projector.catch_up()

    async with pool.acquire() as conn:
        key = await governance_reads.fetch_virtual_key(conn, key_id, at_seconds(75))
    assert key.rate_limit is not None
    assert key.rate_limit.token_current_usage == 155
    assert key.rate_limit.request_current_usage == 1  # the second minute


async def test_changing_a_rate_limits_duration_restarts_its_count(pool, projector):
    limits = RateLimit(token_max_limit=1000, token_reset_duration="1h")
    key_id = await keyed_budget(pool, rate_limit=limits)
    await record_usage(pool, usage_event(key_id, "0", at_seconds(10), input_tokens=100))
    await append(
        pool,
        f"virtual_key-{key_id}",
        VirtualKeyUpdated(
            virtual_key_id=key_id,
            name="ci",
            value_sha256=f"sha-{key_id}",
            value_hint="abcd",
            rate_limit=RateLimit(token_max_limit=2000, token_reset_duration="1d"),
        ),
        at=at_seconds(60),
    )
    await record_usage(pool, usage_event(key_id, "0", at_seconds(70), input_tokens=7))
    await projector.catch_up()

    async with pool.acquire() as conn:
        key = await governance_reads.fetch_virtual_key(conn, key_id, at_seconds(80))
    assert key.rate_limit is not None
    assert key.rate_limit.token_current_usage == 7


def at_seconds(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- exactly once ------------------------------------------------------------------


@pytest.mark.parametrize("as_rows", [False, True], ids=["records", "rows"])
async def test_reapplying_an_applied_batch_changes_nothing(pool, projector, as_rows):
    customer_id, key_id = uid(), uid()
    await append(
        pool,
        f"customer-{customer_id}",
        CustomerCreated(customer_id=customer_id, name="a"),
        CustomerUpdated(customer_id=customer_id, name="b"),
        CustomerBudgetsReplaced(
            customer_id=customer_id, budgets=(budget(uid(), "5", "1d"),)
        ),
        at=T0,
    )
    await append(
        pool,
        f"virtual_key-{key_id}",
        key_created(
            key_id,
            customer_id=customer_id,
            rate_limit=RateLimit(token_max_limit=5, token_reset_duration="1h"),
        ),
        at=T0,
    )
    await record_usage(
        pool,
        usage_event(
            key_id, "1", at_seconds(1), customer_id=customer_id, input_tokens=3
        ),
        usage_event(
            key_id, "2", at_seconds(2), customer_id=customer_id, input_tokens=4
        ),
        at=at_seconds(3),
    )
    await projector.catch_up()
    before = await snapshot(pool)

    async with pool.acquire() as conn, conn.transaction():
        if as_rows:
            rows = await eventstore.read_rows(conn, Checkpoint(), 100)
            assert await governance.apply_rows(conn, rows) == []
        else:
            await governance.apply(conn, await eventstore.read_all(conn, Checkpoint()))

    assert await snapshot(pool) == before
    assert before["governance_budget_spend"][0][2] == Decimal(3)


async def test_records_and_rows_as_read_project_the_same_tables(pool):
    """`governance.apply` takes decoded records (tests, tools); the live projector
    and replay apply rows as read, usage decoded only into what it charges. One
    log, in batches that split its runs, gives the same tables either way."""
    customer_id, key_id, other_id, on_customer = uid(), uid(), uid(), uid()
    await append(
        pool,
        f"customer-{customer_id}",
        CustomerCreated(
            customer_id=customer_id,
            name="a",
            budgets=(budget(on_customer, "100", "1d"),),
        ),
        at=T0,
    )
    limit = RateLimit(token_max_limit=50, token_reset_duration="1h")
    await append(
        pool,
        f"virtual_key-{key_id}",
        key_created(key_id, customer_id=customer_id, rate_limit=limit),
        at=T0,
    )
    chain = {"customer_id": customer_id, "input_tokens": 3}
    await record_usage(
        pool,
        usage_event(key_id, "1", at_seconds(1), **chain),
        usage_event(key_id, "2", at_seconds(2), **chain),
        at=at_seconds(2),
    )
    await append(
        pool,
        f"customer-{customer_id}",
        CustomerBudgetsReplaced(
            customer_id=customer_id, budgets=(budget(on_customer, "50", "1d"),)
        ),
        at=at_seconds(3),
    )
    await append(
        pool,
        f"virtual_key-{other_id}",
        key_created(other_id, customer_id=customer_id),
        at=at_seconds(3),
    )
    reservation = uid()
    await append(
        pool,
        f"usage-{key_id}",
        ReservationHeld(
            reservation_id=reservation,
            virtual_key_id=key_id,
            customer_id=customer_id,
            budget_ids=(on_customer,),
            amount=Decimal(5),
            expires_at=T0 + HOUR,
        ),
        at=at_seconds(4),
    )
    await record_usage(
        pool,
        usage_event(key_id, "4", at_seconds(4), reservation_id=reservation, **chain),
        usage_event(other_id, "8", at_seconds(5), **chain),
        at=at_seconds(5),
    )
    await append(
        pool, f"virtual_key-{other_id}", VirtualKeyDeleted(virtual_key_id=other_id)
    )
    await record_usage(pool, usage_event(key_id, "16", at_seconds(6), **chain))

    await Projector(pool, "governance", governance.apply, batch_size=3).catch_up()
    by_records = await snapshot(pool)
    held = await pool.fetchval("SELECT count(*) FROM governance_holds")
    tables = ", ".join(by_records)
    await pool.execute(f"TRUNCATE {tables}, governance_holds RESTART IDENTITY CASCADE")
    await pool.execute("DELETE FROM projection_checkpoints")
    await Projector(pool, "governance", governance.APPLIER, batch_size=3).catch_up()

    assert await snapshot(pool) == by_records
    assert held == 0  # the usage naming it settled it
    assert await pool.fetchval("SELECT count(*) FROM governance_holds") == 0
    assert await usage_of(pool, on_customer, T0 + HOUR) == (Decimal(31), T0)


async def test_a_failed_batch_commits_neither_rows_nor_checkpoint(pool):
    failures = [RuntimeError("boom")]

    async def flaky(conn, records: Sequence[RecordedEvent]) -> None:
        await governance.apply(conn, records)
        if failures:
            raise failures.pop()

    projector = Projector(pool, "governance", flaky)
    await a_customer(pool)

    with pytest.raises(RuntimeError, match="boom"):
        await projector.catch_up()
    assert await pool.fetchval("SELECT count(*) FROM governance_customers") == 0
    assert await load_checkpoint(pool, "governance") == Checkpoint()

    await projector.catch_up()
    assert await pool.fetchval("SELECT count(*) FROM governance_customers") == 1
    assert projector.checkpoint == await load_checkpoint(pool, "governance")


async def test_a_batch_commits_without_waiting_for_its_wal_flush(pool, database):
    """A batch holds only what the durable log holds, so it commits asynchronously
    (for its own transaction: the connection's setting is back after it)."""
    durable = await eventstore.create_pool(
        database, min_size=1, max_size=1, server_settings={"synchronous_commit": "on"}
    )
    settings: list[str] = []

    async def apply(conn, records: Sequence[RecordedEvent]) -> None:
        settings.append(await conn.fetchval("SHOW synchronous_commit"))
        await governance.apply(conn, records)

    try:
        await a_customer(pool)
        await Projector(durable, "governance", apply).catch_up()
        assert settings == ["off"]
        assert await durable.fetchval("SHOW synchronous_commit") == "on"
        assert await pool.fetchval("SELECT count(*) FROM governance_customers") == 1
    finally:
        await durable.close()


async def test_a_running_projector_logs_a_failed_batch_and_retries_it(pool, database):
    failures = [RuntimeError("boom")]
    batches: list[list[int]] = []

    async def flaky(conn, records: Sequence[RecordedEvent]) -> None:
        batches.append([r.global_position for r in records])
        await governance.apply(conn, records)
        if failures:
            raise failures.pop()

    _, position = await a_customer(pool)
    projector = Projector(pool, "governance", flaky)
    tail = Tail(database)
    with capture_logs() as logs:
        tail.start(projector)
        try:
            await projector.wait_for(position, timeout=10)
        finally:
            await tail.stop()

    assert batches == [[position], [position]]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "projection_failed"
    ]
    assert await pool.fetchval("SELECT count(*) FROM governance_customers") == 1


async def test_a_late_committing_transaction_is_applied_late_not_skipped(
    pool, projector
):
    early_budget, late_budget = uid(), uid()
    early_key = await keyed_budget(pool, budget(early_budget, "100", "1d"))
    late_key = await keyed_budget(pool, budget(late_budget, "100", "1d"))
    async with pool.acquire() as early, pool.acquire() as late:
        # `early` takes the older transaction id, `late` draws the smaller position
        # and commits last: the projector must hold back, then still apply it.
        early_tx, late_tx = early.transaction(), late.transaction()
        await early_tx.start()
        await late_tx.start()
        await early.fetchval("SELECT pg_current_xact_id()")
        await late.fetchval("SELECT pg_current_xact_id()")
        late_position = await record_usage(
            late, usage_event(late_key, "2", at_seconds(2))
        )
        early_position = await record_usage(
            early, usage_event(early_key, "1", at_seconds(1))
        )
        assert late_position < early_position
        await early_tx.commit()
        await projector.catch_up()
        assert await usage_of(pool, early_budget, T0 + HOUR) == (Decimal(1), T0)
        assert await usage_of(pool, late_budget, T0 + HOUR) == (Decimal(0), T0)
        assert projector.checkpoint.position == early_position

        await late_tx.commit()
    await projector.catch_up()

    assert await usage_of(pool, late_budget, T0 + HOUR) == (Decimal(2), T0)
    assert projector.checkpoint.position == late_position


async def test_a_new_projector_continues_from_the_stored_checkpoint(pool):
    daily = uid()
    key_id = await keyed_budget(pool, budget(daily, "100", "1d"))
    await record_usage(pool, usage_event(key_id, "1", at_seconds(1)))
    first = Projector(pool, "governance", governance.apply)
    await first.catch_up()

    await record_usage(pool, usage_event(key_id, "2", at_seconds(2)))
    applied: list[int] = []

    async def counting(conn, records: Sequence[RecordedEvent]) -> None:
        applied.extend(r.global_position for r in records)
        await governance.apply(conn, records)

    restarted = Projector(pool, "governance", counting)
    await restarted.catch_up()

    assert applied == [await eventstore.max_position(pool)]
    assert await usage_of(pool, daily, T0 + HOUR) == (Decimal(3), T0)


async def test_two_projectors_on_one_database_apply_each_batch_once_in_turn(pool):
    daily = uid()
    key_id = await keyed_budget(pool, budget(daily, "1000", "1d"))
    for i in range(60):
        await record_usage(pool, usage_event(key_id, "0.5", at_seconds(i)))
    running = overlaps = 0
    refused: list[bool] = []
    applied: dict[str, list[int]] = {"a": [], "b": []}

    def tracked(name: str):
        async def apply(conn, records: Sequence[RecordedEvent]) -> None:
            nonlocal running, overlaps
            running += 1
            overlaps += running > 1
            try:
                if name == "a" and not refused:
                    # While `a` holds the projection, `b` must be turned away.
                    refused.append(await b.step())
                await governance.apply(conn, records)
                applied[name].extend(r.global_position for r in records)
            finally:
                running -= 1

        return apply

    a = Projector(pool, "governance", tracked("a"), batch_size=7)
    b = Projector(pool, "governance", tracked("b"), batch_size=7)
    await a.step()
    await b.step()  # `a` is done with its batch: now `b` takes the next one
    await asyncio.gather(a.catch_up(), b.catch_up())

    assert refused == [False]
    assert overlaps == 0
    assert (applied["a"][:7], applied["b"][:7]) == (
        list(range(1, 8)),
        list(range(8, 15)),
    )
    everything = sorted(applied["a"] + applied["b"])
    assert everything == list(range(1, 62))
    assert await usage_of(pool, daily, T0 + HOUR) == (Decimal(30), T0)
    assert a.checkpoint == b.checkpoint == await load_checkpoint(pool, "governance")


# --- waking and waiting ------------------------------------------------------------


async def test_projection_catches_up_after_the_listen_connection_is_killed(
    pool, database
):
    # A poll far beyond the test's patience: only a wake-up can move the projector.
    projector = Projector(pool, "governance", governance.apply, poll_interval_s=600)
    tail = Tail(database)
    tail.start(projector)
    try:
        await asyncio.wait_for(tail.listener.listening.wait(), 10)
        killed = tail.listener.pid
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", killed)

        customer_id, position = await a_customer(pool, "after the kill")
        await projector.wait_for(position, timeout=10)
        await asyncio.wait_for(tail.listener.listening.wait(), 10)
    finally:
        await tail.stop()

    assert tail.listener.pid is None  # stopped
    assert await pool.fetchval(
        "SELECT name FROM governance_customers WHERE id = $1", customer_id
    ) == ("after the kill")


async def test_a_notification_wakes_a_waiting_projector(pool, database):
    wake = Wake()
    listener = Listener(database, wake)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        seen = wake.generation
        await append(pool, f"team-{uid()}", TeamCreated(team_id=uid(), name="x"), at=T0)
        await wake.wait(seen, 10)
        assert wake.generation > seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_wait_for_returns_once_the_position_is_applied(pool, database):
    projector = Projector(pool, "governance", governance.apply)
    tail = Tail(database)
    tail.start(projector)
    try:
        _, position = await a_customer(pool)
        await projector.wait_for(position, timeout=10)
        assert await pool.fetchval("SELECT count(*) FROM governance_customers") == 1
        assert projector.ready
        assert (projector.lag_events, projector.lag_seconds) == (0, 0.0)
    finally:
        await tail.stop()


async def test_wait_for_a_position_not_in_the_log_raises_projection_lag(
    pool, projector
):
    await projector.catch_up()
    with pytest.raises(ProjectionLag):
        await projector.wait_for(10**9, timeout=0.05)


async def test_ready_only_once_the_head_seen_at_start_is_applied(pool, projector):
    await append(pool, f"team-{uid()}", TeamCreated(team_id=uid(), name="x"), at=T0)
    assert not projector.ready

    await projector.catch_up()

    assert projector.ready


async def test_the_read_models_projector_takes_rows_batch_size_events_a_batch(pool):
    # Each batch writes every ledger, cell and stream guard it touched once: at full
    # ingest rate larger batches are fewer writes of the same rows.
    key_id = uid()
    created = await append(pool, f"virtual_key-{key_id}", key_created(key_id))
    last = await append(
        pool,
        f"usage-{key_id}",
        *(usage_event(key_id, "1", T0) for _ in range(ROWS_BATCH_SIZE + 10)),
        at=T0,
    )
    projector = Projector(pool, "governance", governance.APPLIER)

    assert await projector.step() is True  # full: more is waiting
    first = await load_checkpoint(pool, "governance")
    assert await projector.step() is False
    assert first.position == created + ROWS_BATCH_SIZE - 1  # the first 2,000
    assert (await load_checkpoint(pool, "governance")).position == last
