"""The benchmark harness (dynkernels.bench) on tiny cases: timing, FLOP/byte arithmetic,
result rows and files, skips, the report and plots, the CLI, and the families' code paths
(GatedConv2d and BlockDrop models stand in as small fakes where noted). The issue-target
measurements (dynkernels.bench.targets, bench/gpu_suite.sh's targets phase) run in their
CPU smoke mode: the GPU steps' Python on tiny CPU tensors."""
import csv
import json
import sys
import time
import types

import pytest
import torch
import torch.nn as nn

import dynkernels
import dynkernels.nn
from dynkernels.bench import accounting, report, results
from dynkernels.bench.__main__ import main
from dynkernels.bench.families import FAMILIES, models, skip_blocks
from dynkernels.bench.families._common import RunConfig, active_count, exact_gate, sample_gate
from dynkernels.bench.harness import Case, Runner, Setup, Unavailable, Variant, max_rel_err
from dynkernels.bench.timing import TimingSettings, measure, quantile

CPU = torch.device("cpu")
FAST = TimingSettings(warmup_ms=1, rep_ms=5, min_runs=3, max_runs=20)


def runner():
    return Runner(CPU, FAST, results.environment(CPU), "test-run")


# ----------------------------------------------------------------------------- timing
def test_quantile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert quantile(values, 0.5) == 3.0
    assert quantile(values, 0.2) == pytest.approx(1.8)
    assert quantile(values, 0.8) == pytest.approx(4.2)
    assert quantile([7.0], 0.2) == 7.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_measure_gives_a_sane_median_and_rotates_inputs():
    seen = []

    def fn(i):
        seen.append(i)
        time.sleep(0.002)

    t = measure(fn, [(0,), (1,), (2,)], CPU, TimingSettings(warmup_ms=1, rep_ms=20, min_runs=5, max_runs=50))
    assert 1.9 <= t.median_ms < 20
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    assert 5 <= t.runs <= 50
    assert t.timer == "cpu perf_counter"
    assert set(seen) == {0, 1, 2} and seen[:3] == [0, 1, 2]


def test_do_bench_path_works_with_old_and_new_triton(monkeypatch):
    """The GPU timer through triton.testing.do_bench: with return_mode="all" (a list or a
    tensor of times), and on a Triton that only knows quantiles."""
    triton_testing = pytest.importorskip("triton.testing", reason="Triton is not installed (optional on the CPU)")

    from dynkernels.bench import timing

    def new_triton(fn, warmup, rep, return_mode):
        fn()
        return torch.tensor([3.0, 1.0, 2.0, 4.0, 5.0])

    def old_triton(fn, warmup, rep, quantiles=None, return_mode="mean"):
        assert return_mode in ["min", "max", "mean", "median"]
        fn()
        return [2.5, 1.5, 3.5]

    calls = []
    monkeypatch.setattr(triton_testing, "do_bench", new_triton)
    t = timing._do_bench(lambda: calls.append(1), FAST)
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.runs) == pytest.approx((3.0, 1.8, 4.2, 5)) and isinstance(t.median_ms, float)
    monkeypatch.setattr(triton_testing, "do_bench", old_triton)
    t = timing._do_bench(lambda: calls.append(1), FAST)
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.runs) == (2.5, 1.5, 3.5, -1)
    assert t.timer.startswith("cuda-events") and calls


def test_interleaved_rounds_time_every_callable_and_keep_failures_apart():
    from dynkernels.bench.timing import measure_interleaved

    order = []

    def fast(i):
        order.append("fast")

    def slow(i):
        order.append("slow")
        time.sleep(0.001)

    flaky_calls = []

    def flaky(i):
        flaky_calls.append(i)
        if len(flaky_calls) > 2:
            raise RuntimeError("kernel failed")

    settings = TimingSettings(warmup_ms=0, rep_ms=6, min_runs=6, max_runs=30)
    fast_t, slow_t, err = measure_interleaved([fast, slow, flaky], [(0,), (1,)], CPU, settings, rounds=3)
    assert isinstance(err, RuntimeError)
    assert slow_t.median_ms > fast_t.median_ms and fast_t.runs >= 6 and "3 interleaved rounds" in fast_t.timer
    # the rounds alternate: slow runs between fast ones, not all after them
    first_slow, last_fast = order.index("slow"), len(order) - 1 - order[::-1].index("fast")
    assert first_slow < last_fast


