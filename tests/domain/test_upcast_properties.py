"""Whatever a legacy record holds, upcasting it ends in one of two ways: a current
event that round-trips and folds, or a refusal (`LegacyEventRefused`, which every
reader passes over). Any other exception would stop a projection on that record."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.domain import upcast
from service.domain.events import AnyEvent
from service.domain.ledger import define_budgets, open_ledger
from service.errors import LegacyEventRefused

OWNER_KEYS = {
    "Customer": "customer_id",
    "Team": "team_id",
    "VirtualKey": "virtual_key_id",
}
OWNER_ID = "22222222-2222-2222-2222-222222222222"
AT = datetime(2026, 1, 1, tzinfo=UTC)
# The field names of every legacy and current shape, and a few that are nobody's.
FIELDS = [
    *OWNER_KEYS.values(),
    "name",
    "budget",
    "budget_id",
    "budgets",
    "max_limit",
    "reset_duration",
    "calendar_aligned",
    "reset_usage",
    "rate_limit",
    "provider_configs",
    "provider",
    "allowed_models",
    "value_sha256",
    "value_hint",
    "is_active",
    "token_max_limit",
    "token_reset_duration",
    "request_max_limit",
    "request_reset_duration",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        ["1d", "1h30m", "1.5d", "500ms", "1.5M", "0s", "99999999Y", "1e3"]
    )
    | st.text(max_size=12)
)


def objects(values: st.SearchStrategy[object]) -> st.SearchStrategy[dict[str, object]]:
    return st.dictionaries(
        st.sampled_from(FIELDS) | st.text(max_size=5), values, max_size=8
    )


JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | objects(inner), max_leaves=25
)
AMOUNTS = (
    st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.decimals(allow_nan=False, allow_infinity=False).map(str)
)
LEGACY_DURATIONS = st.from_regex(
    r"\A([0-9]{1,12}(\.[0-9]{0,4})?(ns|us|ms|s|m|h|d|w|M|Q|Y)){1,3}\Z"
) | st.sampled_from(["1d", "1M", "30d", "1Y"])
LEGACY_BUDGETS = st.fixed_dictionaries(
    {"max_limit": AMOUNTS, "reset_duration": LEGACY_DURATIONS},
    optional={
        "calendar_aligned": st.none() | st.booleans() | st.integers(0, 1),
        "reset_usage": st.none() | st.booleans(),
        "budget_id": st.none() | st.uuids().map(str) | st.text(max_size=40),
    },
)


def converted(type_: str, data: dict[str, object]) -> AnyEvent | None:
    """The current event of a v1 record of `data` (as a legacy writer would have
    stored it), or None when upcasting refuses it."""
    raw = json.dumps(data, default=str).encode()
    try:
        return upcast.to_current(type_, 1, upcast.decode_legacy(raw))
    except LegacyEventRefused:
        return None


def assert_current(event: AnyEvent) -> None:
    """It round-trips as the current type, and its budgets fold."""
    assert msgspec.convert(msgspec.to_builtins(event), type(event)) == event
    budgets = getattr(event, "budgets", ())
    define_budgets(open_ledger(AT, history=True), budgets, AT)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(sorted(upcast.STEPS)), st.sampled_from(FIELDS[:3]), objects(JSON)
)
def test_any_legacy_data_becomes_a_current_event_or_a_refusal(step, owner_key, data):
    event = converted(step[0], {owner_key: OWNER_ID, **data})

    if event is not None:
        assert_current(event)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(sorted(OWNER_KEYS)),
    st.booleans(),
    LEGACY_BUDGETS,
    st.text(min_size=1, max_size=20),
)
def test_a_legacy_budget_becomes_one_that_folds_or_a_refusal(
    kind, created, budget, name
):
    owner_key = OWNER_KEYS[kind]
    if created:
        data: dict[str, object] = {owner_key: OWNER_ID, "name": name, "budget": budget}
        if kind == "VirtualKey":
            data |= {"value_sha256": "a" * 64, "value_hint": "abcd"}
        type_ = f"{kind}Created"
    else:
        data, type_ = {owner_key: OWNER_ID, **budget}, f"{kind}BudgetUpdated"

    event = converted(type_, data)

    if event is not None:
        assert_current(event)
        assert len(msgspec.to_builtins(event)["budgets"]) == 1
