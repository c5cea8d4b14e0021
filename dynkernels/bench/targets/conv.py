"""Issue 3's GPU target: channel_sparse_conv2d against cuDNN dense, bf16, channels_last.

Shapes: the stride-1 3x3 and 1x1 conv layers of ResNet-18 and ResNet-50 at 224x224 (the
3x3 shapes of the two nets coincide; ResNet-50's 1x1 reduce and expand of every stage),
batch 64 and 128, padding k // 2, no bias (as in the ResNets). Per configuration:
  dense      F.conv2d on the whole input (cuDNN, same dtype and layout)
  out 0.5    output gate keeping 50% of the channels of each sample (random positions,
             values in [0.1, 1.1)); CUDA and Triton kernels each
  in+out 0.5 the same plus an input gate at 50% (the input's gated-off channels hold zeros,
             as the previous gated layer leaves them); CUDA and Triton each
  auto 1.0   every output channel kept, backend="auto"
Targets: out 0.5 >= 1.6x, in+out 0.5 >= 2.8x, auto at 1.0 within 5% of dense (>= 0.952x).
Every output is checked against F.conv2d(x * [in_gate > 0], w) * out_gate computed in fp32.
"""
from typing import List

import torch
import torch.nn.functional as F

from .common import Target, Unavailable, backend_for, error_text, fmt, geomean, max_rel_err, md_table, run_guarded

NAME = "conv"

# (label, Cin, Cout, H=W, kernel): stride 1, padding k // 2.
SHAPES = [
    ("R18/R50 layer1 3x3", 64, 64, 56, 3),
    ("R18/R50 layer2 3x3", 128, 128, 28, 3),
    ("R18/R50 layer3 3x3", 256, 256, 14, 3),
    ("R18/R50 layer4 3x3", 512, 512, 7, 3),
    ("R50 layer1 1x1 reduce", 256, 64, 56, 1),
    ("R50 layer1 1x1 expand", 64, 256, 56, 1),
    ("R50 layer2 1x1 reduce", 512, 128, 28, 1),
    ("R50 layer2 1x1 expand", 128, 512, 28, 1),
    ("R50 layer3 1x1 reduce", 1024, 256, 14, 1),
    ("R50 layer3 1x1 expand", 256, 1024, 14, 1),
    ("R50 layer4 1x1 reduce", 2048, 512, 7, 1),
    ("R50 layer4 1x1 expand", 512, 2048, 7, 1),
]
BATCHES = [128, 64]
# Smoke run (CPU): two tiny shapes of the same kinds.
SMOKE_SHAPES = [("tiny 3x3", 8, 8, 6, 3), ("tiny 1x1", 16, 8, 5, 1)]
SMOKE_BATCHES = [2]

# (column, gating mode, density, requested backend, target speedup)
VARIANTS = [
    ("cuda out 0.5", "out", 0.5, "cuda", 1.6),
    ("triton out 0.5", "out", 0.5, "triton", 1.6),
    ("cuda in+out 0.5", "in+out", 0.5, "cuda", 2.8),
    ("triton in+out 0.5", "in+out", 0.5, "triton", 2.8),
    ("auto 1.0", "out", 1.0, "auto", 1 / 1.05),
]
RTOL = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-4}


def exact_gate(n: int, c: int, density: float, device, dtype, generator: torch.Generator) -> torch.Tensor:
    """[n, c]: round(density * c) channels per sample > 0 (values in [0.1, 1.1)), at random positions."""
    k = max(1, round(density * c))
    keep = torch.zeros(n, c, dtype=torch.bool)
    keep.scatter_(1, torch.rand(n, c, generator=generator).topk(k, dim=1).indices, True)
    values = torch.rand(n, c, generator=generator) + 0.1
    return torch.where(keep, values, torch.zeros(())).to(device=device, dtype=dtype)


def measure_config(t: Target, label: str, cin: int, cout: int, hw: int, k: int, n: int, dtype) -> None:
    import dynkernels

    dev, pad = t.device, k // 2
    g, gd = torch.Generator().manual_seed(3), torch.Generator(dev).manual_seed(3)  # gates on the CPU, data on the device
    cl = torch.channels_last
    x = torch.randn(n, cin, hw, hw, generator=gd, device=dev, dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, k, k, generator=gd, device=dev, dtype=dtype) / (cin * k * k) ** 0.5).contiguous(memory_format=cl)
    gates = {d: exact_gate(n, cout, d, dev, dtype, g) for d in (0.5, 1.0)}
    in_gate = exact_gate(n, cin, 0.5, dev, dtype, g)
    x_io = (x * (in_gate > 0).to(dtype)[:, :, None, None]).contiguous(memory_format=cl)
    config = f"{label}: {cin}->{cout} k{k} @{hw}x{hw}, N={n}"
    flops = 2.0 * n * cout * cin * k * k * hw * hw

    F.conv2d(x, w, None, 1, pad)  # cuDNN's benchmark mode picks its algorithm here, outside the timing
    t.sync()
    dense = t.time(lambda: F.conv2d(x, w, None, 1, pad))
    t.add(config=config, variant="dense", backend="cuDNN" if t.gpu else "ATen", **dense, tflops=flops / dense["median_ms"] / 1e9)
    t.say(f"{config}: dense {dense['median_ms']:.4f} ms")
    for column, mode, d, requested, target in VARIANTS:
        if t.left_s() <= 0:
            t.add(config=config, variant=column, status="skipped", reason="time budget used up")
            continue
        og = gates[d]
        ig = in_gate if mode == "in+out" else None
        xin = x_io if mode == "in+out" else x
        ideal = 1 / d if mode == "out" else 1 / (d * d)
        try:
            b = backend_for(requested, dev)
        except Unavailable as e:
            t.add(config=config, variant=column, status="skipped", reason=str(e))
            continue
        call = "auto" if requested == "auto" else b  # "auto" is passed as such: the op decides
        if call == "auto":
            b = f"auto -> {b}"
        try:
            fn = lambda: dynkernels.channel_sparse_conv2d(xin, w, None, og, ig, 1, pad, 1, backend=call)  # noqa: E731
            out = fn()
            t.sync()
            ref_in = xin.float() if ig is None else xin.float() * (ig > 0).float()[:, :, None, None]
            ref = F.conv2d(ref_in, w.float(), None, 1, pad) * og.float()[:, :, None, None]
            err = max_rel_err(out, ref)
            del out, ref, ref_in
            tm = t.time(fn)
        except Exception as e:
            t.add(config=config, variant=column, backend=b, status="error", reason=error_text(e))
            t.say(f"{config}: {column} failed: {error_text(e)}")
            continue
        speedup = dense["median_ms"] / tm["median_ms"]
        ok = err <= RTOL[dtype]
        t.add(config=config, variant=column, backend=b, mode=mode, density=d, **tm, speedup=speedup, ideal=ideal,
              target=target, max_rel_err=err, status="ok" if ok else "mismatch",
              reason=None if ok else f"output differs from the fp32 reference: max rel err {err:.3g}")
        t.say(f"{config}: {column} [{b}] {tm['median_ms']:.4f} ms, {speedup:.2f}x (ideal {ideal:g}x, target "
              f"{target:.2f}x), err {err:.2g}")


