"""Check: decisions/s over HTTP against an aiohttp handler that does no work."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import msgspec

from tools.bench.load import LoadResult, post_loop


def _to_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


class CpuSpent(msgspec.Struct, frozen=True):
    """What a server process spent on CPU a request, in µs: in user mode, and in
    the kernel (its socket reads and writes, which include delivering each answer
    to the client and waking the client when it sleeps)."""

    user_us: float
    system_us: float


class WrkResult(msgspec.Struct, frozen=True):
    per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    client: str = "wrk"
    requests: int = 0  # answered in the run
    cpu: CpuSpent | None = None  # of the server process, when its id was given


def _cpu_times(pid: int | None) -> tuple[float, float] | None:
    if pid is None:
        return None
    import psutil  # the bench extra's

    times = psutil.Process(pid).cpu_times()
    return times.user, times.system


def spent(
    before: tuple[float, float] | None,
    after: tuple[float, float] | None,
    requests: int,
) -> CpuSpent | None:
    """The CPU a request between two readings of a process's (user, system)
    seconds; None without both readings or without requests."""
    if before is None or after is None or not requests:
        return None
    return CpuSpent(
        user_us=(after[0] - before[0]) / requests * 1e6,
        system_us=(after[1] - before[1]) / requests * 1e6,
    )


def has_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk_post(url: str, body: bytes, *, connections: int, seconds: int) -> WrkResult:
    """wrk's closed loop, one thread (the other core serves), latency percentiles on."""
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = {msgspec.json.encode(body.decode()).decode()}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "post.lua"
        path.write_text(script)
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "--timeout",
                "5s",
                "-s",
                str(path),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return wrk_result(out)


def wrk_result(out: str) -> WrkResult:
    """What wrk's report (with --latency) says of its run."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return WrkResult(
        rps,
        _to_ms(p50),
        _to_ms(p99),
        int(bad.group(1)) if bad else 0,
        requests=total,
    )


async def http_checks(
    url: str,
    body: bytes,
    *,
    connections: int,
    seconds: float,
    pid: int | None = None,
) -> WrkResult:
    """Checks/s with wrk when installed, else with the aiohttp load client; with
    `pid`, the CPU that server process spent a check (wrk only)."""
    if has_wrk():
        before = _cpu_times(pid)
        run = wrk_post(
            f"{url}/api/governance/check",
            body,
            connections=connections,
            seconds=max(1, round(seconds)),
        )
        return msgspec.structs.replace(
            run, cpu=spent(before, _cpu_times(pid), run.requests)
        )
    result: LoadResult = await post_loop(
        f"{url}/api/governance/check", [body], connections=connections, seconds=seconds
    )
    return WrkResult(
        result.per_second,
        result.percentile(0.5),
        result.percentile(0.99),
        result.errors,
        client="aiohttp",
    )
