"""Shared helpers of the benchmarks: FLOP counts, peak-memory probes, timing, tables."""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch

__all__ = [
    "pattern_flops",
    "dense_flops",
    "BWD_FACTOR",
    "PeakRSS",
    "time_calls",
    "machine_info",
    "markdown_table",
    "mem_available_bytes",
    "save_results",
]

BWD_FACTOR = 2.5
"""Backward FLOPs as a multiple of forward FLOPs (docs/operator.md); fwd+bwd counts 3.5x."""


def pattern_flops(
    n: int,
    heads: int,
    head_dim: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool,
    batch: int = 1,
    backward: bool = False,
) -> float:
    """FLOPs dilated attention needs: ``sum_i 4 * B * N * H * D * min(w_i, N) / r_i**2``.

    Halved when causal; times ``1 + BWD_FACTOR`` for forward plus backward.
    """
    total = 0.0
    for w, r in zip(segment_lengths, dilation_rates):
        total += 4.0 * batch * n * heads * head_dim * min(w, n) / (r * r)
    if is_causal:
        total *= 0.5
    return total * (1.0 + BWD_FACTOR) if backward else total


def dense_flops(
    n: int, heads: int, head_dim: int, is_causal: bool, batch: int = 1, backward: bool = False
) -> float:
    """FLOPs of full softmax attention over ``n`` positions (one pattern ``w = n, r = 1``)."""
    return pattern_flops(n, heads, head_dim, [n], [1], is_causal, batch, backward)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def mem_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None where it is not readable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident-memory increase of this process over a code region.

    ``start()`` records the current RSS (``VmRSS``) and, where Linux allows it, resets
    the process's high-water mark by writing ``5`` to ``/proc/self/clear_refs``.
    ``stop()`` returns ``peak - start`` in bytes, with the peak read from ``VmHWM``
    (``ru_maxrss`` where ``/proc`` is missing). RSS counts every page the process
    touched, so it sees allocations made by C++ kernels as well as Python. Without the
    reset, an earlier higher peak hides the region's own one (``method`` says which).
    """

    def __init__(self) -> None:
        self.base_kib = 0
        self.method = "unknown"

    def start(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after clear_refs reset"
        except OSError:
            self.method = (
                "ru_maxrss (no peak reset: a lower bound only when an earlier peak was higher)"
            )
        rss = _status_kib("VmRSS")
        self.base_kib = (
            rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )

    def stop(self) -> int:
        peak = _status_kib("VmHWM")
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak - self.base_kib, 0) * 1024

    def __repr__(self) -> str:
        return f"PeakRSS(base_kib={self.base_kib}, method={self.method!r})"


def time_calls(
    fn: Callable[[], None], repeats: int, budget_s: float, first_s: float
) -> list[float]:
    """Time ``fn`` up to ``repeats`` times, fewer when ``first_s * n`` exceeds ``budget_s``.

    At least one timed call always runs. Returns the wall times in seconds.
    """
    n = max(1, min(repeats, int(budget_s // max(first_s, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_in_checkout(checkout: str, worker: str, cfg: dict) -> list[float]:
    """Run ``worker`` (Python source that reads ``json.loads(sys.argv[1])`` and prints
    ``RESULT <json list of seconds>``) with ``cfg`` in a fresh process importing
    longnet from ``checkout`` (its working directory and ``PYTHONPATH``), with
    ``cfg["threads"]`` OpenMP threads; returns the times."""
    env = dict(os.environ, PYTHONPATH=checkout, OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run(
        [sys.executable, "-c", worker, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=checkout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"the run in {checkout} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def machine_info(threads: int) -> dict[str, object]:
    """CPU model, core count, torch version and thread setting, for the result files."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mem_total_gib": round(
            (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2**30, 1
        ),
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def save_results(
    results: dict[str, Any],
    out_dir: str,
    name: str,
    table: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], str], bool],
) -> None:
    """``out_dir/name.json`` (the results), ``.md`` (``table(results)``) and ``.png``
    (``plot(results, path)``, which returns False where matplotlib is missing)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(table(results) + "\n")
    plot(results, base + ".png")
