"""The `govledger` command as a test runs it: a real process, with only the
service settings the test gives."""

from __future__ import annotations

import os
import subprocess
import sys

COMMAND = (sys.executable, "-m", "service")


def environment(**env: str) -> dict[str, str]:
    """This process's environment with only `env` of the service's own settings."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GOVLEDGER_") and k != "DATABASE_URL"
    }
    return {**clean, **env}


def govledger(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGS` with only `env` of the service's own settings."""
    return subprocess.run(
        [*COMMAND, *args],
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def said(stderr: str) -> list[str]:
    """What a command wrote to stderr besides its JSON log lines."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]
