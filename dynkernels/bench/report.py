"""The Markdown report (report.md) and its plots (plot_<family>.png) from result rows.

Per family: a summary (geometric-mean speedup of each variant at each density over all the
family's configurations), one plot (speedup versus density with the ideal line and the 1x
line, and efficiency = speedup / ideal), and one table per configuration. Rows that were
skipped, failed or gave a wrong output are listed with their reasons and are never plotted.
"""
import math
import os
import textwrap
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional

FAMILY_TITLES = {
    "sample_gating": "Sample gating ops (compact, gather_rows, scatter_add_rows, scatter_rows)",
    "channel_sparse_conv": "Channel-sparse convolution (channel_sparse_conv2d, GatedConv2d)",
    "skip_blocks": "Sample-sparse residual blocks (SkipBlock)",
    "models": "End-to-end models",
}
FAMILY_NOTES = {
    "sample_gating": "Memory-bound, so the ideal comes from bytes moved. `gather_rows` writes all N rows (zeros past "
    "count: the count stays on the device, so the capacity is N); `naive` (`index_select` on `nonzero`, a host sync) "
    "returns only the k active rows, fewer bytes but a data-dependent shape. `scatter_add_rows` is out of place "
    "(reads and writes all of base); `dense` is `base + g * y`. `compact` has no dense counterpart: its speedups are "
    "over the reference (a stable sort).",
    "channel_sparse_conv": "Ideal = 1/d for output gating (`out`), 1/d^2 for input and output gating (`in+out`). "
    "`masked` = conv then multiply by the gate (FBS's code); `naive` = one dense conv per sample on its active input "
    "channels and weight rows (gates read on the host once per call).",
    "skip_blocks": "A block is a whole residual block relu(x + F(x)) in eval mode. `dense` = the block on every "
    "sample; `masked` = block(x) * m + x * (1 - m) (BlockDrop's code); `naive` = index_select -> block -> index_copy "
    "(one host sync). `SkipBlock-*` is dynkernels.nn.SkipBlock, masked and sparse per backend: `SkipBlock-<backend>` "
    "compacts its own gate in every call (one host sync per call, which on a GPU also exposes the launch latency of "
    "the kernels after it); `SkipBlock-<backend>+plan` gets the row of a SkipPlan built outside the timed call, as "
    "BlockDrop's models do once per forward for all blocks (no sync). Each sparse one is checked against "
    "SkipBlock-masked. Every variant, dense included, is timed the same way (see Timing above).",
    "models": "Random BlockDrop policies (each sample keeps each block with probability d). Ideal = model.flops(all "
    "ones) / model.flops(policy): it includes the parts that always run (stem, downsampling shortcuts, classifier). "
    "`sparse-*` outputs are checked against `masked`.",
}
MAX_PLOT_PANELS = 6  # columns of a family's plot


def _fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == 0 or abs(v) >= 10 ** digits:
        return f"{v:.0f}"
    return f"{v:.{max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))}f}"


