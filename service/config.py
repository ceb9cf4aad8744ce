"""Settings read once from the environment; the rule that refuses an open service."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

import msgspec


class ConfigError(Exception):
    """The environment describes a service that must not start."""


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

    @property
    def is_open(self) -> bool:
        """No token configured: every caller has every right."""
        return not (self.admin_tokens or self.recorder_tokens or self.reader_tokens)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        try:
            port = int(env.get("GOVLEDGER_PORT", "8080"))
        except ValueError:
            raise ConfigError("GOVLEDGER_PORT must be a port number") from None
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            host=env.get("GOVLEDGER_HOST", "127.0.0.1"),
            port=port,
            admin_tokens=_tokens(env, "GOVLEDGER_ADMIN_TOKENS"),
            recorder_tokens=_tokens(env, "GOVLEDGER_RECORDER_TOKENS"),
            reader_tokens=_tokens(env, "GOVLEDGER_READER_TOKENS"),
            data_dir=env.get("GOVLEDGER_DATA_DIR", ".data"),
        )


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
