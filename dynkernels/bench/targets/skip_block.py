"""Issue 4's block target: one ResNet-101 bottleneck block at batch 128, bf16, channels_last,
SkipBlock at keep 0.5 and 1.0 against the dense block.

The block is BlockDrop's ResNet-101 bottleneck (dynkernels.models.blockdrop.BottleneckBranch
with its identity residual: relu(x + F(x))), in eval mode (BatchNorm uses running statistics).
Keep k: exactly round(k * N) samples run the block (random which); the others pass x through.
  dense            the block on every sample
  masked           block(x) * m + x * (1 - m) (BlockDrop's code)
  SkipBlock        dynkernels.nn.SkipBlock(block).forward(x, gate): compacts its own gate,
                   one host sync per call (reads the kept count)
  SkipBlock+plan   forward(x, gate, plan=SkipPlan(gate[:, None])[0]), the plan built outside
                   the timed call, as BlockDrop does for all blocks once per forward: no sync
Per backend (CUDA kernels, Triton kernels). Targets: keep 0.5 >= 1.8x, keep 1.0 within 3%
of dense (>= 0.971x). The ResNet-101 layer3 block (1024 channels at 14x14, 23 of the 33
blocks) is the headline; the other stages' blocks follow. Every output is checked against
the masked one.
"""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Target, Unavailable, backend_for, error_text, fmt, max_rel_err, md_table, run_guarded

NAME = "skip_block"

# (label, channels, H=W): identity-shortcut bottlenecks of ResNet-101 at 224x224.
BLOCKS = [
    ("R101 layer3 bottleneck", 1024, 14),
    ("R101 layer1 bottleneck", 256, 56),
    ("R101 layer2 bottleneck", 512, 28),
    ("R101 layer4 bottleneck", 2048, 7),
]
BATCH = 128
SMOKE_BLOCKS = [("tiny bottleneck", 16, 6)]
SMOKE_BATCH = 4
KEEPS = [0.5, 1.0]
TARGET = {0.5: 1.8, 1.0: 1 / 1.03}
BACKENDS = ["cuda", "triton"]
RTOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}


class Bottleneck(nn.Module):
    """relu(x + F(x)) with BlockDrop's ResNet-101 residual branch F."""

    def __init__(self, channels: int):
        super().__init__()
        from dynkernels.models.blockdrop import BottleneckBranch

        self.branch = BottleneckBranch(channels, channels // 4)

    def forward(self, x):
        return F.relu(x + self.branch(x))


def make_block(channels: int, device, dtype, generator: torch.Generator) -> nn.Module:
    """An eval-mode bottleneck with non-trivial BN statistics (so a wrong sample mapping shows)
    and a small last-BN scale (so that the residual branch stays bounded, as trained nets do)."""
    block = Bottleneck(channels)
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=generator) * 0.5 + 0.25)
            m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
        bns[-1].weight.mul_(0.4)
    block = block.to(device, dtype).to(memory_format=torch.channels_last).eval()
    assert not any(m.training for m in block.modules()), "the block must be in eval mode"
    return block


def keep_gate(n: int, keep: float, device, dtype, generator: torch.Generator) -> torch.Tensor:
    k = max(1, round(keep * n))
    gate = torch.zeros(n)
    gate[torch.randperm(n, generator=generator)[:k]] = 1.0
    return gate.to(device, dtype)


def _row(t: Target, config, variant, keep, backend, fn, base_ms, base_graph_ms, expected, graph: bool, rtol, sync_note):
    out = fn()
    t.sync()
    err = max_rel_err(out, expected) if expected is not None else None
    del out
    tm = t.time(fn)
    host = t.host_ms(fn)
    graph_ms, graph_note = None, None
    if graph and t.gpu:
        try:
            graph_ms = t.graph_ms(fn)
        except Exception as e:
            graph_note = "graph capture failed: " + error_text(e)
    ideal = 1 / keep
    speedup = base_ms / tm["median_ms"] if base_ms else 1.0
    ok = err is None or err <= rtol
    reason = "; ".join(x for x in (None if ok else f"output differs from masked: max rel err {err:.3g}", graph_note, sync_note) if x)
    t.add(config=config, variant=variant, keep=keep, backend=backend, **tm, speedup=speedup, ideal=ideal,
          target=TARGET.get(keep) if variant.startswith("SkipBlock") else None, host_ms=host, graph_ms=graph_ms,
          graph_speedup=(base_graph_ms / graph_ms) if base_graph_ms and graph_ms else None, max_rel_err=err,
          status="ok" if ok else "mismatch", reason=reason or None)
    t.say(f"{config}: {variant} keep {keep:g} [{backend}] {tm['median_ms']:.4f} ms ({speedup:.2f}x), host {host:.3f} ms/call, "
          f"graph {fmt(graph_ms)} ms, err {fmt(err)}" + (f" ({graph_note})" if graph_note else ""))
    return tm["median_ms"], graph_ms