def test_measure_needs_inputs():
    with pytest.raises(ValueError, match="input_sets"):
        measure(lambda: None, [], CPU, FAST)


# ----------------------------------------------------------------------------- accounting
def test_derived_speedup_ideal_efficiency_throughput():
    d = accounting.derived(median_ms=2.0, baseline_ms=4.0, dense_cost=100.0, sparse_cost=10.0,
                           executed_flops=4e9, executed_bytes=2e6)
    assert d["speedup"] == pytest.approx(2.0)
    assert d["ideal_speedup"] == pytest.approx(10.0)
    assert d["efficiency"] == pytest.approx(0.2)
    assert d["tflops"] == pytest.approx(4e9 / 2e-3 / 1e12)
    assert d["gbps"] == pytest.approx(2e6 / 2e-3 / 1e9)
    none = accounting.derived(None, 4.0, None, 10.0, None, None)
    assert all(v is None for v in none.values())


def test_conv_flop_counts():
    out_gate = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.2]])  # 2 and 1 active of 4
    in_gate = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # 2 and 1 active of 3
    k, hw = (3, 3), (5, 5)
    assert accounting.channel_sparse_conv_flops(out_gate, None, 3, k, hw) == 2 * (2 + 1) * 3 * 9 * 25
    assert accounting.channel_sparse_conv_flops(out_gate, in_gate, 3, k, hw) == 2 * (2 * 2 + 1 * 1) * 9 * 25
    assert accounting.conv2d_flops(2 * 4, 3, k, hw) == 2 * 8 * 3 * 9 * 25
    assert accounting.conv2d_out_size(56, 3, 2, 1) == 28
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    assert accounting.module_flops_per_sample(conv, torch.randn(2, 3, 8, 8)) == 2 * 4 * 64 * 3 * 9 + 2 * 10 * 256


def test_gates_have_the_exact_density():
    g = exact_gate(5, 40, 0.25, "cpu")
    assert ((g > 0).sum(1) == 10).all() and (g[g > 0] >= 0.1).all()
    assert int(sample_gate(64, 0.05, "cpu").sum()) == active_count(64, 0.05) == 3
    assert active_count(4, 0.1) == 1 and active_count(4, 1.0) == 4


def test_max_rel_err():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert max_rel_err(a, a) == 0.0
    assert max_rel_err(a + torch.tensor([0, 0, 0.4]), a) == pytest.approx(0.1)
    assert max_rel_err((a, torch.tensor([1, 2])), (a, torch.tensor([1, 3]))) == float("inf")
    assert max_rel_err(a[:2], a) == float("inf")


# ----------------------------------------------------------------------------- harness
def _toy_case(variants, density=0.5, **kw):
    def setup():
        sets = [(torch.randn(16),) for _ in range(2)]
        return Setup(sets, variants, dense_flops=1000.0, sparse_flops=250.0)

    return Case("toy", "toy_op", "toy config", "16", 16, "float32", density, setup, **kw)


def _raise(exc):
    def build():
        raise exc

    return build


