"""backend="auto" for channel_sparse_conv2d on CPU tensors: the C++ channel-sparse kernel, or
dense execution (torch's conv2d, i.e. oneDNN, then the gate multiply and the shift) where the
gates leave so much work that the dense conv is measured faster.

The rule (cpu_prefers_dense) compares the gates' FLOP density (the fraction of the dense conv's
multiply-adds the gates leave active) with a crossover that depends on the input's layout, on
whether the conv is strided, and on how well the output pixels of one sample fill the C++
kernel's vectors of 16 (it vectorises over a sample's output pixels: 7x7 = 49 pixels fill 49
of 64 lanes). The density is the caller's `density` hint when given; otherwise it is read from
the gates, which on CPU tensors is a host read of memory already on the host (no sync).
With channels_last input and no autograd graph to record, dense execution keeps the weight in
oneDNN's blocked layout between calls instead of letting conv2d reorder it on every call
(dynkernels/ops/_cpu_packed_conv.py: up to 1.29x on a 512 -> 512 3x3 7x7 layer, at the price of
two more copies of the weight's memory).

Measured on an AMD EPYC (Zen 4, AVX-512; 2 cores) with torch 2.14.1 (oneDNN 3.12), fp32, one
thread, thread CPU time on a shared machine (medians of 7 interleaved rounds): time of dense
execution / time of the C++ kernel with every gate active (density 1):

| layer (batch, channels, kernel, stride, output size) | NCHW | channels_last |
| --- | --- | --- |
| 32, 128 -> 128, 3x3, 16x16 | 1.16 | 0.89 |
| 32, 64 -> 64, 3x3, 32x32 | 1.15 | 0.84 |
| 32, 256 -> 256, 3x3, 8x8 | 0.89 | 0.87 |
| 8, 128 -> 128, 3x3, 16x16 | 0.96 | 0.91 |
| 4, 256 -> 256, 3x3, 14x14 | 0.85 | 0.83 |
| 4, 64 -> 64, 3x3, 56x56 | 0.97 | 0.74 |
| 16, 512 -> 512, 3x3, 7x7 | 0.69 | 1.15 (one run, the dense conv unusually slow) |
| 8, 32 -> 32, 3x3, 16x16 | 1.03 | 0.71 |
| 8, 64 -> 64 and 32, 128 -> 128, 1x1, 16x16 | 1.11, 1.28 | 0.76, 0.80 |
| 32, 64 -> 128, 3x3, stride 2, 16x16 | 1.07 | 0.76 |

Measured again on an Intel Xeon (AVX-512, AMX; 2 cores) with the same torch, after the kernel's
buffers were aligned, its reduction made one loop and its pixels walked in L2-sized panels:
fp32, one thread, wall time on an idle machine (medians of 9 interleaved rounds); dense
execution here includes the gate multiply of random gates in [0.1, 1.1):

| layer (batch, channels, kernel, stride, output size) | NCHW | channels_last |
| --- | --- | --- |
| 32, 128 -> 128, 3x3, 16x16 | 1.15 | 0.88 |
| 32, 64 -> 64, 3x3, 32x32 | 1.31 | 0.97 |
| 32, 256 -> 256, 3x3, 8x8 | 0.91 | 0.95 |
| 8, 128 -> 128, 3x3, 16x16 | 1.07 | 0.93 |
| 4, 256 -> 256, 3x3, 14x14 | 0.85 | 0.80 |
| 4, 64 -> 64, 3x3, 56x56 | 0.86 | 0.72 |
| 16, 512 -> 512, 3x3, 7x7 | 0.72 | 0.97 |
| 8, 32 -> 32, 3x3, 16x16 | 1.19 | 1.07 |
| 8, 64 -> 64 and 32, 128 -> 128, 1x1, 16x16 | 1.24, 1.39 | 1.04, 0.80 |
| 32, 64 -> 128, 3x3, stride 2, 16x16 | 0.79 | 0.68 |

Measured on an AMD EPYC (Zen 5, AVX-512 with 512-bit FMA units; 2 cores) with the same torch,
after NCHW input got its own vector copy into the row-shift buffer and channels_last input
(strided, or 3x3 with 512 output pixels and more) its output channels in the vector lanes:
fp32, one thread, wall time (medians of 7 interleaved rounds, the range over two runs); dense
execution includes the gate multiply of random gates in [0.1, 1.1):

| layer (batch, channels, kernel, stride, output size) | NCHW | channels_last |
| --- | --- | --- |
| 32, 128 -> 128, 3x3, 16x16 | 1.42 - 1.46 | 0.94 - 1.04 |
| 32, 64 -> 64, 3x3, 32x32 | 1.47 - 1.69 | 1.05 - 1.06 |
| 32, 256 -> 256, 3x3, 8x8 | 1.04 - 1.21 | 0.85 - 0.91 |
| 8, 128 -> 128, 3x3, 16x16 | 1.09 - 1.13 | 0.95 - 0.97 |
| 4, 256 -> 256, 3x3, 14x14 | 1.01 - 1.03 | 0.90 |
| 4, 64 -> 64, 3x3, 56x56 | 1.05 - 1.08 | 1.05 - 1.06 |
| 16, 512 -> 512, 3x3, 7x7 | 0.84 - 0.87 | 0.66 - 0.70 |
| 8, 32 -> 32, 3x3, 16x16 | 1.19 - 1.33 | 0.96 - 1.02 |
| 8, 64 -> 64 and 32, 128 -> 128, 1x1, 16x16 | 2.03 - 2.27, 1.27 - 1.36 | 1.65 - 1.73, 0.97 - 1.05 |
| 32, 64 -> 128, 3x3, stride 2, 16x16 | 1.00 - 1.13 | 1.16 - 1.19 |

Measured again on an AMD EPYC (Zen 4, AVX-512; 2 cores; 2026-12-03) with the kernel of the Zen 5
table: fp32, wall time on an idle machine (medians of 9 interleaved rounds; dense execution
includes the gate multiply of random gates in [0.1, 1.1)); one thread (NCHW: the range over two
runs where both covered the layer), and NCHW at two threads:

| layer (batch, channels, kernel, stride, output size) | NCHW | channels_last | NCHW, 2 threads |
| --- | --- | --- | --- |
| 32, 128 -> 128, 3x3, 16x16 | 1.13 - 1.17 | 0.87 | 1.18 |
| 32, 64 -> 64, 3x3, 32x32 | 1.21 - 1.24 | 0.96 | 1.48 |
| 32, 256 -> 256, 3x3, 8x8 | 0.92 - 0.94 | 0.88 | 0.96 |
| 8, 128 -> 128, 3x3, 16x16 | 1.05 - 1.07 | 0.96 | 0.99 |
| 4, 256 -> 256, 3x3, 14x14 | 0.92 | 0.86 | 0.96 |
| 4, 64 -> 64, 3x3, 56x56 | 1.00 | 1.00 | 1.08 |
| 16, 512 -> 512, 3x3, 7x7 | 0.69 | 0.72 | 0.72 |
| 8, 32 -> 32, 3x3, 16x16 | 1.16 | 1.06 | 1.27 |
| 8, 64 -> 64 and 32, 128 -> 128, 1x1, 16x16 | 1.18, 1.40 | 1.04, 1.04 | 1.82, 1.56 |
| 32, 64 -> 128, 3x3, stride 2, 16x16 | 1.00 | 1.03 | 1.03 |

These tables were measured with glibc's malloc defaults, under which a conv can pay the page
faults of memory freed by an earlier call (see dynkernels.bench.malloc). On the
Zen 5 EPYC again (2026-12-04) with freed memory kept, one and two threads, medians of 9
interleaved rounds, the NCHW layers of cpu_kernel_wins_dense ran 1.06 - 2.05x (1 thread) and 1.03
- 2.00x (2 threads) as fast with the kernel as with dense execution at density 1: 32, 128 -> 128,
3x3, 16x16 1.06 / 1.11; 32, 64 -> 64, 3x3, 32x32 1.14 / 1.21; 8, 128 -> 128, 3x3, 16x16 1.07 /
1.07; 4, 64 -> 64, 3x3, 56x56 1.06 / 1.03; 8, 32 -> 32, 3x3, 16x16 1.13 / 1.31; the 1x1 layers
2.05, 1.34 / 2.00, 1.32.

The kernel's time falls with the density a little more slowly than the FLOPs (what it does
per sample besides the arithmetic stays), so the crossover density lies a little below these
ratios (AMD EPYC): at 32, 128 -> 128 channels_last it was 0.82 (ratio 0.89), at 4, 256 -> 256
NCHW 0.88 (ratio 0.85), at the strided channels_last layer 0.55 (ratio 0.76). CPU_DENSE_FROM
holds, per layout and stride, a crossover at or below every measured layer's on every CPU above (the
vector fill of the pixels then lowers it further for small outputs), so that "auto" is not
slower than dense execution on any of them; the price is dense execution at density 1 on
layers where the kernel is faster there (NCHW 3x3 layers of up to 128 channels at 16x16 and
up: 1.07 - 1.31x on the Xeon), except on the layers where cpu_kernel_wins_dense says the kernel
is faster at any density on the CPU at hand (NCHW, stride 1, small reductions, 16x16 outputs
and up, batch 8 and up, on the Xeon, on Zen 4 and on Zen 5). python_tests/test_channel_sparse_conv2d_cpu.py tests the
rule.

On Zen 5 the channels_last kernel is relatively faster than on the CPUs above, and the
crossover of channels_last stride-1 layers lies higher (CPU_DENSE_FROM_ON). Measured there
(2026-12-04, after dense execution's pass with inactive gates was vectorised): fp32,
channels_last, exact per-sample output gates, medians of 9 interleaved rounds, time of dense
execution (the conv and that pass) / time of the kernel, at output densities 0.7 / 0.8 / 0.9,
one thread (two threads within 0.08 of these, but for the 8, 64 -> 64 1x1 layer: 1.34 / 1.26 /
1.16):

| layer (batch, channels, kernel, output size) | 0.7 | 0.8 | 0.9 |
| --- | --- | --- | --- |
| 32, 128 -> 128, 3x3, 16x16 | 1.28 | 1.15 | 1.02 |
| 32, 64 -> 64, 3x3, 32x32 | 1.29 | 1.00 | 0.99 |
| 32, 256 -> 256, 3x3, 8x8 | 1.21 | 1.08 | 0.97 |
| 8, 128 -> 128, 3x3, 16x16 | 1.27 | 1.13 | 1.00 |
| 4, 256 -> 256, 3x3, 14x14 | 1.21 | 1.08 | 0.97 |
| 4, 64 -> 64, 3x3, 56x56 | 1.27 | 0.98 | 0.98 |
| 16, 512 -> 512, 3x3, 7x7 | 0.95 (1.19, 1.10 at 0.55, 0.6) | 0.83 | 0.76 |
| 8, 32 -> 32, 3x3, 16x16 | 1.20 | 1.06 | 0.98 |
| 8, 64 -> 64 and 32, 128 -> 128, 1x1, 16x16 | 1.22, 1.22 | 1.13, 1.11 | 1.03, 0.99 |

The 64-channel layers with large outputs (their output channels in the kernel's vector lanes)
run 1.26 - 1.32x from density 0.55 to 0.75 (up to 48 active channels: three vectors) and drop
to 0.97 - 1.0x at 0.8 (51: four vectors), which sets the Zen 5 crossover at 0.75.

Those layers (kernel_lanes_over_channels: channels_last, AVX-512, 3x3 kernels and 512 output
pixels or more, and strided ones) cost what the active channels rounded up to whole vectors
cost: on Zen 5 the stride-1 ones compare that lane density (cpu_lane_density) with 0.88
instead (CPU_LANES_DENSE_FROM_ON). Measured there (2026-12-05, same method, one / two threads;
output density, its lane density in brackets):

| layer (batch, channels, kernel, output size) | 0.7 | 0.75 | 0.8 | 0.85 | 0.9 |
| --- | --- | --- | --- | --- | --- |
| 8, 128 -> 128, 3x3, 28x28 | 1.22 / 1.21 (0.75) | 1.23 / 1.22 (0.75) | 1.09 / 1.07 (0.875) | 1.09 / 1.07 (0.875) | 0.96 / 0.92 (1.0) |
| 4, 256 -> 256, 3x3, 28x28 | 1.17 / 1.15 (0.75) | 1.12 / 1.11 (0.75) | 1.03 / 0.99 (0.8125) | 1.01 / 0.98 (0.875) | 0.93 / 0.92 (0.9375) |
| 32, 64 -> 64, 3x3, 32x32 | 1.30 / 1.31 (0.75) | 1.32 / 1.31 (0.75) | 1.00 / 1.03 (1.0) | 1.00 / 1.02 (1.0) | 1.00 / 1.02 (1.0) |
| 4, 64 -> 64, 3x3, 56x56 | | | 1.00 / 0.97 (1.0) | 1.00 / 0.97 (1.0) | 1.00 / 0.97 (1.0) |

With the other layers' crossover at 0.75 the 128-channel layer ran dense execution from 0.75
on; with its lane density the kernel runs to 0.875 (`GatedConv2d` at out 0.8: 1.04 - 1.05x of
`nn.Conv2d`, against about 0.97x with dense execution). Once the kernel read channels_last
weights tap by tap (the same day), the other channels_last stride-1 layers' crossover on Zen 5
rose to 0.82 (times the vector fill, as elsewhere). Measured then, one / two threads, output
density 0.8 / 0.85: 32, 128 -> 128, 3x3, 16x16 1.14 / 1.11, 1.07 / 1.04; 8, 128 -> 128, 3x3,
16x16 1.14 / 1.14, 1.06 / 1.07; 32, 256 -> 256, 3x3, 8x8 1.03 / 1.03, 0.98 / 0.98; 8, 32 -> 32,
3x3, 16x16 1.05 / 1.14, 1.03 / 1.09; the 1x1 layers 1.15 / 1.24 and 1.10 / 1.02, 1.11 / 1.22
and 0.99 / 0.96; and at their lower thresholds (0.82 x 196 / 208 = 0.77 and 0.82 x 49 / 64 =
0.63), 4, 256 -> 256, 3x3, 14x14 1.01 / 1.01 at 0.77 and 16, 512 -> 512, 3x3, 7x7 0.99 / 1.01 at
0.62 (1.12 / 1.12 at 0.55, 0.95 / 0.97 at 0.65).

On an AMD EPYC with Zen 2 cores (AVX2 only, 512 KiB of L2 per core; 2026-12-07) the kernel's
AVX2 micro-kernel runs relatively slower than on the CPUs above, most on the layers whose
per-sample data outgrow that L2, and the crossovers lie lower (CPU_DENSE_FROM_ON). Measured
there: fp32, wall time (medians of 7 interleaved rounds), time of dense execution (with the
gate multiply of random gates in [0.1, 1.1)) / time of the kernel, one thread; at density 1:

| layer (batch, channels, kernel, stride, output size) | NCHW | channels_last |
| --- | --- | --- |
| 32, 128 -> 128, 3x3, 16x16 | 0.88 | 0.77 |
| 32, 64 -> 64, 3x3, 32x32 | 0.82 | 0.74 |
| 32, 256 -> 256, 3x3, 8x8 | 0.94 | 0.76 |
| 8, 128 -> 128, 3x3, 16x16 | 0.88 | 0.81 |
| 4, 256 -> 256, 3x3, 14x14 | 0.69 | 0.65 |
| 4, 64 -> 64, 3x3, 56x56 | 0.70 | 0.64 |
| 16, 512 -> 512, 3x3, 7x7 | 0.70 | 0.64 |
| 8, 32 -> 32, 3x3, 16x16 | 0.97 | 0.90 |
| 8, 64 -> 64 and 32, 128 -> 128, 1x1, 16x16 | 1.14, 1.06 | 0.86, 0.87 |
| 32, 64 -> 128, 3x3, stride 2, 16x16 | 0.93 | 0.77 |

and at output densities 0.6 / 0.65 / 0.7 / 0.75 (exact per-sample gates), one thread, then at
0.55 / 0.6 / 0.65 / 0.7 at two threads:

| layer | 1 thread | 2 threads |
| --- | --- | --- |
| 4, 256 -> 256, 3x3, 14x14, NCHW | 1.07 / 1.01 / 0.95 / 0.88 | 1.15 / 1.08 / 1.02 / 0.94 |
| 4, 64 -> 64, 3x3, 56x56, NCHW | 1.11 / 1.02 / 0.95 / 0.91 | 1.19 / 1.10 / 1.00 / 0.93 |
| 16, 512 -> 512, 3x3, 7x7, NCHW | 1.14 / 1.06 / 0.96 / 0.93 | 1.18 / 1.16 / 1.08 / 1.00 |
| 32, 64 -> 64, 3x3, 32x32, NCHW | 1.26 / 1.16 / 1.07 / 1.06 | |
| 32, 128 -> 128, 3x3, 16x16, NCHW | | 1.47 / 1.33 / 1.28 / 1.18 |
| 4, 256 -> 256, 3x3, 14x14, channels_last | 1.06 / 0.99 / 0.93 / 0.88 | 1.03 / 0.97 / 0.93 / 0.87 |
| 4, 64 -> 64, 3x3, 56x56, channels_last | 1.00 / 0.92 / 0.85 / 0.84 | 1.11 / 1.03 / 0.93 / 0.88 |
| 32, 64 -> 64, 3x3, 32x32, channels_last | 1.12 / 1.03 / 0.96 / 0.95 | |
| 32, 128 -> 128, 3x3, 16x16, channels_last | 1.18 / 1.11 / 1.01 / 0.98 | 1.29 / 1.19 / 1.13 / 1.05 |
| 32, 64 -> 128, 3x3, stride 2, 16x16, channels_last / NCHW | 1.08 / 1.03 / 0.97 / 0.93, 1.30 / 1.23 / 1.14 / 1.12 | |

Zen 2's stride-1 crossovers are the lowest of these (0.64 for NCHW, from the 56x56 and 14x14
layers at two threads; 0.58 for channels_last, the 56x56 layer at one thread and the 14x14
one at two, whose fill of the AVX2 kernel's 8-lane vectors, 196 of 200, makes its threshold
0.57); the price is dense execution from there on the layers whose own crossover lies higher
(the benchmark layer's, 32, 128 -> 128 NCHW: 1.18x at 0.7 with two threads; in the quick
report of that day, 8, 32 -> 32, 3x3, 16x16 NCHW ran the kernel 1.14x as fast as the dense conv
at output density 0.75, dense execution 0.92x). The strided ones keep CPU_DENSE_FROM's, below
theirs (0.68 channels_last, above 0.8 NCHW). No layer here runs the kernel faster than dense
execution at density 1 in both layouts, and the 3x3 NCHW layers of cpu_kernel_wins_dense's
kind ran 0.82 - 0.97x there, so Zen 2 is not in KERNEL_WINS_CPUS. These tables predate the AVX2
kernel's other orientation (kernel_lanes_over_channels: output channels in the lanes), which
made channels_last layers of 64 output channels or more with 512 output pixels or more (and
strided ones with 256 or more) 1.05 - 1.6x faster at the same density (56x56: 1.4x); the
14x14 layer behind the channels_last crossover is not one of them, so it stands, below those
layers' own crossovers. After the micro-kernel's even runs (csrc/cpu/conv_gemm.h,
GemmProblem::run: 5 - 23% off the kernel's time on channels_last layers and on NCHW layers
whose weight it copies channels_last) the same layers were measured again at densities 0.6 -
0.85 (one and two threads, medians of 7, the same day): most crossovers rose to 0.72 - 0.85,
but the 4, 256 -> 256, 14x14 layer's moved from one process to the next (NCHW at two threads:
0.72 in one, below 0.62 in the next; its row-shift buffer, 737 KB, outgrows the L2), and
16, 512 -> 512, 7x7 channels_last crossed at 0.60 - 0.63 (0.69 - 0.72 before the vector fill
of 49 of 56 lanes): the entries stay as they were.
"""
import math

