"""GET /metrics: the Prometheus text exposition (reader right)."""

from __future__ import annotations

from aiohttp import web

from service import metrics
from service.web.http import Right


async def scrape(request: web.Request) -> web.Response:
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = metrics.CONTENT_TYPE
    return response


ROUTES = [("GET", "/metrics", scrape, Right.READ)]
