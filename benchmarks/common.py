"""Shared helpers of the benchmarks: median timing, the machine line, markdown tables.

Every benchmark times the project's code and its named baseline in the same process on the same
inputs, so their ratio holds even when the absolute times move with the machine's load.
"""

from __future__ import annotations

import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, no install

import torch  # noqa: E402


def median_time(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> float:
    """Median wall seconds of `fn()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int = 1,
                        repeats: int = 5) -> dict[str, float]:
    """Median wall seconds of each function, called round-robin (one call of each per round).

    Interleaving makes the ratios robust to load that comes and goes on a shared machine: a slow
    phase hits every contender in the same round instead of whichever happened to run then.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


class OtherLoad:
    """Share of the machine's CPU time that *other* processes used since construction (Linux only).

    Printed under each table so that a reader can tell a quiet run from one taken while something
    else was computing: /proc/stat busy time minus this process's own CPU time, over wall x cores.
    """

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()

    def note(self) -> str:
        end = self._snapshot()
        if self.start is None or end is None:
            return "load from other processes: unknown"
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        share = max(busy - own, 0.0) / max(wall * (os.cpu_count() or 1), 1e-9)
        return f"load from other processes during the run: {100 * share:.0f}% of {os.cpu_count()} cores"


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine_line() -> str:
    return (f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A pipe table; numbers are expected already formatted as strings."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def free_port_hint() -> int:
    """A port free right now on 127.0.0.1 (for a torchrun rendezvous started next)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
