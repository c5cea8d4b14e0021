"""The benchmark harness (dynkernels.bench) on tiny cases: the timer, FLOP/byte arithmetic and
the physical floor, result rows and files, skips, targets, the report and plots, the CPU
description, and smoke runs of both suites (every case's code on tiny CPU tensors; the
headline suite through bench/gpu_suite.sh's headline phase, as it runs on a GPU)."""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dynkernels
from dynkernels import _cpu
from dynkernels.bench import accounting, report, results, timing
from dynkernels.bench.__main__ import main
from dynkernels.bench.families import FAMILIES, SUITES, cases, skip_blocks
from dynkernels.bench.families._common import RunConfig, active_count, exact_gate, sample_gate
from dynkernels.bench.harness import Case, Runner, Setup, Target, Unavailable, Variant, max_rel_err
from dynkernels.bench.timing import TimingSettings, measure, quantile

CPU = torch.device("cpu")
FAST = TimingSettings(warmup_ms=1, rep_ms=5, min_runs=3, max_runs=20, rounds=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATES = {"matrix_tflops": 2.0, "matmul_tflops": 1.0, "conv_tflops": 2.0, "copy_gbps": 100.0}


def runner(suite="sweep"):
    return Runner(CPU, FAST, results.environment(CPU, "pytest"), "test-run", suite)


# ----------------------------------------------------------------------------- the CPU description
def test_isa_from_flags_names_the_vector_extensions():
    zen4 = "fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni".split()
    sapphire_rapids = zen4 + ["avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    assert _cpu.isa_from_flags(zen4) == ["AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16"]
    assert _cpu.isa_from_flags(sapphire_rapids) == ["AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16", "AVX-512 FP16",
                                                    "AVX-VNNI", "AMX BF16", "AMX INT8"]
    assert _cpu.isa_from_flags("fpu sse2 avx avx2 fma".split()) == ["AVX2"]
    assert _cpu.isa_from_flags("fp asimd asimdhp sve".split()) == ["NEON", "SVE"]
    assert _cpu.isa_from_flags([]) == []


def test_cpu_info_reads_this_machine_and_build_info_and_headers_report_it():
    info = _cpu.cpu_info()
    assert info["model"] and info["logical_cpus"] == os.cpu_count()
    model, flags = _cpu._proc_cpuinfo()
    if flags:  # Linux: the same flags lscpu shows
        assert info["isa"] == _cpu.isa_from_flags(flags) and info["model"] == (model or info["model"])
        assert ("AVX-512" in info["isa"]) == ("avx512f" in flags)
    described = _cpu.describe_cpu()
    assert info["model"] in described and all(name in described for name in info["isa"])
    build = dynkernels.build_info()
    assert build["cpu"] == info["model"] and build["cpu_isa"] == info["isa"]
    env = results.environment(CPU, "cmd")
    assert env["cpu"] == info["model"] and env["cpu_isa"] == " / ".join(info["isa"]) and env["command"] == "cmd"


def test_amd_core_generation():
    """Family 23 splits at model 0x30 (Zen 2 from there); Zen 3 and Zen 4 share family 25: only
    Zen 4 has AVX-512; unknown families name none."""
    assert _cpu.amd_core(25, 17, ["avx2", "avx512f"]) == "Zen 4" and _cpu.amd_core(25, 1, ["avx2"]) == "Zen 3"
    assert _cpu.amd_core(26, 2, []) == "Zen 5" and _cpu.amd_core(99, 0, []) == ""
    assert _cpu.amd_core(23, 49, ["avx2"]) == "Zen 2" and _cpu.amd_core(23, 1, ["avx2"]) == "Zen / Zen+"


def test_model_name_carries_family_and_model(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    assert _cpu._proc_cpuinfo() == ("AMD EPYC (Zen 5, family 26 model 2)", ["fpu", "avx2", "avx512f"])
    cpuinfo.write_text("cpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx2\n")
    assert _cpu._proc_cpuinfo() == ("Intel(R) Xeon(R) Processor (family 6 model 143)", ["avx2"])


def test_cpu_info_falls_back_to_torchs_capability_without_proc_cpuinfo(monkeypatch):
    monkeypatch.setattr(_cpu, "_proc_cpuinfo", lambda: ("", []))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    _cpu.cpu_info.cache_clear()
    try:
        info = _cpu.cpu_info()
        assert info["isa"] == ["AVX2", "AVX-512"] and info["model"]
    finally:
        _cpu.cpu_info.cache_clear()


# ----------------------------------------------------------------------------- the timer
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

    (t,) = measure([fn], [(0,), (1,), (2,)], CPU, TimingSettings(warmup_ms=1, rep_ms=20, min_runs=5, max_runs=50))
    assert 1.9 <= t.median_ms < 20
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    assert 5 <= t.runs <= 50
    assert t.timer == "cpu perf_counter (1 interleaved rounds)"
    assert set(seen) == {0, 1, 2} and seen[:3] == [0, 1, 2]
    with pytest.raises(ValueError, match="input_sets"):
        measure([fn], [], CPU, FAST)


def test_cpu_timing_interleaves_rounds_and_keeps_failures_apart():
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

    settings = TimingSettings(warmup_ms=0, rep_ms=6, min_runs=6, max_runs=30, rounds=3)
    fast_t, slow_t, err = measure([fast, slow, flaky], [(0,), (1,)], CPU, settings)
    assert isinstance(err, RuntimeError)
    assert slow_t.median_ms > fast_t.median_ms and fast_t.runs >= 6 and "3 interleaved rounds" in fast_t.timer
    # the rounds alternate: slow runs between fast ones, not all after them
    first_slow, last_fast = order.index("slow"), len(order) - 1 - order[::-1].index("fast")
    assert first_slow < last_fast


def test_host_time_is_the_wall_time_per_call():
    assert timing.host_ms(lambda: time.sleep(0.002), (), CPU, 3) >= 1.9


def test_gpu_timer_asks_do_bench_for_at_least_min_runs(monkeypatch):
    """The GPU timer's own logic, with do_bench and the device sync stood in for: do_bench gets a
    window long enough for min_runs runs of a slow call, and its times become the quantiles."""
    triton_testing = pytest.importorskip("triton.testing", reason="Triton is not installed (optional on the CPU)")
    asked = {}

    def fake_do_bench(fn, warmup, rep, return_mode):
        asked.update(warmup=warmup, rep=rep, return_mode=return_mode)
        fn()
        return [3.0, 1.0, 2.0, 4.0, 5.0]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    settings = TimingSettings(warmup_ms=2, rep_ms=5, min_runs=10, max_runs=20)
    t = timing._gpu(lambda: time.sleep(0.004), settings)
    assert asked["return_mode"] == "all" and asked["warmup"] == 2 and asked["rep"] >= 40  # 10 runs of >= 4 ms
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.runs) == pytest.approx((3.0, 1.8, 4.2, 5))
    assert t.timer == "cuda-events (triton.testing.do_bench)"
    timing._gpu(lambda: None, settings)
    assert asked["rep"] == 5  # a quick call: the settings' window


@pytest.mark.cuda
def test_gpu_timer_graph_replay_and_host_time():
    dev = torch.device("cuda")
    a = torch.randn(512, 512, device=dev)
    settings = TimingSettings(warmup_ms=2, rep_ms=10, min_runs=5, max_runs=200)
    (t,) = measure([torch.mm], [(a, a)], dev, settings)
    assert t.median_ms > 0 and t.runs >= 5 and t.timer.startswith("cuda-events")
    g = timing.graph_replay(torch.mm, (a, a), dev, settings)
    assert 0 < g.median_ms and "CUDA-graph replay" in g.timer
    assert timing.host_ms(torch.mm, (a, a), dev, 5) > 0
    with pytest.raises(RuntimeError):  # a call that reads the device on the host cannot be captured
        timing.graph_replay(lambda x: x.sum().item(), (a,), dev, settings)


# ----------------------------------------------------------------------------- accounting and the floor
def test_derived_speedup_ideal_efficiency_throughput_and_floor():
    d = accounting.derived(median_ms=2.0, baseline_ms=4.0, dense_cost=100.0, sparse_cost=10.0,
                           executed_flops=4e9, executed_bytes=2e6, rates=RATES)
    assert d["speedup"] == pytest.approx(2.0)
    assert d["ideal_speedup"] == pytest.approx(10.0)
    assert d["efficiency"] == pytest.approx(0.2)
    assert d["tflops"] == pytest.approx(4e9 / 2e-3 / 1e12)
    assert d["gbps"] == pytest.approx(2e6 / 2e-3 / 1e9)
    # 4 GFLOP at 2 TFLOP/s = 2 ms; 2 MB at 100 GB/s = 0.02 ms: the FLOPs bound it
    assert d["floor_ms"] == pytest.approx(2.0)
    memory_bound = accounting.derived(1.0, 1.0, None, None, 1e6, 1e9, RATES)  # 1 GB at 100 GB/s
    assert memory_bound["floor_ms"] == pytest.approx(10.0)
    none = accounting.derived(None, 4.0, None, 10.0, None, None, None)
    assert all(v is None for v in none.values())


def test_rates_are_measured_once_per_dtype_and_thread_count():
    rates = accounting.Rates(CPU, TimingSettings(warmup_ms=0, rep_ms=0, min_runs=1, max_runs=1), smoke=True)
    r = rates.get(torch.float32)
    assert r["matrix_tflops"] == max(r["matmul_tflops"], r["conv_tflops"]) > 0 and r["copy_gbps"] > 0
    assert rates.get(torch.float32) is r and list(rates.measured) == [f"float32, {torch.get_num_threads()} thread"
                                                                     + "s" * (torch.get_num_threads() > 1)]


def test_flop_counts():
    out_gate = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.2]])  # 2 and 1 active of 4
    in_gate = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # 2 and 1 active of 3
    k, hw = (3, 3), (5, 5)
    assert accounting.channel_sparse_conv_flops(out_gate, None, 3, k, hw) == 2 * (2 + 1) * 3 * 9 * 25
    assert accounting.channel_sparse_conv_flops(out_gate, in_gate, 3, k, hw) == 2 * (2 * 2 + 1 * 1) * 9 * 25
    assert accounting.conv2d_flops(2 * 4, 3, k, hw) == 2 * 8 * 3 * 9 * 25
    assert accounting.conv2d_out_size(56, 3, 2, 1) == 28


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


