"""A usage record as recorders send it: strict decoding (NDJSON lines too),
validation, key resolution through the cache's interface, its event and its row.

Rejection codes (each answered with a sentence):
- `invalid_record`: not JSON, wrong types, unknown or missing fields, a bad `event_id`,
  neither or both of `virtual_key` and `virtual_key_id`, counts out of range, U+0000
  in `provider` or `model` (jsonb cannot store it).
- `negative_cost`: `cost` below zero.
- `invalid_cost`: `cost` not finite, with more than 9 fractional digits, or absurdly
  large (≥ 10^12, which no single request costs and which keeps sums in range).
- `occurred_at_out_of_range`: `occurred_at` before 2000-01-01T00:00:00Z or more than
  5 minutes after the receive time (`is_in_range`: the one rule for every instant a
  client or an imported log gives).
- `unknown_virtual_key`: no such key (decided by the shell, which holds the cache).

`requests` defaults to 1 and may be 0: a record may correct the cost or tokens of a
request that an earlier record already counted, exactly as `cost` may be 0.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, NamedTuple, Protocol

import msgspec

from service.domain.bounds import MAX_NAME, NO_NUL_PATTERN, Id, explained
from service.domain.events import UsageRecorded
from service.domain.numbers import (
    Money,
    Whole,
    decimal_number,
    decode_hook,
    money_schema,
)

MAX_FUTURE = timedelta(minutes=5)
# The instants a record may carry: from 2000-01-01 to MAX_FUTURE after the receive
# time. Far inside datetime's years 1..9999, so converting one to UTC and period
# arithmetic from it never overflow, whatever its offset.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_COST = Decimal(10) ** 12
NANO = Decimal("1e-9")
_ZERO = Decimal(0)
# Per record; sums over millions of records still fit a bigint.
MAX_COUNT = 2**31 - 1
# An id in an imported usage event: bounded text, as upcast.check_values has it.
MAX_LOG_ID = 255

_UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

# event_id stays a str: str is not tracked by the cyclic GC, uuid.UUID is (see
# research/ingest-pipeline.md); the pattern and the exact length (a trailing newline
# would pass the pattern alone) make it a hyphenated UUID in either letter case.
EventId = Annotated[str, msgspec.Meta(min_length=36, max_length=36, pattern=_UUID)]
# Text of 1 to MAX_NAME characters without U+0000 (which jsonb cannot hold).
Name = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_NAME, pattern=NO_NUL_PATTERN)
]
Secret = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
# Enforced by `validate`: a count is a whole number, so 5.0 is taken (numbers.Whole).
Count = Annotated[
    Whole, msgspec.Meta(extra_json_schema={"minimum": 0, "maximum": MAX_COUNT})
]
Instant = Annotated[datetime, msgspec.Meta(tz=True)]
# An amount that is kept (a usage cost, a hold's estimate) as the OpenAPI document
# states it: `cost_rejection` refuses any other.
KEPT_MONEY_SCHEMA = money_schema(
    number={"minimum": 0, "exclusiveMaximum": 1e12, "multipleOf": 1e-9},
    text="^(?:0*[0-9]{1,12}(?:\\.[0-9]{1,9}0*)?|-0+(?:\\.0+)?)$",
    description="At least 0 and below 10^12, at most 9 fractional digits",
)
# Enforced by `_content`, which names the error (negative_cost, invalid_cost).
Cost = Annotated[Money, msgspec.Meta(extra_json_schema=KEPT_MONEY_SCHEMA)]
# What a record's (or a check's) decoding cannot say and `validate` enforces: exactly
# one of the secret and the key's id, the other absent or null.
KEY_CHOICE_SCHEMA = {
    "oneOf": [
        {
            "required": [given],
            "properties": {given: {"type": "string"}, other: {"type": "null"}},
        }
        for given, other in (
            ("virtual_key", "virtual_key_id"),
            ("virtual_key_id", "virtual_key"),
        )
    ]
}


class UsageRecord(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """One record of POST /api/usage, a batch line or a stream frame's element.
    `virtual_key_id` is a UUID in any letter case (resolved in lower case)."""

    event_id: EventId
    provider: Name
    model: Name
    cost: Cost
    virtual_key: Secret | None = None
    virtual_key_id: Id | None = None
    input_tokens: Count = 0
    output_tokens: Count = 0
    requests: Count = 1
    occurred_at: Instant | None = None
    # The hold this spend settles (a check with "reserve": true answered it); the
    # 36-character form only, in any letter case, as every id here.
    reservation_id: EventId | None = None


class UsageChain(msgspec.Struct, frozen=True):
    """The owners a key's usage is charged to, as the cache resolves them."""

    virtual_key_id: str
    provider_config_id: str | None
    team_id: str | None
    customer_id: str | None


