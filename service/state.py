"""The application's shared objects, as typed aiohttp AppKeys."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

if TYPE_CHECKING:
    # Only for the annotations: projections.runner imports this module.
    from projections.cache import GovernanceCache
    from projections.runner import Projector, Tail

pool_key = web.AppKey("pool", asyncpg.Pool)
# name → "has this projection caught up with the head seen at start?"
readiness_key = web.AppKey("readiness", dict[str, Callable[[], bool]])
# The SQL read model's projector: GET handlers wait on it for ?min_position=.
governance_projector_key: web.AppKey[Projector] = web.AppKey("governance_projector")
# The process's LISTEN connection and projector tasks; tail.start(projector) adds one.
tail_key: web.AppKey[Tail] = web.AppKey("tail")
# The in-memory enforcement cache (checks) and the projector that keeps it current.
cache_key: web.AppKey[GovernanceCache] = web.AppKey("cache")
cache_projector_key: web.AppKey[Projector] = web.AppKey("cache_projector")