def test_runner_rows_statuses_and_arithmetic():
    def not_implemented():
        def fn(x):
            raise NotImplementedError("backend 'cpu' is not implemented yet")

        return fn

    variants = [
        Variant("dense", lambda: lambda x: x * 2, work="dense"),
        Variant("reference", lambda: lambda x: x * 3),
        Variant("ours", lambda: lambda x: x * 3, compare_to="reference"),
        Variant("wrong", lambda: lambda x: x * 4, compare_to="reference"),
        Variant("missing", _raise(Unavailable("module X is not in this build"))),
        Variant("unimplemented", not_implemented),
        Variant("broken", _raise(ZeroDivisionError("boom"))),
    ]
    rows = runner().run_case(_toy_case(variants))
    by = {r["variant"]: r for r in rows}
    assert [r["variant"] for r in rows] == [v.name for v in variants]
    assert by["dense"]["status"] == "ok" and by["dense"]["speedup"] == pytest.approx(1.0)
    assert by["ours"]["status"] == "ok" and by["ours"]["max_rel_err"] == 0.0
    assert by["wrong"]["status"] == "mismatch" and "reference" in by["wrong"]["reason"]
    assert by["missing"]["status"] == "skipped" and by["missing"]["reason"] == "module X is not in this build"
    assert by["missing"]["median_ms"] is None and by["missing"]["speedup"] is None
    assert by["unimplemented"]["status"] == "skipped" and "not implemented" in by["unimplemented"]["reason"]
    assert by["broken"]["status"] == "error" and "ZeroDivisionError: boom" in by["broken"]["reason"]
    for r in rows:
        assert r["ideal_speedup"] == pytest.approx(4.0)
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["density"] == 0.5
    ours = by["ours"]
    assert ours["executed_flops"] == 250.0 and by["dense"]["executed_flops"] == 1000.0
    assert ours["speedup"] == pytest.approx(ours["baseline_ms"] / ours["median_ms"])
    assert ours["efficiency"] == pytest.approx(ours["speedup"] / 4.0)
    assert ours["tflops"] == pytest.approx(250.0 / (ours["median_ms"] * 1e-3) / 1e12)


def test_shared_timing_is_reused_across_densities():
    calls = []

    def build():
        calls.append(1)
        return lambda x: x + 1

    r = runner()
    rows = []
    for d in (0.25, 0.5):
        rows += r.run_case(_toy_case([Variant("dense", build, work="dense", shared_key=("toy", "dense"))], density=d))
    assert rows[0]["median_ms"] == rows[1]["median_ms"]
    assert "timed once" in rows[1]["reason"]
    fresh = Runner(CPU, FAST, results.environment(CPU), "test-run", reuse_timings=False)
    again = [fresh.run_case(_toy_case([Variant("dense", build, work="dense", shared_key=("toy", "dense"))], density=d))[0]
             for d in (0.25, 0.5)]
    assert all(r["status"] == "ok" and r["reason"] is None for r in again)


def test_setup_failures_and_budget_are_recorded():
    r = runner()

    def unavailable():
        raise Unavailable("dynkernels.models.fbs is not available in this build")

    case = Case("toy", "toy_op", "cfg", "1", 1, "float32", 1.0, unavailable)
    (row,) = r.run_case(case)
    assert row["status"] == "skipped" and row["variant"] == "all" and "fbs" in row["reason"]
    rows = r.run("toy", [_toy_case([Variant("dense", lambda: lambda x: x, work="dense")])], budget_s=-1)
    assert rows[0]["status"] == "skipped" and "time budget" in rows[0]["reason"]


# ----------------------------------------------------------------------------- files and report
def _rows():
    variants = [
        Variant("dense", lambda: lambda x: x * 2, work="dense"),
        Variant("ours", lambda: lambda x: x * 2),
        Variant("missing", _raise(Unavailable("not in this build"))),
    ]
    r = runner()
    return [row for d in (0.25, 0.5, 1.0) for row in r.run_case(_toy_case(variants, density=d))]


def _meta():
    return {"run_id": "test-run", "command": "pytest", "sweep": "quick", "families": ["toy"], "elapsed_s": 0.1,
            "environment": results.environment(CPU), "timing": vars(FAST), "input_sets": 2,
            "cudnn_benchmark": False, "cudnn_allow_tf32": True, "matmul_allow_tf32": False}


def test_csv_and_json_have_every_field(tmp_path):
    rows = _rows()
    results.write(str(tmp_path), rows, _meta())
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == results.FIELDS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert {r["status"] for r in csv_rows} == {"ok", "skipped"}
    data = json.load(open(tmp_path / "results.json"))
    assert data["fields"] == results.FIELDS and data["meta"]["run_id"] == "test-run"
    assert all(len(values) == len(results.FIELDS) for values in data["rows"])
    loaded = results.load_rows(str(tmp_path))
    assert loaded == [results.complete(r) for r in rows]
    skipped = [r for r in loaded if r["variant"] == "missing"]
    assert skipped and all(r["status"] == "skipped" and r["reason"] == "not in this build" for r in skipped)
    with pytest.raises(KeyError, match="not_a_field"):
        results.complete(dict(rows[0], not_a_field=1))