class Rejection(msgspec.Struct, frozen=True):
    """Why a record was refused: a snake_case code and a human sentence."""

    code: str
    message: str


NEGATIVE_COST = Rejection("negative_cost", "cost must be zero or more")
INVALID_COST = Rejection(
    "invalid_cost",
    "cost must be a finite number below 10^12 with at most 9 fractional digits",
)
OCCURRED_AT_OUT_OF_RANGE = Rejection(
    "occurred_at_out_of_range",
    "occurred_at must lie between 2000-01-01T00:00:00Z and 5 minutes after the"
    " receive time",
)
UNKNOWN_VIRTUAL_KEY = Rejection(
    "unknown_virtual_key", "the virtual key is not known (or was deleted)"
)
KEY_CHOICE = Rejection(
    "invalid_record", "send exactly one of virtual_key and virtual_key_id"
)
COUNT_OUT_OF_RANGE = Rejection(
    "invalid_record",
    f"token and request counts must lie in 0..{MAX_COUNT}",
)
NUL_CHARACTER = Rejection(
    "invalid_record", "provider and model must not contain the character U+0000"
)


def invalid_record(error: msgspec.MsgspecError) -> Rejection:
    """The rejection of a record that did not decode."""
    if isinstance(error, msgspec.ValidationError):
        return Rejection("invalid_record", f"the record is invalid: {explained(error)}")
    return Rejection("invalid_record", f"the record is not valid JSON: {error}")


def is_in_range(at: datetime, received: datetime) -> bool:
    """Whether the aware instant `at` lies between EARLIEST and MAX_FUTURE after
    `received`. Aware datetimes compare without a conversion to UTC, so an offset at
    the very edge of datetime's range (0001-01-01T00:00:00+01:00) cannot overflow."""
    return EARLIEST <= at <= received + MAX_FUTURE


def validate(record: UsageRecord, now: datetime) -> Rejection | None:
    """What is wrong with a decoded record that its types cannot say, if anything."""
    if (record.virtual_key is None) == (record.virtual_key_id is None):
        return KEY_CHOICE
    if not _are_counts(record.input_tokens, record.output_tokens, record.requests):
        return COUNT_OUT_OF_RANGE
    rejection = _content(record.provider, record.model, record.cost)
    at = record.occurred_at
    if rejection is None and at is not None and not is_in_range(at, now):
        return OCCURRED_AT_OUT_OF_RANGE
    return rejection


def validate_recorded(event: UsageRecorded, recorded_at: datetime) -> Rejection | None:
    """What is wrong with a usage event read from a log to import, if anything: the
    rules of `validate` and the record's types, with the event's `recorded_at` as
    its receive time (`recorded_at` itself must be in range: see is_in_range)."""
    if not (0 < len(event.provider) <= MAX_NAME and 0 < len(event.model) <= MAX_NAME):
        return Rejection(
            "invalid_record",
            f"provider and model must have 1 to {MAX_NAME} characters",
        )
    if not _are_counts(event.input_tokens, event.output_tokens, event.requests):
        return COUNT_OUT_OF_RANGE
    ids = (
        event.virtual_key_id,
        event.provider_config_id,
        event.team_id,
        event.customer_id,
        event.reservation_id,
    )
    if not all(i is None or _is_log_id(i) for i in ids):
        return Rejection(
            "invalid_record",
            f"ids must have 1 to {MAX_LOG_ID} characters, without U+0000",
        )
    rejection = _content(event.provider, event.model, event.cost)
    if rejection is None and (
        event.occurred_at.utcoffset() is None
        or not is_in_range(event.occurred_at, recorded_at)
    ):
        return OCCURRED_AT_OUT_OF_RANGE
    return rejection


def _are_counts(input_tokens: int, output_tokens: int, requests: int) -> bool:
    return (
        0 <= input_tokens <= MAX_COUNT
        and 0 <= output_tokens <= MAX_COUNT
        and 0 <= requests <= MAX_COUNT
    )


def _is_log_id(value: str) -> bool:
    return 0 < len(value) <= MAX_LOG_ID and "\x00" not in value


def _content(provider: str, model: str, cost: Decimal) -> Rejection | None:
    # PostgreSQL's jsonb cannot hold U+0000: one such record would fail its group.
    if "\x00" in provider or "\x00" in model:
        return NUL_CHARACTER
    return cost_rejection(cost)


