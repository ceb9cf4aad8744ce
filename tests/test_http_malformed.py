"""Requests that are not HTTP: answered like every other refusal (a JSON 400
`invalid_request` with a sentence and an X-Request-Id), logged as one info line,
never echoing the bytes they carried, through the service's own runner
(`service.web.server`) and through a real `govledger serve`. Beside them, what
that runner alone routes: CONNECT, whose target aiohttp reads as no path."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import compression_utils, web
from structlog.testing import capture_logs

from service.config import Settings
from service.web.app import create_app
from service.web.server import AppRunner, reason
from tests.api import exchange
from tests.served import Fleet

SECRET = "sk-gl-Zm9yLXRoZS10ZXN0LW9ubHk"


@pytest.fixture
async def edge(database: str) -> AsyncIterator[tuple[str, int]]:
    """The app behind the service's runner, on a free loopback port."""
    runner = AppRunner(create_app(Settings(), database))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield "127.0.0.1", runner.addresses[0][1]
    finally:
        await runner.cleanup()


MALFORMED = [
    (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        "invalid character in Content-Length",
    ),
    (
        b"POST /api/usage HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
        "invalid character in chunk size",
    ),
    (
        b"POST /api/usage HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\n\r\n0\r\n\r\n",
        "Content-Length can't be present with Transfer-Encoding",
    ),
    (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nNo Colon\r\n\r\n",
        "invalid header token",
    ),
    (b"G@T /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "invalid method encountered"),
    (
        b"GET /healthz HTTP/7.1\r\nHost: 127.0.0.1\r\n\r\n",
        "bad status line: invalid HTTP version",
    ),
    (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: "
        + b"a" * 9000
        + b"\r\n\r\n",
        "got more than 8190 bytes when reading",
    ),
    (
        b"GET * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "the request target is neither a path nor an absolute URL",
    ),
    (
        b"GET http://[" + SECRET.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "the request target is neither a path nor an absolute URL",
    ),
    (
        b"CONNECT :: HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "the request target is neither a path nor an absolute URL",
    ),
    (b"GET /a\x7f HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "invalid char in url path"),
    (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + SECRET.encode()
        + b"\x01\r\n\r\n",
        "invalid header value char",
    ),
]


@pytest.mark.parametrize(("raw", "why"), MALFORMED)
async def test_a_request_that_is_not_http_gets_the_services_json_400(
    edge, raw, why
) -> None:
    with capture_logs() as logs:
        status, headers, body, closed = await exchange(*edge, raw)

    assert (status, headers["Content-Type"], json.loads(body), closed) == (
        400,
        "application/json",
        {
            "error": {
                "code": "invalid_request",
                "message": f"the request is not well-formed HTTP/1.1: {why}",
            }
        },
        True,
    )
    assert [
        (line["log_level"], line["event"], line["code"], line["request_id"])
        for line in logs
    ] == [("info", "request_finished", "invalid_request", headers["X-Request-Id"])]
    assert SECRET not in json.dumps(logs) + body.decode()


async def test_a_well_formed_request_on_the_same_runner_is_served(edge) -> None:
    status, headers, body, _ = await exchange(
        *edge, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )

    assert (status, headers["Content-Type"], json.loads(body)) == (
        200,
        "application/json",
        {"status": "ok"},
    )


@pytest.mark.parametrize(
    ("target", "status", "code", "allow"),
    [
        (b"example.com:443", 404, "not_found", None),
        (b"/healthz", 405, "method_not_allowed", "GET,HEAD"),
        (b"/api/governance/customers", 405, "method_not_allowed", "GET,HEAD,POST"),
    ],
)
async def test_connect_is_routed_as_any_method_no_route_takes(
    edge, target, status, code, allow
) -> None:
    answer, headers, body, _ = await exchange(
        *edge,
        b"CONNECT " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        close_within=0,
    )

    assert (answer, headers["Content-Type"], headers.get("Allow")) == (
        status,
        "application/json",
        allow,
    )
    assert json.loads(body)["error"]["code"] == code


async def test_after_a_refused_connect_the_connection_serves_the_next_request(
    edge,
) -> None:
    reader, writer = await asyncio.open_connection(*edge)
    try:
        writer.write(
            b"CONNECT /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        answers = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()

    assert re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", answers) == [
        b"HTTP/1.1 405 Method Not Allowed",
        b"HTTP/1.1 200 OK",
    ]
    assert answers.endswith(b'{"status":"ok"}')


# Codings aiohttp knows but cannot decode without a library that is not installed.
UNDECODED = [
    coding
    for coding, decoded in (
        ("br", compression_utils.HAS_BROTLI),
        ("zstd", compression_utils.HAS_ZSTD),
    )
    if not decoded
]


@pytest.mark.skipif(not UNDECODED, reason="every coding aiohttp knows is decoded")
@pytest.mark.parametrize("coding", UNDECODED)
async def test_a_body_coding_not_decoded_here_is_a_415_naming_those_that_are(
    edge, coding
) -> None:
    status, headers, body, closed = await exchange(
        *edge,
        b"POST /api/governance/customers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Encoding: "
        + coding.encode()
        + b"\r\nContent-Length: 2\r\n\r\n{}",
    )

    assert (status, headers["Accept-Encoding"], json.loads(body), closed) == (
        415,
        "gzip, deflate",
        {
            "error": {
                "code": "unsupported_media_type",
                "message": "the body's Content-Encoding is not one this service"
                " decodes: send it as gzip or deflate, or without one",
            }
        },
        True,
    )


@pytest.mark.parametrize(
    ("description", "sentence"),
    [
        (
            "Bad status line:\n  Invalid HTTP version:\n\n"
            "  b'GET / HTTP/7.1'\n               ^",
            "bad status line: invalid HTTP version",
        ),
        (
            "Invalid character in Content-Length:\n\n"
            "  b'Content-Length: abc'\n                  ^",
            "invalid character in Content-Length",
        ),
        (
            "Got more than 8190 bytes when reading: b'aaaa...'.",
            "got more than 8190 bytes when reading",
        ),
        (
            "Content-Length can't be present with Transfer-Encoding",
            "Content-Length can't be present with Transfer-Encoding",
        ),
        ("", "it cannot be parsed"),
        (None, "it cannot be parsed"),
        ("  b'only the bytes'\n  ^", "it cannot be parsed"),
        ("x" * 300, "x" * 200),
    ],
)
def test_the_reason_keeps_what_aiohttp_found_and_drops_the_bytes(
    description, sentence
) -> None:
    assert reason(description) == sentence


async def test_govledger_serve_answers_a_request_that_is_not_http_in_json(
    database,
) -> None:
    with Fleet(database) as fleet:
        served = fleet.start()
        async with aiohttp.ClientSession() as session:
            await served.ready(session)
        status, headers, body, closed = await exchange(
            "127.0.0.1",
            served.port,
            b"GET /healthz HTTP/7.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        assert served.stop() == 0
        lines = [json.loads(line) for line in served.log_text().splitlines()]

    assert (status, json.loads(body)["error"]["code"], closed) == (
        400,
        "invalid_request",
        True,
    )
    assert [
        (line["level"], line.get("code"))
        for line in lines
        if line.get("request_id") == headers["X-Request-Id"]
    ] == [("info", "invalid_request")]
    assert [line for line in lines if line["level"] == "error"] == []


@pytest.mark.parametrize(
    ("declared", "sentence"),
    [
        (
            b"Content-Type: application/json; charset=\xff\r\n",
            "the Content-Type header is not well-formed UTF-8 text",
        ),
        (
            b"Content-Type: ;;;===\r\n",
            "the Content-Type header is not a media type: send type/subtype,"
            " e.g. application/json, then any parameters",
        ),
    ],
)
async def test_a_content_type_that_is_no_media_type_is_a_400(
    edge, pool, declared, sentence
) -> None:
    """Like every header: not UTF-8 text, or not what it must be, is a 400 (a
    charset of \\xff was read past and the body taken; ;;;=== was a 415 that named
    application/octet-stream). aiohttp refuses it sent twice itself."""
    before = await pool.fetchval("SELECT count(*) FROM events")

    status, _, body, _ = await exchange(
        *edge,
        b"POST /api/governance/customers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + declared
        + b'Content-Length: 12\r\nConnection: close\r\n\r\n{"name":"a"}',
        close_within=0,
    )

    assert (status, json.loads(body)) == (
        400,
        {"error": {"code": "invalid_request", "message": sentence}},
    )
    assert await pool.fetchval("SELECT count(*) FROM events") == before


async def test_a_body_that_cannot_be_read_to_its_end_closes_the_connection(
    edge,
) -> None:
    """What is left of such a body is still on the connection: the 400 says the
    connection ends (the next request on it met a reset before)."""
    status, headers, body, closed = await exchange(
        *edge,
        b"POST /api/governance/customers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 8\r\n\r\ngarbage!",
    )

    assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_request")
    assert (headers.get("Connection"), closed) == ("close", True)
