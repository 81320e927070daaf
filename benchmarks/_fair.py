"""Fair timing for the benchmarks: state the machine, refuse a loaded one, interleave, median.

faiss's OpenMP threads slow down far more than XLA's or numba's pools when other jobs hold the
cores, so a comparison on a busy machine measures the contention, not the methods. Every timing
script prints the load average and both sides' thread counts first, runs the methods in rotation
(each round in a different order) and reports medians; a 1-minute load average above 0.5 per core
before timing marks the result NOT COMPARABLE.
"""

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

MAX_LOAD_PER_CORE = 0.5


def machine_report(faiss: Any = None) -> str | None:
    """Prints the load average, cores and every pool's thread count. Returns None when the machine
    is quiet enough to compare, else the 'NOT COMPARABLE: ...' reason (also printed)."""
    import jax
    import numba

    cores = os.cpu_count() or 1
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    print(f"CPU cores: {cores} (this process may use {len(os.sched_getaffinity(0))})")
    if faiss is not None:
        print(f"faiss {faiss.__version__}: OpenMP threads {faiss.omp_get_max_threads()}")
    try:
        layer = numba.threading_layer()  # known once a parallel kernel has run
    except ValueError:
        layer = f"{numba.config.THREADING_LAYER} (not started yet)"
    print(f"numba {numba.__version__}: threads {numba.get_num_threads()}, layer {layer}")
    print(
        f"jax {jax.__version__}: backend {jax.default_backend()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (XLA's CPU pool uses every core)"
    )
    limit = MAX_LOAD_PER_CORE * cores
    if load[0] > limit:
        reason = f"NOT COMPARABLE: load average {load[0]:.2f} > {MAX_LOAD_PER_CORE} per core"
        print(f"{reason} ({limit:.1f} on {cores} cores): other jobs hold the CPU")
        return reason
    return None


def interleaved(
    methods: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Runs each method `repeats` times in rotation (round r starts at method r mod M), so that
    background load hits all alike. -> (wall times per method in seconds, last result of each)."""
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            results[name] = methods[name]()
            times[name].append(time.perf_counter() - start)
    return times, results


def summary(name: str, times: list[float], per: int = 1) -> str:
    """One line: median (and all runs) in seconds, and per item in ms when per > 1."""
    median = statistics.median(times)
    listed = ", ".join(f"{t:.3f}" for t in times)
    line = f"{name:28s} median {median:.3f} s (all: {listed})"
    if per > 1:
        line += f"; {1e3 * median / per:.3f} ms per query"
    return line
