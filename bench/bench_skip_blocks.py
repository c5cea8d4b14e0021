#!/usr/bin/env python
"""Benchmark: SkipBlock (sparse and masked) against the dense, masked and naive index_select/index_add_ blocks.

A thin wrapper over `python -m dynkernels.bench --only skip_blocks` (the code lives in
dynkernels/bench/families/skip_blocks.py so the installed entry point has it too); it takes the
same options, e.g. `python bench/bench_skip_blocks.py --full --device cuda --out bench/out/x`.
"""
import sys

from dynkernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--only", "skip_blocks", *sys.argv[1:]]))
