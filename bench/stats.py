"""Latency histograms and delivery accounting shared by the load generator and the report.

Latencies go into log-linear buckets (like HdrHistogram with 5 bits of mantissa: under 1.6%
relative error) over microseconds, so that recording one costs a few integer operations and
merging the workers' histograms is a sum.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Microseconds below this are their own bucket.
LINEAR = 64
SUB_BITS = 5
SUB = 1 << SUB_BITS  # 32 buckets per power of two
BUCKETS = LINEAR + 40 * SUB


def bucket_of(us: int) -> int:
    """The bucket index of a latency of ``us`` microseconds (negative counts as 0)."""
    if us < LINEAR:
        return us if us > 0 else 0
    shift = us.bit_length() - SUB_BITS - 1
    return min(BUCKETS - 1, LINEAR + (shift - 1) * SUB + (us >> shift) - SUB)


def bucket_value(index: int) -> float:
    """A representative latency (µs) of bucket ``index``: the middle of its range."""
    if index < LINEAR:
        return float(index)
    shift, sub = divmod(index - LINEAR, SUB)
    shift += 1
    low = (SUB + sub) << shift
    return low + ((1 << shift) - 1) / 2


def new_histogram() -> list[int]:
    """An empty histogram: a count per bucket."""
    return [0] * BUCKETS


def sparse(histogram: Sequence[int]) -> dict[int, int]:
    """Only the non-empty buckets, to send between processes."""
    return {i: n for i, n in enumerate(histogram) if n}


def merge_sparse(histograms: Iterable[Mapping[int | str, int]]) -> dict[int, int]:
    """The sum of sparse histograms (keys may have become strings through JSON)."""
    total: dict[int, int] = {}
    for histogram in histograms:
        for key, count in histogram.items():
            total[int(key)] = total.get(int(key), 0) + count
    return total


def percentiles(histogram: Mapping[int, int], points: Sequence[float] = (50, 99, 99.9)
                ) -> list[float | None]:
    """Latency percentiles (µs) of a sparse histogram; None when it is empty."""
    count = sum(histogram.values())
    if not count:
        return [None for _ in points]
    ordered = sorted(histogram.items())
    results: list[float | None] = []
    for point in points:
        rank = max(1, round(point / 100 * count + 0.4999))
        seen = 0
        for index, n in ordered:
            seen += n
            if seen >= rank:
                results.append(bucket_value(index))
                break
    return results


def latency_summary(histogram: Mapping[int, int], max_us: int | None) -> dict[str, float | None]:
    """p50/p99/p999/max in milliseconds."""
    p50, p99, p999 = percentiles(histogram)
    return {
        "p50_ms": _ms(p50),
        "p99_ms": _ms(p99),
        "p999_ms": _ms(p999),
        "max_ms": _ms(max_us),
    }


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000, 3)


# Counts of things that went wrong: the worst run is reported, never a median that hides one.
WORST_IS_MAX = frozenset({
    "lost", "duplicated", "reordered", "errors", "publish_errors", "publish_unacked",
    "crashed_nodes", "dropped_while_idle", "failed", "subscribers_disconnected",
    "readers_disconnected", "subscribe_refusals", "lost_max", "duplicated_max",
    "reordered_max"})
WORST_IS_MIN = frozenset({"stalled_disconnected", "connected", "subscribed"})


def median_of(values: Iterable[Any]) -> Any:
    """Median of the numbers among ``values`` (None when there are none); booleans: any False.

    The median of whole numbers is rounded to a whole number.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, bool) for v in present):
        return all(present)
    numbers = [v for v in present if isinstance(v, int | float)]
    if not numbers:
        return present[0]
    value = statistics.median(numbers)
    if all(isinstance(v, int) for v in numbers):
        return round(value)
    return round(value, 6)


def median_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Field-wise median of flat records (the runs of one step of one target).

    Counts of failures take the worst run instead (:data:`WORST_IS_MAX`, :data:`WORST_IS_MIN`).
    """
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k not in keys]
    result: dict[str, Any] = {}
    for key in keys:
        values = [record.get(key) for record in records]
        if any(isinstance(v, dict | list) for v in values):
            continue
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers and key in WORST_IS_MAX:
            result[key] = max(numbers)
        elif numbers and key in WORST_IS_MIN:
            result[key] = min(numbers)
        else:
            result[key] = median_of(values)
    return result
