"""Legacy event schemas → the current one: pure dict→dict steps, chained on read,
and the one strict decoding every legacy event goes through.

One step per legacy (type, schema_version), each declaring where it leads, so the
chains can be proven at start-up (`validate_chains`). The same steps and the same
strict decoding (`to_current`) serve reads (`service.eventstore.decode_event`), the
import (`service.transfer`) and the one-shot rewrite (`service.rewrite`), so the three
accept exactly the same legacy events and produce the same result.

A legacy value outside today's grammar is converted when it has an exact current
equivalent (`reset_duration` "1h30m" → "90m", "1.5d" → "36h") and refused when it has
none ("500ms", "1.5M"); so is data that does not decode strictly (`"is_active": 1`).
Every refusal is a LegacyEventRefused: import names the line, and in a log the
projectors skip that event loudly instead of stopping on it.

Steps only reshape `data`: the time of an event (budget anchors, usage floors) comes
from its envelope's `recorded_at`, which neither path changes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, TypeVar

import msgspec

from service.domain.bounds import (
    MAX_BUDGETS,
    MAX_MODELS,
    MAX_NAME,
    MAX_PROVIDER_CONFIGS,
)
from service.domain.budgets import (
    BudgetSpec,
    is_calendar_alignable,
    new_budgets,
    parse_duration,
    validate_rate_limit,
)
from service.domain.events import (
    EVENT_TYPES,
    AnyEvent,
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerUpdated,
    RateLimit,
    ReservationHeld,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamUpdated,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyUpdated,
)
from service.domain.usage import cost_rejection
from service.errors import DuplicateProvider, Invalid, InvalidCost, LegacyEventRefused

Data = dict[str, Any]
T = TypeVar("T")


class Step(msgspec.Struct, frozen=True):
    """Turns `data` of one legacy (type, version) into that of (to_type, to_version)."""

    to_type: str
    to_version: int
    convert: Callable[[Data], Data]


class UnknownSchema(Exception):
    """An event whose (type, schema_version) no chain leads from."""


class MalformedLegacyEvent(LegacyEventRefused, UnknownSchema):
    """A legacy event whose data lacks what its legacy schema promises."""


class UnconvertibleLegacyValue(LegacyEventRefused):
    """A legacy value outside today's grammar with no exact current equivalent."""


class InvalidLegacyEvent(LegacyEventRefused, msgspec.ValidationError):
    """A legacy event whose upcast data does not decode strictly into the current
    struct (a msgspec.ValidationError too, as the strict decoding raised one)."""


class BrokenChain(Exception):
    """The registered steps do not lead every legacy schema to a current one."""


# Legacy logs may hold money as JSON numbers: decode them as Decimal, never float.
_decode_lossless = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal).decode


def decode_legacy(raw: bytes | msgspec.Raw) -> Data:
    """The `data` of a stored event as a dict, numbers with a fraction as Decimal."""
    try:
        return _decode_lossless(raw)
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise MalformedLegacyEvent(
            f"the data of a legacy event must be a JSON object: {exc}"
        ) from None


def upcast(type_: str, schema_version: int, data: Data) -> tuple[str, Data]:
    """Follow the chain from a stored (type, version) to the current schema; the
    result of a legacy event is proven to decode strictly (`to_current`), so a lax
    decoding of it gives the very event the rewrite writes."""
    name, current = _follow(type_, schema_version, data)
    cls = EVENT_TYPES.get(type_)
    if cls is None or cls.schema_version != schema_version:
        _decode_current(type_, schema_version, name, current)
    return name, current


def to_current(type_: str, schema_version: int, data: Data) -> AnyEvent:
    """Upcast and decode strictly into the current struct: the one decoding of a
    legacy event, on read, at import and in the rewrite alike."""
    name, current = _follow(type_, schema_version, data)
    return _decode_current(type_, schema_version, name, current)


def _follow(type_: str, schema_version: int, data: Data) -> tuple[str, Data]:
    seen: set[tuple[str, int]] = set()
    while True:
        cls = EVENT_TYPES.get(type_)
        if cls is not None and cls.schema_version == schema_version:
            return type_, data
        key = (type_, schema_version)
        step = STEPS.get(key)
        if step is None or key in seen:
            raise UnknownSchema(f"no upcaster from {type_} v{schema_version}")
        seen.add(key)
        try:
            data = step.convert(data)
        except UnconvertibleLegacyValue as exc:
            raise UnconvertibleLegacyValue(
                f"{type_} v{schema_version}: {exc.message}"
            ) from exc
        except (
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
            InvalidOperation,
        ) as exc:
            raise MalformedLegacyEvent(
                f"{type_} v{schema_version} does not have its legacy shape: {exc!r}"
            ) from exc
        type_, schema_version = step.to_type, step.to_version


