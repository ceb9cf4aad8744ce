"""Idempotency-Key answers: a request's key and fingerprint, and its answer (status
and body bytes) kept sealed in command_results, replayed byte for byte.

A virtual key's secret may be in an answer, so every stored body is sealed with
AES-GCM under a key derived (HKDF-SHA256) from the service's own secret, which is
never in the database: GOVLEDGER_SECRET_KEY, or else the key file beside the data
directory (`key_file`), created on first use with mode 0600. A copy of the database
alone therefore reveals no answer, whatever Idempotency-Key the client chose. The row
is found by a salted hash of the key; a row changed in the database, or sealed under
another secret (replicas must share it), fails authentication rather than being
replayed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from functools import cache
from pathlib import Path
from typing import NamedTuple

import asyncpg
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.config import MIN_SECRET_LENGTH
from service.errors import IdempotencyConflict, Invalid, ServiceError
from service.eventstore import Queryable

log = structlog.get_logger()

MAX_KEY_LENGTH = 255
_NONCE_BYTES = 12  # AES-GCM's standard nonce, random per sealed answer

_STORED = """
SELECT request_fingerprint, status, body FROM command_results
WHERE idempotency_key = $1
"""
_STORE = """
INSERT INTO command_results (idempotency_key, request_fingerprint, status, body)
VALUES ($1, $2, $3, $4)
"""


class AnswerUnreadable(ServiceError):
    """An answer kept for this key does not open under this process's secret: the
    replicas do not share GOVLEDGER_SECRET_KEY, or the row was changed."""

    code = "idempotency_answer_unreadable"


class SecretKeyError(Exception):
    """The service's secret cannot be read or made (a bad key file)."""


class Sealer:
    """Seals and opens stored answers under a key derived from the service's secret."""

    def __init__(self, secret: str) -> None:
        if len(secret) < MIN_SECRET_LENGTH:
            raise SecretKeyError(
                f"the secret key must be at least {MIN_SECRET_LENGTH} characters"
            )
        derived = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=None,
            info=b"govledger command result v2",
        ).derive(secret.encode())
        self._aead = AESGCM(derived)

    def seal(self, status: int, body: bytes) -> bytes:
        """The nonce, then the body encrypted and authenticated with its status."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, body, str(status).encode())

    def unseal(self, status: int, sealed: bytes) -> bytes:
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, ciphertext, str(status).encode())
        except InvalidTag:
            raise AnswerUnreadable(
                "the answer kept for this Idempotency-Key cannot be opened with this"
                " service's secret key (every replica needs the same"
                " GOVLEDGER_SECRET_KEY)"
            ) from None


def key_file(data_dir: str) -> Path:
    """Where the secret lives without GOVLEDGER_SECRET_KEY: beside the data
    directory, never inside it, so a copy of the cluster's files does not hold it."""
    directory = Path(data_dir)
    return directory.with_name(directory.name + ".secret-key")


@cache
def sealer(secret_key: str | None, data_dir: str) -> Sealer:
    """The sealer of GOVLEDGER_SECRET_KEY, else of the key file (made if missing)."""
    if secret_key is not None:
        return Sealer(secret_key)
    return Sealer(_file_secret(key_file(data_dir)))


def _file_secret(path: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        return _read_secret(path)
    # Written aside, then linked into place: a concurrent first start finds either
    # nothing or the whole file, and exactly one of them creates it.
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(draft, path)
        log.info("secret_key_created", path=str(path))
    except FileExistsError:
        pass  # another process made it first
    except OSError as exc:
        raise SecretKeyError(
            f"cannot create the secret key file {path}: {exc}"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            draft.unlink()
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretKeyError(
            f"the secret key file {path} must be readable by its owner only (chmod 600)"
        )
    return path.read_text().strip()


class Idempotency(NamedTuple):
    """A request's Idempotency-Key, the fingerprint a retry must match, and the
    sealer of its answer."""

    key: str
    fingerprint: str
    sealer: Sealer


class Reply(NamedTuple):
    """A command's answer as kept for its key: the status and the body's bytes."""

    status: int
    body: bytes
    replayed: bool = False  # read back for a retry, not made now


def check_key(key: str) -> None:
    """A 400 unless the key is 1 to MAX_KEY_LENGTH printable ASCII characters."""
    if not (0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()):
        raise Invalid(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"
        )


def from_request(
    key: str | None,
    *,
    method: str,
    path: str,
    if_match: str | None,
    body: bytes,
    sealer: Sealer,
) -> Idempotency | None:
    """The request's Idempotency-Key with the fingerprint of method, path, If-Match
    and body; None when the header is absent. ASCII only: what a client meant by
    other bytes depends on an encoding the header does not name."""
    if key is None:
        return None
    check_key(key)
    head = f"{method}\0{path}\0{if_match or ''}\0"
    fingerprint = hashlib.sha256(head.encode() + body).hexdigest()
    return Idempotency(key, fingerprint, sealer)


async def replay(conn: Queryable, idempotency: Idempotency) -> Reply | None:
    """The answer stored for this key, marked replayed; None when there is none."""
    row = await conn.fetchrow(_STORED, _row_key(idempotency.key))
    if row is None:
        return None
    if row["request_fingerprint"] != idempotency.fingerprint:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used for a different request"
        )
    body = idempotency.sealer.unseal(row["status"], row["body"])
    return Reply(row["status"], body, replayed=True)


async def remember(conn: Queryable, idempotency: Idempotency, reply: Reply) -> None:
    """Keep the answer (in the transaction that appends the command's events, when
    it has any)."""
    await conn.execute(
        _STORE,
        _row_key(idempotency.key),
        idempotency.fingerprint,
        reply.status,
        idempotency.sealer.seal(reply.status, reply.body),
    )


def is_taken(exc: asyncpg.UniqueViolationError) -> bool:
    """Whether the violation is a concurrent request with the same key that
    committed its answer first."""
    return exc.constraint_name == "command_results_pkey"


def _row_key(key: str) -> str:
    return hashlib.sha256(b"govledger idempotency key\0" + key.encode()).hexdigest()
