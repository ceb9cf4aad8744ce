"""The bounds of what a request may carry: the longest name, the longest lists, the
patterns of names and ids, and the one spelling an id is stored in.

Every string and list a body may carry has a maximum (docs/API.md, "Bounded input"),
so that nothing accepted can exceed what the read model's indexes hold: the longest
provider (256 characters, at most 1 KiB of UTF-8) with its key's id stays far below
the ~2.7 KB a btree row of governance_provider_configs (virtual_key_id, provider) may
take. Ids are UUIDs (36 characters); durations are at most 11 characters.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated

import msgspec

from service.domain.budgets import MAX_RATE_LIMIT, BudgetSpec
from service.domain.numbers import Whole

MAX_NAME = 256  # a name, a provider, a model
MAX_BUDGETS = 32  # per owner: one per reset_duration
MAX_PROVIDER_CONFIGS = 64
MAX_MODELS = 256

# The characters str.isspace() takes (what `strip()` removes): a name of nothing else
# is blank. Spelled out, so the document's pattern means the same in every engine.
_BLANK = (
    "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a"
    "\\u2028\\u2029\\u202f\\u205f\\u3000"
)
# Not blank, and no U+0000 (PostgreSQL's text and jsonb cannot hold it).
NAME_PATTERN = f"^[{_BLANK}]*[^{_BLANK}\\x00][^\\x00]*$"
NO_NUL_PATTERN = "^[^\\x00]*$"

Name = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN)
]
Model = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_NAME, pattern=NO_NUL_PATTERN)
]
UUID_PATTERN = (
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
# A UUID in any letter case, exactly 36 characters; stored and answered lower case.
Id = Annotated[
    str,
    msgspec.Meta(
        min_length=36,
        max_length=36,
        pattern=UUID_PATTERN,
        extra_json_schema={"format": "uuid"},
    ),
]
Budgets = Annotated[tuple[BudgetSpec, ...], msgspec.Meta(max_length=MAX_BUDGETS)]
Models = Annotated[tuple[Model, ...], msgspec.Meta(max_length=MAX_MODELS)]
# Enforced by budgets.validate_rate_limit, which names the error (invalid_rate_limit).
RateLimitValue = Annotated[
    Whole, msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": MAX_RATE_LIMIT})
]


# msgspec names a broken pattern by its regex; a client is told what it means.
_PATTERN_MEANINGS = {
    NAME_PATTERN: "a name that is not blank and holds no U+0000",
    NO_NUL_PATTERN: "text without U+0000",
    UUID_PATTERN: "a UUID (36 characters: 8-4-4-4-12 hex digits)",
}


# msgspec says only "Invalid RFC3339 encoded datetime" of any timestamp it cannot
# read: a wrong shape, a day or an hour that does not exist, or a leap second, which
# RFC 3339 allows and Python's datetime cannot hold.
_BAD_TIMESTAMP = "Invalid RFC3339 encoded datetime"
_TIMESTAMP_MEANING = (
    "Expected an RFC 3339 timestamp such as 2026-12-05T10:00:00Z, with a date that"
    " exists, an hour below 24 and seconds below 60 (a leap second cannot be stored)"
)


def explained(error: Exception) -> str:
    """msgspec's message of a decoding error, each known pattern and the timestamp
    it could not read said in words."""
    message = str(error).replace(_BAD_TIMESTAMP, _TIMESTAMP_MEANING)
    for pattern, meaning in _PATTERN_MEANINGS.items():
        message = message.replace(f"`str` matching regex {pattern!r}", meaning)
    return message


def canonical_id(value: str) -> str:
    """The stored spelling of a UUID: lower case, with hyphens."""
    return str(uuid.UUID(value))


_IS_ID = re.compile(UUID_PATTERN).fullmatch


def id_or_none(value: str) -> str | None:
    """The stored spelling of an id written as an `Id` is (36 characters, hyphens
    at their places, any letter case); None for any other spelling, including
    those `uuid.UUID` would also take (no hyphens, braces, `urn:uuid:`)."""
    return canonical_id(value) if _IS_ID(value) is not None else None


# --- what a body's decoding cannot say, as the OpenAPI document states it -----------


def _needs(given: str, given_type: str, needed: str, needed_type: str) -> object:
    """JSON Schema: a `given` of `given_type` needs a `needed` of `needed_type`."""
    return {
        "if": {"properties": {given: {"type": given_type}}, "required": [given]},
        "then": {"properties": {needed: {"type": needed_type}}, "required": [needed]},
    }


# What RateLimitSpec's decoding cannot say and validate_rate_limit enforces.
RATE_LIMIT_PAIRS = {
    "allOf": [
        _needs(f"{half}_max_limit", "integer", f"{half}_reset_duration", "string")
        for half in ("token", "request")
    ]
    + [
        _needs(f"{half}_reset_duration", "string", f"{half}_max_limit", "integer")
        for half in ("token", "request")
    ]
}


# virtual_keys' rule of one owner, as a body can break it alone: both ids named.
ONE_OWNER_RULE = {
    "not": {
        "required": ["team_id", "customer_id"],
        "properties": {
            "team_id": {"type": "string"},
            "customer_id": {"type": "string"},
        },
    }
}
