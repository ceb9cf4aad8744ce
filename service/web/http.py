"""The HTTP edge: the one error → status table, the one guard around every route
(request log, auth, errors), body and header decoding, JSON answers."""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import itertools
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum
from time import perf_counter
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import HttpVersion11, web
from yarl import URL

from service.config import Settings, is_loopback
from service.domain.bounds import id_or_none
from service.errors import (
    BodyTimeout,
    BodyTooLarge,
    Forbidden,
    IdempotencyConflict,
    Invalid,
    MethodNotAllowed,
    NotFound,
    ProjectionLag,
    ServiceError,
    Unauthorized,
    Unavailable,
    UnreadableBody,
    UnsupportedMediaType,
    VersionConflict,
)
from service.eventstore import UNREACHABLE
from service.web.answers import Error, ErrorDetail
from service.web.keys import settings_key

if TYPE_CHECKING:
    from aiohttp.web_urldispatcher import _InfoDict

log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The one table from error to HTTP status: the most specific class in an error's MRO
# wins. Ingest rejections are looked up by their code (`status_of_code`); exceptions
# that are not service errors become one first (`as_service_error`).
STATUS: Mapping[type[ServiceError], int] = {
    ServiceError: 500,  # what the service did not foresee: internal_error
    Invalid: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    MethodNotAllowed: 405,
    VersionConflict: 409,
    BodyTimeout: 408,
    BodyTooLarge: 413,
    UnsupportedMediaType: 415,
    IdempotencyConflict: 422,
    Unavailable: 503,
    ProjectionLag: 503,
}
# Seconds a client should wait before retrying a 503.
RETRY_AFTER_S = 1


def status_of(error: type[ServiceError]) -> int:
    return next(STATUS[c] for c in error.__mro__ if c in STATUS)


def _subclasses(cls: type[ServiceError]) -> list[type[ServiceError]]:
    return [cls, *(s for c in cls.__subclasses__() for s in _subclasses(c))]


_BY_CODE: dict[str, int] = {c.code: status_of(c) for c in _subclasses(ServiceError)}


def status_of_code(code: str) -> int:
    """The status of an error known only by its code (an ingest rejection)."""
    return _BY_CODE[code]


def as_service_error(exc: Exception) -> ServiceError:
    """What the client is told about any exception a request raised."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, UNREACHABLE):
        return Unavailable("the database cannot be reached right now; retry")
    if isinstance(exc, web.HTTPException):  # aiohttp's routing and size checks
        if exc.status == 404:
            return NotFound("no such endpoint")
        if exc.status == 405:
            return MethodNotAllowed("this endpoint does not accept that method")
        if exc.status == 413:
            return BodyTooLarge("the request body is larger than the limit")
        if 400 <= exc.status < 500:
            return Invalid(exc.reason)
    return ServiceError("the server failed on this request")


_encoder = msgspec.json.Encoder(decimal_format="number")


class Right(Enum):
    """What a route needs; each role holds a set of rights."""

    PUBLIC = "public"
    READ = "read"  # GET endpoints and /metrics
    CHECK = "check"  # POST /api/governance/check
    RECORD = "record"  # usage ingest
    ADMIN = "admin"  # commands and /api/events


ROLE_RIGHTS: Mapping[str, frozenset[Right]] = {
    "admin": frozenset(Right),
    "recorder": frozenset({Right.PUBLIC, Right.CHECK, Right.RECORD}),
    "reader": frozenset({Right.PUBLIC, Right.CHECK, Right.READ}),
}


# --- answers -----------------------------------------------------------------------


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=_encoder.encode(body), status=status, content_type="application/json"
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    answer = Error(error=ErrorDetail(code=code, message=message))
    response = json_response(answer, status)
    response[ERROR_CODE] = code  # for the request's log line
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


# The key under which a response keeps its error code, for the request log line.
ERROR_CODE = web.ResponseKey("error_code", str)


# --- bodies ------------------------------------------------------------------------


# What a browser sends cross-site without a CORS preflight: a body declared as one of
# these may come from any web page the user visits (an open service on loopback too).
FORM_TYPES = frozenset(
    {"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)
# Types a page can only send cross-site after a preflight (which is never granted).
JSON_TYPES = frozenset({"application/json", "application/x-ndjson"})


# RFC 9110, 8.3.1: type "/" subtype, each a token, then parameters (not read here).
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"[ \t]*{_TOKEN}/{_TOKEN}[ \t]*(?:;|$)")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body: a 415 for a body declared as a form or plain text (and, in
    open mode, for any body not declared as JSON), a 413 once it passes `limit`
    bytes (chunked bodies too), a 408 when it does not arrive in time."""
    settings = request.app[settings_key]
    content_type = request.headers.get("Content-Type")
    if content_type != "application/json":  # else no parameters to parse away
        declared_type = header(request, "Content-Type")  # UTF-8 text, sent once
        if declared_type is not None and _MEDIA_TYPE.match(declared_type) is None:
            raise Invalid(
                "the Content-Type header is not a media type: send type/subtype,"
                " e.g. application/json, then any parameters"
            )
        content_type = request.content_type
    if content_type in FORM_TYPES or (
        settings.is_open and content_type not in JSON_TYPES and request.body_exists
    ):
        raise UnsupportedMediaType(
            f"a body declared as {content_type} is not accepted: send"
            " Content-Type: application/json (application/x-ndjson for a batch)"
        )
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    content = request.content
    try:
        if content.is_eof():
            # All of it has arrived (a small body comes with its head): one read
            # takes what is buffered, and there is nothing to wait for, so no timer.
            body = content.read_nowait()
            if len(body) > limit:  # a body that was larger once decompressed
                raise _too_large(limit)
            return body
        async with asyncio.timeout(settings.body_timeout_s):
            return await _read(request, limit, declared)
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {settings.body_timeout_s:g} s"
        ) from None
    except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip, not gzip
        why = getattr(exc.__cause__, "message", None) or "it is malformed"
        raise UnreadableBody(f"the request body cannot be read: {why}") from None
    except OSError:  # the client closed its side mid-body: not the database's doing
        raise UnreadableBody(
            "the request body was cut short: the connection closed before all of"
            " it arrived"
        ) from None


