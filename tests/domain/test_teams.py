"""Team decisions as given/when/then: budgets reconciled by reset_duration."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.domain.budgets import BudgetSpec
from service.domain.commands import (
    CreateTeam,
    DeleteTeam,
    DetachTeam,
    RateLimitChanges,
    RateLimitSpec,
    TeamBody,
    TeamChanges,
    UpdateTeam,
)
from service.domain.events import (
    Budget,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamDeleted,
    TeamUpdated,
)
from service.domain.teams import Team, decide, fold
from service.errors import (
    DuplicateResetDuration,
    Invalid,
    InvalidCalendarAlignment,
    InvalidMaxLimit,
    InvalidRateLimit,
    InvalidResetDuration,
    NotFound,
    UnknownReference,
)

DAILY = Budget(budget_id="b-day", max_limit=Decimal(10), reset_duration="1d")
MONTHLY = Budget(budget_id="b-month", max_limit=Decimal(200), reset_duration="1M")
CREATED = TeamCreated(
    team_id="t1", name="platform", customer_id="c1", budgets=(DAILY, MONTHLY)
)


def spec(limit: str, duration: str, calendar_aligned: bool | None = None) -> BudgetSpec:
    return BudgetSpec(
        max_limit=Decimal(limit),
        reset_duration=duration,
        calendar_aligned=calendar_aligned,
    )


def update(changes: TeamChanges, *new_ids: str) -> UpdateTeam:
    return UpdateTeam(team_id="t1", changes=changes, new_ids=new_ids)


def test_create_team_gives_every_budget_a_new_id():
    command = CreateTeam(
        team_id="t1",
        body=TeamBody(
            name="platform",
            customer_id="c1",
            budgets=(spec("10", "1d"), spec("200", "1M", calendar_aligned=True)),
            rate_limit=RateLimitSpec(token_max_limit=1000, token_reset_duration="1h"),
        ),
        new_ids=("b1", "b2"),
    )

    assert decide(command, None) == [
        TeamCreated(
            team_id="t1",
            name="platform",
            customer_id="c1",
            budgets=(
                Budget(budget_id="b1", max_limit=Decimal(10), reset_duration="1d"),
                Budget(
                    budget_id="b2",
                    max_limit=Decimal(200),
                    reset_duration="1M",
                    calendar_aligned=True,
                ),
            ),
            rate_limit=RateLimit(token_max_limit=1000, token_reset_duration="1h"),
        )
    ]


def test_replacing_1d_with_1w_keeps_the_monthly_budget_id():
    changes = TeamChanges(budgets=(spec("50", "1w"), spec("300", "1M")))

    assert decide(update(changes, "b-week"), fold([CREATED])) == [
        TeamBudgetsReplaced(
            team_id="t1",
            budgets=(
                Budget(budget_id="b-week", max_limit=Decimal(50), reset_duration="1w"),
                Budget(
                    budget_id="b-month", max_limit=Decimal(300), reset_duration="1M"
                ),
            ),
        )
    ]


@pytest.mark.parametrize("removed", [(), None], ids=["empty", "null"])
def test_an_empty_or_null_budget_list_removes_every_budget(removed):
    assert decide(update(TeamChanges(budgets=removed)), fold([CREATED])) == [
        TeamBudgetsReplaced(team_id="t1", budgets=())
    ]


def test_omitted_budgets_stay_unchanged_when_only_the_name_changes():
    assert decide(update(TeamChanges(name="infra")), fold([CREATED])) == [
        TeamUpdated(team_id="t1", name="infra", customer_id="c1")
    ]


def test_a_put_that_changes_nothing_decides_nothing():
    same = TeamChanges(
        name="platform",
        customer_id="c1",
        budgets=(spec("200", "1M"), spec("10", "1d")),  # order does not matter
        rate_limit=None,
    )

    assert decide(update(same), fold([CREATED])) == []


def test_turning_calendar_alignment_on_resets_usage_and_omitting_it_keeps_it():
    aligned = fold(
        [
            CREATED,
            TeamBudgetsReplaced(
                team_id="t1",
                budgets=(
                    DAILY,
                    Budget(
                        budget_id="b-month",
                        max_limit=Decimal(200),
                        reset_duration="1M",
                        calendar_aligned=True,
                        reset_usage=True,
                    ),
                ),
            ),
        ]
    )
    changes = TeamChanges(
        budgets=(spec("10", "1d", calendar_aligned=True), spec("250", "1M"))
    )

    assert decide(update(changes), aligned) == [
        TeamBudgetsReplaced(
            team_id="t1",
            budgets=(
                Budget(
                    budget_id="b-day",
                    max_limit=Decimal(10),
                    reset_duration="1d",
                    calendar_aligned=True,
                    reset_usage=True,
                ),
                Budget(
                    budget_id="b-month",
                    max_limit=Decimal(250),
                    reset_duration="1M",
                    calendar_aligned=True,
                ),
            ),
        )
    ]


def test_turning_calendar_alignment_off_keeps_usage():
    history = [
        TeamCreated(
            team_id="t1",
            name="platform",
            budgets=(
                Budget(
                    budget_id="b-day",
                    max_limit=Decimal(10),
                    reset_duration="1d",
                    calendar_aligned=True,
                ),
            ),
        )
    ]
    changes = TeamChanges(budgets=(spec("10", "1d", calendar_aligned=False),))

    assert decide(update(changes), fold(history)) == [
        TeamBudgetsReplaced(team_id="t1", budgets=(DAILY,))
    ]


def test_customer_id_null_detaches_the_team():
    assert decide(update(TeamChanges(customer_id=None)), fold([CREATED])) == [
        TeamUpdated(team_id="t1", name="platform", customer_id=None)
    ]


def test_rate_limit_null_removes_it_and_name_and_budgets_change_together():
    history = [
        TeamCreated(
            team_id="t1",
            name="platform",
            rate_limit=RateLimit(request_max_limit=5, request_reset_duration="1m"),
        )
    ]
    changes = TeamChanges(name="infra", rate_limit=None, budgets=(spec("1", "1h"),))

    assert decide(update(changes, "b-hour"), fold(history)) == [
        TeamUpdated(team_id="t1", name="infra"),
        TeamBudgetsReplaced(
            team_id="t1",
            budgets=(
                Budget(budget_id="b-hour", max_limit=Decimal(1), reset_duration="1h"),
            ),
        ),
    ]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        (
            TeamChanges(budgets=(spec("1", "1d"), spec("2", "1d"))),
            DuplicateResetDuration,
        ),
        (TeamChanges(budgets=(spec("0", "1d"),)), InvalidMaxLimit),
        (TeamChanges(budgets=(spec("-3", "1d"),)), InvalidMaxLimit),
        (TeamChanges(budgets=(spec("1", "0d"),)), InvalidResetDuration),
        (TeamChanges(budgets=(spec("1", "1x"),)), InvalidResetDuration),
        (
            TeamChanges(budgets=(spec("1", "1h", calendar_aligned=True),)),
            InvalidCalendarAlignment,
        ),
        (
            TeamChanges(budgets=(spec("1", "2d", calendar_aligned=True),)),
            InvalidCalendarAlignment,
        ),
        (
            TeamChanges(rate_limit=RateLimitChanges(token_max_limit=0)),
            InvalidRateLimit,
        ),
        (TeamChanges(name="  "), Invalid),
    ],
)
def test_invalid_changes_are_rejected(changes, error):
    with pytest.raises(error):
        decide(update(changes, "b-new"), fold([CREATED]))


def test_a_reference_to_an_unknown_customer_is_rejected():
    command = UpdateTeam(
        team_id="t1",
        changes=TeamChanges(customer_id="c-gone"),
        unknown_references=frozenset({"c-gone"}),
    )

    with pytest.raises(UnknownReference):
        decide(command, fold([CREATED]))


def test_updating_or_deleting_a_deleted_team_is_not_found():
    deleted = fold([CREATED, TeamDeleted(team_id="t1")])

    with pytest.raises(NotFound):
        decide(update(TeamChanges(name="x")), deleted)
    with pytest.raises(NotFound):
        decide(DeleteTeam(team_id="t1"), deleted)


def test_delete_team():
    assert decide(DeleteTeam(team_id="t1"), fold([CREATED])) == [
        TeamDeleted(team_id="t1")
    ]


def test_detach_from_the_deleted_customer_only_if_still_attached():
    assert decide(DetachTeam(team_id="t1", customer_id="c1"), fold([CREATED])) == [
        TeamUpdated(team_id="t1", name="platform", customer_id=None)
    ]
    assert decide(DetachTeam(team_id="t1", customer_id="c2"), fold([CREATED])) == []
    assert decide(DetachTeam(team_id="t1", customer_id="c1"), None) == []


def test_state_keeps_budgets_without_their_reset_marker():
    replaced = TeamBudgetsReplaced(
        team_id="t1",
        budgets=(
            Budget(
                budget_id="b-day",
                max_limit=Decimal(10),
                reset_duration="1d",
                calendar_aligned=True,
                reset_usage=True,
            ),
        ),
    )

    assert fold([CREATED, replaced]) == Team(
        id="t1",
        name="platform",
        customer_id="c1",
        budgets=(
            Budget(
                budget_id="b-day",
                max_limit=Decimal(10),
                reset_duration="1d",
                calendar_aligned=True,
            ),
        ),
    )


def test_a_rate_limit_naming_one_half_keeps_the_other():
    rated = TeamCreated(
        team_id="t1",
        name="platform",
        rate_limit=RateLimit(token_max_limit=1000, token_reset_duration="1h"),
    )
    changes = TeamChanges(
        rate_limit=RateLimitChanges(request_max_limit=5, request_reset_duration="1s")
    )

    assert decide(update(changes), fold([rated])) == [
        TeamUpdated(
            team_id="t1",
            name="platform",
            rate_limit=RateLimit(
                token_max_limit=1000,
                token_reset_duration="1h",
                request_max_limit=5,
                request_reset_duration="1s",
            ),
        )
    ]
