"""route: the stable partition of a batch by branch (contract: DESIGN.md).

The compiled kernels are torch.ops.dynkernels.route (schema in csrc/schemas.cpp; CPU in
csrc/cpu/route_cpu.cpp, CUDA in csrc/cuda/route_cuda.cu); the Triton kernel is
torch.ops.dynkernels.route_triton (dynkernels/triton/route.py). This file gives their fake
kernel and the public function that checks arguments and picks the backend. The outputs are
integers: there is no gradient.

compact is route's two-way case: compact(gate, t) lists the active rows first, and so does
route((gate <= t).to(torch.int32), 2), whose offsets[1] is compact's count.
"""
import functools
from typing import Tuple

import torch

from .. import reference
from . import _checks
from ._backend import resolve

_lib = torch.ops.dynkernels
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@torch.library.register_fake("dynkernels::route")
def _route_fake(choice, num_branches):
    offsets_shape = tuple(choice.shape[:-1]) + (num_branches + 1,)
    return choice.new_empty(choice.shape, dtype=torch.int32), choice.new_empty(offsets_shape, dtype=torch.int32)


@functools.lru_cache(maxsize=None)
def _triton():
    """Import the Triton kernel on first use (Triton is optional)."""
    from ..triton import route as triton_route

    return triton_route


def check_num_branches(op: str, num_branches) -> int:
    if isinstance(num_branches, bool) or not isinstance(num_branches, int) or not 1 <= num_branches < 2**31 - 1:
        raise ValueError(f"{op}: num_branches must be an int in [1, 2^31 - 2], got {num_branches!r}")
    return num_branches


def check_choice(op: str, choice, num_branches: int, name: str = "choice", shape: str = "[N] or [R, N]"):
    """choice: a 1-D or 2-D integer tensor; its values in [0, num_branches) where that costs no
    sync (CPU tensors, or a GPU with DYNKERNELS_CHECK_INDICES=1) and no graph break (not while
    torch.compile traces: the values are host reads)."""
    _checks.tensor(op, name, choice, (1, 2), shape)
    if choice.dtype not in _INT_DTYPES:
        raise TypeError(f"{op}: {name} must be an integer tensor (uint8, int8, int16, int32, int64), got {choice.dtype}")
    if choice.shape[-1] > 2**31 - 1:
        raise ValueError(f"{op}: rows longer than 2^31-1 are not supported")
    if choice.numel() and not torch.compiler.is_compiling() and (choice.device.type == "cpu" or _checks.CHECK_INDICES_ON_GPU):
        lo, hi = (int(v) for v in torch.aminmax(choice))
        if lo < 0 or hi >= num_branches:
            bad = ((choice < 0) | (choice >= num_branches)).nonzero()[0].tolist()
            where = ", ".join(map(str, bad))
            raise IndexError(f"{op}: {name}[{where}] = {int(choice[tuple(bad)])} is out of range for {num_branches} branches")


def _route(choice: torch.Tensor, num_branches: int, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """route with checked arguments and a resolved backend."""
    if backend == "torch":
        return reference.route(choice, num_branches)
    if backend == "triton":
        return _triton().route_triton(choice, num_branches)
    return _lib.route(choice, num_branches)


def route(choice: torch.Tensor, num_branches: int, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable partition of the rows by branch: branch 0's rows in increasing order, then branch 1's, ...

    choice: [N] integer, the branch of each row (or [R, N]: R such rows, e.g. one per block of
    a network, partitioned independently). Returns (idx, offsets): idx int32 of choice's
    shape, offsets int32 [num_branches + 1] (or [R, num_branches + 1]) on choice's device;
    branch b owns idx[offsets[b]:offsets[b + 1]]. Gather a branch's rows with
    gather_rows(x, idx[offsets[b]:], offsets[b+1:b+2] - offsets[b:b+1]) and merge its results
    back with scatter_rows_ (same idx and count); compact is the two-way case (kept rows
    first: route of 1 - keep). No host sync.

    Out-of-range choices are an IndexError where checking costs no sync (CPU tensors, or CUDA
    tensors with DYNKERNELS_CHECK_INDICES=1). Otherwise (CUDA and Triton kernels) such rows
    belong to no branch: they are listed last, after offsets[num_branches], which is then less
    than N (the kernels never read or write out of bounds).
    """
    num_branches = check_num_branches("route", num_branches)
    check_choice("route", choice, num_branches)
    return _route(choice, num_branches, resolve("route", backend, choice.device))
