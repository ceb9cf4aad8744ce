"""The benchmark report's numbers: a ratio that misses its target never reads as
meeting it (tools/bench, the report and the chart alike); what the check scenario
reads from wrk's report, and the CPU a request of the servers it measures."""

from __future__ import annotations

import pytest

from tools.bench import check as check_bench
from tools.bench.rows import ratio_text


@pytest.mark.parametrize(
    ("value", "bound", "shown"),
    [
        (0.698, 0.70, "0.698"),  # two places would show the target itself
        (0.7049, 0.70, "0.705"),  # above it, but 0.70 is its own value: three
        (0.70, 0.70, "0.70"),  # exactly the target
        (0.6449, 0.70, "0.64"),  # far from it: two places tell it apart
        (0.698, None, "0.70"),  # no target to be confused with
        (1.956, 0.50, "1.96"),
    ],
)
def test_a_ratio_shows_enough_places_to_tell_it_from_its_target(value, bound, shown):
    assert ratio_text(value, bound) == shown


WRK_REPORT = """Running 4s test @ http://127.0.0.1:8080/api/governance/check
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.32ms  412.00us   9.10ms   88.12%
    Req/Sec    19.26k     1.02k   20.50k    80.00%
  Latency Distribution
     50%    3.24ms
     75%    3.50ms
     90%    3.81ms
     99%  812.00us
  76688 requests in 4.00s, 18.14MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  19161.43
Transfer/sec:      4.53MB
"""


def test_a_wrk_report_gives_the_rate_latencies_requests_and_failures():
    result = check_bench.wrk_result(WRK_REPORT)

    assert (
        result.per_second,
        result.p50_ms,
        result.p99_ms,
        result.requests,
        result.errors,
    ) == (19161.43, 3.24, 0.812, 76688, 3)


def test_the_cpu_a_request_is_the_processes_seconds_over_the_requests():
    spent = check_bench.spent((10.0, 2.0), (10.75, 2.25), 25_000)

    assert spent == check_bench.CpuSpent(user_us=30.0, system_us=10.0)


@pytest.mark.parametrize(
    ("before", "after", "requests"),
    [(None, (1.0, 1.0), 10), ((1.0, 1.0), None, 10), ((1.0, 1.0), (2.0, 2.0), 0)],
)
def test_no_cpu_a_request_without_both_readings_or_without_requests(
    before, after, requests
):
    assert check_bench.spent(before, after, requests) is None
