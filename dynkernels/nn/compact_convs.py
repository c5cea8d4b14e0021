"""1x1 convolutions of compact batches on the CPU: oneDNN where torch would pick its slower
GEMM path.

torch runs a float32 1x1, stride-1 conv2d of fewer than 16 samples at one thread with its own
im2col/GEMM path (slow_conv2d) instead of oneDNN (ConvParams::use_mkldnn: "THNN is faster when
single-threaded"); 16 samples or more, or a second thread, go to oneDNN. A sparse execution
cuts a full batch whose convs ran on oneDNN into compact batches of a few rows, and at one
thread their 1x1 convs land on that path. Measured on an AMD EPYC (Zen 5, AVX-512), torch
2.14.1, one thread, fp32, F.conv2d against oneDNN on the same compact batch (best of 5):

    NCHW, 2048 -> 512 at 2x2:  12 rows 9.7 ms vs 0.55 ms; 2 rows 1.70 ms vs 0.27 ms
    NCHW, 256 -> 512 at 8x8:   2 - 15 rows 1.7 - 2.0x as long
    channels_last, 1024 -> 256 at 4x4 (oneDNN with its reordered weight kept): 1.7 - 2.7x
    but at 4 -> 4 and 16 -> 16 channels slow_conv2d is up to 14x faster (oneDNN's fixed cost
    of about 25 us a call dominates there), and at 1x1 images mostly faster (a plain GEMM)

LC-Net ResNet-50 (batch 16, 64x64, its own gates, one thread, NCHW), sparse over masked in the
headline suite: 1.10x before, 1.37x with this. BlockDrop ResNet-101 (batch 16, 112x112, 25 of
33 blocks per sample, one thread, NCHW): sparse 443 - 453 ms before, slower than masked (374 -
384 ms), 285 - 314 ms with this.

`compact_batch_convs(full_rows, rows, device)` is the context a sparse execution runs a block
in on the compact batch of `rows` rows cut from `full_rows`. Where torch gave the full batch
oneDNN and would not give the compact one (on the CPU, at one thread, full_rows >= 16 > rows
>= 2), no autograd graph is recorded and no dispatch mode (a FLOP counter) watches, it is a
TorchFunctionMode under which a 1x1 stride-1 conv2d whose size is on oneDNN's side of the
measured crossover (`onednn_wins`) runs on oneDNN: torch.mkldnn_convolution for NCHW input,
the reordered-weight path of backend "auto"'s dense execution (ops._cpu_packed_conv) for
channels_last input. Elsewhere it does nothing. The price: while it is active each torch call
in the block costs about 0.8 us more (the mode's Python handler; 0.3 us to enter and leave).
The results are oneDNN's, as the full batch's are.

Left to torch: a compact batch of one row. torch gives one sample its own path for every
kernel up to 3x3 below 20480 input elements, at any thread count; on seven 3x3 stride-1 layers
(16 - 512 channels, 32x32 down to 2x2) that path took 0.84 - 3.9x oneDNN's time (3.8x at 512
channels 2x2, 0.84x at 256 channels 8x8), no crossover this grid could pin.
"""
import contextlib

import torch
from torch.overrides import TorchFunctionMode

try:  # (torch's own test; a FLOP counter or a fake-tensor mode must see the aten conv it counts)
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
except ImportError:  # pragma: no cover - then never: every conv stays torch's
    def is_in_torch_dispatch_mode() -> bool:
        return True

from .._layout import row_layout
from ..ops._cpu_packed_conv import conv2d_channels_last

