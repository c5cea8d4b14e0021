"""Issue 4's end-to-end target: BlockDrop ResNet-101 with 25 of its 33 blocks kept per
sample, against the dense ResNet-101, bf16, channels_last, 224x224, batch 64 and 128.

Model: dynkernels.models.blockdrop.resnet101_imagenet in eval mode, the release's
initialisation with the last BatchNorm scale of every residual branch drawn from
[0.1, 0.3] (activations stay bounded, as in a trained net). Policy: each sample keeps 25 of
the 33 blocks, chosen at random per sample.
  dense             the same network with every block kept (policy None: a plain ResNet-101)
  masked            execution="masked" (BlockDrop's code: every block on every sample, times the mask)
  sparse            execution="sparse": one SkipPlan (one compact, one host sync) per forward,
                    each block on its kept samples only; CUDA and Triton kernels each
  BlockDrop         the ResNet-10 policy network on the 112x112-pooled input, then the sparse
                    backbone (CUDA kernels) with the fixed policy: the cost of the whole agent
Ideal = FLOP ratio, counted with torch.utils.flop_counter.FlopCounterMode (convolutions and
matrix products) over the dense network and over each block's residual branch, one sample:
dense FLOPs / FLOPs of the stem, shortcuts, classifier and the kept branches (plus the policy
network for the BlockDrop row). Sparse outputs are checked against masked.
"""
from typing import List

import torch

from ..families._common import bounded_residual_init
from ..timing import TimingSettings
from .common import Target, Unavailable, backend_for, error_text, fmt, max_rel_err, md_table, run_guarded

NAME = "blockdrop"
BATCHES = [64, 128]
SIZE = 224
KEEP_BLOCKS = 25
SMOKE_BATCHES, SMOKE_SIZE = [2], 32
BACKENDS = ["cuda", "triton"]
RTOL = {torch.bfloat16: 0.1, torch.float32: 1e-3}
# whole-network calls take milliseconds: longer do_bench windows than the kernel steps
GPU_TIMING = TimingSettings(warmup_ms=50, rep_ms=300, min_runs=10, max_runs=1000)


def counted_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def flop_model(backbone, policy_net, sample: torch.Tensor):
    """(dense FLOPs, FLOPs of each block's residual branch [33], policy-net FLOPs), one sample,
    counted by FlopCounterMode."""
    inputs = []
    branches = [branch for stage in backbone.blocks for branch in stage]
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in branches]
    try:
        dense = counted_flops(lambda: backbone(sample, None))
    finally:
        for h in hooks:
            h.remove()
    if len(inputs) != len(branches):
        raise RuntimeError(f"expected one call per block, saw {len(inputs)} for {len(branches)} blocks")
    per_block = [counted_flops(lambda b=b, i=i: b(i)) for b, i in zip(branches, inputs)]
    return dense, per_block, counted_flops(lambda: policy_net(sample))