# ----------------------------------------------------------------------------- the runner
def _toy_case(setup_variants, density=0.5, **kw):
    def setup():
        sets = [(torch.randn(16),) for _ in range(2)]
        return Setup(sets, setup_variants, dense_flops=1000.0, sparse_flops=250.0, dense_bytes=40.0, sparse_bytes=16.0)

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
    r = runner()
    r.rates = type("FixedRates", (), {"get": lambda self, dtype: RATES})()
    rows = r.run_case(_toy_case(variants, threads=1))
    by = {r["variant"]: r for r in rows}
    assert [r["variant"] for r in rows] == [v.name for v in variants]
    assert by["dense"]["status"] == "ok" and by["dense"]["speedup"] == pytest.approx(1.0)
    assert by["ours"]["status"] == "ok" and by["ours"]["max_rel_err"] == 0.0
    assert by["wrong"]["status"] == "mismatch" and "reference" in by["wrong"]["reason"]
    assert by["missing"]["status"] == "skipped" and by["missing"]["reason"] == "module X is not in this build"
    assert by["missing"]["median_ms"] is None and by["missing"]["speedup"] is None
    assert by["unimplemented"]["status"] == "skipped" and "not implemented" in by["unimplemented"]["reason"]
    assert by["broken"]["status"] == "error" and "ZeroDivisionError: boom" in by["broken"]["reason"]
    for row in rows:
        assert row["ideal_speedup"] == pytest.approx(4.0) and row["threads"] == 1 and row["suite"] == "sweep"
        assert row["device"] == "cpu" and row["torch"] == torch.__version__ and row["density"] == 0.5
        assert row["cpu"] == _cpu.cpu_info()["model"] and row["command"] == "pytest" and row["load"] >= 0
    ours = by["ours"]
    assert ours["executed_flops"] == 250.0 and by["dense"]["executed_flops"] == 1000.0
    assert ours["speedup"] == pytest.approx(ours["baseline_ms"] / ours["median_ms"])
    assert ours["efficiency"] == pytest.approx(ours["speedup"] / 4.0)
    assert ours["tflops"] == pytest.approx(250.0 / (ours["median_ms"] * 1e-3) / 1e12)
    # floor = max(FLOPs / 2 TFLOP/s, bytes / 100 GB/s), in ms: the bytes bound the sparse work, the FLOPs the dense
    assert ours["floor_ms"] == pytest.approx(16.0 / 1e8) and by["dense"]["floor_ms"] == pytest.approx(1000.0 / 2e9)


