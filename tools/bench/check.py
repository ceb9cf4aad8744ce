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


class WrkResult(msgspec.Struct, frozen=True):
    per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    client: str = "wrk"


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
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return WrkResult(rps, _to_ms(p50), _to_ms(p99), int(bad.group(1)) if bad else 0)


async def http_checks(
    url: str, body: bytes, *, connections: int, seconds: float
) -> WrkResult:
    """Checks/s with wrk when installed, else with the aiohttp load client."""
    if has_wrk():
        return wrk_post(
            f"{url}/api/governance/check",
            body,
            connections=connections,
            seconds=max(1, round(seconds)),
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