def measure_block(t: Target, label: str, channels: int, hw: int, n: int, dtype) -> None:
    from dynkernels.nn import SkipBlock, SkipPlan

    g = torch.Generator().manual_seed(4)
    dev = t.device
    block = make_block(channels, dev, dtype, g)
    gd = torch.Generator(dev).manual_seed(4)  # data made on the device (a CPU randn of 100M values takes a second)
    x = torch.randn(n, channels, hw, hw, generator=gd, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    config = f"{label}: {channels}ch @{hw}x{hw}, N={n}"
    rtol = RTOL[dtype]
    dense_ms, dense_graph = _row(t, config, "dense", 1.0, "pytorch", lambda: block(x), None, None, None, True, rtol, None)
    # the dense row's speedup is 1 by definition; its graph time is the graph baseline
    t.rows[-1]["graph_speedup"] = 1.0 if dense_graph else None
    for keep in KEEPS:
        gate = keep_gate(n, keep, dev, dtype, g)
        m = gate.view(-1, 1, 1, 1)
        masked_fn = lambda: block(x) * m + x * (1 - m)  # noqa: E731
        expected = masked_fn()
        _row(t, config, "masked", keep, "pytorch", masked_fn, dense_ms, dense_graph, None, True, rtol, None)
        for requested in BACKENDS:
            if t.left_s() <= 0:
                t.add(config=config, variant=f"SkipBlock ({requested})", keep=keep, status="skipped", reason="time budget used up")
                continue
            try:
                b = backend_for(requested, dev)
            except Unavailable as e:
                for v in ("SkipBlock", "SkipBlock+plan"):
                    t.add(config=config, variant=f"{v} ({requested})", keep=keep, status="skipped", reason=str(e))
                continue
            sb = SkipBlock(block, execution="sparse", backend=b).eval()
            plan = SkipPlan(gate.unsqueeze(1), backend=b)[0]  # built once, outside the timed call
            variants = [
                ("SkipBlock", lambda: sb(x, gate), False, "one host sync per call (own plan)"),
                ("SkipBlock+plan", lambda: sb(x, gate, plan=plan), True, None),
            ]
            for name, fn, graph, note in variants:
                try:
                    _row(t, config, f"{name} ({requested})", keep, b, fn, dense_ms, dense_graph, expected, graph, rtol, note)
                except Exception as e:
                    t.add(config=config, variant=f"{name} ({requested})", keep=keep, backend=b, status="error", reason=error_text(e))
                    t.say(f"{config}: {name} ({requested}) keep {keep:g} failed: {error_text(e)}")


def run(t: Target) -> None:
    dtype = torch.bfloat16 if t.gpu else torch.float32
    t.notes.append(f"{'bf16' if t.gpu else 'fp32 (smoke)'}, channels_last; speedup = dense / variant (same timer); "
                   "graph speedup = dense graph replay / variant graph replay")
    blocks, n = (SMOKE_BLOCKS, SMOKE_BATCH) if t.smoke else (BLOCKS, BATCH)
    with torch.inference_mode():
        for label, c, hw in blocks:
            if not run_guarded(t, f"{label} N={n}", lambda: measure_block(t, label, c, hw, n, dtype)):
                return


def headline(data: dict) -> List[str]:
    """The SkipBlock rows of the headline block (the first one measured) against their targets."""
    rows = [r for r in data["rows"] if r.get("median_ms") is not None]
    if not rows:
        return ["Issue 4, ResNet-101 bottleneck: nothing measured.", ""]
    first = rows[0]["config"]
    table = [[r["variant"], fmt(r["keep"]), f"{fmt(r['speedup'])}x", f"{r['target']:.2f}x",
              "met" if r["speedup"] >= r["target"] else "miss",
              f"{fmt(r['graph_speedup'])}x" if r.get("graph_speedup") else "-",
              "wrong output" if r["status"] == "mismatch" else ""]
             for r in rows if r["config"] == first and r.get("target") is not None]
    return [f"Issue 4, {first} (speedup over the dense block):", ""] + md_table(
        ["variant", "keep", "speedup", "target", "verdict", "CUDA-graph speedup", "check"], table) + [""]


def render(data: dict) -> List[str]:
    rows = data["rows"]
    lines = [
        "## Issue 4: one ResNet-101 bottleneck block, SkipBlock vs dense (bf16, channels_last)",
        "",
        "```text", *__doc__.split("\n\n", 1)[1].rstrip().splitlines(), "```",
        "",
        "Columns: do_bench median and speedup over dense (the issue's measure); the same call replayed "
        "from a CUDA graph (GPU work only; '-' where the call syncs, so cannot be captured) and its "
        "speedup over the dense block's graph; host ms/call (CPU side of one call; when it exceeds the "
        "GPU time the call is launch-bound). Target column: met / miss for the SkipBlock rows.",
        "",
    ]
    table = []
    for r in rows:
        if r.get("variant") == "all" or r["status"] in ("skipped", "error"):
            table.append([r["config"], r.get("variant", ""), fmt(r.get("keep")), r["status"], "", "", "", "", "", r.get("reason") or ""])
            continue
        target = r.get("target")
        verdict = "" if target is None else ("met" if r["speedup"] >= target else "miss") + f" (>= {target:.2f}x)"
        if r["status"] == "mismatch":
            verdict += " **wrong output**"
        table.append([
            r["config"], r["variant"], fmt(r["keep"]), f"{fmt(r['median_ms'])} ms", f"{fmt(r['speedup'])}x",
            f"{fmt(r.get('graph_ms'))} ms" if r.get("graph_ms") else "-",
            f"{fmt(r.get('graph_speedup'))}x" if r.get("graph_speedup") else "-",
            fmt(r.get("host_ms")), verdict, r.get("reason") or "",
        ])
    lines += md_table(["block", "variant", "keep", "do_bench", "speedup", "CUDA graph", "graph speedup",
                       "host ms/call", "target", "notes"], table) + [""]
    return lines
