"""channel_sparse_conv2d: a conv2d that computes only the active (sample, channel) pairs.

Contract (DESIGN.md): y[n, c] = out_gate[n, c] * conv2d(x * [in_gate > 0], weight, bias)[n, c]
(+ shift[c] when a shift is given) where out_gate[n, c] > 0, and exactly 0 elsewhere.

Kernels: torch.ops.dynkernels.channel_sparse_conv2d (C++ on CPU in csrc/cpu, CUDA in
csrc/cuda; schema in csrc/schemas.cpp) and torch.ops.dynkernels.channel_sparse_conv2d_triton
(dynkernels/triton/channel_sparse_conv2d.py). This file gives the compiled op its fake kernel,
both ops their autograd, dense execution, and the public function that checks arguments and
picks the backend. No host sync on any path but the "torch" reference's (none there either) and
the argument checks (shapes only).

"auto" on CUDA tensors follows channel_sparse_conv2d_gpu_rule (the CUDA kernel, the Triton
kernel, or dense execution, from the density hint and the device's tuned table; nothing is read
from the device). On a GPU the kernels run on channels_last (NHWC) activations: other layouts
are converted once per call. "auto" on CPU tensors runs the C++ kernel, or dense execution
(torch's conv2d, then the gate multiply and shift) where the gates' FLOP density (read from the
gates: no sync on CPU tensors; a `density` hint is not used there) is above the crossover
measured for the layout, stride and output size (dynkernels/ops/_conv_cpu_auto.py).
"""
import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import reference, tuned_configs
from ..tuned_configs import cuda_conv_configs
from .._extension import _C, cuda_kernels_compiled, triton_available
from ..flops import register_channel_sparse_formula
from .._layout import conv2d_output_shape, row_layout
from . import _checks
from ._backend import resolve
from .channel_sparse_conv2d_gpu_rule import gpu_execution
from ._conv_cpu_auto import auto_on_checked_inputs, dense_then_gate, use_dense_on_cpu

_lib = torch.ops.dynkernels
# The compiled op's first try on plain CPU tensors where no gradient is needed
# (dynkernels._C.cpu_first, csrc/python_calls.cpp: NotImplemented otherwise), or None where the
# kernels were loaded as a library without the Python module: torch.ops runs the op's Python
# autograd wrapper even then, about 8 us a call.
_CPU_FIRST_CONV = None if _C is None else _C.cpu_first.channel_sparse_conv2d
# backend="auto" on plain float32 CPU tensors: what the rule reads, in one C++ call
# (dynkernels._C.cpu_first.conv_auto_inputs: NotImplemented for any other call).
_CPU_AUTO_INPUTS = None if _C is None else _C.cpu_first.conv_auto_inputs
IntPair = Union[int, Sequence[int]]


def _pair(op: str, name: str, v, minimum: int) -> Tuple[int, int]:
    vals = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) and e >= minimum for e in vals):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return vals


def _per_channel(op: str, name: str, t, x: torch.Tensor, cout: int):
    """bias / shift: None or [Cout] of x's dtype on x's device."""
    if t is None:
        return
    _checks.tensor(op, name, t, (1,), "[Cout]")
    if t.shape[0] != cout:
        raise ValueError(f"{op}: {name} has {t.shape[0]} entries but weight has {cout} output channels")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    _checks.same_device(op, name, t, "x", x)


def check_density(op: str, density):
    """density: None or a number in [0, 1] (a host-side hint, never read from the device)."""
    if density is None:
        return None
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ValueError(f"{op}: density must be None or a number in [0, 1], got {density!r}")
    return float(density)


def check_args(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift=None):
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
    _per_channel(op, "bias", bias, x, cout)
    _per_channel(op, "shift", shift, x, cout)
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


# ----------------------------------------------------------------------------- fake kernel
@torch.library.register_fake("dynkernels::channel_sparse_conv2d")
def _channel_sparse_conv2d_fake(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift=None, config=-1):
    shape = conv2d_output_shape(x, weight, stride, padding, dilation)
    return x.new_empty(shape).contiguous(memory_format=row_layout(x))


