"""Command line: python -m dynkernels.bench [--quick | --full] [--device auto|cpu|cuda] [--out DIR] [--only FAMILY]."""
import argparse
import datetime as _dt
import os
import sys
import time
from typing import List, Optional

import torch

from . import report, results
from .families import FAMILIES
from .families._common import RunConfig
from .harness import Runner
from .timing import TimingSettings

# Timing per measurement and time budget per family (seconds), by (sweep, device type).
# The budgets keep `--quick` on a small CPU near 3 minutes and `--full` on an H100 near 6;
# cases past a family's budget are recorded as skipped, with the reason.
TIMING = {
    ("quick", "cpu"): TimingSettings(warmup_ms=20, rep_ms=150, min_runs=7, max_runs=300),
    ("full", "cpu"): TimingSettings(warmup_ms=50, rep_ms=300, min_runs=10, max_runs=1000),
    ("quick", "cuda"): TimingSettings(warmup_ms=5, rep_ms=20, min_runs=10, max_runs=1000),
    ("full", "cuda"): TimingSettings(warmup_ms=5, rep_ms=25, min_runs=10, max_runs=1000),
}
BUDGET_S = {
    ("quick", "cpu"): {"sample_gating": 30, "channel_sparse_conv": 50, "skip_blocks": 40, "models": 60},
    ("full", "cpu"): {"sample_gating": 300, "channel_sparse_conv": 900, "skip_blocks": 600, "models": 900},
    ("quick", "cuda"): {"sample_gating": 20, "channel_sparse_conv": 40, "skip_blocks": 30, "models": 40},
    ("full", "cuda"): {"sample_gating": 45, "channel_sparse_conv": 160, "skip_blocks": 60, "models": 75},
}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dynkernels.bench",
        description="Speedup-versus-density benchmarks of dynkernels against dense, masked and naive PyTorch.",
    )
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--quick", dest="full", action="store_false", help="small sweeps (default; about 3 minutes on a small CPU)")
    sweep.add_argument("--full", dest="full", action="store_true", help="the full sweep (the GPU report; about 6 minutes on an H100)")
    p.set_defaults(full=False)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when a GPU is present (default)")
    p.add_argument("--out", help="output folder (default bench/out/<date>-<device>)")
    p.add_argument("--only", action="append", choices=sorted(FAMILIES), metavar="FAMILY",
                   help=f"run only this family (repeatable): {', '.join(FAMILIES)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every family's time budget (default 1)")
    p.add_argument("--input-sets", type=int, default=3, help="input sets each timed call rotates through (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on the CPU: a shared machine's scheduler makes multi-threaded "
                        "timings jump in 4 ms steps; 0 keeps torch's default)")
    p.add_argument("--no-plots", action="store_true", help="write the report without plots")
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
        if b == "triton" and device.type == "cpu":
            parts.append("triton: no (timed on GPUs only)")
            continue
        try:
            resolve("gather_rows", b, device)
            parts.append(f"{b}: yes")
        except (ValueError, RuntimeError) as e:
            parts.append(f"{b}: no ({str(e).split(': ', 1)[-1][:100]})")
    parts.append(f"auto -> {resolve('gather_rows', 'auto', device)} (sample gating ops)")
    return "; ".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    sweep = "full" if args.full else "quick"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the dense cuDNN baseline at its best
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    out = args.out or os.path.join("bench", "out", f"{_dt.date.today().isoformat()}-{device.type}")
    env = results.environment(device)
    families = list(dict.fromkeys(args.only)) if args.only else list(FAMILIES)
    print(f"dynkernels.bench: {sweep} sweep on {device.type} ({env['device_name']}), torch {env['torch']}, "
          f"Triton {env['triton']}, CUDA {env['cuda']}, dynkernels CUDA kernels compiled: {env['cuda_kernels']}", flush=True)
    print(f"dynkernels.bench: backends here: {backend_summary(device)}", flush=True)
    print(f"dynkernels.bench: families: {', '.join(families)}; writing to {out}", flush=True)

    cfg = RunConfig(device=device, full=args.full, timing=TIMING[(sweep, device.type)], input_sets=max(1, args.input_sets))
    run_id = results.new_run_id()
    on_gpu = device.type == "cuda"
    runner = Runner(device, cfg.timing, env, run_id, reuse_timings=on_gpu, rounds=1 if on_gpu else 3)
    rows = []
    start = time.monotonic()
    for name in families:
        torch.manual_seed(0)
        cases = FAMILIES[name].cases(cfg)
        budget = BUDGET_S[(sweep, device.type)][name] * args.budget_scale
        rows += runner.run(name, cases, budget)
    elapsed = time.monotonic() - start
    meta = {
        "run_id": run_id, "command": "python -m dynkernels.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sweep": sweep, "families": families, "elapsed_s": round(elapsed, 1), "environment": env,
        "timing": vars(cfg.timing), "input_sets": cfg.input_sets, "rounds": runner.rounds,
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    all_rows = results.merge(results.load_rows(out), rows)
    results.write(out, all_rows, meta)
    path = report.write_report(out, all_rows, meta, plots=not args.no_plots)
    counts = {s: sum(r["status"] == s for r in rows) for s in results.STATUSES}
    print(f"dynkernels.bench: {len(rows)} rows in {elapsed:.0f} s ({', '.join(f'{k} {v}' for k, v in counts.items())})", flush=True)
    print(f"dynkernels.bench: report: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
