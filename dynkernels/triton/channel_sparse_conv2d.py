"""Triton channel_sparse_conv2d: a gathered grouped GEMM over each sample's active channels.

torch.ops.dynkernels.channel_sparse_conv2d_triton(x, weight, bias, out_gate, in_gate, stride,
padding, dilation, shift=None, config=None) follows the contract of
dynkernels.channel_sparse_conv2d (DESIGN.md). `config` is a tile configuration as the list
TileConfig.to_list() gives; None picks one from the tuned tables (dynkernels.tuned_configs).

Per sample n the convolution is a GEMM  Y_n[pixel, j] = sum_K A_n[pixel, K] * B_n[K, j]:
  - M: a tile of BLOCK_M output pixels of sample n;
  - N: a tile of BLOCK_N positions j of n's output channel list (active channels first, built on
    the device by _compact_rows_kernel); B's rows are the gathered weight rows out_idx[n, j],
    each contiguous along K in the packed weight [Cout, kh, kw, WC];
  - K: (input-channel block, tap) pairs; A is the NHWC input at the tap's shifted pixels, a run
    of BLOCK_K contiguous channels per pixel. With an input gate, A comes from a compact NHWC
    buffer holding per sample only its active input channels (_pack_nhwc_kernel), so K stays
    contiguous and its length follows n's active input count (read on the device).
Every pixel stride (XC, WC) is a multiple of 8 elements and every K bound a multiple of 8, and
the kernel tells Triton so (tl.multiple_of): A and B load as 16-byte vectors with cp.async into a
num_stages-deep shared-memory ring feeding wgmma on sm_90 (python -m
dynkernels.triton.compile_report shows it per configuration). With an input gate B is gathered
along K as well (the weight's input channels out_idx x in_idx): those loads are element-wise and
cannot be cp.async copies, so they are prefetched one step ahead in registers instead (and
each step's dot waits for its wgmma before B's single shared-memory buffer is rewritten).
Tiles that start past n's active output count do no reduction and write the zeros of the inactive
channels, so every output element is written exactly once. The epilogue adds the bias, scales by
the gate, adds the shift and writes exact zeros. With split_k > 1, split_k programs share a
tile's K range and write partial sums (in the accumulator's dtype) that _split_k_epilogue_kernel
adds up (for layers whose active tiles are too few to fill the GPU). Grid: one program per
(sample, pixel tile, channel tile, K split); a sample's programs are adjacent (they share its
input rows in L2), and within a sample the tiles run GROUP_M pixel tiles at a time across all
channel tiles.

Layouts: the output keeps x's layout (row_layout). x that is channels_last with a channel count
divisible by 8 and no input gate is read in place; any other x is repacked once into a padded
NHWC buffer (the same kernel that compacts gated channels). A weight that is channels_last
(model.to(memory_format=torch.channels_last)) with Cin divisible by 8 is read in place; any other
is repacked per call.

fp16/bf16 run on tensor cores with an fp32 accumulator; fp32 uses TF32 only when
torch.backends.cuda.matmul.allow_tf32 is set (else exact fp32, matching the reference to 1e-5);
fp64 accumulates in fp64. Under TRITON_INTERPRET=1 (CPU tensors, tests) the default tile is
INTERPRETER_CONFIG.
"""
import functools
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .. import tuned_configs
from .._extension import triton_interpret
from .._layout import conv2d_output_shape, row_layout
from ..tuned_configs import TileConfig
from . import wrap_triton

# Channel runs are padded to a multiple of this many elements (16 bytes of fp16/bf16); the
# kernels' tl.multiple_of(., 8) hints and tuned_configs.channel_stride rely on it.
CHANNEL_ALIGN = 8
# Tiny tiles for the interpreter (it runs each program in Python).
INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)


