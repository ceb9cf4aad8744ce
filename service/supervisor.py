"""A child process supervised by this one: restarted with back-off while it keeps
exiting, stopped with its parent, and stopping by itself when its parent dies."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

log = structlog.get_logger()


class Supervised:
    """One child process at a time: started, restarted with back-off whenever it
    exits, stopped (SIGTERM, then SIGKILL) with the parent.

    Its stdin is a pipe from this process, which it watches (`--with-parent`): when
    this process dies without stopping it, even by SIGKILL, the pipe closes and the
    child stops too. Its own session keeps a terminal's Ctrl-C for the parent alone.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        *,
        stop_timeout_s: float = 10.0,
        max_backoff_s: float = 30.0,
        healthy_after_s: float = 30.0,
    ) -> None:
        self._argv = list(argv)
        self._env = env
        self._stop_timeout_s = stop_timeout_s
        self._max_backoff_s = max_backoff_s
        self._healthy_after_s = healthy_after_s
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=True,
        )
        log.info("projector_child_started", pid=self._proc.pid)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.0
        while True:
            proc, started = self._proc, loop.time()
            code = None if proc is None else await proc.wait()
            quick = loop.time() - started < self._healthy_after_s
            delay = min(max(delay * 2, 0.5), self._max_backoff_s) if quick else 0.5
            if proc is not None:
                log.warning(
                    "projector_child_exited",
                    pid=proc.pid,
                    code=code,
                    restart_in_s=delay,
                )
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except OSError:  # no process to wait for: try again after a back-off
                self._proc = None
                log.exception("projector_child_not_started")

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            async with asyncio.timeout(self._stop_timeout_s):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            code = await proc.wait()
        log.info("projector_child_stopped", pid=proc.pid, code=code)
