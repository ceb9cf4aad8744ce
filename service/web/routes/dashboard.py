"""The live governance dashboard: the static page at `/` and its script modules, its
Server-Sent Events stream of read-model snapshots, and a budget's spend per past
period.

The page is public; its data needs the reader right. One `Feed` per app builds a
snapshot once per change of the read model, however many pages watch: each stream
looks at the governance projector's in-memory checkpoint a few times a second (no
I/O) and reads the database only when it moved, or when a period in the last
snapshot ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources

import msgspec
import structlog
from aiohttp import web

from projections import dashboard
from service.records import Checkpoint
from service.web.answers import BudgetPeriod, BudgetPeriods
from service.web.http import Right, json_response, path_id, query_int
from service.web.keys import governance_projector_key, pool_key
from service.web.routes.governance_reads import wait_for_min_position

log = structlog.get_logger()

# How often a stream looks for progress: at most this many snapshots a second.
TICK_S = 0.25
# A slow snapshot (a large read model) spaces the rebuilds out: at least this many
# times its build time between two, but never more than MAX_PAUSE_S.
PAUSE_PER_BUILD = 4
MAX_PAUSE_S = 5.0
# A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0
# Rebuild at least this often, whatever the periods say.
MAX_AGE = timedelta(minutes=5)

_encoder = msgspec.json.Encoder(decimal_format="number")

# The modules the page's script imports, served under /dashboard/ (no build step).
MODULES = (
    "admin.js",
    "api.js",
    "budgets.js",
    "chart.js",
    "dialogs.js",
    "errors.js",
    "fields.js",
    "format.js",
    "forms.js",
    "render.js",
    "stream.js",
)
_STATIC = {
    "/": ("dashboard.html", "text/html"),
    "/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard.css": ("dashboard.css", "text/css"),
    **{f"/dashboard/{name}": (name, "text/javascript") for name in MODULES},
}
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none';"
        " base-uri 'none'; form-action 'self'"
    ),
}


@cache
def _asset(name: str) -> bytes:
    return (resources.files("service") / "static" / name).read_bytes()


async def static(request: web.Request) -> web.Response:
    name, content_type = _STATIC[request.path]
    return web.Response(
        body=_asset(name),
        content_type=content_type,
        charset="utf-8",
        headers=_PAGE_HEADERS,
    )


# --- the feed ----------------------------------------------------------------------


class Frame(msgspec.Struct, frozen=True):
    """One snapshot as an SSE event, for the checkpoint it was built at."""

    checkpoint: Checkpoint
    body: bytes
    stale_at: datetime  # a period ends: the usage shown changes without an event
    build_s: float


class Feed:
    """The latest snapshot of one app, built at most once per checkpoint, and the
    signal that ends every stream at shutdown."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self._lock = asyncio.Lock()
        self._frame: Frame | None = None

    async def frame(self, request: web.Request, checkpoint: Checkpoint) -> Frame:
        async with self._lock:
            frame = self._frame
            now = datetime.now(UTC)
            if frame is None or frame.checkpoint != checkpoint or now >= frame.stale_at:
                frame = self._frame = await _build(request, checkpoint, now)
            return frame


_feeds: weakref.WeakKeyDictionary[web.Application, Feed] = weakref.WeakKeyDictionary()


def _feed(app: web.Application) -> Feed:
    feed = _feeds.get(app)
    if feed is None:
        feed = _feeds[app] = Feed()
    return feed


async def close_streams(app: web.Application) -> None:
    """An on_shutdown hook: end the open streams, so shutdown need not wait them."""
    feed = _feeds.get(app)
    if feed is not None:
        feed.closing.set()


async def _build(request: web.Request, checkpoint: Checkpoint, now: datetime) -> Frame:
    started = time.perf_counter()
    async with request.app[pool_key].acquire() as conn:
        view = await dashboard.snapshot(conn, now)
    stale_at = now + MAX_AGE
    earliest = dashboard.earliest_reset(view)
    if earliest is not None and earliest < stale_at:
        stale_at = earliest
    body = b"".join(
        (
            b"event: snapshot\nid: %d\ndata: " % view["position"],
            _encoder.encode(view),
            b"\n\n",
        )
    )
    return Frame(checkpoint, body, stale_at, time.perf_counter() - started)


def _is_due(sent: Frame | None, checkpoint: Checkpoint) -> bool:
    """Whether the page needs a new snapshot: the read model moved or a period ended."""
    return (
        sent is None
        or sent.checkpoint != checkpoint
        or datetime.now(UTC) >= sent.stale_at
    )


def _pause(frame: Frame) -> float:
    return min(max(TICK_S, frame.build_s * PAUSE_PER_BUILD), MAX_PAUSE_S)


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


async def events(request: web.Request) -> web.StreamResponse:
    """GET /api/dashboard/events: a `snapshot` event at once, then one per change."""
    app = request.app
    feed = _feed(app)
    projector = app[governance_projector_key]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        }
    )
    await response.prepare(request)
    if request.method == "HEAD":  # the stream's headers only
        return response
    loop = asyncio.get_running_loop()
    sent: Frame | None = None
    last_write = loop.time()
    pause = TICK_S
    with contextlib.suppress(ConnectionResetError):
        while not feed.closing.is_set() and _connected(request):
            checkpoint = projector.checkpoint
            if _is_due(sent, checkpoint):
                try:
                    frame = await feed.frame(request, checkpoint)
                except Exception:
                    log.exception("dashboard_snapshot_failed")
                    pause = MAX_PAUSE_S
                else:
                    await response.write(frame.body)
                    last_write = loop.time()
                    sent = frame
                    pause = _pause(frame)
            elif loop.time() - last_write >= KEEPALIVE_S:
                await response.write(b": keepalive\n\n")
                last_write = loop.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await feed.closing.wait()
    return response


# --- budget periods ----------------------------------------------------------------


async def budget_periods(request: web.Request) -> web.Response:
    """GET /api/governance/budgets/{id}/periods: `{periods: [{period_start, spend}]}`,
    oldest first; `?limit=N` keeps the latest N."""
    budget_id = path_id(request, "budget")
    limit = query_int(request, "limit", minimum=1)
    await wait_for_min_position(request)
    async with request.app[pool_key].acquire() as conn:
        found = await dashboard.periods(conn, budget_id, limit)
    return json_response(
        BudgetPeriods(
            periods=[
                BudgetPeriod(period_start=p["period_start"], spend=p["spend"])
                for p in found
            ]
        )
    )


ROUTES = [
    *(("GET", path, static, Right.PUBLIC) for path in _STATIC),
    ("GET", "/api/dashboard/events", events, Right.READ),
    ("GET", "/api/governance/budgets/{id}/periods", budget_periods, Right.READ),
]
