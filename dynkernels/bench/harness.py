"""Running benchmark cases: build each variant, check its output, time it, make result rows.

A Case is one point of a suite (an op, module or model at one shape, dtype, layout and
density). Its setup (run only when the case runs, so that listing a suite allocates nothing)
returns the input sets and the Variants to compare: the baseline (dense, masked or a copy)
and the candidates (our backends, modules, models). A case may run only some of its setup's
variants (`Case.variants`; a variant the chosen ones are checked against then runs once,
untimed, for the check) and may set speed targets on them (`Case.targets`), which the report
turns into verdicts. A variant that cannot run here (a backend missing from the build, a
module not written yet, the wrong device) raises Unavailable or NotImplementedError while it
is built or first called, and becomes a row with status "skipped" and the reason; nothing is
invented for it. A variant whose output disagrees with the one it is checked against is
still timed but gets status "mismatch" and is left out of plots, summaries and verdicts.
How to add a case: see the docstring of dynkernels.bench.
"""
import contextlib
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import accounting, results, timing
from .progress import Progress


class Unavailable(Exception):
    """This variant cannot run in this build or on this device (recorded as skipped)."""


@dataclass
class Variant:
    name: str
    build: Callable[[], Callable]  # -> fn(*inputs) returning the output; may raise Unavailable
    backend: str = "pytorch"  # "pytorch" for baselines, else the dynkernels backend that runs
    work: str = "sparse"  # which cost it executes: "dense" (every FLOP) or "sparse" (only the active work)
    compare_to: Optional[str] = None  # name of the variant whose output this one must match
    shared_key: Optional[tuple] = None  # timing independent of density: timed once per key on a GPU
    executed_flops: Optional[float] = None  # FLOPs it executes, where neither the dense nor the sparse count fits
    executed_bytes: Optional[float] = None  # bytes it moves, likewise
    capturable: bool = False  # reads nothing from the device on the host: a CUDA graph can replay it


@dataclass
class Setup:
    input_sets: List[tuple]
    variants: List[Variant]
    dense_flops: Optional[float] = None
    sparse_flops: Optional[float] = None
    dense_bytes: Optional[float] = None
    sparse_bytes: Optional[float] = None
    rtol: Optional[float] = None  # output check tolerance; default per dtype (RTOL)
    density: Optional[float] = None  # the density the setup found (a model's own gates), replacing the case's


@dataclass(frozen=True)
class Target:
    label: str  # what it measures, e.g. "GatedConv2d out 0.5 over nn.Conv2d"
    speedup: float = 1.0  # the least speedup over the case's baseline that meets it
    of_ideal: bool = False  # speedup is a fraction of the case's ideal speedup
    # instead of a speedup: at most this many microseconds above the baseline (host overhead)
    overhead_us: Optional[float] = None


@dataclass
class Case:
    family: str
    op: str
    config: str  # every coordinate but density: the rows of one table / one plot panel
    shape: str
    batch: int
    dtype: str
    density: float
    setup: Callable[[], Setup]
    layout: str = "contiguous"  # or "channels_last"
    mode: str = ""
    baseline: str = "dense"  # the variant speedups are measured against
    threads: Optional[int] = None  # torch CPU threads for this case (None: the run's)
    variants: Optional[Sequence[str]] = None  # the setup's variants to run (None: all)
    targets: Dict[str, Target] = field(default_factory=dict)  # variant name -> its speed target
    graph: bool = False  # on a GPU also time the CUDA-graph replay of the capturable variants
    host_time: bool = False  # also time the CPU side of one call (bursts of HOST_CALLS calls)
    grad: bool = False  # run with autograd (training steps); otherwise under torch.inference_mode
    no_grad: bool = False  # (without grad) under torch.no_grad() instead of torch.inference_mode()
    calls_per_run: int = 1  # calls of the module or op in one timed run (a burst); overhead_us is per call


# Output checks are a sanity net for the benchmark (the tests are the real check): relative
# max error against the compared variant, loose enough for reduction-order differences.
RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2, "float64": 1e-9}
HOST_CALLS = 20  # calls in one burst where a call of microseconds is timed (host_time, host-overhead cases)


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


def _reason(e: BaseException, where: bool = False) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")[:300]
    frames = traceback.extract_tb(e.__traceback__) if where else None
    return text + (f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else "")


