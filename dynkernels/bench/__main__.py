"""Command line: python -m dynkernels.bench [--suite sweep|headline] [--quick | --full | --smoke]
[--device auto|cpu|cuda] [--out DIR] [--only FAMILY] [--report-only] (see --help)."""
import argparse
import datetime as _dt
import os
import sys
import time
from typing import List, Optional

import torch

from . import accounting, report, results
from .families import FAMILIES, SUITES, cases
from .families._common import RunConfig
from .harness import Runner
from .malloc import MALLOC_DEFAULTS, keep_freed_memory
from .timing import TimingSettings

# Timing per measurement and time budget per family (seconds), by (timing key, device type).
# The budgets keep the default quick sweep on a small CPU near 3 minutes, `--full` on an H100
# near 6 and each headline step within its limit in bench/gpu_suite.sh; cases past a family's
# budget are recorded as skipped, with the reason.
TIMING = {
    ("quick", "cpu"): TimingSettings(warmup_ms=20, rep_ms=150, min_runs=7, max_runs=300, rounds=3),
    ("full", "cpu"): TimingSettings(warmup_ms=50, rep_ms=300, min_runs=10, max_runs=1000, rounds=3),
    ("headline", "cpu"): TimingSettings(warmup_ms=100, rep_ms=800, min_runs=10, max_runs=1000, rounds=10),
    ("smoke", "cpu"): TimingSettings(warmup_ms=0, rep_ms=0, min_runs=2, max_runs=2, rounds=2),
    ("quick", "cuda"): TimingSettings(warmup_ms=5, rep_ms=20, min_runs=10, max_runs=1000),
    ("full", "cuda"): TimingSettings(warmup_ms=5, rep_ms=25, min_runs=10, max_runs=1000),
    ("headline", "cuda"): TimingSettings(warmup_ms=10, rep_ms=50, min_runs=10, max_runs=1000),
    ("smoke", "cuda"): TimingSettings(warmup_ms=1, rep_ms=5, min_runs=3, max_runs=20),
}
BUDGET_S = {
    ("quick", "cpu"): {"sample_gating": 30, "channel_sparse_conv": 50, "skip_blocks": 40, "models": 60},
    ("full", "cpu"): {"sample_gating": 300, "channel_sparse_conv": 900, "skip_blocks": 600, "models": 900},
    ("headline", "cpu"): {"channel_sparse_conv": 150, "skip_blocks": 60, "models": 600},
    ("quick", "cuda"): {"sample_gating": 20, "channel_sparse_conv": 40, "skip_blocks": 30, "models": 40},
    ("full", "cuda"): {"sample_gating": 45, "channel_sparse_conv": 160, "skip_blocks": 60, "models": 75},
    ("headline", "cuda"): {"channel_sparse_conv": 150, "skip_blocks": 55, "models": 110},  # as in bench/gpu_suite.sh
}
SMOKE_BUDGET_S = 60
SAVE_EVERY_S = 10  # results.json is rewritten at most this often during a run (a killed run keeps its rows)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dynkernels.bench",
        description="Benchmarks of dynkernels against dense, masked and naive PyTorch: the density sweeps (default) "
                    "or the headline figures with their speed targets (--suite headline).",
    )
    p.add_argument("--suite", choices=SUITES, default="sweep",
                   help="sweep: speedup versus density for every op, module and model (default); headline: the "
                        "configurations of the speed targets, with verdicts")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="sweep", action="store_const", const="quick",
                      help="small sweeps (default; about 3 minutes on a small CPU)")
    size.add_argument("--full", dest="sweep", action="store_const", const="full",
                      help="the full sweep (the GPU report; about 6 minutes on an H100)")
    size.add_argument("--smoke", dest="sweep", action="store_const", const="smoke",
                      help="tiny tensors and a few runs, either suite: checks that every case runs (seconds)")
    p.set_defaults(sweep="quick")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when a GPU is present (default)")
    p.add_argument("--out", help="output folder (default bench/out/<date>-<device>[-headline][-smoke])")
    p.add_argument("--only", action="append", choices=sorted(FAMILIES), metavar="FAMILY",
                   help=f"run only this family (repeatable): {', '.join(FAMILIES)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every family's time budget (default 1)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget of each family, in seconds (default: per family)")
    p.add_argument("--input-sets", type=int, default=3, help="input sets each timed call rotates through (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads where a case sets none (default 1 on the CPU: a shared machine's scheduler "
                        "makes multi-threaded timings jump in 4 ms steps; 0 keeps torch's default)")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="CPU runs: keep (default): glibc's malloc keeps freed memory, so that no timed call pays page "
                        "faults for memory an earlier one freed (as a caching allocator would); default: the C "
                        "library's own settings")
    p.add_argument("--no-plots", action="store_true", help="write the report without plots")
    p.add_argument("--report-only", action="store_true", help="only rewrite report.md (and plots) from OUT/results.json")
    return p.parse_args(argv)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("dynkernels.bench: --device cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def backend_summary(device: torch.device) -> str:
    """Which dynkernels backends can run on this device, and why the others cannot."""
    from dynkernels.ops._backend import resolve

    parts = []
    for b in ("torch", "cpu", "triton", "cuda"):
        try:
            resolve("gather_rows", b, device)
            parts.append(f"{b}: yes" + (" (interpreter; timed on GPUs only)" if b == "triton" and device.type == "cpu" else ""))
        except (ValueError, RuntimeError) as e:
            parts.append(f"{b}: no ({str(e).split(': ', 1)[-1][:100]})")
    parts.append(f"auto -> {resolve('gather_rows', 'auto', device)} (sample gating ops)")
    return "; ".join(parts)


def write_report(out: str, plots: bool) -> str:
    meta, rows = results.load(out)
    if not rows:
        sys.exit(f"dynkernels.bench: no results in {out}")
    path = report.write_report(out, rows, meta, plots=plots)
    verdicts = report.verdicts(rows)
    if verdicts:
        print("\n".join(["dynkernels.bench: target verdicts:", ""] + verdicts[2:]), flush=True)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report_only:
        if not args.out:
            sys.exit("dynkernels.bench: --report-only needs --out")
        print(f"dynkernels.bench: report: {write_report(args.out, not args.no_plots)}", flush=True)
        return 0
    device = pick_device(args.device)
    key = "smoke" if args.sweep == "smoke" else args.sweep if args.suite == "sweep" else "headline"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the dense cuDNN baseline at its best
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    malloc = MALLOC_DEFAULTS
    if device.type == "cpu" and args.malloc == "keep":
        malloc = keep_freed_memory()[1]
    folder = [_dt.date.today().isoformat(), device.type] + ["headline"] * (args.suite == "headline") + ["smoke"] * (key == "smoke")
    out = args.out or os.path.join("bench", "out", "-".join(folder))
    env = results.environment(device, " ".join(["python -m dynkernels.bench"] + argv))
    cfg = RunConfig(device=device, sweep=args.sweep, input_sets=max(1, args.input_sets))
    families = [f for f in (dict.fromkeys(args.only) if args.only else FAMILIES) if cases(f, args.suite, cfg)]
    print(f"dynkernels.bench: {args.suite} suite ({args.sweep}) on {device.type} ({env['device_name']}; CPU {env['cpu']}, "
          f"{env['cpu_isa']}), torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, CUDA kernels compiled: "
          f"{env['cuda_kernels']}", flush=True)
    print(f"dynkernels.bench: backends here: {backend_summary(device)}", flush=True)
    if device.type == "cpu":
        print(f"dynkernels.bench: memory: {malloc}", flush=True)
    print(f"dynkernels.bench: families: {', '.join(families)}; writing to {out}", flush=True)

    old_meta, old_rows = results.load(out)
    settings = TIMING[(key, device.type)]
    rates = accounting.Rates(device, settings, smoke=key == "smoke")
    rates.measured.update(old_meta.get("rates", {}))  # rates of earlier steps into the same folder stay in its header
    run_id = results.new_run_id()
    runner = Runner(device, settings, env, run_id, args.suite, rates)
    meta = {
        "run_id": run_id, "suite": args.suite, "sweep": args.sweep, "families": families, "timing": vars(settings),
        "input_sets": cfg.input_sets, "rates": rates.measured, "logical_cpus": os.cpu_count(), "malloc": malloc,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    rows: List[dict] = []
    start = last_save = time.monotonic()

    def save(new_rows) -> None:
        nonlocal last_save
        if time.monotonic() - last_save >= SAVE_EVERY_S:
            results.write(out, results.merge(old_rows, rows + new_rows), dict(meta, elapsed_s=round(time.monotonic() - start, 1)))
            last_save = time.monotonic()

    for name in families:
        torch.manual_seed(0)
        budget = args.budget_s or (SMOKE_BUDGET_S if key == "smoke" else BUDGET_S[(key, device.type)][name])
        rows += runner.run(name, cases(name, args.suite, cfg), budget * args.budget_scale, on_case=save)
    meta["elapsed_s"] = round(time.monotonic() - start, 1)
    results.write(out, results.merge(old_rows, rows), meta)
    path = write_report(out, plots=not args.no_plots)
    counts = {s: sum(r["status"] == s for r in rows) for s in results.STATUSES}
    print(f"dynkernels.bench: {len(rows)} rows in {meta['elapsed_s']:.0f} s "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())})", flush=True)
    print(f"dynkernels.bench: report: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