import numpy as np

import torch

from .._cpu import cpu_info
from .._extension import _C
from .._layout import row_layout
from ._cpu_packed_conv import conv2d_channels_last

# Dense execution from this FLOP density up (times the vector fill), by (channels_last, stride > 1).
CPU_DENSE_FROM = {
    (False, False): 0.85,
    (True, False): 0.70,
    (False, True): 0.75,
    (True, True): 0.55,
}
# Entries that replace CPU_DENSE_FROM's on the CPUs where they were measured (matched in the
# model name of dynkernels._cpu, as KERNEL_WINS_CPUS below).
CPU_DENSE_FROM_ON = {
    "Zen 5": {(True, False): 0.82},
    "Zen 2": {(False, False): 0.64, (True, False): 0.58},
}
# Stride-1 layers whose active output channels the C++ kernel puts in its vector lanes
# (kernel_lanes_over_channels): on these CPUs dense execution runs from this lane density up
# (cpu_lane_density: the channels rounded up to whole vectors); on the others CPU_DENSE_FROM's
# rule covers them as any layer.
CPU_LANES_DENSE_FROM_ON = {"Zen 5": 0.88}
CPU_KERNEL_LANES = 16  # the C++ kernel's float32 vectors on AVX-512 (csrc/cpu/conv_gemm.h, kFloatLanes; AVX2: 8)
# The C++ kernel's micro-kernel: "AVX512", "AVX2" or another (portable code). It picks it by
# torch's CPU capability, as here (csrc/cpu/conv_gemm.cpp, pick_isa).
_KERNEL_ISA = torch.backends.cpu.get_cpu_capability()
# Layers on which the C++ kernel is faster than dense execution even with every gate active, on
# the CPUs where that was measured (cpu_kernel_wins_dense): NCHW, stride 1, a reduction of at
# most KERNEL_WINS_DEPTH (input channel, tap) pairs, at least KERNEL_WINS_PIXELS output pixels
# and KERNEL_WINS_BATCH samples.
KERNEL_WINS_CPUS = ("Intel", "Zen 4", "Zen 5")  # matched in the model name (dynkernels._cpu: "AMD EPYC (Zen 5, ...)")
KERNEL_WINS_DEPTH, KERNEL_WINS_PIXELS, KERNEL_WINS_BATCH = 1152, 256, 8
# Batches of one or two samples (latency-bound inference), NCHW, on these CPUs
# (small_batch_crossover): the kernel at every density where a sample has at least
# SMALL_BATCH_KERNEL_WINS_PIXELS[batch] output pixels; a batch of two with 4 - 15 pixels
# compares the FLOP density with SMALL_BATCH_DENSE_FROM (no vector fill). Strided layers only
# up to SMALL_BATCH_STRIDED_PIXELS output pixels.
SMALL_BATCH_CPUS = ("Zen 5",)
SMALL_BATCH_KERNEL_WINS_PIXELS = {1: 4, 2: 16}
SMALL_BATCH_DENSE_FROM = 0.8
SMALL_BATCH_STRIDED_PIXELS = 64
_GATE_SUMMARY = None if _C is None else _C.cpu_first.gate_summary
_GATE_SCALE = None if _C is None else _C.cpu_first.gate_scale_


