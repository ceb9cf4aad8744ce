"""`govledger serve` that cannot start: a bad port is refused before anything
starts, and a port it cannot listen on is one sentence, with the embedded PostgreSQL
it started stopped again (real processes, a real embedded cluster)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import pgcluster
from service.config import ConfigError, Settings


@pytest.mark.parametrize("raw", ["0", "65536", "99999", "-1", " 80", "8o", "٨٠"])
def test_a_port_that_is_no_tcp_port_is_refused_by_name(raw):
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"GOVLEDGER_PORT": raw})

    assert str(refused.value) == (
        f"GOVLEDGER_PORT must be a port number from 1 to 65535, not {raw!r}"
    )


def test_a_port_is_taken_from_1_to_65535():
    assert [Settings.from_env({"GOVLEDGER_PORT": p}).port for p in ("1", "65535")] == [
        1,
        65535,
    ]
    assert Settings.from_env({}).port == Settings.from_env({"GOVLEDGER_PORT": ""}).port


@pytest.fixture
def data_dir() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="govledger-serve-startup-"))
    try:
        yield parent / "data"
    finally:
        pgcluster.remove(parent / "data")
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.timeout(90)
def test_a_port_in_use_is_one_sentence_and_stops_the_cluster_serve_started(data_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GOVLEDGER_")},
            "GOVLEDGER_DATA_DIR": str(data_dir),
            "GOVLEDGER_PORT": str(port),
        }
        env.pop("DATABASE_URL", None)
        done = subprocess.run(
            [sys.executable, "-m", "service", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=80,
        )

    plain = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert done.returncode == 2
    assert plain == [
        f"govledger: cannot listen on 127.0.0.1:{port} (Address already in use):"
        " free that port or set GOVLEDGER_HOST and GOVLEDGER_PORT"
    ]
    assert '"event": "cluster_stopped"' in done.stderr
    assert pgcluster.status(data_dir) is None