def test_case_variants_targets_and_check_only_variants():
    calls = {"reference": 0}

    def reference():
        def fn(x):
            calls["reference"] += 1
            return x * 3

        return fn

    variants = [Variant("dense", lambda: lambda x: x * 2, work="dense"), Variant("reference", reference),
                Variant("ours", lambda: lambda x: x * 3, compare_to="reference"),
                Variant("not run", lambda: lambda x: x)]
    targets = {"ours": Target("ours over dense", 0.0), "dense": Target("a share of the ideal", 0.5, of_ideal=True)}
    rows = runner().run_case(_toy_case(variants, variants=["dense", "ours"], targets=targets))
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["dense", "ours"]  # reference ran once for the check, untimed, without a row
    assert calls["reference"] == 1 and by["ours"]["max_rel_err"] == 0.0 and by["ours"]["status"] == "ok"
    assert by["ours"]["target"] == "ours over dense" and by["ours"]["target_met"] is True
    assert by["dense"]["target_speedup"] == pytest.approx(0.5 * 4.0) and by["dense"]["target_met"] is False
    (bad,) = runner().run_case(_toy_case(variants, variants=["dense", "typo"]))
    assert bad["status"] == "error" and "typo" in bad["reason"]


def test_overhead_target_is_the_microseconds_above_the_baseline():
    variants = [Variant("dense", lambda: lambda x: x * 2, work="dense"),
                Variant("slow", lambda: lambda x: (time.sleep(5e-4), x * 2)[1])]
    for allowed_us, met in ((100.0, False), (1e6, True)):
        targets = {"slow": Target("slow: at most this much above dense", overhead_us=allowed_us)}
        by = {r["variant"]: r for r in runner().run_case(_toy_case(variants, targets=targets))}
        assert by["dense"]["overhead_us"] == 0.0 and by["slow"]["overhead_us"] >= 450
        assert by["slow"]["target_met"] is met
        need = by["dense"]["median_ms"] / (by["dense"]["median_ms"] + allowed_us * 1e-3)  # as a speedup
        assert by["slow"]["target_speedup"] == pytest.approx(need)


