"""The instant range of usage records: `occurred_at` between 2000-01-01T00:00:00Z and
5 minutes after the receive time, checked without an overflow whatever the offset;
an accepted record's time can go through every period computation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.domain.budgets import parse_duration, period_bounds
from service.domain.events import UsageRecorded
from service.domain.usage import (
    EARLIEST,
    INVALID_COST,
    MAX_FUTURE,
    NEGATIVE_COST,
    OCCURRED_AT_OUT_OF_RANGE,
    Rejection,
    UsageChain,
    decode_record,
    invalid_record,
    is_in_range,
    to_event,
    validate,
    validate_recorded,
)

NOW = datetime(2026, 5, 20, 12, 0, tzinfo=UTC)
KEY = "00000000-0000-4000-8000-0000000000a1"
EVENT = "00000000-0000-4000-8000-000000000001"
CHAIN = UsageChain(KEY, None, None, None)
TICK = timedelta(microseconds=1)


def record_at(occurred_at: str) -> bytes:
    return msgspec.json.encode(
        {
            "event_id": EVENT,
            "virtual_key_id": KEY,
            "provider": "openai",
            "model": "gpt-4o",
            "cost": "1",
            "occurred_at": occurred_at,
        }
    )


def test_the_range_is_closed_at_both_ends():
    assert [
        is_in_range(at, NOW)
        for at in (
            EARLIEST - TICK,
            EARLIEST,
            NOW + MAX_FUTURE,
            NOW + MAX_FUTURE + TICK,
        )
    ] == [False, True, True, False]
    assert (
        datetime(2000, 1, 1, tzinfo=UTC),
        timedelta(minutes=5),
    ) == (EARLIEST, MAX_FUTURE)


@pytest.mark.parametrize(
    "occurred_at",
    [
        "0001-01-01T00:00:00+01:00",
        "0001-01-01T00:00:00Z",
        "0001-01-01T23:59:59+23:59",
        "1999-12-31T23:59:59.999999Z",
        "2000-01-01T00:59:59+01:00",
        "9999-12-31T23:59:59-23:59",
        "9999-12-31T23:59:59.999999Z",
        "2026-05-20T12:05:00.000001Z",
        "2026-05-20T13:05:01+01:00",
    ],
)
def test_a_record_outside_the_range_is_rejected_without_an_overflow(occurred_at):
    assert validate(decode_record(record_at(occurred_at)), NOW) == Rejection(
        "occurred_at_out_of_range",
        "occurred_at must lie between 2000-01-01T00:00:00Z and 5 minutes after the"
        " receive time",
    )


@pytest.mark.parametrize(
    ("occurred_at", "utc"),
    [
        ("2000-01-01T00:00:00Z", datetime(2000, 1, 1, tzinfo=UTC)),
        ("2000-01-01T00:30:00-01:00", datetime(2000, 1, 1, 1, 30, tzinfo=UTC)),
        ("2026-05-20T12:05:00Z", NOW + MAX_FUTURE),
        ("2026-05-20T13:05:00+01:00", NOW + MAX_FUTURE),
    ],
)
def test_a_record_at_a_bound_is_accepted_and_its_event_is_in_utc(occurred_at, utc):
    record = decode_record(record_at(occurred_at))

    assert validate(record, NOW) is None
    event = to_event(record, CHAIN, NOW)
    assert (event.occurred_at, event.occurred_at.tzinfo) == (utc, UTC)


offsets = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)),
    st.integers(-(24 * 60 - 1), 24 * 60 - 1),
)
# Anywhere in datetime's range, and often near the range's own ends.
instants = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)
    ),
    st.datetimes(min_value=datetime(1999, 12, 30), max_value=datetime(2000, 1, 2)),
    st.datetimes(min_value=datetime(2026, 5, 19), max_value=datetime(2026, 5, 21)),
)


@given(local=instants, offset=offsets)
def test_any_instant_is_answered_and_an_accepted_one_goes_through_any_period(
    local, offset
):
    text = local.replace(tzinfo=offset).isoformat()
    record = decode_record(record_at(text))

    rejection = validate(record, NOW)

    if rejection is not None:
        assert rejection == OCCURRED_AT_OUT_OF_RANGE
        return
    at = to_event(record, CHAIN, NOW).occurred_at
    assert EARLIEST <= at <= NOW + MAX_FUTURE
    for duration, aligned in (("100Y", False), ("1Y", True), ("1s", False)):
        start, end = period_bounds(
            at, anchor=NOW, duration=parse_duration(duration), calendar_aligned=aligned
        )
        assert start <= at < end


# --- usage events of an imported log ----------------------------------------------


def usage(**fields: object) -> UsageRecorded:
    values: dict[str, object] = {
        "virtual_key_id": KEY,
        "provider": "openai",
        "model": "gpt-4o",
        "cost": Decimal("0.5"),
        "occurred_at": NOW,
        **fields,
    }
    return msgspec.convert(values, UsageRecorded)


@pytest.mark.parametrize(
    ("event", "rejection"),
    [
        (usage(), None),
        (usage(occurred_at=NOW + MAX_FUTURE), None),
        (usage(occurred_at=NOW + MAX_FUTURE + TICK), OCCURRED_AT_OUT_OF_RANGE),
        (usage(occurred_at=datetime(1, 1, 1, 0, 30)), OCCURRED_AT_OUT_OF_RANGE),
        (
            usage(occurred_at=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))),
            OCCURRED_AT_OUT_OF_RANGE,
        ),
        (usage(cost=Decimal(-1)), NEGATIVE_COST),
        (usage(cost=Decimal("1e12")), INVALID_COST),
        (usage(cost=Decimal("0.0000000001")), INVALID_COST),
        (
            usage(provider="x" * 257),
            Rejection(
                "invalid_record", "provider and model must have 1 to 256 characters"
            ),
        ),
        (
            usage(model=""),
            Rejection(
                "invalid_record", "provider and model must have 1 to 256 characters"
            ),
        ),
        (
            usage(requests=-1),
            Rejection(
                "invalid_record", "token and request counts must lie in 0..2147483647"
            ),
        ),
        (
            usage(input_tokens=2**31),
            Rejection(
                "invalid_record", "token and request counts must lie in 0..2147483647"
            ),
        ),
    ],
)
def test_an_imported_usage_event_meets_the_rules_of_ingest(event, rejection):
    """Its `recorded_at` stands for the receive time."""
    assert validate_recorded(event, NOW) == rejection


def test_a_record_with_an_id_that_is_no_uuid_is_told_so_in_words():
    line = (
        b'{"event_id": "' + b"x" * 36 + b'", "provider": "p", "model": "m",'
        b' "cost": 1, "virtual_key_id": "00000000-0000-4000-8000-000000000001"}'
    )

    with pytest.raises(msgspec.ValidationError) as refused:
        decode_record(line)

    assert invalid_record(refused.value) == Rejection(
        "invalid_record",
        "the record is invalid: Expected a UUID (36 characters: 8-4-4-4-12 hex"
        " digits) - at `$.event_id`",
    )
