"""Sample-sparse residual blocks: SkipBlock (sparse and masked execution) against the dense
block, the masked dense block (every sample runs, then block(x) * m + x * (1 - m), what
BlockDrop's code does) and naive PyTorch (index_select the kept samples -> block ->
index_copy back).

A block is a whole residual block, relu(x + F(x)) (BlockDrop's semantics: a kept sample
gets the block's output, a dropped one passes x through), in eval mode (BatchNorm with
running statistics). `SkipBlock-<backend>` compacts its own gate in every call (one host
sync per call); `SkipBlock-<backend>+plan` gets the row of a SkipPlan built outside the
timed call, as BlockDrop's models do for all their blocks once per forward (no sync).
`+graphs`: the same module with cuda_graphs=True (GPU only): the block on its compact batch
(the kept count rounded up to a multiple of 8) replayed from one CUDA graph per bucket size;
its first call, which captures, is the row's first-call time. `SkipBlock-<b>+graphs` against
`SkipBlock-<b>+plan+graphs` is the per-block cost of a gate computed on the device (L-Net,
SkipNet, ConvNet-AIG): one compact and one 4-byte device-to-host copy.
Gates are 0/1 per sample with exactly round(d * N) ones. FLOPs are the block's (counted by
dynkernels.flops.count on one sample) times the samples that run it.

Headline: on a GPU, the ResNet-101 bottlenecks (layer3, 1024 channels at 14x14, first: the
target block) at batch 128, bf16, channels_last, keep 0.5 (>= 1.8x over the dense block) and
1.0 (>= 0.97x), eager and with cuda_graphs, with CUDA-graph replay of the whole call (where it
reads nothing on the host) and host time per call. On the CPU, a chain of 4
basic blocks (64 channels, 16x16, batch 64, each block kept by half the samples) under
SkipSequential against its masked execution (>= 1.6x), at 1 and 2 threads, and the host
overhead of a SkipBlock given its plan on tiny tensors (at most 10 us above its block, under
torch.no_grad() and torch.inference_mode()).
"""
from dataclasses import replace
from typing import List

import torch
import torch.nn as nn

from ... import flops
from ..harness import HOST_CALLS, Case, Setup, Target, Unavailable, Variant
from . import _common
from ._common import CL, DTYPES, NCHW, OUR_BACKENDS, RunConfig, cpu_threads, memory_format, randn, resolved, sample_gate, seeded

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
SMOKE_BLOCKS = [("tiny basic", basic_block, 4, 5), ("tiny bottleneck", bottleneck_block, 16, 4)]
# The headline's GPU blocks: ResNet-101's identity-shortcut bottlenecks, the target block first.
R101_BOTTLENECKS = [("R101 layer3 bottleneck", bottleneck_block, 1024, 14), ("R101 layer1 bottleneck", bottleneck_block, 256, 56),
                    ("R101 layer2 bottleneck", bottleneck_block, 512, 28), ("R101 layer4 bottleneck", bottleneck_block, 2048, 7)]


