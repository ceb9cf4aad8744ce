"""Idempotency-Key answers: a request's key and fingerprint, and its answer (status
and body bytes) kept sealed in command_results beside the command's events, replayed
byte for byte.

A virtual key's secret may be in an answer, so the stored body is sealed with AES-GCM
under a key derived (HKDF-SHA256) from the Idempotency-Key's value, and the row is
found by another hash of that value: only a caller holding the key can read the
answer back, and a row changed in the database fails authentication rather than
being replayed.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import NamedTuple

import asyncpg
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.errors import IdempotencyConflict, Invalid
from service.eventstore import Queryable

MAX_KEY_LENGTH = 255
_NONCE_BYTES = 12  # AES-GCM's standard nonce; each derived key seals one answer

_STORED = """
SELECT request_fingerprint, status, body FROM command_results
WHERE idempotency_key = $1
"""
_STORE = """
INSERT INTO command_results (idempotency_key, request_fingerprint, status, body)
VALUES ($1, $2, $3, $4)
"""


class Idempotency(NamedTuple):
    """A request's Idempotency-Key and the fingerprint a retry must match."""

    key: str
    fingerprint: str


class Reply(NamedTuple):
    """A command's answer as kept for its key: the status and the body's bytes."""

    status: int
    body: bytes
    replayed: bool = False  # read back for a retry, not made now


def from_request(
    key: str | None, *, method: str, path: str, if_match: str | None, body: bytes
) -> Idempotency | None:
    """The request's Idempotency-Key with the fingerprint of method, path, If-Match
    and body; None when the header is absent."""
    if key is None:
        return None
    if not 0 < len(key) <= MAX_KEY_LENGTH:
        raise Invalid(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
    head = f"{method}\0{path}\0{if_match or ''}\0"
    return Idempotency(key, hashlib.sha256(head.encode() + body).hexdigest())


async def replay(conn: Queryable, idempotency: Idempotency) -> Reply | None:
    """The answer stored for this key, marked replayed; None when there is none."""
    row = await conn.fetchrow(_STORED, _row_key(idempotency.key))
    if row is None:
        return None
    if row["request_fingerprint"] != idempotency.fingerprint:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used for a different request"
        )
    body = _unseal(idempotency.key, row["status"], row["body"])
    return Reply(row["status"], body, replayed=True)


async def remember(conn: Queryable, idempotency: Idempotency, reply: Reply) -> None:
    """Keep the answer, in the transaction that appends the command's events."""
    await conn.execute(
        _STORE,
        _row_key(idempotency.key),
        idempotency.fingerprint,
        reply.status,
        _seal(idempotency.key, reply.status, reply.body),
    )


def is_taken(exc: asyncpg.UniqueViolationError) -> bool:
    """Whether the violation is a concurrent request with the same key that
    committed its answer first."""
    return exc.constraint_name == "command_results_pkey"


def _row_key(key: str) -> str:
    return hashlib.sha256(b"govledger idempotency key\0" + key.encode()).hexdigest()


def _cipher(key: str) -> AESGCM:
    derived = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"govledger command result",
    ).derive(key.encode())
    return AESGCM(derived)


def _seal(key: str, status: int, body: bytes) -> bytes:
    """The nonce, then the body encrypted and authenticated along with its status."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + _cipher(key).encrypt(nonce, body, str(status).encode())


def _unseal(key: str, status: int, sealed: bytes) -> bytes:
    nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
    return _cipher(key).decrypt(nonce, ciphertext, str(status).encode())
