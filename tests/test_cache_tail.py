"""The cache's tail (cache_loader.applier): rows folded a batch at a time, usage
decoded into UsageCharge and charged a run at a time, end in exactly the state that
applying every recorded event one by one gives."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections import cache_loader
from projections.cache import GovernanceCache
from projections.cache_entries import Owner
from service import eventstore
from service.domain.events import (
    CustomerBudgetsReplaced,
    ProviderConfig,
    RateLimit,
    ReservationHeld,
    ReservationReleased,
    TeamBudgetsReplaced,
    TeamDeleted,
    UsageRecorded,
    VirtualKeyBudgetsReplaced,
)
from service.domain.ledger import stored
from service.records import RecordedEvent
from tests.builders import budget, sha256
from tests.test_cache import CONFIG, CUSTOMER, KEY, SECOND, T0, TEAM, Log

SOLO = "a0000000-0000-4000-8000-000000000002"
RATE = RateLimit(
    token_max_limit=5000,
    token_reset_duration="1h",
    request_max_limit=40,
    request_reset_duration="1m",
)


def row(record: RecordedEvent) -> Any:
    """The record as `eventstore.read_all_rows` returns it: an asyncpg Record reads
    by column name as this dict does."""
    return {
        "global_position": record.global_position,
        "tx_id": record.tx_id,
        "event_id": record.event_id,
        "stream_id": record.stream_id,
        "stream_version": record.stream_version,
        "type": record.type,
        "schema_version": record.schema_version,
        "data": eventstore.encode_event(record.event),
        "metadata": b"{}",
        "recorded_at": record.recorded_at,
    }


def owners(cache: GovernanceCache) -> dict[str, Owner]:
    found: dict[str, Owner] = {**cache.customers, **cache.teams, **cache.keys}
    for key in cache.keys.values():
        for config in key.providers or ():
            found[config.id] = config
    return found


def state(cache: GovernanceCache) -> Any:
    """Everything the cache holds that a fold moves."""
    return (
        {
            owner_id: (
                stored(owner.ledger),
                owner.left,
                owner.rate_blocked,
                owner.next_end,
                owner.held,
                owner.held_tokens,
                owner.held_requests,
                owner.version,
            )
            for owner_id, owner in owners(cache).items()
        },
        sorted(cache.holds),
        cache.usage_seen,
        cache.checkpoint,
        cache.deleted,
    )


def check(cache: GovernanceCache, secret: str, now: datetime) -> Any:
    return cache.check(
        virtual_key_sha256=sha256(secret),
        virtual_key_id=None,
        provider="openai",
        model="gpt-4o",
        estimated_cost=Decimal("0.5"),
        now=now,
    )


def setup() -> Log:
    log = Log()
    log.customer((budget("b-c", "40", "1w", calendar_aligned=True),), RATE)
    log.team((budget("b-t", "20", "1d"),), RATE)
    config = ProviderConfig(
        provider_config_id=CONFIG,
        provider="openai",
        budgets=(budget("b-p", "8", "1h"),),
    )
    log.key((budget("b-k", "10", "1d"),), RATE, provider_configs=(config,))
    log.key(
        (budget("b-s", "6", "3h"),),
        key_id=SOLO,
        secret="sk-gl-" + "o" * 32,
        team_id=None,
        customer_id=CUSTOMER,
    )
    return log


usage_op = st.tuples(
    st.just("usage"),
    st.sampled_from([KEY, SOLO]),
    st.integers(0, 3 * 10**9).map(lambda n: Decimal(n).scaleb(-9)),
    st.integers(0, 400),
    st.integers(0, 2),
    st.sampled_from([0, 0, 1, 30, 400, 90_000, -120]),  # seconds before `at`
    st.booleans(),  # through the provider config (KEY only)
)
operations = st.lists(
    st.one_of(
        usage_op,
        usage_op,
        usage_op,
        st.tuples(st.just("tick"), st.sampled_from([0, 0, 1, 59, 3600, 86_400])),
        st.tuples(st.just("budgets"), st.sampled_from(["c", "t", "k"]), st.booleans()),
        st.tuples(st.just("hold"), st.integers(0, 3)),
        st.tuples(st.just("release"), st.integers(0, 3)),
        st.tuples(st.just("settle"), st.integers(0, 3)),
        st.just(("delete_team",)),
    ),
    max_size=60,
)


def play(log: Log, ops: list[tuple[Any, ...]]) -> None:
    at = T0 + SECOND
    for op in ops:
        match op:
            case ("tick", seconds):
                at += seconds * SECOND
            case ("usage", key_id, cost, tokens, requests, lag, via_config):
                chain = log.cache.resolve_usage(
                    virtual_key_sha256=None, virtual_key_id=key_id, provider="openai"
                )
                assert chain is not None
                log.append(
                    f"usage-{key_id}",
                    UsageRecorded(
                        virtual_key_id=key_id,
                        provider="openai",
                        model="gpt-4o",
                        cost=cost,
                        input_tokens=tokens,
                        requests=requests,
                        occurred_at=at - lag * SECOND,
                        provider_config_id=chain.provider_config_id
                        if via_config
                        else None,
                        team_id=chain.team_id,
                        customer_id=chain.customer_id,
                    ),
                    at,
                )
            case ("budgets", owner, reset):
                specs = (budget(f"b-{owner}", "15", "1d", reset_usage=reset),)
                if owner == "c":
                    event: Any = CustomerBudgetsReplaced(
                        customer_id=CUSTOMER, budgets=specs
                    )
                    log.append(f"customer-{CUSTOMER}", event, at)
                elif owner == "t":
                    event = TeamBudgetsReplaced(team_id=TEAM, budgets=specs)
                    log.append(f"team-{TEAM}", event, at)
                else:
                    event = VirtualKeyBudgetsReplaced(virtual_key_id=KEY, budgets=specs)
                    log.append(f"virtual_key-{KEY}", event, at)
            case ("hold", n):
                log.append(
                    f"usage-{KEY}",
                    ReservationHeld(
                        reservation_id=f"r{n}",
                        virtual_key_id=KEY,
                        team_id=TEAM,
                        customer_id=CUSTOMER,
                        budget_ids=("b-k", "b-t", "b-c"),
                        rate_owner_ids=(KEY, TEAM, CUSTOMER),
                        amount=Decimal("1.5"),
                        tokens=100,
                        expires_at=at + timedelta(minutes=5),
                    ),
                    at,
                )
            case ("release", n):
                log.append(
                    f"usage-{KEY}",
                    ReservationReleased(reservation_id=f"r{n}", virtual_key_id=KEY),
                    at,
                )
            case ("settle", n):
                log.append(
                    f"usage-{KEY}",
                    UsageRecorded(
                        virtual_key_id=KEY,
                        provider="openai",
                        model="gpt-4o",
                        cost=Decimal("1.25"),
                        occurred_at=at,
                        team_id=TEAM,
                        customer_id=CUSTOMER,
                        reservation_id=f"r{n}",
                    ),
                    at,
                )
            case ("delete_team",):
                log.append(f"team-{TEAM}", TeamDeleted(team_id=TEAM), at)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, split=st.lists(st.integers(1, 9), min_size=1, max_size=8))
def test_the_tail_folds_batches_as_events_applied_one_by_one(
    ops: list[tuple[Any, ...]], split: list[int]
) -> None:
    log = setup()
    start = len(log.records)
    play(log, ops)
    tail = GovernanceCache()
    for record in log.records[:start]:
        tail.apply(record)
    fold = cache_loader.applier(tail).fold
    rows = [row(record) for record in log.records[start:]]
    at, sizes = 0, iter(split * (1 + len(rows)))
    while at < len(rows):
        size = next(sizes)
        assert fold(rows[at : at + size]) == []
        at += size
        assert state(tail) == state(_applied(log.records[: start + at]))
    later = log.records[-1].recorded_at + timedelta(minutes=2)
    for secret in ("sk-gl-" + "k" * 32, "sk-gl-" + "o" * 32):
        assert check(tail, secret, later) == check(log.cache, secret, later)
    assert state(tail) == state(log.cache)


def _applied(records: list[RecordedEvent]) -> GovernanceCache:
    cache = GovernanceCache()
    for record in records:
        cache.apply(record)
    return cache


def test_a_run_at_one_instant_is_charged_once_per_owner_and_occurred_at() -> None:
    log = setup()
    start = len(log.records)
    at = T0 + SECOND
    for n in range(10):
        log.usage("0.1", at=at, occurred_at=at - (n % 2) * SECOND, tokens=3)
    tail = GovernanceCache()
    for record in log.records[:start]:
        tail.apply(record)
    fold = cache_loader.applier(tail).fold
    assert fold([row(r) for r in log.records[start:]]) == []
    assert state(tail) == state(log.cache)
    assert check(tail, "sk-gl-" + "k" * 32, at) == check(
        log.cache, "sk-gl-" + "k" * 32, at
    )
