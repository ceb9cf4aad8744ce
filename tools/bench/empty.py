"""The check baseline: an aiohttp handler doing no work (`-m tools.bench.empty N`),
on asyncio's own loop, or on uvloop with `-m tools.bench.empty N uvloop`."""

from __future__ import annotations

import sys

from aiohttp import web

_BODY = b'{"allowed":true,"reason":"ok","http_status":200,"position":0}'


async def answer(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/api/governance/check", answer)
    app.router.add_get("/healthz", answer)
    loop = None
    if sys.argv[2:] == ["uvloop"]:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
