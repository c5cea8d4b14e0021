"""Triton kernel for route (contract: DESIGN.md).

Same semantics and output shapes as the CUDA kernel (csrc/cuda/route_cuda.cu): an out-of-range
choice is not an error (reading it on the host would cost a sync); such rows belong to no
branch and come last, after offsets[num_branches]. Exposed as torch.ops.dynkernels.route_triton
with torch.library.triton_op so that torch.compile can trace into it. No host synchronisation.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import wrap_triton


@triton.jit(do_not_specialize=["N", "num_branches"])
def _route_kernel(choice_ptr, idx_ptr, offsets_ptr, N, num_branches, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per row of choice. Keys are the branches 0..num_branches-1 and num_branches
    # for "no branch"; they are taken BLOCK_K at a time, in increasing order. For each group
    # of keys, one pass counts the rows of each key (a [BLOCK_N, BLOCK_K] one-hot summed over
    # the rows) and an exclusive prefix sum gives where each key starts; a second pass ranks
    # every row among the earlier rows of its key (a cumulative sum down the one-hot) and
    # writes it there. O(N * keys) work: meant for the few branches of a dynamic network.
    row = tl.program_id(0).to(tl.int64)
    choice_row = choice_ptr + row * N
    idx_row = idx_ptr + row * N
    offsets_row = offsets_ptr + row * (num_branches + 1)
    rows = tl.arange(0, BLOCK_N)
    start = 0  # rows whose key is below the current group
    for k0 in range(0, num_branches + 1, BLOCK_K):
        keys = k0 + tl.arange(0, BLOCK_K)
        counts = tl.zeros([BLOCK_K], dtype=tl.int32)
        for n0 in range(0, N, BLOCK_N):
            j = n0 + rows
            c = tl.load(choice_row + j, mask=j < N, other=0).to(tl.int64)
            key = tl.where((c >= 0) & (c < num_branches), c, num_branches)
            key = tl.where(j < N, key, -1)
            hot = (key[:, None] == keys[None, :]).to(tl.int32)
            counts += tl.sum(hot, axis=0)
        key_start = start + tl.cumsum(counts, axis=0) - counts
        tl.store(offsets_row + keys, key_start, mask=keys <= num_branches)
        cursor = key_start
        for n0 in range(0, N, BLOCK_N):
            j = n0 + rows
            c = tl.load(choice_row + j, mask=j < N, other=0).to(tl.int64)
            key = tl.where((c >= 0) & (c < num_branches), c, num_branches)
            key = tl.where(j < N, key, -1)
            hot = (key[:, None] == keys[None, :]).to(tl.int32)
            rank = tl.cumsum(hot, axis=0) - hot  # earlier rows of the same key in this tile
            dest = tl.sum(hot * (cursor[None, :] + rank), axis=1)
            tl.store(idx_row + dest, j.to(tl.int32), mask=tl.sum(hot, axis=1) > 0)
            cursor += tl.sum(hot, axis=0)
        start += tl.sum(counts, axis=0)


@triton_op("dynkernels::route_triton", mutates_args=())
def route_triton(choice: torch.Tensor, num_branches: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton `route`: choice [N] or [R, N] -> (idx of choice's shape, offsets [.., num_branches + 1]), int32."""
    torch._check(choice.dim() in (1, 2), lambda: f"route: choice must be [N] or [R, N], got shape {tuple(choice.shape)}")
    torch._check(num_branches >= 1, lambda: f"route: num_branches must be >= 1, got {num_branches}")
    c = choice.contiguous()
    rows = c.shape[0] if c.dim() == 2 else 1
    n = c.shape[-1]
    idx = torch.empty(choice.shape, dtype=torch.int32, device=choice.device)
    offsets = torch.empty(tuple(choice.shape[:-1]) + (num_branches + 1,), dtype=torch.int32, device=choice.device)
    if rows > 0:
        block_n = max(16, min(128, triton.next_power_of_2(max(n, 1))))
        block_k = max(2, min(32, triton.next_power_of_2(num_branches + 1)))
        wrap_triton(_route_kernel)[(rows,)](c, idx, offsets, n, num_branches, BLOCK_N=block_n, BLOCK_K=block_k)
    return idx, offsets