def _decode_current(
    from_type: str, from_version: int, name: str, data: Data
) -> AnyEvent:
    try:
        event = msgspec.convert(data, EVENT_TYPES[name], strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidLegacyEvent(
            f"{from_type} v{from_version} upcast to {name} does not decode: {exc}"
        ) from None
    try:
        check_values(event)
    except Invalid as exc:
        raise UnconvertibleLegacyValue(
            f"{from_type} v{from_version}: {exc.message}"
        ) from None
    return event


def legacy_budget_id(owner_id: str, reset_duration: str) -> str:
    """The id of a legacy budget stored without one: stable, so reads and the
    rewritten log agree, and a later legacy event can name it. `reset_duration` is
    the current spelling, so "1h30m" and "90m" name the same budget."""
    return str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"govledger:budget:{owner_id}:{reset_duration}")
    )


# --- legacy durations --------------------------------------------------------------

# The older system's durations: one or more `<number><unit>` terms, the number a
# decimal (ASCII digits, no sign, no exponent), the unit one of today's or a
# sub-second one (`1h30m`, `1.5d`, `500ms`).
_TERM = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h|d|w|M|Q|Y)"
_LEGACY_DURATION = re.compile(f"(?:{_TERM})+")
_LEGACY_TERM = re.compile(_TERM)
_MAX_LEGACY_LENGTH = 64
_SECONDS: dict[str, Fraction] = {
    "ns": Fraction(1, 10**9),
    "us": Fraction(1, 10**6),
    "µs": Fraction(1, 10**6),  # MICRO SIGN, as Go writes it
    "μs": Fraction(1, 10**6),  # GREEK SMALL LETTER MU
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86_400),
    "w": Fraction(604_800),
}
_MONTHS: dict[str, Fraction] = {"M": Fraction(1), "Q": Fraction(3), "Y": Fraction(12)}


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def current_duration(text: str) -> str:
    """A `reset_duration` in today's grammar: itself when it already is (`7d` stays
    `7d`), else its exact current equivalent, in the largest unit not above the
    largest one it names in which its count is whole (`1h30m` → `90m`, `1.5d` →
    `36h`, `2000ms` → `2s`, `1.5Y` → `6Q`). UnconvertibleLegacyValue when there is
    none: below a second (`500ms`), a fraction of a month (`1.5M`), months mixed
    with a fixed length (`1M2d`), zero, or longer than a period may be."""
    try:
        parse_duration(text)
    except Invalid:
        pass
    else:
        return text
    if len(text) > _MAX_LEGACY_LENGTH or _LEGACY_DURATION.fullmatch(text) is None:
        raise UnconvertibleLegacyValue(
            f"reset_duration {_shown(text)} is not a duration, legacy or current"
        )
    terms = [
        (Fraction(Decimal(number)), unit) for number, unit in _LEGACY_TERM.findall(text)
    ]
    seconds = sum((n * _SECONDS[u] for n, u in terms if u in _SECONDS), Fraction(0))
    months = sum((n * _MONTHS[u] for n, u in terms if u in _MONTHS), Fraction(0))
    why: str | None = None
    if seconds and months:
        why = "it mixes calendar units with a fixed length"
    elif not (seconds or months):
        why = "a period must be longer than zero"
    elif months and months.denominator != 1:
        why = "calendar units count whole months"
    elif seconds and seconds.denominator != 1:
        why = "the smallest unit is a whole second"
    if why is not None:
        raise UnconvertibleLegacyValue(
            f"reset_duration {_shown(text)} has no exact current equivalent: {why}"
        )
    sizes = _MONTHS if months else _SECONDS
    total = months or seconds
    top = max(max(sizes[u] for _, u in terms), Fraction(1))
    unit, size = next(
        (u, sizes[u])
        for u in ("Y", "Q", "M", "w", "d", "h", "m", "s")
        if u in sizes and sizes[u] <= top and total % sizes[u] == 0
    )
    current = f"{total // size}{unit}"
    try:
        parse_duration(current)
    except Invalid as exc:
        spelled = "" if current == text else f" ({current} in today's grammar)"
        raise UnconvertibleLegacyValue(
            f"reset_duration {_shown(text)}{spelled} has no current equivalent:"
            f" {exc.message}"
        ) from None
    return current


