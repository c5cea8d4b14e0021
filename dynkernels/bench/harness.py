"""Running benchmark cases: build each variant, check its output, time it, make result rows.

A Case is one point of a sweep (an op or model at one shape, dtype and density). Its setup
(run only when the case runs, so enumerating a sweep allocates nothing) returns the input
sets and the Variants to compare: the dense baseline, masked and naive PyTorch, and our
backends. A variant that cannot run here (a backend missing from the build, a module not
written yet, the wrong device) raises Unavailable or NotImplementedError while it is built
or first called, and becomes a row with status "skipped" and the reason; nothing is
invented for it. A variant whose output disagrees with the one it is checked against is
still timed but gets status "mismatch" and is left out of plots and summaries.
"""
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import accounting, results
from .progress import Progress
from .timing import TimingSettings, measure_interleaved


class Unavailable(Exception):
    """This variant cannot run in this build or on this device (recorded as skipped)."""


@dataclass
class Variant:
    name: str
    build: Callable[[], Callable]  # -> fn(*inputs) returning the output; may raise Unavailable
    backend: str = "pytorch"  # "pytorch" for baselines, else the dynkernels backend that runs
    work: str = "sparse"  # which cost it executes: "dense" (every FLOP) or "sparse" (only the active work)
    compare_to: Optional[str] = None  # name of the variant whose output this one must match
    shared_key: Optional[tuple] = None  # timing independent of density: timed once per key
    executed_bytes: Optional[float] = None  # bytes it moves, where neither the dense nor the sparse count fits


@dataclass
class Setup:
    input_sets: List[tuple]
    variants: List[Variant]
    dense_flops: Optional[float] = None
    sparse_flops: Optional[float] = None
    dense_bytes: Optional[float] = None
    sparse_bytes: Optional[float] = None
    rtol: Optional[float] = None  # output check tolerance; default per dtype (RTOL)


@dataclass
class Case:
    family: str
    op: str
    config: str  # every sweep coordinate but density: the rows of one table / one plot panel
    shape: str
    batch: int
    dtype: str
    density: float
    setup: Callable[[], Setup]
    memory_format: str = "contiguous"
    mode: str = ""
    baseline: str = "dense"  # the variant speedups are measured against


# Output checks are a sanity net for the benchmark (the tests are the real check): relative
# max error against the compared variant, loose enough for reduction-order differences.
RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2, "float64": 1e-9}


def max_rel_err(actual, expected) -> float:
    """max |a - e| / max |e| over tensors (tuples compared element-wise; integer tensors exactly)."""
    if isinstance(expected, (tuple, list)):
        return max((max_rel_err(a, e) for a, e in zip(actual, expected)), default=0.0)
    if actual.shape != expected.shape:
        return float("inf")
    if not expected.dtype.is_floating_point:
        return 0.0 if torch.equal(actual, expected) else float("inf")
    if expected.numel() == 0:
        return 0.0
    a, e = actual.float(), expected.float()
    scale = max(e.abs().max().item(), 1e-6)
    return (a - e).abs().max().item() / scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""


def _reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text[:300]


