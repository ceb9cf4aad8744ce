"""The enforcement cache, pure: events applied as RecordedEvents with chosen
recorded_at, checks with `now` injected; and a brute-force reference model."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.cache import GovernanceCache
from projections.cache_entries import (
    ALLOWED,
    KEY_INACTIVE,
    MODEL_NOT_ALLOWED,
    PROVIDER_NOT_ALLOWED,
    UNKNOWN_KEY,
    CheckResult,
    RateHalf,
)
from projections.governance_views import OwnerType
from service.domain.budgets import parse_duration, period_bounds
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerDeleted,
    ProviderConfig,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamDeleted,
    TeamUpdated,
    UsageRecorded,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyDeleted,
    VirtualKeyUpdated,
)
from service.domain.ledger import (
    BUDGET,
    Pending,
    StoredLedger,
    StoredMeter,
    advance,
    restore,
)
from service.domain.usage import UsageChain
from service.records import Checkpoint, RecordedEvent
from tests.builders import budget, sha256

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # a Monday
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

CUSTOMER = "c0000000-0000-4000-8000-000000000001"
TEAM = "70000000-0000-4000-8000-000000000001"
KEY = "a0000000-0000-4000-8000-000000000001"
CONFIG = "b0000000-0000-4000-8000-000000000001"
SECRET = "sk-gl-" + "k" * 32


class Log:
    """Appends events with chosen recorded_at and folds each into a cache."""

    def __init__(self) -> None:
        self.cache = GovernanceCache()
        self.records: list[RecordedEvent] = []
        self._versions: dict[str, int] = {}

    def append(self, stream_id: str, event: AnyEvent, at: datetime) -> RecordedEvent:
        position = len(self.records) + 1
        if stream_id.startswith("usage-"):
            version = position  # usage streams are unversioned
        else:
            version = self._versions.get(stream_id, 0) + 1
            self._versions[stream_id] = version
        record = RecordedEvent(
            global_position=position,
            tx_id=1000 + position,
            event_id=f"00000000-0000-4000-8000-{position:012d}",
            stream_id=stream_id,
            stream_version=version,
            schema_version=type(event).schema_version,
            event=event,
            metadata={},
            recorded_at=at,
        )
        self.records.append(record)
        self.cache.apply(record)
        return record

    # --- shorthand -------------------------------------------------------------

    def customer(
        self,
        budgets: tuple[Budget, ...] = (),
        rate_limit: RateLimit | None = None,
        *,
        at: datetime = T0,
        customer_id: str = CUSTOMER,
    ) -> None:
        self.append(
            f"customer-{customer_id}",
            CustomerCreated(
                customer_id=customer_id,
                name="acme",
                budgets=budgets,
                rate_limit=rate_limit,
            ),
            at,
        )

    def team(
        self,
        budgets: tuple[Budget, ...] = (),
        rate_limit: RateLimit | None = None,
        *,
        customer_id: str | None = CUSTOMER,
        at: datetime = T0,
        team_id: str = TEAM,
    ) -> None:
        self.append(
            f"team-{team_id}",
            TeamCreated(
                team_id=team_id,
                name="platform",
                customer_id=customer_id,
                budgets=budgets,
                rate_limit=rate_limit,
            ),
            at,
        )

    def key(
        self,
        budgets: tuple[Budget, ...] = (),
        rate_limit: RateLimit | None = None,
        *,
        team_id: str | None = TEAM,
        customer_id: str | None = None,
        provider_configs: tuple[ProviderConfig, ...] = (),
        is_active: bool = True,
        at: datetime = T0,
        key_id: str = KEY,
        secret: str = SECRET,
    ) -> None:
        self.append(
            f"virtual_key-{key_id}",
            VirtualKeyCreated(
                virtual_key_id=key_id,
                name="gateway",
                value_sha256=sha256(secret),
                value_hint=secret[-4:],
                team_id=team_id,
                customer_id=customer_id,
                is_active=is_active,
                budgets=budgets,
                rate_limit=rate_limit,
                provider_configs=provider_configs,
            ),
            at,
        )

    def usage(
        self,
        cost: str,
        *,
        at: datetime,
        occurred_at: datetime | None = None,
        tokens: int = 0,
        requests: int = 1,
        key_id: str = KEY,
        provider: str = "openai",
        config_id: str | None = None,
        team_id: str | None = TEAM,
        customer_id: str | None = CUSTOMER,
    ) -> None:
        self.append(
            f"usage-{key_id}",
            UsageRecorded(
                virtual_key_id=key_id,
                provider=provider,
                model="gpt-4o",
                cost=Decimal(cost),
                input_tokens=tokens,
                requests=requests,
                occurred_at=at if occurred_at is None else occurred_at,
                provider_config_id=config_id,
                team_id=team_id,
                customer_id=customer_id,
            ),
            at,
        )

    def check(
        self,
        now: datetime,
        *,
        provider: str | None = "openai",
        model: str | None = "gpt-4o",
        estimated_cost: str | None = None,
        secret: str = SECRET,
    ) -> CheckResult:
        return self.cache.check(
            virtual_key_sha256=sha256(secret),
            virtual_key_id=None,
            provider=provider,
            model=model,
            estimated_cost=None if estimated_cost is None else Decimal(estimated_cost),
            now=now,
        )


def allowed(remaining: str) -> CheckResult:
    return CheckResult(
        allowed=True, reason="ok", http_status=200, remaining=Decimal(remaining)
    )


def over_budget(
    budget_id: str, owner_type: OwnerType, owner_id: str, usage: str, limit: str
) -> CheckResult:
    return CheckResult(
        allowed=False,
        reason="budget_exceeded",
        http_status=402,
        budget_id=budget_id,
        owner_type=owner_type,
        owner_id=owner_id,
        current_usage=Decimal(usage),
        max_limit=Decimal(limit),
    )


def rate_limited(
    kind: RateHalf, owner_type: OwnerType, owner_id: str, used: int, limit: int
) -> CheckResult:
    return CheckResult(
        allowed=False,
        reason="rate_limited",
        http_status=429,
        owner_type=owner_type,
        owner_id=owner_id,
        current_usage=Decimal(used),
        max_limit=Decimal(limit),
        rate_limit=kind,
    )


# --- the key, the provider and the model -------------------------------------------


def test_an_unknown_key_is_refused_with_401() -> None:
    log = Log()
    log.key(team_id=None)
    assert log.check(T0, secret="sk-gl-unknown") == UNKNOWN_KEY
    assert UNKNOWN_KEY.http_status == 401
    assert UNKNOWN_KEY.reason == "unknown_virtual_key"
    by_id = log.cache.check(
        virtual_key_sha256=None,
        virtual_key_id="a0000000-0000-4000-8000-00000000ffff",
        provider=None,
        model=None,
        estimated_cost=None,
        now=T0,
    )
    assert by_id == UNKNOWN_KEY


def test_a_key_is_found_by_its_id_as_well_as_by_its_secret() -> None:
    log = Log()
    log.key(team_id=None)
    by_id = log.cache.check(
        virtual_key_sha256=None,
        virtual_key_id=KEY,
        provider="any",
        model="any",
        estimated_cost=None,
        now=T0,
    )
    assert by_id == ALLOWED


def test_an_inactive_key_is_refused_with_403() -> None:
    log = Log()
    log.key(team_id=None, is_active=False)
    assert log.check(T0) == KEY_INACTIVE
    assert (KEY_INACTIVE.reason, KEY_INACTIVE.http_status) == ("key_inactive", 403)


def test_a_key_without_provider_configs_may_use_any_provider() -> None:
    log = Log()
    log.key(team_id=None)
    assert log.check(T0, provider="anthropic", model="claude") == ALLOWED
    assert log.check(T0, provider=None, model=None) == ALLOWED


def test_a_provider_outside_the_key_configs_is_not_allowed() -> None:
    log = Log()
    log.key(
        team_id=None,
        provider_configs=(
            ProviderConfig(provider_config_id=CONFIG, provider="openai"),
        ),
    )
    assert log.check(T0, provider="openai") == ALLOWED
    assert log.check(T0, provider="anthropic") == PROVIDER_NOT_ALLOWED
    assert log.check(T0, provider=None) == PROVIDER_NOT_ALLOWED
    assert PROVIDER_NOT_ALLOWED.http_status == 403


def test_allowed_models_limit_the_models_of_a_provider() -> None:
    log = Log()
    log.key(
        team_id=None,
        provider_configs=(
            ProviderConfig(
                provider_config_id=CONFIG,
                provider="openai",
                allowed_models=("gpt-4o",),
            ),
            ProviderConfig(
                provider_config_id="b0000000-0000-4000-8000-000000000002",
                provider="anthropic",
                allowed_models=("*",),
            ),
            ProviderConfig(
                provider_config_id="b0000000-0000-4000-8000-000000000003",
                provider="mistral",
                allowed_models=(),
            ),
        ),
    )
    assert log.check(T0, provider="openai", model="gpt-4o") == ALLOWED
    assert log.check(T0, provider="openai", model="o1") == MODEL_NOT_ALLOWED
    assert log.check(T0, provider="openai", model=None) == MODEL_NOT_ALLOWED
    assert log.check(T0, provider="anthropic", model="claude") == ALLOWED
    assert log.check(T0, provider="mistral", model="large") == MODEL_NOT_ALLOWED
    assert MODEL_NOT_ALLOWED.http_status == 403


def test_a_rotated_secret_replaces_the_old_one() -> None:
    log = Log()
    log.key(team_id=None)
    new_secret = "sk-gl-" + "n" * 32
    log.append(
        f"virtual_key-{KEY}",
        VirtualKeyUpdated(
            virtual_key_id=KEY,
            name="gateway",
            value_sha256=sha256(new_secret),
            value_hint=new_secret[-4:],
        ),
        T0 + SECOND,
    )
    assert log.check(T0 + SECOND) == UNKNOWN_KEY
    assert log.check(T0 + SECOND, secret=new_secret) == ALLOWED


def test_a_deactivated_key_is_refused_and_a_deleted_one_is_unknown() -> None:
    log = Log()
    log.key(team_id=None)
    log.append(
        f"virtual_key-{KEY}",
        VirtualKeyUpdated(
            virtual_key_id=KEY,
            name="gateway",
            value_sha256=sha256(SECRET),
            value_hint=SECRET[-4:],
            is_active=False,
        ),
        T0 + SECOND,
    )
    assert log.check(T0 + SECOND) == KEY_INACTIVE
    log.append(
        f"virtual_key-{KEY}", VirtualKeyDeleted(virtual_key_id=KEY), T0 + 2 * SECOND
    )
    assert log.check(T0 + 2 * SECOND) == UNKNOWN_KEY


# --- rate limits -------------------------------------------------------------------


def test_an_exhausted_request_limit_blocks_with_429_naming_it() -> None:
    log = Log()
    limit = RateLimit(request_max_limit=2, request_reset_duration="1m")
    log.key(team_id=None, rate_limit=limit)
    log.usage("0", at=T0 + SECOND, team_id=None, customer_id=None)
    assert log.check(T0 + SECOND) == ALLOWED
    log.usage("0", at=T0 + 2 * SECOND, team_id=None, customer_id=None)
    assert log.check(T0 + 2 * SECOND) == rate_limited(
        "requests", "virtual_key", KEY, 2, 2
    )
    assert log.check(T0 + MINUTE) == ALLOWED  # the next minute starts afresh


def test_tokens_count_input_plus_output_toward_the_token_limit() -> None:
    log = Log()
    limit = RateLimit(token_max_limit=100, token_reset_duration="1h")
    log.key(team_id=None, rate_limit=limit)
    log.append(
        f"usage-{KEY}",
        UsageRecorded(
            virtual_key_id=KEY,
            provider="openai",
            model="gpt-4o",
            cost=Decimal(0),
            input_tokens=60,
            output_tokens=39,
            occurred_at=T0,
        ),
        T0,
    )
    assert log.check(T0) == ALLOWED
    log.append(
        f"usage-{KEY}",
        UsageRecorded(
            virtual_key_id=KEY,
            provider="openai",
            model="gpt-4o",
            cost=Decimal(0),
            output_tokens=1,
            occurred_at=T0,
        ),
        T0,
    )
    assert log.check(T0) == rate_limited("tokens", "virtual_key", KEY, 100, 100)


def test_a_rate_limit_anywhere_in_the_chain_blocks_before_any_budget() -> None:
    log = Log()
    log.customer(rate_limit=RateLimit(request_max_limit=1, request_reset_duration="1h"))
    log.team()
    log.key(budgets=(budget("b-key", "1", "1d"),))
    log.usage("5", at=T0)
    assert log.check(T0) == rate_limited("requests", "customer", CUSTOMER, 1, 1)


def test_a_changed_rate_limit_duration_starts_afresh_but_a_new_limit_keeps_usage() -> (
    None
):
    log = Log()
    log.key(
        team_id=None,
        rate_limit=RateLimit(request_max_limit=2, request_reset_duration="1h"),
    )
    log.usage("0", at=T0, team_id=None, customer_id=None)
    log.usage("0", at=T0, team_id=None, customer_id=None)

    def update(limit: RateLimit, at: datetime) -> None:
        log.append(
            f"virtual_key-{KEY}",
            VirtualKeyUpdated(
                virtual_key_id=KEY,
                name="gateway",
                value_sha256=sha256(SECRET),
                value_hint=SECRET[-4:],
                rate_limit=limit,
            ),
            at,
        )

    update(RateLimit(request_max_limit=3, request_reset_duration="1h"), T0 + SECOND)
    assert log.check(T0 + SECOND) == ALLOWED
    update(RateLimit(request_max_limit=2, request_reset_duration="1h"), T0 + SECOND)
    assert log.check(T0 + SECOND) == rate_limited("requests", "virtual_key", KEY, 2, 2)
    update(RateLimit(request_max_limit=2, request_reset_duration="2h"), T0 + SECOND)
    assert log.check(T0 + 2 * SECOND) == ALLOWED


# --- budgets -----------------------------------------------------------------------


def test_usage_on_a_key_of_a_team_of_a_customer_counts_at_every_level() -> None:
    log = Log()
    log.customer((budget("b-customer", "100", "1M"),))
    log.team((budget("b-team", "50", "1M"),))
    log.key((budget("b-key", "20", "1M"),))
    log.usage("12.5", at=T0 + HOUR)
    assert log.check(T0 + HOUR) == allowed("7.5")
    # The key's budget is the smallest headroom; drop it and the team's shows.
    log.append(
        f"virtual_key-{KEY}",
        VirtualKeyBudgetsReplaced(virtual_key_id=KEY, budgets=()),
        T0 + HOUR,
    )
    assert log.check(T0 + HOUR) == allowed("37.5")
    log.usage("37.5", at=T0 + 2 * HOUR)
    assert log.check(T0 + 2 * HOUR) == over_budget("b-team", "team", TEAM, "50", "50")
    log.append(
        f"team-{TEAM}", TeamBudgetsReplaced(team_id=TEAM, budgets=()), T0 + 2 * HOUR
    )
    assert log.check(T0 + 2 * HOUR) == allowed("50")


def test_the_daily_cap_blocks_while_the_monthly_one_has_room() -> None:
    log = Log()
    log.customer()
    log.team(
        (
            budget("b-month", "100", "1M", calendar_aligned=True),
            budget("b-day", "10", "1d", calendar_aligned=True),
        )
    )
    log.key()
    log.usage("10", at=T0 + HOUR)
    assert log.check(T0 + HOUR) == over_budget("b-day", "team", TEAM, "10", "10")
    tomorrow = datetime(2026, 11, 3, tzinfo=UTC)
    assert log.check(tomorrow) == allowed("10")
    log.usage("4", at=tomorrow)
    assert log.check(tomorrow) == allowed("6")


def test_budgets_block_in_chain_order_and_by_their_order_within_an_owner() -> None:
    log = Log()
    log.customer((budget("b-customer", "1", "1d"),))
    log.team((budget("b-team-week", "1", "1w"), budget("b-team-day", "1", "1d")))
    log.key((budget("b-key", "100", "1d"),))
    log.usage("1", at=T0)
    assert log.check(T0) == over_budget("b-team-week", "team", TEAM, "1", "1")


def test_a_provider_config_budget_limits_only_that_provider() -> None:
    log = Log()
    log.key(
        team_id=None,
        provider_configs=(
            ProviderConfig(
                provider_config_id=CONFIG,
                provider="openai",
                budgets=(budget("b-openai", "2", "1d"),),
            ),
            ProviderConfig(
                provider_config_id="b0000000-0000-4000-8000-000000000002",
                provider="anthropic",
            ),
        ),
    )
    log.usage("2", at=T0, config_id=CONFIG, team_id=None, customer_id=None)
    assert log.check(T0, provider="openai") == over_budget(
        "b-openai", "provider_config", CONFIG, "2", "2"
    )
    assert log.check(T0, provider="anthropic", model="claude") == ALLOWED


def test_a_provider_config_rate_limit_counts_its_own_usage() -> None:
    log = Log()
    log.key(
        team_id=None,
        provider_configs=(
            ProviderConfig(
                provider_config_id=CONFIG,
                provider="openai",
                rate_limit=RateLimit(request_max_limit=1, request_reset_duration="1h"),
            ),
        ),
    )
    log.usage("0", at=T0, team_id=None, customer_id=None)  # charged to no config
    assert log.check(T0) == ALLOWED
    log.usage("0", at=T0, config_id=CONFIG, team_id=None, customer_id=None)
    assert log.check(T0) == rate_limited("requests", "provider_config", CONFIG, 1, 1)


def test_an_estimated_cost_over_the_headroom_blocks() -> None:
    log = Log()
    log.key((budget("b-key", "10", "1d"),), team_id=None)
    log.usage("7.25", at=T0, team_id=None, customer_id=None)
    assert log.check(T0, estimated_cost="2.75") == allowed("2.75")
    assert log.check(T0, estimated_cost="2.750000001") == over_budget(
        "b-key", "virtual_key", KEY, "7.25", "10"
    )
    assert log.check(T0, estimated_cost="0") == allowed("2.75")


def test_an_estimate_finer_than_nanos_still_compares_exactly() -> None:
    log = Log()
    log.key((budget("b-key", "1", "1d"),), team_id=None)
    assert log.check(T0, estimated_cost="1.0000000000001").allowed is False
    assert log.check(T0, estimated_cost="0.9999999999999").allowed is True


def test_no_budget_in_the_chain_means_no_remaining() -> None:
    log = Log()
    log.customer()
    log.team()
    log.key()
    log.usage("1000", at=T0)
    assert log.check(T0, estimated_cost="1000000") == ALLOWED
    assert ALLOWED.remaining is None


# --- periods -----------------------------------------------------------------------


def test_a_30s_budget_blocks_then_allows_once_its_period_ends() -> None:
    log = Log()
    log.key((budget("b-key", "1", "30s"),), team_id=None)
    log.usage("1", at=T0 + 10 * SECOND, team_id=None, customer_id=None)
    assert log.check(T0 + 29 * SECOND) == over_budget(
        "b-key", "virtual_key", KEY, "1", "1"
    )
    assert log.check(T0 + 30 * SECOND) == allowed("1")


def test_usage_ahead_of_the_clock_counts_when_its_period_comes() -> None:
    log = Log()
    log.key((budget("b-key", "1", "30s"),), team_id=None)
    log.usage(
        "1",
        at=T0 + 10 * SECOND,
        occurred_at=T0 + 40 * SECOND,
        team_id=None,
        customer_id=None,
    )
    assert log.check(T0 + 20 * SECOND) == allowed("1")
    assert log.check(T0 + 40 * SECOND) == over_budget(
        "b-key", "virtual_key", KEY, "1", "1"
    )


def test_late_usage_lands_in_its_own_past_period() -> None:
    log = Log()
    log.key((budget("b-key", "10", "1h"),), team_id=None)
    log.usage("3", at=T0 + 30 * MINUTE, team_id=None, customer_id=None)
    assert log.check(T0 + HOUR) == allowed("10")
    log.usage(
        "4",
        at=T0 + HOUR + MINUTE,
        occurred_at=T0 + 59 * MINUTE,
        team_id=None,
        customer_id=None,
    )
    assert log.check(T0 + HOUR + MINUTE) == allowed("10")


def test_usage_before_a_budget_existed_never_counts() -> None:
    log = Log()
    log.key(team_id=None)
    log.append(
        f"virtual_key-{KEY}",
        VirtualKeyBudgetsReplaced(
            virtual_key_id=KEY,
            budgets=(budget("b-key", "10", "1d", calendar_aligned=True),),
        ),
        T0 + HOUR,
    )
    log.usage(
        "3",
        at=T0 + 2 * HOUR,
        occurred_at=T0 + 30 * MINUTE,
        team_id=None,
        customer_id=None,
    )
    assert log.check(T0 + 2 * HOUR) == allowed("10")


def test_turning_calendar_alignment_on_resets_usage_at_that_event() -> None:
    log = Log()
    log.key((budget("b-key", "10", "1d"),), team_id=None)
    log.usage("6", at=T0 + HOUR, team_id=None, customer_id=None)
    assert log.check(T0 + HOUR) == allowed("4")
    log.append(
        f"virtual_key-{KEY}",
        VirtualKeyBudgetsReplaced(
            virtual_key_id=KEY,
            budgets=(
                budget("b-key", "10", "1d", calendar_aligned=True, reset_usage=True),
            ),
        ),
        T0 + 2 * HOUR,
    )
    assert log.check(T0 + 2 * HOUR) == allowed("10")
    log.usage("1", at=T0 + 3 * HOUR, team_id=None, customer_id=None)
    assert log.check(T0 + 3 * HOUR) == allowed("9")
    # Calendar days now: the period ends at midnight, not 24 h after creation.
    assert log.check(datetime(2026, 11, 3, tzinfo=UTC)) == allowed("10")


def test_turning_calendar_alignment_off_keeps_the_current_usage() -> None:
    log = Log()
    log.key((budget("b-key", "10", "1d", calendar_aligned=True),), team_id=None)
    log.usage("6", at=T0 + HOUR, team_id=None, customer_id=None)
    log.append(
        f"virtual_key-{KEY}",
        VirtualKeyBudgetsReplaced(
            virtual_key_id=KEY, budgets=(budget("b-key", "10", "1d"),)
        ),
        T0 + 2 * HOUR,
    )
    assert log.check(T0 + 2 * HOUR) == allowed("4")
    # Rolling from the creation (09:00), so the period runs to 09:00 tomorrow.
    assert log.check(datetime(2026, 11, 3, 8, 59, tzinfo=UTC)) == allowed("4")
    assert log.check(T0 + DAY) == allowed("10")


def test_an_explicit_reset_shows_zero_at_once_and_counts_later_usage() -> None:
    log = Log()
    log.key((budget("b-key", "10", "1M"),), team_id=None)
    log.usage("9", at=T0 + HOUR, team_id=None, customer_id=None)
    log.append(
        f"virtual_key-{KEY}",
        VirtualKeyBudgetsReplaced(
            virtual_key_id=KEY, budgets=(budget("b-key", "10", "1M", reset_usage=True),)
        ),
        T0 + 2 * HOUR,
    )
    assert log.check(T0 + 2 * HOUR) == allowed("10")
    log.usage(
        "5",
        at=T0 + 3 * HOUR,
        occurred_at=T0 + 90 * MINUTE,  # before the reset: does not count
        team_id=None,
        customer_id=None,
    )
    log.usage("2", at=T0 + 3 * HOUR, team_id=None, customer_id=None)
    assert log.check(T0 + 3 * HOUR) == allowed("8")


def test_a_raised_limit_keeps_the_usage() -> None:
    log = Log()
    log.key((budget("b-key", "10", "1d"),), team_id=None)
    log.usage("10", at=T0, team_id=None, customer_id=None)
    assert log.check(T0).reason == "budget_exceeded"
    log.append(
        f"virtual_key-{KEY}",
        VirtualKeyBudgetsReplaced(
            virtual_key_id=KEY, budgets=(budget("b-key", "15", "1d"),)
        ),
        T0 + SECOND,
    )
    assert log.check(T0 + SECOND) == allowed("5")


# --- the chain ---------------------------------------------------------------------


def test_a_key_of_a_team_uses_the_team_customer_and_not_its_own() -> None:
    log = Log()
    log.customer((budget("b-customer", "1", "1d"),))
    log.team(customer_id=None)
    log.key(team_id=TEAM)
    log.usage("1", at=T0, team_id=TEAM, customer_id=CUSTOMER)
    assert log.check(T0) == ALLOWED  # the team has no customer, so none applies
    assert log.cache.resolve_usage(
        virtual_key_sha256=sha256(SECRET), virtual_key_id=None, provider="openai"
    ) == UsageChain(
        virtual_key_id=KEY, provider_config_id=None, team_id=TEAM, customer_id=None
    )


def test_a_key_without_a_team_uses_its_own_customer() -> None:
    log = Log()
    log.customer((budget("b-customer", "1", "1d"),))
    log.key(team_id=None, customer_id=CUSTOMER)
    log.usage("1", at=T0, team_id=None, customer_id=CUSTOMER)
    assert log.check(T0) == over_budget("b-customer", "customer", CUSTOMER, "1", "1")


def test_resolve_usage_names_the_owners_that_exist() -> None:
    log = Log()
    log.customer()
    log.team()
    log.key(
        provider_configs=(ProviderConfig(provider_config_id=CONFIG, provider="openai"),)
    )
    resolve = log.cache.resolve_usage
    assert resolve(
        virtual_key_sha256=sha256(SECRET), virtual_key_id=None, provider="openai"
    ) == UsageChain(
        virtual_key_id=KEY,
        provider_config_id=CONFIG,
        team_id=TEAM,
        customer_id=CUSTOMER,
    )
    assert resolve(
        virtual_key_sha256=None, virtual_key_id=KEY, provider="anthropic"
    ) == UsageChain(
        virtual_key_id=KEY, provider_config_id=None, team_id=TEAM, customer_id=CUSTOMER
    )
    assert (
        resolve(virtual_key_sha256=sha256("nope"), virtual_key_id=None, provider="x")
        is None
    )


def test_a_deleted_team_leaves_the_chain_and_takes_its_customer_along() -> None:
    log = Log()
    log.customer((budget("b-customer", "1", "1d"),))
    log.team((budget("b-team", "1", "1d"),))
    log.key()
    log.usage("1", at=T0)
    assert log.check(T0).budget_id == "b-team"
    log.append(f"team-{TEAM}", TeamDeleted(team_id=TEAM), T0 + SECOND)
    # Still naming the deleted team (a dangling reference): neither applies.
    assert log.check(T0 + SECOND) == ALLOWED
    log.append(
        f"virtual_key-{KEY}",
        VirtualKeyUpdated(
            virtual_key_id=KEY,
            name="gateway",
            value_sha256=sha256(SECRET),
            value_hint=SECRET[-4:],
        ),
        T0 + SECOND,
    )
    assert log.check(T0 + SECOND) == ALLOWED
    assert log.cache.resolve_usage(
        virtual_key_sha256=None, virtual_key_id=KEY, provider=None
    ) == UsageChain(
        virtual_key_id=KEY, provider_config_id=None, team_id=None, customer_id=None
    )


def test_a_deleted_customer_leaves_the_chain() -> None:
    log = Log()
    log.customer((budget("b-customer", "1", "1d"),))
    log.team()
    log.key()
    log.usage("1", at=T0)
    assert log.check(T0).owner_type == "customer"
    log.append(
        f"customer-{CUSTOMER}", CustomerDeleted(customer_id=CUSTOMER), T0 + SECOND
    )
    log.append(
        f"team-{TEAM}",
        TeamUpdated(team_id=TEAM, name="platform", customer_id=None),
        T0 + SECOND,
    )
    assert log.check(T0 + SECOND) == ALLOWED


def test_moving_a_team_to_another_customer_moves_the_chain() -> None:
    log = Log()
    other = "c0000000-0000-4000-8000-000000000002"
    log.customer((budget("b-first", "5", "1d"),))
    log.customer((budget("b-second", "3", "1d"),), customer_id=other)
    log.team()
    log.key()
    assert log.check(T0) == allowed("5")
    log.append(
        f"team-{TEAM}",
        TeamUpdated(team_id=TEAM, name="platform", customer_id=other),
        T0 + SECOND,
    )
    assert log.check(T0 + SECOND) == allowed("3")


def test_a_team_created_after_a_key_that_names_it_joins_the_key_chain() -> None:
    log = Log()
    log.key()  # names TEAM, which does not exist yet: a dangling reference
    assert log.check(T0) == ALLOWED
    log.team((budget("b-team", "2", "1d"),), customer_id=None, at=T0 + SECOND)
    assert log.check(T0 + SECOND) == allowed("2")


def test_usage_charges_exactly_the_owners_it_names() -> None:
    log = Log()
    log.customer((budget("b-customer", "10", "1d"),))
    log.team((budget("b-team", "10", "1d"),))
    log.key()
    log.usage("4", at=T0, team_id=TEAM, customer_id=None)
    assert log.check(T0) == allowed("6")  # the team's headroom
    log.append(
        f"team-{TEAM}", TeamBudgetsReplaced(team_id=TEAM, budgets=()), T0 + SECOND
    )
    assert log.check(T0 + SECOND) == allowed("10")  # the customer was not charged


def test_usage_of_a_deleted_key_still_charges_its_team() -> None:
    log = Log()
    log.customer()
    log.team((budget("b-team", "10", "1d"),))
    log.key()
    other_key = "a0000000-0000-4000-8000-000000000002"
    other_secret = "sk-gl-" + "o" * 32
    log.key(key_id=other_key, secret=other_secret)
    log.append(f"virtual_key-{KEY}", VirtualKeyDeleted(virtual_key_id=KEY), T0 + SECOND)
    log.usage("4", at=T0 + 2 * SECOND, occurred_at=T0)
    assert log.check(T0 + 2 * SECOND, secret=other_secret) == allowed("6")


def test_redelivered_events_change_nothing() -> None:
    log = Log()
    log.customer((budget("b-customer", "10", "1d"),))
    log.team()
    log.key()
    log.usage("4", at=T0)
    log.append(
        f"customer-{CUSTOMER}", CustomerDeleted(customer_id=CUSTOMER), T0 + SECOND
    )
    for record in log.records:
        log.cache.apply(record)
    assert log.cache.customers == {}
    assert log.check(T0 + SECOND) == ALLOWED
    assert log.cache.position == len(log.records)


def test_redelivered_usage_is_charged_once() -> None:
    log = Log()
    log.key((budget("b-key", "10", "1d"),), team_id=None)
    log.usage("4", at=T0, team_id=None, customer_id=None)
    log.cache.apply(log.records[-1])
    assert log.check(T0) == allowed("6")


# --- restore -----------------------------------------------------------------------


def test_a_restored_meter_takes_the_current_and_later_periods_only() -> None:
    ledger = restore(
        StoredLedger(
            clock=T0 + 100 * MINUTE,
            meters=(
                StoredMeter(
                    kind=BUDGET,
                    id="b",
                    limit=10 * 10**9,
                    reset_duration="1h",
                    calendar_aligned=False,
                    anchor=T0,
                    floor=T0 + 90 * MINUTE,  # a reset inside the second hour
                    cells=(
                        (T0, 5),  # first hour: past
                        (T0 + HOUR, 7),  # second hour, before the reset
                        (T0 + 90 * MINUTE, 2),  # second hour, after the reset
                    ),
                ),
            ),
            pending=(Pending(T0 + 2 * HOUR, 3 * 10**9, 0, 0),),  # third hour: ahead
        ),
        now=T0 + 100 * MINUTE,
    )
    [meter] = ledger.budgets
    assert (meter.start, meter.end, meter.used) == (T0 + HOUR, T0 + 2 * HOUR, 2)
    assert meter.cells == {T0 + 90 * MINUTE: 2}
    advance(ledger, T0 + 2 * HOUR)
    assert (meter.start, meter.used) == (T0 + 2 * HOUR, 3 * 10**9)


def test_a_cache_restored_from_owners_checks_like_one_built_from_events() -> None:
    log = Log()
    log.customer((budget("b-customer", "10", "1d"),))
    log.team((budget("b-team", "10", "1d"),))
    log.key(
        provider_configs=(
            ProviderConfig(
                provider_config_id=CONFIG,
                provider="openai",
                allowed_models=("gpt-4o",),
                budgets=(budget("b-config", "3", "1h"),),
            ),
        )
    )
    log.usage("2", at=T0, config_id=CONFIG)
    restored = GovernanceCache()
    restored.restore(
        customers=log.cache.customers.values(),
        teams=log.cache.teams.values(),
        keys=log.cache.keys.values(),
        checkpoint=Checkpoint(7, 7),
    )
    assert restored.position == 7
    assert restored.check(
        virtual_key_sha256=sha256(SECRET),
        virtual_key_id=None,
        provider="openai",
        model="gpt-4o",
        estimated_cost=None,
        now=T0,
    ) == allowed("1")


# --- property: the cache agrees with a brute-force reference ------------------------

DURATIONS = ("30s", "1m", "2m", "5m", "1h", "1d")


@dataclass
class RefBudget:
    budget_id: str
    limit: Decimal
    duration: str
    aligned: bool
    anchor: datetime
    floor: datetime


@dataclass
class RefRate:
    kind: RateHalf
    limit: int
    duration: str
    anchor: datetime


@dataclass
class RefOwner:
    owner_type: OwnerType
    owner_id: str
    budgets: list[RefBudget] = field(default_factory=list)
    rates: list[RefRate] = field(default_factory=list)


@dataclass
class RefUsage:
    occurred_at: datetime
    cost: Decimal
    tokens: int
    requests: int
    owners: frozenset[str]


def _same_period(
    at: datetime, now: datetime, duration: str, anchor: datetime, aligned: bool
) -> bool:
    def bounds(moment: datetime) -> tuple[datetime, datetime]:
        return period_bounds(
            moment,
            anchor=anchor,
            duration=parse_duration(duration),
            calendar_aligned=aligned,
        )

    return bounds(at) == bounds(now)


class Reference:
    """The rules of DESIGN.md and API.md by brute force: usage summed by scanning
    every usage event at each check."""

    def __init__(self) -> None:
        self.owners: dict[str, RefOwner] = {}
        self.team_of: dict[str, str | None] = {}  # key → team
        self.customer_of: dict[str, str | None] = {}  # key or team → customer
        self.configs: dict[str, dict[str, str]] = {}  # key → provider → config id
        self.usage: list[RefUsage] = []

    def chain(self, key_id: str, provider: str) -> list[RefOwner]:
        chain = [self.owners[key_id]]
        config_id = self.configs[key_id].get(provider)
        if config_id is not None:
            chain.append(self.owners[config_id])
        team_id = self.team_of[key_id]
        customer_id = self.customer_of[key_id]
        if team_id is not None:
            team = self.owners.get(team_id)
            customer_id = None if team is None else self.customer_of[team_id]
            if team is not None:
                chain.append(team)
        if customer_id is not None and customer_id in self.owners:
            chain.append(self.owners[customer_id])
        return chain

    def spent(self, owner: RefOwner, b: RefBudget, now: datetime) -> Decimal:
        return sum(
            (
                u.cost
                for u in self.usage
                if owner.owner_id in u.owners
                and u.occurred_at >= b.floor
                and _same_period(u.occurred_at, now, b.duration, b.anchor, b.aligned)
            ),
            Decimal(0),
        )

    def used(self, owner: RefOwner, r: RefRate, now: datetime) -> int:
        return sum(
            (u.tokens if r.kind == "tokens" else u.requests)
            for u in self.usage
            if owner.owner_id in u.owners
            and u.occurred_at >= r.anchor
            and _same_period(u.occurred_at, now, r.duration, r.anchor, False)
        )

    def check(
        self, key_id: str, provider: str, estimate: Decimal | None, now: datetime
    ) -> CheckResult:
        if self.configs[key_id] and provider not in self.configs[key_id]:
            return PROVIDER_NOT_ALLOWED
        chain = self.chain(key_id, provider)
        for owner in chain:
            for r in owner.rates:
                used = self.used(owner, r, now)
                if used >= r.limit:
                    return rate_limited(
                        r.kind, owner.owner_type, owner.owner_id, used, r.limit
                    )
        headroom: list[Decimal] = []
        for owner in chain:
            for b in owner.budgets:
                spent = self.spent(owner, b, now)
                if spent >= b.limit or (
                    estimate is not None and spent + estimate > b.limit
                ):
                    return over_budget(
                        b.budget_id,
                        owner.owner_type,
                        owner.owner_id,
                        str(spent),
                        str(b.limit),
                    )
                headroom.append(b.limit - spent)
        if not headroom:
            return ALLOWED
        return allowed(str(min(headroom)))


KEYS = ("k0", "k1", "k2")  # k0: team t0 of c0; k1: customer c1; k2: team t1 (none)
PROVIDERS = ("openai", "anthropic")
providers = st.sampled_from(("openai", "openai", "openai", "anthropic"))

budget_specs = st.lists(
    st.tuples(
        st.sampled_from(DURATIONS),
        st.integers(1, 4).map(lambda n: Decimal(n) / 2),
        st.booleans(),
    ),
    max_size=3,
    unique_by=lambda spec: spec[0],
)
rate_specs = st.one_of(
    st.none(),
    st.tuples(
        st.one_of(
            st.none(), st.tuples(st.integers(50, 300), st.sampled_from(DURATIONS))
        ),
        st.one_of(st.none(), st.tuples(st.integers(1, 4), st.sampled_from(DURATIONS))),
    ),
)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("usage"),
            st.sampled_from(KEYS),
            providers,
            st.integers(0, 6).map(lambda n: Decimal(n) / 4),
            st.integers(0, 150),
            st.integers(0, 2),
            st.integers(0, 200),  # lag of occurred_at behind the clock, seconds
        ),
        st.tuples(
            st.just("check"),
            st.sampled_from(KEYS),
            providers,
            st.one_of(st.none(), st.integers(0, 8).map(lambda n: Decimal(n) / 4)),
        ),
        st.tuples(
            st.just("budgets"),
            st.sampled_from(("c0", "c1", "t0", "t1", "k0", "k1", "k2", "p0")),
            budget_specs,
        ),
        st.tuples(st.just("reset"), st.sampled_from(("t0", "k0", "c0"))),
        st.tuples(st.just("move"), st.sampled_from(("c0", "c1", None))),
        st.tuples(
            st.just("delete_team"),
        ),
        st.tuples(st.just("tick"), st.integers(1, 400)),
    ),
    max_size=40,
)


# (tokens, requests), each (limit, duration) or None; or no rate limit at all.
RateSpec = tuple[tuple[int, str] | None, tuple[int, str] | None] | None


class Scenario:
    """Drives the cache through a Log and the reference side by side."""

    def __init__(self, rates: dict[str, RateSpec]) -> None:
        self.log = Log()
        self.ref = Reference()
        self.now = datetime(2026, 11, 30, 23, 50, tzinfo=UTC)  # a month end ahead
        self.counter = 0
        self.team_deleted = False
        owners: tuple[tuple[str, OwnerType], ...] = (
            ("c0", "customer"),
            ("c1", "customer"),
            ("t0", "team"),
            ("t1", "team"),
            ("k0", "virtual_key"),
            ("k1", "virtual_key"),
            ("k2", "virtual_key"),
            ("p0", "provider_config"),
        )
        for owner_id, owner_type in owners:
            self.ref.owners[owner_id] = RefOwner(owner_type, owner_id)
        self.ref.customer_of.update({"t0": "c0", "t1": None, "k1": "c1"})
        self.ref.team_of.update({"k0": "t0", "k1": None, "k2": "t1"})
        self.ref.customer_of.update({"k0": None, "k2": None})
        self.ref.configs.update({"k0": {}, "k1": {}, "k2": {"openai": "p0"}})
        self.rates = {o: self._rate_limit(o, spec) for o, spec in rates.items()}
        log, at = self.log, self.now
        for customer_id in ("c0", "c1"):
            log.customer(
                customer_id=customer_id, rate_limit=self.rates[customer_id], at=at
            )
        log.team(team_id="t0", customer_id="c0", rate_limit=self.rates["t0"], at=at)
        log.team(team_id="t1", customer_id=None, rate_limit=self.rates["t1"], at=at)
        log.key(
            key_id="k0", secret="k0", team_id="t0", rate_limit=self.rates["k0"], at=at
        )
        log.key(
            key_id="k1",
            secret="k1",
            team_id=None,
            customer_id="c1",
            rate_limit=self.rates["k1"],
            at=at,
        )
        log.key(
            key_id="k2",
            secret="k2",
            team_id="t1",
            rate_limit=self.rates["k2"],
            provider_configs=(self._config(()),),
            at=at,
        )

    def _rate_limit(self, owner_id: str, spec: RateSpec) -> RateLimit | None:
        if spec is None:
            return None
        tokens, requests = spec
        limit = RateLimit(
            token_max_limit=None if tokens is None else tokens[0],
            token_reset_duration=None if tokens is None else tokens[1],
            request_max_limit=None if requests is None else requests[0],
            request_reset_duration=None if requests is None else requests[1],
        )
        halves: tuple[tuple[RateHalf, Any], ...] = (
            ("tokens", tokens),
            ("requests", requests),
        )
        for kind, half in halves:
            if half is not None:
                self.ref.owners[owner_id].rates.append(
                    RefRate(kind, half[0], half[1], self.now)
                )
        return limit

    def _config(self, budgets: tuple[Budget, ...]) -> ProviderConfig:
        return ProviderConfig(
            provider_config_id="p0",
            provider="openai",
            budgets=budgets,
            rate_limit=self.rates.get("p0"),
        )

    def tick(self, seconds: int = 1) -> None:
        self.now += timedelta(seconds=seconds)

    def replace_budgets(
        self, owner_id: str, specs: list[tuple[str, Decimal, bool]]
    ) -> None:
        """Reconcile by duration like the command layer: a kept duration keeps its
        id; alignment may only turn on (which resets)."""
        owner = self.ref.owners.get(owner_id)
        if owner is None:
            return  # a deleted team
        kept = {b.duration: b for b in owner.budgets}
        budgets, refs = [], []
        for duration, limit, aligned in specs:
            aligned = aligned and duration == "1d"
            old = kept.get(duration)
            if old is None:
                self.counter += 1
                ref = RefBudget(
                    f"{owner_id}-{self.counter}",
                    limit,
                    duration,
                    aligned,
                    self.now,
                    self.now,
                )
                reset = False
            else:
                aligned = aligned or old.aligned
                reset = aligned and not old.aligned
                ref = RefBudget(
                    old.budget_id,
                    limit,
                    duration,
                    aligned,
                    old.anchor,
                    self.now if reset else old.floor,
                )
            refs.append(ref)
            budgets.append(
                budget(
                    ref.budget_id,
                    str(limit),
                    duration,
                    calendar_aligned=aligned,
                    reset_usage=reset,
                )
            )
        owner.budgets = refs
        self._send_budgets(owner_id, tuple(budgets))

    def reset(self, owner_id: str) -> None:
        owner = self.ref.owners.get(owner_id)
        if owner is None or not owner.budgets:
            return
        first = owner.budgets[0]
        first.floor = self.now
        budgets = tuple(
            budget(
                b.budget_id,
                str(b.limit),
                b.duration,
                calendar_aligned=b.aligned,
                reset_usage=b is first,
            )
            for b in owner.budgets
        )
        self._send_budgets(owner_id, budgets)

    def _send_budgets(self, owner_id: str, budgets: tuple[Budget, ...]) -> None:
        at = self.now
        event: AnyEvent
        if owner_id.startswith("c"):
            stream = f"customer-{owner_id}"
            event = CustomerBudgetsReplaced(customer_id=owner_id, budgets=budgets)
        elif owner_id.startswith("t"):
            stream = f"team-{owner_id}"
            event = TeamBudgetsReplaced(team_id=owner_id, budgets=budgets)
        elif owner_id.startswith("k"):
            stream = f"virtual_key-{owner_id}"
            event = VirtualKeyBudgetsReplaced(virtual_key_id=owner_id, budgets=budgets)
        else:
            stream = "virtual_key-k2"
            event = VirtualKeyUpdated(
                virtual_key_id="k2",
                name="gateway",
                value_sha256=sha256("k2"),
                value_hint="k2",
                team_id="t1",
                rate_limit=self.rates["k2"],
                provider_configs=(self._config(budgets),),
            )
        self.log.append(stream, event, at)

    def move_team(self, customer_id: str | None) -> None:
        if self.team_deleted:
            return
        self.ref.customer_of["t0"] = customer_id
        self.log.append(
            "team-t0",
            TeamUpdated(
                team_id="t0",
                name="platform",
                customer_id=customer_id,
                rate_limit=self.rates["t0"],
            ),
            self.now,
        )

    def delete_team(self) -> None:
        if self.team_deleted:
            return
        self.team_deleted = True
        del self.ref.owners["t0"]
        self.ref.team_of["k0"] = None
        self.log.append("team-t0", TeamDeleted(team_id="t0"), self.now)
        self.log.append(
            "virtual_key-k0",
            VirtualKeyUpdated(
                virtual_key_id="k0",
                name="gateway",
                value_sha256=sha256("k0"),
                value_hint="k0",
                rate_limit=self.rates["k0"],
            ),
            self.now,
        )

    def record_usage(
        self,
        key_id: str,
        provider: str,
        cost: Decimal,
        tokens: int,
        requests: int,
        lag: int,
    ) -> None:
        chain = self.log.cache.resolve_usage(
            virtual_key_sha256=None, virtual_key_id=key_id, provider=provider
        )
        assert chain is not None
        occurred_at = self.now - timedelta(seconds=lag)
        owners = {key_id, chain.provider_config_id, chain.team_id, chain.customer_id}
        self.ref.usage.append(
            RefUsage(
                occurred_at,
                cost,
                tokens,
                requests,
                frozenset(owners - {None}),  # type: ignore[arg-type]
            )
        )
        self.log.append(
            f"usage-{key_id}",
            UsageRecorded(
                virtual_key_id=key_id,
                provider=provider,
                model="gpt-4o",
                cost=cost,
                input_tokens=tokens,
                requests=requests,
                occurred_at=occurred_at,
                provider_config_id=chain.provider_config_id,
                team_id=chain.team_id,
                customer_id=chain.customer_id,
            ),
            self.now,
        )

    def check(self, key_id: str, provider: str, estimate: Decimal | None) -> None:
        got = self.log.cache.check(
            virtual_key_sha256=sha256(key_id),
            virtual_key_id=None,
            provider=provider,
            model="gpt-4o",
            estimated_cost=estimate,
            now=self.now,
        )
        assert got == self.ref.check(key_id, provider, estimate, self.now)


owner_ids = ("c0", "c1", "t0", "t1", "k0", "k1", "k2", "p0")


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    rates=st.fixed_dictionaries({owner_id: rate_specs for owner_id in owner_ids}),
    initial=st.fixed_dictionaries({owner_id: budget_specs for owner_id in owner_ids}),
    ops=operations,
)
def test_checks_agree_with_a_brute_force_reference(
    rates: dict[str, RateSpec],
    initial: dict[str, list[tuple[str, Decimal, bool]]],
    ops: list[tuple[Any, ...]],
) -> None:
    scenario = Scenario(rates)
    for owner_id, specs in initial.items():
        scenario.replace_budgets(owner_id, specs)
    for op in ops:
        scenario.tick()  # every event at its own instant
        match op:
            case ("usage", key_id, provider, cost, tokens, requests, lag):
                scenario.record_usage(key_id, provider, cost, tokens, requests, lag)
            case ("check", key_id, provider, estimate):
                scenario.check(key_id, provider, estimate)
            case ("budgets", owner_id, specs):
                scenario.replace_budgets(owner_id, specs)
            case ("reset", owner_id):
                scenario.reset(owner_id)
            case ("move", customer_id):
                scenario.move_team(customer_id)
            case ("delete_team",):
                scenario.delete_team()
            case ("tick", seconds):
                scenario.tick(seconds)
    for key_id in KEYS:
        for provider in PROVIDERS:
            scenario.check(key_id, provider, None)
