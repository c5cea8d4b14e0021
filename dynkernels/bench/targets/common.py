"""What the issue-target measurements share: one timer for every variant (dense baselines
included), optional CUDA-graph and host-side timings, result rows saved after every
measurement (so that a step killed by its time limit keeps what it measured), and the
mapping of GPU backends onto CPU ones for the CPU smoke runs.

Timings (GPU): `triton.testing.do_bench` through dynkernels.bench.timing.measure, one call
per timed run, L2 flushed before each run, median of the runs; the time between the events
around one call, so it includes the call's own host synchronisations and any kernel-launch
latency that the preceding L2-flush kernel does not hide. The CUDA-graph timing replays one
captured call: the GPU work alone, without Python or launch overhead (only for calls that
read nothing from the device on the host). Host ms/call: wall time of a burst of calls,
without a device sync between them, divided by their number: the CPU side of one call (it
includes waiting for the GPU where the call syncs). On the CPU (smoke runs) the timer is
`time.perf_counter`, and the numbers only show that the code runs.
"""
import datetime as _dt
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..timing import TimingSettings, measure

# do_bench settings per (device type, smoke): modest, so that a whole target step fits its budget.
TIMING = {
    ("cuda", False): TimingSettings(warmup_ms=10, rep_ms=50, min_runs=10, max_runs=1000),
    ("cuda", True): TimingSettings(warmup_ms=1, rep_ms=5, min_runs=3, max_runs=20),
    ("cpu", False): TimingSettings(warmup_ms=20, rep_ms=200, min_runs=5, max_runs=200),
    ("cpu", True): TimingSettings(warmup_ms=0, rep_ms=0, min_runs=1, max_runs=1),
}
HOST_CALLS = {False: 20, True: 1}  # calls per host-time burst

TIMING_NOTE = __doc__.split("\n\n", 1)[1].replace("\n", " ").strip()


class Unavailable(Exception):
    """This variant cannot run here (a backend not built, Triton on the CPU without the interpreter)."""


def backend_for(requested: str, device: torch.device) -> str:
    """The backend that runs `requested` here. On CPU tensors (smoke runs) "cuda" runs the
    compiled CPU kernels ("cpu"), the same call path; "triton" needs the Triton interpreter."""
    from dynkernels.ops._backend import resolve

    b = requested
    if device.type == "cpu" and requested == "cuda":
        b = "cpu"
    try:
        return resolve("gather_rows", b, device)
    except (ValueError, RuntimeError) as e:
        raise Unavailable(str(e)) from e


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| in float32 (inf for a shape mismatch, nan for non-finite values)."""
    if actual.shape != expected.shape:
        return float("inf")
    a, e = actual.float(), expected.float()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("nan")
    return (a - e).abs().max().item() / max(e.abs().max().item(), 1e-6)


def geomean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0 or abs(v) >= 10 ** digits:
        return f"{v:.0f}"
    return f"{v:.{max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))}f}"


def md_table(headers: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows
    ]


class Target:
    """One target step: its rows, its time budget, its timers and its JSON file."""

    def __init__(self, name: str, device: torch.device, smoke: bool, out_dir: str, budget_s: float, argv: List[str]):
        from ..results import environment

        self.name = name
        self.device = torch.device(device)
        self.smoke = smoke
        self.gpu = self.device.type == "cuda"
        self.settings = TIMING[(self.device.type, smoke)]
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.budget_s = budget_s
        self.rows: List[Dict[str, object]] = []
        self.notes: List[str] = []
        self.path = os.path.join(out_dir, f"targets_{name}.json")
        os.makedirs(out_dir, exist_ok=True)
        if self.gpu:
            torch.backends.cudnn.benchmark = True  # the dense cuDNN baseline at its best
        self.meta = {
            "target": name, "command": " ".join(["python -m dynkernels.bench.targets"] + argv),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "smoke": smoke,
            "environment": environment(self.device), "timing": vars(self.settings), "host_calls": HOST_CALLS[smoke],
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "budget_s": budget_s, "finished": False,
        }
        self.save()

    # ------------------------------------------------------------------------- budget and progress
    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{self.name} {time.monotonic() - self.start:6.1f}s] {text}", flush=True)

    # ------------------------------------------------------------------------- timers
    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> Dict[str, object]:
        t = measure(lambda: fn(), [()], self.device, self.settings)
        return {"median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "runs": t.runs, "timer": t.timer}

    def host_ms(self, fn: Callable[[], object]) -> float:
        """CPU wall time per call over a burst of calls (no device sync between them)."""
        calls = HOST_CALLS[self.smoke]
        self.sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        dt = (time.perf_counter() - t0) * 1e3 / calls
        self.sync()
        return dt

    def graph_ms(self, fn: Callable[[], object]) -> float:
        """Median time of replaying one CUDA-graph capture of fn (GPU work only). Raises if
        the call cannot be captured (e.g. it reads a device value on the host)."""
        if not self.gpu:
            raise Unavailable("CUDA graphs need a GPU")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        self.sync()
        t = measure(graph.replay, [()], self.device, self.settings)
        del graph
        return t.median_ms

    # ------------------------------------------------------------------------- rows
    def add(self, **row) -> Dict[str, object]:
        row.setdefault("status", "ok")
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        self.meta["elapsed_s"] = round(time.monotonic() - self.start, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": self.meta, "notes": self.notes, "rows": self.rows}, f, indent=0)
        os.replace(tmp, self.path)

    def finish(self) -> None:
        self.meta["finished"] = True
        self.save()
        self.say(f"done: {len(self.rows)} rows in {self.path}")


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


def load(out_dir: str, name: str) -> Optional[dict]:
    path = os.path.join(out_dir, f"targets_{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def header(data: dict) -> List[str]:
    m = data["meta"]
    env = m["environment"]
    kind = "GPU" if env["device"] == "cuda" else "CPU (smoke run: tiny shapes, the numbers mean nothing)" if m["smoke"] else "CPU"
    lines = [
        f"- Device: {env['device_name']} ({kind}); torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, "
        f"dynkernels {env['dynkernels']} (CUDA kernels compiled: {env['cuda_kernels']})",
        f"- Command: `{m['command']}`; started {m['date']}; {m.get('elapsed_s', '?')} s of a {m['budget_s']:.0f} s budget"
        + ("" if m.get("finished") else " - **did not finish** (stopped by its time limit or an error: see the log)"),
        f"- Timing: {', '.join(f'{k}={v}' for k, v in m['timing'].items())}; host ms/call over bursts of {m['host_calls']} calls;"
        f" cuDNN benchmark mode {m['cudnn_benchmark']}",
    ]
    return lines + [f"- {n}" for n in data.get("notes", [])]


def run_guarded(target: Target, label: str, fn: Callable[[], None]) -> bool:
    """Run one measurement group; an exception becomes an error row, and the step goes on.
    Returns False when the budget is spent (the caller stops)."""
    if target.left_s() <= 0:
        target.add(config=label, variant="all", status="skipped", reason=f"time budget of {target.budget_s:.0f} s used up")
        target.say(f"skipped {label}: time budget used up")
        return False
    try:
        fn()
    except Exception as e:  # recorded; a CUDA error that poisons the process shows in the next rows too
        target.add(config=label, variant="all", status="error", reason=error_text(e))
        target.say(f"error in {label}: {error_text(e)}")
        if target.gpu:
            try:
                torch.cuda.synchronize()
            except Exception:
                print("CUDA context is broken; stopping this step", file=sys.stderr, flush=True)
                return False
    return True
