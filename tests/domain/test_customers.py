"""Customer decisions as given/when/then."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.domain.budgets import BudgetSpec
from service.domain.commands import (
    CreateCustomer,
    CustomerBody,
    CustomerChanges,
    DeleteCustomer,
    RateLimitChanges,
    RateLimitSpec,
    UpdateCustomer,
)
from service.domain.customers import Customer, decide, fold
from service.domain.events import (
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerDeleted,
    CustomerEvent,
    CustomerUpdated,
    RateLimit,
)
from service.errors import (
    DuplicateResetDuration,
    Invalid,
    InvalidRateLimit,
    NotFound,
)

DAILY = Budget(budget_id="b-day", max_limit=Decimal(10), reset_duration="1d")
MONTHLY = Budget(budget_id="b-month", max_limit=Decimal(200), reset_duration="1M")
CREATED = CustomerCreated(customer_id="c1", name="acme", budgets=(DAILY, MONTHLY))


def spec(limit: str, duration: str, calendar_aligned: bool | None = None):
    return BudgetSpec(
        max_limit=Decimal(limit),
        reset_duration=duration,
        calendar_aligned=calendar_aligned,
    )


def update(changes: CustomerChanges, *new_ids: str) -> UpdateCustomer:
    return UpdateCustomer(customer_id="c1", changes=changes, new_ids=new_ids)


def test_create_customer_with_budgets_and_a_rate_limit():
    command = CreateCustomer(
        customer_id="c1",
        body=CustomerBody(
            name="acme",
            budgets=(spec("10.5", "1d"),),
            rate_limit=RateLimitSpec(request_max_limit=60, request_reset_duration="1m"),
        ),
        new_ids=("b1",),
    )

    assert decide(command, None) == [
        CustomerCreated(
            customer_id="c1",
            name="acme",
            budgets=(
                Budget(budget_id="b1", max_limit=Decimal("10.5"), reset_duration="1d"),
            ),
            rate_limit=RateLimit(request_max_limit=60, request_reset_duration="1m"),
        )
    ]


def test_an_empty_rate_limit_object_means_no_rate_limit():
    command = CreateCustomer(
        customer_id="c1", body=CustomerBody(name="acme", rate_limit=RateLimitSpec())
    )

    assert decide(command, None) == [CustomerCreated(customer_id="c1", name="acme")]


def test_create_customer_rejects_a_blank_name_and_duplicate_durations():
    with pytest.raises(Invalid):
        decide(CreateCustomer(customer_id="c1", body=CustomerBody(name="")), None)
    with pytest.raises(DuplicateResetDuration):
        decide(
            CreateCustomer(
                customer_id="c1",
                body=CustomerBody(
                    name="acme", budgets=(spec("1", "1M"), spec("2", "1M"))
                ),
                new_ids=("b1", "b2"),
            ),
            None,
        )


def test_a_rate_limit_without_its_duration_is_rejected():
    changes = CustomerChanges(rate_limit=RateLimitChanges(token_max_limit=10))

    with pytest.raises(InvalidRateLimit):
        decide(update(changes), fold([CREATED]))


def test_replacing_1d_with_1w_keeps_the_monthly_budget_id():
    changes = CustomerChanges(budgets=(spec("200", "1M"), spec("70", "1w")))

    assert decide(update(changes, "b-week"), fold([CREATED])) == [
        CustomerBudgetsReplaced(
            customer_id="c1",
            budgets=(
                MONTHLY,
                Budget(budget_id="b-week", max_limit=Decimal(70), reset_duration="1w"),
            ),
        )
    ]


@pytest.mark.parametrize("removed", [(), None], ids=["empty", "null"])
def test_an_empty_or_null_budget_list_removes_every_budget_and_omitted_keeps_them(
    removed,
):
    customer = fold([CREATED])

    assert decide(update(CustomerChanges(budgets=removed)), customer) == [
        CustomerBudgetsReplaced(customer_id="c1", budgets=())
    ]
    assert decide(update(CustomerChanges(name="acme2")), customer) == [
        CustomerUpdated(customer_id="c1", name="acme2")
    ]


def test_calendar_alignment_false_to_true_marks_a_reset():
    changes = CustomerChanges(budgets=(spec("10", "1d"), spec("200", "1M", True)))

    assert decide(update(changes), fold([CREATED])) == [
        CustomerBudgetsReplaced(
            customer_id="c1",
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
        )
    ]


def test_a_put_that_changes_nothing_decides_nothing():
    changes = CustomerChanges(
        name="acme", budgets=(spec("200.000", "1M"), spec("10", "1d"))
    )

    assert decide(update(changes), fold([CREATED])) == []


def test_unknown_or_deleted_customer_is_not_found():
    deleted = fold([CREATED, CustomerDeleted(customer_id="c1")])

    with pytest.raises(NotFound):
        decide(update(CustomerChanges(name="x")), None)
    with pytest.raises(NotFound):
        decide(DeleteCustomer(customer_id="c1"), deleted)


def test_delete_customer():
    assert decide(DeleteCustomer(customer_id="c1"), fold([CREATED])) == [
        CustomerDeleted(customer_id="c1")
    ]


def test_fold_applies_updates_and_budget_replacements():
    history: list[CustomerEvent] = [
        CREATED,
        CustomerUpdated(
            customer_id="c1",
            name="acme2",
            rate_limit=RateLimit(token_max_limit=5, token_reset_duration="1h"),
        ),
        CustomerBudgetsReplaced(customer_id="c1", budgets=(MONTHLY,)),
    ]

    assert fold(history) == Customer(
        id="c1",
        name="acme2",
        budgets=(MONTHLY,),
        rate_limit=RateLimit(token_max_limit=5, token_reset_duration="1h"),
    )


RATED = CustomerCreated(
    customer_id="c1",
    name="acme",
    rate_limit=RateLimit(
        token_max_limit=1000,
        token_reset_duration="1h",
        request_max_limit=60,
        request_reset_duration="1m",
    ),
)


@pytest.mark.parametrize(
    ("changes", "after"),
    [
        pytest.param(
            RateLimitChanges(request_max_limit=30, request_reset_duration="1m"),
            RateLimit(
                token_max_limit=1000,
                token_reset_duration="1h",
                request_max_limit=30,
                request_reset_duration="1m",
            ),
            id="the-request-half-alone-keeps-the-token-half",
        ),
        pytest.param(
            RateLimitChanges(token_max_limit=2000),
            RateLimit(
                token_max_limit=2000,
                token_reset_duration="1h",
                request_max_limit=60,
                request_reset_duration="1m",
            ),
            id="a-new-limit-keeps-its-duration",
        ),
        pytest.param(
            RateLimitChanges(token_max_limit=None),
            RateLimit(request_max_limit=60, request_reset_duration="1m"),
            id="a-null-limit-removes-its-half",
        ),
        pytest.param(
            RateLimitChanges(request_max_limit=None, token_max_limit=None),
            None,
            id="both-halves-null-remove-the-rate-limit",
        ),
    ],
)
def test_a_rate_limit_in_a_put_changes_only_what_it_names(changes, after):
    assert decide(update(CustomerChanges(rate_limit=changes)), fold([RATED])) == [
        CustomerUpdated(customer_id="c1", name="acme", rate_limit=after)
    ]


def test_an_empty_or_omitted_rate_limit_changes_nothing_and_null_removes_it():
    customer = fold([RATED])

    assert (
        decide(update(CustomerChanges(rate_limit=RateLimitChanges())), customer) == []
    )
    assert decide(update(CustomerChanges(name="acme")), customer) == []
    assert decide(update(CustomerChanges(rate_limit=None)), customer) == [
        CustomerUpdated(customer_id="c1", name="acme", rate_limit=None)
    ]


def test_a_null_duration_under_a_kept_limit_is_rejected():
    changes = CustomerChanges(rate_limit=RateLimitChanges(token_reset_duration=None))

    with pytest.raises(InvalidRateLimit):
        decide(update(changes), fold([RATED]))