async def _read(request: web.Request, limit: int, declared: int | None) -> bytes:
    if declared is not None and "Content-Encoding" not in request.headers:
        # The length is declared and within the limit, and what arrives is what
        # was declared: one read.
        return await request.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is larger than the limit of {limit} bytes")


# Positions and counts are PostgreSQL bigints: a larger number can name nothing.
MAX_QUERY_INT = 2**63 - 1
_INTEGER = re.compile(r"-?[0-9]{1,20}").fullmatch


def query_int(
    request: web.Request, name: str, default: int | None = None, *, minimum: int = 0
) -> int | None:
    raw = query_value(request, name)
    if raw is None or raw == "":
        return default
    # Decimal ASCII digits only: int() would also take "1_000", " 7", "+7" and other
    # scripts' digits; more than 20 digits can name nothing.
    if _INTEGER(raw) is None:
        raise Invalid(
            f"query parameter {name} must be an integer in decimal digits,"
            f" got {raw[:40]!r}"
        )
    value = int(raw)
    if value < minimum:
        raise Invalid(f"query parameter {name} must be at least {minimum}")
    if value > MAX_QUERY_INT:
        raise Invalid(f"query parameter {name} must be at most {MAX_QUERY_INT}")
    return value


def path_id(request: web.Request, what: str) -> str:
    """The canonical spelling of the UUID in the path's `{id}`; anything else names
    nothing (`what` names the kind of thing in the 404)."""
    raw = request.match_info["id"]
    found = id_or_none(raw)
    if found is None:
        raise NotFound(f"{what} {raw[:100]!r} does not exist")
    return found


def query_value(request: web.Request, name: str) -> str | None:
    """A query parameter's value (None: absent); a 400 when it is given twice."""
    values = request.query.getall(name, ())
    if len(values) > 1:
        raise Invalid(
            f"query parameter {name} is given {len(values)} times: give it once"
        )
    return values[0] if values else None


