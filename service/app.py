"""create_app(settings): the routes table, middlewares, and the pool's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable

import structlog
from aiohttp import web

from projections import cache_loader, runner
from service import eventstore, ingest
from service.config import Settings
from service.http import (
    MIDDLEWARES,
    Handler,
    Right,
    quiet_key,
    rights_key,
    settings_key,
)
from service.routes import (
    check,
    dashboard,
    events,
    governance_commands,
    governance_reads,
    health,
)
from service.routes import metrics as metrics_routes
from service.routes import openapi as openapi_routes
from service.routes import usage as usage_routes
from service.state import pool_key, readiness_key

log = structlog.get_logger()

RouteSpec = tuple[str, str, Handler, Right]

ROUTE_TABLES: tuple[Iterable[RouteSpec], ...] = (
    health.ROUTES,
    events.ROUTES,
    usage_routes.ROUTES,
    metrics_routes.ROUTES,
    governance_commands.ROUTES,
    governance_reads.ROUTES,
    check.ROUTES,
    openapi_routes.ROUTES,
    dashboard.ROUTES,
)
# Hot paths: their successful requests are counted in /metrics, not logged one by one.
QUIET_PATHS: frozenset[str] = frozenset(
    {
        "/api/usage",
        "/api/usage/batch",
        "/api/usage/stream",
        "/api/governance/check",
    }
)


def create_app(settings: Settings, dsn: str | None = None) -> web.Application:
    app = web.Application(
        middlewares=MIDDLEWARES,
        # The largest body any route takes; each route applies its own smaller limit.
        client_max_size=settings.max_batch_body_bytes,
    )
    app[settings_key] = settings
    app[readiness_key] = {}
    rights: dict[web.AbstractRoute, Right] = {}
    quiet: set[web.AbstractRoute] = set()
    for table in ROUTE_TABLES:
        for method, path, handler, right in table:
            route = app.router.add_route(method, path, handler)
            rights[route] = right
            if path in QUIET_PATHS:
                quiet.add(route)
    app[rights_key] = rights
    app[quiet_key] = quiet
    # Open dashboard streams end at shutdown instead of holding it up.
    app.on_shutdown.append(dashboard.close_streams)
    app.cleanup_ctx.append(_pool(dsn or settings.database_url, settings))
    app.cleanup_ctx.append(runner.run_projectors(dsn or settings.database_url))
    # The enforcement cache: loaded from the read model, then tailing the log.
    app.cleanup_ctx.append(cache_loader.run_cache())
    # Usage ingest: the process's group-commit writer, on its own connection.
    app.cleanup_ctx.append(ingest.writer_context(dsn or settings.database_url))
    return app


def _pool(
    dsn: str | None, settings: Settings
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if dsn is None:
            raise RuntimeError("create_app needs a DSN: set DATABASE_URL")
        pool = await eventstore.create_pool(
            dsn, min_size=2, max_size=settings.pool_size
        )
        app[pool_key] = pool
        log.info("database_pool_opened", size=settings.pool_size)
        try:
            yield
        finally:
            await pool.close()

    return ctx