def test_merge_replaces_only_rerun_families():
    old = [{"family": "a", "x": 1}, {"family": "b", "x": 2}]
    assert results.merge(old, [{"family": "b", "x": 3}]) == [{"family": "a", "x": 1}, {"family": "b", "x": 3}]


def test_report_and_plot_are_written(tmp_path):
    path = report.write_report(str(tmp_path), _rows(), _meta())
    text = open(path).read()
    assert "| density | ideal | dense | ours | missing |" in text
    assert "not in this build" in text and "CPU" in text
    png = tmp_path / "plot_toy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![toy](plot_toy.png)" in text


def test_cli_quick_sample_gating(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--only", "sample_gating", "--out", str(out), "--budget-scale", "0.5", "--input-sets", "2"]) == 0
    printed = capsys.readouterr().out
    assert "quick sweep on cpu" in printed and "backends here" in printed and str(out / "report.md") in printed
    for name in ("report.md", "results.csv", "results.json", "plot_sample_gating.png"):
        assert (out / name).exists(), name
    rows = results.load_rows(str(out))
    ok = {(r["op"], r["variant"]) for r in rows if r["status"] == "ok"}
    assert {("gather_rows", "cpu"), ("gather_rows", "copy"), ("scatter_add_rows", "reference"), ("compact", "cpu")} <= ok
    assert all(r["status"] != "mismatch" for r in rows)
    triton = [r for r in rows if r["variant"] == "triton"]
    assert triton and all(r["status"] == "skipped" for r in triton)


def test_every_family_has_quick_and_full_sweeps():
    for full in (False, True):
        cfg = RunConfig(CPU, full, FAST, 1)
        for name, family in FAMILIES.items():
            cases = family.cases(cfg)
            assert cases and all(c.family == name for c in cases)
            assert {c.density for c in cases} <= {0.05, 0.1, 0.125, 0.25, 0.5, 0.75, 1.0}
            if full:
                assert min(c.density for c in cases) == 0.05 and max(c.density for c in cases) == 1.0


# ----------------------------------------------------------------------------- families with stand-ins
class FakeSkipBlock(nn.Module):
    """Stand-in with SkipBlock's interface: x + gate * block(x), sparse through our ops."""

    def __init__(self, block, shortcut=None, scaled=False, execution="sparse", backend="auto"):
        super().__init__()
        self.block, self.execution, self.backend = block, execution, backend

    def forward(self, x, gate, plan=None):
        if self.execution == "masked":
            return x + gate.view(-1, 1, 1, 1) * self.block(x)
        idx, count = dynkernels.compact(gate, backend=self.backend)
        y = self.block(dynkernels.gather_rows(x, idx, count, backend=self.backend))
        return dynkernels.scatter_add_rows(x, y, idx, count, backend=self.backend)


class FakeGatedConv2d(nn.Conv2d):
    def forward(self, x, gate, in_gate=None):
        return dynkernels.channel_sparse_conv2d(x, self.weight, self.bias, gate, in_gate, self.stride, self.padding,
                                                backend="torch")


class FakeBlockDrop(nn.Module):
    def __init__(self, num_classes=10, execution="sparse", backend="auto"):
        super().__init__()
        self.num_blocks, self.execution = 3, execution
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList(FakeSkipBlock(nn.Conv2d(4, 4, 3, padding=1), backend=backend) for _ in range(3))
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x, policy=None):
        x = self.stem(x)
        for b, block in enumerate(self.blocks):
            gate = torch.ones(x.shape[0], dtype=x.dtype) if policy is None else policy[:, b]
            block.execution = self.execution
            x = block(x, gate)
        return self.fc(x.mean((2, 3)))

    def flops(self, policy):
        return 100.0 + 50.0 * policy.sum(1)


