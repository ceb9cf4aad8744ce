"""The gateway integrations' configuration: `Settings`, read from the environment
(`GOVLEDGER_*`) and checked at start, so a typo stops the gateway instead of
quietly changing what it enforces."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, TypeVar

import msgspec

from .wire import service_url

__all__ = ["ConfigError", "Settings"]

_N = TypeVar("_N", int, float)
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


class ConfigError(ValueError):
    """A GOVLEDGER_* variable has a value the integration does not take."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """How a gateway integration talks to govledger and what it enforces.

    - `url`, `token`: the service and a recorder token (`GOVLEDGER_URL`,
      `GOVLEDGER_TOKEN`).
    - `key_header`: the request header carrying the govledger key
      (`GOVLEDGER_KEY_HEADER`).
    - `fail_open`: when govledger cannot answer, let calls through ungoverned
      (their usage is still recorded once it is back) instead of refusing them
      with 503 (`GOVLEDGER_FAIL_OPEN`).
    - `reserve`: hold each call's estimate until it ends (`GOVLEDGER_RESERVE`);
      false is a plain check before the call and a record after it.
    - `unpriced`: a model LiteLLM cannot price is refused, or allowed with its
      usage recorded at cost 0 and a warning logged (`GOVLEDGER_UNPRICED`).
    - `default_max_tokens`: the output size estimated for a request that names no
      `max_tokens` (`GOVLEDGER_DEFAULT_MAX_TOKENS`).
    - `check_timeout`: seconds a check (a reserving one writes) may take before
      the fail-open/closed policy answers (`GOVLEDGER_CHECK_TIMEOUT`).
    - `ttl_s`: how long a hold outlives a call that never ends (`GOVLEDGER_TTL_S`).
    """

    url: str = "http://127.0.0.1:8080"
    token: str | None = None
    key_header: str = "x-govledger-key"
    fail_open: bool = False
    reserve: bool = True
    unpriced: Literal["refuse", "allow"] = "refuse"
    default_max_tokens: int = 4096
    check_timeout: float = 2.0
    ttl_s: int = 600

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """The settings `environ` names (unset or empty variables keep their
        defaults); ConfigError names the variable and what it takes."""
        d = cls()

        def text(name: str, default: str) -> str:
            value = environ.get(name, "").strip()
            return value or default

        return cls(
            url=_url(text("GOVLEDGER_URL", d.url)),
            token=text("GOVLEDGER_TOKEN", "") or None,
            key_header=text("GOVLEDGER_KEY_HEADER", d.key_header).lower(),
            fail_open=_boolean(environ, "GOVLEDGER_FAIL_OPEN", d.fail_open),
            reserve=_boolean(environ, "GOVLEDGER_RESERVE", d.reserve),
            unpriced=_unpriced(text("GOVLEDGER_UNPRICED", d.unpriced)),
            default_max_tokens=_number(
                environ, "GOVLEDGER_DEFAULT_MAX_TOKENS", d.default_max_tokens, int
            ),
            check_timeout=_number(
                environ, "GOVLEDGER_CHECK_TIMEOUT", d.check_timeout, float
            ),
            ttl_s=_ttl(_number(environ, "GOVLEDGER_TTL_S", d.ttl_s, int)),
        )


def _boolean(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name} must be true/false, 1/0 or yes/no, not {raw!r}")


def _url(raw: str) -> str:
    try:
        return service_url(raw)
    except ValueError as exc:
        raise ConfigError(f"GOVLEDGER_URL: {exc}") from None


def _unpriced(raw: str) -> Literal["refuse", "allow"]:
    if raw == "refuse":
        return "refuse"
    if raw == "allow":
        return "allow"
    raise ConfigError(f"GOVLEDGER_UNPRICED must be refuse or allow, not {raw!r}")


def _number(environ: Mapping[str, str], name: str, default: _N, kind: type[_N]) -> _N:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a {kind.__name__}, not {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be above 0, not {raw!r}")
    return value


def _ttl(value: int) -> int:
    if value > 3600:
        raise ConfigError(f"GOVLEDGER_TTL_S must be 1 to 3600, not {value}")
    return value
