"""The peer: the Python `eventsourcing` library (its PostgreSQL recorder) saving one
new aggregate, one event, per call; beside `eventstore.append` of one event to a new
stream per call. Both sequential on one connection, against the same cluster.

`eventsourcing[postgres]` is an optional extra of the bench; without it the scenario
says so and measures nothing.
"""

from __future__ import annotations

import functools
import time
import uuid
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from service import eventstore
from service.domain.events import Budget, CustomerCreated
from service.records import NewEvent

APP_NAME = "GovledgerPeer"  # the library names its table after it
TABLE = "govledgerpeer_events"


def available() -> bool:
    try:
        import eventsourcing.postgres  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    from importlib.metadata import version as installed

    import psycopg

    return (
        f"eventsourcing {installed('eventsourcing')}, psycopg {psycopg.__version__}"
        f" ({psycopg.pq.__impl__})"
    )


def environment(dsn: str) -> dict[str, str]:
    """The library's settings for the cluster a libpq URL names (socket or TCP)."""
    parts = urlsplit(dsn)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/") or "postgres",
        "POSTGRES_HOST": query.get("host") or parts.hostname or "localhost",
        "POSTGRES_PORT": query.get("port") or str(parts.port or 5432),
        "POSTGRES_USER": parts.username or query.get("user") or "postgres",
        "POSTGRES_PASSWORD": parts.password or "",
    }


@functools.cache
def _customer_aggregate() -> Any:
    """The peer's aggregate class, defined once: the library registers each class
    under its topic and refuses a second class with the same one (a later rep)."""
    from eventsourcing.domain import Aggregate, event

    class Customer(Aggregate):
        @event("Created")
        def __init__(
            self, name: str, budget_id: str, max_limit: str, reset_duration: str
        ) -> None:
            self.name = name
            self.budget_id = budget_id
            self.max_limit = max_limit
            self.reset_duration = reset_duration

    return Customer


def peer_saves(dsn: str, *, seconds: float, warmup: int = 200) -> float:
    """Saves/s (= events/s) of new aggregates through the library's own API."""
    from eventsourcing.application import Application

    Customer = _customer_aggregate()
    application: Any = type(APP_NAME, (Application,), {})(env=environment(dsn))

    def save_one(n: int) -> None:
        application.save(Customer(f"c{n}", str(uuid.uuid4()), "100", "1M"))

    try:
        for n in range(warmup):
            save_one(n)
        saved = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            save_one(saved)
            saved += 1
        return saved / (time.perf_counter() - started)
    finally:
        application.close()


async def our_appends(dsn: str, *, seconds: float, warmup: int = 200) -> float:
    """Appends/s of one CustomerCreated to a new stream (expected version 0)."""
    conn = await asyncpg.connect(dsn)
    try:
        await eventstore.init_connection(conn)

        async def append_one(n: int) -> None:
            customer_id = str(uuid.uuid4())
            created = CustomerCreated(
                customer_id=customer_id,
                name=f"c{n}",
                budgets=(
                    Budget(
                        budget_id=str(uuid.uuid4()),
                        max_limit=Decimal(100),
                        reset_duration="1M",
                    ),
                ),
            )
            await eventstore.append(
                conn, f"customer-{customer_id}", 0, [NewEvent(event=created)]
            )

        for n in range(warmup):
            await append_one(n)
        appended = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            await append_one(appended)
            appended += 1
        return appended / (time.perf_counter() - started)
    finally:
        await conn.close()
