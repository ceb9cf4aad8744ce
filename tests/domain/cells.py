"""The tests' reference for what a fold filed: every cell of a ledger, taken."""

from __future__ import annotations

from datetime import datetime

from service.domain.ledger import EARLIEST, FOREVER, Ledger, meters


def take_cells(ledger: Ledger) -> list[tuple[str, str, datetime, int]]:
    """(kind, meter id, key, amount) of every cell, emptied, and every meter filing
    nowhere: what `take_filed` takes, without its keeping each meter's last cell."""
    taken = [
        (meter.kind, meter.id, key, amount)
        for meter in meters(ledger)
        for key, amount in sorted(meter.cells.items())
    ]
    for meter in meters(ledger):
        meter.cells.clear()
        meter.lo, meter.hi = FOREVER, EARLIEST
    return taken
