"""Timing one callable: median, p20 and p80 of many runs after a warm-up, inputs rotated.

On a GPU the runs are timed with device events by `triton.testing.do_bench` (which also
flushes the L2 cache before every run); on the CPU the same interface times each run with
`time.perf_counter`. Rows say which timer produced them, so CPU numbers are never mistaken
for GPU ones. The callable is given one input set per run, cycling through several sets, so
that no run finds its inputs already in a cache the previous run warmed.
"""
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, List, Sequence, Union

import torch


@dataclass(frozen=True)
class TimingSettings:
    warmup_ms: float  # time spent running before any run is timed
    rep_ms: float  # time budget of the timed runs
    # run counts of the perf_counter and plain CUDA-event timers (do_bench derives its own from rep_ms)
    min_runs: int  # at least this many timed runs, however slow each one is
    max_runs: int  # at most this many timed runs


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    timer: str  # "cuda-events (triton.testing.do_bench)", "cuda-events" or "cpu perf_counter"


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted sequence."""
    if not sorted_values:
        raise ValueError("quantile: no values")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], timer: str) -> Timing:
    s = sorted(times_ms)
    return Timing(quantile(s, 0.5), quantile(s, 0.2), quantile(s, 0.8), len(s), timer)


def _rotating(fn: Callable, input_sets: Sequence[tuple]) -> Callable[[], object]:
    if not input_sets:
        raise ValueError("measure: input_sets must hold at least one tuple of inputs")
    sets = itertools.cycle(input_sets)
    return lambda: fn(*next(sets))


def _cpu(call, s: TimingSettings) -> Timing:
    return summarize(_cpu_times(call, s), "cpu perf_counter")


def _cpu_times(call, s: TimingSettings, warmup: bool = True) -> List[float]:
    if warmup:
        call()  # first call: lazy initialisation, allocator growth
        start = time.perf_counter()
        while True:
            call()
            if (time.perf_counter() - start) * 1e3 >= s.warmup_ms:
                break
    times = []
    total = 0.0
    while len(times) < s.max_runs and (len(times) < s.min_runs or total < s.rep_ms):
        t0 = time.perf_counter()
        call()
        dt = (time.perf_counter() - t0) * 1e3
        times.append(dt)
        total += dt
    return times


def _cuda_events(call, s: TimingSettings) -> Timing:
    """Device events without Triton: warm-up, then one event pair per run."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < s.warmup_ms:
        call()
    torch.cuda.synchronize()
    times = []
    total = 0.0
    while len(times) < s.max_runs and (len(times) < s.min_runs or total < s.rep_ms):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        end.synchronize()
        dt = begin.elapsed_time(end)
        times.append(dt)
        total += dt
    return summarize(times, "cuda-events")


def _do_bench(call, s: TimingSettings) -> Timing:
    from triton.testing import do_bench

    warmup, rep = max(1, int(s.warmup_ms)), max(1, int(s.rep_ms))
    try:  # every run's time, so that the quantiles and the run count are our own
        times = do_bench(call, warmup=warmup, rep=rep, return_mode="all")
    except (AssertionError, TypeError, ValueError):  # a Triton without return_mode="all"
        q = [float(t) for t in do_bench(call, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])]
        return Timing(q[0], q[1], q[2], -1, "cuda-events (triton.testing.do_bench)")  # -1: run count unknown
    return summarize([float(t) for t in times], "cuda-events (triton.testing.do_bench)")  # list or tensor


def measure(fn: Callable, input_sets: Sequence[tuple], device: torch.device, settings: TimingSettings) -> Timing:
    """Time fn(*inputs), rotating through input_sets, on the device the inputs live on."""
    call = _rotating(fn, input_sets)
    if torch.device(device).type == "cuda":
        try:
            import triton.testing  # noqa: F401
        except ImportError:
            return _cuda_events(call, settings)
        return _do_bench(call, settings)
    return _cpu(call, settings)


def measure_interleaved(
    fns: Sequence[Callable], input_sets: Sequence[tuple], device: torch.device, settings: TimingSettings, rounds: int = 3
) -> List[Union[Timing, Exception]]:
    """Time several callables of one case; a callable that raises gets its exception back.

    On the CPU they are timed in alternating rounds (a b c a b c ...), so that a burst of load
    from other processes on a shared machine hits them alike instead of one of them; on a GPU
    (or with rounds=1) one after the other with `measure`.
    """
    out: List[Union[Timing, Exception]] = []
    if torch.device(device).type == "cuda" or rounds <= 1:
        for fn in fns:
            try:
                out.append(measure(fn, input_sets, device, settings))
            except Exception as e:  # recorded by the caller, the other callables still run
                out.append(e)
        return out
    per_round = TimingSettings(
        warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms / rounds,
        min_runs=math.ceil(settings.min_runs / rounds), max_runs=max(1, settings.max_runs // rounds),
    )
    calls = [_rotating(fn, input_sets) for fn in fns]
    times: List[Union[List[float], Exception]] = [[] for _ in fns]
    for r in range(rounds):
        for i, call in enumerate(calls):
            if isinstance(times[i], Exception):
                continue
            try:
                times[i] += _cpu_times(call, per_round, warmup=r == 0)
            except Exception as e:
                times[i] = e
    return [t if isinstance(t, Exception) else summarize(t, f"cpu perf_counter ({rounds} interleaved rounds)") for t in times]