def _entry_for_cpu(table: dict, vendor_model: str, default=None):
    """The value of the first key of `table` found in the CPU's model name (default if none)."""
    return next((value for name, value in table.items() if name in vendor_model), default)


def cpu_dense_threshold(channels_last: bool, strided: bool, pixels: int, vendor_model: str = "") -> float:
    """The FLOP density from which dense execution is faster on the CPU, for this layout,
    stride and number of output pixels per sample, on the CPU of this model name (any other
    than those of CPU_DENSE_FROM_ON: CPU_DENSE_FROM's crossover), times the fill of the
    kernel's vectors by a sample's pixels (16 lanes with its AVX-512 micro-kernel, 8 with the
    others: 7x7 outputs fill 49 of 64 lanes, or of 56)."""
    key = (bool(channels_last), bool(strided))
    lanes = CPU_KERNEL_LANES if _KERNEL_ISA == "AVX512" else CPU_KERNEL_LANES // 2  # AVX2 and portable code: 8
    fill = pixels / (math.ceil(pixels / lanes) * lanes) if pixels > 0 else 1.0
    crossover = _entry_for_cpu(CPU_DENSE_FROM_ON, vendor_model, {}).get(key, CPU_DENSE_FROM[key])
    return crossover * fill


def kernel_lanes_over_channels(channels_last: bool, strided: bool, weight_shape, pixels: int) -> bool:
    """Whether the C++ kernel puts a sample's active output channels in its vector lanes (and
    output pixels in its rows) on a float32 layer (csrc/cpu/channel_sparse_conv2d_cpu.cpp,
    pixel_rows_apply; with more than one channel in and out): channels_last input, and with
    the AVX-512 micro-kernel a strided layer or a kernel of more than one tap with 512 output
    pixels or more; with the AVX2 one, 64 output channels or more and a strided layer of 256
    output pixels or more or a kernel of more than one tap with 512 or more. Its work then
    grows with the active channels rounded up to whole vectors."""
    cout, cin, kh, kw = weight_shape
    if not (channels_last and cin > 1 and cout > 1):
        return False
    if _KERNEL_ISA == "AVX512":
        return bool(strided) or (kh * kw > 1 and pixels >= 512)
    if _KERNEL_ISA == "AVX2":
        return cout >= 64 and (pixels >= 256 if strided else kh * kw > 1 and pixels >= 512)
    return False