def event_metadata() -> bytes:
    """The metadata of events a request appends: its request id (as its log
    lines carry)."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return _metadata_encoder.encode({"request_id": request_id}) if request_id else b"{}"


_metadata_encoder = msgspec.json.Encoder()


# --- headers -----------------------------------------------------------------------


def header(request: web.Request, name: str) -> str | None:
    """A header's value, or a 400 when it is not well-formed text: aiohttp hands bytes
    that are not UTF-8 through as surrogates, which nothing downstream can encode."""
    headers = request.headers
    value = headers.get(name)
    if value is None:
        return None
    if not _is_well_formed(value):
        raise Invalid(f"the {name} header is not well-formed UTF-8 text")
    if len(headers.getall(name)) > 1:
        raise Invalid(f"send the {name} header once: it was sent more than once")
    return value


def authorization(request: web.Request) -> str | None:
    """The Authorization header; a 401 when it is sent more than once (which of its
    tokens would the client mean?)."""
    headers = request.headers
    value = headers.get("Authorization")
    if value is not None and len(headers.getall("Authorization")) > 1:
        raise Unauthorized("send one Authorization header: it was sent more than once")
    return value


def _is_well_formed(value: str) -> bool:
    if value.isascii():
        return value.isprintable()
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return value.isprintable()


# --- the guard ---------------------------------------------------------------------
#
# Every route's handler is wrapped once, where the route is added, instead of in an
# aiohttp middleware: an application with any middleware makes aiohttp build the
# chain (a cached lookup keyed by the handler and the app) and add one of its own on
# every request, which cost more than a check itself.


def guarded(
    handler: Handler,
    right: Right,
    settings: Settings,
    *,
    quiet: bool,
    websocket: bool = False,
) -> Handler:
    """`handler` behind the edge: binds the request id, checks `right`, turns any
    error into its answer from STATUS, and writes one canonical log line (for a
    `quiet` route only when it fails). A `websocket` route (a GET: an upgrade is
    only ever a GET) also refuses upgrades from other origins in open mode.

    What the settings decide is decided here once, not on every request."""
    needs_role = right is not Right.PUBLIC and not settings.is_open
    checks_origin = websocket and settings.is_open
    checks_host = settings.is_open
    local_hosts: set[str] = set()

    async def guard(request: web.Request) -> web.StreamResponse:
        # No clear_contextvars() (it cost a check a tenth of its time in process):
        # aiohttp runs each request in a task of its own, with a copy of its
        # connection's context, where nothing is bound; what a request binds dies
        # with it (tests/test_http_edge.py holds this).
        headers = request.headers
        request_id = headers.get("X-Request-Id")
        if request_id is not None and (
            len(request_id) > MAX_REQUEST_ID or not _is_well_formed(request_id)
        ):
            request_id = None
            refusal: ServiceError | None = Invalid(
                f"the X-Request-Id header must be printable UTF-8 text of at most"
                f" {MAX_REQUEST_ID} characters"
            )
        else:
            refusal = None
        request_id = request_id or next_request_id()
        _bind_request(request_id, request.method, request.path)
        started = perf_counter()
        try:
            if refusal is not None:
                raise refusal
            if needs_role:
                _authorize(request, settings, right)
            if checks_host:
                _refuse_other_hosts(headers.get("Host"), settings, local_hosts)
            if checks_origin and headers.get("Upgrade", "").lower() == "websocket":
                _refuse_cross_site_upgrade(request, settings)
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _answer_error(exc)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except Exception as exc:
            response = _answer_error(exc)
            if isinstance(exc, UnreadableBody | BodyTimeout):
                # What is left of the body is still on the connection: say it ends.
                response.force_close()
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        status = response.status
        if status >= 400 or not quiet:
            duration_ms = round((perf_counter() - started) * 1000, 3)
            code = response.get(ERROR_CODE)
            if code is None:
                log.info("request_finished", status=status, duration_ms=duration_ms)
            else:
                log.info(
                    "request_finished",
                    status=status,
                    duration_ms=duration_ms,
                    code=code,
                )
        return response

    return guard


async def expect_continue(request: web.Request) -> None:
    """Every route's answer to an `Expect` header, before its guard runs:
    `100-continue` on HTTP/1.1 gets the interim `100 Continue` (the client then
    sends its body); any other expectation is passed over (RFC 9110, 10.1.1: a
    server may answer it 417 or not), so the request is answered as any other,
    in the error shape when it fails, instead of aiohttp's plain-text 417."""
    if request.version != HttpVersion11:
        return
    if request.headers.get("Expect", "").lower() == "100-continue":
        writer = request.writer
        await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.output_size = 0  # the answer proper is still to come


class EveryTarget(web.Resource):
    """The resource of `unmatched`, registered after every route: it matches every
    request target, also one that is not a path (`OPTIONS *`), which no path
    pattern matches and aiohttp would answer itself, in plain text. The router
    tries it last: it is indexed under "/", where every lookup ends (CONNECT's
    target, which aiohttp reads as an authority with an empty path, reaches it
    through `service.web.server`, which reads that target as a path)."""

    def __init__(self) -> None:
        super().__init__(name=None)

    @property
    def canonical(self) -> str:
        return "/"

    def url_for(self, **kwargs: str) -> URL:
        return URL("/")

    def add_prefix(self, prefix: str) -> None:
        raise RuntimeError("the catch-all matches every target: it takes no prefix")

    def get_info(self) -> _InfoDict:
        return {"path": "*"}

    def raw_match(self, path: str) -> bool:
        return False

    def _match(self, path: str) -> dict[str, str]:
        return {}


