"""GET /api/events: the log as stored, upcast on read (admin only)."""

from __future__ import annotations

from aiohttp import web

from service import eventstore
from service.errors import Invalid
from service.web.answers import EventPage
from service.web.http import Right, json_response, query_int, query_value
from service.web.keys import cache_projector_key, pool_key
from service.web.routes.governance_reads import wait_for_min_position

MAX_LIMIT = 10_000


async def list_events(request: web.Request) -> web.Response:
    """A page of the log; with ?min_position=, once the log holds that position
    (the cache, which applies every event, has: 503 projection_lag after the wait,
    as every read)."""
    await wait_for_min_position(request, cache_projector_key)
    after = query_int(request, "after", 0) or 0
    limit = min(query_int(request, "limit", 1000, minimum=1) or 1000, MAX_LIMIT)
    stream_id = query_value(request, "stream_id") or None
    if stream_id is not None and "\x00" in stream_id:
        raise Invalid("query parameter stream_id must not contain U+0000")
    page = await eventstore.read_page(
        request.app[pool_key], after=after, limit=limit, stream_id=stream_id
    )
    return json_response(
        EventPage(events=page, next_after=page[-1].global_position if page else after)
    )


ROUTES = [("GET", "/api/events", list_events, Right.ADMIN)]
