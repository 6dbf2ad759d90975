"""CPU time and memory of processes, read from /proc (Linux only)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds; 0.0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except OSError:
        return 0


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. nginx's workers), from /proc/<pid>/task/*/children."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def with_children(pids: Iterable[int]) -> list[int]:
    """``pids`` and their direct children (nginx master and workers)."""
    result: list[int] = []
    for pid in pids:
        result.append(pid)
        result += children_of(pid)
    return result


def total_cpu(pids: Iterable[int]) -> float:
    """Sum of :func:`cpu_seconds` over ``pids``."""
    return sum(cpu_seconds(pid) for pid in pids)


def total_rss(pids: Iterable[int]) -> int:
    """Sum of :func:`rss_bytes` over ``pids``."""
    return sum(rss_bytes(pid) for pid in pids)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"
