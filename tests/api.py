"""The one helper of the HTTP tests: the service on a real aiohttp server (`serve`),
`Api.call()` answering `(status, body)`, WebSocket frames, raw bytes on the wire
(`exchange`), the one wait for the projections (`Api.caught_up`), and the
conformance check every answer passes: each JSON answer must match the response
schema the service's own `/api/openapi.json` gives its operation and status, with no
property the schema does not declare."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jsonschema_rs
from aiohttp import ClientResponse, ClientWebSocketResponse, WSMessage, web
from aiohttp.test_utils import TestClient, TestServer

from service.config import Settings
from service.web.app import create_app
from service.web.keys import cache_projector_key, governance_projector_key

JSON = "application/json"
NDJSON = "application/x-ndjson"
OPENAPI = "/api/openapi.json"
USAGE_STREAM = "/api/usage/stream"
# Every wait of a test on the service is bounded by this.
WITHIN_S = 10.0

# --- conformance -------------------------------------------------------------------


class Conformance:
    """The response schemas of the OpenAPI document, each compiled once, with every
    object schema that lists `properties` closed to any other property (unless the
    document says otherwise)."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.paths: Mapping[str, Mapping[str, Any]] = document["paths"]
        self._components = {
            name: {k: _strict(v) for k, v in group.items()}
            if name == "schemas"
            else group
            for name, group in document["components"].items()
        }
        # Literal paths before templates: /budgets/{id}/periods never shadows one.
        self._templates = [
            (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(p)) + "$"), p)
            for p in sorted(self.paths, key=lambda p: "{" in p)
        ]
        self._validators: dict[tuple[str, ...], jsonschema_rs.Validator] = {}

    def check(
        self, method: str, path: str, status: int, media: str | None, body: bytes | None
    ) -> None:
        """Fail unless this answer is one the document gives the operation: its
        status, its media type and, for JSON, its schema (`body` None: a stream,
        left unread)."""
        if method.upper() == "HEAD":
            # A GET's twin: the GET's statuses and media types, never a body.
            assert not body, f"HEAD {path} answered with a body: {body!r:.300}"
            method, body = "GET", None
        operation, label = self._operation(method, path)
        if operation is None:
            # No route: the router's 404 or 405, in the error shape.
            assert status >= 400, f"{label} answered {status}: no such operation"
            if body is None:  # a HEAD's
                return
            self._validate(
                ("Error",),
                {"$ref": "#/components/schemas/Error"},
                label,
                status,
                _parse(label, status, body),
            )
            return
        answer = operation["responses"].get(str(status))
        assert answer is not None, (
            f"{label} answered {status}, which the document does not list"
            f" (it lists {', '.join(operation['responses'])}): {body!r:.300}"
        )
        content = answer.get("content")
        if content is None:
            assert not body, f"{label} answered {status} with a body: {body!r:.300}"
            return
        assert media in content, (
            f"{label} answered {status} as {media}; the document says"
            f" {', '.join(content)}"
        )
        if media == JSON and body is not None:
            key = (method.upper(), self._template(path) or path, str(status))
            self._validate(
                key, content[JSON]["schema"], label, status, _parse(label, status, body)
            )

    def check_answer(self, method: str, path: str, status: int, answer: Any) -> None:
        """`check` for an answer already parsed from JSON."""
        self.check(method, path, status, JSON, json.dumps(answer).encode())

    def check_frame(self, frame: Any) -> None:
        """A server frame of the usage stream: an ack, or an error frame."""
        frames = self.paths[USAGE_STREAM]["get"]["x-websocket"]
        error = isinstance(frame, dict) and "error" in frame
        kind = "error_frame" if error else "ack_frame"
        self._validate(
            ("frame", kind), frames[kind], f"GET {USAGE_STREAM} ({kind})", 101, frame
        )

    def _template(self, path: str) -> str | None:
        path = urlsplit(path).path
        return next((p for pattern, p in self._templates if pattern.match(path)), None)

    def _operation(
        self, method: str, path: str
    ) -> tuple[Mapping[str, Any] | None, str]:
        template = self._template(path)
        if template is None:
            return None, f"{method.upper()} {path}"
        operation = self.paths[template].get(method.lower())
        if operation is None:
            return None, f"{method.upper()} {template}"
        return operation, f"{method.upper()} {template} ({operation['operationId']})"

    def _validate(
        self,
        key: tuple[str, ...],
        schema: Mapping[str, Any],
        label: str,
        status: int,
        instance: Any,
    ) -> None:
        validator = self._validators.get(key)
        if validator is None:
            root = {**_strict(dict(schema)), "components": self._components}
            validator = self._validators[key] = jsonschema_rs.validator_for(
                root, validate_formats=True
            )
        errors = [
            f"  at {_json_path(e.instance_path)}: {e.message}"
            for e in validator.iter_errors(instance)
        ]
        assert not errors, (
            f"{label} answered {status} off its schema:\n"
            + "\n".join(errors)
            + f"\n  answer: {json.dumps(instance)[:500]}"
        )


def _parse(label: str, status: int, body: bytes | None) -> Any:
    try:
        return json.loads(body or b"")
    except ValueError:
        raise AssertionError(
            f"{label} answered {status} with a body that is not JSON: {body!r:.300}"
        ) from None


