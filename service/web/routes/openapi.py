"""GET /api/openapi.json: the OpenAPI document of the app's own routes (no token)."""

from __future__ import annotations

from weakref import WeakKeyDictionary

from aiohttp import web

from service.web import openapi
from service.web.http import Right

# The encoded document of each app, made at its first request.
_documents: WeakKeyDictionary[web.Application, bytes] = WeakKeyDictionary()


async def openapi_json(request: web.Request) -> web.Response:
    app = request.app
    body = _documents.get(app)
    if body is None:
        body = _documents[app] = openapi.encode(openapi.routes_of(app))
    return web.Response(body=body, content_type="application/json")


ROUTES = [("GET", "/api/openapi.json", openapi_json, Right.PUBLIC)]
