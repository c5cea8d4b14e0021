"""compact / gather_rows / scatter_add_rows / scatter_rows: memory-bound, so measured in GB/s against the
copy bandwidth (x.clone()) measured in the same run.

Byte counts (rows of R bytes, N rows, k active): copy 2N*R; gather (capacity N) reads k
rows and writes N (zeros past count): (k + N)*R; scatter_add_rows reads base and k rows of y
and writes out: (2N + k)*R, against the masked dense update base + g*y, 3N*R. scatter_rows
(SkipBlock's merge) reads k rows of y and N - k of base and writes N: 2N*R, the copy's bytes,
against the masked merge where(m, y, base), 3N*R; SkipBlock's earlier merge (a mask multiply,
then scatter_add_rows) moved (4N + k)*R.
"""
from typing import List

import torch

import dynkernels
from dynkernels import reference

from ..harness import Case, Setup, Variant
from ._common import DTYPES, RunConfig, active_count, backend_variants, exact_gate, randn, sample_gate, seeded

NAME = "sample_gating"


def _sweep(cfg: RunConfig):
    if cfg.full:
        return {
            "shapes": [(16, 32, 32), (256, 56, 56)],  # ResNet-110 stage 1, ResNet-101 layer 1 activations
            "batches": [64, 128],
            "dtypes": ["bfloat16", "float32"],
            "densities": [0.05, 0.1, 0.25, 0.5, 0.75, 1.0],
            "policies": [(54, 128), (33, 64)],  # BlockDrop ResNet-110 / ResNet-101 policy [blocks, N]
        }
    if cfg.smoke:
        return {"shapes": [(4, 4, 4)], "batches": [8], "dtypes": ["float32"], "densities": [0.5, 1.0], "policies": [(3, 8)]}
    return {
        "shapes": [(16, 16, 16)],
        "batches": [64],
        "dtypes": ["float32"],
        "densities": [0.125, 0.25, 0.5, 0.75, 1.0],
        "policies": [(54, 64)],
    }


def _shape_str(n, row):
    return "x".join(str(d) for d in (n,) + tuple(row))


def _gather_case(cfg: RunConfig, n, row, dtype, d) -> Case:
    config = f"gather_rows x[{_shape_str(n, row)}] {dtype}"

    def setup():
        dt, dev = DTYPES[dtype], cfg.device
        g, gd = seeded(1), seeded(1, dev)
        sets = []
        for _ in range(cfg.input_sets):
            x = randn((n,) + row, dev, dt, gd)
            gate = sample_gate(n, d, dev, generator=g)
            idx, count = reference.compact(gate)
            sets.append((x, gate, idx, count))
        row_bytes = sets[0][0][0].numel() * sets[0][0].element_size()
        k = active_count(n, d)
        variants = [
            Variant("copy", lambda: lambda x, gate, idx, count: x.clone(), work="dense", shared_key=(config, "copy")),
            Variant(
                "naive", lambda: lambda x, gate, idx, count: x.index_select(0, gate.nonzero().squeeze(1)),
                executed_bytes=2 * k * row_bytes,
            ),
        ] + backend_variants(
            "gather_rows", cfg,
            lambda b: lambda x, gate, idx, count: dynkernels.ops.gather_rows(x, idx, count, backend=b),
            compare_to="reference",
        )
        return Setup(sets, variants, dense_bytes=2 * n * row_bytes, sparse_bytes=(k + n) * row_bytes)

    return Case(NAME, "gather_rows", config, _shape_str(n, row), n, dtype, d, setup, baseline="copy")


def _merge_inputs(cfg: RunConfig, n, row, dtype, d, seed):
    """Input sets (base, y, gate, idx, count) of a merge op (scatter_add_rows, scatter_rows),
    each set's gate drawn at density d, and the bytes of one row."""
    dt, dev = DTYPES[dtype], cfg.device
    g, gd = seeded(seed), seeded(seed, dev)
    sets = []
    for _ in range(cfg.input_sets):
        base = randn((n,) + row, dev, dt, gd)
        y = randn((n,) + row, dev, dt, gd)
        gate = sample_gate(n, d, dev, dtype=dt, generator=g)
        idx, count = reference.compact(gate)
        sets.append((base, y, gate, idx, count))
    return sets, sets[0][0][0].numel() * sets[0][0].element_size()


def _merge_copy_variant(config, n, row_bytes) -> Variant:
    """base.clone(): the copy bandwidth a merge op is measured against."""
    return Variant("copy", lambda: lambda base, y, gate, idx, count: base.clone(), work="dense",
                   shared_key=(config, "copy"), executed_bytes=2 * n * row_bytes)