# torch's own switch (ConvParams::use_mkldnn): a 1x1 stride-1 conv of this many samples or more
# goes to oneDNN at one thread too.
ONEDNN_FROM_ROWS = 16
# The crossover of the grid above (1 - 15 rows; 4 - 2048 input and output channels; 1x1 to
# 56x56 images), in multiply-adds of the conv (rows x Cin x Cout x H x W), with at least 64 x 64
# channels and more than one pixel: NCHW from 2^22, or at 2x2 and smaller from rows x Cin x Cout
# >= 2^17 (there slow_conv2d's per-sample GEMM has 4 columns: 2 - 19x slower); channels_last
# (oneDNN with its reordered weight kept) from 2^21. Each side held on every shape of the grid.
NCHW_ONEDNN_FROM_MACS = 1 << 22
NCHW_SMALL_IMAGE_ONEDNN_FROM = 1 << 17  # rows x Cin x Cout, at H x W <= 4
CHANNELS_LAST_ONEDNN_FROM_MACS = 1 << 21
ONEDNN_FROM_CHANNELS = 64 * 64  # Cin x Cout


def onednn_wins(rows: int, cin: int, cout: int, h: int, w: int, channels_last: bool) -> bool:
    """Whether oneDNN runs a 1x1 stride-1 conv of this size faster than slow_conv2d at one thread."""
    pixels = h * w
    if pixels < 2 or cin * cout < ONEDNN_FROM_CHANNELS:
        return False
    macs = rows * cin * cout * pixels
    if channels_last:
        return macs >= CHANNELS_LAST_ONEDNN_FROM_MACS
    return macs >= NCHW_ONEDNN_FROM_MACS or (pixels <= 4 and rows * cin * cout >= NCHW_SMALL_IMAGE_ONEDNN_FROM)


def _ones(v) -> bool:
    return all(int(e) == 1 for e in v) if isinstance(v, (tuple, list)) else v == 1


def _zeros(v) -> bool:
    return v == "valid" or (all(int(e) == 0 for e in v) if isinstance(v, (tuple, list)) else v == 0)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # (no tensor subclass: its own __torch_function__ decides)


def _pointwise_on_onednn(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d on oneDNN where it is a 1x1 conv torch would not give it and onednn_wins; else None."""
    if not (type(x) in _PLAIN and type(weight) in _PLAIN and x.dim() == 4 and weight.dim() == 4
            and weight.shape[2] == 1 and weight.shape[3] == 1 and groups == 1 and _ones(stride) and _ones(dilation)
            and _zeros(padding) and 2 <= x.shape[0] < ONEDNN_FROM_ROWS and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.device.type == "cpu" and weight.device.type == "cpu"
            and (bias is None or (type(bias) in _PLAIN and bias.dtype == torch.float32))):
        return None
    n, cin, h, w = x.shape
    if weight.shape[1] != cin:
        return None  # (conv2d's own error names the mismatch)
    channels_last = row_layout(x) is torch.channels_last
    if not (channels_last or x.is_contiguous()) or not onednn_wins(n, cin, weight.shape[0], h, w, channels_last):
        return None
    if channels_last:
        return conv2d_channels_last(x, weight, bias, (1, 1), (0, 0), (1, 1))
    return torch.mkldnn_convolution(x, weight, bias, (0, 0), (1, 1), (1, 1), 1)


class _PointwiseConvsOnOneDNN(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            y = _pointwise_on_onednn(*args, **kwargs)
            if y is not None:
                return y
        return func(*args, **kwargs)


_ONEDNN = torch.backends.mkldnn.is_available()
_NO_MODE = contextlib.nullcontext()  # (reusable: no object made on the hot path)


def compact_batch_convs(full_rows: int, rows: int, device: torch.device):
    """The context to run a block in on a compact batch of `rows` rows, on `device`, of a full
    batch of `full_rows`: see the module docstring."""
    # (is_compiling first: torch.compile traces this test, and torch.get_num_threads would break its graph)
    if (torch.compiler.is_compiling() or rows < 2 or rows >= ONEDNN_FROM_ROWS or full_rows < ONEDNN_FROM_ROWS
            or device.type != "cpu" or torch.is_grad_enabled() or not _ONEDNN or not torch.backends.mkldnn.enabled
            or torch.get_num_threads() != 1 or is_in_torch_dispatch_mode()):
        return _NO_MODE
    return _PointwiseConvsOnOneDNN()
