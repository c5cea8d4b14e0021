"""The one timer of the benchmarks: median, p20 and p80 of many runs after a warm-up.

On the CPU the callables of one case are timed in interleaved rounds (a b c a b c ...), so
that a burst of load from other processes on a shared machine hits the baseline and the
candidates alike: that is what makes CPU ratios stable. On a GPU each callable is timed
with device events by `triton.testing.do_bench` (which flushes the L2 cache before every
run), or with plain CUDA events where Triton is missing; `graph_replay` times the replay of
one CUDA-graph capture (the GPU work alone) and `host_ms` the CPU side of a call. Every call
gets one input set, cycling through several, so that no run finds its inputs in a cache
that the previous run warmed. Rows say which timer made them. CPU runs of the command line
first make glibc's malloc keep freed memory (malloc.py), so that page faults of memory freed
by an earlier call are not timed.
"""
import itertools
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, List, Sequence, Union

import torch


@dataclass(frozen=True)
class TimingSettings:
    warmup_ms: float  # time spent running before any run is timed
    rep_ms: float  # time budget of the timed runs of one callable
    min_runs: int  # at least this many timed runs, however slow each one is
    max_runs: int  # at most this many timed runs (do_bench derives its count from rep_ms)
    rounds: int = 1  # CPU: interleaved rounds the runs are split into


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    timer: str


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


def _cpu_times(call, s: TimingSettings, warmup: bool) -> List[float]:
    if warmup:
        start = time.perf_counter()
        call()  # at least one call: lazy initialisation, allocator growth
        while (time.perf_counter() - start) * 1e3 < s.warmup_ms:
            call()
    times: List[float] = []
    while len(times) < s.max_runs and (len(times) < s.min_runs or sum(times) < s.rep_ms):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _cpu_interleaved(calls, s: TimingSettings) -> List[Union[Timing, Exception]]:
    rounds = max(1, s.rounds)
    per_round = replace(s, rep_ms=s.rep_ms / rounds, min_runs=math.ceil(s.min_runs / rounds),
                        max_runs=max(1, s.max_runs // rounds))
    times: List[Union[List[float], Exception]] = [[] for _ in calls]
    for r in range(rounds):
        for i, call in enumerate(calls):
            if isinstance(times[i], Exception):
                continue
            try:
                times[i] += _cpu_times(call, per_round, warmup=r == 0)
            except Exception as e:  # recorded by the caller; the other callables still run
                times[i] = e
    timer = f"cpu perf_counter ({rounds} interleaved rounds)"
    return [t if isinstance(t, Exception) else summarize(t, timer) for t in times]


def _gpu(call, s: TimingSettings) -> Timing:
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - start) * 1e3 / 3
    rep_ms = max(s.rep_ms, s.min_runs * estimate_ms)  # at least min_runs runs of a slow call
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        times = do_bench(call, warmup=max(1, int(s.warmup_ms)), rep=max(1, int(rep_ms)), return_mode="all")
        return summarize([float(t) for t in times], "cuda-events (triton.testing.do_bench)")
    events = []
    while len(events) < s.max_runs and (len(events) < s.min_runs or len(events) * estimate_ms < rep_ms):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        events.append((begin, end))
    torch.cuda.synchronize()
    return summarize([b.elapsed_time(e) for b, e in events], "cuda-events")


def measure(fns: Sequence[Callable], input_sets: Sequence[tuple], device: torch.device,
            settings: TimingSettings) -> List[Union[Timing, Exception]]:
    """Time fn(*inputs) for each fn, rotating through input_sets, on the given device; a
    callable that raises gets its exception back in its place."""
    calls = [_rotating(fn, input_sets) for fn in fns]
    if torch.device(device).type != "cuda":
        return _cpu_interleaved(calls, settings)
    out: List[Union[Timing, Exception]] = []
    for call in calls:
        try:
            out.append(_gpu(call, settings))
        except Exception as e:
            out.append(e)
    return out


def graph_replay(fn: Callable, inputs: tuple, device: torch.device, settings: TimingSettings) -> Timing:
    """Time the replay of one CUDA-graph capture of fn(*inputs): the GPU work without Python
    or launch overhead. Raises where the call cannot be captured (it reads the device)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(3):
            fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*inputs)
    torch.cuda.synchronize(device)
    (t,) = measure([graph.replay], [()], device, settings)
    if isinstance(t, Exception):
        raise t
    return replace(t, timer=t.timer + ", CUDA-graph replay")


def host_ms(fn: Callable, inputs: tuple, device: torch.device, calls: int) -> float:
    """CPU wall time per call over a burst of calls without a device sync between them (where
    a call syncs, this includes its wait for the device)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda *a: None)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*inputs)
    dt = (time.perf_counter() - t0) * 1e3 / calls
    sync(device)
    return dt
