"""The HTTP edge: the one error → status table, header bytes that are not text, the
error code on 4xx log lines and Retry-After on 503s, through a real aiohttp server."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from service import errors
from service.config import Settings
from service.domain import usage
from service.web import http
from service.web.app import create_app, keepalive_timeout
from tests.api import exchange

TOKENS = {
    "admin_tokens": frozenset({"adm-secret"}),
    "recorder_tokens": frozenset({"rec-secret"}),
}


@pytest.fixture
async def server(database):
    async with TestServer(create_app(Settings(**TOKENS), database)) as server:
        yield server


async def raw_request(
    server: TestServer, head: bytes, body: bytes = b""
) -> tuple[int, dict, bytes]:
    """Send `head` (request line and headers, as bytes) and `body`, then read one
    answer: its status, headers and body (by its Content-Length)."""
    raw = head + b"Connection: close\r\n\r\n" + body
    status, headers, answer, _ = await exchange(
        server.host, server.port, raw, close_within=0
    )
    return status, headers, answer


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
        b"GET /api/governance/teams HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer \xff\xfe\r\n",
    )
    assert (status, json.loads(body)["error"]["code"]) == (401, "unauthorized")


async def test_an_x_request_id_that_is_not_utf8_is_a_400(server) -> None:
    status, headers, body = await raw_request(
        server,
        b"GET /api/governance/teams HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer adm-secret\r\nX-Request-Id: \xff\r\n",
    )
    assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_request")
    assert headers["X-Request-Id"] != "\xff"


async def test_an_overlong_x_request_id_is_a_400(server) -> None:
    status, _, _ = await raw_request(
        server,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: "
        + b"a" * 201
        + b"\r\n",
    )
    assert status == 400


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "message", "allow"),
    [
        ("GET", "/no/such/endpoint", 404, "not_found", "no such endpoint", None),
        (
            "POST",
            "/api/governance/teams/x/y",
            404,
            "not_found",
            "no such endpoint",
            None,
        ),
        (
            "POST",
            "/",
            405,
            "method_not_allowed",
            "this endpoint does not accept that method",
            "GET,HEAD",
        ),
        (
            "DELETE",
            "/api/governance/check",
            405,
            "method_not_allowed",
            "this endpoint does not accept that method",
            "POST",
        ),
        (
            "DELETE",
            "/api/governance/teams",
            405,
            "method_not_allowed",
            "this endpoint does not accept that method",
            "GET,HEAD,POST",
        ),
    ],
)
async def test_what_no_route_takes_is_answered_by_the_edge(
    server, method, path, status, code, message, allow
) -> None:
    async with TestClient(server) as client:
        with capture_logs() as logs:
            response = await client.request(
                method,
                path,
                headers={"Authorization": "Bearer adm-secret", "X-Request-Id": "r1"},
            )
            body = await response.json()
    finished = [e for e in logs if e["event"] == "request_finished"]
    assert (response.status, body) == (
        status,
        {"error": {"code": code, "message": message}},
    )
    assert response.headers["X-Request-Id"] == "r1"
    allowed = response.headers.get("Allow")
    assert (None if allowed is None else ",".join(sorted(allowed.split(",")))) == allow
    assert [(e["status"], e["code"]) for e in finished] == [(status, code)]


def test_the_app_runs_no_aiohttp_middleware(database) -> None:
    # Every route is wrapped by `http.guarded` instead: any aiohttp middleware makes
    # aiohttp build a chain and add its own on every request (the check's cost).
    assert list(create_app(Settings(**TOKENS), database).middlewares) == []


async def test_what_a_request_binds_for_its_log_lines_dies_with_it() -> None:
    # The guard binds request_id, method and path and clears nothing: each request
    # runs in a task of its own, with a copy of its connection's context.
    seen: list[tuple[int, dict[str, object]]] = []

    async def look(request: web.Request) -> web.Response:
        seen.append((id(request.protocol), structlog.contextvars.get_contextvars()))
        if request.method == "POST":  # as a command binds its position
            structlog.contextvars.bind_contextvars(position=7, team="t")
        return web.Response()

    settings = Settings()
    app = web.Application()
    for method in ("POST", "GET"):
        app.router.add_route(
            method, "/look", http.guarded(look, http.Right.PUBLIC, settings, quiet=True)
        )
    async with TestClient(TestServer(app)) as client:
        for method, request_id in (("POST", "first"), ("GET", "second")):
            answer = await client.request(
                method, "/look", headers={"X-Request-Id": request_id}
            )
            assert answer.status == 200
            await answer.read()
    [(first_connection, first), (second_connection, second)] = seen
    assert first_connection == second_connection  # one kept-alive connection
    assert (first, second) == (
        {"request_id": "first", "method": "POST", "path": "/look"},
        {"request_id": "second", "method": "GET", "path": "/look"},
    )


ADMIN = {"Authorization": "Bearer adm-secret"}


@pytest.mark.parametrize(
    "path",
    [
        "/healthz",
        "/api/openapi.json",
        "/",
        "/metrics",
        "/api/governance/teams",
        "/api/governance/teams/00000000-0000-0000-0000-000000000000",
        "/api/governance/teams?min_position=999999999",
    ],
)
async def test_every_get_also_answers_head_with_its_status_and_headers(
    server, path
) -> None:
    async with TestClient(server) as client:
        got = await client.get(path, headers=ADMIN)
        await got.read()
        head = await client.head(path, headers=ADMIN)
        body = await head.read()
    assert (head.status, body) == (got.status, b"")
    for name in ("Content-Type", "Content-Length", "Retry-After"):
        assert head.headers.get(name) == got.headers.get(name)


async def test_head_keeps_the_routes_right_and_its_refusals(server) -> None:
    async with TestClient(server) as client:
        unauthorized = await client.head("/api/governance/teams")
        not_allowed = await client.head("/api/governance/check", headers=ADMIN)
        stream = await client.head("/api/dashboard/events", headers=ADMIN)
        stream_body = await asyncio.wait_for(stream.read(), 10)
    assert unauthorized.status == 401
    assert (not_allowed.status, not_allowed.headers["Allow"]) == (405, "POST")
    # A stream answers its headers and ends, as any HEAD.
    assert (stream.status, stream.headers["Content-Type"], stream_body) == (
        200,
        "text/event-stream",
        b"",
    )


async def test_the_openapi_document_leaves_the_head_twins_implied(server) -> None:
    async with TestClient(server) as client:
        document = await (await client.get("/api/openapi.json")).json()
    methods = {m for operations in document["paths"].values() for m in operations}
    assert methods == {"get", "post", "put", "delete"}


async def test_the_usage_stream_without_an_upgrade_says_what_it_takes(server) -> None:
    async with TestClient(server) as client:
        response = await client.get(
            "/api/usage/stream", headers={"Authorization": "Bearer rec-secret"}
        )
        body = await response.json()
    assert (response.status, body) == (
        400,
        {
            "error": {
                "code": "invalid_request",
                "message": "this endpoint takes a WebSocket: a GET with the headers"
                " Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13"
                " and Sec-WebSocket-Key (16 bytes in base64)",
            }
        },
    )


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


# --- cross-site requests in open mode ------------------------------------------------


@pytest.fixture
async def open_server(database):
    settings = Settings(allowed_origins=frozenset({"http://console.example"}))
    async with TestServer(create_app(settings, database)) as server:
        yield server


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/octet-stream", "application/x-www-form-urlencoded"],
)
async def test_open_mode_refuses_a_body_not_declared_as_json(
    open_server, content_type
) -> None:
    async with TestClient(open_server) as client:
        response = await client.post(
            "/api/governance/customers",
            data=b'{"name": "acme"}',
            headers={"Content-Type": content_type},
        )
        body = await response.json()
        events = await client.get("/api/events")
        log = await events.json()
    assert (response.status, body["error"]["code"]) == (415, "unsupported_media_type")
    assert log["events"] == []


async def test_open_mode_takes_a_body_declared_as_json(open_server) -> None:
    async with TestClient(open_server) as client:
        response = await client.post("/api/governance/customers", json={"name": "acme"})
    assert response.status == 201


async def test_with_tokens_a_body_without_content_type_is_still_read(server) -> None:
    status, _, _ = await raw_request(
        server,
        b"POST /api/governance/customers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer adm-secret\r\nContent-Length: 16\r\n",
        b'{"name": "acme"}',
    )
    assert status == 201


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://evil.example", False),
        ("null", False),
        ("http://console.example", True),
        ("HTTP://Console.Example/", True),
        (None, True),  # not a browser: nothing to forge
    ],
)
async def test_open_mode_refuses_a_websocket_from_a_foreign_origin(
    open_server, origin, allowed
) -> None:
    headers = {} if origin is None else {"Origin": origin}
    async with TestClient(open_server) as client:
        if allowed:
            ws = await client.ws_connect("/api/usage/stream", headers=headers)
            await ws.close()
        else:
            response = await client.get(
                "/api/usage/stream",
                headers={
                    **headers,
                    "Connection": "Upgrade",
                    "Upgrade": "websocket",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                },
            )
            body = await response.json()
            assert (response.status, body["error"]["code"]) == (403, "forbidden")


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8080", True),
        ("localhost", True),
        ("LOCALHOST:8080", True),
        ("[::1]:8080", True),
        ("127.0.0.2", True),
        ("app.localhost:8080", True),
        ("0.0.0.0:8080", True),  # what some clients address loopback by
        ("[::]:8080", True),
        ("console.example", True),  # listed in GOVLEDGER_ALLOWED_ORIGINS
        ("rebind.attacker.example:8080", False),
        ("10.0.0.5", False),
        ("[fe80::1]:8080", False),
    ],
)
async def test_open_mode_answers_only_requests_addressed_to_a_loopback_name(
    open_server, host, allowed
) -> None:
    """A page that rebinds its own name to 127.0.0.1 is same-origin to the browser,
    so no cross-site rule stops it (its WebSocket's Origin matched the Host it
    sent): but its requests name its host, and without tokens only a loopback name
    (or a listed origin's host) is answered."""
    status, _, body = await raw_request(
        open_server,
        b"GET /api/governance/teams HTTP/1.1\r\nHost: " + host.encode() + b"\r\n",
    )
    if allowed:
        assert status == 200, body
    else:
        assert (status, json.loads(body)["error"]["code"]) == (403, "forbidden")
        assert host in json.loads(body)["error"]["message"]


async def test_open_mode_takes_a_websocket_from_its_own_origin(open_server) -> None:
    own = f"http://{open_server.host}:{open_server.port}"
    async with TestClient(open_server) as client:
        ws = await client.ws_connect("/api/usage/stream", headers={"Origin": own})
        await ws.close()


# --- slow senders ---------------------------------------------------------------


async def test_a_body_shorter_than_its_content_length_times_out_with_a_408(
    database,
) -> None:
    settings = Settings(**TOKENS, body_timeout_s=0.3)
    async with TestServer(create_app(settings, database)) as slow:
        status, _, body = await raw_request(
            slow,
            b"POST /api/governance/customers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer adm-secret\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n",
            b'{"name":',
        )
    assert (status, json.loads(body)["error"]["code"]) == (408, "body_timeout")


async def test_a_request_head_that_never_ends_is_closed(database) -> None:
    settings = Settings(**TOKENS, header_timeout_s=0.3)
    slow = TestServer(create_app(settings, database))
    await slow.start_server(keepalive_timeout=keepalive_timeout(settings))
    try:
        reader, writer = await asyncio.open_connection(slow.host, slow.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
    finally:
        await slow.close()
    assert closed == b""


# --- one value per header and query parameter; ids as UUIDs; bodies cut short -------

CUSTOMERS = "/api/governance/customers"


async def created_customer(server: TestServer) -> str:
    """A new customer's id, once the read model has applied it."""
    status, _, body = await raw_request(
        server,
        b"POST /api/governance/customers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer adm-secret\r\nContent-Type: application/json\r\n"
        b"Content-Length: 12\r\n",
        b'{"name":"c"}',
    )
    assert status == 201, body
    created = json.loads(body)
    customer = str(created["customer"]["id"])
    status, _, body = await get(server, f"{CUSTOMERS}/{customer}", created["position"])
    assert status == 200, body
    return customer


async def get(
    server: TestServer, path: str, min_position: int | None = None
) -> tuple[int, dict, bytes]:
    if min_position is not None:
        path += ("&" if "?" in path else "?") + f"min_position={min_position}"
    return await raw_request(
        server,
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Authorization: Bearer adm-secret\r\n".encode(),
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        # Two tokens: which did the client mean? Neither, whichever comes first.
        (
            b"Authorization: Bearer adm-secret\r\nAuthorization: Bearer rec-secret\r\n",
            401,
        ),
        (
            b"Authorization: Bearer rec-secret\r\nAuthorization: Bearer adm-secret\r\n",
            401,
        ),
        (
            b"Authorization: Bearer adm-secret\r\n"
            b"Idempotency-Key: a\r\nIdempotency-Key: b\r\n",
            400,
        ),
        (b"Authorization: Bearer adm-secret\r\nIf-Match: 1\r\nIf-Match: 2\r\n", 400),
    ],
)
async def test_a_header_sent_twice_is_refused(server, headers, status):
    customer = await created_customer(server)
    body = b'{"name":"renamed"}'

    answer = await raw_request(
        server,
        f"PUT {CUSTOMERS}/{customer} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        + headers
        + b"Content-Type: application/json\r\nContent-Length: 18\r\n",
        body,
    )

    assert (answer[0], json.loads(answer[2])["error"]["code"]) == (
        status,
        "unauthorized" if status == 401 else "invalid_request",
    )


@pytest.mark.parametrize(
    "query",
    [
        "?min_position=1&min_position=999999",
        "?owner_type=team&owner_type=customer",
        "?owner_id={id}&owner_id=abc",
    ],
)
async def test_a_query_parameter_given_twice_is_a_400(server, query):
    customer = await created_customer(server)
    path = "/api/governance/budgets" + query.format(id=customer)

    status, _, body = await get(server, path)

    assert status == 400
    assert json.loads(body)["error"]["code"] in {"invalid_request", "invalid_position"}


@pytest.mark.parametrize(
    "spelling",
    [
        "{hex}",  # no hyphens
        "urn:uuid:{id}",
        "%7B{id}%7D",  # braces
        "{id}0",
    ],
)
async def test_an_id_spelled_other_than_a_uuid_names_nothing(server, spelling):
    customer = await created_customer(server)
    other = spelling.format(id=customer, hex=customer.replace("-", ""))

    in_path = await get(server, f"{CUSTOMERS}/{other}")
    in_query = await get(server, f"/api/governance/teams?customer_id={other}")
    upper = await get(server, f"{CUSTOMERS}/{customer.upper()}")

    assert (in_path[0], json.loads(in_path[2])["error"]["code"]) == (404, "not_found")
    assert (in_query[0], json.loads(in_query[2])["error"]["code"]) == (
        400,
        "invalid_request",
    )
    assert (upper[0], json.loads(upper[2])["customer"]["id"]) == (200, customer)


@pytest.mark.parametrize(
    "content_type", [b"text/plain", b"application/x-www-form-urlencoded"]
)
async def test_a_delete_with_a_form_body_is_refused_and_deletes_nothing(
    server, content_type
):
    customer = await created_customer(server)

    status, _, body = await raw_request(
        server,
        f"DELETE {CUSTOMERS}/{customer} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        + b"Authorization: Bearer adm-secret\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: 3\r\n",
        b"a=b",
    )
    found = await get(server, f"{CUSTOMERS}/{customer}")

    assert (status, json.loads(body)["error"]["code"]) == (
        415,
        "unsupported_media_type",
    )
    assert found[0] == 200


CREATE_HEAD = (
    b"POST /api/governance/customers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Authorization: Bearer adm-secret\r\nContent-Type: application/json\r\n"
    b"Content-Length: 12\r\n"
)


async def test_expect_100_continue_gets_its_interim_answer_before_the_body(
    server,
) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(CREATE_HEAD + b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(b'{"name":"c"}')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (head.split(b"\r\n")[0], json.loads(body)["customer"]["name"]) == (
        b"HTTP/1.1 201 Created",
        "c",
    )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [(b'{"name":"c"}', 201, None), (b'{"nom":"cc"}', 400, "invalid_request")],
)
async def test_an_unknown_expectation_is_passed_over_and_the_request_answered(
    server, body, status, code
) -> None:
    answer = await raw_request(server, CREATE_HEAD + b"Expect: 999-nope\r\n", body)

    assert (answer[0], answer[1]["Content-Type"]) == (status, "application/json")
    assert json.loads(answer[2]).get("error", {}).get("code") == code


async def test_a_target_that_is_not_a_path_is_answered_by_the_edge(server) -> None:
    answer = await raw_request(server, b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    assert (answer[0], answer[1]["Content-Type"], json.loads(answer[2])) == (
        404,
        "application/json",
        {"error": {"code": "not_found", "message": "no such endpoint"}},
    )


@pytest.mark.parametrize(
    "handshake",
    [
        b"Sec-WebSocket-Version: 12\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n",
    ],
)
async def test_a_websocket_handshake_of_another_version_or_key_says_what_it_takes(
    server, handshake
) -> None:
    answer = await raw_request(
        server,
        b"GET /api/usage/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer rec-secret\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n" + handshake,
    )

    assert (answer[0], json.loads(answer[2])["error"]["message"]) == (
        400,
        "this endpoint takes a WebSocket: a GET with the headers Connection: Upgrade,"
        " Upgrade: websocket, Sec-WebSocket-Version: 13 and Sec-WebSocket-Key (16"
        " bytes in base64)",
    )
