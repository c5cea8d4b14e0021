"""python -m dynkernels.bench.targets STEP [STEP ...] [--device cpu|cuda] [--smoke] [--out DIR] [--budget-s S]"""
import argparse
import os
import sys
from typing import List, Optional

import torch

from . import STEPS
from .common import TIMING_NOTE, Target, error_text, header, load

DEFAULT_BUDGET_S = {"conv": 150, "skip_block": 55, "blockdrop": 100}  # as in bench/gpu_suite.sh


def write_summary(out_dir: str) -> str:
    """targets.md from the targets_<step>.json files found in out_dir."""
    top, body = [], []
    found = False
    for name, module in STEPS.items():
        data = load(out_dir, name)
        if data is None:
            body += [f"## {name}: no results (targets_{name}.json is missing: the step did not start)", ""]
            continue
        found = True
        try:  # a broken renderer must not hide the other steps
            top += module.headline(data)
            if not data["meta"].get("finished"):
                top += [f"(the {name} step did not finish: see its section)", ""]
            section = module.render(data)
        except Exception as e:
            section = [f"## {name}: could not render targets_{name}.json ({error_text(e)})", ""]
        body += section[:2] + header(data) + [""] + section[2:]
    lines = ["# dynkernels: the GPU speed targets of issues 3 and 4", "", "## Headline", ""] + top + body
    lines += ["## How the timings were taken", "", TIMING_NOTE, ""]
    path = os.path.join(out_dir, "targets.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(["targets headline:", ""] + top), flush=True)
    if not found:
        print(f"targets summary: no step results in {out_dir}", file=sys.stderr)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m dynkernels.bench.targets", description=__doc__)
    p.add_argument("steps", nargs="+", choices=sorted(STEPS) + ["all", "summary"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few runs: checks that the code runs")
    p.add_argument("--out", default=os.path.join("bench", "out", "targets"))
    p.add_argument("--budget-s", type=float, default=None, help="time budget per step (default: per step, GPU sizes)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads on the CPU (default 1: on a shared machine more threads make timings jump)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("dynkernels.bench.targets: --device cuda but torch sees no CUDA GPU")
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    steps = list(STEPS) if "all" in args.steps else [s for s in args.steps if s != "summary"]
    for name in steps:
        budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[name]
        target = Target(name, torch.device(args.device), args.smoke, args.out, budget, argv)
        target.say(f"start on {target.meta['environment']['device_name']}, budget {budget:.0f} s")
        STEPS[name].run(target)
        target.finish()
        for line in STEPS[name].render(load(args.out, name)):
            print(line)
    if "summary" in args.steps or "all" in args.steps:
        print(f"targets summary: {write_summary(args.out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