def _scatter_case(cfg: RunConfig, n, row, dtype, d) -> Case:
    config = f"scatter_add_rows base[{_shape_str(n, row)}] {dtype}"

    def setup():
        sets, row_bytes = _merge_inputs(cfg, n, row, dtype, d, seed=2)
        k = active_count(n, d)
        bcast = (n,) + (1,) * len(row)
        variants = [
            _merge_copy_variant(config, n, row_bytes),
            # masked dense: what a dense network does with a 0/1 block gate
            Variant("dense", lambda: lambda base, y, gate, idx, count: torch.addcmul(base, gate.view(bcast), y),
                    work="dense", shared_key=(config, "dense")),
            Variant(
                "naive",
                lambda: lambda base, y, gate, idx, count: base.index_add(0, gate.nonzero().squeeze(1), y[: int(count)]),
                compare_to="reference",
            ),
        ] + backend_variants(
            "scatter_add_rows", cfg,
            lambda b: lambda base, y, gate, idx, count: dynkernels.ops.scatter_add_rows(base, y, idx, count, backend=b),
            compare_to="reference",
        )
        return Setup(sets, variants, dense_bytes=3 * n * row_bytes, sparse_bytes=(2 * n + k) * row_bytes)

    return Case(NAME, "scatter_add_rows", config, _shape_str(n, row), n, dtype, d, setup)


def _scatter_rows_case(cfg: RunConfig, n, row, dtype, d) -> Case:
    config = f"scatter_rows base[{_shape_str(n, row)}] {dtype}"

    def setup():
        sets, row_bytes = _merge_inputs(cfg, n, row, dtype, d, seed=4)
        k = active_count(n, d)
        bcast = (n,) + (1,) * len(row)
        variants = [
            _merge_copy_variant(config, n, row_bytes),
            # the masked merge of a dense network: where(m, block result, shortcut)
            Variant("dense", lambda: lambda base, y, gate, idx, count: torch.where(gate.view(bcast) > 0, y, base),
                    work="dense", shared_key=(config, "dense")),
            # SkipBlock's earlier merge: zero the kept rows, then scatter_add_rows
            Variant(
                "mask+scatter_add",
                lambda: lambda base, y, gate, idx, count: dynkernels.ops.scatter_add_rows(
                    base * (gate <= 0).to(base.dtype).view(bcast), y, idx, count),
                compare_to="reference", executed_bytes=(4 * n + k) * row_bytes,
            ),
        ] + backend_variants(
            "scatter_rows", cfg,
            lambda b: lambda base, y, gate, idx, count: dynkernels.ops.scatter_rows(base, y, idx, count, backend=b),
            compare_to="reference",
        )
        return Setup(sets, variants, dense_bytes=3 * n * row_bytes, sparse_bytes=2 * n * row_bytes)

    return Case(NAME, "scatter_rows", config, _shape_str(n, row), n, dtype, d, setup)


def _compact_case(cfg: RunConfig, blocks, n, d) -> Case:
    config = f"compact gate[{blocks}x{n}]"

    def setup():
        g = seeded(3)
        sets = [(exact_gate(blocks, n, d, cfg.device, generator=g),) for _ in range(cfg.input_sets)]
        variants = [
            Variant("reference", lambda: lambda gate: reference.compact(gate), backend="torch"),
            Variant("naive", lambda: lambda gate: (gate > 0).nonzero()),
        ] + backend_variants(
            "compact", cfg, lambda b: lambda gate: dynkernels.ops.compact(gate, backend=b),
            compare_to="reference", backends=("cpu", "triton", "cuda", "auto"),
        )
        # reads the gate, writes idx and count
        return Setup(sets, variants, sparse_bytes=blocks * n * 8 + blocks * 4)

    return Case(NAME, "compact", config, f"{blocks}x{n}", n, "float32", d, setup, baseline="reference")


def sweep(cfg: RunConfig) -> List[Case]:
    s = _sweep(cfg)
    out = []
    for blocks, n in s["policies"]:
        out += [_compact_case(cfg, blocks, n, d) for d in s["densities"]]
    for make in (_gather_case, _scatter_case, _scatter_rows_case):
        for row in s["shapes"]:
            for n in s["batches"]:
                for dtype in s["dtypes"]:
                    out += [make(cfg, n, row, dtype, d) for d in s["densities"]]
    return out
