"""Bucketed batch sizes: how many rows a compact batch runs on.

A block run on the compact batch of its kept samples sees a new batch size almost every
call. cuDNN's benchmark cache and CUDA graphs are keyed on the input shape, so exact counts
mean a re-tune or a new capture per size. Rounding the kept count up to a bucket bounds the
set of sizes; the padding rows are zero and never reach the output (the merge ops write
only the first `count` rows back), at the cost of at most one bucket step of padded rows
per block.

bucket:
  None            exact counts (the default on CPU tensors, where no cache is keyed on shape)
  int s           the count rounded up to a multiple of s, capped at the batch size N
                  (the default on CUDA tensors is DEFAULT_CUDA_STEP: at most N/8 sizes)
  sorted sizes    the smallest listed size >= count; N itself above the largest (or when
                  the listed size exceeds N)
A count of 0 stays 0 (the block is not run at all).
"""
from typing import Optional, Sequence, Tuple, Union

import torch

Bucket = Union[None, int, Sequence[int]]
DEFAULT_CUDA_STEP = 8
AUTO = "auto"  # the device's default: DEFAULT_CUDA_STEP on CUDA tensors, None elsewhere


def check_bucket(owner: str, bucket) -> Union[None, str, int, Tuple[int, ...]]:
    """bucket normalised (None, "auto", a positive int, or a strictly increasing tuple of
    positive ints), or a ValueError naming `owner` and the argument."""
    if bucket is None or bucket == AUTO:
        return bucket
    if isinstance(bucket, int) and not isinstance(bucket, bool):
        if bucket < 1:
            raise ValueError(f"{owner}: bucket must be a positive int step, got {bucket}")
        return bucket
    if isinstance(bucket, (list, tuple)):
        sizes = tuple(bucket)
        ok = sizes and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
        if not ok or any(a >= b for a, b in zip(sizes, sizes[1:])):
            raise ValueError(
                f"{owner}: bucket must be a strictly increasing list of positive ints, got {list(bucket)!r}"
            )
        return sizes
    raise ValueError(
        f"{owner}: bucket must be None, 'auto', a positive int step or a sorted list of sizes, got {bucket!r}"
    )


def resolve_bucket(bucket, device: torch.device) -> Union[None, int, Tuple[int, ...]]:
    """The bucket an already checked `bucket` means on `device` ("auto": the device's default)."""
    if bucket == AUTO:
        return DEFAULT_CUDA_STEP if device.type == "cuda" else None
    return bucket


def bucketed_rows(count: int, bucket: Union[None, int, Tuple[int, ...]], n: int) -> int:
    """Rows a compact batch of `count` kept samples (out of n) runs on, for a resolved bucket."""
    if count <= 0:
        return 0
    if bucket is None:
        return count
    if isinstance(bucket, int):
        return min(n, -(-count // bucket) * bucket)
    for size in bucket:
        if size >= count:
            return min(n, size)
    return n


def bucket_sizes(bucket: Union[None, int, Tuple[int, ...]], n: int) -> Optional[Tuple[int, ...]]:
    """Every size bucketed_rows can return for a batch of n (0 excluded), or None for exact counts."""
    if bucket is None:
        return None
    return tuple(sorted({bucketed_rows(c, bucket, n) for c in range(1, n + 1)}))