def cpu_prefers_dense(density: float, channels_last: bool, strided: bool, pixels: int, vendor_model: str = "") -> bool:
    """The rule: dense execution for this FLOP density, layout, stride and output size."""
    return density >= cpu_dense_threshold(channels_last, strided, pixels, vendor_model)


def cpu_kernel_wins_dense(vendor_model: str, channels_last: bool, strided: bool, batch: int, depth: int,
                          pixels: int) -> bool:
    """Whether the C++ kernel beats dense execution on this layer at any density, so that
    "auto" runs it even with every gate active. Measured on the Intel Xeon and the AMD EPYCs
    (Zen 4, Zen 5) of the tables above: every NCHW stride-1 layer with at most 1152 (input
    channel, tap) pairs per output channel, 16x16 outputs or more and a batch of 8 or more ran
    1.04 - 1.39x (Xeon), 1.05 - 1.40x (Zen 4; 0.99 - 1.82x at two threads) and 1.09 - 2.27x
    (Zen 5) of dense execution at density 1; on Zen 4 with the kernel before the changes of
    the Zen 5 table one such layer ran 0.96x. On a CPU not measured the crossover table alone
    decides. The same Xeon model running at half its FMA rate (its
    cores apparently shared with another guest) ran the 8, 64 -> 64 1x1 layer at 0.79 - 0.81x
    (dense execution with the gate multiply: 0.79 - 0.84x) and the 32, 128 -> 128 1x1 one at
    2.8x; nothing in /proc/cpuinfo tells the two states apart, so the rule stays."""
    return (any(v in vendor_model for v in KERNEL_WINS_CPUS) and not channels_last and not strided
            and depth <= KERNEL_WINS_DEPTH and pixels >= KERNEL_WINS_PIXELS and batch >= KERNEL_WINS_BATCH)


