"""dynkernels.bench: speedup-versus-density benchmarks against dense, masked and naive baselines.

`python -m dynkernels.bench` (or `dynkernels-bench`) runs the families (sample_gating,
channel_sparse_conv, skip_blocks, models) and writes results.csv, results.json, report.md
and plots. Modules: timing (median/p20/p80 after warm-up, inputs rotated; CUDA events via
triton.testing.do_bench on a GPU, perf_counter on the CPU), accounting (FLOPs, bytes, ideal
speedup, efficiency), harness (cases, variants, skips), results (rows, files), report.
"""
from .timing import Timing, TimingSettings, measure

__all__ = ["Timing", "TimingSettings", "measure"]