def _load_average() -> Optional[float]:
    """The 1-minute load average of the machine (CPU figures on a shared machine need it)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


@contextlib.contextmanager
def _threads(n: Optional[int]):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Runner:
    def __init__(self, device: torch.device, settings: timing.TimingSettings, env: Dict[str, object], run_id: str,
                 suite: str, rates: Optional[accounting.Rates] = None):
        """On a GPU, variants with a shared_key are timed once per key (saves GPU time); on a
        noisy shared CPU, timing the baseline again next to each case's candidates is fairer."""
        self.device = torch.device(device)
        self.settings = settings
        self.env = env
        self.run_id = run_id
        self.suite = suite
        self.rates = rates
        self.gpu = self.device.type == "cuda"
        self._shared: Dict[tuple, Dict[str, object]] = {}  # shared_key -> timing fields

    def _row(self, case: Case, **kw) -> Dict[str, object]:
        row = dict.fromkeys(results.FIELDS)  # every field present, filled in as the variant runs
        row.update(self.env)
        row.update(
            run_id=self.run_id, suite=self.suite, family=case.family, op=case.op, config=case.config,
            shape=case.shape, batch=case.batch, dtype=case.dtype, layout=case.layout, mode=case.mode,
            density=case.density, baseline=case.baseline, threads=torch.get_num_threads(), load=_load_average(),
        )
        row.update(kw)
        return row

    def run(self, family: str, cases: Sequence[Case], budget_s: float,
            on_case: Callable[[List[Dict[str, object]]], None] = lambda rows: None) -> List[Dict[str, object]]:
        """Run the cases in order; past the time budget the rest are recorded as skipped.
        on_case(rows so far) is called after every case (to save them as the run goes)."""
        deadline = time.monotonic() + budget_s
        progress = Progress(len(cases), f"{self.suite}/{family}")
        rows: List[Dict[str, object]] = []
        for case in cases:
            if time.monotonic() > deadline:
                rows.append(self._row(case, variant="all", backend="", status="skipped",
                                      reason=f"time budget of {budget_s:.0f} s for {family} used up"))
            else:
                rows += self.run_case(case)
                on_case(rows)
            progress.advance(f"{case.op} {case.shape} d={case.density:g}")
        return rows

    def run_case(self, case: Case) -> List[Dict[str, object]]:
        autograd = torch.no_grad() if case.no_grad and not case.grad else torch.inference_mode(not case.grad)
        with _threads(case.threads), autograd:
            try:
                st = case.setup()
                timed = self._selected(case, st)
            except Unavailable as e:
                return [self._row(case, variant="all", backend="", status="skipped", reason=str(e))]
            except Exception as e:  # a broken setup must not end the run: record it
                return [self._row(case, variant="all", backend="", status="error", reason=_reason(e, where=True))]
            return self._run_variants(case, st, timed)

    @staticmethod
    def _selected(case: Case, st: Setup) -> List[Variant]:
        """The variants the case runs, in its order (an unknown name is an error of the case)."""
        by_name = {v.name: v for v in st.variants}
        names = list(case.variants) if case.variants is not None else list(by_name)
        unknown = [n for n in names + list(case.targets) if n not in by_name]
        if unknown:
            raise ValueError(f"case {case.config!r} names variants its setup does not have: {unknown}")
        return [by_name[n] for n in names]

    def _run_variants(self, case: Case, st: Setup, timed: List[Variant]) -> List[Dict[str, object]]:
        rtol = st.rtol if st.rtol is not None else RTOL.get(case.dtype, 1e-4)
        by_name = {v.name: v for v in st.variants}
        checked_against = {v.compare_to for v in timed if v.compare_to}
        timed_names = {v.name for v in timed}
        check_only = [by_name[n] for n in sorted(checked_against - timed_names) if n in by_name]
        outputs: Dict[str, object] = {}
        fields, fns = {}, {}
        # Variants others are checked against run first; rows keep the case's order.
        for v in check_only + sorted(timed, key=lambda v: v.name not in checked_against):
            fields[v.name], fns[v.name] = self._prepare(v, st, outputs, checked_against, rtol)
        outputs.clear()
        self._time(case, st, [v for v in timed if fns[v.name] is not None], fields, fns)
        try:
            rates = self.rates.get(getattr(torch, case.dtype)) if self.rates else None
        except Exception:  # no floor for this case (e.g. a dtype the device's conv lacks)
            rates = None
        rows = []
        for v in timed:
            executed_flops = v.executed_flops or (st.dense_flops if v.work == "dense" else st.sparse_flops)
            executed_bytes = v.executed_bytes or (st.dense_bytes if v.work == "dense" else st.sparse_bytes)
            row = self._row(case, variant=v.name, backend=v.backend, dense_flops=st.dense_flops,
                            sparse_flops=st.sparse_flops, executed_flops=executed_flops, executed_bytes=executed_bytes)
            if st.density is not None:
                row["density"] = st.density
            row.update(fields[v.name])
            rows.append(row)
        self._derive(case, st, rows, rates)
        return rows

    def _prepare(self, v: Variant, st: Setup, outputs, checked_against, rtol):
        """Build the variant and call it once (availability, compilation, output check).
        Returns its row fields so far and the callable to time (None if it cannot run)."""
        try:
            fn = v.build()
            start = time.perf_counter()
            out = fn(*st.input_sets[0])
            if self.gpu:
                torch.cuda.synchronize(self.device)
            first_call_ms = (time.perf_counter() - start) * 1e3
        except (Unavailable, NotImplementedError) as e:
            return {"status": "skipped", "reason": _reason(e) if isinstance(e, NotImplementedError) else str(e)}, None
        except Exception as e:
            if self.gpu:
                torch.cuda.empty_cache()
            return {"status": "error", "reason": _reason(e, where=True)}, None
        result: Dict[str, object] = {"status": "ok", "reason": None, "first_call_ms": first_call_ms}
        if v.name in checked_against:
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

    def _time(self, case: Case, st: Setup, variants: List[Variant], fields, fns) -> None:
        """Time the variants that ran (on a GPU, reusing shared timings) into their fields."""
        todo = []
        for v in variants:
            if self.gpu and v.shared_key is not None and v.shared_key in self._shared:
                fields[v.name].update(self._shared[v.shared_key])
                fields[v.name]["reason"] = fields[v.name]["reason"] or "timed once for every density of this configuration"
            else:
                todo.append(v)
        timings = timing.measure([fns[v.name] for v in todo], st.input_sets, self.device, self.settings)
        for v, t in zip(todo, timings):
            f = fields[v.name]
            if isinstance(t, Exception):
                f.update(status="error", reason="while timing: " + _reason(t))
                continue
            f.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs, timer=t.timer)
            try:
                if case.graph and v.capturable and self.gpu:
                    f["graph_ms"] = timing.graph_replay(fns[v.name], st.input_sets[0], self.device, self.settings).median_ms
                if case.host_time:
                    f["host_ms"] = timing.host_ms(fns[v.name], st.input_sets[0], self.device, HOST_CALLS)
            except Exception as e:
                f["reason"] = "; ".join(filter(None, [f["reason"], "graph or host timing failed: " + _reason(e)]))
            if v.shared_key is not None:
                self._shared[v.shared_key] = {k: f.get(k) for k in
                                              ("median_ms", "p20_ms", "p80_ms", "runs", "timer", "graph_ms", "host_ms")}

    @staticmethod
    def _derive(case: Case, st: Setup, rows: List[Dict[str, object]], rates) -> None:
        base = next((r for r in rows if r["variant"] == case.baseline and r["status"] == "ok"), None)
        dense_cost, sparse_cost = (
            (st.dense_flops, st.sparse_flops) if st.dense_flops else (st.dense_bytes, st.sparse_bytes)
        )
        for r in rows:
            r["baseline_ms"] = base["median_ms"] if base else None
            r.update(accounting.derived(r.get("median_ms"), r["baseline_ms"], dense_cost, sparse_cost,
                                        r["executed_flops"], r["executed_bytes"], rates))
            if base and base.get("graph_ms") and r.get("graph_ms"):
                r["graph_speedup"] = base["graph_ms"] / r["graph_ms"]
            if base and r.get("median_ms") is not None and any(t.overhead_us is not None for t in case.targets.values()):
                r["overhead_us"] = (r["median_ms"] - base["median_ms"]) * 1e3 / case.calls_per_run
            target = case.targets.get(r["variant"])
            if target is not None:
                if target.overhead_us is not None:  # as a speedup: baseline / (baseline + overhead)
                    allowed_ms = target.overhead_us * 1e-3 * case.calls_per_run
                    need = base["median_ms"] / (base["median_ms"] + allowed_ms) if base else float("nan")
                else:
                    need = target.speedup * ((r["ideal_speedup"] or float("nan")) if target.of_ideal else 1.0)
                r.update(target=target.label, target_speedup=need)
                if r["status"] == "ok" and r["speedup"] is not None:
                    r["target_met"] = r["speedup"] >= need