def small_batch_crossover(vendor_model: str, channels_last: bool, strided: bool, batch: int, pixels: int):
    """The FLOP density from which dense execution runs on a batch of one or two samples, NCHW,
    at stride 1 or (strided) with at most SMALL_BATCH_STRIDED_PIXELS output pixels, on the CPUs
    of SMALL_BATCH_CPUS (math.inf: never), or None where the general rule decides. There
    oneDNN's NCHW conv pays its reorders (of the weight, and of x and y between NCHW and its
    blocked layout) on every call, a cost that one or two samples cannot spread, while the
    kernel's unused vector lanes on small outputs cost in proportion to the batch.

    Measured on the AMD EPYC (Zen 5; 2026-12-07, fp32, freed memory kept, medians of 31 runs),
    time of dense execution (with the gate multiply of gates in [0.1, 1.1)) / time of the
    kernel at density 1, over the stride-1 layers of ResNet-18 and -50 at 224x224 (64 -> 64 3x3
    56x56 to 512 -> 512 3x3 7x7; the 1x1 ones 256 -> 64 and 64 -> 256 at 56x56, 1024 -> 256 at
    14x14, 512 -> 2048 at 7x7) and 3x3 layers at 8x8, 4x4 and 2x2: batch 1 1.02 - 3.20x (one
    thread) and 1.01 - 2.94x (two); batch 2 1.00 - 2.38x and 1.02 - 2.14x, but 0.75 - 0.88x at
    2x2 (512 -> 512), whose crossovers lay at 0.8 - 0.9 (256 and 512 channels; 128: above 1;
    3x3 outputs: about 1), where the vector fill of 4 of 16 lanes put them at 0.21; batch 4
    0.95 - 1.02x for the 3x3 layers of 49 pixels and more (the general rule). Outputs of 1
    pixel ran the kernel 0.32 - 0.67x as fast as dense execution at density 1 with a batch of
    two (one thread) and stay with the general rule, as does any batch on other CPUs.

    Strided (stride 2, the same method; 3x3 and 1x1 layers of 64 -> 128 at 8x8 outputs, 128 ->
    256 at 4x4, 256 -> 512 at 2x2, 4x4 and 7x7, 512 -> 512 at 4x4, 128 -> 256 at 7x7): batch 1
    1.16 - 3.24x (one thread) and 1.01 - 2.49x (two); batch 2 1.03 - 2.60x and 1.10 - 3.21x,
    but 0.83 / 0.94x (3x3) and 1.06 / 1.64x (1x1) at 2x2, 1.03 - 2.07x there at density 0.7.
    At ResNet's 28x28 and 14x14 outputs they were 0.94 - 1.05x (the general rule)."""
    if channels_last or not any(v in vendor_model for v in SMALL_BATCH_CPUS):
        return None
    if strided and pixels > SMALL_BATCH_STRIDED_PIXELS:
        return None
    if batch in SMALL_BATCH_KERNEL_WINS_PIXELS and pixels >= SMALL_BATCH_KERNEL_WINS_PIXELS[batch]:
        return math.inf
    if batch == 2 and pixels >= SMALL_BATCH_KERNEL_WINS_PIXELS[1]:
        return SMALL_BATCH_DENSE_FROM
    return None


