"""conv2d of channels_last CPU tensors with the weight kept in oneDNN's blocked layout between
calls, for the dense execution of backend="auto" (dense_then_gate) in inference.

torch's CPU conv2d (oneDNN) reorders the plain [Cout, Cin, kh, kw] weight into its blocked
layout on every call. Measured on an Intel Xeon (AVX-512, AMX; 2 cores, at half its FMA rate
that day), torch 2.14.1, fp32, one thread, channels_last input, conv2d then the gate multiply,
medians of 25 interleaved rounds: with the reordered weight reused, 1.01x of conv2d at 32,
128 -> 128, 3x3, 16x16; 1.29x at 16, 512 -> 512, 3x3, 7x7 (the reorder alone took 10.8 of
46.7 ms there); 1.10x at 32, 128 -> 128, 1x1, 16x16 and at 8, 256 -> 256, 3x3, 14x14; 1.00 -
1.05x on the other layers tried. NCHW input is left to conv2d: given a reordered weight,
oneDNN's convolution of NCHW input writes a channels_last output, and ran 0.69 - 1.01x of
conv2d once converted back.

Exact: an entry is used only while the weight is bytewise equal to the plain copy the entry
keeps (the compare reads both, about an eighth of the reorder's time on the 512-channel layer),
so a write through .data or any other path never serves a stale weight. The price is memory:
two more copies of each cached weight, dropped with the weight. Used only where no autograd
graph is recorded (the reordered weight has no gradient); if the oneDNN ops are missing or
refuse the call, conv2d runs from then on.
"""
import threading
import weakref

import numpy as np

import torch
import torch.nn.functional as F

from .._extension import _C

# id(weight) -> (weakref to weight, key, numpy views of weight and of its plain copy, reordered
# weight). A dict on id() with a weakref callback: a WeakIdKeyDictionary lookup cost 50 us of
# host time here right after a conv.
_CACHE = {}
_LOCK = threading.Lock()
_AVAILABLE = [torch.backends.mkldnn.is_available()]


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality of two contiguous arrays of one shape: a memcmp in the extension
    (dynkernels._C.same_bytes), else numpy's compare of the bytes as integers (an extension
    built with CMake has no Python module). Right after a conv, the memcmp of a 128 x 128 x 3 x 3
    weight took 0.15 ms here, numpy's compare about twice that, torch.equal's float compare more."""
    return bool(_C.same_bytes(a, b) if _C is not None else np.array_equal(a, b))


def _in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """A contiguous view of a contiguous or channels_last 4-d tensor: its elements in memory order."""
    return t if t.is_contiguous() else t.permute(0, 2, 3, 1)


def _reordered(weight, x_shape, stride, padding, dilation):
    # (not the batch size: the blocked layout oneDNN picks follows the channels and the image
    # size, and a weight in another layout than the one a call expects is still reordered right)
    key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), tuple(x_shape[1:]), *stride, *padding, *dilation)
    entry = _CACHE.get(id(weight))
    # (the numpy view of the weight is kept with the entry: the data_ptr in the key says that it
    # still views the weight's memory, and holding it keeps that memory from being reused)
    if entry is not None and entry[0]() is weight and entry[1] == key and _same_bytes(entry[2], entry[3]):
        return entry[4]
    plain = weight.detach().clone()  # (in the weight's own layout, so that the two compare byte for byte)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(plain.contiguous().to_mkldnn(), padding, stride, dilation, 1,
                                                        list(x_shape))
    ident = id(weight)
    ref = weakref.ref(weight, lambda _, ident=ident: _drop(ident))
    views = tuple(_in_memory_order(t).numpy().view(np.int32) for t in (weight.detach(), plain))
    with _LOCK:
        _CACHE[ident] = (ref, key, *views, packed)
    return packed


def _drop(ident: int) -> None:
    with _LOCK:
        entry = _CACHE.get(ident)
        if entry is not None and entry[0]() is None:
            del _CACHE[ident]


def conv2d_channels_last(x, weight, bias, stride, padding, dilation):
    """F.conv2d(x, weight, bias, stride, padding, dilation) (groups 1) for a float32 CPU x;
    with the reordered weight reused where x is channels_last, the weight contiguous or
    channels_last (as `model.to(memory_format=torch.channels_last)` leaves it) and no autograd
    graph is recorded."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    if (not _AVAILABLE[0] or grad or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not (weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last))
            or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last)):
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    try:
        packed = _reordered(weight, x.shape, stride, padding, dilation)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, 1, "none", [], "")
    except (RuntimeError, AttributeError, TypeError):
        _AVAILABLE[0] = False  # an op this torch lacks or rejects: conv2d from now on
        return F.conv2d(x, weight, bias, stride, padding, dilation)


def clear_cache() -> None:
    """Drop every reordered weight (they are also dropped with their weights)."""
    with _LOCK:
        _CACHE.clear()