def test_skip_blocks_family_runs_skipblock_with_and_without_a_plan():
    cfg = RunConfig(CPU, False, FAST, 2)
    case = skip_blocks.cases(cfg)[1]  # R110 stage 1 block, N=16, density 0.25
    rows = {r["variant"]: r for r in runner().run_case(case)}
    for v in ("dense", "masked", "naive", "SkipBlock-masked", "SkipBlock-torch", "SkipBlock-cpu", "SkipBlock-auto",
              "SkipBlock-cpu+plan"):
        assert rows[v]["status"] == "ok", (v, rows[v]["reason"])
    for v in ("SkipBlock-cpu", "SkipBlock-cpu+plan", "naive"):
        assert rows[v]["max_rel_err"] < 1e-4, v
    assert rows["SkipBlock-triton"]["status"] == "skipped"
    assert not any(v.endswith("+plan") and v != "SkipBlock-cpu+plan" for v in rows)  # GPU backends: GPU runs only
    assert rows["dense"]["ideal_speedup"] == pytest.approx(4.0)
    block = skip_blocks.basic_block(4).eval()  # a whole residual block: relu(x + F(x))
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(block(x), torch.relu(x + block.branch(x)))


def test_conv_family_runs_with_a_gated_conv(monkeypatch):
    from dynkernels.bench.families import channel_sparse_conv

    monkeypatch.setattr(dynkernels.nn, "GatedConv2d", FakeGatedConv2d, raising=False)
    cases = channel_sparse_conv.cases(RunConfig(CPU, False, FAST, 2))
    case = next(c for c in cases if c.mode == "in+out" and c.density == 0.25)
    rows = {r["variant"]: r for r in runner().run_case(case)}
    for v in ("dense", "masked", "naive", "reference", "GatedConv2d"):
        assert rows[v]["status"] == "ok", (v, rows[v]["reason"])
    assert rows["naive"]["max_rel_err"] < 1e-4
    assert rows["dense"]["ideal_speedup"] == pytest.approx(16.0)


def test_models_family_runs_and_records_missing_models(monkeypatch):
    import dynkernels.models  # noqa: F401  (the real package first: its __init__ imports blockdrop)

    built = []

    def resnet110_cifar(**kw):
        built.append(kw)
        return FakeBlockDrop(**kw)

    fake = types.ModuleType("dynkernels.models.blockdrop")
    fake.resnet110_cifar = fake.resnet101_imagenet = resnet110_cifar
    monkeypatch.setitem(sys.modules, "dynkernels.models.blockdrop", fake)
    cases = models.cases(RunConfig(CPU, False, FAST, 2))
    r = runner()
    for case in cases[:2]:  # resnet110_cifar at two densities
        rows = {r_["variant"]: r_ for r_ in r.run_case(case)}
        for v in ("dense", "masked", "sparse-torch", "sparse-cpu", "sparse-auto"):
            assert rows[v]["status"] == "ok", (v, rows[v]["reason"])
        assert rows["sparse-cpu"]["max_rel_err"] < 1e-3
        assert rows["dense"]["ideal_speedup"] > 1.0
    assert len(built) == 4  # masked base + sparse torch/cpu/auto, built once for both densities
    fbs = next(c for c in cases if c.op == "fbs_resnet18")
    monkeypatch.setitem(sys.modules, "dynkernels.models.fbs", None)  # a build without the module
    (row,) = r.run_case(fbs)
    assert row["status"] == "skipped" and "dynkernels.models.fbs is not available" in row["reason"], row["reason"]


# ----------------------------------------------------------------------------- issue targets (smoke mode)
def test_bounded_residual_init_keeps_resnet110_finite_in_fp16():
    from dynkernels.bench.families._common import bounded_residual_init
    from dynkernels.models.blockdrop import resnet110_cifar

    torch.manual_seed(0)
    m = resnet110_cifar(execution="masked").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        grown = m.features(x).abs().max()
        bounded_residual_init(m, torch.Generator().manual_seed(0))
        bounded = m.features(x).abs().max()
    last = [branch.bn2.weight for stage in m.blocks for branch in stage]
    assert all(((w >= 0.1) & (w < 0.3)).all() for w in last)
    assert grown > 1e5  # the release's init: far past what fp16 can hold after a few more layers
    assert bounded < 1e3  # fp16 keeps it


