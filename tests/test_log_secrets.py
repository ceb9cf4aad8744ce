"""No log line carries a virtual key secret, a bearer token, a configured token or
the password of DATABASE_URL: not in a 500's traceback (frame locals are never
shown), not in an exception string, not in a request id or a path; in the service's
own JSON lines and in those of the standard library's loggers alike."""

from __future__ import annotations

import argparse
import io
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service import cli
from service import log as logging_setup
from service.config import Settings
from service.web.app import create_app
from service.web.http import Right, guarded
from service.web.keys import settings_key
from tests.served import CHECK, KEYS, Fleet, call

PASSWORD = "pw-" + secrets.token_hex(8)
TOKENS = {
    "admin": "adm-" + secrets.token_hex(8),
    "recorder": "rec-" + secrets.token_hex(8),
    "reader": "read-" + secrets.token_hex(8),
}
UNKNOWN_TOKEN = "unknown-" + secrets.token_hex(8)
ADMIN = {"Authorization": f"Bearer {TOKENS['admin']}"}


def with_password(dsn: str) -> str:
    """The DSN with a password in its user info (the test cluster trusts local
    connections, so the server never asks for it)."""
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{host}"))


def environment(dsn: str) -> dict[str, str]:
    return {
        "DATABASE_URL": dsn,
        "GOVLEDGER_ADMIN_TOKENS": TOKENS["admin"],
        "GOVLEDGER_RECORDER_TOKENS": TOKENS["recorder"],
        "GOVLEDGER_READER_TOKENS": TOKENS["reader"],
    }


def leaks(lines: list[str], *values: str) -> list[str]:
    return [line for line in lines if any(value in line for value in values)]


@pytest.fixture
def written() -> Iterator[io.StringIO]:
    """Where the lines go while a test has the production configuration on; the
    previous structlog and root-logger configuration is restored afterwards."""
    before = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    try:
        yield out
    finally:
        structlog.configure(**before)
        root.handlers[:] = handlers
        root.setLevel(level)


async def fail(request: web.Request) -> web.Response:
    """A handler that fails with secrets in its locals and in its message."""
    settings = request.app[settings_key]
    body = await request.json()
    virtual_key = body["virtual_key"]
    raise RuntimeError(f"could not use {settings.database_url} for {virtual_key}")


