"""Virtual-key decisions as given/when/then: owners, secrets, provider configs."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from service.domain.budgets import BudgetSpec
from service.domain.commands import (
    CreateVirtualKey,
    DeleteVirtualKey,
    DetachVirtualKey,
    KeyDigest,
    ProviderConfigChanges,
    ProviderConfigSpec,
    RateLimitChanges,
    RateLimitSpec,
    UpdateVirtualKey,
    VirtualKeyBody,
    VirtualKeyChanges,
    ids_needed,
)
from service.domain.events import (
    Budget,
    ProviderConfig,
    RateLimit,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyDeleted,
    VirtualKeyUpdated,
)
from service.domain.virtual_keys import decide, fold
from service.errors import (
    ConflictingOwner,
    DuplicateProvider,
    DuplicateResetDuration,
    Invalid,
    NotFound,
    UnknownReference,
)

VALUE = KeyDigest(sha256="a" * 64, hint="WXYZ")
OPENAI_DAILY = Budget(budget_id="pb-day", max_limit=Decimal(5), reset_duration="1d")
OPENAI = ProviderConfig(
    provider_config_id="pc-openai",
    provider="openai",
    allowed_models=("gpt-4o",),
    budgets=(OPENAI_DAILY,),
)
ANTHROPIC = ProviderConfig(provider_config_id="pc-anthropic", provider="anthropic")
CREATED = VirtualKeyCreated(
    virtual_key_id="k1",
    name="ci",
    value_sha256=VALUE.sha256,
    value_hint=VALUE.hint,
    team_id="t1",
    budgets=(Budget(budget_id="b-month", max_limit=Decimal(50), reset_duration="1M"),),
    provider_configs=(OPENAI, ANTHROPIC),
)


def spec(limit: str, duration: str, calendar_aligned: bool | None = None):
    return BudgetSpec(
        max_limit=Decimal(limit),
        reset_duration=duration,
        calendar_aligned=calendar_aligned,
    )


def update(changes: VirtualKeyChanges, *new_ids: str, **extra) -> UpdateVirtualKey:
    return UpdateVirtualKey(
        virtual_key_id="k1", changes=changes, new_ids=new_ids, **extra
    )


def updated(**fields) -> VirtualKeyUpdated:
    """The update event of CREATED with `fields` changed."""
    base = {
        "virtual_key_id": "k1",
        "name": "ci",
        "value_sha256": VALUE.sha256,
        "value_hint": VALUE.hint,
        "team_id": "t1",
        "provider_configs": (OPENAI, ANTHROPIC),
    }
    return VirtualKeyUpdated(**(base | fields))


def test_create_key_draws_ids_for_budgets_then_each_config_and_its_budgets():
    body = VirtualKeyBody(
        name="ci",
        customer_id="c1",
        is_active=False,
        budgets=(spec("50", "1M"),),
        rate_limit=RateLimitSpec(token_max_limit=100, token_reset_duration="1m"),
        provider_configs=(
            ProviderConfigSpec(
                provider="openai", allowed_models=("*",), budgets=(spec("5", "1d"),)
            ),
            ProviderConfigSpec(provider="anthropic", allowed_models=()),
        ),
    )
    command = CreateVirtualKey(
        virtual_key_id="k1",
        body=body,
        value=VALUE,
        new_ids=("b1", "pc1", "b2", "pc2", "unused"),
    )

    assert ids_needed(body) == 4
    assert decide(command, None) == [
        VirtualKeyCreated(
            virtual_key_id="k1",
            name="ci",
            value_sha256=VALUE.sha256,
            value_hint="WXYZ",
            customer_id="c1",
            is_active=False,
            budgets=(
                Budget(budget_id="b1", max_limit=Decimal(50), reset_duration="1M"),
            ),
            rate_limit=RateLimit(token_max_limit=100, token_reset_duration="1m"),
            provider_configs=(
                ProviderConfig(
                    provider_config_id="pc1",
                    provider="openai",
                    allowed_models=None,
                    budgets=(
                        Budget(
                            budget_id="b2", max_limit=Decimal(5), reset_duration="1d"
                        ),
                    ),
                ),
                ProviderConfig(
                    provider_config_id="pc2", provider="anthropic", allowed_models=()
                ),
            ),
        )
    ]


def test_a_key_under_both_a_team_and_a_customer_is_rejected():
    body = VirtualKeyBody(name="ci", team_id="t1", customer_id="c1")

    with pytest.raises(ConflictingOwner):
        decide(CreateVirtualKey(virtual_key_id="k1", body=body, value=VALUE), None)
    # Naming a customer while the key keeps its team is the same conflict.
    with pytest.raises(ConflictingOwner):
        decide(update(VirtualKeyChanges(customer_id="c1")), fold([CREATED]))


def test_moving_a_key_from_its_team_to_a_customer():
    changes = VirtualKeyChanges(team_id=None, customer_id="c1")

    assert decide(update(changes), fold([CREATED])) == [
        updated(team_id=None, customer_id="c1")
    ]


def test_unknown_team_or_customer_is_rejected():
    body = VirtualKeyBody(name="ci", team_id="t-gone")
    command = CreateVirtualKey(
        virtual_key_id="k1",
        body=body,
        value=VALUE,
        unknown_references=frozenset({"t-gone"}),
    )

    with pytest.raises(UnknownReference):
        decide(command, None)


def test_duplicate_providers_and_blank_providers_are_rejected():
    twice = VirtualKeyChanges(
        provider_configs=(
            ProviderConfigChanges(provider="openai"),
            ProviderConfigChanges(provider="openai"),
        )
    )
    blank = VirtualKeyChanges(provider_configs=(ProviderConfigChanges(provider=" "),))

    with pytest.raises(DuplicateProvider):
        decide(update(twice, "x", "y"), fold([CREATED]))
    with pytest.raises(Invalid):
        decide(update(blank, "x"), fold([CREATED]))


def test_provider_configs_reconcile_by_provider_and_their_budgets_by_duration():
    changes = VirtualKeyChanges(
        provider_configs=(
            ProviderConfigChanges(
                provider="openai",
                allowed_models=("gpt-4o", "gpt-4o-mini"),
                budgets=(spec("5", "1d", calendar_aligned=True), spec("9", "1w")),
            ),
            ProviderConfigChanges(provider="mistral"),
        )
    )

    assert decide(update(changes, "pb-week", "pc-mistral"), fold([CREATED])) == [
        updated(
            provider_configs=(
                ProviderConfig(
                    provider_config_id="pc-openai",
                    provider="openai",
                    allowed_models=("gpt-4o", "gpt-4o-mini"),
                    budgets=(
                        Budget(
                            budget_id="pb-day",
                            max_limit=Decimal(5),
                            reset_duration="1d",
                            calendar_aligned=True,
                            reset_usage=True,
                        ),
                        Budget(
                            budget_id="pb-week",
                            max_limit=Decimal(9),
                            reset_duration="1w",
                        ),
                    ),
                ),
                ProviderConfig(provider_config_id="pc-mistral", provider="mistral"),
            )
        )
    ]


def test_duplicate_durations_inside_a_provider_config_are_rejected():
    changes = VirtualKeyChanges(
        provider_configs=(
            ProviderConfigChanges(
                provider="openai", budgets=(spec("1", "1d"), spec("2", "1d"))
            ),
        )
    )

    with pytest.raises(DuplicateResetDuration):
        decide(update(changes, "x", "y"), fold([CREATED]))


def test_resending_the_same_provider_configs_in_another_order_decides_nothing():
    changes = VirtualKeyChanges(
        provider_configs=(
            ProviderConfigChanges(provider="anthropic"),
            ProviderConfigChanges(
                provider="openai",
                allowed_models=("gpt-4o",),
                budgets=(spec("5", "1d"),),
            ),
        ),
        budgets=(spec("50", "1M"),),
        team_id="t1",
        is_active=True,
    )

    assert decide(update(changes), fold([CREATED])) == []


def test_rotating_the_value_changes_only_digest_and_hint():
    new = KeyDigest(sha256="b" * 64, hint="abcd")
    command = update(VirtualKeyChanges(rotate_value=True), new_value=new)

    assert decide(command, fold([CREATED])) == [
        updated(value_sha256="b" * 64, value_hint="abcd")
    ]


def test_key_budgets_are_replaced_in_their_own_event():
    changes = VirtualKeyChanges(budgets=(spec("1", "1h"),), is_active=False)

    assert decide(update(changes, "b-hour"), fold([CREATED])) == [
        updated(is_active=False),
        VirtualKeyBudgetsReplaced(
            virtual_key_id="k1",
            budgets=(
                Budget(budget_id="b-hour", max_limit=Decimal(1), reset_duration="1h"),
            ),
        ),
    ]


def test_detach_clears_only_the_named_owner():
    key = fold([CREATED])

    assert decide(DetachVirtualKey(virtual_key_id="k1", team_id="t1"), key) == [
        updated(team_id=None)
    ]
    assert decide(DetachVirtualKey(virtual_key_id="k1", team_id="t2"), key) == []
    assert decide(DetachVirtualKey(virtual_key_id="k1", customer_id="c1"), key) == []


def test_delete_and_not_found():
    assert decide(DeleteVirtualKey(virtual_key_id="k1"), fold([CREATED])) == [
        VirtualKeyDeleted(virtual_key_id="k1")
    ]
    deleted = fold([CREATED, VirtualKeyDeleted(virtual_key_id="k1")])
    with pytest.raises(NotFound):
        decide(DeleteVirtualKey(virtual_key_id="k1"), deleted)
    with pytest.raises(NotFound):
        decide(update(VirtualKeyChanges(name="x")), deleted)


# --- partial updates at every depth -----------------------------------------------

RATED_OPENAI = ProviderConfig(
    provider_config_id="pc-openai",
    provider="openai",
    allowed_models=("gpt-4o",),
    budgets=(OPENAI_DAILY,),
    rate_limit=RateLimit(
        token_max_limit=500,
        token_reset_duration="1h",
        request_max_limit=10,
        request_reset_duration="1m",
    ),
)


def test_an_existing_provider_that_omits_its_fields_keeps_them():
    key = fold([msgspec.structs.replace(CREATED, provider_configs=(RATED_OPENAI,))])
    changes = VirtualKeyChanges(
        provider_configs=(ProviderConfigChanges(provider="openai"),)
    )

    assert decide(update(changes), key) == []


def test_an_existing_provider_changes_only_the_fields_it_names():
    key = fold([msgspec.structs.replace(CREATED, provider_configs=(RATED_OPENAI,))])
    changes = VirtualKeyChanges(
        provider_configs=(
            ProviderConfigChanges(
                provider="openai",
                rate_limit=RateLimitChanges(request_max_limit=20),
            ),
        )
    )

    [event] = decide(update(changes), key)

    assert event == updated(
        provider_configs=(
            msgspec.structs.replace(
                RATED_OPENAI,
                rate_limit=RateLimit(
                    token_max_limit=500,
                    token_reset_duration="1h",
                    request_max_limit=20,
                    request_reset_duration="1m",
                ),
            ),
        )
    )


def test_a_new_provider_that_omits_its_fields_takes_the_defaults():
    changes = VirtualKeyChanges(
        provider_configs=(
            ProviderConfigChanges(provider="openai"),
            ProviderConfigChanges(provider="anthropic"),
            ProviderConfigChanges(
                provider="mistral",
                rate_limit=RateLimitChanges(
                    token_max_limit=5, token_reset_duration="1d"
                ),
            ),
        )
    )

    assert decide(update(changes, "pc-mistral"), fold([CREATED])) == [
        updated(
            provider_configs=(
                OPENAI,
                ANTHROPIC,
                ProviderConfig(
                    provider_config_id="pc-mistral",
                    provider="mistral",
                    allowed_models=None,
                    rate_limit=RateLimit(token_max_limit=5, token_reset_duration="1d"),
                ),
            )
        )
    ]


@pytest.mark.parametrize(
    ("allowed_models", "after"),
    [(None, None), (("*", "gpt-4o"), None), ((), ()), (("o1", "o1"), ("o1",))],
)
def test_allowed_models_null_or_star_allow_every_model_and_empty_none(
    allowed_models, after
):
    changes = VirtualKeyChanges(
        provider_configs=(
            ProviderConfigChanges(provider="openai", allowed_models=allowed_models),
            ProviderConfigChanges(provider="anthropic"),
        )
    )

    assert decide(update(changes), fold([CREATED])) == [
        updated(
            provider_configs=(
                msgspec.structs.replace(OPENAI, allowed_models=after),
                ANTHROPIC,
            )
        )
    ]


@pytest.mark.parametrize("removed", [(), None], ids=["empty", "null"])
def test_a_provider_budget_list_replaces_the_set_and_empty_or_null_removes_every_one(
    removed,
):
    changes = VirtualKeyChanges(
        provider_configs=(
            ProviderConfigChanges(provider="openai", budgets=removed),
            ProviderConfigChanges(provider="anthropic", budgets=None),
        )
    )

    assert decide(update(changes), fold([CREATED])) == [
        updated(
            provider_configs=(msgspec.structs.replace(OPENAI, budgets=()), ANTHROPIC)
        )
    ]


@pytest.mark.parametrize("removed", [(), None], ids=["empty", "null"])
def test_empty_or_null_key_budgets_and_provider_configs_remove_every_one(removed):
    changes = VirtualKeyChanges(budgets=removed, provider_configs=removed)

    assert ids_needed(changes) == 0
    assert decide(update(changes), fold([CREATED])) == [
        updated(provider_configs=()),
        VirtualKeyBudgetsReplaced(virtual_key_id="k1", budgets=()),
    ]


def test_a_key_rate_limit_naming_the_request_half_keeps_the_token_half():
    rated = msgspec.structs.replace(
        CREATED, rate_limit=RateLimit(token_max_limit=100, token_reset_duration="1m")
    )
    changes = VirtualKeyChanges(
        rate_limit=RateLimitChanges(request_max_limit=3, request_reset_duration="1s")
    )

    assert decide(update(changes), fold([rated])) == [
        updated(
            rate_limit=RateLimit(
                token_max_limit=100,
                token_reset_duration="1m",
                request_max_limit=3,
                request_reset_duration="1s",
            )
        )
    ]
