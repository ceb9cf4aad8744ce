"""`govledger serve` as real subprocesses for the fault tests: start one on a free
loopback port, wait until it is ready, SIGKILL or stop it, read its JSON log lines;
and the few HTTP calls those tests share (a customer → team → keys hierarchy)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

CUSTOMERS = "/api/governance/customers"
TEAMS = "/api/governance/teams"
KEYS = "/api/governance/virtual-keys"
BUDGETS = "/api/governance/budgets"
CHECK = "/api/governance/check"

# Every wait on a subprocess or an answer is bounded by one of these.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 15.0

_TOKEN_VARIABLES = (
    "GOVLEDGER_ADMIN_TOKENS",
    "GOVLEDGER_RECORDER_TOKENS",
    "GOVLEDGER_READER_TOKENS",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_application_name(dsn: str, name: str) -> str:
    """The DSN with `application_name` set, so pg_stat_activity tells replicas apart
    (asyncpg passes unknown DSN parameters on as server settings)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "application_name"]
    query.append(("application_name", name))
    return urlunsplit(parts._replace(query=urlencode(query)))


class Served:
    """One `python -m service serve` process; its stderr (JSON log lines) in a file."""

    def __init__(
        self,
        dsn: str,
        *,
        name: str = "govledger",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dsn = with_application_name(dsn, name)
        self._env = {
            **{k: v for k, v in os.environ.items() if k not in _TOKEN_VARIABLES},
            "DATABASE_URL": self.dsn,
            "GOVLEDGER_HOST": "127.0.0.1",
            "GOVLEDGER_PORT": str(self.port),
            **(env or {}),
        }
        self._args = [sys.executable, "-m", "service", "serve"]
        if reuse_port:
            self._args.append("--reuse-port")
        fd, log = tempfile.mkstemp(prefix=f"govledger-{name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as stderr:
            self.proc = subprocess.Popen(
                self._args,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def ready(
        self, session: aiohttp.ClientSession, within_s: float = START_TIMEOUT_S
    ) -> None:
        """Return once /readyz answers 200; fail if the process exits or the time
        runs out (a bounded start-up poll of a child process)."""
        assert self.proc is not None
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(
                    f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=2)
                ) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} not ready in {within_s} s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, nothing is flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT_S); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (a line cut by SIGKILL is skipped)."""
        lines = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def remove_log(self) -> None:
        self.log_path.unlink(missing_ok=True)


class Fleet:
    """The servers a test started; every one is killed and its log removed at exit."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.servers: list[Served] = []

    def start(self, **options: Any) -> Served:
        served = Served(self.dsn, **options)
        self.servers.append(served)
        served.start()
        return served

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for served in self.servers:
            served.kill()
            if kind is not None:
                print(f"--- last log lines of {served.name}:\n{served.tail()}")
            served.remove_log()


# --- the HTTP calls the fault tests share --------------------------------------------


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    within_s: float = REQUEST_TIMEOUT_S,
) -> tuple[int, Any]:
    async with session.request(
        method,
        url,
        json=body,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=within_s),
    ) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text) if text else None
        except ValueError:
            return response.status, text


async def create(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    status, answer = await call(session, "POST", url, body, headers=headers)
    assert status == 201, answer
    return dict(answer)


def budget(max_limit: int | str, reset_duration: str = "1d") -> dict[str, Any]:
    return {"max_limit": max_limit, "reset_duration": reset_duration}


class Hierarchy:
    """A customer with a team, each with a daily budget; `keys` under the team, each
    with a daily budget too; `member` under the team and `solo` directly under the
    customer, without budgets of their own (their checks show the team's and the
    customer's headroom)."""

    def __init__(self, answers: dict[str, dict[str, Any]]) -> None:
        self.answers = answers
        self.customer = answers["customer"]["customer"]
        self.team = answers["team"]["team"]
        self.keys = [answers[f"key{i}"]["virtual_key"] for i in range(len(answers) - 4)]
        self.member = answers["member"]["virtual_key"]
        self.solo = answers["solo"]["virtual_key"]

    @property
    def position(self) -> int:
        return max(int(a["position"]) for a in self.answers.values())


async def hierarchy(
    session: aiohttp.ClientSession,
    url: str,
    *,
    keys: int,
    key_limit: int,
    team_limit: int,
    customer_limit: int,
    headers: Mapping[str, str] | None = None,
) -> Hierarchy:
    answers: dict[str, dict[str, Any]] = {}
    answers["customer"] = await create(
        session,
        url + CUSTOMERS,
        {"name": "acme", "budgets": [budget(customer_limit)]},
        headers,
    )
    customer_id = answers["customer"]["customer"]["id"]
    answers["team"] = await create(
        session,
        url + TEAMS,
        {
            "name": "platform",
            "customer_id": customer_id,
            "budgets": [budget(team_limit)],
        },
        headers,
    )
    team_id = answers["team"]["team"]["id"]
    for i in range(keys):
        answers[f"key{i}"] = await create(
            session,
            url + KEYS,
            {"name": f"key-{i}", "team_id": team_id, "budgets": [budget(key_limit)]},
            headers,
        )
    answers["member"] = await create(
        session, url + KEYS, {"name": "member", "team_id": team_id}, headers
    )
    answers["solo"] = await create(
        session,
        url + KEYS,
        {"name": "solo", "customer_id": customer_id},
        headers,
    )
    return Hierarchy(answers)


async def known_to_cache(
    session: aiohttp.ClientSession,
    url: str,
    tree: Hierarchy,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Return once the server's cache holds the whole hierarchy: usage is screened
    by the cache, which may lag the create answers (a check waits, min_position)."""
    status, answer = await call(
        session,
        "POST",
        url + CHECK,
        {"virtual_key_id": tree.solo["id"], "min_position": tree.position},
        headers=headers,
    )
    assert (status, answer["allowed"]) == (200, True), answer


def usage(key: dict[str, Any], cost: str, occurred_at: str) -> dict[str, Any]:
    """A usage record of `key` (by its secret), with a fresh event id."""
    return {
        "event_id": str(uuid.uuid4()),
        "virtual_key": key["value"],
        "provider": "openai",
        "model": "gpt-4o",
        "cost": cost,
        "input_tokens": 10,
        "output_tokens": 5,
        "occurred_at": occurred_at,
    }


def ndjson(records: list[dict[str, Any]]) -> bytes:
    return b"\n".join(json.dumps(r).encode() for r in records)


async def post_batch(
    session: aiohttp.ClientSession,
    url: str,
    records: list[dict[str, Any]],
    *,
    within_s: float = REQUEST_TIMEOUT_S,
) -> tuple[int, Any]:
    """POST /api/usage/batch (a file-like body: aiohttp warns on large raw bytes)."""
    async with session.post(
        url + "/api/usage/batch",
        data=io.BytesIO(ndjson(records)),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=aiohttp.ClientTimeout(total=within_s),
    ) as response:
        return response.status, await response.json()