def test_targets_smoke_runs_every_step_and_the_summary(tmp_path):
    """The GPU target steps (conv, skip_block, blockdrop) on tiny CPU tensors: the CUDA rows run
    the C++ CPU kernels through the same calls, the Triton rows the interpreter (conftest)."""
    from dynkernels.bench.targets.__main__ import main as targets_main
    from dynkernels.bench.targets.common import load

    threads = torch.get_num_threads()
    try:
        assert targets_main(["all", "--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    triton = dynkernels.build_info()["triton"] is not None
    for step, variants in {
        "conv": {"dense", "cuda out 0.5", "triton out 0.5", "cuda in+out 0.5", "triton in+out 0.5", "auto 1.0"},
        "skip_block": {"dense", "masked", "SkipBlock (cuda)", "SkipBlock+plan (cuda)", "SkipBlock (triton)",
                       "SkipBlock+plan (triton)"},
        "blockdrop": {"dense ResNet-101", "masked", "sparse (cuda)", "sparse (triton)", "BlockDrop: policy net + sparse (cuda)"},
    }.items():
        data = load(str(tmp_path), step)
        assert data["meta"]["finished"] and data["meta"]["smoke"]
        rows = data["rows"]
        assert {r["variant"] for r in rows} == variants, step
        for r in rows:
            if not triton and "triton" in r["variant"]:
                assert r["status"] == "skipped"
                continue
            assert r["status"] == "ok", (step, r["variant"], r.get("reason"))
            assert r["median_ms"] > 0 and r["timer"] == "cpu perf_counter"
            if r.get("max_rel_err") is not None:
                assert r["max_rel_err"] < 1e-3, (step, r["variant"])
    conv = load(str(tmp_path), "conv")["rows"]
    assert {r["backend"] for r in conv if r["variant"].startswith("cuda")} == {"cpu"}  # "cuda" -> C++ kernels on the CPU
    bd = load(str(tmp_path), "blockdrop")
    sparse = next(r for r in bd["rows"] if r["variant"] == "sparse (cuda)")
    # FlopCounterMode ideal: below 33/25 (the stem, shortcuts and fc always run), well above 1
    assert 1.2 < sparse["ideal"] < 33 / 25
    assert "FlopCounterMode" in bd["notes"][0]
    text = (tmp_path / "targets.md").read_text()
    for title in ("## Headline", "## Issue 3: channel_sparse_conv2d", "## Issue 4: one ResNet-101 bottleneck",
                  "## Issue 4: BlockDrop ResNet-101"):
        assert title in text
    assert "smoke run" in text and "did not finish" not in text and "**wrong output**" not in text


def test_targets_summary_reports_missing_and_unfinished_steps(tmp_path):
    from dynkernels.bench.targets.__main__ import write_summary
    from dynkernels.bench.targets.common import Target, run_guarded

    t = Target("conv", CPU, True, str(tmp_path), budget_s=0, argv=["conv"])
    assert run_guarded(t, "some shape", lambda: None) is False  # budget spent: recorded, the step stops
    t2 = Target("skip_block", CPU, True, str(tmp_path), budget_s=60, argv=["skip_block"])
    assert run_guarded(t2, "broken", lambda: 1 / 0) is True  # an error is a row; the step goes on
    t2.finish()
    text = open(write_summary(str(tmp_path))).read()
    assert "did not finish" in text  # conv never called finish()
    assert "time budget of 0 s used up" in text and "ZeroDivisionError" in text
    assert "## blockdrop: no results" in text


def test_gpu_suite_targets_phase_on_the_cpu(tmp_path):
    """bench/gpu_suite.sh's targets phase, as it will run on a GPU, with the device swapped for
    the CPU smoke run (TARGETS_DEVICE / TARGETS_ARGS): the loop, time limits and summary."""
    import os
    import shutil
    import subprocess

    if not (shutil.which("bash") and shutil.which("timeout")):
        pytest.skip("needs bash and timeout")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TARGETS_DEVICE="cpu", TARGETS_ARGS="--smoke", PYTHON=sys.executable, TRITON_INTERPRET="0")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(repo, "bench", "gpu_suite.sh"), str(out), "targets"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["suite.log", "targets.md", "targets_blockdrop.json", "targets_conv.json",
                                       "targets_skip_block.json"]
    log = (out / "suite.log").read_text()
    assert "timeout --kill-after=10 170" in log and "done (status 0)" in log
    assert "Issue 4, BlockDrop ResNet-101 end to end" in proc.stdout  # the headline is printed at the end
