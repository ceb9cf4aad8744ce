"""The `govledger` command when it cannot do what it is asked: a bad port, a port in
use, a DATABASE_URL that reaches no usable PostgreSQL, a batch size out of range, a
file that cannot be opened. Each is one sentence and an exit status, never a
traceback; a serve that fails stops the embedded PostgreSQL it started (real
processes, a real embedded cluster, the test database)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from service import pgcluster
from service.config import ConfigError, Settings
from service.domain.events import TeamCreated
from tests.builders import append
from tests.commands import COMMAND, environment, govledger, said


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


@pytest.mark.parametrize(
    "raw", ["*", "null", "console.example", "http://console.example/app", "http://u@h"]
)
def test_an_allowed_origin_that_is_no_origin_is_refused_by_name(raw):
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"GOVLEDGER_ALLOWED_ORIGINS": f"http://ok.example,{raw}"})

    assert str(refused.value) == (
        f"GOVLEDGER_ALLOWED_ORIGINS: {raw!r} is not an origin; give each as"
        " scheme://host[:port], e.g. http://localhost:3000"
    )


def test_allowed_origins_are_kept_as_browsers_send_them():
    allowed = "HTTP://Console.Example:3000/, chrome-extension://abcdef"

    settings = Settings.from_env({"GOVLEDGER_ALLOWED_ORIGINS": allowed})

    assert settings.allowed_origins == {
        "http://console.example:3000",
        "chrome-extension://abcdef",
    }


def test_an_empty_host_keeps_the_loopback_default():
    assert Settings.from_env({"GOVLEDGER_HOST": ""}).host == "127.0.0.1"


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
        done = govledger(
            "serve", GOVLEDGER_DATA_DIR=str(data_dir), GOVLEDGER_PORT=str(port)
        )

    assert done.returncode == 2
    assert said(done.stderr) == [
        f"govledger: cannot listen on 127.0.0.1:{port} (Address already in use):"
        " free that port or set GOVLEDGER_HOST and GOVLEDGER_PORT"
    ]
    assert '"event": "cluster_stopped"' in done.stderr
    assert pgcluster.status(data_dir) is None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


@pytest.mark.parametrize("command", ["migrate", "serve", "export"])
def test_a_database_url_with_no_postgresql_behind_it_is_one_sentence(command):
    port = closed_port()

    done = govledger(
        command, DATABASE_URL=f"postgresql://app:hunter2-secret@127.0.0.1:{port}/x"
    )

    assert done.returncode == 1
    assert said(done.stderr) == [
        "govledger: cannot connect to the PostgreSQL of DATABASE_URL (Connect call"
        f" failed ('127.0.0.1', {port})): start it, or correct DATABASE_URL"
    ]
    assert "hunter2-secret" not in done.stderr


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            "not a url",
            'invalid DSN: scheme is expected to be either "postgresql" or'
            " \"postgres\", got ''",
        ),
        (
            "postgresql://app:hunter2-secret@127.0.0.1:port/x",
            "invalid literal for int() with base 10: 'port'",
        ),
    ],
)
def test_a_database_url_that_is_no_postgresql_url_is_a_configuration_error(url, reason):
    done = govledger("migrate", DATABASE_URL=url)

    assert done.returncode == 2
    assert said(done.stderr) == [
        f"govledger: DATABASE_URL is not a PostgreSQL URL: {reason}"
    ]
    assert "hunter2-secret" not in done.stderr


def test_a_database_the_server_does_not_have_is_one_sentence(database):
    parts = urlsplit(database)
    missing = urlunsplit(parts._replace(path="/no_such_database"))

    done = govledger("migrate", DATABASE_URL=missing)

    assert done.returncode == 1
    assert said(done.stderr) == [
        "govledger: the PostgreSQL of DATABASE_URL refused the connection:"
        ' database "no_such_database" does not exist'
    ]


@pytest.mark.parametrize(
    "command", [["replay"], ["upcast"], ["import", "events.jsonl"]]
)
@pytest.mark.parametrize("raw", ["0", "-1", "10001", "5x"])
def test_a_batch_size_outside_1_to_10000_is_refused_before_anything_runs(command, raw):
    done = govledger(
        *command, "--batch-size", raw, DATABASE_URL="postgresql://nobody@/nowhere"
    )

    assert done.returncode == 2
    assert said(done.stderr)[-1] == (
        f"govledger {command[0]}: error: argument --batch-size: must be a whole"
        f" number from 1 to 10,000, not {raw!r}"
    )


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (
            ["--at", "yesterday"],
            "--at takes a position or an RFC 3339 time: 'yesterday'",
        ),
        (["--at", "\u0663"], "--at takes a position or an RFC 3339 time: '\u0663'"),
        (["--at", "7", "--verify"], "--verify compares with the live tables; not --at"),
        (["--print"], "--print needs --at"),
        (["--projection", "nope"], "unknown projection 'nope' (known: governance)"),
    ],
)
def test_replay_arguments_that_say_nothing_runnable_are_a_usage_error(args, sentence):
    done = govledger("replay", *args, DATABASE_URL="postgresql://nobody@/nowhere")

    assert done.returncode == 2
    assert said(done.stderr) == [f"govledger replay: {sentence}"]


def test_a_file_that_cannot_be_opened_is_one_sentence(database, tmp_path):
    missing = tmp_path / "missing.jsonl"
    nowhere = tmp_path / "no-such-folder" / "events.jsonl"

    imported = govledger("import", str(missing), DATABASE_URL=database)
    exported = govledger("export", str(nowhere), DATABASE_URL=database)
    recorded = govledger("record", str(missing))

    assert (imported.returncode, said(imported.stderr)) == (
        1,
        [f"govledger import: {missing}: No such file or directory"],
    )
    assert (exported.returncode, said(exported.stderr)) == (
        1,
        [f"govledger export: {nowhere}: No such file or directory"],
    )
    assert (recorded.returncode, said(recorded.stderr)) == (
        1,
        [f"govledger record: {missing}: No such file or directory"],
    )


async def test_an_export_whose_reader_left_stops_quietly_as_sigpipe_would(
    database, pool
):
    team_id = str(uuid.uuid4())
    await append(pool, f"team-{team_id}", TeamCreated(team_id=team_id, name="t"))
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line is written
    try:
        process = await asyncio.create_subprocess_exec(
            *COMMAND,
            "export",
            env=environment(DATABASE_URL=database),
            stdout=write,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        os.close(write)

    assert process.returncode == 128 + signal.SIGPIPE
    assert said(err.decode()) == []