# --- the steps ---------------------------------------------------------------------


def _money(value: object) -> str:
    """A legacy amount as the decimal string current events store."""
    if isinstance(value, bool):
        raise TypeError(f"max_limit must be a number, not {value!r}")
    if isinstance(value, float):
        # The shortest repr round-trips: what the legacy writer put in the JSON.
        value = repr(value)
    if not isinstance(value, str | int | Decimal):
        raise TypeError(f"max_limit must be a number, not {value!r}")
    return str(Decimal(value))


def _flag(fields: Mapping[str, Any], name: str) -> bool:
    """A legacy boolean: true, false, null or absent (null and absent are false)."""
    value = fields.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true, false or null, not {value!r}")
    return value


def _aligned(reset_duration: str, calendar_aligned: bool) -> bool:
    # A flag on a duration that cannot be aligned is ignored by every read
    # (budgets.period_bounds): its exact current form is false.
    return calendar_aligned and is_calendar_alignable(parse_duration(reset_duration))


def _duration(fields: Mapping[str, Any], name: str) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {value!r}")
    return current_duration(value)


def _budget(owner_id: str, budget_id: object, fields: Mapping[str, Any]) -> Data:
    reset_duration = _duration(fields, "reset_duration")
    return {
        "budget_id": budget_id or legacy_budget_id(owner_id, reset_duration),
        "max_limit": _money(fields["max_limit"]),
        "reset_duration": reset_duration,
        "calendar_aligned": _aligned(reset_duration, _flag(fields, "calendar_aligned")),
        "reset_usage": _flag(fields, "reset_usage"),
    }


def _current_budget(budget: object) -> object:
    """A budget already in the current shape (inside a legacy provider config), its
    duration and flag brought to today's grammar; other shapes are left to the
    strict decoding to refuse."""
    if not isinstance(budget, dict) or not isinstance(
        budget.get("reset_duration"), str
    ):
        return budget
    reset_duration = _duration(budget, "reset_duration")
    changed = {**budget, "reset_duration": reset_duration}
    if isinstance(budget.get("calendar_aligned"), bool):
        changed["calendar_aligned"] = _aligned(
            reset_duration, budget["calendar_aligned"]
        )
    return changed


def _rate_limit(rate_limit: object) -> object:
    """A legacy rate limit, its durations in today's grammar."""
    if not isinstance(rate_limit, dict):
        return rate_limit
    return {
        k: current_duration(v)
        if k.endswith("_reset_duration") and isinstance(v, str)
        else v
        for k, v in rate_limit.items()
    }


def _provider_config(config: object) -> object:
    if not isinstance(config, dict):
        return config
    changed = dict(config)
    if isinstance(config.get("budgets"), list):
        changed["budgets"] = [_current_budget(b) for b in config["budgets"]]
    if "rate_limit" in config:
        changed["rate_limit"] = _rate_limit(config["rate_limit"])
    return changed


def _created(owner_key: str, data: Data) -> Data:
    """`*Created` v1 → v2: the single `budget` (and its id) become `budgets`; the
    current fields it carries (a rate limit, provider configs) in today's grammar."""
    rest = {k: v for k, v in data.items() if k not in ("budget_id", "budget")}
    if "rate_limit" in rest:
        rest["rate_limit"] = _rate_limit(rest["rate_limit"])
    if isinstance(rest.get("provider_configs"), list):
        rest["provider_configs"] = [
            _provider_config(c) for c in rest["provider_configs"]
        ]
    budget = data.get("budget")
    if budget is None:
        return {**rest, "budgets": []}
    budget_id = data.get("budget_id") or budget.get("budget_id")
    return {**rest, "budgets": [_budget(data[owner_key], budget_id, budget)]}


def _budget_updated(owner_key: str, data: Data) -> Data:
    """`*BudgetUpdated` v1 → `*BudgetsReplaced`: the owner's one budget is the set."""
    owner_id = data[owner_key]
    return {
        owner_key: owner_id,
        "budgets": [_budget(owner_id, data.get("budget_id"), data)],
    }


