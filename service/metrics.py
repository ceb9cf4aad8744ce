"""The service's Prometheus metrics: ingest, check latency, projection lag.

One registry per process, filled by the code that does the work through the functions
below (hot paths call them per group or per request, never per record). With several
processes behind SO_REUSEPORT each process reports its own figures.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The classic text format every Prometheus scrapes; `*_created` series are noise here.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # type: ignore[no-untyped-call]

registry = CollectorRegistry(auto_describe=True)

_records = Counter(
    "ingest_records",
    "Usage records answered by ingest, by result.",
    ["result"],
    registry=registry,
)
_accepted = _records.labels(result="accepted")
_duplicate = _records.labels(result="duplicate")
_rejected = _records.labels(result="rejected")

_groups = Counter(
    "ingest_groups",
    "Group commits of usage records (one transaction each).",
    registry=registry,
)
_group_size = Histogram(
    "ingest_group_size",
    "Records written by one group commit.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
    registry=registry,
)
_commit_seconds = Histogram(
    "ingest_commit_seconds",
    "Time from a group's first statement to its commit.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=registry,
)
_check_seconds = Histogram(
    "check_seconds",
    "Time to answer POST /api/governance/check, by reason.",
    ["reason"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
    registry=registry,
)
_lag_events = Gauge(
    "projection_lag_events",
    "Events in the log that the projection has not applied yet.",
    ["projection"],
    registry=registry,
)
_lag_seconds = Gauge(
    "projection_lag_seconds",
    "Age of the oldest event the projection has not applied yet (0 when caught up).",
    ["projection"],
    registry=registry,
)


_failing_position = Gauge(
    "projection_failing_position",
    "Position of the event the projection cannot apply (0 when it is not failing).",
    ["projection"],
    registry=registry,
)


_refused_events = Counter(
    "projection_refused_events",
    "Legacy events the projection passed over: they have no current form.",
    ["projection"],
    registry=registry,
)


def count_refused_event(projection: str) -> None:
    _refused_events.labels(projection=projection).inc()


def count_records(*, accepted: int = 0, duplicates: int = 0, rejected: int = 0) -> None:
    if accepted:
        _accepted.inc(accepted)
    if duplicates:
        _duplicate.inc(duplicates)
    if rejected:
        _rejected.inc(rejected)


def observe_group(size: int, seconds: float) -> None:
    """One committed group of `size` new records that took `seconds` to commit."""
    _groups.inc()
    _group_size.observe(size)
    _commit_seconds.observe(seconds)


_check_children: dict[str, Histogram] = {}


def observe_check(seconds: float, reason: str) -> None:
    # labels() costs more than the observation itself: keep one child per reason.
    child = _check_children.get(reason)
    if child is None:
        child = _check_children[reason] = _check_seconds.labels(reason=reason)
    child.observe(seconds)


def set_projection_lag(projection: str, *, events: int, seconds: float) -> None:
    _lag_events.labels(projection=projection).set(events)
    _lag_seconds.labels(projection=projection).set(seconds)


def set_projection_failure(projection: str, position: int | None) -> None:
    _failing_position.labels(projection=projection).set(position or 0)


def render() -> bytes:
    """The Prometheus text exposition of every metric."""
    return generate_latest(registry)
