"""channel_sparse_conv2d and GatedConv2d against dense cuDNN/oneDNN conv, masked dense (conv
then multiply by the gate, what FBS's code does) and naive PyTorch (one dense conv per
sample on its gathered active input channels and weight slices).

Two modes: "out" gates the output channels at density d (FLOPs x d); "in+out" also gates the
input channels at density d (FLOPs x d^2; the input's inactive channels hold zeros, as the
previous gated layer leaves them). Gates keep exactly round(d * C) channels per sample.

Headline: on a GPU, channel_sparse_conv2d (CUDA and Triton kernels each) against cuDNN in
bf16, channels_last, on the stride-1 3x3 and 1x1 layers of ResNet-18/50 at batch 128 and 64:
out 0.5 >= 1.6x, in+out 0.5 >= 2.8x, out 0.1 >= 5x, and backend "auto" at density 1 >= 0.95x.
On the CPU, GatedConv2d against nn.Conv2d (oneDNN), batch 32, 128 -> 128, 3x3, 16x16, fp32,
at 1 and 2 threads, NCHW and channels_last: out 0.5 >= 1.5x, in+out 0.5 >= 2.5x, out 0.25
>= 2.5x and out 1.0 >= 0.97x; and its training step (forward + backward) at out 0.5 and
in+out 0.5, without a target.
"""
from dataclasses import replace
from typing import List

import torch
import torch.nn.functional as F

import dynkernels

from .. import accounting
from ..harness import Case, Setup, Target, Unavailable, Variant
from . import _common
from ._common import CL, DTYPES, NCHW, RunConfig, backend_variants, cpu_threads, exact_gate, memory_format, randn, seeded

NAME = "channel_sparse_conv"

# (label, Cin, Cout, kernel, stride, padding, H=W): conv layers of ResNet-18/50/101 at 224x224.
FULL_SHAPES = [
    ("R18 layer1 3x3", 64, 64, 3, 1, 1, 56),
    ("R18 layer2 3x3", 128, 128, 3, 1, 1, 28),
    ("R18/R101 layer3 3x3", 256, 256, 3, 1, 1, 14),
    ("R18 layer4 3x3", 512, 512, 3, 1, 1, 7),
    ("R50/R101 layer1 1x1 reduce", 256, 64, 1, 1, 0, 56),
    ("R50/R101 layer3 1x1 expand", 256, 1024, 1, 1, 0, 14),
    ("R101 layer4 1x1 reduce", 2048, 512, 1, 1, 0, 7),
]
QUICK_SHAPES = [("small 3x3", 32, 32, 3, 1, 1, 16), ("small 1x1", 64, 64, 1, 1, 0, 16)]
SMOKE_SHAPES = [("tiny 3x3", 8, 8, 3, 1, 1, 6), ("tiny 1x1", 16, 8, 1, 1, 0, 5)]
# The headline's GPU layers: the stride-1 3x3 and 1x1 convolutions of ResNet-18 and ResNet-50.
RESNET_SHAPES = [
    ("R18/R50 layer1 3x3", 64, 64, 3, 1, 1, 56), ("R18/R50 layer2 3x3", 128, 128, 3, 1, 1, 28),
    ("R18/R50 layer3 3x3", 256, 256, 3, 1, 1, 14), ("R18/R50 layer4 3x3", 512, 512, 3, 1, 1, 7),
    ("R50 layer1 1x1 reduce", 256, 64, 1, 1, 0, 56), ("R50 layer1 1x1 expand", 64, 256, 1, 1, 0, 56),
    ("R50 layer2 1x1 reduce", 512, 128, 1, 1, 0, 28), ("R50 layer2 1x1 expand", 128, 512, 1, 1, 0, 28),
    ("R50 layer3 1x1 reduce", 1024, 256, 1, 1, 0, 14), ("R50 layer3 1x1 expand", 256, 1024, 1, 1, 0, 14),
    ("R50 layer4 1x1 reduce", 2048, 512, 1, 1, 0, 7), ("R50 layer4 1x1 expand", 512, 2048, 1, 1, 0, 7),
]
CPU_LAYER = ("GatedConv2d vs nn.Conv2d", 128, 128, 3, 1, 1, 16)


