"""The application's shared objects, as typed aiohttp AppKeys."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
from aiohttp import web

pool_key = web.AppKey("pool", asyncpg.Pool)
# name → "has this projection caught up with the head seen at start?"
readiness_key = web.AppKey("readiness", dict[str, Callable[[], bool]])
