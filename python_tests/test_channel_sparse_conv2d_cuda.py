"""The hand-written CUDA kernel of channel_sparse_conv2d (csrc/cuda/channel_sparse_conv2d_*.cu*)
called directly through torch.ops.dynkernels, against dynkernels.reference evaluated in float64
on the CPU. Every test needs a GPU (marker `cuda`) and is skipped without one.

The output memory is poisoned with NaN before each call (a freed block of the same size is the
one the caching allocator hands to the kernel's output), so an element the kernel forgets to
write shows up as NaN instead of passing by luck. The tests that compare with the reference run
every tile configuration (CONFIGS: -1, the kernel's choice, and every id of
dynkernels._C.cuda_conv_configs()) on the same inputs.
"""
import math

import pytest
import torch

import dynkernels
from dynkernels import reference

from dynkernels.ops.channel_sparse_conv2d import cuda_conv_configs

from _utils import assert_close, rand_gate, skip_cuda_throws

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not dynkernels.cuda_kernels_compiled(), reason="this build has no CUDA kernels"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
CONFIGS = [-1] + [c["id"] for c in cuda_conv_configs()]

# (N, Cin, H, W, Cout, (kh, kw), stride, padding, dilation): partial M, N and K tiles (tiles
# are 64 or 128 channels x 64 or 128 pixels x 32 or 64 input channels), several tiles along M
# and N, Cin not a multiple of 8, N = 1, 1x1 / 3x3 / 5x5 / 7x7 and non-square kernels, stride 2,
# dilation 2. With an input gate, the shapes with at least 4 pixel tiles per sample (the 20x20
# output, and 15x15 with 64-pixel tiles) run the GEMM on per-sample compacted weight rows, the
# others gather the weight in the GEMM (compact_weights_per_sample).
SHAPES = [
    (2, 16, 9, 11, 24, (3, 3), 1, 1, 1),
    (1, 3, 17, 13, 70, (3, 3), 2, 1, 1),
    (3, 64, 8, 8, 128, (1, 1), 1, 0, 1),
    (2, 40, 15, 15, 33, (5, 5), 1, 2, 1),
    (2, 24, 16, 16, 20, (7, 7), 2, 3, 1),
    (2, 32, 12, 12, 48, (3, 3), 1, 2, 2),
    (2, 72, 10, 10, 96, (3, 3), 2, 1, 1),
    (2, 16, 10, 9, 16, (3, 5), (1, 2), (1, 0), 1),
    (2, 16, 20, 20, 16, (3, 3), 1, 1, 1),
    (2, 100, 13, 12, 200, (3, 3), 1, 1, 1),
    (3, 64, 7, 7, 136, (3, 3), 1, 1, 1),
]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def make_inputs(shape, dtype, layout, bias=True, seed=0):
    n, cin, h, w, cout, (kh, kw), *_ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    weight = (torch.randn(cout, cin, kh, kw, generator=g) / math.sqrt(cin * kh * kw)).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype) if bias else None
    x = x.cuda()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight.cuda(), None if b is None else b.cuda()


def expected(x, weight, bias, out_gate, in_gate, stride, padding, dilation):
    """The reference in float64 on the CPU, rounded once to x's dtype."""
    d = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    y = reference.channel_sparse_conv2d(d(x), d(weight), d(bias), d(out_gate), d(in_gate), stride, padding, dilation)
    return y.to(x.dtype)


def run_cuda(x, weight, bias, out_gate, in_gate, stride, padding, dilation, config=-1):
    n, cout = out_gate.shape
    h, w = x.shape[2:]
    kh, kw = weight.shape[2:]
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    poison = torch.full((n * cout * ho * wo,), float("nan"), dtype=x.dtype, device=x.device)
    del poison  # its block is what the output gets next
    return torch.ops.dynkernels.channel_sparse_conv2d(x, weight, bias, out_gate, in_gate, s, p, d, None, config)


