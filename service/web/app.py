"""The composition root: create_app(settings) wires the routes, each behind the
guard, and every long-lived object (pool, tail and projectors, cache, usage writer)
with its lifetime, as aiohttp cleanup contexts in start-up order."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable

import asyncpg
import structlog
from aiohttp import web

from projections import cache_loader, governance
from projections.governance_readings import Remembered
from projections.runner import Projector, Tail
from service import eventstore
from service.config import Settings
from service.ingest import Writer
from service.supervisor import Supervised
from service.web.http import (
    EveryTarget,
    Handler,
    Right,
    expect_continue,
    guarded,
    unmatched,
)
from service.web.keys import (
    cache_key,
    cache_projector_key,
    governance_projector_key,
    in_flight_key,
    outbox_key,
    pool_key,
    readiness_key,
    readings_key,
    resolver_key,
    rights_key,
    settings_key,
    tail_key,
    writer_key,
)
from service.web.prepared import Outbox
from service.web.routes import (
    check,
    dashboard,
    events,
    governance_commands,
    governance_reads,
    health,
)
from service.web.routes import metrics as metrics_routes
from service.web.routes import openapi as openapi_routes
from service.web.routes import usage as usage_routes

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
        # The largest body any route takes; each route applies its own smaller limit.
        client_max_size=settings.max_batch_body_bytes,
    )
    app[settings_key] = settings
    app[readiness_key] = {}
    app[in_flight_key] = {}
    app[readings_key] = Remembered()
    app[outbox_key] = Outbox()
    rights: dict[web.AbstractRoute, Right] = {}
    for table in ROUTE_TABLES:
        for method, path, handler, right in table:
            guard = guarded(
                handler,
                right,
                settings,
                quiet=path in QUIET_PATHS,
                websocket=method == "GET",
            )
            # Every GET also answers HEAD (RFC 9110, 9.3.2): the same status and
            # headers, no body (aiohttp leaves it out).
            for verb in (method, "HEAD") if method == "GET" else (method,):
                route = app.router.add_route(
                    verb, path, guard, expect_handler=expect_continue
                )
                rights[route] = right
    # What no route takes: a 404, or a 405 naming the methods its path takes.
    every_target = EveryTarget()
    app.router.register_resource(every_target)
    every_target.add_route(
        "*",
        guarded(unmatched, Right.PUBLIC, settings, quiet=False),
        expect_handler=expect_continue,
    )
    app[rights_key] = rights
    # Open dashboard streams end at shutdown instead of holding it up.
    app.on_shutdown.append(dashboard.close_streams)
    database_url = dsn or settings.database_url
    if database_url is None:
        raise RuntimeError("create_app needs a DSN: set DATABASE_URL")
    app.cleanup_ctx.extend(
        (
            _pool(database_url, settings),
            _projectors(database_url, settings),
            # The enforcement cache: loaded from the read model, then tailing the log.
            _cache(settings),
            # Usage ingest: the process's group-commit writer, on its own connection.
            _usage_writer(database_url),
        )
    )
    if settings.projector == "child":
        # The SQL projector in `govledger project`, a child of this process.
        app.cleanup_ctx.append(_projector_child(database_url))
    return app


def keepalive_timeout(settings: Settings) -> float:
    """The HTTP server's keep-alive timeout, for run_app and the test servers alike.

    aiohttp closes a connection whose request head is not complete when its
    keep-alive timer fires (the timer starts when the connection opens and after
    every answer), so that timer is the header timeout.
    """
    return settings.header_timeout_s


Context = Callable[[web.Application], AsyncIterator[None]]


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """The pool's reset on release, in place of asyncpg's round trip (advisory
    unlock all, CLOSE ALL, UNLISTEN *, RESET ALL) on every release.

    asyncpg still rolls back a transaction left open and drops listeners before
    calling this. Nothing run on this pool leaves other session state: settings
    are made with set_config(..., true) (transaction-local), advisory locks are
    transaction locks (session locks are taken only by `replay`, `rewrite` and
    `migrate`, on connections of their own), cursors live inside transactions and
    LISTEN runs on the tail's own connection (projections.runner.Listener).
    """


def _pool(dsn: str, settings: Settings) -> Context:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await eventstore.create_pool(
            dsn, min_size=2, max_size=settings.pool_size, reset=_keep_session
        )
        app[pool_key] = pool
        log.info("database_pool_opened", size=settings.pool_size)
        try:
            yield
        finally:
            await pool.close()

    return ctx


def _projectors(dsn: str, settings: Settings) -> Context:
    """The tail (one LISTEN connection) and the SQL read model's projector on it:
    applying here ("inline"), or only following the checkpoint that a
    `govledger project` process writes ("child", "external")."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        tail = app[tail_key] = Tail(dsn)
        projector = Projector(
            app[pool_key],
            "governance",
            governance.APPLIER,
            follow_only=settings.projector != "inline",
            poll_interval_s=settings.poll_interval_s,
            commit_order=tail.commit_order,
        )
        app[governance_projector_key] = projector
        app[readiness_key]["governance"] = projector
        tail.start(projector)
        try:
            yield
        finally:
            await tail.stop()

    return ctx


def _cache(settings: Settings) -> Context:
    """Load the cache from the read model, then tail the log on the shared tail.

    The cache is ready (for /readyz) once it reached the log head seen at start.
    It also serves ingest as its key resolver unless a test set one already.
    """

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pool = app[pool_key]
        async with pool.acquire() as conn:
            cache, checkpoint = await cache_loader.load(conn)
        log.info(
            "cache_loaded",
            position=checkpoint.position,
            keys=len(cache.keys),
            teams=len(cache.teams),
            customers=len(cache.customers),
        )
        projector = Projector(
            pool,
            cache_loader.CACHE_PROJECTION,
            cache_loader.applier(cache),
            persistent=False,
            start=checkpoint,
            poll_interval_s=settings.poll_interval_s,
            commit_order=app[tail_key].commit_order,
        )
        app[cache_key] = cache
        app[cache_projector_key] = projector
        if resolver_key not in app:
            app[resolver_key] = cache
        app[readiness_key][cache_loader.CACHE_PROJECTION] = projector
        app[tail_key].start(projector)  # stopped with the tail
        yield

    return ctx


def _projector_child(dsn: str) -> Context:
    """`govledger project` as a supervised child, for the app's lifetime."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        child = Supervised(
            [sys.executable, "-m", "service", "project", "--with-parent"],
            {**os.environ, "DATABASE_URL": dsn},
        )
        await child.start()
        try:
            yield
        finally:
            await child.stop()

    return ctx


def _usage_writer(dsn: str) -> Context:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        writer = Writer(dsn)
        await writer.start()
        app[writer_key] = writer
        try:
            yield
        finally:
            await writer.close()

    return ctx