async def unmatched(request: web.Request) -> web.StreamResponse:
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _request_vars() -> tuple[contextvars.ContextVar[Any], ...]:
    """structlog's context variables of request_id, method and path: binding is
    setting them (one ContextVar per key), without bind_contextvars' per-call
    lookups. Found by binding once in a context of their own, which is dropped."""
    tokens = contextvars.Context().run(
        structlog.contextvars.bind_contextvars, request_id=None, method=None, path=None
    )
    return tuple(token.var for token in tokens.values())


_REQUEST_ID, _METHOD, _PATH = _request_vars()


def _bind_request(request_id: str, method: str, path: str) -> None:
    """bind_contextvars(request_id=…, method=…, path=…), at a third of the cost."""
    _REQUEST_ID.set(request_id)
    _METHOD.set(method)
    _PATH.set(path)


def _answer_error(exc: Exception) -> web.Response:
    error = as_service_error(exc)
    status = status_of(type(error))
    if status >= 500 and type(error) is ServiceError:
        log.exception("request_failed")
    elif status >= 500:
        log.warning("request_unavailable", code=error.code, error=error.message)
    return error_response(status, error.code, error.message)


def _authorize(request: web.Request, settings: Settings, right: Right) -> None:
    role = authenticate(settings, authorization(request))
    if right not in ROLE_RIGHTS[role]:
        raise Forbidden(f"the {role} role may not call {request.method} {request.path}")


def _refuse_other_hosts(host: str | None, settings: Settings, known: set[str]) -> None:
    """In open mode the service answers only requests addressed to a loopback name.
    A page that rebinds its own name to 127.0.0.1 (DNS rebinding) is same-origin to
    the browser, so no cross-site rule stops it; its requests still name its host.
    `known`: Host values found local already (at most 64: a client picks them)."""
    if host is None or host in known:
        return
    if not _is_local(host, settings):
        raise Forbidden(
            f"without tokens this service answers only requests addressed to it by"
            f" a loopback name (localhost, 127.0.0.1, [::1]); the Host header names"
            f" {host[:100]!r}: list its origin in GOVLEDGER_ALLOWED_ORIGINS or"
            f" configure tokens"
        )
    if len(known) < 64:
        known.add(host)


def _is_local(host: str, settings: Settings) -> bool:
    name = host.lower()
    if name.startswith("["):  # [::1]:8080
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost") or is_loopback(name):
        return True
    if name in ("0.0.0.0", "::"):  # Linux delivers these to loopback; no name rebinds
        return True
    return any(URL(o).host == name for o in settings.allowed_origins)


def _refuse_cross_site_upgrade(request: web.Request, settings: Settings) -> None:
    """In open mode any page the user visits could open a WebSocket to a loopback
    service (browsers send no preflight for upgrades, but always send Origin):
    only the service's own origin and GOVLEDGER_ALLOWED_ORIGINS may."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    origin = origin.rstrip("/").lower()
    own = f"{request.scheme}://{request.host}".lower()
    if origin != own and origin not in settings.allowed_origins:
        raise Forbidden(
            f"a WebSocket from the origin {origin!r} is refused: list it in"
            " GOVLEDGER_ALLOWED_ORIGINS to allow it"
        )


def authenticate(settings: Settings, header: str | None) -> str:
    """The role of a bearer token, compared in constant time against every token."""
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("send Authorization: Bearer <token>")
    if not _is_well_formed(header):
        raise Unauthorized("the bearer token is not known")
    token = header[len("Bearer ") :].encode()
    found: str | None = None
    for role, tokens in (
        ("admin", settings.admin_tokens),
        ("recorder", settings.recorder_tokens),
        ("reader", settings.reader_tokens),
    ):
        for candidate in tokens:
            # No early exit: the time taken does not depend on which token matched.
            if hmac.compare_digest(candidate.encode(), token) and found is None:
                found = role
    if found is None:
        raise Unauthorized("the bearer token is not known")
    return found


# A random per-process prefix and a counter: unique like a uuid4, without a
# getrandom() call on every request (several microseconds on these machines).
_REQUEST_PREFIX = uuid.uuid4().hex[:12]
_request_numbers = itertools.count(1)
MAX_REQUEST_ID = 200


def next_request_id() -> str:
    """A request id for a request that brought none."""
    return f"{_REQUEST_PREFIX}{next(_request_numbers):012x}"
