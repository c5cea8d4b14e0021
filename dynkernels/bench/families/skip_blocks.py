"""Sample-sparse residual blocks: SkipBlock (sparse and masked execution) against the dense
block, the masked dense block (every sample runs, then block(x) * m + x * (1 - m), what
BlockDrop's code does) and naive PyTorch (index_select the kept samples -> block ->
index_copy back).

A block is a whole residual block, relu(x + F(x)) (BlockDrop's semantics: a kept sample
gets the block's output, a dropped one passes x through), in eval mode (BatchNorm with
running statistics). `SkipBlock-<backend>` compacts its own gate in every call (one host
sync per call); `SkipBlock-<backend>+plan` gets the row of a SkipPlan built outside the
timed call, as BlockDrop's models do for all their blocks once per forward (no sync).
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


class Residual(nn.Module):
    """relu(x + branch(x)): a residual block with an identity shortcut."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return torch.relu(x + self.branch(x))


def basic_block(c: int) -> nn.Module:
    """CIFAR ResNet basic block: F = conv3x3-BN-ReLU-conv3x3-BN."""
    return Residual(nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
        nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
    ))


def bottleneck_block(c: int) -> nn.Module:
    """ImageNet ResNet-50/101 bottleneck block: F = 1x1 reduce, 3x3, 1x1 expand (4x)."""
    m = c // 4
    return Residual(nn.Sequential(
        nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU(inplace=True),
        nn.Conv2d(m, m, 3, padding=1, bias=False), nn.BatchNorm2d(m), nn.ReLU(inplace=True),
        nn.Conv2d(m, c, 1, bias=False), nn.BatchNorm2d(c),
    ))


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
    """[(dtype, batch, memory format, blocks)], densities; most important first (a family
    past its time budget loses the cases at the end)."""
    if cfg.full:
        cifar, imagenet = FULL_BLOCKS[:3], FULL_BLOCKS[3:]
        configs = [("bfloat16", 128, "channels_last", imagenet[::-1]), ("bfloat16", 128, "contiguous", cifar + imagenet[1:]),
                   ("float16", 128, "contiguous", cifar + imagenet[1:]), ("bfloat16", 64, "contiguous", FULL_BLOCKS),
                   ("float32", 64, "contiguous", cifar)]
        return configs, [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    if cfg.gpu:
        return [("bfloat16", 64, "channels_last", QUICK_BLOCKS)], [0.1, 0.25, 0.5, 1.0]
    return ([("float32", 16, "contiguous", QUICK_BLOCKS[:1]), ("float32", 4, "contiguous", QUICK_BLOCKS[1:])],
            [0.125, 0.25, 0.5, 0.75, 1.0])


def _random_bn(block: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BN statistics, so a wrong sample mapping shows in the outputs."""
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.25)


def naive_skip(block, x, gate):
    """block(x) on the kept samples only, x elsewhere: index_select -> block -> index_copy (a host sync)."""
    keep = gate.nonzero().squeeze(1)
    return x.index_copy(0, keep, block(x.index_select(0, keep)))


def _skipblock_variant(name, block, execution, backend, device, compare_to, with_plan=False) -> Variant:
    """SkipBlock in one execution and backend; with_plan: forward gets the input set's
    precomputed SkipPlan row (no compact and no host sync in the timed call)."""
    def build():
        cls = getattr(_common.nn_modules(), "SkipBlock", None)
        if cls is None:
            raise Unavailable("dynkernels.nn.SkipBlock is not in this build")
        if execution == "sparse":
            if backend == "triton" and device.type == "cpu":
                raise Unavailable("Triton is timed on GPUs only")
            resolved("gather_rows", backend, device)
        m = cls(block, execution=execution, backend=backend).eval()
        if with_plan:
            return lambda x, gate, plan: m(x, gate, plan=plan)
        return lambda x, gate, plan: m(x, gate)

    label = "pytorch" if execution == "masked" else backend
    return Variant(name, build, backend=label, work="dense" if execution == "masked" else "sparse", compare_to=compare_to)


def _plan_row(gate: torch.Tensor):
    """Row 0 of a SkipPlan of this gate (built once, outside any timed call), or None."""
    plan_cls = getattr(_common.nn_modules(), "SkipPlan", None)
    return None if plan_cls is None else plan_cls(gate.unsqueeze(1))[0]


PLAN_BACKENDS = ("cpu", "triton", "cuda")  # timed with a precomputed plan too


def _case(cfg: RunConfig, spec, dtype, batch, fmt, d) -> Case:
    label, factory, c, hw = spec
    shape_str = f"{label}: {c}ch @{hw}x{hw}"
    config = f"{shape_str}, N={batch}, {dtype}, {fmt}"

    def setup():
        dt, dev = DTYPES[dtype], cfg.device
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        g, gd = seeded(5), seeded(5, dev)
        torch.manual_seed(5)
        block = factory(c)
        _random_bn(block, g)
        block = block.to(dev, dt).to(memory_format=mf).eval()
        sets = []
        for _ in range(cfg.input_sets):
            x = randn((batch, c, hw, hw), dev, dt, gd).contiguous(memory_format=mf)
            gate = sample_gate(batch, d, dev, dtype=dt, generator=g)
            sets.append((x, gate, _plan_row(gate)))
        per_sample = accounting.module_flops_per_sample(block, sets[0][0])
        k = int((sets[0][1] > 0).sum())

        def masked(x, gate, plan):
            m = gate.view(-1, 1, 1, 1)
            return block(x) * m + x * (1 - m)

        variants = [
            Variant("dense", lambda: lambda x, gate, plan: block(x), work="dense", shared_key=(config, "dense")),
            Variant("masked", lambda: masked, work="dense", shared_key=(config, "masked")),
            Variant("naive", lambda: lambda x, gate, plan: naive_skip(block, x, gate), compare_to="masked"),
            _skipblock_variant("SkipBlock-masked", block, "masked", "auto", dev, None),
        ] + [
            _skipblock_variant(f"SkipBlock-{b}", block, "sparse", b, dev, "SkipBlock-masked") for b in OUR_BACKENDS
        ] + [
            _skipblock_variant(f"SkipBlock-{b}+plan", block, "sparse", b, dev, "SkipBlock-masked", with_plan=True)
            for b in PLAN_BACKENDS if (b == "cpu") == (dev.type == "cpu")  # the backends that can run here
        ]
        if sets[0][2] is None:
            variants = [v for v in variants if not v.name.endswith("+plan")]
        return Setup(sets, variants, dense_flops=batch * per_sample, sparse_flops=k * per_sample)

    return Case(NAME, "SkipBlock", config, shape_str, batch, dtype, d, setup, memory_format=fmt)


def cases(cfg: RunConfig) -> List[Case]:
    configs, densities = _sweep(cfg)
    # a density below one sample per batch would run one sample anyway: not a point of the sweep
    return [_case(cfg, spec, dtype, batch, fmt, d) for dtype, batch, fmt, specs in configs for spec in specs
            for d in densities if d * batch >= 1]
