"""channel_sparse_conv2d and GatedConv2d against dense cuDNN/ATen conv, masked dense (conv
then multiply by the gate, what FBS's code does) and naive PyTorch (one dense conv per
sample on its gathered active input channels and weight slices).

Two modes: "out" gates the output channels at density d (FLOPs x d); "in+out" also gates the
input channels at density d (FLOPs x d^2; the input's inactive channels hold zeros, as the
previous gated layer leaves them). Gates keep exactly round(d * C) channels per sample.
"""
from typing import List

import torch
import torch.nn.functional as F

import dynkernels

from .. import accounting
from ..harness import Case, Setup, Unavailable, Variant
from . import _common
from ._common import DTYPES, RunConfig, backend_variants, exact_gate, randn, seeded

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


def _sweep(cfg: RunConfig):
    if cfg.full:
        # (dtype, batch, memory format, shapes): most important first, since a family that
        # runs out of its time budget loses the cases at the end.
        # Issue 3's GPU configuration (bf16, channels_last, batch 128 and 64) first.
        configs = [("bfloat16", 128, "channels_last", FULL_SHAPES), ("bfloat16", 64, "channels_last", FULL_SHAPES),
                   ("bfloat16", 128, "contiguous", FULL_SHAPES), ("float16", 128, "contiguous", FULL_SHAPES),
                   ("float32", 64, "contiguous", FULL_SHAPES[:3])]
        return configs, [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    densities = [0.125, 0.25, 0.5, 0.75, 1.0]
    if cfg.gpu:
        return [("float16", 32, "contiguous", QUICK_SHAPES + [FULL_SHAPES[2]])], densities
    return [("float32", 8, "contiguous", QUICK_SHAPES), ("float32", 4, "contiguous", [FULL_SHAPES[2]])], densities


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


def _gated_conv2d_variant(cin, cout, k, stride, padding, weight_of, fmt) -> Variant:
    def build():
        cls = getattr(_common.nn_modules(), "GatedConv2d", None)
        if cls is None:
            raise Unavailable("dynkernels.nn.GatedConv2d is not in this build")
        w = weight_of()
        m = cls(cin, cout, k, stride=stride, padding=padding, bias=False).to(device=w.device, dtype=w.dtype)
        m.weight.data.copy_(w)
        if fmt == "channels_last":
            m = m.to(memory_format=torch.channels_last)
        m.eval()
        return lambda x, w, og, ig: m(x, og, ig)

    return Variant("GatedConv2d", build, backend="auto", compare_to="reference")


def _case(cfg: RunConfig, shape, dtype, batch, fmt, mode, d) -> Case:
    label, cin, cout, k, stride, padding, hw = shape
    shape_str = f"{label}: {cin}->{cout} k{k} s{stride} @{hw}x{hw}"
    base_key = (shape_str, dtype, batch, fmt)
    config = f"{shape_str}, N={batch}, {dtype}, {fmt}, {mode}"
    ho = accounting.conv2d_out_size(hw, k, stride, padding)

    def setup():
        dt, dev = DTYPES[dtype], cfg.device
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
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
        dense = accounting.conv2d_flops(batch * cout, cin, (k, k), (ho, ho))
        sparse = accounting.channel_sparse_conv_flops(sets[0][2], sets[0][3], cin, (k, k), (ho, ho))
        variants = [
            Variant("dense", lambda: lambda x, w, og, ig: F.conv2d(x, w, None, stride, padding),
                    work="dense", shared_key=base_key + ("dense",)),
            Variant("masked", lambda: lambda x, w, og, ig: F.conv2d(x, w, None, stride, padding) * og[:, :, None, None],
                    work="dense", shared_key=base_key + ("masked",), compare_to="reference"),
            Variant("naive", lambda: lambda x, w, og, ig: naive_channel_sparse_conv2d(x, w, og, ig, stride, padding),
                    compare_to="reference"),
        ] + backend_variants(
            "channel_sparse_conv2d", dev,
            lambda b: lambda x, w, og, ig: dynkernels.ops.channel_sparse_conv2d(x, w, None, og, ig, stride, padding, backend=b),
            compare_to="reference",
        ) + [_gated_conv2d_variant(cin, cout, k, stride, padding, lambda: weight, fmt)]
        return Setup(sets, variants, dense_flops=dense, sparse_flops=sparse)

    return Case(NAME, "channel_sparse_conv2d", config, shape_str, batch, dtype, d, setup, memory_format=fmt, mode=mode)


def cases(cfg: RunConfig) -> List[Case]:
    configs, densities = _sweep(cfg)
    out = []
    for dtype, batch, fmt, shapes in configs:
        for shape in shapes:
            for mode in ("out", "in+out"):
                out += [_case(cfg, shape, dtype, batch, fmt, mode, d) for d in densities]
    return out