def test_no_grad_cases_run_under_no_grad():
    seen = []
    variants = [Variant("dense", lambda: lambda x: seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled())),
                        work="dense")]
    runner().run_case(_toy_case(variants, no_grad=True))
    runner().run_case(_toy_case(variants))
    assert {seen[0], seen[-1]} == {(False, False), (False, True)}


def test_case_threads_are_set_for_the_case_and_restored():
    seen = []
    before = torch.get_num_threads()
    variants = [Variant("dense", lambda: lambda x: seen.append(torch.get_num_threads()), work="dense")]
    runner().run_case(_toy_case(variants, threads=2))
    assert set(seen) == {2} and torch.get_num_threads() == before


def test_shared_timing_is_reused_across_densities_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def dense_case(d):
        return _toy_case([Variant("dense", lambda: lambda x: x + 1, work="dense", shared_key=("toy", "dense"))], density=d)

    r = runner()
    r.gpu = True  # the reuse applies on GPUs only (timings here still come from the CPU timer)
    rows = [r.run_case(dense_case(d))[0] for d in (0.25, 0.5)]
    assert rows[0]["median_ms"] == rows[1]["median_ms"] and "timed once" in rows[1]["reason"]
    cpu = runner()
    again = [cpu.run_case(dense_case(d))[0] for d in (0.25, 0.5)]
    assert all(r["status"] == "ok" and r["reason"] is None for r in again)


