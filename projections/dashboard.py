"""The dashboard's view of the governance read model: one consistent snapshot of
customers, teams and keys, each budget with its next reset and each key with the limit
that blocks it (the check's semantics), and a budget's spend per past period.

`snapshot` and `periods` read; `dress` is pure: it adds `next_reset` to budgets,
`token_next_reset`/`request_next_reset` to rate limits, and `blocked` to keys and
provider configs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

from projections import governance_reads, runner
from projections.governance_usage import Owner, all_owners, books_of
from service import eventstore
from service.domain.ledger import meters, periods_of, reading, to_money, to_nanos
from service.errors import NotFound
from service.eventstore import Connection

# The snapshot's entities as JSON-ready dicts (money and times kept as such), which
# `dress` extends with the dashboard's own fields.
Wire = dict[str, Any]

# The SQL projector whose tables the snapshot reads (projections.runner).
GOVERNANCE_PROJECTION = "governance"

_BUDGET_OWNER = "SELECT owner_type, owner_id FROM governance_budgets WHERE id = $1"
_CELLS = "SELECT period_start, spend FROM governance_budget_spend WHERE budget_id = $1"


async def snapshot(conn: Connection, now: datetime) -> Wire:
    """`{position, generated_at, customers, teams, virtual_keys}` as of one snapshot
    of the read model; `position` is the highest position the read model applied
    (its checkpoint's own can be lower: the log is applied in commit order)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoint = await runner.load_checkpoint(conn, GOVERNANCE_PROJECTION)
        position = await eventstore.high_water(conn, checkpoint)
        customers = _wire(await governance_reads.list_customers(conn, now))
        teams = _wire(await governance_reads.list_teams(conn, now))
        keys = _wire(await governance_reads.list_virtual_keys(conn, now))
        ends, rate_ends = await _ends(conn, now)
    dress(customers, teams, keys, ends, rate_ends, now)
    return {
        "position": position,
        "generated_at": now,
        "customers": customers,
        "teams": teams,
        "virtual_keys": keys,
    }


async def _ends(
    conn: Connection, now: datetime
) -> tuple[dict[str, datetime], dict[tuple[str, str], dict[str, datetime | None]]]:
    """When the period containing `now` ends, per budget and per rate-limit half
    (the fold's `reading`; no cell is needed for it)."""
    books = await books_of(conn, await all_owners(conn), now)
    ends: dict[str, datetime] = {}
    rate_ends: dict[tuple[str, str], dict[str, datetime | None]] = {}
    for owner, book in books.items():
        ledger = book.ledger
        for meter in ledger.budgets:
            ends[meter.id] = reading(ledger, meter, now).end
        rate_ends[owner] = {
            prefix: None if half is None else reading(ledger, half, now).end
            for prefix, half in (("token", ledger.tokens), ("request", ledger.requests))
        }
    return ends, rate_ends


async def periods(conn: Connection, budget_id: str, limit: int | None) -> list[Wire]:
    """The budget's spend per period of its current definition, oldest first: the
    latest `limit` (or all); usage still pending counts in its own period.

    After a reset inside a period, the period shows as two entries: before the reset
    (under the period's start) and from it (`ledger.periods_of`).
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(_BUDGET_OWNER, budget_id)
        if row is None:
            raise NotFound(f"budget {budget_id} does not exist")
        owner = Owner(row["owner_type"], row["owner_id"])
        book = (await books_of(conn, [owner]))[owner]
        cells = await conn.fetch(_CELLS, budget_id)
    ledger = book.ledger
    [meter] = [m for m in meters(ledger) if m.id == budget_id]
    for key, spend in cells:
        meter.cells[key] = to_nanos(spend)
    for at, amounts in (ledger.pending or {}).items():
        if at >= meter.floor:  # filed under its own instant: periods_of groups it
            meter.cells[at] = meter.cells.get(at, 0) + amounts[meter.part]
    found = periods_of(meter)
    latest = found if limit is None else found[max(0, len(found) - limit) :]
    return [{"period_start": at, "spend": to_money(used)} for at, used in latest]


def _wire(views: Sequence[msgspec.Struct]) -> list[Wire]:
    """The read views as dicts, field for field, in the order they are answered."""
    wire: list[Wire] = msgspec.to_builtins(views, builtin_types=(Decimal, datetime))
    return wire


# --- dressing (pure) ---------------------------------------------------------------


def dress(
    customers: Sequence[Wire],
    teams: Sequence[Wire],
    keys: Sequence[Wire],
    ends: Mapping[str, datetime],
    rate_ends: Mapping[tuple[str, str], Mapping[str, datetime | None]],
    now: datetime,
) -> None:
    """Add next resets (`ends`: by budget id, `rate_ends`: by owner and half, as
    of `now`) and blocking limits to the wire dicts, in place."""
    for owner_type, owner in _owners(customers, teams, keys):
        for budget in owner["budgets"]:
            budget["next_reset"] = ends.get(budget["id"])
        rate_limit = owner["rate_limit"]
        if rate_limit is not None:
            halves = rate_ends.get((owner_type, owner["id"]), {})
            for prefix in ("token", "request"):
                rate_limit[f"{prefix}_next_reset"] = halves.get(prefix)
    teams_by_id = {t["id"]: t for t in teams}
    customers_by_id = {c["id"]: c for c in customers}
    for key in keys:
        _mark_blocked(key, teams_by_id, customers_by_id)


def _owners(
    customers: Iterable[Wire], teams: Iterable[Wire], keys: Iterable[Wire]
) -> Iterable[tuple[str, Wire]]:
    yield from (("customer", c) for c in customers)
    yield from (("team", t) for t in teams)
    for key in keys:
        yield "virtual_key", key
        yield from (("provider_config", p) for p in key["provider_configs"])


def _mark_blocked(
    key: Wire, teams: Mapping[str, Wire], customers: Mapping[str, Wire]
) -> None:
    """Set `blocked` on the key and each of its provider configs: None while a check
    could pass, else what the check answers (reason and the limit that blocks).

    A key with provider configs is blocked when its own chain is, or when every
    provider's chain is (then it names the first provider's limit).
    """
    above: list[tuple[str, Wire]] = []
    team = teams.get(key["team_id"]) if key["team_id"] is not None else None
    if team is not None:
        above.append(("team", team))
    # Under a team, the team's customer applies (none when the team is gone).
    customer_id = key["customer_id"] if key["team_id"] is None else None
    if team is not None:
        customer_id = team["customer_id"]
    customer = customers.get(customer_id) if customer_id is not None else None
    if customer is not None:
        above.append(("customer", customer))
    own = ("virtual_key", key)
    inactive: Wire | None = None if key["is_active"] else {"reason": "key_inactive"}
    configs = key["provider_configs"]
    for config in configs:
        config["blocked"] = inactive or blocking(
            [own, ("provider_config", config), *above]
        )
    blocked = inactive or blocking([own, *above])
    if blocked is None and configs and all(c["blocked"] for c in configs):
        blocked = configs[0]["blocked"]
    key["blocked"] = blocked


def blocking(chain: Sequence[tuple[str, Wire]]) -> Wire | None:
    """What POST /api/governance/check answers for this chain when it blocks (no
    estimate): the first exhausted rate limit in chain order, else the first budget
    with current_usage >= max_limit; None when nothing blocks."""
    for owner_type, owner in chain:
        rate_limit = owner["rate_limit"]
        if rate_limit is None:
            continue
        for kind, prefix in (("tokens", "token"), ("requests", "request")):
            limit = rate_limit[f"{prefix}_max_limit"]
            used = rate_limit[f"{prefix}_current_usage"]
            if limit is not None and used >= limit:
                return {
                    "reason": "rate_limited",
                    "owner_type": owner_type,
                    "owner_id": owner["id"],
                    "rate_limit": kind,
                    "current_usage": Decimal(used),
                    "max_limit": Decimal(limit),
                }
    for owner_type, owner in chain:
        for budget in owner["budgets"]:
            if budget["current_usage"] >= budget["max_limit"]:
                return {
                    "reason": "budget_exceeded",
                    "owner_type": owner_type,
                    "owner_id": owner["id"],
                    "budget_id": budget["id"],
                    "current_usage": budget["current_usage"],
                    "max_limit": budget["max_limit"],
                }
    return None


def earliest_reset(view: Wire) -> datetime | None:
    """The first instant a period in the snapshot ends: its usage changes then."""
    ends: list[datetime] = []
    for _, owner in _owners(view["customers"], view["teams"], view["virtual_keys"]):
        ends.extend(b["next_reset"] for b in owner["budgets"] if b["next_reset"])
        rate_limit = owner["rate_limit"]
        if rate_limit is not None:
            ends.extend(
                end
                for end in (
                    rate_limit["token_next_reset"],
                    rate_limit["request_next_reset"],
                )
                if end is not None
            )
    return min(ends, default=None)
