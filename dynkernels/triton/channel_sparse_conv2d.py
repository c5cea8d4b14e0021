"""Triton channel_sparse_conv2d: an implicit-GEMM convolution over active channels only.

torch.ops.dynkernels.channel_sparse_conv2d_triton(x, weight, bias, out_gate, in_gate, stride,
padding, dilation, shift) follows the contract of dynkernels.channel_sparse_conv2d (DESIGN.md).

How the work shrinks: each sample's gates are compacted on the device (_compact_rows_kernel,
one launch per gate, no host sync) into a channel list that holds its active channels first,
then the inactive ones, plus the active count. A program owns one sample n, a tile of BLOCK_P output pixels and a tile of BLOCK_CO
positions of n's output list:
  - a tile that starts past n's active output count only writes zeros (no reduction);
  - the reduction runs over kh*kw taps times n's active input channels only, BLOCK_CI at a
    time, each step one tl.dot of an im2col tile [BLOCK_P, BLOCK_CI] (gathered from x through
    its strides, so NCHW, channels_last and other strided inputs need no copy) and a weight
    tile [BLOCK_CI, BLOCK_CO] (rows of the weight repacked as [Cout, kh, kw, Cin]); without an
    in_gate the input channels are a plain range, so both tiles load as contiguous vectors
    along Cin for channels_last x;
  - the epilogue adds the bias, multiplies by the gate, adds the shift and writes exact zeros for the
    list positions past the active count, so every output channel is written exactly once.
The per-step loop is one flat loop over (tap, input-channel block), which Triton software-
pipelines on the GPU. fp16/bf16 use tensor cores with an fp32 accumulator; fp32 uses TF32
tensor cores only when torch.backends.cuda.matmul.allow_tf32 is set (else exact fp32 FMA,
matching the reference to 1e-5); fp64 accumulates in fp64.

On the GPU the tile shapes are autotuned per layer shape; under TRITON_INTERPRET=1 (CPU
tensors, tests) one small fixed configuration runs.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._extension import triton_interpret
from .._layout import conv2d_output_shape, row_layout


@triton.jit
def _channel_sparse_conv2d_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, g_ptr, y_ptr,
    out_idx_ptr, out_cnt_ptr, in_idx_ptr, in_cnt_ptr,
    Cin, Cout, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    sgn, sgc,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_IN_GATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)

    # Output pixels of this tile.
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < Ho * Wo
    oh = p // Wo
    ow = p % Wo
    # Positions in n's output channel list: the active channels come first.
    out_cnt = tl.load(out_cnt_ptr + n)
    j = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    j_mask = j < Cout
    co = tl.load(out_idx_ptr + n * Cout + j, mask=j_mask, other=0)

    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC_DTYPE)
    if pid_co * BLOCK_CO < out_cnt:  # else the whole tile is inactive: zeros only
        if HAS_IN_GATE:
            in_cnt = tl.load(in_cnt_ptr + n)
        else:
            in_cnt = Cin
        ci_blocks = tl.cdiv(in_cnt, BLOCK_CI)
        x_n = x_ptr + n * sxn
        for step in range(0, KH * KW * ci_blocks):
            tap = step // ci_blocks
            k = (step % ci_blocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)
            k_mask = k < in_cnt
            if HAS_IN_GATE:
                ci = tl.load(in_idx_ptr + n * Cin + k, mask=k_mask, other=0)
            else:  # every input channel: contiguous indices, so the loads vectorise
                ci = k
            ky = tap // KW
            kx = tap % KW
            ih = oh * stride_h - pad_h + ky * dil_h
            iw = ow * stride_w - pad_w + kx * dil_w
            in_bounds = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(
                x_n + ih[:, None] * sxh + iw[:, None] * sxw + ci[None, :] * sxc,
                mask=in_bounds[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + co[None, :] * (KH * KW * Cin) + tap * Cin + ci[:, None],
                mask=k_mask[:, None] & j_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    # Epilogue: bias, gate scale, shift, exact zeros past the active count.
    active = j < out_cnt
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=j_mask & active, other=0.0).to(ACC_DTYPE)
        acc += bias[None, :]
    gate = tl.load(g_ptr + n * sgn + co * sgc, mask=j_mask & active, other=0.0).to(ACC_DTYPE)
    acc = acc * gate[None, :]
    if HAS_SHIFT:
        shift = tl.load(t_ptr + co, mask=j_mask & active, other=0.0).to(ACC_DTYPE)
        acc += shift[None, :]
    out = tl.where(active[None, :], acc, 0.0)
    tl.store(
        y_ptr + n * syn + co[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw,
        out.to(y_ptr.dtype.element_ty),
        mask=p_mask[:, None] & j_mask[None, :],
    )


@triton.jit
def _compact_rows_kernel(gate_ptr, idx_ptr, cnt_ptr, C, sgn, sgc, BLOCK_C: tl.constexpr):
    """Row n of a [N, C] gate -> idx[n]: its active positions (gate > 0), then the inactive
    ones, each in increasing order; cnt[n]: the number of active ones. One program per row."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    in_row = c < C
    g = tl.load(gate_ptr + n * sgn + c * sgc, mask=in_row, other=0).to(tl.float32)
    active = (g > 0) & in_row
    act = active.to(tl.int32)
    before = tl.cumsum(act, axis=0) - act  # active positions before c
    count = tl.sum(act, axis=0)
    pos = tl.where(active, before, count + (c - before))
    tl.store(idx_ptr + n * C + pos, c.to(tl.int32), mask=in_row)
    tl.store(cnt_ptr + n, count)


