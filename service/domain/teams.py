"""The team aggregate: its state, how events change it, what commands decide."""

from __future__ import annotations

from collections.abc import Iterable
from functools import reduce
from typing import assert_never

import msgspec

from service.domain.budgets import new_budgets
from service.domain.commands import (
    CreateTeam,
    DeleteTeam,
    DetachTeam,
    UpdateTeam,
    checked_name,
    checked_reference,
    id_source,
    rate_limit_after,
    rate_limit_of,
    replaced_budgets,
    settled,
)
from service.domain.events import (
    AnyEvent,
    Budget,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamDeleted,
    TeamEvent,
    TeamUpdated,
)
from service.errors import NotFound, VersionConflict

TeamCommand = CreateTeam | UpdateTeam | DeleteTeam | DetachTeam


class Team(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    customer_id: str | None = None
    budgets: tuple[Budget, ...] = ()
    rate_limit: RateLimit | None = None


def evolve(team: Team | None, event: AnyEvent) -> Team | None:
    """The team after `event`; events of other aggregates leave it as it is."""
    match event:
        case TeamCreated():
            return Team(
                id=event.team_id,
                name=event.name,
                customer_id=event.customer_id,
                budgets=settled(event.budgets),
                rate_limit=event.rate_limit,
            )
        case TeamUpdated() if team is not None:
            return msgspec.structs.replace(
                team,
                name=event.name,
                customer_id=event.customer_id,
                rate_limit=event.rate_limit,
            )
        case TeamBudgetsReplaced() if team is not None:
            return msgspec.structs.replace(team, budgets=settled(event.budgets))
        case TeamDeleted():
            return None
        case _:
            return team


def fold(events: Iterable[AnyEvent]) -> Team | None:
    return reduce(evolve, events, None)


def decide(command: TeamCommand, team: Team | None) -> list[TeamEvent]:
    match command:
        case CreateTeam(team_id=team_id, body=body):
            if team is not None:
                raise VersionConflict(f"team {team_id} already exists")
            return [
                TeamCreated(
                    team_id=team_id,
                    name=checked_name(body.name, "team"),
                    customer_id=checked_reference(
                        body.customer_id, "customer", command.unknown_references
                    ),
                    rate_limit=rate_limit_of(body.rate_limit),
                    budgets=new_budgets(body.budgets, id_source(command.new_ids)),
                )
            ]
        case UpdateTeam(team_id=team_id):
            if team is None:
                raise NotFound(f"team {team_id} does not exist")
            return _updated(team, command)
        case DeleteTeam(team_id=team_id):
            if team is None:
                raise NotFound(f"team {team_id} does not exist")
            return [TeamDeleted(team_id=team_id)]
        case DetachTeam(team_id=team_id, customer_id=customer_id):
            if team is None or team.customer_id != customer_id:
                return []
            return [
                TeamUpdated(
                    team_id=team_id,
                    name=team.name,
                    customer_id=None,
                    rate_limit=team.rate_limit,
                )
            ]
        case _:
            assert_never(command)


def _updated(team: Team, command: UpdateTeam) -> list[TeamEvent]:
    changes = command.changes
    name = team.name
    if not isinstance(changes.name, msgspec.UnsetType):
        name = checked_name(changes.name, "team")
    customer_id = team.customer_id
    if not isinstance(changes.customer_id, msgspec.UnsetType):
        customer_id = checked_reference(
            changes.customer_id, "customer", command.unknown_references
        )
    rate_limit = rate_limit_after(team.rate_limit, changes.rate_limit)
    budgets = replaced_budgets(
        team.budgets, changes.budgets, id_source(command.new_ids)
    )
    events: list[TeamEvent] = []
    if (name, customer_id, rate_limit) != (
        team.name,
        team.customer_id,
        team.rate_limit,
    ):
        events.append(
            TeamUpdated(
                team_id=team.id,
                name=name,
                customer_id=customer_id,
                rate_limit=rate_limit,
            )
        )
    if budgets is not None:
        events.append(TeamBudgetsReplaced(team_id=team.id, budgets=budgets))
    return events
