"""The event loop that `serve` and `project` run on.

uvloop (libuv's loop, by asyncpg's authors) unless GOVLEDGER_EVENT_LOOP=asyncio: it
moves socket reads and writes, timers and callbacks out of Python, and a check over
HTTP costs about a tenth less with it (docs/BENCHMARKS.md). Where uvloop is not
installed (it is not built for Windows) the standard library's loop runs instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from service.config import EventLoop

log = structlog.get_logger()

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def factory(choice: EventLoop) -> tuple[LoopFactory, EventLoop]:
    """What makes the chosen loop, and the name of the loop it makes."""
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning(
                "event_loop_unavailable",
                wanted="uvloop",
                using="asyncio",
                hint="install uvloop, or set GOVLEDGER_EVENT_LOOP=asyncio",
            )
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"