def random_policy(n: int, blocks: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """[n, blocks] 0/1: each row keeps exactly `keep` blocks at random positions."""
    p = torch.zeros(n, blocks)
    p.scatter_(1, torch.rand(n, blocks, generator=generator).argsort(1)[:, :keep], 1.0)
    return p


def build(dev, dtype, execution, backend, state=None):
    from dynkernels.models.blockdrop import resnet101_imagenet

    with torch.device(dev):
        m = resnet101_imagenet(execution=execution, backend=backend)
    if state is None:
        bounded_residual_init(m, torch.Generator().manual_seed(5))
    else:
        m.load_state_dict(state)
    return m.to(dtype).to(memory_format=torch.channels_last).eval()


def measure_batch(t: Target, n: int, size: int, dtype, base, policy_net, flops) -> None:
    dev = t.device
    g = torch.Generator().manual_seed(6)
    gd = torch.Generator(dev).manual_seed(6)
    x = torch.randn(n, 3, size, size, generator=gd, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    policy = random_policy(n, base.num_blocks, KEEP_BLOCKS, g)
    dense_flops, per_block, policy_flops = flops
    fixed = dense_flops - sum(per_block)
    sparse_flops = float((fixed + policy.double() @ torch.tensor(per_block, dtype=torch.float64)).sum())
    ideal = n * dense_flops / sparse_flops
    ideal_agent = n * dense_flops / (sparse_flops + n * policy_flops)
    kept = policy.sum(0)
    config = f"ResNet-101 N={n} {size}x{size}, {KEEP_BLOCKS}/{base.num_blocks} blocks per sample"
    t.notes.append(f"{config}: samples per block {int(kept.min())} to {int(kept.max())} of {n}")
    policy = policy.to(dev, dtype)
    t.say(f"{config}: ideal {ideal:.3f}x (FLOPs: dense {dense_flops / 1e9:.2f} G/sample, fixed {fixed / 1e9:.2f} G, "
          f"policy net {policy_flops / 1e9:.3f} G)")

    dense_ms = None  # the baseline of every row after the first

    def row(variant, backend, fn, ideal_, expected=None, note=None):
        out = fn()
        t.sync()
        err = max_rel_err(out, expected) if expected is not None else None
        tm = t.time(fn)
        host = t.host_ms(fn)
        ok = err is None or err <= RTOL[dtype]
        speedup = (dense_ms or tm["median_ms"]) / tm["median_ms"]
        reason = "; ".join(s for s in (None if ok else f"output differs from masked: max rel err {err:.3g}", note) if s)
        t.add(config=config, variant=variant, backend=backend, batch=n, **tm, speedup=speedup, ideal=ideal_,
              efficiency=speedup / ideal_, host_ms=host, max_rel_err=err, status="ok" if ok else "mismatch",
              reason=reason or None)
        t.say(f"{config}: {variant} [{backend}] {tm['median_ms']:.3f} ms, {speedup:.3f}x (ideal {ideal_:.3f}x), "
              f"host {host:.2f} ms/call, err {fmt(err)}")
        return out, tm["median_ms"]

    _, dense_ms = row("dense ResNet-101", "pytorch", lambda: base(x, None), 1.0)
    base.execution = "masked"
    expected, _ = row("masked", "pytorch", lambda: base(x, policy), 1.0)
    for requested in BACKENDS:
        if t.left_s() <= 0:
            t.add(config=config, variant=f"sparse ({requested})", status="skipped", reason="time budget used up")
            continue
        try:
            b = backend_for(requested, dev)
            sparse = build(dev, dtype, "sparse", b, base.state_dict())
            row(f"sparse ({requested})", b, lambda: sparse(x, policy), ideal, expected, "one host sync per forward (SkipPlan)")
            if requested == "cuda":
                agent = lambda: (policy_net(x), sparse(x, policy))[1]  # noqa: E731
                row("BlockDrop: policy net + sparse (cuda)", b, agent, ideal_agent, expected,
                    "the policy net runs; its decision is replaced by the fixed 25/33 policy")
            del sparse
        except Unavailable as e:
            t.add(config=config, variant=f"sparse ({requested})", status="skipped", reason=str(e))
        except Exception as e:
            t.add(config=config, variant=f"sparse ({requested})", status="error", reason=error_text(e))
            t.say(f"{config}: sparse ({requested}) failed: {error_text(e)}")
    del expected


def run(t: Target) -> None:
    from dynkernels.models.blockdrop import policy_net_imagenet

    if t.gpu:
        t.settings = GPU_TIMING
        t.meta["timing"] = vars(GPU_TIMING)
    dtype = torch.bfloat16 if t.gpu else torch.float32
    batches, size = (SMOKE_BATCHES, SMOKE_SIZE) if t.smoke else (BATCHES, SIZE)
    with torch.inference_mode():
        base = build(t.device, dtype, "masked", "auto")
        with torch.device(t.device):
            policy_net = policy_net_imagenet(base.num_blocks)
        policy_net = policy_net.to(dtype).to(memory_format=torch.channels_last).eval()
        sample = torch.randn(1, 3, size, size, device=t.device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        flops = flop_model(base, policy_net, sample)
        hooks_flops = float(base.flops(torch.ones(1, base.num_blocks), input_size=size)[0])
        t.notes.append(
            f"{'bf16' if t.gpu else 'fp32 (smoke)'}, channels_last, {size}x{size}. FlopCounterMode, one sample: dense "
            f"ResNet-101 {flops[0] / 1e9:.3f} GFLOPs (model.flops() by hooks: {hooks_flops / 1e9:.3f}), residual branches "
            f"{sum(flops[1]) / 1e9:.3f}, the rest (stem, downsample shortcuts, fc) {(flops[0] - sum(flops[1])) / 1e9:.3f}, "
            f"policy net {flops[2] / 1e9:.3f}. Each variant's first call (outside the timings) also lets cuDNN's "
            "benchmark mode pick its algorithms for every batch size the sparse blocks see")
        t.save()
        for n in batches:
            if not run_guarded(t, f"ResNet-101 N={n}", lambda: measure_batch(t, n, size, dtype, base, policy_net, flops)):
                return


def headline(data: dict) -> List[str]:
    rows = [r for r in data["rows"] if r.get("median_ms") is not None]
    table = [[r["config"], r["variant"], f"{fmt(r['median_ms'])} ms", f"{fmt(r['speedup'])}x", f"{fmt(r['ideal'])}x",
              fmt(r.get("efficiency")), "wrong output" if r["status"] == "mismatch" else ""] for r in rows]
    return ["Issue 4, BlockDrop ResNet-101 end to end (speedup over the dense ResNet-101, ideal = FLOP ratio):", ""] + md_table(
        ["configuration", "variant", "median", "speedup", "ideal", "efficiency", "check"], table) + [""]


def render(data: dict) -> List[str]:
    rows = data["rows"]
    lines = [
        "## Issue 4: BlockDrop ResNet-101 end to end, 25 of 33 blocks per sample (bf16, channels_last)",
        "",
        "```text", *__doc__.split("\n\n", 1)[1].rstrip().splitlines(), "```",
        "",
        "Speedup = dense ResNet-101 / variant (do_bench medians); efficiency = speedup / ideal; host ms/call = "
        "CPU side of one call (launch-bound where it approaches the GPU time).",
        "",
    ]
    table = []
    for r in rows:
        if r["status"] in ("skipped", "error"):
            table.append([r["config"], r["variant"], r["status"], "", "", "", "", "", r.get("reason") or ""])
            continue
        wrong = " **wrong output**" if r["status"] == "mismatch" else ""
        table.append([r["config"], r["variant"], f"{fmt(r['median_ms'])} ms", f"{fmt(r['speedup'])}x{wrong}",
                      f"{fmt(r['ideal'])}x", fmt(r.get("efficiency")), fmt(r.get("host_ms")), fmt(r.get("max_rel_err")),
                      r.get("reason") or ""])
    lines += md_table(["configuration", "variant", "median", "speedup", "ideal (FLOP ratio)", "efficiency",
                       "host ms/call", "max rel err vs masked", "notes"], table) + [""]
    return lines