def kept_money(amount: Decimal) -> Decimal:
    """A valid amount (`cost_rejection` passed) as the log keeps it: a plain 0 for
    any zero (-0, 0E-16384), and no zeros written past the nanos (1.5000000000000 is
    1.500000000), so every reader can store and sum what the log holds."""
    if not amount:
        return _ZERO
    kept = amount.quantize(NANO)  # the same value (cost_rejection passed)
    # Equal values: compare_total orders the one with more digits written first.
    return kept if amount.compare_total(kept) < 0 else amount


def cost_rejection(cost: Decimal) -> Rejection | None:
    """Why an amount of money spent or held is refused (None: it is not): not
    finite, negative, 10^12 or more, or finer than 9 fractional digits."""
    if not cost.is_finite():
        return INVALID_COST
    if cost < 0:
        return NEGATIVE_COST
    if cost >= MAX_COST:
        return INVALID_COST
    # Below MAX_COST, quantize stays within the context's 28 digits. 0.1000000000
    # passes: only one of its fractional digits is not zero.
    if cost != cost.quantize(NANO):
        return INVALID_COST
    return None


def event_key(record: UsageRecord) -> int:
    """The record's idempotency key as an int (untracked by the GC, cheap to hash)."""
    return int(record.event_id.replace("-", ""), 16)


def to_event(record: UsageRecord, chain: UsageChain, now: datetime) -> UsageRecorded:
    """The event of a valid record whose key resolved to `chain`."""
    occurred_at = record.occurred_at
    if occurred_at is None:
        occurred_at = now
    elif occurred_at.tzinfo is not UTC:
        occurred_at = occurred_at.astimezone(UTC)
    return UsageRecorded(
        virtual_key_id=chain.virtual_key_id,
        provider=record.provider,
        model=record.model,
        cost=kept_money(record.cost),
        input_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
        requests=record.requests,
        occurred_at=occurred_at,
        provider_config_id=chain.provider_config_id,
        team_id=chain.team_id,
        customer_id=chain.customer_id,
        reservation_id=(
            None if record.reservation_id is None else record.reservation_id.lower()
        ),
    )


# --- screening -------------------------------------------------------------------


class KeyResolver(Protocol):
    """What ingest needs from the enforcement cache (projections/cache.py)."""

    def resolve_usage(
        self,
        *,
        virtual_key_sha256: str | None,
        virtual_key_id: str | None,
        provider: str,
    ) -> UsageChain | None: ...


class Row(msgspec.Struct, frozen=True, gc=False):
    """An event of a usage stream ready to append: a screened record, or a hold or
    its release (untracked by the GC: no references)."""

    key: int  # event_id as an int: the idempotency key
    event_id: str
    stream_id: str
    data: bytes  # the event's `data` column
    type: str = "UsageRecorded"


class Rejected(NamedTuple):
    """A record refused before the queue: where it was (line or index) and why."""

    where: int
    why: Rejection


_encode = msgspec.json.Encoder().encode
# Money exact (budgets.Money): a hook call per record, about a microsecond.
_record_decoder = msgspec.json.Decoder(
    UsageRecord, dec_hook=decode_hook, float_hook=decimal_number
)
_decode_record = _record_decoder.decode
_decode_records = _record_decoder.decode_lines
# A line that ends one JSON value and starts another (false positives only cost speed).
_TWO_VALUES = re.compile(rb"\}[ \t\r]*\{")
_BLANK = b" \t\r"

# `data` is the event without its tag, as eventstore.encode_event writes it. Encoding
# the tagged struct and cutting the tag off is a third cheaper than asdict() + encode
# and gives the same bytes (tests/test_ingest.py checks it).
_TAG = b'{"type":"UsageRecorded",'


def encode_usage(event: UsageRecorded) -> bytes:
    return b"{" + _encode(event)[len(_TAG) :]


def decode_record(data: bytes | str | msgspec.Raw) -> UsageRecord:
    """Strict decoding of one record; every failure is a msgspec.MsgspecError
    (msgspec reports invalid UTF-8 inside a string as a UnicodeDecodeError)."""
    try:
        return _decode_record(data)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"invalid UTF-8: {exc}") from None


