#!/usr/bin/env python
"""Benchmark: compact, gather_rows and scatter_add_rows (GB/s against the copy bandwidth of the same run).

A thin wrapper over `python -m dynkernels.bench --only sample_gating` (the code lives in
dynkernels/bench/families/sample_gating.py so the installed entry point has it too); it takes the
same options, e.g. `python bench/bench_sample_gating.py --full --device cuda --out bench/out/x`.
"""
import sys

from dynkernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--only", "sample_gating", *sys.argv[1:]]))