def test_setup_failures_and_budget_are_recorded():
    r = runner()

    def unavailable():
        raise Unavailable("dynkernels.models.fbs is not available in this build")

    (row,) = r.run_case(Case("toy", "toy_op", "cfg", "1", 1, "float32", 1.0, unavailable))
    assert row["status"] == "skipped" and row["variant"] == "all" and "fbs" in row["reason"]
    (row,) = r.run_case(Case("toy", "toy_op", "cfg", "1", 1, "float32", 1.0, lambda: 1 / 0))
    assert row["status"] == "error" and "ZeroDivisionError" in row["reason"]
    saved = []
    rows = r.run("toy", [_toy_case([Variant("dense", lambda: lambda x: x, work="dense")])], budget_s=-1, on_case=saved.append)
    assert rows[0]["status"] == "skipped" and "time budget" in rows[0]["reason"] and not saved


# ----------------------------------------------------------------------------- files and report
def _rows(suite="sweep"):
    variants = [
        Variant("dense", lambda: lambda x: x * 2, work="dense"),
        Variant("ours", lambda: lambda x: x * 2),
        Variant("missing", _raise(Unavailable("not in this build"))),
    ]
    r = runner(suite)
    r.rates = type("FixedRates", (), {"get": lambda self, dtype: RATES})()
    targets = {"ours": Target("ours at least as fast as dense", 1e-9)} if suite == "headline" else {}
    return [row for d in (0.25, 0.5, 1.0) for row in r.run_case(_toy_case(variants, density=d, targets=targets))]


def _meta():
    return {"run_id": "test-run", "suite": "sweep", "sweep": "quick", "families": ["toy"], "elapsed_s": 0.1,
            "timing": vars(FAST), "input_sets": 2, "rates": {"float32, 1 thread": RATES}, "logical_cpus": 2,
            "cudnn_benchmark": False, "cudnn_allow_tf32": True,
            "matmul_allow_tf32": False}


def test_csv_and_json_have_every_field_and_old_files_load(tmp_path):
    rows = _rows()
    results.write(str(tmp_path), rows, _meta())
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == results.FIELDS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows) and {r["status"] for r in csv_rows} == {"ok", "skipped"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["fields"] == results.FIELDS and data["meta"]["run_id"] == "test-run"
    meta, loaded = results.load(str(tmp_path))
    assert meta["rates"] == {"float32, 1 thread": RATES} and loaded == [results.complete(r) for r in rows]
    with pytest.raises(KeyError, match="not_a_field"):
        results.complete(dict(rows[0], not_a_field=1))
    # a file of the earlier format: no suite, "memory_format" for the layout, fields since dropped
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"meta": {}, "fields": ["family", "memory_format", "status", "gone"],
                                                  "rows": [["models", "channels_last", "ok", 1]]}))
    _, (row,) = results.load(str(old))
    assert row["suite"] == "sweep" and row["layout"] == "channels_last" and row["family"] == "models" and "gone" not in row


def test_committed_results_still_load_and_render(tmp_path):
    folder = os.path.join(ROOT, "bench", "results", "cpu-quick")
    if not os.path.exists(os.path.join(folder, "results.json")):
        pytest.skip("needs the source tree's bench/results")
    meta, rows = results.load(folder)
    assert len(rows) > 100 and {r["family"] for r in rows} >= {"sample_gating", "channel_sparse_conv"}
    text = Path(report.write_report(str(tmp_path), rows, meta, plots=False)).read_text()
    assert "## Channel-sparse convolution" in text and "AMD EPYC" in text


def test_merge_replaces_only_rerun_suite_families():
    old = [{"suite": "sweep", "family": "a", "x": 1}, {"suite": "sweep", "family": "b", "x": 2},
           {"suite": "headline", "family": "b", "x": 3}]
    new = [{"suite": "sweep", "family": "b", "x": 4}]
    assert results.merge(old, new) == [old[0], old[2], new[0]]


