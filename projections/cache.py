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
of a large cache; the one cycle (a key's chain holds the key) is cut on unlink.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import ClassVar, Literal, TypeGuard, TypeVar

import msgspec

from projections.governance_views import OwnerType
from service.domain import ledger as fold
from service.domain.events import (
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    CustomerEvent,
    CustomerUpdated,
    ProviderConfig,
    RateLimit,
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
    TOKENS,
    Charge,
    Ledger,
    Meter,
    open_ledger,
    to_money,
    to_nanos,
)
from service.domain.usage import UsageChain
from service.records import Checkpoint, RecordedEvent

# Headroom of an owner without budgets (or rate limits): larger than any limit.
UNLIMITED = 1 << 127
FOREVER = datetime.max.replace(tzinfo=UTC)
_HUGE = Decimal(10) ** 19


# --- state -------------------------------------------------------------------------


CheckReason = Literal[
    "ok",
    "unknown_virtual_key",
    "key_inactive",
    "provider_not_allowed",
    "model_not_allowed",
    "rate_limited",
    "budget_exceeded",
]
CheckStatus = Literal[200, 401, 402, 403, 429]
RateHalf = Literal["tokens", "requests"]


class CheckResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The decision of a check, as API.md words it (the route answers it with the
    cache's position: `service.web.answers.CheckAnswer`).

    A blocked answer names the budget or rate limit that blocks; for a rate limit
    `budget_id` is absent and `rate_limit` says which half ("tokens" or "requests"),
    with `current_usage` and `max_limit` in tokens or requests.
    """

    allowed: bool
    reason: CheckReason
    http_status: CheckStatus
    budget_id: str | None = None
    owner_type: OwnerType | None = None
    owner_id: str | None = None
    current_usage: Decimal | None = None
    max_limit: Decimal | None = None
    remaining: Decimal | None = None
    rate_limit: RateHalf | None = None


ALLOWED = CheckResult(allowed=True, reason="ok", http_status=200)
UNKNOWN_KEY = CheckResult(allowed=False, reason="unknown_virtual_key", http_status=401)
KEY_INACTIVE = CheckResult(allowed=False, reason="key_inactive", http_status=403)
PROVIDER_NOT_ALLOWED = CheckResult(
    allowed=False, reason="provider_not_allowed", http_status=403
)
MODEL_NOT_ALLOWED = CheckResult(
    allowed=False, reason="model_not_allowed", http_status=403
)


class Owner(msgspec.Struct, gc=False, kw_only=True):
    """Anything that owns budgets and a rate limit, with its cached aggregates
    (the fields a check reads come first: they share the first cache lines)."""

    owner_type: ClassVar[OwnerType]
    left: int = UNLIMITED  # smallest max_limit - used over the budgets, in nanos
    rate_blocked: bool = False  # a rate meter has used >= limit
    # The allowed answer naming `left` as remaining and that amount as a Decimal,
    # made when a check first needs them.
    allowed: CheckResult | None = None
    left_money: Decimal = Decimal(0)
    next_end: datetime = FOREVER  # earliest end of a current period
    id: str
    version: int = 0
    ledger: Ledger  # its budgets and rate-limit halves, folded
    # Open holds (reservations) on this owner: nanos by budget id, and the tokens
    # and requests held against its rate limit.
    held: dict[str, int] | None = None
    held_tokens: int = 0
    held_requests: int = 0


_O = TypeVar("_O", bound=Owner)


class Hold(msgspec.Struct, gc=False, kw_only=True):
    """An open reservation: what it holds on which owners, until `expires_at`."""

    reservation_id: str
    virtual_key_id: str
    budgets: list[tuple[Owner, str]]  # (owner, budget id) it holds `amount` on
    rate_owners: list[Owner]  # owners whose rate limit it holds tokens + 1 on
    amount: int
    tokens: int
    expires_at: datetime


class Customer(Owner, gc=False, kw_only=True):
    owner_type: ClassVar[OwnerType] = "customer"


class Team(Owner, gc=False, kw_only=True):
    owner_type: ClassVar[OwnerType] = "team"
    customer_id: str | None = None


class ProviderConfigState(Owner, gc=False, kw_only=True):
    """A key's provider config; it holds the chain checks of that provider walk."""

    owner_type: ClassVar[OwnerType] = "provider_config"
    models: frozenset[str] | None = None  # None: every model
    chain: tuple[Owner, ...] = ()  # key, this config, team, customer (those that exist)
    chain_end: datetime = FOREVER  # the earliest next_end in `chain`
    charged: UsageChain | None = None  # `chain` as ingest names it, made on demand
    provider: str


class VirtualKey(Owner, gc=False, kw_only=True):
    """A key; it holds the chain of checks without a provider config."""

    owner_type: ClassVar[OwnerType] = "virtual_key"
    # None: any provider. A tuple, scanned: a key has few configs, and the scan
    # reads the configs (needed anyway) instead of a dict's table besides.
    providers: tuple[ProviderConfigState, ...] | None = None
    is_active: bool = True
    linked: int = -1  # the cache generation `chain` (and its configs') resolved in
    chain: tuple[Owner, ...] = ()  # key, team, customer (those that exist)
    chain_end: datetime = FOREVER  # the earliest next_end in `chain`
    charged: UsageChain | None = None  # `chain` as ingest names it, made on demand
    value_sha256: str
    team_id: str | None = None
    customer_id: str | None = None


Holder = VirtualKey | ProviderConfigState


# --- owners ------------------------------------------------------------------------


def _aggregate(owner: Owner) -> None:
    left = UNLIMITED
    next_end = FOREVER
    held = owner.held
    ledger = owner.ledger
    for meter in ledger.budgets:
        headroom = meter.limit - meter.used
        if held:
            headroom -= held.get(meter.id, 0)
        if headroom < left:
            left = headroom
        if meter.end < next_end:
            next_end = meter.end
    rate_blocked = False
    for meter in _halves(ledger):
        if meter.used + _rate_held(owner, meter) >= meter.limit:
            rate_blocked = True
        if meter.end < next_end:
            next_end = meter.end
    owner.left, owner.rate_blocked, owner.next_end = left, rate_blocked, next_end
    owner.allowed = None


def _halves(ledger: Ledger) -> tuple[Meter, ...]:
    """The rate limit's halves that are set: tokens first, then requests."""
    tokens, requests = ledger.tokens, ledger.requests
    if tokens is None:
        return () if requests is None else (requests,)
    return (tokens,) if requests is None else (tokens, requests)


def _rate_held(owner: Owner, meter: Meter) -> int:
    return owner.held_tokens if meter.kind == TOKENS else owner.held_requests


def _budget_held(owner: Owner, meter: Meter) -> int:
    return owner.held.get(meter.id, 0) if owner.held else 0


def _allowed(owner: Owner) -> CheckResult:
    """The allowed answer whose `remaining` is this owner's headroom."""
    money = owner.left_money = to_money(owner.left)
    answer = owner.allowed = CheckResult(
        allowed=True, reason="ok", http_status=200, remaining=money
    )
    return answer


def _advance(owner: Owner, now: datetime) -> None:
    """Roll every meter whose period ended by `now`, then refresh the aggregates."""
    fold.advance(owner.ledger, now)
    _aggregate(owner)


def _advance_chain(holder: Holder, now: datetime) -> None:
    """Roll what ended by `now` in the holder's chain; note the chain's next end."""
    chain_end = FOREVER
    for owner in holder.chain:
        if now >= owner.next_end:
            _advance(owner, now)
        if owner.next_end < chain_end:
            chain_end = owner.next_end
    holder.chain_end = chain_end


def _unlink(key: VirtualKey) -> None:
    """Drop the key's chains: they hold the key and its configs themselves, a cycle
    the GC would never see (the entries are gc=False); the next check relinks."""
    key.chain = ()
    for config in key.providers or ():
        config.chain = ()
    key.linked = -1


def _replace_budgets(owner: Owner, budgets: tuple[Budget, ...], at: datetime) -> None:
    fold.define_budgets(owner.ledger, budgets, at)
    _aggregate(owner)


def _replace_rate_limit(
    owner: Owner, rate_limit: RateLimit | None, at: datetime
) -> None:
    fold.define_rate_limit(owner.ledger, rate_limit, at)
    _aggregate(owner)


# (occurred_at, cost in nanos, tokens, requests, recorded_at): ledger.charge_all's


def _add(
    run: dict[int, tuple[Owner, list[Charge]]], owner: Owner, charge: Charge
) -> None:
    entry = run.get(id(owner))
    if entry is None:
        run[id(owner)] = (owner, [charge])
    else:
        entry[1].append(charge)


def _provider_configs(
    current: tuple[ProviderConfigState, ...] | None,
    configs: tuple[ProviderConfig, ...],
    at: datetime,
) -> tuple[ProviderConfigState, ...] | None:
    """A key's provider configs after an event carrying the whole set (by id).

    Provider and model names are interned: every key shares one string per name,
    which stays in the CPU cache when a check compares it.
    """
    by_id = {pc.id: pc for pc in current} if current else {}
    result = []
    for config in configs:
        provider = sys.intern(config.provider)
        models = config.allowed_models
        state = by_id.get(config.provider_config_id)
        if state is None:
            state = ProviderConfigState(
                id=config.provider_config_id, provider=provider, ledger=open_ledger(at)
            )
        state.provider = provider
        state.models = (
            None
            if models is None or "*" in models
            else frozenset(sys.intern(model) for model in models)
        )
        fold.define_budgets(state.ledger, config.budgets, at)
        _replace_rate_limit(state, config.rate_limit, at)
        result.append(state)
    return tuple(result) or None


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
        return self.checkpoint.position

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
                _replace_budgets(customer, event.budgets, at)
                _replace_rate_limit(customer, event.rate_limit, at)
            return
        if not self._is_next(customer, record):
            return
        if isinstance(event, CustomerUpdated):
            _replace_rate_limit(customer, event.rate_limit, at)
        elif isinstance(event, CustomerBudgetsReplaced):
            _replace_budgets(customer, event.budgets, at)
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
                _replace_budgets(team, event.budgets, at)
                _replace_rate_limit(team, event.rate_limit, at)
            return
        if not self._is_next(team, record):
            return
        if isinstance(event, TeamUpdated):
            team.customer_id = event.customer_id
            _replace_rate_limit(team, event.rate_limit, at)
        elif isinstance(event, TeamBudgetsReplaced):
            _replace_budgets(team, event.budgets, at)
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
                    providers=_provider_configs(None, event.provider_configs, at),
                    ledger=open_ledger(at),
                )
                self._created(self.keys, key, record)
                self.keys_by_sha256[key.value_sha256] = key
                _replace_budgets(key, event.budgets, at)
                _replace_rate_limit(key, event.rate_limit, at)
        elif not self._is_next(key, record):
            return
        elif isinstance(event, VirtualKeyUpdated):
            self._update_key(key, event, at)
        elif isinstance(event, VirtualKeyBudgetsReplaced):
            _replace_budgets(key, event.budgets, at)
            _unlink(key)
        else:
            del self.keys[key.id]
            if self.keys_by_sha256.get(key.value_sha256) is key:
                del self.keys_by_sha256[key.value_sha256]
            self.deleted.add(record.stream_id)
            _unlink(key)
            for hold in [h for h in self.holds.values() if h.virtual_key_id == key.id]:
                self._drop(hold)

    def restore(
        self,
        *,
        customers: Iterable[Customer],
        teams: Iterable[Team],
        keys: Iterable[VirtualKey],
        checkpoint: Checkpoint,
    ) -> None:
        """Take owners rebuilt from the read model (ledgers from
        `service.domain.ledger.restore`), as of `checkpoint`."""
        for customer in customers:
            _aggregate(customer)
            self.customers[customer.id] = customer
        for team in teams:
            _aggregate(team)
            self.teams[team.id] = team
        for key in keys:
            _aggregate(key)
            for config in key.providers or ():
                config.provider = sys.intern(config.provider)
                if config.models is not None:
                    config.models = frozenset(sys.intern(m) for m in config.models)
                _aggregate(config)
            self.keys[key.id] = key
            self.keys_by_sha256[key.value_sha256] = key
        self.generation += 1
        self.checkpoint = checkpoint

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
        _unlink(key)
        key.providers = _provider_configs(key.providers, event.provider_configs, at)
        _replace_rate_limit(key, event.rate_limit, at)

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
            _aggregate(owner)

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
            _aggregate(owner)
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
            _aggregate(owner)

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
            holder = _config(key.providers, provider) or key
        charged = holder.charged
        if charged is None:
            charged = holder.charged = _charged(holder.chain)
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
            _advance_chain(holder, now)
        chain = holder.chain
        # One pass: every rate limit in the chain comes before any budget, and an
        # owner is over budget exactly when the chain's smallest headroom is.
        remaining = UNLIMITED
        least: Owner | None = None
        for owner in chain:
            if owner.rate_blocked:
                return _rate_limited(owner)
            left = owner.left
            if left < remaining:
                remaining = left
                least = owner
        if least is None:
            return ALLOWED
        if remaining <= 0:
            return _budget_exceeded(chain, estimated_cost)
        answer = least.allowed
        if answer is None:
            answer = _allowed(least)
        if estimated_cost is not None and estimated_cost > least.left_money:
            return _budget_exceeded(chain, estimated_cost)
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
        holder = _config(key.providers, provider or "") or key
    chain = holder.chain
    ids = _charged(chain)
    event = ReservationHeld(
        reservation_id=reservation_id,
        virtual_key_id=ids.virtual_key_id,
        provider_config_id=ids.provider_config_id,
        team_id=ids.team_id,
        customer_id=ids.customer_id,
        budget_ids=tuple(m.id for owner in chain for m in owner.ledger.budgets),
        rate_owner_ids=tuple(owner.id for owner in chain if _halves(owner.ledger)),
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


def _charged(chain: tuple[Owner, ...]) -> UsageChain:
    ids = {type(owner): owner.id for owner in chain}
    return UsageChain(
        virtual_key_id=ids[VirtualKey],
        provider_config_id=ids.get(ProviderConfigState),
        team_id=ids.get(Team),
        customer_id=ids.get(Customer),
    )


def _config(
    providers: tuple[ProviderConfigState, ...], provider: str
) -> ProviderConfigState | None:
    for config in providers:
        if config.provider == provider:
            return config
    return None


def _rate_limited(owner: Owner) -> CheckResult:
    meter = next(
        m for m in _halves(owner.ledger) if m.used + _rate_held(owner, m) >= m.limit
    )
    return CheckResult(
        allowed=False,
        reason="rate_limited",
        http_status=429,
        owner_type=owner.owner_type,
        owner_id=owner.id,
        current_usage=Decimal(meter.used),
        max_limit=Decimal(meter.limit),
        rate_limit="tokens" if meter.kind == TOKENS else "requests",
    )


def _budget_exceeded(
    chain: tuple[Owner, ...], estimated_cost: Decimal | None
) -> CheckResult:
    """The answer naming the first budget in chain order that blocks."""
    # Above every limit (< 10^18) the exact size of an estimate no longer matters.
    estimate = 0 if estimated_cost is None else to_nanos(min(estimated_cost, _HUGE))
    owner, meter = next(
        (owner, meter)
        for owner in chain
        for meter in owner.ledger.budgets
        if (held := meter.used + _budget_held(owner, meter)) >= meter.limit
        or estimate > meter.limit - held
    )
    return CheckResult(
        allowed=False,
        reason="budget_exceeded",
        http_status=402,
        budget_id=meter.id,
        owner_type=owner.owner_type,
        owner_id=owner.id,
        current_usage=to_money(meter.used),
        max_limit=to_money(meter.limit),
    )
