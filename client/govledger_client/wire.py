"""The wire: the JSON the client sends to govledger and the answers it reads back.

Answers are decoded into structs that ignore fields they do not know, so a newer
server that adds a field never breaks an older client. Bodies the client sends carry
only fields the server takes (it refuses unknown ones), and omit those left unset.
"""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Final
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "BATCH_PATH",
    "CHECK_PATH",
    "MAX_ESTIMATED_COST",
    "MAX_ESTIMATED_TOKENS",
    "RELEASE_PATH",
    "STREAM_PATH",
    "TRANSIENT_CODES",
    "BatchAnswer",
    "CheckRequest",
    "CheckResult",
    "ErrorBody",
    "ErrorDetail",
    "Refusal",
    "ReleaseAnswer",
    "Reservation",
    "StreamAck",
    "UsageRecord",
    "decode_batch_answer",
    "decode_check",
    "decode_release",
    "decode_stream_ack",
    "encode",
    "error_of",
    "money",
    "service_url",
]

STREAM_PATH: Final = "/api/usage/stream"
BATCH_PATH: Final = "/api/usage/batch"
CHECK_PATH: Final = "/api/governance/check"
# POST: drops a reservation's hold (format with the reservation id).
RELEASE_PATH: Final = "/api/governance/reservations/{}/release"
# The largest estimates a check takes: estimated_tokens, and a reserving check's
# estimated_cost (below 10^12, to the nano). A larger estimate is refused as a bad
# request, so a gateway caps what it sends here; the capped one still exceeds any
# budget or rate limit below it.
MAX_ESTIMATED_TOKENS: Final = 2**31 - 1
MAX_ESTIMATED_COST: Final = Decimal("999999999999.999999999")

# Error codes (frames and answers) that another attempt may not get: send again.
TRANSIENT_CODES: Final = frozenset(
    {"database_unavailable", "internal_error", "projection_lag"}
)
_NANO = Decimal("1e-9")


def service_url(url: str) -> str:
    """The service's base URL without its trailing slash: http or https, a host, and
    at most a path (a service behind a prefix); ValueError for anything else, which
    no retry could ever reach."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
    ):
        # Not repeated: a URL that is wrong may still hold a secret (user:password@).
        raise ValueError(
            "the service URL must be http:// or https:// with a host and at most a path"
        )
    return url.strip().rstrip("/")


# --- sent ----------------------------------------------------------------------------


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One usage record: the body of POST /api/usage, a line of POST /api/usage/batch,
    an element of a stream frame's `records`. Exactly one of `virtual_key` (the
    secret) and `virtual_key_id`; `cost` is exact to 9 fractional digits."""

    event_id: str
    provider: str
    model: str
    cost: Decimal
    virtual_key: str | None = None
    virtual_key_id: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 1
    occurred_at: datetime | None = None
    reservation_id: str | None = None  # settles that reservation's hold


class CheckRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The body of POST /api/governance/check; `reserve` (with `estimated_cost`, and
    optionally `estimated_tokens` and `ttl_s`) makes it hold the estimate."""

    virtual_key: str | None = None
    virtual_key_id: str | None = None
    provider: str | None = None
    model: str | None = None
    estimated_cost: Decimal | None = None
    min_position: int | None = None
    reserve: bool = False
    estimated_tokens: int | None = None
    ttl_s: int | None = None


# --- received ------------------------------------------------------------------------


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    """The answer of POST /api/governance/check, or the policy's when the server did
    not answer in time (`fallback` true, `reason` "timeout" or "unavailable").

    A blocked answer names what blocks: a budget (`budget_id`), or a rate limit
    (`rate_limit` is "tokens" or "requests", and `current_usage` and `max_limit`
    count tokens or requests), with `held` when open reservations hold part of it.
    An allowed answer carries `remaining` when the key's chain has a budget; an
    allowed reserving check also `reservation_id` and `expires_at` (see
    `reservation`). `position` is the log position the server's cache has applied
    (a reserving check: its hold's); `stale` is true when the server cannot read its
    log right now, so the answer is as of `position`. `fallback` is the client's
    own, never sent.
    """

    allowed: bool
    reason: str
    http_status: int
    budget_id: str | None = None
    owner_type: str | None = None
    owner_id: str | None = None
    current_usage: Decimal | None = None
    max_limit: Decimal | None = None
    remaining: Decimal | None = None
    rate_limit: str | None = None
    held: Decimal | None = None
    position: int | None = None
    stale: bool = False
    reservation_id: str | None = None
    expires_at: datetime | None = None
    fallback: bool = False

    @property
    def reservation(self) -> Reservation | None:
        """The hold an allowed reserving check took, else None."""
        if self.reservation_id is None or self.expires_at is None:
            return None
        return Reservation(id=self.reservation_id, expires_at=self.expires_at)

    @property
    def explanation(self) -> str:
        """One sentence for a caller: the decision, and for a blocked one what blocks
        it, with what open reservations hold of it."""
        what = "govledger: " + self.reason.replace("_", " ")
        held = "" if self.held is None else f", {self.held} held"
        if self.rate_limit is not None:
            used = f"{self.current_usage}{held} of {self.max_limit}"
            return f"{what} ({self.rate_limit}: {used})"
        if self.budget_id is not None:
            owner = f"{self.owner_type} {self.owner_id}"
            used = f"{self.current_usage}{held} of {self.max_limit}"
            return f"{what} (budget {self.budget_id} of {owner}: {used})"
        return what


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """A hold on the estimate of a call in flight, until the first of: a usage
    record naming `id` (settled), a release, or `expires_at`."""

    id: str
    expires_at: datetime


class ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    """Every 4xx and 5xx answer: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


class Refusal(msgspec.Struct, frozen=True):
    """A refused record: `index` (0-based) in a stream ack, `line` (1-based) in a
    batch answer."""

    code: str
    message: str
    index: int = -1
    line: int = 0


class StreamAck(msgspec.Struct, frozen=True):
    """A stream ack, or an error frame (`error` set, `seq` when the server read it)."""

    seq: int | None = None
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Refusal] = msgspec.field(default_factory=list)
    position: int = 0
    error: ErrorDetail | None = None


class BatchAnswer(msgspec.Struct, frozen=True):
    """The answer of POST /api/usage/batch."""

    accepted: int
    duplicates: int
    rejected: list[Refusal]
    position: int


class ReleaseAnswer(msgspec.Struct, frozen=True):
    """The answer of POST /api/governance/reservations/{id}/release."""

    position: int


encode = msgspec.json.Encoder(decimal_format="number").encode
decode_stream_ack = msgspec.json.Decoder(StreamAck).decode
decode_batch_answer = msgspec.json.Decoder(BatchAnswer).decode
decode_check = msgspec.json.Decoder(CheckResult).decode
decode_release = msgspec.json.Decoder(ReleaseAnswer).decode
_decode_error = msgspec.json.Decoder(ErrorBody).decode


def error_of(raw: bytes, status: int) -> tuple[str, str]:
    """The (code, message) of an error answer; a proxy's page gets `http_<status>`."""
    try:
        error = _decode_error(raw).error
    except msgspec.MsgspecError:
        return f"http_{status}", raw[:200].decode(errors="replace").strip()
    return error.code, error.message


def money(value: Decimal | int | float | str) -> Decimal:
    """An amount as sent: a float is rounded to 9 fractional digits (pass a Decimal
    or a str to keep it exact); ValueError when it is not a number."""
    if isinstance(value, float):
        amount = Decimal(repr(value))
        exponent = amount.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -9:
            amount = amount.quantize(_NANO, rounding=ROUND_HALF_EVEN)
        return amount
    try:
        return Decimal(value)
    except InvalidOperation:
        raise ValueError(f"not an amount: {value!r}") from None
