"""Triton kernels for compact, gather_rows, scatter_add_rows, scatter_rows and scatter_rows_ (contract: DESIGN.md).

Same semantics and output layouts as the C++/CUDA kernels (csrc/cpu, csrc/cuda), exposed as
torch.ops.dynkernels.{compact,gather_rows,scatter_add_rows,scatter_rows}_triton and
torch.ops.dynkernels.scatter_rows_triton_ (in place) with torch.library.triton_op so that
torch.compile can trace into them; autograd is added by dynkernels.ops.sample_gating. No op
reads a device value on the host: count is loaded by the kernels, so launches cover every row
they might touch and the rows past count do the cheap part (write zeros, copy base).
Out-of-range idx entries are skipped (gather writes a zero row, scatter_rows leaves that output
row unwritten, scatter_rows_ that row of base untouched), never read or written out of bounds.
idx has M entries (M = N for compact's idx); count is clamped to M as well.
"""
import math
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import wrap_triton

from .._layout import row_layout

_MAX_GRID_Y = 65535


def _float64_bits(v: float) -> int:
    # Triton passes Python floats as fp32; the threshold travels as the bits of its float64
    # so the comparison is done in float64, like the other backends.
    return struct.unpack("<q", struct.pack("<d", v))[0]


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


# ----------------------------------------------------------------------------- compact
@triton.jit(do_not_specialize=["N", "threshold_bits"])
def _compact_kernel(gate_ptr, idx_ptr, count_ptr, N, threshold_bits, BLOCK: tl.constexpr):
    # One program per gate row. Pass 1 counts the active entries (where the inactive group
    # starts); pass 2 ranks each entry with a prefix sum: active entry j goes to
    # idx[actives before j], inactive entry j to idx[total + j - actives before j].
    row = tl.program_id(0).to(tl.int64)
    gate_row = gate_ptr + row * N
    idx_row = idx_ptr + row * N
    threshold = threshold_bits.to(tl.int64).to(tl.float64, bitcast=True)
    offs = tl.arange(0, BLOCK)

    total = 0
    for start in range(0, N, BLOCK):
        j = start + offs
        g = tl.load(gate_row + j, mask=j < N, other=0)
        active = (g.to(tl.float64) > threshold) & (j < N)
        total += tl.sum(active.to(tl.int32), axis=0)
    tl.store(count_ptr + row, total)

    before = 0
    for start in range(0, N, BLOCK):
        j = start + offs
        in_row = j < N
        g = tl.load(gate_row + j, mask=in_row, other=0)
        active = ((g.to(tl.float64) > threshold) & in_row).to(tl.int32)
        rank = before + tl.cumsum(active, axis=0) - active  # actives before j
        dest = tl.where(active != 0, rank, total + j - rank)
        tl.store(idx_row + dest, j.to(tl.int32), mask=in_row)
        before += tl.sum(active, axis=0)


