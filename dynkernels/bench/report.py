"""The Markdown report (report.md) and its plots (plot_<family>.png) from result rows.

The header says where and how everything was measured (device, CPU model and ISA, threads,
load, versions, commands, timer, the rates behind the floor column). Then the target
verdicts, if any row has a target; then per family: a summary (geometric-mean speedup of
each variant at each density over the family's configurations), one plot (speedup versus
density with the ideal line and the 1x line, and efficiency = speedup / ideal), and one
table per configuration (with the CUDA-graph and host times where measured). Rows that were
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
    "skip_blocks": "Sample-sparse residual blocks (SkipBlock, SkipSequential)",
    "models": "End-to-end models",
}
FAMILY_NOTES = {
    "sample_gating": "Memory-bound, so the ideal comes from bytes moved. `gather_rows` writes all N rows (zeros past "
    "count: the count stays on the device, so the capacity is N); `naive` (`index_select` on `nonzero`, a host sync) "
    "returns only the k active rows, fewer bytes but a data-dependent shape. `scatter_add_rows` is out of place "
    "(reads and writes all of base); `dense` is `base + g * y`. `compact` has no dense counterpart: its speedups are "
    "over the reference (a stable sort).",
    "channel_sparse_conv": "Ideal = 1/d for output gating (`out`), 1/d^2 for input and output gating (`in+out`). "
    "`dense` = `F.conv2d` (cuDNN on a GPU, oneDNN on the CPU); `masked` = conv then multiply by the gate (FBS's "
    "code); `naive` = one dense conv per sample on its active input channels and weight rows (gates read on the "
    "host once per call); `GatedConv2d` = the module with backend `auto`.",
    "skip_blocks": "A block is a whole residual block relu(x + F(x)) in eval mode. `dense` = the block on every "
    "sample; `masked` = block(x) * m + x * (1 - m) (BlockDrop's code); `naive` = index_select -> block -> index_copy "
    "(one host sync). `SkipBlock-<backend>` compacts its own gate in every call (one host sync per call, which on a "
    "GPU also exposes the launch latency of the kernels after it); `SkipBlock-<backend>+plan` gets the row of a "
    "SkipPlan built outside the timed call, as BlockDrop's models do once per forward for all blocks (no sync). "
    "`SkipSequential-*` run a chain of blocks planned at once. Each sparse one is checked against its masked twin.",
    "models": "BlockDrop policies keep each block per sample at density d (a fixed count per sample where the "
    "configuration says so); FBS, LC-Net and SkipNet gate with their own gates. Ideal = dense FLOPs / FLOPs the "
    "gates leave to compute, both by `dynkernels.model_flops`: it includes the gates and "
    "the parts that always run (stem, downsampling shortcuts, classifier). `sparse-*` outputs are checked against "
    "`masked`; `agent-cuda` also runs the policy network (its FLOPs count in its TFLOP/s and floor, not in the ideal).",
}
MAX_PLOT_PANELS = 6  # columns of a family's plot
# Baselines first, then our backends; names not listed keep their order of appearance after these.
VARIANT_ORDER = ["dense", "copy", "masked", "naive", "reference", "cpu", "triton", "cuda", "auto"]


def _fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
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


def _by_density(rows) -> "OrderedDict":
    return _group(sorted(rows, key=lambda r: r["density"]), lambda r: r["density"])


def _variants(rows) -> List[str]:
    seen = list(OrderedDict.fromkeys(r["variant"] for r in rows if r["variant"] != "all"))
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return sorted(seen, key=lambda v: (rank.get(v, len(rank)), seen.index(v)))


def _op_key(r) -> str:
    """What a geometric mean may average over: one op (and one gating mode, e.g. out vs in+out)."""
    return f"{r['op']} ({r['mode']})" if r.get("mode") else r["op"]


def _table(headers: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]


def summary(rows) -> Dict[str, Dict[float, Optional[float]]]:
    """variant -> density -> geometric-mean speedup over configurations (ok rows), plus 'ideal'."""
    out: Dict[str, Dict[float, Optional[float]]] = defaultdict(dict)
    for d, rs in _by_density(rows).items():
        for v in _variants(rows):
            out[v][d] = _geomean([r["speedup"] for r in rs if r["variant"] == v and _ok(r)])
        ideals = {r["config"]: r["ideal_speedup"] for r in rs if r.get("ideal_speedup")}
        out["ideal"][d] = _geomean(list(ideals.values()))
    return out


# ----------------------------------------------------------------------------- plots
def plot_family(title: str, rows, path: str) -> Optional[str]:
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
    panels = panels[:MAX_PLOT_PANELS]
    variants = _variants(ok_rows)
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    for col, (panel_title, prs, is_mean) in enumerate(panels):
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
        top.set_title("\n".join(textwrap.wrap(panel_title, 44)), fontsize=8)
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
    fig.legend([legend[lab] for lab in labels], labels, loc="lower center", ncol=min(8, len(labels)), fontsize=8)
    r0 = ok_rows[0]
    where = r0["device_name"] if r0["device"] == "cuda" else f"{r0['cpu'] or r0['device_name']} {r0.get('cpu_isa') or ''}"
    fig.suptitle(f"{title} - {where} ({r0['timer']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- tables
def _cell(r) -> str:
    if r is None:
        return "-"
    if r["status"] in ("skipped", "error") or r.get("median_ms") is None:
        return r["status"]
    text = f"{_fmt(r['median_ms'])} ms, {_fmt(r['speedup'])}x"
    if r.get("overhead_us") is not None:
        text += f", {r['overhead_us']:+.1f} us"
    if r["status"] == "mismatch":
        text += " (wrong output)"
    elif r.get("target_met") is not None:
        text += f" ({'met' if r['target_met'] else 'miss'}: >= {_fmt(r['target_speedup'])}x)"
    return text


def _config_tables(rows) -> List[str]:
    """density x variant: median and speedup; ideal and floor side by side. Then the CUDA-graph
    and host times, where measured."""
    variants = _variants(rows)
    main, extra = [], []
    for d, rs in _by_density(rows).items():
        by_v = {r["variant"]: r for r in rs}
        ideal = next((r["ideal_speedup"] for r in rs if r.get("ideal_speedup")), None)
        floors = [r for r in rs if r.get("floor_ms")]
        floor = min(floors, key=lambda r: r["floor_ms"]) if floors else None
        floor_cell = "-"
        if floor:
            floor_cell = f"{_fmt(floor['floor_ms'])} ms" + (f", {_fmt(floor['baseline_ms'] / floor['floor_ms'])}x"
                                                           if floor.get("baseline_ms") else "")
        main.append([f"{d:g}", _fmt(ideal), floor_cell] + [_cell(by_v.get(v)) for v in variants])
        if any(r.get("graph_ms") or r.get("host_ms") for r in rs):
            cells = []
            for v in variants:
                r = by_v.get(v) or {}
                parts = []
                if r.get("graph_ms"):
                    speedup = f", {_fmt(r['graph_speedup'])}x" if r.get("graph_speedup") else ""
                    parts.append(f"graph {_fmt(r['graph_ms'])} ms{speedup}")
                if r.get("host_ms"):
                    parts.append(f"host {_fmt(r['host_ms'])} ms")
                if parts and r.get("first_call_ms"):
                    parts.append(f"first call {_fmt(r['first_call_ms'])} ms")
                cells.append("; ".join(parts) or "-")
            extra.append([f"{d:g}"] + cells)
    lines = _table(["density", "ideal", "floor (its speedup)"] + variants, main) + [""]
    if extra:
        lines += ["CUDA-graph replay (GPU work only; speedup over the baseline's replay), host time per call and the "
                  "first call (steady state above; the first call includes lazy initialisation, compilation and autotuning):", ""]
        lines += _table(["density"] + variants, extra) + [""]
    return lines


def _summary_table(rows) -> List[str]:
    s = summary(rows)
    densities = sorted({r["density"] for r in rows})
    body = [[v] + [_fmt(s[v].get(d)) + ("x" if s[v].get(d) else "") for d in densities]
            for v in _variants(rows) + ["ideal"] if any(s.get(v, {}).get(d) for d in densities)]
    return _table(["variant"] + [f"d={d:g}" for d in densities], body)


def verdicts(rows) -> List[str]:
    """One line per target: how many measured configurations meet it, the worst and the geomean."""
    targeted = [r for r in rows if r.get("target")]
    if not targeted:
        return []
    body = []
    for label, rs in _group(targeted, lambda r: r["target"]).items():
        measured = [r for r in rs if r.get("target_met") is not None]
        missing = len(rs) - len(measured)
        if not measured:
            body.append([label, "-", "not measured", "-", "-", f"{missing} not measured (see below)"])
            continue
        worst = min(measured, key=lambda r: r["speedup"] / r["target_speedup"])
        met = sum(bool(r["target_met"]) for r in measured)
        verdict = "**met**" if met == len(measured) and not missing else "**missed**" if met < len(measured) else "met where measured"
        body.append([label, verdict, f"{met} of {len(measured)}" + (f" ({missing} not measured)" if missing else ""),
                     f"{_fmt(worst['speedup'])}x (needs {_fmt(worst['target_speedup'])}x; {worst['config']}, d={worst['density']:g})",
                     f"{_fmt(_geomean([r['speedup'] for r in measured]))}x", _fmt(worst["ideal_speedup"]) + "x"])
    return ["## Targets", ""] + _table(["target", "verdict", "configurations meeting it", "worst", "geomean speedup",
                                        "ideal (worst's)"], body) + [""]


def _problems(rows) -> List[str]:
    """Skipped, failed and wrong variants, one line per (variant, reason) with a count."""
    seen = OrderedDict()
    for r in rows:
        if r["status"] != "ok":
            key = (r["status"], r["variant"], r["reason"] or "")
            seen[key] = seen.get(key, 0) + 1
    if not seen:
        return ["Every variant ran and passed its output check."]
    return _table(["status", "variant", "cases", "reason"], [[s, v, n, reason] for (s, v, reason), n in seen.items()])


def _span(rows, key) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{min(values):g} to {max(values):g}" if values else "-"


def _distinct(rows, key) -> str:
    return ", ".join(str(v) for v in dict.fromkeys(r.get(key) for r in rows if r.get(key) is not None)) or "-"


def header(rows, meta) -> List[str]:
    r0 = rows[0] if rows else {}
    gpu = any(r["device"] == "cuda" for r in rows)
    rates = meta.get("rates", {})
    lines = [
        f"# dynkernels benchmark report: {_distinct(rows, 'suite')} on {r0.get('device_name', '?')} ({'GPU' if gpu else 'CPU'})",
        "",
        f"- Date (UTC): {_distinct(rows, 'run_id')}; wall time {meta.get('elapsed_s', '?')} s",
        f"- Commands: {', '.join(f'`{c}`' for c in dict.fromkeys(r['command'] for r in rows if r.get('command'))) or '-'}",
        *(["- **Smoke run**: tiny tensors and a few runs; the numbers only show that the code runs"]
          if meta.get("sweep") == "smoke" else []),
        (f"- GPU: {_distinct([r for r in rows if r['device'] == 'cuda'], 'device_name')}; " if gpu else "- ")
        + f"CPU: {_distinct(rows, 'cpu')} ({_distinct(rows, 'cpu_isa')}), "
        f"{meta.get('logical_cpus', '?')} logical CPUs; torch threads {_distinct(rows, 'threads')}; "
        f"load average (1 min) {_span(rows, 'load')} while the cases ran (per row in results.csv)",
        f"- Versions: torch {r0.get('torch')}, Triton {r0.get('triton')}, CUDA {r0.get('cuda')}, dynkernels "
        f"{r0.get('dynkernels')} (CUDA kernels compiled: {r0.get('cuda_kernels')})",
        f"- Timing: {', '.join(f'{k}={v}' for k, v in meta.get('timing', {}).items())}; inputs rotated over "
        f"{meta.get('input_sets', '?')} sets; timers: {_distinct(rows, 'timer')}; "
        + ("every variant (baselines too) one call per timed run, L2 flushed before each run, so a call's own host "
           "syncs and the launch latency that the flush does not hide are included; density-independent baselines "
           "are timed once per configuration" if gpu else
           "**CPU timings** (not GPU numbers), each case's variants, baseline included, timed in interleaved rounds"),
        *([f"- Memory: {meta['malloc']}"] if meta.get("malloc") else []),
        f"- cuDNN benchmark mode {meta.get('cudnn_benchmark')}, cuDNN TF32 {meta.get('cudnn_allow_tf32')}, matmul TF32 "
        f"{meta.get('matmul_allow_tf32')}",
        "",
    ]
    if rates:
        lines += ["Rates behind the floor column (measured in this run with the same timer; the matrix rate is the "
                  "faster of a square matmul and a 3x3 convolution):", ""]
        lines += _table(["dtype, threads", "matrix TFLOP/s", "matmul TFLOP/s", "conv TFLOP/s", "copy GB/s"],
                        [[k, _fmt(v["matrix_tflops"]), _fmt(v["matmul_tflops"]), _fmt(v["conv_tflops"]), _fmt(v["copy_gbps"])]
                         for k, v in rates.items()]) + [""]
    lines += [
        "Reading the tables: each cell is the median time and the speedup over the configuration's baseline "
        "(`dense` unless noted; `copy` for gather_rows, the reference for compact, `masked` for FBS/LC-Net and the CPU "
        "chain and ResNet-110 targets). *ideal* = dense cost / cost of the active work (FLOPs; bytes for the "
        "memory-bound sample-gating ops), *efficiency* = speedup / ideal; *floor* = the least time of the active work "
        "on this device, max(FLOPs / matrix rate, bytes / copy bandwidth), and the speedup it would give. p20/p80, "
        "FLOP and byte counts, TFLOP/s and GB/s are in results.csv / results.json.",
        "",
    ]
    return lines


def write_report(out_dir: str, rows, meta, plots: bool = True) -> str:
    """Write report.md (and the plots) into out_dir; return the report's path."""
    os.makedirs(out_dir, exist_ok=True)
    lines = header(rows, meta) + verdicts(rows)
    suites = _group(rows, lambda r: r["suite"])
    for suite, srows in suites.items():
        for family, frows in _group(srows, lambda r: r["family"]).items():
            title = FAMILY_TITLES.get(family, family) + (f" ({suite} suite)" if len(suites) > 1 else "")
            lines += [f"## {title}", "", FAMILY_NOTES.get(family, ""), ""]
            for op, orows in _group(frows, _op_key).items():
                if not any(_ok(r) for r in orows):
                    lines += [f"`{op}`: nothing ran (see the reasons below).", ""]
                    continue
                n = len({r["config"] for r in orows if _ok(r)})
                lines += [f"`{op}`: geometric-mean speedup over {n} configuration{'s' if n > 1 else ''}:", ""]
                lines += _summary_table(orows) + [""]
            if plots:
                name = f"plot_{family}.png" if len(suites) == 1 else f"plot_{suite}_{family}.png"
                try:
                    png = plot_family(title, frows, os.path.join(out_dir, name))
                except ImportError as e:
                    png = None
                    lines += [f"(no plot: {e}; install matplotlib)", ""]
                if png:
                    lines += [f"![{family}]({name})", ""]
            for config, crows in _group(frows, lambda r: r["config"]).items():
                lines += [f"### {config}", ""]
                if not _variants(crows):  # the whole configuration was skipped or failed
                    lines += [f"Not run ({crows[0]['status']}): {'; '.join(sorted({r['reason'] or r['status'] for r in crows}))}", ""]
                    continue
                lines += _config_tables(crows)
            lines += ["### Skipped, failed or wrong", ""] + _problems(frows) + [""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