def _host_view(gate: torch.Tensor):
    """The gate as a numpy array (no copy) where numpy has its dtype, else as a float32 one:
    a few microseconds per check where torch ops on a small tensor take several each."""
    g = gate.detach()
    return (g if g.dtype in (torch.float32, torch.float64, torch.float16, torch.bool) else g.float()).numpy()


def _gate_summary(gate: torch.Tensor):
    """(number of entries > 0, min, max) of a CPU gate with at least one entry (min and max
    NaN where one is NaN): one C++ pass over a contiguous float32 gate
    (dynkernels._C.cpu_first.gate_summary), numpy otherwise."""
    if _GATE_SUMMARY is not None:
        summary = _GATE_SUMMARY(gate)
        if summary is not NotImplemented:
            return summary
    g = _host_view(gate)
    return int(np.count_nonzero(g > 0)), g.min(), g.max()


def cpu_flop_density(out_gate: torch.Tensor, in_gate=None, below=None) -> float:
    """The fraction of the dense conv's FLOPs the gates leave active: the mean over samples of
    (active outputs x active inputs) / (Cout x Cin). CPU tensors (a host read, no sync).
    If the output density alone is below `below`, it is returned without reading in_gate
    (the FLOP density can only be lower)."""
    size = out_gate.numel()
    out_density = _gate_summary(out_gate)[0] / size if size else 0.0
    if in_gate is None or (below is not None and out_density < below):
        return out_density
    out_active, in_active = _host_view(out_gate) > 0, _host_view(in_gate) > 0
    return float(out_active.sum(1) @ in_active.sum(1)) / max(1, out_active.size * in_active.shape[1])