@pytest.fixture
async def client(
    database: str, written: io.StringIO
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    dsn = with_password(database)
    logging_setup.configure(json=True, env=environment(dsn), file=written)
    settings = Settings(
        database_url=dsn,
        admin_tokens=frozenset({TOKENS["admin"]}),
        recorder_tokens=frozenset({TOKENS["recorder"]}),
        reader_tokens=frozenset({TOKENS["reader"]}),
    )
    app = create_app(settings, dsn)
    # Behind the guard every route of the service stands behind.
    app.router.add_post(
        "/test/fail", guarded(fail, Right.PUBLIC, settings, quiet=False)
    )
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_a_500_and_refused_requests_log_no_password_token_or_secret(
    client, database, written
):
    created = await client.post(KEYS, json={"name": "ci"}, headers=ADMIN)
    assert created.status == 201
    answer = await created.json()
    secret = answer["virtual_key"]["value"]
    bearer = {"Authorization": f"Bearer {secret}"}

    failed = await client.post(
        "/test/fail", json={"virtual_key": secret}, headers=ADMIN
    )
    assert (failed.status, (await failed.json())["error"]["code"]) == (
        500,
        "internal_error",
    )
    refused = [
        await client.get(KEYS),
        await client.get(KEYS, headers={"Authorization": f"Bearer {UNKNOWN_TOKEN}"}),
        await client.get(KEYS, headers=bearer),
        await client.get(KEYS, headers={"Authorization": TOKENS["admin"]}),
        await client.get(KEYS, headers={"X-Request-Id": TOKENS["reader"]}),
        await client.get(f"{KEYS}/{secret}", headers={**ADMIN, "X-Request-Id": secret}),
        await client.post(
            KEYS,
            json={"name": "x"},
            headers={"Authorization": f"Bearer {TOKENS['recorder']}"},
        ),
    ]
    assert [r.status for r in refused] == [401, 401, 401, 401, 401, 404, 403]

    lines = written.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    assert leaks(lines, PASSWORD, *TOKENS.values(), UNKNOWN_TOKEN, secret) == []
    [failure] = [r for r in records if r["event"] == "request_failed"]
    [exception] = failure["exception"]
    assert exception["exc_value"] == (
        "could not use "
        + with_password(database).replace(PASSWORD, "[redacted]")
        + " for sk-gl-[redacted]"
    )
    assert exception["frames"]
    assert [f for f in exception["frames"] if "locals" in f] == []
    finished = [r for r in records if r["event"] == "request_finished"]
    assert [(r["status"], r["request_id"]) for r in finished[-3:]] == [
        (401, "[redacted]"),
        (404, "sk-gl-[redacted]"),
        (403, finished[-1]["request_id"]),
    ]
    assert finished[-2]["path"] == f"{KEYS}/sk-gl-[redacted]"


def test_every_kind_of_secret_is_masked_in_every_value(written):
    dsn = "postgresql://govledger:" + PASSWORD + "@db.internal:5432/ledger"
    logging_setup.configure(
        json=True,
        env={"DATABASE_URL": dsn, "GOVLEDGER_ADMIN_TOKENS": TOKENS["admin"]},
        file=written,
    )
    log = structlog.get_logger()
    values: dict[str, Any] = {
        "dsn": "postgresql://someone:hunter2@elsewhere/db",
        "keyword_dsn": "host=db user=govledger password=hunter2 dbname=ledger",
        "header": "Bearer abc.def-ghi",
        "nested": {"list": [f"token {TOKENS['admin']}", ("sk-gl-" + "A" * 32,)]},
        "authorization": "Basic dXNlcjpwYXNz",
        "providers": [
            "key sk-proj-" + "B" * 48,
            "sk-ant-api03-" + "C" * 40,
            "sk-" + "D" * 48,
            "sk-short and task-list-of-things",
        ],
        "object": Settings(database_url=dsn, admin_tokens=frozenset({"other-tok"})),
        "count": 3,
    }

    log.info("values_logged", **values)
    logging.getLogger("aiohttp.server").error(
        "Error handling request from %s", TOKENS["admin"]
    )

    lines = written.getvalue().splitlines()
    assert leaks(lines, PASSWORD, TOKENS["admin"], "hunter2", "dXNlcjpwYXNz") == []
    assert leaks(lines, "abc.def-ghi", "A" * 32, "B" * 20, "C" * 20, "D" * 20) == []
    service, standard = (json.loads(line) for line in lines)
    assert {k: service[k] for k in values} == {
        "dsn": "postgresql://someone:[redacted]@elsewhere/db",
        "keyword_dsn": "host=db user=govledger password=[redacted] dbname=ledger",
        "header": "Bearer [redacted]",
        "nested": {"list": ["token [redacted]", ["sk-gl-[redacted]"]]},
        "authorization": "[redacted]",
        "providers": [
            "key sk-[redacted]",
            "sk-[redacted]",
            "sk-[redacted]",
            "sk-short and task-list-of-things",
        ],
        "object": service["object"],
        "count": 3,
    }
    # The settings' repr is masked by the DSN's shape; a token only the settings
    # know (not configured through the environment) is not recognisable in it.
    assert (
        "postgresql://govledger:[redacted]@db.internal:5432/ledger"
        in (service["object"])
    )
    assert (standard["event"], standard["logger"], standard["level"]) == (
        "Error handling request from [redacted]",
        "aiohttp.server",
        "error",
    )


def test_secrets_passed_to_configure_are_masked_too(written):
    extra = "given-" + secrets.token_hex(8)
    logging_setup.configure(json=True, env={}, file=written, secrets=[extra])

    structlog.get_logger().info("token_seen", where=f"header {extra}")

    [line] = written.getvalue().splitlines()
    assert json.loads(line)["where"] == "header [redacted]"


def test_a_token_given_on_the_command_line_is_masked(written, monkeypatch, capsys):
    token = "cli-" + secrets.token_hex(8)

    def record(args: argparse.Namespace) -> int:
        structlog.get_logger().warning("record_failed", sent=f"header {args.token}")
        return 1

    monkeypatch.setattr(cli, "cmd_record", record)
    monkeypatch.delenv("GOVLEDGER_TOKEN", raising=False)

    assert cli.main(["record", "--token", token, "usage.ndjson"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["sent"] == "header [redacted]"


def test_a_console_traceback_shows_no_locals_and_no_secret(written):
    logging_setup.configure(
        json=False,
        env={"DATABASE_URL": with_password("postgresql://u@h/d")},
        file=written,
    )
    secret = "sk-gl-" + secrets.token_urlsafe(24)

    def failing() -> None:
        token = TOKENS["admin"]  # a local the traceback must not show
        assert token
        raise ValueError(f"bad key {secret} with {PASSWORD}")

    try:
        failing()
    except ValueError:
        structlog.get_logger().exception("request_failed")

    text = written.getvalue()
    assert leaks([text], secret, PASSWORD, TOKENS["admin"]) == []
    assert "ValueError: bad key sk-gl-[redacted] with [redacted]" in text


# --- the real process, configured from its environment ---------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_the_served_process_logs_no_password_token_or_secret(database, session):
    dsn = with_password(database)
    with Fleet(dsn) as fleet:
        served = fleet.start(env=environment(dsn))
        await served.ready(session)
        url = served.url
        status, answer = await call(
            session, "POST", url + KEYS, {"name": "ci"}, headers=ADMIN
        )
        assert status == 201, answer
        secret = answer["virtual_key"]["value"]
        statuses = [
            (await call(session, "GET", url + KEYS))[0],
            (
                await call(
                    session,
                    "GET",
                    url + KEYS,
                    headers={"Authorization": f"Bearer {UNKNOWN_TOKEN}"},
                )
            )[0],
            (
                await call(
                    session,
                    "GET",
                    f"{url}{KEYS}/{secret}",
                    headers={**ADMIN, "X-Request-Id": TOKENS["recorder"]},
                )
            )[0],
            (
                await call(
                    session,
                    "POST",
                    url + CHECK,
                    {"virtual_key": secret, "min_position": answer["position"]},
                    headers={"Authorization": f"Bearer {TOKENS['recorder']}"},
                )
            )[0],
        ]
        assert statuses == [401, 401, 404, 200]
        assert served.stop() == 0
        lines = served.log_text().splitlines()

    assert lines
    assert [line for line in lines if not line.startswith("{")] == []
    assert leaks(lines, PASSWORD, *TOKENS.values(), UNKNOWN_TOKEN, secret) == []
    assert any(json.loads(line).get("request_id") == "[redacted]" for line in lines)
