"""Liveness and readiness."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from msgspec import UNSET

from projections.runner import Projector
from service.web.answers import (
    Health,
    ProjectionFailure,
    Readiness,
    RefusedEvent,
)
from service.web.http import Right, json_response
from service.web.keys import pool_key, readiness_key


async def healthz(request: web.Request) -> web.Response:
    return json_response(Health(status="ok"))


async def readyz(request: web.Request) -> web.Response:
    """200 once every projection here caught up with the head seen at start, or is
    stuck on an event it cannot apply (`degraded`: named with its position and
    error, so a replica still serves checks and ingest, and says what is wrong)."""
    projectors = request.app[readiness_key]
    failing = [
        ProjectionFailure(projection=f.projection, position=f.position, error=f.error)
        for p in projectors.values()
        if (f := p.failure) is not None
    ]
    pending = [
        name for name, p in projectors.items() if not p.ready and p.failure is None
    ]
    refused = _refused(projectors.values())
    if request.app.get(pool_key) is None:
        return json_response(Readiness(status="starting", pending=pending), 503)
    if pending:
        return json_response(
            Readiness(
                status="catching_up",
                pending=pending,
                failing=failing or UNSET,
                refused=refused or UNSET,
            ),
            503,
        )
    if failing:
        return json_response(
            Readiness(status="degraded", failing=failing, refused=refused or UNSET)
        )
    return json_response(Readiness(status="ready", refused=refused or UNSET))


def _refused(projectors: Iterable[Projector]) -> list[RefusedEvent]:
    """The legacy events passed over (every projection passes over the same ones)."""
    seen: dict[int, RefusedEvent] = {}
    for projector in projectors:
        for r in projector.refused:
            seen[r.global_position] = RefusedEvent(
                position=r.global_position,
                event_id=r.event_id,
                stream_id=r.stream_id,
                type=r.type,
                schema_version=r.schema_version,
                code=r.code,
                message=r.message,
            )
    return [seen[p] for p in sorted(seen)]


ROUTES = [
    ("GET", "/healthz", healthz, Right.PUBLIC),
    ("GET", "/readyz", readyz, Right.PUBLIC),
]