def check(y, x, weight, bias, out_gate, in_gate, stride, padding, dilation, exp=None, config=-1):
    exp = expected(x, weight, bias, out_gate, in_gate, stride, padding, dilation) if exp is None else exp
    assert not torch.isnan(y).any(), f"config {config}: NaN in the output (an element was not written?)"
    assert_close(y, exp)
    inactive = (out_gate <= 0).cpu()[:, :, None, None].expand_as(exp)
    assert (y.cpu()[inactive] == 0).all(), "inactive output channels must be exactly 0"
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), f"output must be in {fmt}, strides {y.stride()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gated_input", [False, True], ids=["out-gate", "in-out-gate"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-k{s[5][0]}{s[5][1]}")
def test_matches_reference(shape, gated_input, layout, dtype):
    n, cin, _, _, cout, _, stride, padding, dilation = shape
    x, weight, bias = make_inputs(shape, dtype, layout, bias=cin % 2 == 0)
    out_gate = rand_gate((n, cout), 0.5, device="cuda")
    in_gate = rand_gate((n, cin), 0.5, device="cuda") if gated_input else None
    exp = expected(x, weight, bias, out_gate, in_gate, stride, padding, dilation)
    for config in CONFIGS:
        y = run_cuda(x, weight, bias, out_gate, in_gate, stride, padding, dilation, config)
        check(y, x, weight, bias, out_gate, in_gate, stride, padding, dilation, exp, config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_all_zero_and_all_one_gates(density, layout, dtype):
    shape = (3, 40, 11, 12, 70, (3, 3), 1, 1, 1)
    x, weight, bias = make_inputs(shape, dtype, layout)
    out_gate = torch.full((3, 70), density, device="cuda")
    in_gate = torch.full((3, 40), density, device="cuda")
    for ig in (None, in_gate):
        exp = expected(x, weight, bias, out_gate, ig, 1, 1, 1)
        for config in CONFIGS:
            y = run_cuda(x, weight, bias, out_gate, ig, 1, 1, 1, config)
            check(y, x, weight, bias, out_gate, ig, 1, 1, 1, exp, config)
            if density == 0.0:
                assert (y == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_input_channels_off_gives_bias_times_gate(dtype):
    shape = (2, 24, 8, 8, 40, (3, 3), 1, 1, 1)
    x, weight, bias = make_inputs(shape, dtype, "channels_last")
    out_gate = rand_gate((2, 40), 0.5, device="cuda")
    in_gate = torch.zeros(2, 24, device="cuda")
    for config in CONFIGS:
        y = run_cuda(x, weight, bias, out_gate, in_gate, 1, 1, 1, config)
        check(y, x, weight, bias, out_gate, in_gate, 1, 1, 1, config=config)


@pytest.mark.parametrize("gate_dtype", [torch.bool, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_gate_dtypes(gate_dtype):
    shape = (2, 32, 9, 9, 48, (3, 3), 1, 1, 1)
    x, weight, bias = make_inputs(shape, torch.float16, "channels_last")
    out_gate = rand_gate((2, 48), 0.5, device="cuda", dtype=torch.float32)
    in_gate = rand_gate((2, 32), 0.5, device="cuda", dtype=torch.float32)
    if gate_dtype == torch.bool:
        out_gate, in_gate = out_gate > 0, in_gate > 0
    else:
        out_gate, in_gate = out_gate.to(gate_dtype), in_gate.to(gate_dtype)
    y = run_cuda(x, weight, bias, out_gate, in_gate, 1, 1, 1)
    check(y, x, weight, bias, out_gate.float(), in_gate.float(), 1, 1, 1)


def test_negative_and_nan_gates_are_inactive():
    shape = (2, 16, 8, 8, 32, (3, 3), 1, 1, 1)
    x, weight, bias = make_inputs(shape, torch.float32, "nchw")
    out_gate = rand_gate((2, 32), 0.7, device="cuda")
    out_gate[0, :4] = -1.0
    out_gate[1, 5] = float("nan")
    y = run_cuda(x, weight, bias, out_gate, None, 1, 1, 1)
    check(y, x, weight, bias, out_gate, None, 1, 1, 1)
    assert (y[0, :4] == 0).all() and (y[1, 5] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    shape = (2, 24, 10, 10, 40, (3, 3), 1, 1, 1)
    x, weight, bias = make_inputs(shape, dtype, "nchw")
    x = torch.cat([x, x], dim=3)[:, :, :, ::2]  # strided view
    weight = weight.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous weight
    out_gate = rand_gate((2, 40), 0.5, device="cuda").t().contiguous().t()
    in_gate = rand_gate((2, 24), 0.5, device="cuda")
    y = run_cuda(x, weight, bias, out_gate, in_gate, 1, 1, 1)
    check(y, x, weight, bias, out_gate, in_gate, 1, 1, 1)


@pytest.mark.parametrize(
    "shape",
    [(4, 64, 56, 56, 64, (3, 3), 1, 1, 1), (4, 256, 14, 14, 256, (3, 3), 1, 1, 1), (2, 512, 7, 7, 2048, (1, 1), 1, 0, 1)],
    ids=["r18-layer1", "r18-layer3", "r50-layer4-1x1"],
)
def test_resnet_layer_shapes_bf16_channels_last(shape):
    """ResNet layer shapes: many tiles, full K chunks, 7x7 outputs, Cout = 2048; every configuration."""
    n, cin, _, _, cout, _, stride, padding, dilation = shape
    x, weight, _ = make_inputs(shape, torch.bfloat16, "channels_last", bias=False)
    out_gate = rand_gate((n, cout), 0.5, device="cuda")
    in_gate = rand_gate((n, cin), 0.5, device="cuda")
    shift = torch.randn(cout, device="cuda").to(torch.bfloat16)
    for ig in (None, in_gate):
        base = expected(x, weight, None, out_gate, ig, stride, padding, dilation).double()
        exp = torch.where((out_gate > 0).cpu()[:, :, None, None], base + shift.double().cpu()[None, :, None, None],
                          torch.zeros((), dtype=torch.float64)).to(torch.bfloat16)
        for config in CONFIGS:
            y = torch.ops.dynkernels.channel_sparse_conv2d(x, weight, None, out_gate, ig, [stride] * 2, [padding] * 2,
                                                           [dilation] * 2, shift, config)
            check(y, x, weight, None, out_gate, ig, stride, padding, dilation, exp, config)


def test_out_of_range_config_is_a_clear_error_from_the_python_op():
    x = torch.randn(2, 8, 6, 6, device="cuda")
    w = torch.randn(16, 8, 3, 3, device="cuda")
    g = torch.ones(2, 16, device="cuda")
    n = len(cuda_conv_configs())
    with pytest.raises(ValueError, match=rf"config {n} is not a tile configuration .* \[0, {n}\)"):
        dynkernels.channel_sparse_conv2d(x, w, None, g, padding=1, backend="cuda", config=n)


def test_no_host_synchronisation():
    shape = (4, 32, 12, 12, 64, (3, 3), 1, 1, 1)
    x, weight, bias = make_inputs(shape, torch.bfloat16, "nchw")
    out_gate = rand_gate((4, 64), 0.5, device="cuda")
    in_gate = rand_gate((4, 32), 0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = torch.ops.dynkernels.channel_sparse_conv2d(x, weight, bias, out_gate, in_gate, [1, 1], [1, 1], [1, 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(y, x, weight, bias, out_gate, in_gate, 1, 1, 1)


@skip_cuda_throws
def test_bad_arguments_are_named():
    op = torch.ops.dynkernels.channel_sparse_conv2d
    x = torch.randn(2, 8, 6, 6, device="cuda")
    w = torch.randn(16, 8, 3, 3, device="cuda")
    g = torch.ones(2, 16, device="cuda")
    with pytest.raises(RuntimeError, match="float64"):
        op(x.double(), w.double(), None, g, None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        op(x, w.half(), None, g, None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="out_gate must be"):
        op(x, w, None, g[:, :8], None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="in_gate must be"):
        op(x, w, None, g, g, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, w, torch.zeros(3, device="cuda"), g, None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        op(x, w, None, g, None, [0, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        op(x, torch.randn(16, 8, 9, 9, device="cuda"), None, g, None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="config must be -1"):
        op(x, w, None, g, None, [1, 1], [1, 1], [1, 1], None, len(cuda_conv_configs()))