def _budget_removed(owner_key: str, data: Data) -> Data:
    """`*BudgetRemoved` v1 → `*BudgetsReplaced` with no budget left."""
    return {owner_key: data[owner_key], "budgets": []}


def customer_created_v1(data: Data) -> Data:
    return _created("customer_id", data)


def customer_budget_updated_v1(data: Data) -> Data:
    return _budget_updated("customer_id", data)


def customer_budget_removed_v1(data: Data) -> Data:
    return _budget_removed("customer_id", data)


def team_created_v1(data: Data) -> Data:
    return _created("team_id", data)


def team_budget_updated_v1(data: Data) -> Data:
    return _budget_updated("team_id", data)


def team_budget_removed_v1(data: Data) -> Data:
    return _budget_removed("team_id", data)


def virtual_key_created_v1(data: Data) -> Data:
    return _created("virtual_key_id", data)


def virtual_key_budget_updated_v1(data: Data) -> Data:
    return _budget_updated("virtual_key_id", data)


def virtual_key_budget_removed_v1(data: Data) -> Data:
    return _budget_removed("virtual_key_id", data)


STEPS: dict[tuple[str, int], Step] = {
    ("CustomerCreated", 1): Step("CustomerCreated", 2, customer_created_v1),
    ("CustomerBudgetUpdated", 1): Step(
        "CustomerBudgetsReplaced", 1, customer_budget_updated_v1
    ),
    ("CustomerBudgetRemoved", 1): Step(
        "CustomerBudgetsReplaced", 1, customer_budget_removed_v1
    ),
    ("TeamCreated", 1): Step("TeamCreated", 2, team_created_v1),
    ("TeamBudgetUpdated", 1): Step("TeamBudgetsReplaced", 1, team_budget_updated_v1),
    ("TeamBudgetRemoved", 1): Step("TeamBudgetsReplaced", 1, team_budget_removed_v1),
    ("VirtualKeyCreated", 1): Step("VirtualKeyCreated", 2, virtual_key_created_v1),
    ("VirtualKeyBudgetUpdated", 1): Step(
        "VirtualKeyBudgetsReplaced", 1, virtual_key_budget_updated_v1
    ),
    ("VirtualKeyBudgetRemoved", 1): Step(
        "VirtualKeyBudgetsReplaced", 1, virtual_key_budget_removed_v1
    ),
}


# --- what a read needs of an event --------------------------------------------------

_WITH_BUDGETS = (
    CustomerCreated
    | TeamCreated
    | VirtualKeyCreated
    | CustomerBudgetsReplaced
    | TeamBudgetsReplaced
    | VirtualKeyBudgetsReplaced
)
_WITH_RATE_LIMIT = (
    CustomerCreated
    | TeamCreated
    | VirtualKeyCreated
    | CustomerUpdated
    | TeamUpdated
    | VirtualKeyUpdated
)


def check_values(event: AnyEvent) -> None:
    """Raise the Invalid a command would have met for `event`: its names, ids and
    lists within their bounds (which keep every row within the read model's index
    limits), its budgets, rate limits and provider configs valid. calendar_aligned
    on a duration that cannot be aligned is let through (every read ignores it);
    usage has its own rules (domain.usage). Ids are kept as the log spells them,
    so a legacy id need not be a UUID, only bounded text."""
    _check_ids(msgspec.to_builtins(event))
    name = getattr(event, "name", None)
    if isinstance(name, str):
        _check_name(name, "name")
    if isinstance(event, _WITH_BUDGETS):
        _check_budgets(event.budgets)
    if isinstance(event, _WITH_RATE_LIMIT):
        _check_rate_limit(event.rate_limit)
    if isinstance(event, ReservationHeld) and cost_rejection(event.amount):
        # What a reserving check would have refused (the usage cost's rule).
        raise InvalidCost(
            "amount of a hold must be a finite number from 0 to below 10^12 with"
            " at most 9 fractional digits"
        )
    if isinstance(event, VirtualKeyCreated | VirtualKeyUpdated):
        _check_text(event.value_sha256, "value_sha256", MAX_DIGEST)
        _check_text(event.value_hint, "value_hint", MAX_DIGEST, empty=True)
        _check_count(event.provider_configs, "provider_configs", MAX_PROVIDER_CONFIGS)
        providers: set[str] = set()
        for config in event.provider_configs:
            _check_name(config.provider, "provider")
            if config.provider in providers:
                raise DuplicateProvider(
                    f"provider {_shown(config.provider)} has more than one config"
                )
            providers.add(config.provider)
            for model in _check_count(
                config.allowed_models or (), "allowed_models", MAX_MODELS
            ):
                _check_text(model, "a model", MAX_NAME)
            _check_budgets(config.budgets)
            _check_rate_limit(config.rate_limit)