@triton_op("dynkernels::compact_triton", mutates_args=())
def compact_triton(gate: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton `compact`: gate [N] or [B, N] -> (idx of gate's shape, count [1] or [B]), int32."""
    torch._check(gate.dim() in (1, 2), lambda: f"compact: gate must be [N] or [B, N], got shape {tuple(gate.shape)}")
    g = gate.contiguous()
    if g.dtype == torch.bool:
        g = g.view(torch.uint8)  # one byte per entry, loaded as 0/1
    rows = g.shape[0] if g.dim() == 2 else 1
    n = g.shape[-1]
    idx = torch.empty(gate.shape, dtype=torch.int32, device=gate.device)
    count = torch.empty((rows,), dtype=torch.int32, device=gate.device)
    if rows > 0:
        wrap_triton(_compact_kernel)[(rows,)](g, idx, count, n, _float64_bits(threshold), BLOCK=_block(n, 1024))
    return idx, count


# ----------------------------------------------------------------------------- gather_rows
@triton.jit(do_not_specialize=["N", "M", "capacity"])
def _gather_rows_kernel(x_ptr, idx_ptr, count_ptr, y_ptr, N, M, capacity, row_elems, BLOCK: tl.constexpr):
    # program (i, chunk): row i of y, columns chunk*BLOCK, (chunk + chunks)*BLOCK, ...
    i = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(count_ptr), 0), tl.minimum(capacity, M))
    r = tl.load(idx_ptr + i, mask=i < n, other=-1).to(tl.int64)
    valid = (r >= 0) & (r < N)  # rows past count and out-of-range entries give zero rows
    r = tl.where(valid, r, 0)
    for start in range(tl.program_id(1) * BLOCK, row_elems, tl.num_programs(1) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < row_elems
        v = tl.load(x_ptr + r * row_elems + offs, mask=in_row & valid, other=0)
        tl.store(y_ptr + i * row_elems + offs, v, mask=in_row)


@triton_op("dynkernels::gather_rows_triton", mutates_args=())
def gather_rows_triton(x: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, capacity: int) -> torch.Tensor:
    """Triton `gather_rows`: y[i] = x[idx[i]] for i < count, zero rows up to capacity."""
    torch._check(x.dim() >= 1, lambda: "gather_rows: x must have at least one dimension")
    torch._check(capacity >= 0, lambda: f"gather_rows: capacity must be >= 0, got {capacity}")
    torch._check(idx.dim() == 1, lambda: "gather_rows: idx must be 1-D")
    torch._check(count.numel() == 1, lambda: "gather_rows: count must have one element")
    fmt = row_layout(x)
    xc = x.contiguous(memory_format=fmt)
    y = torch.empty((capacity,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    row_elems = math.prod(x.shape[1:])
    if capacity > 0 and row_elems > 0:
        block = _block(row_elems, 2048)
        grid = (capacity, min(triton.cdiv(row_elems, block), _MAX_GRID_Y))
        wrap_triton(_gather_rows_kernel)[grid](xc, idx.contiguous(), count, y, x.shape[0], idx.shape[0], capacity, row_elems, BLOCK=block)
    return y


# ----------------------------------------------------------------------------- scatter_add_rows
@triton.jit(do_not_specialize=["N", "limit"])
def _inverse_index_kernel(idx_ptr, count_ptr, inv_ptr, N, limit, BLOCK: tl.constexpr):
    # inv[idx[i]] = i for i < count (idx entries out of range are skipped).
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n = tl.minimum(tl.maximum(tl.load(count_ptr), 0), limit)
    listed = i < n
    r = tl.load(idx_ptr + i, mask=listed, other=-1)
    ok = listed & (r >= 0) & (r < N)
    tl.store(inv_ptr + tl.where(ok, r, 0), i.to(tl.int32), mask=ok)


@triton.jit(do_not_specialize=["N", "limit"])
def _scatter_add_rows_kernel(
    base_ptr, y_ptr, idx_ptr, count_ptr, inv_ptr, scale_ptr, out_ptr, N, limit, row_elems,
    HAS_SCALE: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    # One pass over all rows of base: out[r] = base[r] + s[r] * y[j] when r = idx[j] for some
    # j < count, else base[r]. inv is never cleared: row r trusts j = inv[r] only when
    # j < count and idx[j] == r, which a stale value of an unlisted row cannot satisfy.
    r = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(count_ptr), 0), limit)
    j = tl.load(inv_ptr + r)
    listed = (j >= 0) & (j < n)
    active = listed & (tl.load(idx_ptr + tl.where(listed, j, 0), mask=listed, other=-1) == r)
    j = tl.where(active, j, 0).to(tl.int64)
    if HAS_SCALE:
        s = tl.load(scale_ptr + r)  # already in the accumulation dtype
    else:
        s = 1.0
    for start in range(tl.program_id(1) * BLOCK, row_elems, tl.num_programs(1) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < row_elems
        b = tl.load(base_ptr + r * row_elems + offs, mask=in_row)
        v = tl.load(y_ptr + j * row_elems + offs, mask=in_row & active, other=0)
        # Summed in float32 (float64 for float64 data) and rounded once, like the other backends.
        if FP64:
            total = b.to(tl.float64) + s * v.to(tl.float64)
        else:
            total = b.to(tl.float32) + s * v.to(tl.float32)
        tl.store(out_ptr + r * row_elems + offs, tl.where(active, total.to(b.dtype), b), mask=in_row)


def _check_merge_shapes(op: str, base, y, idx, count, permutation: bool):
    """The shape checks the merge ops share; idx is [base.shape[0]] for a permutation, else any length."""
    torch._check(base.dim() >= 1, lambda: f"{op}: base must have at least one dimension")
    torch._check(y.dim() == base.dim() and y.shape[1:] == base.shape[1:], lambda: f"{op}: y must be [capacity, *base.shape[1:]]")
    torch._check(y.dtype == base.dtype, lambda: f"{op}: y must have base's dtype")
    torch._check(idx.dim() == 1 and (not permutation or idx.shape[0] == base.shape[0]), lambda: f"{op}: idx must be [base.shape[0]]")
    torch._check(count.numel() == 1, lambda: f"{op}: count must have one element")


def _merge_operands(op: str, base, y, idx, count, permutation: bool):
    """The shape checks, then (base, y) in base's row layout, the empty output in it, and the
    elements per row."""
    _check_merge_shapes(op, base, y, idx, count, permutation)
    fmt = row_layout(base)
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device, memory_format=fmt)
    return base.contiguous(memory_format=fmt), y.contiguous(memory_format=fmt), out, math.prod(base.shape[1:])


@triton_op("dynkernels::scatter_add_rows_triton", mutates_args=())
def scatter_add_rows_triton(
    base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, scale: Optional[torch.Tensor]
) -> torch.Tensor:
    """Triton `scatter_add_rows`: out = base; out[idx[i]] += scale[idx[i]] * y[i] for i < count."""
    n_rows = base.shape[0]
    bc, yc, out, row_elems = _merge_operands("scatter_add_rows", base, y, idx, count, permutation=False)
    torch._check(scale is None or (scale.dim() == 1 and scale.shape[0] == n_rows), lambda: "scatter_add_rows: scale must be [base.shape[0]]")
    if n_rows == 0 or row_elems == 0:
        return out
    limit = min(y.shape[0], idx.shape[0])
    ic = idx.contiguous()
    inv = torch.empty((n_rows,), dtype=torch.int32, device=base.device)  # see _scatter_add_rows_kernel
    if limit > 0:
        block_i = _block(limit, 1024)
        wrap_triton(_inverse_index_kernel)[(triton.cdiv(limit, block_i),)](ic, count, inv, n_rows, limit, BLOCK=block_i)
    block = _block(row_elems, 2048)
    grid = (n_rows, min(triton.cdiv(row_elems, block), _MAX_GRID_Y))
    fp64 = base.dtype == torch.float64
    # Like the C++ kernels: scale converted to the accumulation dtype first.
    s = scale.to(torch.float64 if fp64 else torch.float32).contiguous() if scale is not None else bc
    wrap_triton(_scatter_add_rows_kernel)[grid](
        bc, yc, ic, count, inv, s, out, n_rows, limit, row_elems,
        HAS_SCALE=scale is not None, FP64=fp64, BLOCK=block,
    )
    return out


# ----------------------------------------------------------------------------- scatter_rows
@triton.jit(do_not_specialize=["N", "limit"])
def _scatter_rows_kernel(base_ptr, y_ptr, idx_ptr, count_ptr, out_ptr, N, limit, row_elems, BLOCK: tl.constexpr):
    # program (i, chunk): position i of idx copies y[i] (i < count) or base[idx[i]] (the
    # others) to out[idx[i]]; with idx a permutation, each output row is written exactly once.
    i = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(count_ptr), 0), limit)
    r = tl.load(idx_ptr + i).to(tl.int64)
    valid = (r >= 0) & (r < N)  # out-of-range entries are skipped
    r = tl.where(valid, r, 0)
    from_y = i < n
    for start in range(tl.program_id(1) * BLOCK, row_elems, tl.num_programs(1) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = (offs < row_elems) & valid
        # Two masked loads of which only one reads memory.
        v = tl.load(y_ptr + i * row_elems + offs, mask=in_row & from_y, other=0)
        b = tl.load(base_ptr + r * row_elems + offs, mask=in_row & (i >= n), other=0)
        tl.store(out_ptr + r * row_elems + offs, tl.where(from_y, v, b), mask=in_row)


@triton_op("dynkernels::scatter_rows_triton", mutates_args=())
def scatter_rows_triton(base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Triton `scatter_rows`: out[idx[i]] = y[i] for i < count, base[idx[i]] for the other i."""
    n_rows = base.shape[0]
    bc, yc, out, row_elems = _merge_operands("scatter_rows", base, y, idx, count, permutation=True)
    if n_rows > 0 and row_elems > 0:
        block = _block(row_elems, 2048)
        grid = (n_rows, min(triton.cdiv(row_elems, block), _MAX_GRID_Y))
        limit = min(y.shape[0], n_rows)
        wrap_triton(_scatter_rows_kernel)[grid](bc, yc, idx.contiguous(), count, out, n_rows, limit, row_elems, BLOCK=block)
    return out


# ----------------------------------------------------------------------------- scatter_rows_
@triton.jit(do_not_specialize=["N", "limit"])
def _scatter_rows_inplace_kernel(base_ptr, y_ptr, idx_ptr, count_ptr, N, limit, row_elems, BLOCK: tl.constexpr):
    # program (i, chunk): position i < count copies y[i] to base[idx[i]]; nothing else is touched.
    i = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(count_ptr), 0), limit)
    listed = i < n
    r = tl.load(idx_ptr + i, mask=listed, other=-1).to(tl.int64)
    valid = listed & (r >= 0) & (r < N)  # out-of-range entries are skipped
    r = tl.where(valid, r, 0)
    for start in range(tl.program_id(1) * BLOCK, row_elems, tl.num_programs(1) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = (offs < row_elems) & valid
        v = tl.load(y_ptr + i * row_elems + offs, mask=in_row)
        tl.store(base_ptr + r * row_elems + offs, v, mask=in_row)


@triton_op("dynkernels::scatter_rows_triton_", mutates_args={"base"})
def scatter_rows_triton_(base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> None:
    """Triton `scatter_rows_`: base[idx[i]] = y[i] for i < count, in place."""
    _check_merge_shapes("scatter_rows_", base, y, idx, count, permutation=False)
    fmt = row_layout(base)
    torch._check(base.is_contiguous(memory_format=fmt), lambda: "scatter_rows_: base must be contiguous (or channels_last)")
    row_elems = math.prod(base.shape[1:])
    limit = min(y.shape[0], idx.shape[0])
    if base.shape[0] > 0 and row_elems > 0 and limit > 0:
        block = _block(row_elems, 2048)
        grid = (limit, min(triton.cdiv(row_elems, block), _MAX_GRID_Y))
        yc = y.contiguous(memory_format=fmt)
        wrap_triton(_scatter_rows_inplace_kernel)[grid](base, yc, idx.contiguous(), count, base.shape[0], limit, row_elems, BLOCK=block)
