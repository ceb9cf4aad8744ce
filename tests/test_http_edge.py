"""The HTTP edge: the one error → status table, header bytes that are not text, the
error code on 4xx log lines and Retry-After on 503s, through a real aiohttp server."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from service import errors
from service.config import Settings
from service.domain import usage
from service.web import http
from service.web.app import create_app

TOKENS = {
    "admin_tokens": frozenset({"adm-secret"}),
    "recorder_tokens": frozenset({"rec-secret"}),
}


@pytest.fixture
async def server(database):
    async with TestServer(create_app(Settings(**TOKENS), database)) as server:
        yield server


async def raw_request(server: TestServer, head: bytes) -> tuple[int, dict, bytes]:
    """Send `head` (request line and headers, as bytes) and read the whole answer."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head + b"Connection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_part, _, body = raw.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, body


def test_every_usage_rejection_code_has_its_status_in_the_one_table() -> None:
    codes = {
        value.code
        for value in vars(usage).values()
        if isinstance(value, usage.Rejection)
    } | {usage.invalid_record(msgspec.DecodeError("x")).code}
    assert {code: http.status_of_code(code) for code in codes} == dict.fromkeys(
        codes, 400
    )


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.Invalid, 400),
        (errors.InvalidResetDuration, 400),
        (errors.Unauthorized, 401),
        (errors.Forbidden, 403),
        (errors.NotFound, 404),
        (errors.MethodNotAllowed, 405),
        (errors.VersionConflict, 409),
        (errors.BodyTooLarge, 413),
        (errors.IdempotencyConflict, 422),
        (errors.Unavailable, 503),
        (errors.ProjectionLag, 503),
        (errors.ServiceError, 500),
    ],
)
def test_the_table_gives_each_error_its_status(error, status) -> None:
    assert http.status_of(error) == status


def test_any_other_exception_is_an_internal_error() -> None:
    error = http.as_service_error(KeyError("boom"))
    assert (type(error), error.code, http.status_of(type(error))) == (
        errors.ServiceError,
        "internal_error",
        500,
    )


def test_an_unreachable_database_is_a_503() -> None:
    error = http.as_service_error(ConnectionRefusedError())
    assert (error.code, http.status_of(type(error))) == ("database_unavailable", 503)


async def test_an_authorization_header_that_is_not_utf8_is_a_401(server) -> None:
    status, _, body = await raw_request(
        server,
        b"GET /api/governance/teams HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer \xff\xfe\r\n",
    )
    assert (status, json.loads(body)["error"]["code"]) == (401, "unauthorized")


async def test_an_x_request_id_that_is_not_utf8_is_a_400(server) -> None:
    status, headers, body = await raw_request(
        server,
        b"GET /api/governance/teams HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer adm-secret\r\nX-Request-Id: \xff\r\n",
    )
    assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_request")
    assert headers["X-Request-Id"] != "\xff"


async def test_an_overlong_x_request_id_is_a_400(server) -> None:
    status, _, _ = await raw_request(
        server,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + b"a" * 201 + b"\r\n",
    )
    assert status == 400


async def test_a_4xx_log_line_carries_the_error_code(server) -> None:
    async with TestClient(server) as client:
        with capture_logs() as logs:
            response = await client.get(
                "/api/governance/teams", headers={"Authorization": "Bearer nope"}
            )
    finished = [e for e in logs if e["event"] == "request_finished"]
    assert response.status == 401
    assert [(e["status"], e["code"]) for e in finished] == [(401, "unauthorized")]


async def test_a_rejected_usage_record_is_logged_with_its_code(server) -> None:
    async with TestClient(server) as client:
        with capture_logs() as logs:
            response = await client.post(
                "/api/usage",
                json={"virtual_key": "sk-gl-x"},
                headers={"Authorization": "Bearer rec-secret"},
            )
    finished = [e for e in logs if e["event"] == "request_finished"]
    assert response.status == 400
    assert [(e["status"], e["code"]) for e in finished] == [(400, "invalid_record")]


async def test_a_503_says_when_to_retry(server) -> None:
    async with TestClient(server) as client:
        response = await client.get(
            "/api/governance/teams?min_position=999999999",
            headers={"Authorization": "Bearer adm-secret"},
        )
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (503, "projection_lag")
    assert response.headers["Retry-After"] == "1"
