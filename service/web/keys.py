"""Every AppKey of the application: the shared objects the composition root
(`service.web.app`) creates and the handlers read."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

from projections.cache import GovernanceCache
from projections.governance_readings import Remembered
from projections.runner import Projector, Tail
from service.config import Settings
from service.domain.usage import KeyResolver
from service.ingest import Writer
from service.web.prepared import Outbox

if TYPE_CHECKING:
    from service.web.http import Right

settings_key = web.AppKey("settings", Settings)
pool_key = web.AppKey("pool", asyncpg.Pool)
# Every projector of this process by name: /readyz asks each whether it caught up
# with the head seen at start, or is stuck on an event it cannot apply.
readiness_key = web.AppKey("readiness", dict[str, Projector])
# The SQL read model's projector: GET handlers wait on it for ?min_position=.
governance_projector_key = web.AppKey("governance_projector", Projector)
# What the last read of each owner's budgets asked the read model for, so that the
# next one reads in one statement (`projections.governance_readings.read_owner`).
readings_key = web.AppKey("remembered_readings", Remembered)
# The process's LISTEN connection and projector tasks; tail.start(projector) adds one.
tail_key = web.AppKey("tail", Tail)
# The in-memory enforcement cache (checks) and the projector that keeps it current.
cache_key = web.AppKey("cache", GovernanceCache)
cache_projector_key = web.AppKey("cache_projector", Projector)
# The check's answers, written together a turn of the event loop at a time.
outbox_key = web.AppKey("outbox", Outbox)
# Usage ingest: the process's group-commit writer, and what tells it a key's owners.
writer_key = web.AppKey("usage_writer", Writer)
resolver_key = web.AppKey("usage_key_resolver", KeyResolver)
# The right each route needs.
rights_key: web.AppKey[dict[web.AbstractRoute, Right]] = web.AppKey("route_rights")
# The Idempotency-Keys whose answers this process is making (`service.web.keyed`),
# each set once its answer is kept.
in_flight_key = web.AppKey("idempotent_requests_in_flight", dict[str, asyncio.Event])
