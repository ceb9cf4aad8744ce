"""The benchmark report's numbers: a ratio that misses its target never reads as
meeting it (tools/bench, the report and the chart alike)."""

from __future__ import annotations

import pytest

from tools.bench.rows import ratio_text


@pytest.mark.parametrize(
    ("value", "bound", "shown"),
    [
        (0.698, 0.70, "0.698"),  # two places would show the target itself
        (0.7049, 0.70, "0.705"),  # above it, but 0.70 is its own value: three
        (0.70, 0.70, "0.70"),  # exactly the target
        (0.6449, 0.70, "0.64"),  # far from it: two places tell it apart
        (0.698, None, "0.70"),  # no target to be confused with
        (1.956, 0.50, "1.96"),
    ],
)
def test_a_ratio_shows_enough_places_to_tell_it_from_its_target(value, bound, shown):
    assert ratio_text(value, bound) == shown
