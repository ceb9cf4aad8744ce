"""Settings read once from the environment; the rule that refuses an open service."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Literal, TypeVar, get_args
from urllib.parse import urlsplit

import msgspec


class ConfigError(Exception):
    """The environment describes a service that must not start."""


# Where the SQL read model's projector runs. "inline": in the serving process (an
# app built in process: tests, tools); "child": in a `govledger project` process
# that `serve` starts, restarts and stops; "external": in a `govledger project`
# run elsewhere. With "child" and "external" the serving process only follows it.
ProjectorPlacement = Literal["inline", "child", "external"]
# The event loop of `serve` and `project`: uvloop (libuv's, where it is installed),
# or the standard library's asyncio loop.
EventLoop = Literal["uvloop", "asyncio"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    admin_tokens: frozenset[str] = frozenset()
    recorder_tokens: frozenset[str] = frozenset()
    reader_tokens: frozenset[str] = frozenset()
    data_dir: str = ".data"
    max_body_bytes: int = 1 << 20
    max_batch_body_bytes: int = 16 << 20
    pool_size: int = 10
    # How long a read or check with min_position waits for its projection.
    min_position_wait_s: float = 2.0
    # Projector poll interval: NOTIFY is only a wake-up, the poll bounds a lost one.
    poll_interval_s: float = 0.5
    # A connection that has not sent a whole request head this long after it opened
    # (or after its last answer) is closed; a declared body must arrive within
    # body_timeout_s of the handler's first read (408 otherwise).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # Origins (scheme://host[:port]) besides the service's own whose pages may open
    # the usage WebSocket in open mode.
    allowed_origins: frozenset[str] = frozenset()
    # The default suits an app built in process; the environment's is "child".
    projector: ProjectorPlacement = "inline"
    event_loop: EventLoop = "uvloop"
    # Seals the answers kept for Idempotency-Keys (service.idempotency); never in the
    # database. None: the key file beside data_dir, made on first use. The default
    # is the environment's, so an app built in process shares it with `serve`.
    secret_key: str | None = msgspec.field(
        default_factory=lambda: os.environ.get("GOVLEDGER_SECRET_KEY") or None
    )

    @property
    def is_open(self) -> bool:
        """No token configured: every caller has every right."""
        return not (self.admin_tokens or self.recorder_tokens or self.reader_tokens)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            host=env.get("GOVLEDGER_HOST") or "127.0.0.1",
            port=_port(env.get("GOVLEDGER_PORT") or "8080"),
            admin_tokens=_tokens(env, "GOVLEDGER_ADMIN_TOKENS"),
            recorder_tokens=_tokens(env, "GOVLEDGER_RECORDER_TOKENS"),
            reader_tokens=_tokens(env, "GOVLEDGER_READER_TOKENS"),
            data_dir=env.get("GOVLEDGER_DATA_DIR", ".data"),
            header_timeout_s=_seconds(env, "GOVLEDGER_HEADER_TIMEOUT_S", 10.0),
            body_timeout_s=_seconds(env, "GOVLEDGER_BODY_TIMEOUT_S", 30.0),
            allowed_origins=frozenset(
                _origin(o) for o in _tokens(env, "GOVLEDGER_ALLOWED_ORIGINS")
            ),
            projector=_one_of(env, "GOVLEDGER_PROJECTOR", _PLACEMENTS, default="child"),
            event_loop=_one_of(env, "GOVLEDGER_EVENT_LOOP", _LOOPS, default="uvloop"),
            secret_key=_secret(env.get("GOVLEDGER_SECRET_KEY") or None),
        )


_PLACEMENTS: dict[str, ProjectorPlacement] = {
    p: p for p in get_args(ProjectorPlacement)
}
_LOOPS: dict[str, EventLoop] = {name: name for name in get_args(EventLoop)}

C = TypeVar("C", bound=str)


def _port(raw: str) -> int:
    """A TCP port: 1 to 65535, in decimal digits (int() would also take " 80")."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 5 and 0 < int(raw) < 65536):
        raise ConfigError(
            f"GOVLEDGER_PORT must be a port number from 1 to 65535, not {raw!r}"
        )
    return int(raw)


def _origin(raw: str) -> str:
    """An allowed origin as browsers send it (scheme://host[:port], lower case): an
    entry that is none could never match, so it is refused rather than ignored."""
    origin = raw.rstrip("/").lower()
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number
    except ValueError:
        parts = None
    if (
        parts is None
        or not parts.scheme  # any scheme: an extension's origin is one too
        or not parts.hostname
        or "@" in parts.netloc
        or parts.path
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"GOVLEDGER_ALLOWED_ORIGINS: {raw!r} is not an origin; give each as"
            " scheme://host[:port], e.g. http://localhost:3000"
        )
    return origin


def _one_of(
    env: Mapping[str, str], name: str, choices: Mapping[str, C], *, default: C
) -> C:
    """The value of `name`, one of `choices` (unset or empty: `default`)."""
    raw = env.get(name) or default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}")
    return choices[raw]


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ConfigError(f"{name} must be a number of seconds above 0, at most 3600")
    return value


# The shortest secret that seals stored answers (service.idempotency).
MIN_SECRET_LENGTH = 32


def _secret(raw: str | None) -> str | None:
    if raw is not None and len(raw) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"GOVLEDGER_SECRET_KEY must be at least {MIN_SECRET_LENGTH} characters,"
            " e.g. the output of `openssl rand -hex 32`"
        )
    return raw


def _tokens(env: Mapping[str, str], name: str) -> frozenset[str]:
    return frozenset(t.strip() for t in env.get(name, "").split(",") if t.strip())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to serve without tokens on anything but loopback."""
    if settings.is_open and not is_loopback(settings.host):
        raise ConfigError(
            f"refusing to serve on {settings.host} without tokens: set "
            "GOVLEDGER_ADMIN_TOKENS (and recorder/reader tokens) or bind to 127.0.0.1"
        )
