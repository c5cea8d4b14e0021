#!/usr/bin/env python
"""Benchmark: channel_sparse_conv2d and GatedConv2d against dense, masked and naive convolutions.

A thin wrapper over `python -m dynkernels.bench --only channel_sparse_conv` (the code lives in
dynkernels/bench/families/channel_sparse_conv.py so the installed entry point has it too); it takes the
same options, e.g. `python bench/bench_channel_sparse_conv.py --full --device cuda --out bench/out/x`.
"""
import sys

from dynkernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--only", "channel_sparse_conv", *sys.argv[1:]]))
