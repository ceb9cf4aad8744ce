"""Legacy event schemas → the current one: pure dict→dict steps, chained on read.

One step per legacy (type, schema_version), each declaring where it leads, so the
chains can be proven at start-up (`validate_chains`). The same steps serve reads
(`service.eventstore.decode_event`) and the one-shot rewrite (`service.rewrite`).
Steps only reshape `data`: the time of an event (budget anchors, usage floors) comes
from its envelope's `recorded_at`, which neither path changes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from service.domain.events import EVENT_TYPES, AnyEvent

Data = dict[str, Any]


class Step(msgspec.Struct, frozen=True):
    """Turns `data` of one legacy (type, version) into that of (to_type, to_version)."""

    to_type: str
    to_version: int
    convert: Callable[[Data], Data]


class UnknownSchema(Exception):
    """An event whose (type, schema_version) no chain leads from."""


class MalformedLegacyEvent(UnknownSchema):
    """A legacy event whose data lacks what its legacy schema promises."""


class BrokenChain(Exception):
    """The registered steps do not lead every legacy schema to a current one."""


# Legacy logs may hold money as JSON numbers: decode them as Decimal, never float.
_decode_lossless = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal).decode


def decode_legacy(raw: bytes) -> Data:
    """The `data` of a stored event as a dict, numbers with a fraction as Decimal."""
    return _decode_lossless(raw)


def upcast(type_: str, schema_version: int, data: Data) -> tuple[str, Data]:
    """Follow the chain from a stored (type, version) to the current schema."""
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


def to_current(type_: str, schema_version: int, data: Data) -> AnyEvent:
    """Upcast and decode strictly into the current struct (what the rewrite writes)."""
    name, current = upcast(type_, schema_version, data)
    return msgspec.convert(current, EVENT_TYPES[name], strict=True)


def legacy_budget_id(owner_id: str, reset_duration: str) -> str:
    """The id of a legacy budget stored without one: stable, so reads and the
    rewritten log agree, and a later legacy event can name it."""
    return str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"govledger:budget:{owner_id}:{reset_duration}")
    )


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


def _budget(owner_id: str, budget_id: object, fields: Mapping[str, Any]) -> Data:
    reset_duration = fields["reset_duration"]
    if not isinstance(reset_duration, str):
        raise TypeError(f"reset_duration must be a string, not {reset_duration!r}")
    return {
        "budget_id": budget_id or legacy_budget_id(owner_id, reset_duration),
        "max_limit": _money(fields["max_limit"]),
        "reset_duration": reset_duration,
        "calendar_aligned": bool(fields.get("calendar_aligned") or False),
        "reset_usage": bool(fields.get("reset_usage") or False),
    }


def _created(owner_key: str, data: Data) -> Data:
    """`*Created` v1 → v2: the single `budget` (and its id) become `budgets`."""
    rest = {k: v for k, v in data.items() if k not in ("budget_id", "budget")}
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
