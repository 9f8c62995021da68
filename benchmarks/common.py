"""Shared helpers for the benchmark scripts: timing, threads, an honest environment header."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch


def set_threads(n: int) -> int:
    """Pin torch's intra-op threads (the scripts report what they ran with)."""
    if n < 1:
        raise ValueError(f"Invalid threads: {n}")
    torch.set_num_threads(n)
    return torch.get_num_threads()


def header(title: str, threads: int) -> str:
    """Versions, threads and the machine's load average: timings on a shared box are noisy."""
    from importlib.metadata import version

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"== {title} ==\n"
            f"torch {torch.__version__} | higher {version('higher')} | "
            f"torchopt {version('torchopt')} | python {platform.python_version()}\n"
            f"torch threads: {threads} | cpu cores: {os.cpu_count()} | "
            f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> List[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int,
                     warmup: int = 1) -> Dict[str, List[float]]:
    """Like :func:`time_calls` for several functions, run round-robin (one call of each per
    repeat), so a burst of load from other processes hits every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms"


def spread(xs: List[float]) -> str:
    """min..max of the timed repeats, so a reader sees the noise next to the median."""
    return f"[{min(xs) * 1e3:.1f}..{max(xs) * 1e3:.1f}]"


def peak_mb(fn) -> float:
    """Peak (MB) of the running sum of CPU allocations the profiler records during ``fn()``."""
    import sys
    # the profiler's C++ side prints start/stop lines on stderr: silence fd 2 for the call
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True, record_shapes=False) as prof:
            fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    run = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        run += e.self_cpu_memory_usage
        peak = max(peak, run)
    return peak / 2 ** 20