def test_report_and_plot_are_written(tmp_path):
    rows = _rows("headline")
    rows[0]["graph_ms"], rows[0]["host_ms"] = 0.5, 0.25  # as measured on a GPU
    path = report.write_report(str(tmp_path), rows, _meta())
    text = Path(path).read_text()
    assert "| density | ideal | floor (its speedup) | dense | ours | missing |" in text
    assert "not in this build" in text and "CPU:" in text and _cpu.cpu_info()["model"] in text
    assert "| float32, 1 thread | 2.00 | 1.00 | 2.00 | 100 |" in text  # the rates behind the floor
    assert "## Targets" in text and "| ours at least as fast as dense | **met** | 3 of 3 |" in text
    assert "(met: >= " in text and "graph 0.500 ms" in text and "host 0.250 ms" in text
    assert f"load average (1 min) {min(r['load'] for r in rows):g} to {max(r['load'] for r in rows):g}" in text
    png = tmp_path / "plot_toy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![toy](plot_toy.png)" in text


# ----------------------------------------------------------------------------- the suites
def test_every_family_has_sweeps_and_the_headline_covers_its_targets():
    for sweep in ("smoke", "quick", "full"):
        cfg = RunConfig(CPU, sweep, 1)
        for name in FAMILIES:
            sweep_cases = cases(name, "sweep", cfg)
            assert sweep_cases and all(c.family == name for c in sweep_cases)
            if sweep == "full":
                assert min(c.density for c in sweep_cases) == 0.05 and max(c.density for c in sweep_cases) == 1.0
    gpu = [c for name in FAMILIES for c in cases(name, "headline", RunConfig(torch.device("cuda"), "quick", 1))]
    cpu = [c for name in FAMILIES for c in cases(name, "headline", RunConfig(CPU, "quick", 1))]
    assert SUITES == ("sweep", "headline") and gpu and cpu
    # training steps have no target, nor LC-Net at its own gates' sparsity (reported next to its
    # ideal), nor GatedConv2d at out 0.8 (near the crossover of "auto")
    def untargeted(c):
        return c.grad or c.op == "lcnet_resnet50" or (c.op == "channel_sparse_conv2d" and c.density == 0.8)

    assert all(c.targets for c in cpu if not untargeted(c))
    assert all(untargeted(c) for c in cpu if not c.targets)
    conv = [c for c in gpu if c.op == "channel_sparse_conv2d"]
    assert len(conv) == 12 * 2 * 4 and {c.layout for c in conv} == {"channels_last"} and {c.dtype for c in conv} == {"bfloat16"}
    assert {(c.mode, c.density) for c in conv} == {("out", 0.5), ("in+out", 0.5), ("out", 0.1), ("out", 1.0)}
    gated = [c for c in cpu if c.op == "channel_sparse_conv2d"]
    assert {(c.threads, c.layout, c.batch) for c in gated} == {(t, f, 32) for t in (1, 2) for f in ("contiguous", "channels_last")}
    assert {(c.mode, c.density) for c in gated} == {("out", 0.25), ("out", 0.5), ("out", 0.8), ("out", 1.0), ("in+out", 0.5)}
    blocks = [c for c in gpu if c.op == "SkipBlock"]
    assert blocks[0].config.startswith("R101 layer3 bottleneck: 1024ch @14x14, N=128, bfloat16, channels_last")
    assert all(c.graph and c.host_time for c in blocks) and {c.density for c in blocks[:2]} == {0.5, 1.0}
    assert all("SkipBlock-cuda+graphs" in c.variants and "SkipBlock-cuda+plan+graphs" in c.variants for c in blocks)
    r101 = [c for c in gpu if c.op == "resnet101_imagenet"]
    assert {c.batch for c in r101} == {64, 128} and all(next(iter(c.targets.values())).of_ideal for c in r101)
    r110 = [c for c in gpu if c.op == "resnet110_cifar"]
    assert [c.config.rsplit(", ", 1)[1] for c in r110] == ["run 1", "run 2", "run 3"] and all(c.batch == 128 for c in r110)
    assert all("sparse-cuda+graphs" in c.variants and c.targets["sparse-cuda"].speedup == 1.6 for c in r110)
    assert {c.op for c in cpu} == {"channel_sparse_conv2d", "GatedConv2d training step", "SkipSequential", "resnet110_cifar",
                                   "spottune_resnet26", "msdnet_cifar", "fbs_resnet18", "lcnet_resnet50", "skipnet_resnet110",
                                   "SkipBlock host overhead"}
    fbs = [c for c in cpu if c.op == "fbs_resnet18"]
    assert {(c.batch, c.shape, c.density, c.threads) for c in fbs} == {(64, "64x3x32x32", 0.5, t) for t in (1, 2)}
    assert all(c.variants == ["dense", "masked", "sparse-auto"] and c.targets["sparse-auto"].speedup == 1.5 for c in fbs)
    skipnet = [c for c in cpu if c.op == "skipnet_resnet110"]
    assert {(c.batch, c.density, c.threads, c.layout) for c in skipnet} == {(64, 0.5, t, f) for t in (1, 2)
                                                                             for f in ("contiguous", "channels_last")}
    assert all(c.targets["sparse-auto"].speedup == 1.6 for c in skipnet)
    host = [c for c in cpu if c.op == "SkipBlock host overhead"]
    assert {(c.mode, c.no_grad) for c in host} == {("no_grad", True), ("inference_mode", False)}
    assert all(c.targets["SkipBlock-cpu+plan"].overhead_us == 10.0 and c.baseline == "block" for c in host)
    routed = [c for c in cpu if c.op in ("spottune_resnet26", "msdnet_cifar")]
    assert {(c.op, c.batch, c.threads, c.layout) for c in routed} == {
        (op, 64, t, f) for t in (1, 2) for op, f in (("spottune_resnet26", "contiguous"), ("msdnet_cifar", "contiguous"),
                                                      ("msdnet_cifar", "channels_last"))}
    r110_cpu = [c for c in cpu if c.op == "resnet110_cifar"]
    assert {(c.threads, c.layout) for c in r110_cpu} == {(t, f) for t in (1, 2) for f in ("contiguous", "channels_last")}