@triton.jit
def _gather_weight_tile(w_ptr, w_row_offs, in_idx_n, step, n_steps, in_cnt, Cin, WC, rk,
                        KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """B tile [BLOCK_N, BLOCK_K] of K step `step` with an input gate: weight[co_j, tap, in_idx[k]],
    zero for k past the active input count (and for a step past the last one)."""
    kb = step // (KH * KW)
    tap = step - kb * (KH * KW)
    k = kb * BLOCK_K + rk
    ok = (k < in_cnt) & (step < n_steps)
    ci = tl.load(in_idx_n + k, mask=ok & (k < Cin), other=0)
    # int32 element offsets (the weight has < 2**31 elements): a pointer per element would
    # take two registers each, and this tile is gathered element by element.
    return tl.load(w_ptr + (w_row_offs[:, None] + (tap * WC + ci)[None, :]), mask=ok[None, :], other=0.0)


@triton.jit
def _epilogue_store(acc, y_ptr, b_ptr, t_ptr, g_ptr, n, p, p_mask, j, co, out_cnt, Cout, sgn, sgc, syn, syp, syc,
                    HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """y[n, co_j, p] = gate * (acc + bias) + shift for list positions j < out_cnt, exact 0 past it."""
    active = j < out_cnt
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=active, other=0.0).to(ACC_DTYPE)[None, :]
    acc = acc * tl.load(g_ptr + n * sgn + co * sgc, mask=active, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_SHIFT:
        acc += tl.load(t_ptr + co, mask=active, other=0.0).to(ACC_DTYPE)[None, :]
    out = tl.where(active[None, :], acc, 0.0)
    tl.store(y_ptr + n * syn + p[:, None] * syp + co[None, :] * syc, out.to(y_ptr.dtype.element_ty),
             mask=p_mask[:, None] & (j < Cout)[None, :])


@triton.jit
def _channel_sparse_conv2d_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, g_ptr, y_ptr, ws_ptr,
    out_idx_ptr, out_cnt_ptr, in_idx_ptr, in_cnt_ptr,
    N, H, W, Ho, Wo, Cin, Cout, XC, WC,
    sgn, sgc, syn, syp, syc,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_GATED: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # x: NHWC [N, H, W, XC] (compact per sample when IN_GATED); w: [Cout, KH, KW, WC].
    P = Ho * Wo
    num_m = tl.cdiv(P, BLOCK_M)
    num_n = tl.cdiv(Cout, BLOCK_N)
    # Programs of one sample are adjacent (they share its input rows in L2); within a sample the
    # tiles go in groups of GROUP_M pixel tiles x every channel tile.
    pid = tl.program_id(0)
    n = pid // (num_m * num_n)
    t = pid - n * (num_m * num_n)
    n = n.to(tl.int64)
    in_group = GROUP_M * num_n
    first_m = (t // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (t % in_group) % group_m
    pid_n = (t % in_group) // group_m

    XC = tl.multiple_of(XC, 8)
    WC = tl.multiple_of(WC, 8)
    out_cnt = tl.load(out_cnt_ptr + n)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co = tl.load(out_idx_ptr + n * Cout + j % Cout)  # j % Cout: a valid row even in a partial tile
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = p < P
    oh = p // Wo
    ow = p - oh * Wo
    live = pid_n * BLOCK_N < out_cnt
    if SPLIT_K > 1 and not live:
        return  # the split-K epilogue writes this tile's zeros

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if live:
        if IN_GATED:
            in_cnt = tl.load(in_cnt_ptr + n)
            k_len = tl.multiple_of((in_cnt + 7) // 8 * 8, 8)  # the buffer holds zeros up to here
        else:
            k_len = XC
        # K steps: input-channel blocks (outer) x taps (inner), so that the channel list of a
        # block stays in L1 across its taps.
        n_steps = tl.cdiv(k_len, BLOCK_K) * (KH * KW)
        per_split = tl.cdiv(n_steps, SPLIT_K)
        first = tl.program_id(1) * per_split
        last = tl.minimum(first + per_split, n_steps)
        x_n = x_ptr + n * H * W * XC
        rk = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + co.to(tl.int64) * (KH * KW * WC)
        in_idx_n = in_idx_ptr + n * Cin
        if IN_GATED:
            w_row_offs = co * (KH * KW * WC)
            b_next = _gather_weight_tile(w_ptr, w_row_offs, in_idx_n, first, last, in_cnt, Cin, WC, rk, KH, KW, BLOCK_K)
        for step in range(first, last):
            kb = step // (KH * KW)
            tap = step - kb * (KH * KW)
            ky = tap // KW
            kx = tap - ky * KW
            k = kb * BLOCK_K + rk
            k_ok = k < k_len
            ih = oh * stride_h - pad_h + ky * dil_h
            iw = ow * stride_w - pad_w + kx * dil_w
            inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_n + (ih * W + iw)[:, None] * XC + k[None, :], mask=inside[:, None] & k_ok[None, :], other=0.0)
            if IN_GATED:
                b = b_next
                b_next = _gather_weight_tile(w_ptr, w_row_offs, in_idx_n, step + 1, last, in_cnt, Cin, WC, rk, KH, KW, BLOCK_K)
            else:
                b = tl.load(w_rows[:, None] + tap * WC + k[None, :], mask=k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if SPLIT_K > 1:  # partial sums [SPLIT_K, N, P, Cout] (accumulator dtype) by list position j
        part = ws_ptr + ((tl.program_id(1) * N + n) * P) * Cout
        tl.store(part + p[:, None] * Cout + j[None, :], acc, mask=p_mask[:, None] & (j < Cout)[None, :])
    else:
        _epilogue_store(acc, y_ptr, b_ptr, t_ptr, g_ptr, n, p, p_mask, j, co, out_cnt, Cout, sgn, sgc, syn, syp, syc,
                        HAS_BIAS, HAS_SHIFT, ACC_DTYPE)


@triton.jit
def _split_k_epilogue_kernel(
    ws_ptr, b_ptr, t_ptr, g_ptr, y_ptr, out_idx_ptr, out_cnt_ptr,
    N, P, Cout, sgn, sgc, syn, syp, syc,
    HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sums the SPLIT_K partial tiles of the active list positions and applies the epilogue."""
    num_m = tl.cdiv(P, BLOCK_M)
    num_n = tl.cdiv(Cout, BLOCK_N)
    pid = tl.program_id(0)
    n = pid // (num_m * num_n)
    t = pid - n * (num_m * num_n)
    n = n.to(tl.int64)
    pid_m = t // num_n
    pid_n = t - pid_m * num_n
    out_cnt = tl.load(out_cnt_ptr + n)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co = tl.load(out_idx_ptr + n * Cout + j % Cout)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = p < P
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if pid_n * BLOCK_N < out_cnt:
        live = p_mask[:, None] & (j < out_cnt)[None, :]
        for s in range(SPLIT_K):
            part = ws_ptr + ((s * N + n) * P) * Cout
            acc += tl.load(part + p[:, None] * Cout + j[None, :], mask=live, other=0.0)
    _epilogue_store(acc, y_ptr, b_ptr, t_ptr, g_ptr, n, p, p_mask, j, co, out_cnt, Cout, sgn, sgc, syn, syp, syc,
                    HAS_BIAS, HAS_SHIFT, ACC_DTYPE)


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


@triton.jit
def _pack_nhwc_kernel(x_ptr, buf_ptr, in_idx_ptr, in_cnt_ptr, Cin, HW, W, XC, sxn, sxc, sxh, sxw,
                      IN_GATED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """buf[n, p, c] (NHWC, XC channels per pixel) = x[n, src_c, p] for the channels c < count and
    0 from there up to the next multiple of 8: src_c = in_idx[n, c] and count = in_cnt[n] with an
    input gate (the compact buffer), else src_c = c and count = Cin (a padded NHWC copy). Channel
    blocks past that bound are not written (the conv kernel never reads them)."""
    num_p = tl.cdiv(HW, BLOCK_P)
    pid = tl.program_id(0)
    n = (pid // num_p).to(tl.int64)
    p = (pid % num_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if IN_GATED:
        count = tl.load(in_cnt_ptr + n)
    else:
        count = Cin
    bound = (count + 7) // 8 * 8
    if tl.program_id(1) * BLOCK_C < bound:
        valid = c < count
        if IN_GATED:
            src = tl.load(in_idx_ptr + n * Cin + c, mask=valid, other=0)
        else:
            src = c
        h = p // W
        w = p - h * W
        p_ok = p < HW
        v = tl.load(x_ptr + n * sxn + src[None, :] * sxc + (h * sxh + w * sxw)[:, None],
                    mask=p_ok[:, None] & valid[None, :], other=0.0)
        tl.store(buf_ptr + (n * HW + p[:, None]) * XC + c[None, :], v, mask=p_ok[:, None] & (c < bound)[None, :])


# ----------------------------------------------------------------------------- host side
def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


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


def _nhwc_input(x: torch.Tensor, in_idx: Optional[torch.Tensor], in_cnt: Optional[torch.Tensor]):
    """(x as NHWC [N, H, W, XC] memory, XC): x itself when it already is channels_last with a
    channel count divisible by CHANNEL_ALIGN and there is no input gate (a base address that is
    not 16-byte aligned only costs vector width: Triton specialises on the pointers' alignment);
    else one _pack_nhwc_kernel launch (compacting the active input channels when in_idx is given)."""
    n, cin, h, w = x.shape
    if in_idx is None and cin % CHANNEL_ALIGN == 0 and x.permute(0, 2, 3, 1).is_contiguous():
        return x, cin
    xc = _round_up(cin, CHANNEL_ALIGN)
    buf = torch.empty((n, h, w, xc), device=x.device, dtype=x.dtype)
    block_p, block_c = 32, min(64, triton.next_power_of_2(xc))
    grid = (n * triton.cdiv(h * w, block_p), triton.cdiv(xc, block_c))
    wrap_triton(_pack_nhwc_kernel)[grid](
        x, buf, in_idx if in_idx is not None else buf, in_cnt if in_cnt is not None else buf,
        cin, h * w, w, xc, *x.stride(), IN_GATED=in_idx is not None, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return buf, xc


def _packed_weight(weight: torch.Tensor):
    """(weight as [Cout, kh, kw, WC] memory, WC), WC = Cin rounded up to CHANNEL_ALIGN (zeros
    past Cin). A channels_last weight with Cin divisible by CHANNEL_ALIGN is used in place."""
    cin = weight.shape[1]
    khwc = weight.permute(0, 2, 3, 1)
    if cin % CHANNEL_ALIGN == 0:
        return (khwc if khwc.is_contiguous() else khwc.contiguous()), cin
    wc = _round_up(cin, CHANNEL_ALIGN)
    packed = weight.new_zeros((weight.shape[0], weight.shape[2], weight.shape[3], wc))
    packed[..., :cin] = khwc
    return packed, wc


@functools.lru_cache(maxsize=256)
def _tile(config: tuple) -> TileConfig:
    return TileConfig.from_list(config)  # validated once per distinct config (host time per call)


def _pick_config(x, weight, in_gate, out_shape, stride, config) -> TileConfig:
    if config is not None:
        return _tile(tuple(config))
    if triton_interpret() and not x.is_cuda:
        return INTERPRETER_CONFIG
    key = tuned_configs.ConvKey.of(x, weight, in_gate, out_shape, stride)
    return tuned_configs.triton_config(x.device, key)  # no density hint here: DEFAULT_DENSITY


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
    config: Optional[List[int]] = None,
) -> torch.Tensor:
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    y = _empty_output(x, weight, stride, padding, dilation)
    ho, wo = y.shape[2:]
    if y.numel() == 0:
        return y
    c8 = _round_up(cin, CHANNEL_ALIGN)
    if max(h * w * c8, ho * wo * cout, cout * kh * kw * c8) >= 2**31:  # the kernel's int32 offsets
        raise ValueError("channel_sparse_conv2d: backend='triton' needs each sample's input and output and the weight "
                         f"to have fewer than 2**31 elements, got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    cfg = _pick_config(x, weight, in_gate, y.shape, stride, config)
    gate = out_gate if out_gate.dtype.is_floating_point else out_gate.to(x.dtype)
    out_idx, out_cnt = _channel_lists(gate)
    if in_gate is not None:
        in_idx, in_cnt = _channel_lists(in_gate if in_gate.dtype.is_floating_point else in_gate.to(x.dtype))
    else:
        in_idx = in_cnt = None
    x_nhwc, xc = _nhwc_input(x, in_idx, in_cnt)
    w_packed, wc = _packed_weight(weight)
    acc_dtype = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and x.is_cuda:
        precision = "tf32"
    else:
        precision = "ieee"
    # y's pixel stride: p = oh * Wo + ow indexes both dense layouts (NCHW: 1, NHWC: Cout).
    syn, syc, _, syp = y.stride()
    p = ho * wo
    split = cfg.split_k
    ws_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # the accumulator's
    ws = torch.empty((split, n, p, cout), device=x.device, dtype=ws_dtype) if split > 1 else y
    unused = w_packed  # a placeholder for absent optional tensors (never read)
    tiles = n * triton.cdiv(p, cfg.block_m) * triton.cdiv(cout, cfg.block_n)
    wrap_triton(_channel_sparse_conv2d_kernel)[(tiles, split)](
        x_nhwc, w_packed, bias if bias is not None else unused, shift if shift is not None else unused, gate, y, ws,
        out_idx, out_cnt, in_idx if in_idx is not None else out_idx, in_cnt if in_cnt is not None else out_cnt,
        n, h, w, ho, wo, cin, cout, xc, wc,
        *gate.stride(), syn, syp, syc,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None, IN_GATED=in_gate is not None,
        ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        wrap_triton(_split_k_epilogue_kernel)[(tiles,)](
            ws, bias if bias is not None else unused, shift if shift is not None else unused, gate, y, out_idx, out_cnt,
            n, p, cout, *gate.stride(), syn, syp, syc,
            HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None, ACC_DTYPE=acc_dtype,
            SPLIT_K=split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=4,
        )
    return y


if triton_interpret():
    # Under the interpreter a kernel runs eagerly in Python and cannot take FakeTensors, so the
    # fake kernel that triton_op derives by tracing the function would fail: give it directly.
    # (On the GPU the derived one is kept, so torch.compile still traces into the kernel.)
    @channel_sparse_conv2d_triton.register_fake
    def _channel_sparse_conv2d_triton_fake(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift=None,
                                           config=None):
        return _empty_output(x, weight, stride, padding, dilation)
