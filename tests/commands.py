"""The `govledger` command as a test runs it: a real process, with only the
service settings the test gives."""

from __future__ import annotations

import os
import subprocess
import sys


def govledger(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGS` with only `env` of the service's own settings."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GOVLEDGER_") and k != "DATABASE_URL"
    }
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def said(done: subprocess.CompletedProcess[str]) -> list[str]:
    """What a command wrote to stderr besides its JSON log lines."""
    return [line for line in done.stderr.splitlines() if not line.startswith("{")]
