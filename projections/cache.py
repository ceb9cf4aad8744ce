"""The in-memory enforcement cache: keys, owners, budgets and rate limits folded from
the log, and `check()`, which decides "may this key spend more?" without any I/O.

Pure: no SQL, no clock (`now` is a parameter), no logging. The shell
(`projections.cache_loader`) fills it from the read model and tails the log into
it a batch at a time: usage through `fold_usage()` then `settle()`, which charges
each owner's run of records at once, every other event through `apply()`.

Hot state is kept small and few objects are read per check:
- money is held as integer nanos (9 fractional digits, the precision of the service),
  so the check compares ints and converts to Decimal only for its answer;
- each owner holds its `Ledger` (`service.domain.ledger`, the one fold of budget
  and rate-limit usage, without history): each budget or rate-limit half is a
  `Meter` with the usage of its current period, rolled lazily as the clock passes
  the period's end; holds (reservations) stay here, outside the ledger;
- each owner caches its smallest headroom (max_limit - used), whether a rate limit is
  exhausted, and its earliest period end; each key caches its chain (key, provider
  config, team, customer) and the chain's earliest end, so a check reads two fields
  per owner and looks at single meters only to name the one that blocks.
Entries are `gc=False` Structs, so a full GC pass does not walk the million objects
of a large cache; the one cycle (a key's chain holds the key) is cut on unlink. The
entries, the answers and what one owner or chain decides are in
`projections.cache_entries`; this module keeps the entries by id and folds into them.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import TypeGuard, TypeVar

from projections.cache_entries import (
    ALLOWED,
    KEY_INACTIVE,
    MODEL_NOT_ALLOWED,
    PROVIDER_NOT_ALLOWED,
    UNKNOWN_KEY,
    UNLIMITED,
    CheckResult,
    Customer,
    Hold,
    Holder,
    Owner,
    Team,
    VirtualKey,
    advance_chain,
    aggregate,
    allowed_answer,
    budget_exceeded,
    chain_ids,
    config_for,
    halves,
    provider_configs,
    rate_limited,
    replace_budgets,
    replace_rate_limit,
    unlink,
)
from service.domain import ledger as fold
from service.domain.events import (
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerEvent,
    CustomerUpdated,
    ReservationHeld,
    ReservationReleased,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamEvent,
    TeamUpdated,
    UsageCharge,
    UsageRecorded,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
    VirtualKeyEvent,
    VirtualKeyUpdated,
)
from service.domain.ledger import (
    Charge,
    open_ledger,
    to_money,
    to_nanos,
)
from service.domain.usage import UsageChain
from service.records import Checkpoint, RecordedEvent

# (occurred_at, cost in nanos, tokens, requests, recorded_at): ledger.charge_all's


def _add(
    run: dict[int, tuple[Owner, list[Charge]]], owner: Owner, charge: Charge
) -> None:
    entry = run.get(id(owner))
    if entry is None:
        run[id(owner)] = (owner, [charge])
    else:
        entry[1].append(charge)


_O = TypeVar("_O", bound=Owner)


# --- the cache ---------------------------------------------------------------------


class GovernanceCache:
    """Every customer, team and key with their limits; `apply` folds one event in."""

    def __init__(self) -> None:
        self.customers: dict[str, Customer] = {}
        self.teams: dict[str, Team] = {}
        self.keys: dict[str, VirtualKey] = {}
        self.keys_by_sha256: dict[str, VirtualKey] = {}
        # Streams of deleted entities: a redelivered *Created must not revive them.
        self.deleted: set[str] = set()
        # Per usage stream (by key id), the (tx_id, position) of its last applied
        # event as one int: the tail delivers in that order, not by position.
        self.usage_seen: dict[str, int] = {}
        self.checkpoint = Checkpoint()
        # The highest position applied. The tail applies in commit order, (tx_id,
        # position), not by position: the checkpoint's own position can be below one
        # applied before it (an event drawn later, committed in an earlier
        # transaction), so answers report this one, never below a position that a
        # wait for `min_position` found applied.
        self.high_water = 0
        # Usage folded but not yet charged (see fold_usage): by owner (its id()),
        # the owner and its charges in order.
        self._run: dict[int, tuple[Owner, list[Charge]]] = {}
        # Keys cache their chain and its earliest period end. Any change to a team or
        # customer (membership, limits, deletion) bumps this, so each key resolves
        # its chain again at its next check; a key's own changes relink just it.
        self.generation = 0
        # Team and customer ids a key named but that did not exist when it linked.
        self.awaited: set[str] = set()
        # Open holds by reservation id, and (expires_at, id) in a heap: a check
        # drops what expired by its `now` first (expiry needs no job).
        self.holds: dict[str, Hold] = {}
        self._expiring: list[tuple[datetime, str]] = []
        # Reservations settled, released or expired (until their expiry passes): a
        # ReservationHeld applied late must not hold them again.
        self._closed: dict[str, datetime] = {}

    @property
    def position(self) -> int:
        """The position answers are as of: the highest applied (`high_water`)."""
        return self.high_water

    # --- apply -----------------------------------------------------------------

    def apply(self, record: RecordedEvent) -> None:
        """Fold one recorded event in; a redelivered event changes nothing."""
        event = record.event
        if isinstance(event, UsageRecorded):
            self.fold_usage(
                event, record.tx_id, record.global_position, record.recorded_at
            )
            self.settle()
            self.checkpoint = record.checkpoint
            return
        self.settle()  # usage folded before this event is charged before it
        if record.global_position > self.high_water:
            self.high_water = record.global_position
        if isinstance(event, ReservationHeld | ReservationReleased):
            self._apply_reservation(record, event)
        elif isinstance(event, CustomerEvent):
            self._apply_customer(record, event)
        elif isinstance(event, TeamEvent):
            self._apply_team(record, event)
        else:
            self._apply_key(record, event)
        self.checkpoint = record.checkpoint

    def _apply_customer(self, record: RecordedEvent, event: CustomerEvent) -> None:
        at = record.recorded_at
        customer = self.customers.get(event.customer_id)
        if isinstance(event, CustomerCreated):
            if self._is_new(customer, record):
                customer = Customer(id=event.customer_id, ledger=open_ledger(at))
                self._created(self.customers, customer, record)
                replace_budgets(customer, event.budgets, at)
                replace_rate_limit(customer, event.rate_limit, at)
            return
        if not self._is_next(customer, record):
            return
        if isinstance(event, CustomerUpdated):
            replace_rate_limit(customer, event.rate_limit, at)
        elif isinstance(event, CustomerBudgetsReplaced):
            replace_budgets(customer, event.budgets, at)
        else:
            del self.customers[customer.id]
            self.deleted.add(record.stream_id)
        self.generation += 1  # keys under it link again

    def _apply_team(self, record: RecordedEvent, event: TeamEvent) -> None:
        at = record.recorded_at
        team = self.teams.get(event.team_id)
        if isinstance(event, TeamCreated):
            if self._is_new(team, record):
                team = Team(
                    id=event.team_id,
                    customer_id=event.customer_id,
                    ledger=open_ledger(at),
                )
                self._created(self.teams, team, record)
                replace_budgets(team, event.budgets, at)
                replace_rate_limit(team, event.rate_limit, at)
            return
        if not self._is_next(team, record):
            return
        if isinstance(event, TeamUpdated):
            team.customer_id = event.customer_id
            replace_rate_limit(team, event.rate_limit, at)
        elif isinstance(event, TeamBudgetsReplaced):
            replace_budgets(team, event.budgets, at)
        else:
            del self.teams[team.id]
            self.deleted.add(record.stream_id)
        self.generation += 1  # keys under it link again

    def _apply_key(self, record: RecordedEvent, event: VirtualKeyEvent) -> None:
        at = record.recorded_at
        key = self.keys.get(event.virtual_key_id)
        if isinstance(event, VirtualKeyCreated):
            if self._is_new(key, record):
                key = VirtualKey(
                    id=event.virtual_key_id,
                    value_sha256=event.value_sha256,
                    is_active=event.is_active,
                    team_id=event.team_id,
                    customer_id=event.customer_id,
                    providers=provider_configs(None, event.provider_configs, at),
                    ledger=open_ledger(at),
                )
                self._created(self.keys, key, record)
                self.keys_by_sha256[key.value_sha256] = key
                replace_budgets(key, event.budgets, at)
                replace_rate_limit(key, event.rate_limit, at)
        elif not self._is_next(key, record):
            return
        elif isinstance(event, VirtualKeyUpdated):
            self._update_key(key, event, at)
        elif isinstance(event, VirtualKeyBudgetsReplaced):
            replace_budgets(key, event.budgets, at)
            unlink(key)
        else:
            del self.keys[key.id]
            if self.keys_by_sha256.get(key.value_sha256) is key:
                del self.keys_by_sha256[key.value_sha256]
            self.deleted.add(record.stream_id)
            unlink(key)
            for hold in [h for h in self.holds.values() if h.virtual_key_id == key.id]:
                self._drop(hold)

    def restore(
        self,
        *,
        customers: Iterable[Customer],
        teams: Iterable[Team],
        keys: Iterable[VirtualKey],
        checkpoint: Checkpoint,
        high_water: int = 0,
    ) -> None:
        """Take owners rebuilt from the read model (ledgers from
        `service.domain.ledger.restore`), as of `checkpoint`; `high_water`: the
        highest position at or before it (in commit order), if above its own."""
        for customer in customers:
            aggregate(customer)
            self.customers[customer.id] = customer
        for team in teams:
            aggregate(team)
            self.teams[team.id] = team
        for key in keys:
            aggregate(key)
            for config in key.providers or ():
                config.provider = sys.intern(config.provider)
                if config.models is not None:
                    config.models = frozenset(sys.intern(m) for m in config.models)
                aggregate(config)
            self.keys[key.id] = key
            self.keys_by_sha256[key.value_sha256] = key
        self.generation += 1
        self.checkpoint = checkpoint
        self.high_water = max(self.high_water, checkpoint.position, high_water)

    def _is_new(self, existing: Owner | None, record: RecordedEvent) -> bool:
        return existing is None and record.stream_id not in self.deleted

    @staticmethod
    def _is_next(owner: _O | None, record: RecordedEvent) -> TypeGuard[_O]:
        """Whether `owner` exists and `record` is newer than its last event."""
        if owner is None or record.stream_version <= owner.version:
            return False
        owner.version = record.stream_version
        return True

    def _created(self, owners: dict[str, _O], owner: _O, record: RecordedEvent) -> None:
        owner.version = record.stream_version
        owners[owner.id] = owner
        if owner.id in self.awaited:
            self.awaited.discard(owner.id)
            self.generation += 1

    def _update_key(
        self, key: VirtualKey, event: VirtualKeyUpdated, at: datetime
    ) -> None:
        if key.value_sha256 != event.value_sha256:
            if self.keys_by_sha256.get(key.value_sha256) is key:
                del self.keys_by_sha256[key.value_sha256]
            key.value_sha256 = event.value_sha256
            self.keys_by_sha256[key.value_sha256] = key
        key.is_active = event.is_active
        key.team_id = event.team_id
        key.customer_id = event.customer_id
        unlink(key)
        key.providers = provider_configs(key.providers, event.provider_configs, at)
        replace_rate_limit(key, event.rate_limit, at)

    def fold_usage(
        self,
        usage: UsageRecorded | UsageCharge,
        tx_id: int,
        position: int,
        recorded_at: datetime,
    ) -> None:
        """Fold in the usage event at (tx_id, position), recorded at `recorded_at`
        (a redelivered one changes nothing). Its charges are made at the next
        `settle()` (`apply` of an event of another kind settles first): the caller
        settles before anything reads the cache."""
        key = self.keys.get(usage.virtual_key_id)
        stream = usage.virtual_key_id
        seen = (tx_id << 64) | position
        usage_seen = self.usage_seen
        if seen <= usage_seen.get(stream, -1):
            return
        usage_seen[stream] = seen
        if position > self.high_water:
            self.high_water = position
        charge = fold.charge_of(usage, recorded_at)
        run = self._run
        if key is not None:
            _add(run, key, charge)
            config_id = usage.provider_config_id
            if config_id is not None and key.providers:
                for config in key.providers:
                    if config.id == config_id:
                        _add(run, config, charge)
        if usage.team_id is not None:
            team = self.teams.get(usage.team_id)
            if team is not None:
                _add(run, team, charge)
        if usage.customer_id is not None:
            customer = self.customers.get(usage.customer_id)
            if customer is not None:
                _add(run, customer, charge)
        if usage.reservation_id is not None:
            hold = self.holds.get(usage.reservation_id)
            if hold is not None and hold.virtual_key_id == usage.virtual_key_id:
                self._drop(hold)

    def settle(self) -> None:
        """Charge the usage folded since the last settle, each owner's records in
        order through `ledger.charge_all` (as one by one, with records that only
        add to the cells last filed to summed), then refresh each owner's
        aggregates once."""
        run = self._run
        if not run:
            return
        self._run = {}  # taken whole: a failure below never charges twice
        for owner, charges in run.values():
            fold.charge_all(owner.ledger, charges)
            aggregate(owner)

    def reserve(
        self,
        *,
        virtual_key_sha256: str | None,
        virtual_key_id: str | None,
        provider: str | None,
        model: str | None,
        estimated_cost: Decimal,
        estimated_tokens: int,
        reservation_id: str,
        expires_at: datetime,
        now: datetime,
    ) -> tuple[CheckResult, ReservationHeld | None]:
        return _reserve(
            self,
            virtual_key_sha256=virtual_key_sha256,
            virtual_key_id=virtual_key_id,
            provider=provider,
            model=model,
            estimated_cost=estimated_cost,
            estimated_tokens=estimated_tokens,
            reservation_id=reservation_id,
            expires_at=expires_at,
            now=now,
        )

    def _apply_reservation(
        self, record: RecordedEvent, event: ReservationHeld | ReservationReleased
    ) -> None:
        seen = (record.tx_id << 64) | record.global_position
        if seen <= self.usage_seen.get(event.virtual_key_id, -1):
            return
        self.usage_seen[event.virtual_key_id] = seen
        if isinstance(event, ReservationHeld):
            self.hold(event)
        else:
            self.release(event.reservation_id, event.virtual_key_id)

    # --- holds -----------------------------------------------------------------

    def hold(self, event: ReservationHeld) -> Hold | None:
        """Hold `event.amount` on its budgets and a request plus its tokens on its
        rate owners (those that still exist); nothing for a closed or held one."""
        if event.reservation_id in self.holds or event.reservation_id in self._closed:
            return None
        key = self.keys.get(event.virtual_key_id)
        owners: list[Owner] = [] if key is None else [key]
        if key is not None and event.provider_config_id is not None:
            owners += [
                c for c in key.providers or () if c.id == event.provider_config_id
            ]
        team = None if event.team_id is None else self.teams.get(event.team_id)
        customer = (
            None if event.customer_id is None else self.customers.get(event.customer_id)
        )
        owners += [o for o in (team, customer) if o is not None]
        wanted = set(event.budget_ids)
        rate_ids = set(event.rate_owner_ids)
        hold = Hold(
            reservation_id=event.reservation_id,
            virtual_key_id=event.virtual_key_id,
            budgets=[
                (o, m.id) for o in owners for m in o.ledger.budgets if m.id in wanted
            ],
            rate_owners=[o for o in owners if o.id in rate_ids],
            amount=to_nanos(event.amount),
            tokens=event.tokens,
            expires_at=event.expires_at,
        )
        for owner, budget_id in hold.budgets:
            held = owner.held if owner.held is not None else {}
            held[budget_id] = held.get(budget_id, 0) + hold.amount
            owner.held = held
        for owner in hold.rate_owners:
            owner.held_tokens += hold.tokens
            owner.held_requests += 1
        for owner in owners:
            aggregate(owner)
        self.holds[hold.reservation_id] = hold
        heapq.heappush(self._expiring, (hold.expires_at, hold.reservation_id))
        return hold

    def release(self, reservation_id: str, virtual_key_id: str) -> bool:
        """Drop an open hold of this key; False when there was none."""
        hold = self.holds.get(reservation_id)
        if hold is None or hold.virtual_key_id != virtual_key_id:
            return False
        self._drop(hold)
        return True

    def _drop(self, hold: Hold) -> None:
        del self.holds[hold.reservation_id]
        self._closed[hold.reservation_id] = hold.expires_at
        touched: dict[int, Owner] = {}
        for owner, budget_id in hold.budgets:
            if owner.held is not None:
                left = owner.held.get(budget_id, 0) - hold.amount
                if left > 0:
                    owner.held[budget_id] = left
                else:
                    owner.held.pop(budget_id, None)
            touched[id(owner)] = owner
        for owner in hold.rate_owners:
            owner.held_tokens -= hold.tokens
            owner.held_requests -= 1
            touched[id(owner)] = owner
        for owner in touched.values():
            aggregate(owner)

    def expire(self, now: datetime) -> None:
        """Drop every hold whose `expires_at` is not after `now`."""
        expiring = self._expiring
        while expiring and expiring[0][0] <= now:
            at, reservation_id = heapq.heappop(expiring)
            hold = self.holds.get(reservation_id)
            if hold is not None and hold.expires_at == at:
                self._drop(hold)
            if self._closed.get(reservation_id) == at:
                del self._closed[reservation_id]

    # --- read ------------------------------------------------------------------

    def _link(self, key: VirtualKey) -> None:
        """Resolve the key's chain: its team and the team's customer, else its own
        customer (a dangling reference counts as none)."""
        team: Team | None = None
        customer: Customer | None = None
        customer_id = key.customer_id
        if key.team_id is not None:
            team = self.teams.get(key.team_id)
            if team is None:
                self.awaited.add(key.team_id)
            customer_id = None if team is None else team.customer_id
        if customer_id is not None:
            customer = self.customers.get(customer_id)
            if customer is None:
                self.awaited.add(customer_id)
        above = tuple(owner for owner in (team, customer) if owner is not None)
        key.chain = (key, *above)
        key.chain_end = min(owner.next_end for owner in key.chain)
        key.charged = None
        for config in key.providers or ():
            config.chain = (key, config, *above)
            config.chain_end = min(owner.next_end for owner in config.chain)
            config.charged = None
        key.linked = self.generation

    def _key(
        self, virtual_key_sha256: str | None, virtual_key_id: str | None
    ) -> VirtualKey | None:
        if virtual_key_sha256 is not None:
            return self.keys_by_sha256.get(virtual_key_sha256)
        if virtual_key_id is not None:
            return self.keys.get(virtual_key_id)
        return None

    def resolve_usage(
        self,
        *,
        virtual_key_sha256: str | None,
        virtual_key_id: str | None,
        provider: str | None,
    ) -> UsageChain | None:
        """The owners a usage record is charged to now; None for an unknown key."""
        key = self._key(virtual_key_sha256, virtual_key_id)
        if key is None:
            return None
        if key.linked != self.generation:
            self._link(key)
        holder: Holder = key
        if key.providers is not None and provider is not None:
            holder = config_for(key.providers, provider) or key
        charged = holder.charged
        if charged is None:
            charged = holder.charged = chain_ids(holder.chain)
        return charged

    def check(
        self,
        *,
        virtual_key_sha256: str | None,
        virtual_key_id: str | None,
        provider: str | None,
        model: str | None,
        estimated_cost: Decimal | None,
        now: datetime,
    ) -> CheckResult:
        """Walk the chain: key, provider and model, rate limits, then budgets.

        `now` must be timezone-aware UTC and not run behind the clock readings
        already applied (periods only roll forward). `estimated_cost` must be ≥ 0.
        An allowed answer's `remaining` is the smallest `max_limit - current_usage`
        in the chain, before the estimate.
        """
        if self._expiring and self._expiring[0][0] <= now:
            self.expire(now)
        if virtual_key_sha256 is not None:
            key = self.keys_by_sha256.get(virtual_key_sha256)
        else:
            key = self._key(None, virtual_key_id)
        if key is None:
            return UNKNOWN_KEY
        if not key.is_active:
            return KEY_INACTIVE
        if key.linked != self.generation:
            self._link(key)
        holder: Holder = key
        providers = key.providers
        if providers is not None:
            for config in providers:
                if config.provider == provider:
                    break
            else:
                return PROVIDER_NOT_ALLOWED
            models = config.models
            if models is not None and model not in models:
                return MODEL_NOT_ALLOWED
            holder = config
        # A period ends in the chain: roll it. Ends only move later, except when
        # limits change, and that relinks (see `generation`).
        if now >= holder.chain_end:
            advance_chain(holder, now)
        chain = holder.chain
        # One pass: every rate limit in the chain comes before any budget, and an
        # owner is over budget exactly when the chain's smallest headroom is.
        remaining = UNLIMITED
        least: Owner | None = None
        for owner in chain:
            if owner.rate_blocked:
                return rate_limited(owner)
            left = owner.left
            if left < remaining:
                remaining = left
                least = owner
        if least is None:
            return ALLOWED
        if remaining <= 0:
            return budget_exceeded(chain, estimated_cost)
        answer = least.allowed
        if answer is None:
            answer = allowed_answer(least)
        if estimated_cost is not None and estimated_cost > least.left_money:
            return budget_exceeded(chain, estimated_cost)
        return answer


def _reserve(
    cache: GovernanceCache,
    *,
    virtual_key_sha256: str | None,
    virtual_key_id: str | None,
    provider: str | None,
    model: str | None,
    estimated_cost: Decimal,
    estimated_tokens: int,
    reservation_id: str,
    expires_at: datetime,
    now: datetime,
) -> tuple[CheckResult, ReservationHeld | None]:
    """A check that, when allowed, holds the estimate at once (synchronously: the
    next check already sees it). Returns the decision, its `remaining` counted after
    the hold, and the hold's event to append (None when nothing is held)."""
    result = cache.check(
        virtual_key_sha256=virtual_key_sha256,
        virtual_key_id=virtual_key_id,
        provider=provider,
        model=model,
        estimated_cost=estimated_cost,
        now=now,
    )
    if not result.allowed:
        return result, None
    key = cache._key(virtual_key_sha256, virtual_key_id)
    assert key is not None  # the check found it
    holder: Holder = key
    if key.providers is not None:
        holder = config_for(key.providers, provider or "") or key
    chain = holder.chain
    ids = chain_ids(chain)
    event = ReservationHeld(
        reservation_id=reservation_id,
        virtual_key_id=ids.virtual_key_id,
        provider_config_id=ids.provider_config_id,
        team_id=ids.team_id,
        customer_id=ids.customer_id,
        budget_ids=tuple(m.id for owner in chain for m in owner.ledger.budgets),
        rate_owner_ids=tuple(owner.id for owner in chain if halves(owner.ledger)),
        amount=estimated_cost,
        tokens=estimated_tokens,
        expires_at=expires_at,
    )
    if cache.hold(event) is None:  # already held (a retry): nothing more
        return result, None
    left = min(owner.left for owner in chain)
    remaining = None if left == UNLIMITED else to_money(left)
    return (
        CheckResult(allowed=True, reason="ok", http_status=200, remaining=remaining),
        event,
    )