class _Line(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A record as the fast path decodes it: only what msgspec checks without calling
    back into Python. `_exact` applies the rest of UsageRecord's rules (the patterns,
    money and whole numbers through `decode_hook`); a line it cannot take sends the
    body to the strict decoder, which accepts, refuses and words errors as before."""

    event_id: Annotated[str, msgspec.Meta(min_length=36, max_length=36)]
    provider: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
    cost: str | int  # a number with a fraction: the strict decoder takes it
    virtual_key: Secret | None = None
    virtual_key_id: (
        Annotated[str, msgspec.Meta(min_length=36, max_length=36)] | None
    ) = None
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 1
    occurred_at: Instant | None = None
    reservation_id: (
        Annotated[str, msgspec.Meta(min_length=36, max_length=36)] | None
    ) = None


_decode_fast = msgspec.json.Decoder(_Line).decode_lines
# The patterns of EventId and Id, matched as msgspec matches them.
_IS_UUID = re.compile(_UUID).search


def _exact(lines: list[_Line]) -> list[UsageRecord] | None:
    """The records the strict decoder yields for these lines, or None when one of
    them needs it (a pattern not matched, money or a count it may refuse)."""
    records = []
    for line in lines:
        key_id, held = line.virtual_key_id, line.reservation_id
        if (
            _IS_UUID(line.event_id) is None
            or "\x00" in line.provider
            or "\x00" in line.model
            or (key_id is not None and _IS_UUID(key_id) is None)
            or (held is not None and _IS_UUID(held) is None)
        ):
            return None
        try:
            cost = decode_hook(Money, line.cost)
        except (TypeError, ValueError):
            return None
        records.append(
            UsageRecord(
                event_id=line.event_id,
                provider=line.provider,
                model=line.model,
                cost=cost,  # type: ignore[arg-type]
                virtual_key=line.virtual_key,
                virtual_key_id=key_id,
                input_tokens=line.input_tokens,
                output_tokens=line.output_tokens,
                requests=line.requests,
                occurred_at=line.occurred_at,
                reservation_id=line.reservation_id,
            )
        )
    return records


def decode_lines(body: bytes) -> tuple[list[tuple[int, UsageRecord]], list[Rejected]]:
    """NDJSON → (line, record) pairs and rejected lines (1-based); blank lines skipped.

    One decode_lines() over the whole body when it holds exactly one value per line (the
    common case): first with the fast types (`_Line`), then, if any line needs it, with
    UsageRecord's own; else line by line, which also names the lines that fail.
    """
    lines = body.count(b"\n") + (not body.endswith(b"\n"))
    try:
        fast = _exact(_decode_fast(body))
    except (msgspec.MsgspecError, UnicodeDecodeError):
        fast = None
    if fast is not None and len(fast) == lines and not _TWO_VALUES.search(body):
        return list(enumerate(fast, 1)), []
    try:
        records = _decode_records(body)
    except (msgspec.MsgspecError, UnicodeDecodeError):
        pass
    else:
        if len(records) == lines and not _TWO_VALUES.search(body):
            return list(enumerate(records, 1)), []
    good: list[tuple[int, UsageRecord]] = []
    bad: list[Rejected] = []
    for number, line in enumerate(body.split(b"\n"), 1):
        if not line.strip(_BLANK):
            continue
        try:
            good.append((number, decode_record(line)))
        except msgspec.MsgspecError as exc:
            bad.append(Rejected(number, invalid_record(exc)))
    return good, bad


class Screened(NamedTuple):
    rows: list[Row]
    rejected: list[Rejected]


def screen(
    records: Sequence[tuple[int, UsageRecord]], resolver: KeyResolver, now: datetime
) -> Screened:
    """Validate records and resolve their keys; chains are looked up once per
    (key, provider) in a request."""
    rows: list[Row] = []
    rejected: list[Rejected] = []
    # (chain, stream id) per (secret, key id, provider) of this request
    chains: dict[tuple[str | None, str | None, str], tuple[UsageChain, str] | None] = {}
    for at, record in records:
        rejection = validate(record, now)
        if rejection is not None:
            rejected.append(Rejected(at, rejection))
            continue
        lookup = (record.virtual_key, record.virtual_key_id, record.provider)
        try:
            found = chains[lookup]
        except KeyError:
            found = chains[lookup] = _resolve(resolver, record)
        if found is None:
            rejected.append(Rejected(at, UNKNOWN_VIRTUAL_KEY))
            continue
        chain, stream_id = found
        data = encode_usage(to_event(record, chain, now))
        rows.append(Row(event_key(record), record.event_id, stream_id, data))
    return Screened(rows, rejected)


def _resolve(
    resolver: KeyResolver, record: UsageRecord
) -> tuple[UsageChain, str] | None:
    secret, key_id = record.virtual_key, record.virtual_key_id
    chain = resolver.resolve_usage(
        virtual_key_sha256=(
            None if secret is None else hashlib.sha256(secret.encode()).hexdigest()
        ),
        # A hyphenated UUID (the pattern): in lower case, it is the stored spelling.
        virtual_key_id=None if key_id is None else key_id.lower(),
        provider=record.provider,
    )
    return None if chain is None else (chain, "usage-" + chain.virtual_key_id)