class Runner:
    def __init__(self, device: torch.device, settings: TimingSettings, env: Dict[str, object], run_id: str,
                 reuse_timings: bool = True, rounds: int = 1):
        """reuse_timings: time variants with a shared_key once per key (saves GPU time). On a noisy
        shared CPU, timing the baseline again next to each case's other variants is fairer.
        rounds: on the CPU, time a case's variants in this many alternating rounds."""
        self.device = torch.device(device)
        self.reuse_timings = reuse_timings
        self.rounds = rounds
        self.settings = settings
        self.env = env
        self.run_id = run_id
        self._shared: Dict[tuple, object] = {}  # shared_key -> Timing

    def _row(self, case: Case, **kw) -> Dict[str, object]:
        row = dict.fromkeys(results.FIELDS)  # every field present, filled in as the variant runs
        row.update(self.env)
        row.update(
            run_id=self.run_id, family=case.family, op=case.op, config=case.config, shape=case.shape,
            batch=case.batch, dtype=case.dtype, memory_format=case.memory_format, mode=case.mode,
            density=case.density, baseline=case.baseline,
        )
        row.update(kw)
        return row

    def skipped_case(self, case: Case, reason: str) -> List[Dict[str, object]]:
        return [self._row(case, variant="all", backend="", status="skipped", reason=reason)]

    def run_case(self, case: Case) -> List[Dict[str, object]]:
        try:
            st = case.setup()
        except Unavailable as e:
            return [self._row(case, variant="all", backend="", status="skipped", reason=str(e))]
        except Exception as e:  # a broken setup must not end the run: record it
            return [self._row(case, variant="all", backend="", status="error", reason=_reason(e) + _where(e))]
        referenced = {v.compare_to for v in st.variants if v.compare_to}
        rtol = st.rtol if st.rtol is not None else RTOL.get(case.dtype, 1e-4)
        outputs: Dict[str, object] = {}
        rows = []
        # Variants others are checked against run first; rows keep the listed order.
        order = sorted(range(len(st.variants)), key=lambda i: st.variants[i].name not in referenced)
        results, fns = {}, {}
        for i in order:
            results[i], fns[i] = self._prepare(st.variants[i], st, outputs, referenced, rtol)
        outputs.clear()
        self._time(st, results, fns)
        for i, v in enumerate(st.variants):
            row = self._row(
                case, variant=v.name, backend=v.backend, dense_flops=st.dense_flops, sparse_flops=st.sparse_flops,
                executed_flops=st.dense_flops if v.work == "dense" else st.sparse_flops,
                executed_bytes=v.executed_bytes or (st.dense_bytes if v.work == "dense" else st.sparse_bytes),
            )
            row.update(results[i])
            rows.append(row)
        self._derive(case, st, rows)
        return rows

    def _prepare(self, v: Variant, st: Setup, outputs, referenced, rtol):
        """Build the variant and call it once (availability, compilation, output check).
        Returns its row fields so far and the callable to time (None if it cannot run)."""
        try:
            fn = v.build()
            out = fn(*st.input_sets[0])
            _sync(self.device)
        except (Unavailable, NotImplementedError) as e:
            return {"status": "skipped", "reason": _reason(e) if isinstance(e, NotImplementedError) else str(e)}, None
        except Exception as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return {"status": "error", "reason": _reason(e) + _where(e)}, None
        result: Dict[str, object] = {"status": "ok", "reason": None}
        if v.name in referenced:
            outputs[v.name] = out
        if v.compare_to:
            if v.compare_to not in outputs:
                result["reason"] = f"output not checked ({v.compare_to} did not run)"
            else:
                err = max_rel_err(out, outputs[v.compare_to])
                result["max_rel_err"] = err
                if not err <= rtol:
                    result.update(status="mismatch", reason=f"output differs from {v.compare_to}: max rel err {err:.3g} > {rtol:g}")
        return result, fn

    def _time(self, st: Setup, results, fns) -> None:
        """Time every variant that ran (reusing shared timings where allowed) into its result."""
        todo = []
        for i, fn in fns.items():
            v = st.variants[i]
            if fn is None:
                continue
            if self.reuse_timings and v.shared_key is not None and v.shared_key in self._shared:
                results[i]["reason"] = results[i]["reason"] or "timed once for every density of this configuration"
                self._set_timing(results[i], self._shared[v.shared_key])
            else:
                todo.append(i)
        timings = measure_interleaved([fns[i] for i in todo], st.input_sets, self.device, self.settings, self.rounds)
        for i, t in zip(todo, timings):
            if isinstance(t, Exception):
                results[i].update(status="error", reason="while timing: " + _reason(t))
                continue
            self._set_timing(results[i], t)
            if st.variants[i].shared_key is not None:
                self._shared[st.variants[i].shared_key] = t

    @staticmethod
    def _set_timing(result, t) -> None:
        result.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs, timer=t.timer)

    @staticmethod
    def _derive(case: Case, st: Setup, rows: List[Dict[str, object]]) -> None:
        base = next((r for r in rows if r["variant"] == case.baseline and r["status"] == "ok"), None)
        base_ms = base["median_ms"] if base else None
        dense_cost, sparse_cost = (
            (st.dense_flops, st.sparse_flops) if st.dense_flops else (st.dense_bytes, st.sparse_bytes)
        )
        for r in rows:
            r["baseline_ms"] = base_ms
            r.update(accounting.derived(r.get("median_ms"), base_ms, dense_cost, sparse_cost, r["executed_flops"], r["executed_bytes"]))

    def run(self, family: str, cases: Sequence[Case], budget_s: float, label: str = "") -> List[Dict[str, object]]:
        """Run the cases in order; past the time budget the rest are recorded as skipped."""
        deadline = time.monotonic() + budget_s
        progress = Progress(len(cases), label or family)
        rows: List[Dict[str, object]] = []
        with torch.inference_mode():
            for case in cases:
                if time.monotonic() > deadline:
                    rows += self.skipped_case(case, f"time budget of {budget_s:.0f} s for {family} used up")
                else:
                    rows += self.run_case(case)
                progress.advance(f"{case.op} {case.shape} d={case.density:g}")
        return rows
