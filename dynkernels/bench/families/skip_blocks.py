"""Sample-sparse residual blocks: SkipBlock (sparse and masked execution) against the dense
block, the masked dense block (every sample runs, then x + g * F(x), what BlockDrop's code
does) and naive PyTorch (index_select the kept samples -> block -> index_add_ back).

Gates are 0/1 per sample with exactly round(d * N) ones. FLOPs are the block's convolutions
(counted by hooks on one sample) times the samples that run them.
"""
from typing import List

import torch
import torch.nn as nn

from .. import accounting
from ..harness import Case, Setup, Unavailable, Variant
from . import _common
from ._common import DTYPES, OUR_BACKENDS, RunConfig, randn, resolved, sample_gate, seeded

NAME = "skip_blocks"


def basic_block(c: int) -> nn.Module:
    """CIFAR ResNet residual function: conv3x3-BN-ReLU-conv3x3-BN."""
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
        nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
    )


def bottleneck_block(c: int) -> nn.Module:
    """ImageNet ResNet-50/101 bottleneck residual function: 1x1 reduce, 3x3, 1x1 expand (4x)."""
    m = c // 4
    return nn.Sequential(
        nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU(inplace=True),
        nn.Conv2d(m, m, 3, padding=1, bias=False), nn.BatchNorm2d(m), nn.ReLU(inplace=True),
        nn.Conv2d(m, c, 1, bias=False), nn.BatchNorm2d(c),
    )


# (label, block factory, channels, H=W)
FULL_BLOCKS = [
    ("R110 stage1 basic", basic_block, 16, 32),
    ("R110 stage2 basic", basic_block, 32, 16),
    ("R110 stage3 basic", basic_block, 64, 8),
    ("R101 layer1 bottleneck", bottleneck_block, 256, 56),
    ("R101 layer3 bottleneck", bottleneck_block, 1024, 14),
]
QUICK_BLOCKS = [("R110 stage1 basic", basic_block, 16, 32), ("R101 layer3 bottleneck", bottleneck_block, 1024, 14)]


def _sweep(cfg: RunConfig):
    if cfg.full:
        cifar, imagenet = FULL_BLOCKS[:3], FULL_BLOCKS[3:]
        configs = [("bfloat16", 128, cifar + imagenet[1:]), ("float16", 128, cifar + imagenet[1:]),
                   ("bfloat16", 64, FULL_BLOCKS), ("float32", 64, cifar)]
        return configs, [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    if cfg.gpu:
        return [("float16", 64, QUICK_BLOCKS)], [0.1, 0.25, 0.5, 1.0]
    return [("float32", 16, QUICK_BLOCKS[:1]), ("float32", 4, QUICK_BLOCKS[1:])], [0.125, 0.25, 0.5, 0.75, 1.0]


def _random_bn(block: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BN statistics, so a wrong sample mapping shows in the outputs."""
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.25)


def naive_skip(block, x, gate):
    """x with F applied to the kept samples only: index_select -> block -> index_add_."""
    keep = gate.nonzero().squeeze(1)
    return x.index_add(0, keep, block(x.index_select(0, keep)))


def _skipblock_variant(name, block, execution, backend, device, compare_to) -> Variant:
    def build():
        cls = getattr(_common.nn_modules(), "SkipBlock", None)
        if cls is None:
            raise Unavailable("dynkernels.nn.SkipBlock is not in this build")
        if execution == "sparse":
            if backend == "triton" and device.type == "cpu":
                raise Unavailable("Triton is timed on GPUs only")
            resolved("gather_rows", backend, device)
        m = cls(block, execution=execution, backend=backend).eval()
        return lambda x, gate: m(x, gate)

    label = "pytorch" if execution == "masked" else backend
    return Variant(name, build, backend=label, work="dense" if execution == "masked" else "sparse", compare_to=compare_to)


def _case(cfg: RunConfig, spec, dtype, batch, d) -> Case:
    label, factory, c, hw = spec
    shape_str = f"{label}: {c}ch @{hw}x{hw}"
    config = f"{shape_str}, N={batch}, {dtype}"

    def setup():
        dt, dev = DTYPES[dtype], cfg.device
        g, gd = seeded(5), seeded(5, dev)
        torch.manual_seed(5)
        block = factory(c)
        _random_bn(block, g)
        block = block.to(dev, dt).eval()
        sets = []
        for _ in range(cfg.input_sets):
            x = randn((batch, c, hw, hw), dev, dt, gd)
            sets.append((x, sample_gate(batch, d, dev, dtype=dt, generator=g)))
        per_sample = accounting.module_flops_per_sample(block, sets[0][0])
        k = int((sets[0][1] > 0).sum())
        variants = [
            Variant("dense", lambda: lambda x, gate: x + block(x), work="dense", shared_key=(config, "dense")),
            Variant("masked", lambda: lambda x, gate: x + gate.view(-1, 1, 1, 1) * block(x), work="dense",
                    shared_key=(config, "masked")),
            Variant("naive", lambda: lambda x, gate: naive_skip(block, x, gate), compare_to="masked"),
            _skipblock_variant("SkipBlock-masked", block, "masked", "auto", dev, None),
        ] + [
            _skipblock_variant(f"SkipBlock-{b}", block, "sparse", b, dev, "SkipBlock-masked") for b in OUR_BACKENDS
        ]
        return Setup(sets, variants, dense_flops=batch * per_sample, sparse_flops=k * per_sample)

    return Case(NAME, "SkipBlock", config, shape_str, batch, dtype, d, setup)


def cases(cfg: RunConfig) -> List[Case]:
    configs, densities = _sweep(cfg)
    # a density below one sample per batch would run one sample anyway: not a point of the sweep
    return [_case(cfg, spec, dtype, batch, d) for dtype, batch, specs in configs for spec in specs
            for d in densities if d * batch >= 1]