# An id of the log is text of at most this many characters (a UUID has 36): with its
# stream's prefix it stays far below a btree row's limit in every index it is in.
MAX_LOG_ID = 255
# A secret's SHA-256 (64 hex digits) and its last characters, with room to spare.
MAX_DIGEST = 128


def _check_ids(fields: Mapping[str, Any]) -> None:
    """Every `*_id` (and `*_ids`) field, nested ones included, is bounded text."""
    for key, value in fields.items():
        if isinstance(value, Mapping):
            _check_ids(value)
        elif isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, Mapping):
                    _check_ids(item)
                elif key.endswith("_ids"):
                    _check_text(item, key, MAX_LOG_ID)
        elif key.endswith("_id") and value is not None:
            _check_text(value, key, MAX_LOG_ID)


def _check_name(value: str, what: str) -> None:
    _check_text(value, what, MAX_NAME)
    if not value.strip():
        raise Invalid(f"{what} must not be blank")


def _check_text(value: object, what: str, limit: int, *, empty: bool = False) -> None:
    if not isinstance(value, str):
        raise Invalid(f"{what} must be text, not {value!r:.40}")
    if not (empty or value) or len(value) > limit:
        raise Invalid(f"{what} must have 1 to {limit} characters, got {len(value)}")
    # PostgreSQL's text and jsonb cannot hold U+0000.
    if "\x00" in value:
        raise Invalid(f"{what} must not contain the character U+0000")


def _check_count(items: Sequence[T], what: str, limit: int) -> Sequence[T]:
    if len(items) > limit:
        raise Invalid(f"{what} holds at most {limit} entries, got {len(items)}")
    return items


def _check_budgets(budgets: Sequence[Budget]) -> None:
    _check_count(budgets, "budgets", MAX_BUDGETS)
    specs = [
        BudgetSpec(
            max_limit=b.max_limit,
            reset_duration=b.reset_duration,
            calendar_aligned=_aligned(b.reset_duration, b.calendar_aligned),
        )
        for b in budgets
    ]
    # The very rules of a command's budgets; the ids drawn are thrown away.
    new_budgets(specs, str)


def _check_rate_limit(rate_limit: RateLimit | None) -> None:
    if rate_limit is not None:
        validate_rate_limit(rate_limit)


# --- start-up proof ----------------------------------------------------------------


def validate_chains(
    steps: Mapping[tuple[str, int], Step] = STEPS,
    types: Mapping[str, type[AnyEvent]] = EVENT_TYPES,
) -> None:
    """Raise BrokenChain unless every step leads, without a cycle, to a current
    (type, version), no step starts from a current one, and every older version of
    a current type has a step."""
    current = {(name, cls.schema_version) for name, cls in types.items()}
    problems: list[str] = []
    for key in steps:
        if key in current:
            problems.append(f"{key[0]} v{key[1]} is current but has a step")
            continue
        seen = [key]
        node = key
        while node not in current:
            step = steps.get(node)
            if step is None:
                problems.append(
                    f"{key[0]} v{key[1]} leads to {node[0]} v{node[1]},"
                    " which is neither current nor upcast"
                )
                break
            node = (step.to_type, step.to_version)
            if node in seen:
                problems.append(f"{key[0]} v{key[1]} runs into a cycle at {node}")
                break
            seen.append(node)
    for name, version in sorted(current):
        problems.extend(
            f"{name} v{old} (older than current v{version}) has no step"
            for old in range(1, version)
            if (name, old) not in steps
        )
    if problems:
        raise BrokenChain("; ".join(problems))


def legacy_keys(steps: Mapping[tuple[str, int], Step] = STEPS) -> list[str]:
    """`type:version` of every legacy schema, as the rewrite selects rows by them."""
    return sorted(f"{name}:{version}" for name, version in steps)