# ----------------------------------------------------------------------------- autograd
def _sparse_input_grad(conv_op, dz, weight, out_active, in_gate, x_shape, stride, padding, dilation):
    """dx of a stride-1 channel-sparse conv as another channel-sparse conv, or None where that
    does not apply (then the caller uses the dense convolution_backward).

    With stride 1, conv2d's input gradient is the correlation of dz with the weight swapped
    (in <-> out channels) and flipped, padded by dilation * (k - 1) - padding. Run by conv_op
    with the forward's active output channels as its input gate and the forward's input gate
    as its output gate, only the (sample, out, in) triples that were active in the forward
    cost FLOPs, and dx is exactly 0 on gated-off input channels.

    CPU tensors only, where it is measured faster (README): on a GPU the channel-sparse
    kernels are still slower than cuDNN even at half density, so cuDNN's dense input gradient
    stays there until they are not.
    """
    if dz.device.type != "cpu":
        return None
    kh, kw = weight.shape[2:]
    back_pad = [dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1]]
    if list(stride) != [1, 1] or min(back_pad) < 0:
        return None
    w_back = weight.transpose(0, 1).flip(2, 3).contiguous()  # [Cin, Cout, kh, kw]
    in_mask = (
        torch.ones(x_shape[:2], dtype=dz.dtype, device=dz.device)
        if in_gate is None else (in_gate > 0).to(dz.dtype)
    )
    return conv_op(dz, w_back, None, in_mask, out_active, [1, 1], back_pad, list(dilation))


def _register_autograd(conv_op):
    """Backward of a channel-sparse conv kernel.

    With z = conv2d(x * m_in, weight, bias) and y = [g > 0] * (g * z + shift):
      dz = [g > 0] * g * dy;
      dshift = sum over samples and pixels of [g > 0] * dy;
      dx (stride 1, CPU) = conv_op on dz with the swapped, flipped weight (_sparse_input_grad):
        sparse like the forward; otherwise conv2d's dense input gradient, times m_in;
      dweight, dbias: conv2d's dense backward at (x * m_in, dz) (dz is 0 off the active
        channels, but the dense backward still spends their FLOPs);
      dg = sum_hw(dy * z) where g > 0, with z recomputed sparsely by conv_op (gate = [g > 0]).
    in_gate is a mask, and config a kernel choice: they get no gradient.
    """

    def setup_context(ctx, inputs, output):
        x, weight, bias, out_gate, in_gate, stride, padding, dilation = inputs[:8]
        ctx.conv_args = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, out_gate, in_gate)

    def backward(ctx, grad_y):
        x, weight, bias, out_gate, in_gate = ctx.saved_tensors
        stride, padding, dilation = ctx.conv_args
        need_x, need_w, need_b, need_g = ctx.needs_input_grad[:4]
        # needs_input_grad covers the arguments actually passed (shift and config may not be)
        passed = len(ctx.needs_input_grad)
        need_shift = passed > 8 and ctx.needs_input_grad[8]
        active = (out_gate > 0)[:, :, None, None]
        g = out_gate.to(grad_y.dtype)[:, :, None, None]
        zero = torch.zeros((), dtype=grad_y.dtype, device=grad_y.device)
        grad_x = grad_w = grad_b = grad_g = grad_shift = None
        if need_x or need_w or need_b:
            dz = torch.where(active, grad_y * g, zero)
            if need_x:
                grad_x = _sparse_input_grad(
                    conv_op, dz, weight, out_gate > 0, in_gate, x.shape, stride, padding, dilation)
            dense_x = need_x and grad_x is None
            if dense_x or need_w or need_b:
                in_mask = None if in_gate is None else (in_gate > 0).to(x.dtype)[:, :, None, None]
                x_in = x if in_mask is None else x * in_mask
                dx, grad_w, grad_b = torch.ops.aten.convolution_backward(
                    dz, x_in, weight, [weight.shape[0]] if ctx.has_bias else None,
                    stride, padding, dilation, False, [0, 0], 1, [dense_x, need_w, need_b and ctx.has_bias],
                )
                if dense_x:
                    grad_x = dx if in_mask is None else dx * in_mask
        if need_g:
            z = conv_op(x, weight, bias, (out_gate > 0).to(x.dtype), in_gate, stride, padding, dilation)
            grad_g = torch.where(active, grad_y * z, zero).sum((2, 3)).to(out_gate.dtype)
        if need_shift:
            grad_shift = torch.where(active, grad_y, zero).sum((0, 2, 3))
        grads = (grad_x, grad_w, grad_b, grad_g, None, None, None, None, grad_shift)
        return (grads + (None,) * passed)[:passed]

    torch.library.register_autograd(conv_op, backward, setup_context=setup_context)