def run(t: Target) -> None:
    dtype = torch.bfloat16 if t.gpu else torch.float32
    t.notes.append(
        f"{'bf16' if t.gpu else 'fp32 (smoke)'}, channels_last inputs and weights, random per-sample gates with exactly "
        "50% of the channels kept; dense = F.conv2d (cuDNN on the GPU) on the same input; speedup = dense / ours")
    shapes, batches = (SMOKE_SHAPES, SMOKE_BATCHES) if t.smoke else (SHAPES, BATCHES)
    with torch.inference_mode():
        for n in batches:  # batch 128 over every shape first: it is the headline
            for label, cin, cout, hw, k in shapes:
                if not run_guarded(t, f"{label} N={n}", lambda: measure_config(t, label, cin, cout, hw, k, n, dtype)):
                    return


def _summary_rows(rows) -> List[List[str]]:
    targets = {v[0]: v[4] for v in VARIANTS}
    out = []
    for col, target in targets.items():
        ok = [r for r in rows if r["variant"] == col and r["status"] == "ok"]
        if not ok:
            out.append([col, "-", "-", "-", f"{target:.2f}x", "0"])
            continue
        sp = [r["speedup"] for r in ok]
        met = sum(s >= target for s in sp)
        out.append([col, f"{fmt(geomean(sp))}x", f"{fmt(min(sp))}x", f"{fmt(max(sp))}x", f"{target:.2f}x", f"{met} of {len(ok)}"])
    return out


SUMMARY_HEADERS = ["variant", "geomean speedup", "min", "max", "target", "configs meeting it"]


def headline(data: dict) -> List[str]:
    """The target verdicts in a few lines (top of targets.md)."""
    rows = data["rows"]
    n = len({r["config"] for r in rows if r["variant"] == "dense"})
    return [f"Issue 3, channel_sparse_conv2d vs cuDNN over {n} layer configurations:", ""] + md_table(
        SUMMARY_HEADERS, _summary_rows(rows)) + [""]


def render(data: dict) -> List[str]:
    """The Markdown section: one row per configuration, one column per variant, then the summary."""
    rows = data["rows"]
    columns = [v[0] for v in VARIANTS]
    targets = {v[0]: v[4] for v in VARIANTS}
    configs = list(dict.fromkeys(r["config"] for r in rows))
    table = []
    for c in configs:
        by = {r["variant"]: r for r in rows if r["config"] == c}
        whole = by.get("all")
        if whole is not None and "dense" not in by:
            table.append([c, whole["status"] + ": " + (whole.get("reason") or "")] + [""] * len(columns))
            continue
        dense = by.get("dense")
        cells = [c, f"{fmt(dense['median_ms'])} ms" if dense else "-"]
        for col in columns:
            r = by.get(col)
            if r is None:
                cells.append("-")
            elif r["status"] in ("error", "skipped"):
                cells.append(r["status"])
            else:
                met = "" if r["speedup"] >= targets[col] else " (miss)"
                wrong = " **wrong output**" if r["status"] == "mismatch" else ""
                cells.append(f"{fmt(r['median_ms'])} ms, {fmt(r['speedup'])}x{met}{wrong}")
        table.append(cells)
    lines = [
        "## Issue 3: channel_sparse_conv2d vs cuDNN dense (bf16, channels_last)",
        "",
        "```text", *__doc__.split("\n\n", 1)[1].rstrip().splitlines(), "```",
        "",
        "Cells: median ms, speedup over dense; \"(miss)\" = below the issue's target. Ideal: 2x (out 0.5), "
        "4x (in+out 0.5), 1x (1.0).",
        "",
    ]
    lines += md_table(["configuration", "dense"] + columns, table) + [""]
    lines += ["Summary over the configurations that ran (wrong outputs and errors excluded):", ""]
    lines += md_table(SUMMARY_HEADERS, _summary_rows(rows)) + [""]
    problems = [r for r in rows if r["status"] in ("error", "mismatch", "skipped")]
    if problems:
        lines += ["Problems:", ""] + [f"- {r['config']} / {r['variant']}: {r['status']}: {r.get('reason')}" for r in problems] + [""]
    return lines