def _gpu_configs():
    configs = []
    for bp, bco, bci, warps, stages in [
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 32, 4, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (256, 64, 32, 8, 3),
    ]:
        configs.append(
            triton.Config({"BLOCK_P": bp, "BLOCK_CO": bco, "BLOCK_CI": bci}, num_warps=warps, num_stages=stages)
        )
    return configs


# Autotuned per layer shape and dtype (the gates change every call; the best tile does not).
_autotuned_kernel = triton.autotune(
    configs=_gpu_configs(), key=["Cin", "Cout", "H", "W", "Ho", "Wo", "KH", "KW", "stride_h", "sxc"]
)(_channel_sparse_conv2d_kernel)

_INTERPRETER_BLOCKS = {"BLOCK_P": 16, "BLOCK_CO": 16, "BLOCK_CI": 16}


def _empty_output(x, weight, stride, padding, dilation) -> torch.Tensor:
    shape = conv2d_output_shape(x, weight, stride, padding, dilation)
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=row_layout(x))


def _channel_lists(gate: torch.Tensor):
    """(idx [n, c] int32, count [n] int32): each row's active channels, then the rest. One
    kernel launch, no host sync (the same result as dynkernels.compact(gate) row by row)."""
    n, c = gate.shape
    idx = torch.empty((n, c), device=gate.device, dtype=torch.int32)
    count = torch.empty((n,), device=gate.device, dtype=torch.int32)
    wrap_triton(_compact_rows_kernel)[(n,)](gate, idx, count, c, *gate.stride(), BLOCK_C=triton.next_power_of_2(c))
    return idx, count


@triton_op("dynkernels::channel_sparse_conv2d_triton", mutates_args=())
def channel_sparse_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_gate: torch.Tensor,
    in_gate: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    y = _empty_output(x, weight, stride, padding, dilation)
    ho, wo = y.shape[2:]
    if y.numel() == 0:
        return y
    gate = out_gate if out_gate.dtype.is_floating_point else out_gate.to(x.dtype)
    out_idx, out_cnt = _channel_lists(gate)
    if in_gate is not None:
        in_idx, in_cnt = _channel_lists(in_gate if in_gate.dtype.is_floating_point else in_gate.to(x.dtype))
    else:  # unused by the kernel (HAS_IN_GATE=False)
        in_idx, in_cnt = out_idx, out_cnt
    # [Cout, kh, kw, Cin]: a weight tile's rows are gathered output channels, each a
    # contiguous run of input channels (like channels_last x), so loads vectorise along Cin.
    w_packed = weight.permute(0, 2, 3, 1).contiguous()
    acc_dtype = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and x.is_cuda:
        precision = "tf32"
    else:
        precision = "ieee"
    args = (
        x, w_packed, bias if bias is not None else w_packed, shift if shift is not None else w_packed, gate, y,
        out_idx, out_cnt, in_idx, in_cnt,
        cin, cout, h, w, ho, wo,
        *x.stride(), *y.stride(), *gate.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
    )
    meta = dict(
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None, HAS_IN_GATE=in_gate is not None,
        ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
    )
    if triton_interpret() and not x.is_cuda:
        blocks = _INTERPRETER_BLOCKS
        grid = (triton.cdiv(ho * wo, blocks["BLOCK_P"]), triton.cdiv(cout, blocks["BLOCK_CO"]), n)
        wrap_triton(_channel_sparse_conv2d_kernel)[grid](*args, **meta, **blocks)
    else:
        def grid(m):
            return (triton.cdiv(ho * wo, m["BLOCK_P"]), triton.cdiv(cout, m["BLOCK_CO"]), n)

        wrap_triton(_autotuned_kernel)[grid](*args, **meta)
    return y


if triton_interpret():
    # Under the interpreter a kernel runs eagerly in Python and cannot take FakeTensors, so the
    # fake kernel that triton_op derives by tracing the function would fail: give it directly.
    # (On the GPU the derived one is kept, so torch.compile still traces into the kernel.)
    @channel_sparse_conv2d_triton.register_fake
    def _channel_sparse_conv2d_triton_fake(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift=None):
        return _empty_output(x, weight, stride, padding, dilation)
