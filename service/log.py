"""structlog configuration: JSON lines (or a console renderer on a TTY), with every
secret masked before a line is written.

No line may carry a virtual key secret, a bearer token, a configured token, the
password of the database DSN or a model provider's `sk-` key, error lines included.
Two rules hold that:
- tracebacks never show frame locals (a request's locals hold the settings, with
  the DSN and every token);
- `redact`, the last processor before rendering, masks secrets in every value, nested
  ones (a dict traceback) and exception strings included, whatever logger wrote them:
  lines of the standard library's loggers (aiohttp, asyncio, asyncpg) go through it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import structlog
from structlog.tracebacks import ExceptionDictTransformer

REDACTED = "[redacted]"

_TOKEN_VARIABLES = (
    "GOVLEDGER_ADMIN_TOKENS",
    "GOVLEDGER_RECORDER_TOKENS",
    "GOVLEDGER_READER_TOKENS",
)

# Secrets by their shape, whoever configured them:
_PATTERNS = (
    # a virtual key secret (`sk-gl-` + url-safe characters), or a piece of one
    (re.compile(r"sk-gl-[A-Za-z0-9_\-]*"), "sk-gl-" + REDACTED),
    # a model provider's API key that a gateway sent by mistake (OpenAI's `sk-…`
    # and `sk-proj-…`, Anthropic's `sk-ant-…`): `sk-` and 20 or more such characters
    (re.compile(r"\bsk-(?!gl-)[A-Za-z0-9_\-]{20,}"), "sk-" + REDACTED),
    # a bearer credential, wherever it was put (Authorization, a message, an id)
    (re.compile(r"(?i)\b(bearer)(\s+)[^\s\"',;]+"), rf"\1\2{REDACTED}"),
    # the password of a URL's user info: postgresql://user:PASSWORD@host/db
    (
        re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://[^\s:@/]*:)[^\s@/]*@"),
        rf"\1{REDACTED}@",
    ),
    # a key/value DSN's or a query's password: password=PASSWORD
    (re.compile(r"(?i)\b(password\s*=\s*)[^\s&;,'\"]+"), rf"\1{REDACTED}"),
)

# Keys whose whole value is a credential.
_SECRET_KEYS = frozenset({"authorization", "password", "token", "secret"})


class Redactor:
    """The processor that masks secrets: by shape (`_PATTERNS`) and by value (the
    configured tokens and the DSN's password, as `add` learns them)."""

    def __init__(self) -> None:
        self._known: frozenset[str] = frozenset()
        self._literal: re.Pattern[str] | None = None

    def add(self, secrets: Iterable[str]) -> None:
        known = self._known | {s for s in secrets if s}
        if known == self._known:
            return
        self._known = frozenset(known)
        # Longest first, so a token that contains another is masked whole.
        alternatives = sorted(known, key=len, reverse=True)
        self._literal = re.compile("|".join(map(re.escape, alternatives)))

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if key.lower() in _SECRET_KEYS and value is not None:
                event[key] = REDACTED
            else:
                event[key] = self.mask(value)
        return event

    def mask(self, value: Any) -> Any:
        """`value` with every secret masked; values JSON cannot hold become their
        repr first (what the renderer would write), so no object's repr escapes."""
        if isinstance(value, str):
            return self.mask_text(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {self.mask_text(str(k)): self.mask(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.mask(v) for v in value]
        return self.mask_text(repr(value))

    def mask_text(self, text: str) -> str:
        if self._literal is not None:
            text = self._literal.sub(REDACTED, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


redact = Redactor()


def dsn_secrets(dsn: str | None) -> list[str]:
    """The password of a DSN, as written and decoded (empty without one)."""
    if not dsn:
        return []
    found: list[str] = []
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    if password:
        found += [password, unquote(password)]
    found += re.findall(r"(?i)\bpassword\s*=\s*([^\s&;,'\"]+)", dsn)
    return found


def environment_secrets(env: Mapping[str, str]) -> list[str]:
    """The tokens and database passwords the environment configures."""
    found = [
        token.strip()
        for name in _TOKEN_VARIABLES
        for token in env.get(name, "").split(",")
        if token.strip()
    ]
    found += dsn_secrets(env.get("DATABASE_URL"))
    if env.get("GOVLEDGER_SECRET_KEY"):
        found.append(env["GOVLEDGER_SECRET_KEY"])
    if env.get("PGPASSWORD"):
        found.append(env["PGPASSWORD"])
    return found


def configure(
    *,
    json: bool | None = None,
    cache: bool = False,
    level: int = logging.INFO,
    secrets: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    file: TextIO | None = None,
) -> None:
    """Lines to `file` (stderr); the secrets of `env` (os.environ) and `secrets`
    are masked, besides every secret recognised by its shape."""
    out = sys.stderr if file is None else file
    if json is None:
        json = not out.isatty()
    redact.add([*environment_secrets(os.environ if env is None else env), *secrets])
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    # Never frame locals: a request's hold the settings, with the DSN and the tokens.
    # On a console the traceback becomes plain text before `redact` sees it, not
    # something the renderer draws afterwards.
    exceptions: structlog.typing.Processor = (
        structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False)
        )
        if json
        else structlog.processors.format_exc_info
    )
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        exceptions,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=cache,
    )
    _route_standard_logging(shared, renderer, out, level)


class _Handler(logging.StreamHandler[TextIO]):
    """The one root handler `configure` installs (and replaces when called again)."""


def _route_standard_logging(
    shared: list[structlog.typing.Processor],
    renderer: structlog.typing.Processor,
    out: TextIO,
    level: int,
) -> None:
    """Lines of the standard library's loggers in the same format, redacted too."""
    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