def _sweep(cfg: RunConfig):
    """[(dtype, batch, memory format, blocks)], densities; most important first (a family
    past its time budget loses the cases at the end)."""
    if cfg.smoke:
        return [("float32", 4, NCHW, SMOKE_BLOCKS)], [0.5, 1.0]
    if cfg.full:
        cifar, imagenet = FULL_BLOCKS[:3], FULL_BLOCKS[3:]
        configs = [("bfloat16", 128, CL, imagenet[::-1]), ("bfloat16", 128, NCHW, cifar + imagenet[1:]),
                   ("float16", 128, NCHW, cifar + imagenet[1:]), ("bfloat16", 64, NCHW, FULL_BLOCKS),
                   ("float32", 64, NCHW, cifar)]
        return configs, [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    if cfg.gpu:
        return [("bfloat16", 64, CL, QUICK_BLOCKS)], [0.1, 0.25, 0.5, 1.0]
    return ([("float32", 16, NCHW, QUICK_BLOCKS[:1]), ("float32", 4, NCHW, QUICK_BLOCKS[1:])],
            [0.125, 0.25, 0.5, 0.75, 1.0])


def _random_bn(block: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BN statistics, so a wrong sample mapping shows in the outputs."""
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.25)


def _make_block(factory, c: int, dev, dt, fmt, g: torch.Generator) -> nn.Module:
    block = factory(c)
    _random_bn(block, g)
    return block.to(dev, dt).to(memory_format=memory_format(fmt)).eval()


def naive_skip(block, x, gate):
    """block(x) on the kept samples only, x elsewhere: index_select -> block -> index_copy (a host sync)."""
    keep = gate.nonzero().squeeze(1)
    return x.index_copy(0, keep, block(x.index_select(0, keep)))


def _skipblock_variant(name, block, execution, backend, cfg, compare_to, with_plan=False, graphs=False) -> Variant:
    """SkipBlock in one execution and backend; with_plan: forward gets the input set's
    precomputed SkipPlan row (no compact and no host sync in the timed call); graphs: with
    cuda_graphs=True (a fresh module: its first call captures)."""
    def build():
        cls = getattr(_common.nn_modules(), "SkipBlock", None)
        if cls is None:
            raise Unavailable("dynkernels.nn.SkipBlock is not in this build")
        if graphs and not cfg.gpu:
            raise Unavailable("CUDA graphs need a GPU")
        b = resolved("gather_rows", backend, cfg) if execution == "sparse" else backend
        m = cls(block, execution=execution, backend=b, cuda_graphs=graphs).eval()
        if with_plan:
            return lambda x, gate, plan: m(x, gate, plan)
        return lambda x, gate, plan: m(x, gate)

    label = "pytorch" if execution == "masked" else backend
    # a call that replays graphs is not captured again around them
    return Variant(name, build, backend=label, work="dense" if execution == "masked" else "sparse",
                   compare_to=compare_to, capturable=(with_plan or execution == "masked") and not graphs)


def _case(cfg: RunConfig, spec, dtype, batch, fmt, d, graphs=False) -> Case:
    """graphs: also the SkipBlock variants with cuda_graphs (the headline's)."""
    label, factory, c, hw = spec
    shape_str = f"{label}: {c}ch @{hw}x{hw}"
    config = f"{shape_str}, N={batch}, {dtype}, {fmt}"

    def setup():
        dt, dev = DTYPES[dtype], cfg.device
        g, gd = seeded(5), seeded(5, dev)
        torch.manual_seed(5)
        block = _make_block(factory, c, dev, dt, fmt, g)
        plan_cls = _common.nn_modules().SkipPlan
        sets = []
        for _ in range(cfg.input_sets):
            x = randn((batch, c, hw, hw), dev, dt, gd).contiguous(memory_format=memory_format(fmt))
            gate = sample_gate(batch, d, dev, dtype=dt, generator=g)
            sets.append((x, gate, plan_cls(gate.unsqueeze(1))[0]))  # the plan: built once, outside any timed call
        per_sample = flops.count(block, sets[0][0][:1])
        k = int((sets[0][1] > 0).sum())

        def masked(x, gate, plan):
            m = gate.view(-1, 1, 1, 1)
            return block(x) * m + x * (1 - m)

        variants = [
            Variant("dense", lambda: lambda x, gate, plan: block(x), work="dense", shared_key=(config, "dense"), capturable=True),
            Variant("masked", lambda: masked, work="dense", shared_key=(config, "masked"), capturable=True),
            Variant("naive", lambda: lambda x, gate, plan: naive_skip(block, x, gate), compare_to="masked"),
            _skipblock_variant("SkipBlock-masked", block, "masked", "auto", cfg, None),
        ] + [
            _skipblock_variant(f"SkipBlock-{b}", block, "sparse", b, cfg, "SkipBlock-masked") for b in OUR_BACKENDS
        ] + [
            _skipblock_variant(f"SkipBlock-{b}+plan", block, "sparse", b, cfg, "SkipBlock-masked", with_plan=True)
            for b in ("cpu", "triton", "cuda")
        ] + [
            _skipblock_variant(f"SkipBlock-{b}{p}+graphs", block, "sparse", b, cfg, "SkipBlock-masked", with_plan=p == "+plan",
                               graphs=True)
            for b in ("triton", "cuda") for p in ("+plan", "") if graphs
        ]
        return Setup(sets, variants, dense_flops=batch * per_sample, sparse_flops=k * per_sample)

    return Case(NAME, "SkipBlock", config, shape_str, batch, dtype, d, setup, layout=fmt)


def sweep(cfg: RunConfig) -> List[Case]:
    configs, densities = _sweep(cfg)
    # a density below one sample per batch would run one sample anyway: not a point of the sweep
    return [_case(cfg, spec, dtype, batch, fmt, d) for dtype, batch, fmt, specs in configs for spec in specs
            for d in densities if d * batch >= 1]


def gpu_bottlenecks(cfg: RunConfig) -> List[Case]:
    """SkipBlock with and without a plan, eager and with CUDA graphs, CUDA and Triton kernels,
    on ResNet-101 bottlenecks (each plan variant before its own-gate twin)."""
    blocks, batch, dtype = (SMOKE_BLOCKS[1:], 4, "float32") if cfg.smoke else (R101_BOTTLENECKS, 128, "bfloat16")
    variants = ["dense", "masked"] + [f"SkipBlock-{b}{p}{g}" for b in ("cuda", "triton") for g in ("", "+graphs")
                                      for p in ("+plan", "")]
    out = []
    for i, spec in enumerate(blocks):
        for keep, need in ((0.5, 1.8), (1.0, 0.97)):
            targets = {} if i else {v: Target(f"{v} keep {keep:g} over the dense block ({spec[0]}, N={batch})", need)
                                    for v in variants[2:]}
            out.append(replace(_case(cfg, spec, dtype, batch, CL, keep, graphs=True), variants=variants, targets=targets,
                               graph=True, host_time=True))
    return out


def _chain_case(cfg: RunConfig, n_blocks, c, hw, batch, d, threads) -> Case:
    """SkipSequential over n_blocks basic blocks, each kept by exactly round(d * N) samples."""
    shape_str = f"chain of {n_blocks} basic blocks: {c}ch @{hw}x{hw}"
    config = f"{shape_str}, N={batch}, float32, {threads} thread{'s' * (threads > 1)}"

    def setup():
        nn_ = _common.nn_modules()
        g, dev = seeded(8), cfg.device
        torch.manual_seed(8)
        blocks = [_make_block(basic_block, c, dev, torch.float32, NCHW, g) for _ in range(n_blocks)]
        policy = torch.stack([sample_gate(batch, d, dev, generator=g) for _ in blocks], dim=1)
        sets = [(torch.randn(batch, c, hw, hw, generator=g).to(dev), policy) for _ in range(cfg.input_sets)]
        per_block = flops.count(blocks[0], sets[0][0][:1])

        def dense():
            chain_of_blocks = nn.Sequential(*blocks)
            return lambda x, policy: chain_of_blocks(x)

        def chain(execution, backend="auto"):
            def build():
                b = resolved("gather_rows", backend, cfg) if execution == "sparse" else backend
                m = nn_.SkipSequential([nn_.SkipBlock(blk, execution=execution, backend=b) for blk in blocks]).eval()
                return lambda x, policy: m(x, policy)
            return build

        variants = [
            Variant("dense", dense, work="dense"),
            Variant("SkipSequential-masked", chain("masked"), work="dense"),
            Variant("SkipSequential-auto", chain("sparse"), backend="auto", compare_to="SkipSequential-masked"),
        ]
        return Setup(sets, variants, dense_flops=n_blocks * batch * per_block,
                     sparse_flops=float(policy.sum()) * per_block)

    return Case(NAME, "SkipSequential", config, shape_str, batch, "float32", d, setup, baseline="SkipSequential-masked",
                threads=threads)


def cpu_chain(cfg: RunConfig) -> List[Case]:
    """A chain of 4 basic blocks under SkipSequential against its masked execution, on the CPU."""
    n_blocks, c, hw, batch = (2, 4, 5, 4) if cfg.smoke else (4, 64, 16, 64)
    target = Target("SkipSequential, 4 basic blocks, keep 0.5, over masked (CPU; 1 and 2 threads)", 1.6)
    return [replace(_chain_case(cfg, n_blocks, c, hw, batch, 0.5, threads), targets={"SkipSequential-auto": target})
            for threads in cpu_threads(cfg)]


HOST_OVERHEAD_US = 10.0  # the most a SkipBlock given its plan may add to its block on tiny tensors


def _burst(fn):
    """fn called HOST_CALLS times in one timed run: a call of microseconds, timed alone, is
    dominated by the timer and by the harness's own code between the runs."""
    def run(*inputs):
        for _ in range(HOST_CALLS - 1):
            fn(*inputs)
        return fn(*inputs)

    return run


def _host_case(cfg: RunConfig, no_grad: bool) -> Case:
    """The host time SkipBlock adds to its block: tiny tensors (N=8, 4 channels, 4x4, a 1x1
    conv block, 5 of 8 samples kept, fp32, 1 thread), where the kernels' work is negligible, so
    that SkipBlock-cpu+plan (given its SkipPlan row) minus the block alone on all 8 samples is
    the Python and dispatch cost of the gather, the merge and the checks. Each timed run is a
    burst of HOST_CALLS calls; overhead_us is per call."""
    mode = "no_grad" if no_grad else "inference_mode"
    shape_str = "1x1 conv block: 4ch @4x4"
    config = f"SkipBlock host overhead, {shape_str}, N=8, 5 of 8 kept, float32, 1 thread, {mode}"

    def setup():
        torch.manual_seed(9)
        block = nn.Conv2d(4, 4, 1).to(cfg.device).eval()
        g = seeded(9)
        sets = []
        for _ in range(cfg.input_sets):
            gate = sample_gate(8, 5 / 8, cfg.device, generator=g)
            sets.append((torch.randn(8, 4, 4, 4, generator=g).to(cfg.device), gate, _common.nn_modules().SkipPlan(gate.unsqueeze(1))[0]))
        per_sample = flops.count(block, sets[0][0][:1])
        skip = _skipblock_variant("SkipBlock-cpu+plan", block, "sparse", "cpu", cfg, "SkipBlock-masked", with_plan=True)
        variants = [Variant("block", lambda: _burst(lambda x, gate, plan: block(x)), work="dense"),
                    _skipblock_variant("SkipBlock-masked", block, "masked", "auto", cfg, None),
                    replace(skip, build=lambda: _burst(skip.build()))]
        return Setup(sets, variants, dense_flops=HOST_CALLS * 8 * per_sample, sparse_flops=HOST_CALLS * 5 * per_sample)

    target = Target(f"SkipBlock given its plan: at most {HOST_OVERHEAD_US:g} us above its block (CPU, tiny tensors, {mode})",
                    overhead_us=HOST_OVERHEAD_US)
    return Case(NAME, "SkipBlock host overhead", config, shape_str, 8, "float32", 5 / 8, setup, mode=mode, baseline="block",
                threads=1, no_grad=no_grad, variants=["block", "SkipBlock-cpu+plan"], targets={"SkipBlock-cpu+plan": target},
                calls_per_run=HOST_CALLS)


def cpu_host_overhead(cfg: RunConfig) -> List[Case]:
    """SkipBlock's host overhead on the CPU under torch.no_grad() and torch.inference_mode()."""
    return [_host_case(cfg, no_grad) for no_grad in (True, False)]


def headline(cfg: RunConfig) -> List[Case]:
    cpu = cpu_chain(cfg) + cpu_host_overhead(cfg) if cfg.cpu_targets else []
    return (gpu_bottlenecks(cfg) if cfg.gpu_targets else []) + cpu
