"""Liveness and readiness."""

from __future__ import annotations

from aiohttp import web

from service.web.http import Right, json_response
from service.web.keys import pool_key, readiness_key


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 once every projection here caught up with the head seen at start."""
    pending = [
        name for name, ready in request.app[readiness_key].items() if not ready()
    ]
    pool = request.app.get(pool_key)
    if pool is None:
        return json_response({"status": "starting", "pending": pending}, 503)
    if pending:
        return json_response({"status": "catching_up", "pending": pending}, 503)
    return json_response({"status": "ready"})


ROUTES = [
    ("GET", "/healthz", healthz, Right.PUBLIC),
    ("GET", "/readyz", readyz, Right.PUBLIC),
]