def cpu_lane_density(out_gate: torch.Tensor, in_gate=None) -> float:
    """The fraction of the C++ kernel's vector work the gates leave where it puts the active
    output channels in its lanes (kernel_lanes_over_channels): the mean over samples of
    (active outputs rounded up to a multiple of CPU_KERNEL_LANES) x active inputs over
    (Cout rounded up likewise) x Cin. CPU tensors (a host read, no sync)."""
    out_active = _host_view(out_gate) > 0
    n, cout = out_active.shape
    whole = lambda c: -(-c // CPU_KERNEL_LANES) * CPU_KERNEL_LANES  # noqa: E731
    lanes = whole(out_active.sum(1))
    if in_gate is None:
        return float(lanes.sum()) / max(1, n * whole(cout))
    in_active = _host_view(in_gate) > 0
    return float(lanes @ in_active.sum(1)) / max(1, n * whole(cout) * in_active.shape[1])


def cpu_rule(channels_last: bool, strided: bool, batch: int, weight: torch.Tensor, pixels: int, density,
             lane_density=None) -> bool:
    """The whole rule of backend="auto" on CPU tensors: dense execution unless the kernel wins
    on this layer at any density (cpu_kernel_wins_dense); a batch of one or two where
    small_batch_crossover gives a crossover, from that FLOP density; else where the FLOP
    density reaches the crossover (cpu_prefers_dense); on the CPUs of CPU_LANES_DENSE_FROM_ON,
    stride-1 layers whose output channels the kernel puts in its lanes compare the lane density
    with theirs. density, lane_density: numbers, or functions of the crossover that read them
    (called only where the rule needs them); lane_density None: density stands for it."""
    depth = weight.shape[1] * weight.shape[2] * weight.shape[3]
    model = cpu_info()["model"]
    if cpu_kernel_wins_dense(model, channels_last, strided, batch, depth, pixels):
        return False
    small = small_batch_crossover(model, channels_last, strided, batch, pixels)
    if small is not None:
        return small != math.inf and bool((density(small) if callable(density) else density) >= small)
    # (the lane crossovers, and the lane density's vectors of 16, are the AVX-512 kernel's)
    lanes_from = _entry_for_cpu(CPU_LANES_DENSE_FROM_ON, model) if _KERNEL_ISA == "AVX512" else None
    if (lanes_from is not None and not strided
            and kernel_lanes_over_channels(channels_last, strided, weight.shape, pixels)):
        d = density if lane_density is None else lane_density
        return bool((d(lanes_from) if callable(d) else d) >= lanes_from)
    if callable(density):
        density = density(cpu_dense_threshold(channels_last, strided, pixels, model))
    return bool(cpu_prefers_dense(density, channels_last, strided, pixels, model))


def use_dense_on_cpu(x, weight, out_gate, in_gate, stride, output_hw) -> bool:
    """backend="auto" on CPU tensors: whether to run dense execution (dense_then_gate). float32
    only (where the crossovers were measured; the kernel computes float16 and bfloat16 in
    float32 and is kept for them and for float64), and not while torch.compile traces (the
    density read is a host read). The densities are read from the gates themselves, not taken
    from a caller's hint (see auto_on_checked_inputs)."""
    if x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    channels_last = row_layout(x) is torch.channels_last
    density = lambda below: cpu_flop_density(out_gate, in_gate, below=below)  # noqa: E731
    lane_density = lambda below: cpu_lane_density(out_gate, in_gate)  # noqa: E731
    return cpu_rule(channels_last, tuple(stride) != (1, 1), x.shape[0], weight, output_hw[0] * output_hw[1], density,
                    lane_density)


def auto_on_checked_inputs(x, weight, bias, out_gate, in_gate, shift, seen):
    """backend="auto" on the plain float32 CPU call that dynkernels._C.cpu_first.conv_auto_inputs
    read (`seen`: what the rule needs, the output gate's range, whether every input is
    active): dense execution's result, or None where the kernel runs. One C++ call where the
    Python checks and reads of the gates cost about 0.25 ms of host time after a conv.

    The rule takes the FLOP and lane densities that call read from the gates, never a caller's
    density hint: on CPU tensors the read costs no sync, and a hint can only be as good. FBS's
    k / C (times the input's k' / C') overstates what its gates leave wherever a winner's
    saliency is 0: in FBS ResNet-18 (64x64, batch 2, the hint 1.0) the last stages' gates left
    0.25 - 0.5 of the FLOPs, and on the AMD EPYC (Zen 5; 2026-12-07) the kernel ran their
    512 -> 512 3x3 2x2 convs 1.6 - 3.6x as fast as the dense execution that the hint chose."""
    channels_last, stride, padding, dilation, (ho, wo), density, lanes, lowest, highest, every_input = seen
    if not cpu_rule(channels_last, stride != (1, 1), x.shape[0], weight, ho * wo, density, lanes):
        return None
    return dense_then_gate(x, weight, bias, out_gate, None if every_input else in_gate, stride, padding, dilation, shift,
                           out_range=(lowest, highest))


def dense_then_gate(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift, out_range=None):
    """channel_sparse_conv2d by dense execution: conv2d of x (times the input mask, where an
    input is inactive), then y = out_gate * y + shift where out_gate > 0 and exact zeros
    elsewhere, in one pass over y (none when every gate is 1 and there is no shift; where some
    gates are inactive, dynkernels._C.cpu_first.gate_scale_: conv2d and that pass took 0.94 -
    0.98x of the time of conv2d and the torch ops on the AMD EPYC (Zen 5, AVX-512) at 32, 128 ->
    128, 3x3, 16x16, density 0.8, NCHW and channels_last, 1 and 2 threads; with every gate
    active torch's one multiply is as fast). The output has conv2d's layout (channels_last for
    channels_last x, as the kernels give). Differentiable like the reference. CPU tensors (the
    gates are read on the host; out_range: out_gate's (min, max), where already read)."""
    # (every input active: no pass over x)
    if in_gate is not None and in_gate.numel() and _gate_summary(in_gate)[0] < in_gate.numel():
        x = x * (in_gate > 0).to(x.dtype)[:, :, None, None]
    y = conv2d_channels_last(x, weight, bias, stride, padding, dilation)  # (the reordered weight kept)
    n, c = out_gate.shape
    # (reshape: a third of [:, :, None, None]'s host time)
    g = (out_gate if out_gate.dtype == y.dtype else out_gate.to(y.dtype)).reshape(n, c, 1, 1)
    t = None if shift is None else shift.to(y.dtype).reshape(1, c, 1, 1)
    if out_range is None:
        out_range = _gate_summary(out_gate)[1:] if out_gate.numel() else (1, 1)
    lowest, highest = out_range
    every_active = bool(lowest > 0)  # (False where a gate is NaN: min gives NaN)
    all_one = every_active and lowest == 1 and highest == 1
    if torch.is_grad_enabled() and (y.requires_grad or g.requires_grad or (t is not None and t.requires_grad)):
        # out of place, so that autograd keeps what each backward needs
        if t is None and all_one and not g.requires_grad:
            return y
        scaled = y * g if t is None else torch.addcmul(t, y, g)
        if every_active:
            return scaled
        return torch.where((out_gate > 0).reshape(n, c, 1, 1), scaled, torch.zeros((), dtype=y.dtype))
    if t is None and all_one:
        return y
    # Some gates inactive: the C++ pass (scale, shift and exact zeros in one pass over y) where
    # torch's ops take three; with every gate active torch's one multiply is as fast.
    if (not every_active and _GATE_SCALE is not None
            and _GATE_SCALE(y, g.view(n, c), t if t is None else t.view(c)) is not NotImplemented):
        return y
    if not every_active:
        active = _host_view(out_gate) > 0
        g = g.masked_fill(torch.from_numpy(~active).reshape(n, c, 1, 1), 0)  # inactive gates 0 (also the negative and NaN ones)
    if t is not None:
        torch.addcmul(t, y, g, out=y)
    else:
        y.mul_(g)
    if every_active:
        return y
    # exact zeros (y * 0 would give -0 for negative y and NaN for an infinite one)
    n_idx, c_idx = (torch.from_numpy(i) for i in (~active).nonzero())  # the inactive (sample, channel) pairs
    if y.is_contiguous():
        y.view(y.shape[0] * y.shape[1], -1)[n_idx * y.shape[1] + c_idx] = 0
    else:
        y.permute(0, 2, 3, 1)[n_idx, :, :, c_idx] = 0
    return y
