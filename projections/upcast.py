"""Legacy event schemas → the current one: pure dict→dict steps, chained on read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.domain.events import EVENT_TYPES

Data = dict[str, Any]
# (type, schema_version) → a step to the next (type, schema_version, data).
Step = Callable[[Data], tuple[str, int, Data]]

STEPS: dict[tuple[str, int], Step] = {}


class UnknownSchema(Exception):
    """An event whose (type, schema_version) no chain leads from."""


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
        type_, schema_version, data = step(data)