def test_skip_blocks_family_runs_skipblock_with_and_without_a_plan():
    cfg = RunConfig(CPU, "quick", 2)
    case = skip_blocks.sweep(cfg)[1]  # R110 stage 1 block, N=16, density 0.25
    rows = {r["variant"]: r for r in runner().run_case(case)}
    for v in ("dense", "masked", "naive", "SkipBlock-masked", "SkipBlock-torch", "SkipBlock-cpu", "SkipBlock-auto",
              "SkipBlock-cpu+plan"):
        assert rows[v]["status"] == "ok", (v, rows[v]["reason"])
    for v in ("SkipBlock-cpu", "SkipBlock-cpu+plan", "naive"):
        assert rows[v]["max_rel_err"] < 1e-4, v
    assert rows["SkipBlock-triton"]["status"] == "skipped" and "GPUs only" in rows["SkipBlock-triton"]["reason"]
    assert rows["dense"]["ideal_speedup"] == pytest.approx(4.0)
    block = skip_blocks.basic_block(4).eval()  # a whole residual block: relu(x + F(x))
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(block(x), torch.relu(x + block.branch(x)))


def test_sweep_smoke_runs_every_family(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton rows skipped (timed on GPUs only): quicker
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        # (--malloc default: the setting would stay in this process; its own test runs it in a child)
        assert main(["--smoke", "--out", str(out), "--input-sets", "2", "--malloc", "default"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "sweep suite (smoke) on cpu" in printed and "backends here" in printed and str(out / "report.md") in printed
    for name in ["report.md", "results.csv", "results.json"] + [f"plot_{f}.png" for f in FAMILIES]:
        assert (out / name).exists(), name
    _, rows = results.load(str(out))
    assert {r["family"] for r in rows} == set(FAMILIES) and {r["suite"] for r in rows} == {"sweep"}
    assert not [r for r in rows if r["status"] in ("error", "mismatch")]
    ok = {(r["op"], r["variant"]) for r in rows if r["status"] == "ok"}
    assert {("gather_rows", "cpu"), ("compact", "cpu"), ("channel_sparse_conv2d", "GatedConv2d"),
            ("SkipBlock", "SkipBlock-cpu+plan"), ("resnet110_cifar", "sparse-cpu")} <= ok
    assert all(r["floor_ms"] > 0 for r in rows if r["status"] == "ok" and r["executed_flops"])
    assert "**Smoke run**" in (out / "report.md").read_text()
    assert "- Memory: the C library's defaults" in (out / "report.md").read_text()


def test_gpu_suite_headline_phase_on_the_cpu(tmp_path):
    """bench/gpu_suite.sh's headline phase, as it runs on a GPU, with the device swapped for a
    CPU smoke run (HEADLINE_DEVICE / HEADLINE_ARGS): every headline family in its own process
    under its time limit, then the report; the GPU cases' "cuda" variants run the C++ CPU
    kernels through the same calls, the Triton ones the interpreter."""
    if not (shutil.which("bash") and shutil.which("timeout")):
        pytest.skip("needs bash and timeout")
    # TRITON_INTERPRET=0: Triton rows are then skipped (timed on GPUs only), which keeps this quick
    env = dict(os.environ, HEADLINE_DEVICE="cpu", HEADLINE_ARGS="--smoke", PYTHON=sys.executable, TRITON_INTERPRET="0")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), str(out), "headline"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["plot_channel_sparse_conv.png", "plot_models.png", "plot_skip_blocks.png",
                                       "report.md", "results.csv", "results.json", "suite.log"]
    log = (out / "suite.log").read_text()
    assert "timeout --kill-after=10 170" in log and "done (status 0)" in log
    assert "target verdicts" in proc.stdout and "GatedConv2d out 0.5 over nn.Conv2d" in proc.stdout
    _, rows = results.load(str(out))
    assert {r["suite"] for r in rows} == {"headline"}
    assert {r["family"] for r in rows} == {"channel_sparse_conv", "skip_blocks", "models"}
    bad = [(r["variant"], r["status"], r["reason"]) for r in rows if r["status"] != "ok"]
    assert bad and all(s == "skipped" and (("triton" in v and "GPUs only" in why) or ("graphs" in v and "need a GPU" in why))
                       for v, s, why in bad), bad
    by = {(r["op"], r["variant"]) for r in rows if r["status"] == "ok"}
    assert {("channel_sparse_conv2d", "cuda"), ("channel_sparse_conv2d", "auto"), ("channel_sparse_conv2d", "GatedConv2d"),
            ("SkipBlock", "SkipBlock-cuda+plan"), ("SkipSequential", "SkipSequential-auto"),
            ("resnet101_imagenet", "agent-cuda"), ("resnet110_cifar", "sparse-auto"), ("spottune_resnet26", "sparse-auto"),
            ("msdnet_cifar", "sparse-auto")} <= by
    r101 = next(r for r in rows if r["op"] == "resnet101_imagenet" and r["variant"] == "sparse-cuda")
    assert 1.0 < r101["ideal_speedup"] < 33 / 25 and r101["target_met"] is not None  # stem, shortcuts, fc always run
    assert all(r["host_ms"] > 0 for r in rows if r["op"] == "SkipBlock" and r["status"] == "ok")
    text = (out / "report.md").read_text()
    assert "## Targets" in text and "**wrong output**" not in text and "**Smoke run**" in text


@pytest.mark.cuda
def test_headline_smoke_on_the_gpu(tmp_path):
    """The headline suite's GPU cases on tiny GPU tensors: do_bench timings, CUDA-graph replay of
    the capturable variants (a SkipBlock given its plan), host times, and the output checks."""
    out = tmp_path / "out"
    assert main(["--suite", "headline", "--smoke", "--device", "cuda", "--out", str(out), "--no-plots"]) == 0
    _, rows = results.load(str(out))
    assert rows and not [(r["variant"], r["reason"]) for r in rows if r["status"] in ("error", "mismatch")]
    assert all(r["timer"].startswith("cuda-events") for r in rows if r["status"] == "ok")
    plan = [r for r in rows if r["variant"] == "SkipBlock-cuda+plan" and r["status"] == "ok"]
    assert plan and all(r["graph_ms"] > 0 and r["graph_speedup"] and r["host_ms"] > 0 for r in plan)
    assert all(r["graph_ms"] is None for r in rows if r["variant"] == "SkipBlock-cuda")  # it syncs: not captured
    graphed = [r for r in rows if r["variant"].endswith("+graphs") and r["status"] == "ok"]
    assert {r["variant"] for r in graphed} >= {"SkipBlock-cuda+plan+graphs", "SkipBlock-cuda+graphs", "sparse-cuda+graphs"}
    assert all(r["graph_ms"] is None and r["first_call_ms"] > 0 for r in graphed)  # replays graphs: not captured again

