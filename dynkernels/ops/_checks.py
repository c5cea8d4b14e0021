"""Argument checks shared by every backend: a bad argument gets an error that names it and
says what was expected, before any kernel runs."""
import os
from typing import Optional, Sequence

import torch

# On CUDA tensors, index values are checked only on request: reading them costs a host sync.
CHECK_INDICES_ON_GPU = os.environ.get("DYNKERNELS_CHECK_INDICES", "0") == "1"


def tensor(op: str, name: str, t, dims: Optional[Sequence[int]] = None, shape: Optional[str] = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{op}: {name} must be {shape or f'{dims[0]}-D'}, got shape {tuple(t.shape)}")


def floating(op: str, name: str, t: torch.Tensor):
    if not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


def gate(op: str, name: str, g, dims=(1, 2), shape="[N] or [B, N]"):
    tensor(op, name, g, dims, shape)
    if not (g.dtype.is_floating_point or g.dtype == torch.bool):
        raise TypeError(f"{op}: {name} must be a floating or bool tensor, got {g.dtype}")


def index_args(op: str, idx, count, rows: int, data_name: str, data: torch.Tensor, any_length: bool = False,
               values: bool = True):
    """idx: int32, [rows] (or, with any_length, [M] for any M), count: one int32; both on data's
    device; the first count entries of idx index data's rows (read on the host: CPU tensors, or
    CUDA tensors with DYNKERNELS_CHECK_INDICES=1). values=False leaves the values to the kernel:
    the C++ CPU kernels check them with these same errors."""
    tensor(op, "idx", idx, (1,), "a 1-D tensor")
    if idx.dtype != torch.int32:
        raise TypeError(f"{op}: idx must be int32 (as dynkernels.compact returns), got {idx.dtype}")
    if not any_length and idx.shape[0] != rows:
        raise ValueError(f"{op}: idx has {idx.shape[0]} entries but {data_name} has {rows} rows; they must match")
    tensor(op, "count", count)
    if count.dtype != torch.int32 or count.numel() != 1:
        raise TypeError(f"{op}: count must be an int32 tensor with one element, got {count.dtype} of shape {tuple(count.shape)}")
    same_device(op, "idx", idx, data_name, data)
    same_device(op, "count", count, data_name, data)
    if values and (idx.device.type == "cpu" or CHECK_INDICES_ON_GPU):
        n = max(0, min(int(count.reshape(-1)[0]), idx.shape[0]))
        head = idx[:n]
        if n and (int(head.min()) < 0 or int(head.max()) >= rows):
            bad = int(((head < 0) | (head >= rows)).nonzero()[0])
            raise IndexError(f"{op}: idx[{bad}] = {int(head[bad])} is out of range for {data_name} with {rows} rows")


def capacity(op: str, cap) -> int:
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise ValueError(f"{op}: capacity must be a non-negative int, got {cap!r}")
    return cap