_register_autograd(_lib.channel_sparse_conv2d.default)
register_channel_sparse_formula(_lib.channel_sparse_conv2d)  # FlopCounterMode: active triples only


@functools.lru_cache(maxsize=None)
def _triton():
    """Import the Triton kernel on first use (Triton is optional) and give it autograd."""
    from ..triton import channel_sparse_conv2d as triton_conv

    _register_autograd(triton_conv.channel_sparse_conv2d_triton)
    register_channel_sparse_formula(_lib.channel_sparse_conv2d_triton)
    return triton_conv


# ----------------------------------------------------------------------------- public op
@functools.lru_cache(maxsize=None)
def check_config(op: str, config) -> int:
    """config: -1 (the kernel's own choice) or an int >= 0 (a tile configuration id)."""
    if isinstance(config, bool) or not isinstance(config, int) or config < -1:
        raise ValueError(f"{op}: config must be -1 (the CUDA kernel's own choice) or a tile configuration id >= 0, got {config!r}")
    return config


def _check_cuda_kernel_args(x: torch.Tensor, weight: torch.Tensor, padding, backend: str, config: int) -> str:
    """Limits of the hand-written CUDA kernel, checked here rather than by its own TORCH_CHECKs:
    on the H100 test machine (torch 2.11+cu130) an error thrown inside the nvcc-compiled
    extension crashed the process instead of raising (see README, "Known issues")."""
    if x.dtype == torch.float64:
        if backend == "auto":
            return "torch"  # the CUDA kernel is fp32/fp16/bf16 only; float64 runs the reference
        raise TypeError("channel_sparse_conv2d: backend='cuda' supports float32, float16 and bfloat16 x, got float64 (use backend='torch' or 'auto')")
    if x.shape[0] > 65535:
        raise ValueError(f"channel_sparse_conv2d: backend='cuda' supports at most 65535 samples, got {x.shape[0]}")
    cout, kc = weight.shape[0], -(-x.shape[1] // 8) * 8  # kc: channels padded to 16-byte vectors
    if cout > 65535 * 64:
        raise ValueError(f"channel_sparse_conv2d: backend='cuda' supports at most {65535 * 64} output channels, got {cout}")
    padded = (x.shape[2] + 2 * padding[0]) * (x.shape[3] + 2 * padding[1])
    if padded * kc > 2**31 - 1 or cout * weight.shape[2] * weight.shape[3] * kc > 2**31 - 1:
        raise ValueError(
            "channel_sparse_conv2d: backend='cuda' needs (H + 2 padding) * (W + 2 padding) * Cin and "
            "Cout * kh * kw * Cin (Cin rounded up to a multiple of 8) below 2^31, got x of shape "
            f"{tuple(x.shape)}, padding {tuple(padding)} and weight of shape {tuple(weight.shape)}"
        )
    n = len(tuned_configs.cuda_config_ids())
    if config >= n:
        raise ValueError(
            f"channel_sparse_conv2d: config {config} is not a tile configuration of the CUDA kernel: use -1 "
            f"(its own choice) or an id in [0, {n}) of dynkernels._C.cuda_conv_configs()"
        )
    return "cuda"


def autocast_operands(x, weight, bias, shift):
    """(x, weight, bias, shift) as torch.autocast runs conv2d: in the autocast dtype where it is
    enabled for x's device (float32 operands cast; float64 ones kept, as autocast keeps them),
    so that the kernels and dense execution see one dtype, and give what nn.Conv2d would. The
    gates keep their dtype (the kernels read them in float32). Outside autocast: unchanged."""
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return x, weight, bias, shift
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t if t is None or t.dtype in (dtype, torch.float64) or not t.dtype.is_floating_point else t.to(dtype)

    return cast(x), cast(weight), cast(bias), cast(shift)


def dense_channel_gated_conv2d(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift=None):
    """The contract by dense execution: one conv2d of the whole input (cuDNN / oneDNN), then
    one pass over its output, y = conv * g' + (bias * g' + shift * [g > 0]) with
    g' = g where g > 0 else 0. Gated-off channels come out as (signed) zeros for finite
    inputs. Differentiable by autograd; the output keeps x's layout (row_layout)."""
    if in_gate is not None:
        x = x * (in_gate > 0).to(x.dtype)[:, :, None, None]
    conv = F.conv2d(x, weight, None, stride, padding, dilation)
    active = (out_gate > 0)[:, :, None, None]
    zero = torch.zeros((), dtype=conv.dtype, device=conv.device)
    g = torch.where(active, out_gate[:, :, None, None].to(conv.dtype), zero)
    offset = zero if bias is None else bias[None, :, None, None] * g
    if shift is not None:
        offset = offset + torch.where(active, shift[None, :, None, None], zero)
    y = torch.addcmul(offset, conv, g)
    return y.contiguous(memory_format=row_layout(x))


def gpu_choice(x, weight, in_gate, stride, padding, dilation, backend: str, resolved: str, density):
    """For CUDA tensors: (what runs, its tile configuration). `resolved` is the backend that
    resolve() gave; with backend="auto" the GPU rule (channel_sparse_conv2d_gpu_rule) decides
    between the kernels and dense execution. The configuration comes from the device's tuned
    table: a TileConfig list for "triton", a config id for "cuda" (-1, the kernel's heuristic,
    where the table has none or names an id this build lacks), None for "dense"."""
    out_shape = conv2d_output_shape(x, weight, stride, padding, dilation)
    return _gpu_choice(tuned_configs.ConvKey.fields_of(x, weight, in_gate, out_shape, stride), x.device, backend, resolved, density)


@torch.compiler.assume_constant_result
def _gpu_choice(key_fields: tuple, device: torch.device, backend: str, resolved: str, density):
    """gpu_choice from constants only: the tuned tables are host state (files, a lock), so
    torch.compile calls this while it traces and keeps the answer, instead of tracing it."""
    key = tuned_configs.ConvKey(*key_fields)
    run = resolved
    if backend == "auto":
        entry = tuned_configs.entry_for(tuned_configs.device_name(device), key, density)
        run = gpu_execution(entry, density, cuda_kernels_compiled(), triton_available())
    if run == "triton":
        return run, tuned_configs.triton_config(device, key, density).to_list()
    if run == "cuda":
        cid = tuned_configs.cuda_config(device, key, density)
        return run, cid if cid in tuned_configs.cuda_config_ids() else -1
    return run, None


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
    shift: Optional[torch.Tensor] = None,
    backend: str = "auto",
    density: Optional[float] = None,
    config: int = -1,
) -> torch.Tensor:
    """conv2d computing only channels with out_gate > 0 (scaled by it) from inputs with in_gate > 0.

    x [N, Cin, H, W], weight [Cout, Cin, kh, kw], bias [Cout] or None, out_gate [N, Cout],
    in_gate [N, Cin] or None, shift [Cout] or None (added after the gate scale, on the active
    channels only). Output [N, Cout, Ho, Wo] in x's layout; inactive channels are exactly 0.
    On a GPU, channels_last x (and weight) is the fast path: other layouts are converted per call.

    density: what the caller knows on the host about the gates (e.g. a fixed k of
    k-winners-take-all): the expected fraction of the dense conv's FLOPs that the gates leave
    active (output density, times input density when in_gate is given). It is never checked
    against the gates. On CUDA tensors it picks the kernels' tuned tile configuration, and with
    backend="auto" whether dense execution runs (channel_sparse_conv2d_gpu_rule). CPU tensors
    do not use it: there the gates themselves are read (no sync), which a hint can only match.

    config: the tile configuration of the CUDA kernel (an id of dynkernels._C.cuda_conv_configs()),
    or -1 for the tuned table's choice (the kernel's own heuristic by layer shape where the table
    has none); the other backends ignore it.

    backend="auto" on CPU tensors runs dense execution (conv2d, then the gate multiply and the
    shift, with the same result) where the FLOP density read from the gates (no sync on CPU
    tensors) is at or above the crossover measured on the CPU for the input's
    layout, the stride and the output size (dynkernels.ops._conv_cpu_auto.cpu_prefers_dense:
    e.g. 0.85 for NCHW and 0.70 for channels_last at stride 1 and 16x16 outputs, 0.82 for
    channels_last on AMD's Zen 5, where the layers whose output channels fill the kernel's
    vector lanes compare those lanes' density with 0.88), and the C++ channel-sparse kernel below it, or at any
    density on the layers where it was measured faster than dense execution even then
    (cpu_kernel_wins_dense).

    Under torch.autocast (CPU or CUDA) x, weight, bias and shift run in the autocast dtype, as
    conv2d does there (autocast_operands); the output has that dtype.
    """
    if (backend == "auto" and config == -1 and (density is None or (type(density) is float and 0.0 <= density <= 1.0))
            and _CPU_AUTO_INPUTS is not None and not torch.compiler.is_compiling()):
        seen = _CPU_AUTO_INPUTS(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift)
        if seen is not NotImplemented:  # (arguments the checks below accept: the Python path in one C++ call)
            y = auto_on_checked_inputs(x, weight, bias, out_gate, in_gate, shift, seen)
            if y is None:
                y = _CPU_FIRST_CONV(x, weight, bias, out_gate, in_gate, list(seen[1]), list(seen[2]), list(seen[3]), shift, -1)
            return y
    if isinstance(x, torch.Tensor):
        x, weight, bias, shift = autocast_operands(x, weight, bias, shift)
    stride, padding, dilation = check_args(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift)
    density = check_density("channel_sparse_conv2d", density)
    check_config("channel_sparse_conv2d", config)
    b = resolve("channel_sparse_conv2d", backend, x.device)
    if b == "cuda":
        b = _check_cuda_kernel_args(x, weight, padding, backend, config)
    tiles = None
    if x.is_cuda and b != "torch":
        b, tiles = gpu_choice(x, weight, in_gate, stride, padding, dilation, backend, b, density)
    if b == "torch":
        return reference.channel_sparse_conv2d(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift)
    if b == "dense":
        return dense_channel_gated_conv2d(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift)
    if b == "cpu" and backend == "auto":
        out_hw = conv2d_output_shape(x, weight, stride, padding, dilation)[2:]
        if use_dense_on_cpu(x, weight, out_gate, in_gate, stride, out_hw):
            return dense_then_gate(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift)
    args = (x, weight, bias, out_gate, in_gate, list(stride), list(padding), list(dilation), shift)
    if b == "triton":
        return _triton().channel_sparse_conv2d_triton(*args, tiles)
    if b == "cuda" and config == -1 and tiles is not None:
        config = tiles  # the tuned table's id for this layer (-1 where it has none)
    if b == "cpu" and _CPU_FIRST_CONV is not None and not torch.compiler.is_compiling():
        y = _CPU_FIRST_CONV(*args, -1)
        if y is not NotImplemented:
            return y
    return _lib.channel_sparse_conv2d(*args, config if b == "cuda" else -1)
