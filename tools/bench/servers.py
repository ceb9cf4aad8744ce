"""The processes a benchmark measures: govledger serve (and keys to drive it with),
and the do-nothing baseline."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

# The processes serving each URL yielded below, while they serve it.
_serving: dict[str, list[int]] = {}


def pids(url: str) -> list[int]:
    """The ids of the processes serving `url` (a URL `govledger` or `empty_handler`
    yielded, while it is open)."""
    return list(_serving[url])


@contextlib.contextmanager
def _serves(url: str, procs: list[subprocess.Popen[bytes]]) -> Iterator[str]:
    _serving[url] = [proc.pid for proc in procs]
    try:
        yield url
    finally:
        del _serving[url]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    timeout: float = 60,
    *,
    port: int | None = None,
) -> None:
    """Until `url` answers 200 and, given a `port`, `proc` itself listens on it (with
    SO_REUSEPORT another process on the port may be the one that answered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200 and (port is None or _listens(proc.pid, port)):
                    return
        except OSError:
            pass
        time.sleep(0.1)  # start-up poll of a child process, bounded by the deadline
    raise RuntimeError(f"{url} did not become ready in {timeout} s")


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port` (Linux: the
    sockets of /proc/net/tcp* in state LISTEN, among the process's descriptors)."""
    sockets: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{inode}]")
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in descriptors:
        with contextlib.suppress(OSError):
            if os.readlink(fd) in sockets:
                return True
    return False


@contextlib.contextmanager
def govledger(
    dsn: str, *, processes: int = 1, port: int | None = None, log: Path | None = None
) -> Iterator[str]:
    """`processes` serve processes on one port (SO_REUSEPORT); yields the base URL.
    With `log`, what they print (the projector child's too) is appended to it."""
    port = port or free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "GOVLEDGER_HOST": "127.0.0.1",
        "GOVLEDGER_PORT": str(port),
    }
    for name in (
        "GOVLEDGER_ADMIN_TOKENS",
        "GOVLEDGER_RECORDER_TOKENS",
        "GOVLEDGER_READER_TOKENS",
    ):
        env.pop(name, None)
    output = contextlib.ExitStack()
    sink: Any = subprocess.DEVNULL
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        sink = output.enter_context(log.open("ab"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--reuse-port"],
            env=env,
            stdout=sink,
            stderr=sink,
        )
        for _ in range(processes)
    ]
    try:
        for proc in procs:
            _wait_ready(
                f"http://127.0.0.1:{port}/readyz",
                proc,
                port=port if processes > 1 else None,
            )
        with _serves(f"http://127.0.0.1:{port}", procs) as url:
            yield url
    finally:
        _stop(procs)
        output.close()


@contextlib.contextmanager
def empty_handler(*, uvloop: bool = False) -> Iterator[str]:
    """The baseline server: aiohttp answering a fixed body, doing no work (on
    asyncio's loop, or with `uvloop` on the loop `govledger serve` runs on)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.bench.empty",
            str(port),
            *(["uvloop"] if uvloop else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
        with _serves(f"http://127.0.0.1:{port}", [proc]) as url:
            yield url
    finally:
        _stop([proc])


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Key(msgspec.Struct, frozen=True):
    id: str
    secret: str


async def create_keys(url: str, count: int) -> list[Key]:
    """Keys in one team (with a daily and a monthly budget), each with a daily
    budget, created through the API."""
    keys: list[Key] = []
    async with aiohttp.ClientSession() as session:
        team = await _post(
            session,
            f"{url}/api/governance/teams",
            {
                "name": "bench",
                "budgets": [
                    {"max_limit": "1000000000", "reset_duration": "1d"},
                    {"max_limit": "1000000000", "reset_duration": "1M"},
                ],
            },
        )
        for i in range(count):
            body = await _post(
                session,
                f"{url}/api/governance/virtual-keys",
                {
                    "name": f"bench-{i}",
                    "team_id": team["team"]["id"],
                    "budgets": [{"max_limit": "1000000000", "reset_duration": "1d"}],
                },
            )
            keys.append(Key(body["virtual_key"]["id"], body["virtual_key"]["value"]))
    return keys


async def _post(session: aiohttp.ClientSession, url: str, body: object) -> Any:
    async with session.post(url, json=body) as resp:
        if resp.status >= 300:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        return await resp.json()


async def call_json(
    session: aiohttp.ClientSession, method: str, url: str, body: object = None
) -> Any:
    """One JSON request; the answer decoded with exact money (Decimal); any answer
    other than 2xx raises."""
    async with session.request(
        method, url, json=body, timeout=aiohttp.ClientTimeout(total=30)
    ) as resp:
        text = await resp.text()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {url}: {resp.status} {text}")
        return json.loads(text, parse_float=Decimal)


async def budget_key(
    session: aiohttp.ClientSession, url: str, limit: Decimal
) -> tuple[str, int]:
    """A key of its own with one daily budget of `limit` (no team), known to the
    cache of the process that answers; (its id, the position of its creation)."""
    created = await call_json(
        session,
        "POST",
        f"{url}/api/governance/virtual-keys",
        {
            "name": "bench-reservations",
            "budgets": [{"max_limit": str(limit), "reset_duration": "1d"}],
        },
    )
    key_id, position = created["virtual_key"]["id"], int(created["position"])
    await call_json(
        session,
        "POST",
        f"{url}/api/governance/check",
        {"virtual_key_id": key_id, "min_position": position},
    )
    return key_id, position