def _json_path(parts: list[str | int]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object schema lists
    its properties and leaves other properties unsaid."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and "unevaluatedProperties" not in out:
            out["additionalProperties"] = False
    for word in ("items", "additionalProperties", "not", "if", "then", "else"):
        if isinstance(out.get(word), dict):
            out[word] = _strict(out[word])
    for word in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if word in out:
            out[word] = [_strict(s) for s in out[word]]
    for word in ("$defs", "patternProperties"):
        if word in out:
            out[word] = {k: _strict(v) for k, v in out[word].items()}
    return out


# The document of this code base: the same for every app, fetched once per session.
_conformance: list[Conformance] = []


async def conformance(session: aiohttp.ClientSession, base_url: str) -> Conformance:
    """The conformance check of the service at `base_url` (fetched the first time)."""
    if not _conformance:
        async with session.get(base_url.rstrip("/") + OPENAPI) as response:
            assert response.status == 200, await response.text()
            _conformance.append(Conformance(await response.json()))
    return _conformance[0]


# --- the service on a test server -------------------------------------------------


class Api:
    """A client of one running service: every answer it reads is checked for
    conformance. `headers` go with every request (a token, usually); `app` is the
    application when it runs in this process (`serve`), None for a subprocess."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        conformance: Conformance,
        headers: Mapping[str, str] | None = None,
        app: web.Application | None = None,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.conformance = conformance
        self.headers = dict(headers or {})
        self._app = app

    @property
    def app(self) -> web.Application:
        assert self._app is not None, "the service runs in another process"
        return self._app

    def url(self, path: str) -> str:
        return self.base_url + path

    def with_headers(self, headers: Mapping[str, str]) -> Api:
        """The same service with other default headers (`{}`: none)."""
        return Api(self.session, self.base_url, self.conformance, headers, self._app)

    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        data: Any = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ClientResponse:
        """Send `json`, or raw `data` declared as `content_type`; the answer, read
        and checked (a stream of Server-Sent Events is left unread)."""
        sent = {**self.headers, **(headers or {})}
        if content_type is not None:
            sent["Content-Type"] = content_type
        response = await self.session.request(
            method, self.url(path), json=json, data=data, headers=sent
        )
        stream = response.content_type == "text/event-stream"
        body = None if stream else await response.read()
        self.conformance.check(
            method, path, response.status, response.content_type, body
        )
        return response

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        data: Any = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        exact: bool = False,
    ) -> tuple[int, Any]:
        """`(status, body)`: JSON parsed (with Decimal money when `exact`), any other
        answer as text."""
        response = await self.request(
            method, path, json, data=data, content_type=content_type, headers=headers
        )
        text = await response.text()
        if response.content_type != JSON:
            return response.status, text
        return response.status, _loads(text, exact)

    async def create(
        self,
        path: str,
        body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """POST a command that must answer 201; its answer."""
        status, answer = await self.call("POST", path, body, headers=headers)
        assert status == 201, answer
        return dict(answer)

    @asynccontextmanager
    async def socket(
        self, path: str = USAGE_STREAM, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Socket]:
        async with self.session.ws_connect(
            self.url(path), headers={**self.headers, **(headers or {})}
        ) as ws:
            yield Socket(ws, self.conformance)

    async def caught_up(self, position: int, within_s: float = WITHIN_S) -> None:
        """Return once the read model and the cache have applied `position`: the
        wait `?min_position=` makes, not a sleep."""
        await self.app[governance_projector_key].wait_for(position, within_s)
        await self.app[cache_projector_key].wait_for(position, within_s)


class Socket:
    """A client WebSocket whose JSON frames from the server are checked."""

    def __init__(self, ws: ClientWebSocketResponse, conformance: Conformance) -> None:
        self.ws = ws
        self._conformance = conformance

    @property
    def closed(self) -> bool:
        return self.ws.closed

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def send_str(self, data: str) -> None:
        await self.ws.send_str(data)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def send_json(self, frame: Any) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def receive(self, timeout: float = WITHIN_S) -> WSMessage:  # noqa: ASYNC109
        return await self.ws.receive(timeout=timeout)

    async def receive_json(self, timeout: float = WITHIN_S) -> Any:  # noqa: ASYNC109
        message = await self.ws.receive(timeout=timeout)
        assert message.type is aiohttp.WSMsgType.TEXT, message
        frame = json.loads(message.data)
        self._conformance.check_frame(frame)
        return frame


@asynccontextmanager
async def serving(
    app: web.Application, headers: Mapping[str, str] | None = None
) -> AsyncIterator[Api]:
    """`app` on a loopback test server."""
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        base = str(client.make_url(""))
        found = await conformance(client.session, base)
        yield Api(client.session, base, found, headers, app)


@asynccontextmanager
async def serve(
    database: str,
    settings: Settings | None = None,
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[Api]:
    """The service (`Settings()` unless given) on `database`."""
    async with serving(create_app(settings or Settings(), database), headers) as api:
        yield api


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _loads(text: str, exact: bool) -> Any:
    return json.loads(text, parse_float=Decimal) if exact else json.loads(text)


# --- raw bytes on the wire ---------------------------------------------------------


async def exchange(
    host: str, port: int, raw: bytes, *, close_within: float = 1.0
) -> tuple[int, dict, bytes, bool]:
    """Send `raw` (bytes as they go on the wire, well-formed or not) on a new
    connection and read one answer: (status, headers, body, whether the server then
    closed the connection within `close_within` seconds; 0: not waited for, False)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers.get("Content-Length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        closed = False
        if close_within > 0:
            with suppress(TimeoutError):
                closed = await asyncio.wait_for(reader.read(), close_within) == b""
    finally:
        writer.close()
        await writer.wait_closed()
    return int(lines[0].split()[1]), headers, body, closed
