"""What a process tree costs, read from /proc (Linux): CPU ticks, resident memory, open fds.

Shared by the benchmarks (router and sim CPU per request) and the reliability tests (no growth
under load). A process that exits between the listing and the read is skipped, not an error.
"""

from __future__ import annotations

import contextlib
import os


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (forked workers, helper processes)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pid: int) -> int:
    """utime + stime (clock ticks) summed over ``pid``'s process tree."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total


def rss_mb(pid: int) -> float:
    """Resident MiB summed over ``pid``'s tree (pages shared between processes count in each)."""
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open fds) of one process, not its children."""
    rss_kb = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))