def _geomean(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _ok(r) -> bool:
    return r["status"] == "ok" and r.get("median_ms") is not None


def _group(rows, key) -> "OrderedDict":
    groups = OrderedDict()
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


# Baselines first, then our backends; names not listed keep their order of appearance after these.
VARIANT_ORDER = ["dense", "copy", "masked", "naive", "reference", "cpu", "triton", "cuda", "auto"]


def _variants(rows) -> List[str]:
    seen = list(OrderedDict.fromkeys(r["variant"] for r in rows if r["variant"] != "all"))
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return sorted(seen, key=lambda v: (rank.get(v, len(rank)), seen.index(v)))


def _op_key(r) -> str:
    """What a geometric mean may average over: one op (and one gating mode, e.g. out vs in+out)."""
    return f"{r['op']} ({r['mode']})" if r.get("mode") else r["op"]


def summary(rows) -> Dict[str, Dict[float, Optional[float]]]:
    """variant -> density -> geometric-mean speedup over configurations (ok rows), plus 'ideal'."""
    out: Dict[str, Dict[float, Optional[float]]] = defaultdict(dict)
    by_density = _group(sorted(rows, key=lambda r: r["density"]), lambda r: r["density"])
    for d, rs in by_density.items():
        for v in _variants(rows):
            out[v][d] = _geomean([r["speedup"] for r in rs if r["variant"] == v and _ok(r)])
        ideals = {r["config"]: r["ideal_speedup"] for r in rs if r.get("ideal_speedup")}
        out["ideal"][d] = _geomean(list(ideals.values()))
    return out


# ----------------------------------------------------------------------------- plots
def plot_family(family: str, rows, path: str) -> Optional[str]:
    """speedup (log) and efficiency versus density; returns None when nothing ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ok_rows = [r for r in rows if _ok(r) and r.get("speedup")]
    if not ok_rows:
        return None
    # one geometric-mean panel per op, then single configurations while there is room
    panels = []
    for op, orows in _group(ok_rows, _op_key).items():
        n = len({r["config"] for r in orows})
        panels.append((f"{op}: geomean of {n} configurations" if n > 1 else orows[0]["config"], orows, n > 1))
    configs = _group(ok_rows, lambda r: r["config"])
    names = [c for c in configs if all(c != p[0] for p in panels)]
    room = max(0, MAX_PLOT_PANELS - len(panels))
    if room and names:
        picks = names if len(names) <= room else [names[round(i * (len(names) - 1) / max(1, room - 1))] for i in range(room)]
        panels += [(c, configs[c], False) for c in dict.fromkeys(picks)]
    variants = _variants(ok_rows)
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    for col, (title, prs, is_mean) in enumerate(panels):
        if is_mean:
            s = summary(prs)
            series = {v: sorted((d, s[v][d]) for d in s[v] if s[v][d]) for v in variants}
            ideal = sorted((d, s["ideal"][d]) for d in s.get("ideal", {}) if s["ideal"][d])
            eff = {v: sorted((d, val / s["ideal"][d]) for d, val in series[v] if s["ideal"].get(d)) for v in variants}
        else:
            series = {v: sorted((r["density"], r["speedup"]) for r in prs if r["variant"] == v) for v in variants}
            ideal = sorted({(r["density"], r["ideal_speedup"]) for r in prs if r.get("ideal_speedup")})
            eff = {v: sorted((r["density"], r["efficiency"]) for r in prs if r["variant"] == v and r.get("efficiency"))
                   for v in variants}
        top, bottom = axes[0][col], axes[1][col]
        for v in variants:
            if series[v]:
                top.plot(*zip(*series[v]), marker="o", ms=3, label=v, color=colors[v])
            if eff[v]:
                bottom.plot(*zip(*eff[v]), marker="o", ms=3, label=v, color=colors[v])
        if ideal:
            top.plot(*zip(*ideal), "k--", lw=1.5, label="ideal (dense/sparse cost)")
        top.axhline(1.0, color="grey", ls=":", lw=1.2, label="1x")
        bottom.axhline(1.0, color="grey", ls=":", lw=1.2)
        top.set_yscale("log")
        top.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        top.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        top.yaxis.set_minor_formatter(ticker.NullFormatter())
        if not any(eff.values()):
            bottom.text(0.5, 0.5, "no ideal for this op", ha="center", va="center", transform=bottom.transAxes)
        top.set_title("\n".join(textwrap.wrap(title, 44)), fontsize=8)
        top.set_ylabel("speedup over baseline")
        bottom.set_ylabel("efficiency = speedup / ideal")
        bottom.set_xlabel("density")
        for ax in (top, bottom):
            ax.set_xlim(0, 1.05)
            ax.grid(alpha=0.3)
    legend = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    labels = [v for v in variants if v in legend] + [lab for lab in legend if lab not in variants]
    handles = [legend[lab] for lab in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=8)
    device = ok_rows[0]["device_name"]
    timer = ok_rows[0]["timer"]
    fig.suptitle(f"{FAMILY_TITLES.get(family, family)} - {device} ({timer})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- tables
def _config_table(rows) -> List[str]:
    variants = _variants(rows)
    lines = ["| density | ideal | " + " | ".join(variants) + " |", "|---" * (len(variants) + 2) + "|"]
    for d, rs in _group(sorted(rows, key=lambda r: r["density"]), lambda r: r["density"]).items():
        by_v = {r["variant"]: r for r in rs}
        ideal = next((r["ideal_speedup"] for r in rs if r.get("ideal_speedup")), None)
        cells = []
        for v in variants:
            r = by_v.get(v)
            if r is None or r["status"] in ("skipped", "error"):
                cells.append(r["status"] if r else "-")
            else:
                mark = " (wrong output)" if r["status"] == "mismatch" else ""
                cells.append(f"{_fmt(r['median_ms'])} ms, {_fmt(r['speedup'])}x{mark}")
        lines.append(f"| {d:g} | {_fmt(ideal)} | " + " | ".join(cells) + " |")
    return lines


def _bandwidth_table(rows) -> List[str]:
    """GB/s of each variant and its fraction of the copy bandwidth measured in the same run."""
    variants = [v for v in _variants(rows) if v != "copy"]
    lines = ["| density | copy GB/s | " + " | ".join(variants) + " |", "|---" * (len(variants) + 2) + "|"]
    for d, rs in _group(sorted(rows, key=lambda r: r["density"]), lambda r: r["density"]).items():
        by_v = {r["variant"]: r for r in rs}
        copy = by_v.get("copy")
        copy_bw = copy["gbps"] if copy and _ok(copy) else None
        cells = []
        for v in variants:
            r = by_v.get(v)
            if r is None or not _ok(r) or not r.get("gbps"):
                cells.append("-")
            else:
                frac = f" ({100 * r['gbps'] / copy_bw:.0f}% of copy)" if copy_bw else ""
                cells.append(f"{_fmt(r['gbps'])}{frac}")
        lines.append(f"| {d:g} | {_fmt(copy_bw)} | " + " | ".join(cells) + " |")
    return lines


def _summary_table(rows) -> List[str]:
    s = summary(rows)
    densities = sorted({r["density"] for r in rows})
    lines = ["| variant | " + " | ".join(f"d={d:g}" for d in densities) + " |", "|---" * (len(densities) + 1) + "|"]
    for v in [v for v in _variants(rows)] + ["ideal"]:
        if any(s.get(v, {}).get(d) for d in densities):
            lines.append(f"| {v} | " + " | ".join(_fmt(s[v].get(d)) + ("x" if s[v].get(d) else "") for d in densities) + " |")
    return lines


def _problems(rows) -> List[str]:
    """Skipped, failed and wrong variants, one line per (variant, reason) with a count."""
    seen = OrderedDict()
    for r in rows:
        if r["status"] != "ok":
            key = (r["status"], r["variant"], r["reason"] or "")
            seen[key] = seen.get(key, 0) + 1
    if not seen:
        return ["Every variant ran and passed its output check."]
    lines = ["| status | variant | cases | reason |", "|---|---|---|---|"]
    for (status, variant, reason), n in seen.items():
        lines.append(f"| {status} | {variant} | {n} | {reason.replace('|', '/')} |")
    return lines


def write_report(out_dir: str, rows, meta, plots: bool = True) -> str:
    """Write report.md (and the plots) into out_dir; return the report's path."""
    os.makedirs(out_dir, exist_ok=True)
    env = meta["environment"]
    device_label = "GPU" if env["device"] == "cuda" else "CPU"
    lines = [
        f"# dynkernels benchmark report: {env['device_name']} ({device_label})",
        "",
        f"- Date (UTC): {meta['run_id']}; sweep: `{meta['sweep']}`; wall time {meta['elapsed_s']} s",
        f"- Command: `{meta['command']}`",
        f"- Device: {env['device']} - {env['device_name']}; torch threads {env['threads']}",
        f"- Versions: torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, dynkernels {env['dynkernels']} "
        f"(CUDA kernels compiled: {env['cuda_kernels']})",
        f"- Timing: {', '.join(f'{k}={v}' for k, v in meta['timing'].items())}; inputs rotated over {meta['input_sets']} sets; "
        + ("CUDA events via `triton.testing.do_bench`, every variant (baselines too) the same way: one call per timed "
           "run, L2 flushed before each run, so a call's own host syncs and the launch latency that the flush does not "
           "hide are included (eager PyTorch as a user runs it)" if env["device"] == "cuda"
           else f"**CPU timings** with `time.perf_counter` (not GPU numbers), each case's variants timed in "
                f"{meta.get('rounds', 1)} interleaved rounds so that load from other processes hits them alike"),
        ("- Density-independent baselines (dense, masked, copy) are timed once per configuration"
         if env["device"] == "cuda" else "- Every case times its baseline again, next to its other variants"),
        f"- cuDNN benchmark mode {meta['cudnn_benchmark']}, cuDNN TF32 {meta['cudnn_allow_tf32']}, matmul TF32 {meta['matmul_allow_tf32']}",
        "",
        "Reading the tables: each cell is the median time and the speedup over the configuration's baseline "
        "(`dense` unless noted; `copy` for gather_rows, the reference for compact, `masked` for FBS/LC-Net). "
        "*ideal* = dense cost / cost of the active work (FLOPs; bytes for the memory-bound sample-gating ops), "
        "*efficiency* = speedup / ideal. `dense` runs every sample and channel; `masked` is dense compute times the "
        "gate (the papers' code); `naive` is plain PyTorch on the gathered active part; `reference` is "
        "`dynkernels.reference` (backend `torch`); `cpu`/`triton`/`cuda`/`auto` are our backends. p20/p80, "
        "FLOP and byte counts, TFLOP/s and GB/s are in results.csv / results.json.",
        "",
    ]
    for family, frows in _group(rows, lambda r: r["family"]).items():
        lines += [f"## {FAMILY_TITLES.get(family, family)}", "", FAMILY_NOTES.get(family, ""), ""]
        for op, orows in _group(frows, _op_key).items():
            if not any(_ok(r) for r in orows):
                lines += [f"`{op}`: nothing ran (see the reasons below).", ""]
                continue
            n = len({r["config"] for r in orows if _ok(r)})
            lines += [f"`{op}`: geometric-mean speedup over {n} configuration{'s' if n > 1 else ''}:", ""]
            lines += _summary_table(orows) + [""]
        if plots:
            try:
                png = plot_family(family, frows, os.path.join(out_dir, f"plot_{family}.png"))
            except ImportError as e:
                png = None
                lines += [f"(no plot: {e}; install matplotlib)", ""]
            if png:
                lines += [f"![{family}]({os.path.basename(png)})", ""]
        for config, crows in _group(frows, lambda r: r["config"]).items():
            if not _variants(crows):  # the whole configuration was skipped or failed
                reasons = sorted({r["reason"] or r["status"] for r in crows})
                lines += [f"### {config}", "", f"Not run ({crows[0]['status']}): {'; '.join(reasons)}", ""]
                continue
            lines += [f"### {config}", ""] + _config_table(crows) + [""]
            if family == "sample_gating" and any(r["variant"] == "copy" for r in crows):
                lines += ["Achieved GB/s (share of the copy bandwidth measured in the same run):", ""]
                lines += _bandwidth_table(crows) + [""]
        lines += ["### Skipped, failed or wrong", ""] + _problems(frows) + [""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
