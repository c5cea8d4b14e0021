"""Output shapes and layouts shared by every backend and by the fake kernels.

Below both the ops layer and the Python backends (like _extension.py), so that the Triton
kernels and the fake kernels follow one rule; the C++ kernels follow the same one in
csrc/layout.h.
"""
from typing import Sequence, Tuple

import torch


def row_layout(x: torch.Tensor) -> torch.memory_format:
    """Layout of an output made from x's rows: channels_last only when x is a 4-D tensor that is
    channels_last and not also plain contiguous; contiguous otherwise."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv2d_output_shape(
    x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tuple[int, int, int, int]:
    """[N, Cout, Ho, Wo] of a conv2d of x [N, Cin, H, W] with weight [Cout, Cin, kh, kw]."""
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, cout, ho, wo)
