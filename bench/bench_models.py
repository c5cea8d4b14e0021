#!/usr/bin/env python
"""Benchmark: end-to-end BlockDrop ResNet-110 / ResNet-101 (and FBS ResNet-18, LC-Net ResNet-50 where they exist): sparse vs masked vs dense.

A thin wrapper over `python -m dynkernels.bench --only models` (the code lives in
dynkernels/bench/families/models.py so the installed entry point has it too); it takes the
same options, e.g. `python bench/bench_models.py --full --device cuda --out bench/out/x`.
"""
import sys

from dynkernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--only", "models", *sys.argv[1:]]))
