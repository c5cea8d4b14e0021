"""channel_sparse_conv2d: a conv2d that computes only the active (sample, channel) pairs.

Contract (DESIGN.md): y[n, c] = out_gate[n, c] * conv2d(x * [in_gate > 0], weight, bias)[n, c]
where out_gate[n, c] > 0, and exactly 0 elsewhere.
"""
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import reference
from . import _checks
from ._backend import resolve

_lib = torch.ops.dynkernels
IntPair = Union[int, Sequence[int]]


def _pair(op: str, name: str, v, minimum: int) -> Tuple[int, int]:
    vals = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) and e >= minimum for e in vals):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return vals


def check_args(x, weight, bias, out_gate, in_gate, stride, padding, dilation):
    """Validate the arguments; return (stride, padding, dilation) as pairs."""
    op = "channel_sparse_conv2d"
    _checks.tensor(op, "x", x, (4,), "[N, Cin, H, W]")
    _checks.floating(op, "x", x)
    _checks.tensor(op, "weight", weight, (4,), "[Cout, Cin, kh, kw]")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    _checks.same_device(op, "weight", weight, "x", x)
    n, cin = x.shape[:2]
    cout = weight.shape[0]
    if weight.shape[1] != cin:
        raise ValueError(f"{op}: weight has {weight.shape[1]} input channels but x has {cin} (groups > 1 is not supported)")
    if bias is not None:
        _checks.tensor(op, "bias", bias, (1,), "[Cout]")
        if bias.shape[0] != cout:
            raise ValueError(f"{op}: bias has {bias.shape[0]} entries but weight has {cout} output channels")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
        _checks.same_device(op, "bias", bias, "x", x)
    _checks.gate(op, "out_gate", out_gate, (2,), "[N, Cout]")
    if tuple(out_gate.shape) != (n, cout):
        raise ValueError(f"{op}: out_gate must be [N, Cout] = [{n}, {cout}], got shape {tuple(out_gate.shape)}")
    _checks.same_device(op, "out_gate", out_gate, "x", x)
    if in_gate is not None:
        _checks.gate(op, "in_gate", in_gate, (2,), "[N, Cin]")
        if tuple(in_gate.shape) != (n, cin):
            raise ValueError(f"{op}: in_gate must be [N, Cin] = [{n}, {cin}], got shape {tuple(in_gate.shape)}")
        _checks.same_device(op, "in_gate", in_gate, "x", x)
    stride = _pair(op, "stride", stride, 1)
    padding = _pair(op, "padding", padding, 0)
    dilation = _pair(op, "dilation", dilation, 1)
    for d in range(2):
        extent = x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1)
        if extent < 1:
            raise ValueError(
                f"{op}: the kernel ({weight.shape[2]}x{weight.shape[3]}, dilation {dilation}) is larger than the "
                f"padded input ({x.shape[2]}x{x.shape[3]}, padding {padding})"
            )
    return stride, padding, dilation


def channel_sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_gate: torch.Tensor,
    in_gate: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """conv2d computing only channels with out_gate > 0 (scaled by it) from inputs with in_gate > 0.

    x [N, Cin, H, W], weight [Cout, Cin, kh, kw], bias [Cout] or None, out_gate [N, Cout],
    in_gate [N, Cin] or None. Output [N, Cout, Ho, Wo]; inactive channels are exactly 0.
    """
    stride, padding, dilation = check_args(x, weight, bias, out_gate, in_gate, stride, padding, dilation)
    b = resolve("channel_sparse_conv2d", backend, x.device)
    if b == "torch":
        return reference.channel_sparse_conv2d(x, weight, bias, out_gate, in_gate, stride, padding, dilation)
    raise NotImplementedError(f"channel_sparse_conv2d: backend {b!r} is not implemented yet")
