"""The service's Prometheus metrics: ingest, check latency, projection lag.

One registry per process, filled by the code that does the work through the functions
below (hot paths call them per group or per request, never per record). With several
processes behind SO_REUSEPORT each process reports its own figures.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class _CheckSeries:
    """One reason's observations: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_CHECK_BOUNDS)
        self.total = 0.0


# The check's latency is kept as plain counts, published as a histogram when /metrics
# is scraped: a prometheus_client Histogram costs more per check (its lock, a value
# object per bucket, a linear search) than the rest of the check's bookkeeping.
_CHECK_BOUNDS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.05,
    float("inf"),
)
_CHECK_LE = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in _CHECK_BOUNDS
)
_check_series: dict[str, _CheckSeries] = {}


class _CheckCollector(Collector):
    """`check_seconds` as a labelled Histogram exposes it, sample for sample: each
    reason's cumulative buckets (`le` before `reason`), then its count and sum."""

    def collect(self) -> Iterator[Metric]:
        metric = Metric(
            "check_seconds",
            "Time to answer POST /api/governance/check, by reason.",
            "histogram",
        )
        for reason, series in list(_check_series.items()):
            seen = 0
            for le, count in zip(_CHECK_LE, series.counts, strict=True):
                seen += count
                metric.add_sample(
                    "check_seconds_bucket", {"le": le, "reason": reason}, float(seen)
                )
            metric.add_sample("check_seconds_count", {"reason": reason}, float(seen))
            metric.add_sample("check_seconds_sum", {"reason": reason}, series.total)
        yield metric


registry.register(_CheckCollector())
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


_failed_batches = Counter(
    "projection_failed_batches",
    "Batches the projection failed to apply and retried in halves to find the event"
    " that fails; growth with no failing position means failures that did not recur.",
    ["projection"],
    registry=registry,
)


def count_failed_batch(projection: str) -> None:
    _failed_batches.labels(projection=projection).inc()


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


def observe_check(seconds: float, reason: str) -> None:
    series = _check_series.get(reason)
    if series is None:
        series = _check_series[reason] = _CheckSeries()
    # The first bound ≥ seconds: Histogram.observe's `seconds <= bound`.
    series.counts[bisect_left(_CHECK_BOUNDS, seconds)] += 1
    series.total += seconds


def set_projection_lag(projection: str, *, events: int, seconds: float) -> None:
    _lag_events.labels(projection=projection).set(events)
    _lag_seconds.labels(projection=projection).set(seconds)


def set_projection_failure(projection: str, position: int | None) -> None:
    _failing_position.labels(projection=projection).set(position or 0)


def render() -> bytes:
    """The Prometheus text exposition of every metric."""
    return generate_latest(registry)