def _sweep(cfg: RunConfig):
    if cfg.smoke:
        return [("float32", 2, NCHW, SMOKE_SHAPES)], [0.5, 1.0]
    if cfg.full:
        # (dtype, batch, memory format, shapes): most important first, since a family that
        # runs out of its time budget loses the cases at the end.
        configs = [("bfloat16", 128, CL, FULL_SHAPES), ("bfloat16", 64, CL, FULL_SHAPES),
                   ("bfloat16", 128, NCHW, FULL_SHAPES), ("float16", 128, NCHW, FULL_SHAPES),
                   ("float32", 64, NCHW, FULL_SHAPES[:3])]
        return configs, [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    densities = [0.125, 0.25, 0.5, 0.75, 1.0]
    if cfg.gpu:
        return [("float16", 32, NCHW, QUICK_SHAPES + [FULL_SHAPES[2]])], densities
    return [("float32", 8, NCHW, QUICK_SHAPES), ("float32", 4, NCHW, [FULL_SHAPES[2]])], densities


def naive_channel_sparse_conv2d(x, weight, out_gate, in_gate, stride, padding):
    """Plain PyTorch: per sample, a dense conv of its active input channels with the weight
    rows of its active output channels (index lists read on the host once per call)."""
    n = x.shape[0]
    ho = accounting.conv2d_out_size(x.shape[2], weight.shape[2], stride, padding)
    wo = accounting.conv2d_out_size(x.shape[3], weight.shape[3], stride, padding)
    y = x.new_zeros((n, weight.shape[0], ho, wo))
    outs = [row.nonzero().squeeze(1) for row in (out_gate > 0).cpu()]
    ins = [row.nonzero().squeeze(1) for row in (in_gate > 0).cpu()] if in_gate is not None else None
    lists = outs + (ins or [])
    on_device = torch.cat(lists).to(x.device, non_blocking=True).split([len(t) for t in lists])
    for i in range(n):
        o = on_device[i]
        w = weight.index_select(0, o)
        xi = x[i : i + 1]
        if ins is not None:
            c = on_device[n + i]
            w, xi = w.index_select(1, c), xi.index_select(1, c)
        yi = F.conv2d(xi, w, None, stride, padding)[0]
        y[i].index_copy_(0, o, yi * out_gate[i, o].to(y.dtype)[:, None, None])
    return y


def _gated_conv2d_variant(cin, cout, k, stride, padding, weight_of, fmt, density=None) -> Variant:
    def build():
        cls = getattr(_common.nn_modules(), "GatedConv2d", None)
        if cls is None:
            raise Unavailable("dynkernels.nn.GatedConv2d is not in this build")
        w = weight_of()
        m = cls(cin, cout, k, stride=stride, padding=padding, bias=False, density=density).to(device=w.device, dtype=w.dtype)
        m.weight.data.copy_(w)
        m = m.to(memory_format=memory_format(fmt)).eval()
        return lambda x, w, og, ig: m(x, og, ig)

    return Variant("GatedConv2d", build, backend="auto", compare_to="reference", capturable=True)


def _case(cfg: RunConfig, shape, dtype, batch, fmt, mode, d, threads=None) -> Case:
    label, cin, cout, k, stride, padding, hw = shape
    shape_str = f"{label}: {cin}->{cout} k{k} s{stride} @{hw}x{hw}"
    base_key = (shape_str, dtype, batch, fmt, threads)
    config = f"{shape_str}, N={batch}, {dtype}, {fmt}, {mode}" + (f", {threads} thread{'s' * (threads > 1)}" if threads else "")
    ho = accounting.conv2d_out_size(hw, k, stride, padding)
    # The gates have exactly d of each sample's channels active, so the caller knows the active
    # FLOP fraction on the host: the density hint that backend="auto" may use.
    hint = d * d if mode == "in+out" else d

    def setup():
        dt, dev, mf = DTYPES[dtype], cfg.device, memory_format(fmt)
        g, gd = seeded(4), seeded(4, dev)
        weight = (randn((cout, cin, k, k), dev, dt, gd) / (cin * k * k) ** 0.5).contiguous(memory_format=mf)
        sets = []
        for _ in range(cfg.input_sets):
            x = randn((batch, cin, hw, hw), dev, dt, gd)
            og = exact_gate(batch, cout, d, dev, dtype=dt, generator=g)
            ig = exact_gate(batch, cin, d, dev, dtype=dt, generator=g) if mode == "in+out" else None
            if ig is not None:
                x = x * (ig > 0).to(dt)[:, :, None, None]
            sets.append((x.contiguous(memory_format=mf), weight, og, ig))
        og, ig = sets[0][2], sets[0][3]
        el = weight.element_size()
        active_in = float((ig > 0).sum()) if ig is not None else batch * cin
        out_and_weight = (batch * cout * ho * ho + weight.numel()) * el
        variants = [
            Variant("dense", lambda: lambda x, w, og, ig: F.conv2d(x, w, None, stride, padding),
                    work="dense", shared_key=base_key + ("dense",), capturable=True),
            Variant("masked", lambda: lambda x, w, og, ig: F.conv2d(x, w, None, stride, padding) * og[:, :, None, None],
                    work="dense", shared_key=base_key + ("masked",), compare_to="reference", capturable=True),
            Variant("naive", lambda: lambda x, w, og, ig: naive_channel_sparse_conv2d(x, w, og, ig, stride, padding),
                    compare_to="reference"),
        ] + backend_variants(
            "channel_sparse_conv2d", cfg,
            lambda b: lambda x, w, og, ig: dynkernels.ops.channel_sparse_conv2d(
                x, w, None, og, ig, stride, padding, backend=b, density=hint),
            compare_to="reference",
        ) + [_gated_conv2d_variant(cin, cout, k, stride, padding, lambda: weight, fmt, hint)]
        return Setup(sets, variants, dense_flops=accounting.conv2d_flops(batch * cout, cin, (k, k), (ho, ho)),
                     sparse_flops=accounting.channel_sparse_conv_flops(og, ig, cin, (k, k), (ho, ho)),
                     dense_bytes=batch * cin * hw * hw * el + out_and_weight, sparse_bytes=active_in * hw * hw * el + out_and_weight)

    return Case(NAME, "channel_sparse_conv2d", config, shape_str, batch, dtype, d, setup, layout=fmt, mode=mode,
                threads=threads)


def sweep(cfg: RunConfig) -> List[Case]:
    configs, densities = _sweep(cfg)
    out = []
    for dtype, batch, fmt, shapes in configs:
        for shape in shapes:
            for mode in ("out", "in+out"):
                out += [_case(cfg, shape, dtype, batch, fmt, mode, d) for d in densities]
    return out


def gpu_layers_vs_cudnn(cfg: RunConfig) -> List[Case]:
    """channel_sparse_conv2d, CUDA and Triton kernels each, against cuDNN on ResNet-18/50 layers."""
    shapes, batches, dtype = (SMOKE_SHAPES, [2], "float32") if cfg.smoke else (RESNET_SHAPES, [128, 64], "bfloat16")
    out = []
    for batch in batches:  # batch 128 over every layer first: a step past its budget loses the end
        for shape in shapes:
            for mode, d, need in (("out", 0.5, 1.6), ("in+out", 0.5, 2.8), ("out", 0.1, 5.0)):
                targets = {b: Target(f"channel_sparse_conv2d {mode} {d:g} over cuDNN, {b} kernel", need)
                           for b in ("cuda", "triton")}
                out.append(replace(_case(cfg, shape, dtype, batch, CL, mode, d), variants=["dense", "cuda", "triton"],
                                   targets=targets))
            out.append(replace(_case(cfg, shape, dtype, batch, CL, "out", 1.0), variants=["dense", "auto"],
                               targets={"auto": Target("channel_sparse_conv2d auto at density 1 over cuDNN", 0.95)}))
    return out


def cpu_layer_vs_onednn(cfg: RunConfig) -> List[Case]:
    """GatedConv2d against nn.Conv2d on the CPU, 1 and 2 threads, NCHW and channels_last. Out
    0.8 has no target: it shows "auto" near its crossover, where with channels_last input it
    runs dense execution with some gates inactive (the conv, then the C++ pass that scales and
    zeroes) on most CPUs, and the kernel on those with a higher crossover (AMD's Zen 5)."""
    shape, batch = (SMOKE_SHAPES[0], 2) if cfg.smoke else (CPU_LAYER, 32)
    out = []
    for threads in cpu_threads(cfg):
        for fmt in (NCHW, CL):
            for mode, d, need in (("out", 0.5, 1.5), ("in+out", 0.5, 2.5), ("out", 0.25, 2.5), ("out", 0.8, None),
                                  ("out", 1.0, 0.97)):
                targets = {} if need is None else {"GatedConv2d": Target(
                    f"GatedConv2d {mode} {d} over nn.Conv2d (CPU; 1 and 2 threads, NCHW and channels_last)", need)}
                out.append(replace(_case(cfg, shape, "float32", batch, fmt, mode, d, threads=threads),
                                   variants=["dense", "GatedConv2d"], targets=targets))
    return out


def _training_case(cfg: RunConfig, shape, batch, fmt, mode, d, threads) -> Case:
    """One training step (forward, then the gradients of x, weight and bias) of GatedConv2d
    against nn.Conv2d. Ideal: the weight gradient is dense, the forward and (stride 1 on the
    CPU) the input gradient cost only the active channel pairs."""
    label, cin, cout, k, stride, padding, hw = shape
    shape_str = f"{label} training step: {cin}->{cout} k{k} s{stride} @{hw}x{hw}"
    config = f"{shape_str}, N={batch}, float32, {fmt}, {mode}, {threads} thread{'s' * (threads > 1)}"
    ho = accounting.conv2d_out_size(hw, k, stride, padding)

    def setup():
        g, mf = seeded(9), memory_format(fmt)
        torch.manual_seed(9)
        conv = torch.nn.Conv2d(cin, cout, k, stride, padding).to(cfg.device, memory_format=mf)
        hint = d * d if mode == "in+out" else d  # exact gates: the caller knows the active fraction
        gated = _common.nn_modules().GatedConv2d.from_conv(conv, density=hint)  # the same parameters
        sets = []
        for _ in range(cfg.input_sets):
            og = exact_gate(batch, cout, d, cfg.device, generator=g)
            ig = exact_gate(batch, cin, d, cfg.device, generator=g) if mode == "in+out" else None
            x = torch.randn(batch, cin, hw, hw, generator=g).to(cfg.device)
            if ig is not None:
                x = x * (ig > 0)[:, :, None, None]
            grad_y = torch.randn(batch, cout, ho, ho, generator=g).to(cfg.device)
            sets.append((x.contiguous(memory_format=mf).requires_grad_(), og, ig, grad_y))

        def step(forward):
            def fn(x, og, ig, grad_y):
                conv.zero_grad(set_to_none=True)
                x.grad = None
                forward(x, og, ig).backward(grad_y)
                return x.grad, conv.weight.grad, conv.bias.grad
            return lambda: fn

        reference = step(lambda x, og, ig: dynkernels.ops.channel_sparse_conv2d(
            x, conv.weight, conv.bias, og, ig, stride, padding, backend="torch"))
        variants = [Variant("dense", step(lambda x, og, ig: conv(x)), work="dense"), Variant("reference", reference),
                    Variant("GatedConv2d", step(lambda x, og, ig: gated(x, og, ig)), backend="auto", compare_to="reference")]
        dense = accounting.conv2d_flops(batch * cout, cin, (k, k), (ho, ho))
        sparse = accounting.channel_sparse_conv_flops(sets[0][1], sets[0][2], cin, (k, k), (ho, ho))
        return Setup(sets, variants, dense_flops=3 * dense, sparse_flops=2 * sparse + dense)

    return Case(NAME, "GatedConv2d training step", config, shape_str, batch, "float32", d, setup, layout=fmt, mode=mode,
                threads=threads, variants=["dense", "GatedConv2d"], grad=True)


def cpu_layer_training(cfg: RunConfig) -> List[Case]:
    """GatedConv2d forward + backward against nn.Conv2d on the CPU (no target: the dense weight
    gradient bounds the gain)."""
    shape, batch = (SMOKE_SHAPES[0], 2) if cfg.smoke else (CPU_LAYER, 32)
    return [_training_case(cfg, shape, batch, NCHW, mode, 0.5, threads) for threads in cpu_threads(cfg)
            for mode in ("out", "in+out")]


def headline(cfg: RunConfig) -> List[Case]:
    cpu = cpu_layer_vs_onednn(cfg) + cpu_layer_training(cfg) if cfg.cpu_targets else []
    return (gpu_layers_vs_cudnn(cfg) if cfg.gpu_targets else []) + cpu
