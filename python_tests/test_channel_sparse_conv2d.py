"""channel_sparse_conv2d on every backend against dynkernels.reference (contract: DESIGN.md)."""

import pytest
import torch
import torch.nn.functional as F

import dynkernels
from dynkernels import reference

from _utils import HAS_TRITON, assert_close, device_backends, dtypes_for, needs_interpreter, rand_gate, triton_devices


def skip_float64_on_cuda_kernel(backend):
    if backend == "cuda":
        pytest.skip("the hand-written CUDA kernel has no float64 path (its clear error is tested in test_channel_sparse_conv2d_cuda.py)")


# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, bias, in_gate): odd shapes, N = 1,
# kernels 1/3/5/7, stride 1/2 (also per axis), padding, dilation. Tiny: Triton runs them in
# the interpreter here.
CASES = [
    (2, 5, 7, 7, 6, 3, 1, 1, 1, True, True),
    (1, 4, 6, 8, 7, 5, 2, 2, 1, False, True),
    (2, 3, 5, 6, 7, 1, 2, 0, 1, True, False),
    (1, 3, 4, 8, 8, 7, 1, 3, 1, True, True),
    (2, 4, 5, 8, 9, 3, 1, 2, 2, True, False),
    (2, 3, 4, 7, 8, 3, (1, 2), (0, 1), (2, 1), False, True),
    (2, 4, 3, 6, 9, 3, 1, (2, 0), (1, 3), True, True),  # stride 1, per-axis padding and dilation
]


def case_id(c):
    return "n{}_ci{}_co{}_{}x{}_k{}_s{}_p{}_d{}_{}_{}".format(
        *c[:9], "bias" if c[9] else "nobias", "ingate" if c[10] else "noingate"
    )


def make_inputs(case, device, dtype=torch.float32, density=0.6):
    n, cin, cout, h, w, k, stride, padding, dilation, has_bias, has_in_gate = case
    x = torch.randn(n, cin, h, w, device=device, dtype=dtype)
    weight = torch.randn(cout, cin, k, k, device=device, dtype=dtype) / (cin * k * k) ** 0.5
    bias = torch.randn(cout, device=device, dtype=dtype) if has_bias else None
    out_gate = rand_gate((n, cout), density, device)
    in_gate = rand_gate((n, cin), density, device) if has_in_gate else None
    return x, weight, bias, out_gate, in_gate, stride, padding, dilation


def expected(x, weight, bias, out_gate, in_gate, stride, padding, dilation):
    """The reference in float64, rounded to x's dtype (so fp16 is judged against the exact result)."""
    d = torch.float64
    y = reference.channel_sparse_conv2d(
        x.to(d), weight.to(d), None if bias is None else bias.to(d), out_gate, in_gate, stride, padding, dilation
    )
    return y.to(x.dtype)


def run(args, backend, **kw):
    return dynkernels.channel_sparse_conv2d(*args, backend=backend, **kw)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(device, backend, case, layout):
    args = make_inputs(case, device)
    if layout == "channels_last":
        args = (args[0].contiguous(memory_format=torch.channels_last),) + args[1:]
    y = run(args, backend)
    assert_close(y, expected(*args))
    out_gate = args[3]
    inactive = (out_gate <= 0)[:, :, None, None].expand_as(y)
    assert (y[inactive] == 0).all(), "inactive output channels must be exactly zero"


@pytest.mark.cuda
@pytest.mark.skipif(not dynkernels.cuda_kernels_compiled(), reason="this build has no CUDA kernels")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_kernel_every_config(case, dtype, layout):
    """The cuda-cuda pair of test_matches_reference with every tile configuration of the CUDA kernel."""
    from dynkernels.ops.channel_sparse_conv2d import cuda_conv_configs

    args = make_inputs(case, "cuda", dtype)
    if layout == "channels_last":
        args = (args[0].contiguous(memory_format=torch.channels_last),) + args[1:]
    want = expected(*args)
    inactive = (args[3] <= 0)[:, :, None, None].expand_as(want)
    for config in [-1] + [c["id"] for c in cuda_conv_configs()]:
        y = run(args, "cuda", config=config)
        assert_close(y, want, dtype)
        assert (y[inactive] == 0).all(), f"config {config}: inactive output channels must be exactly zero"


@pytest.mark.parametrize("device,backend", device_backends())
def test_dtypes(device, backend):
    for dtype in dtypes_for(device, backend):
        args = make_inputs(CASES[0], device, dtype)
        assert_close(run(args, backend), expected(*args), dtype)


@pytest.mark.parametrize("device,backend", device_backends())
def test_float64(device, backend):
    skip_float64_on_cuda_kernel(backend)
    args = make_inputs(CASES[1], device, torch.float64)
    assert_close(run(args, backend), expected(*args))


@pytest.mark.parametrize("device,backend", device_backends())
def test_gate_extremes(device, backend):
    case = (2, 4, 5, 6, 5, 3, 1, 1, 1, True, True)
    x, w, b, og, ig, s, p, d = make_inputs(case, device)
    n, cout = og.shape
    # All-zero output gate: exact zeros everywhere.
    y = run((x, w, b, torch.zeros_like(og), ig, s, p, d), backend)
    assert (y == 0).all()
    # All-one gates: plain conv2d.
    ones_out, ones_in = torch.ones_like(og), torch.ones_like(ig)
    assert_close(run((x, w, b, ones_out, ones_in, s, p, d), backend), F.conv2d(x, w, b, s, p, d))
    assert_close(run((x, w, b, ones_out, None, s, p, d), backend), F.conv2d(x, w, b, s, p, d))
    # All-zero input gate: only the bias, scaled by the gate.
    y = run((x, w, b, og, torch.zeros_like(ig), s, p, d), backend)
    assert_close(y, (b[None, :] * og)[:, :, None, None].expand_as(y).contiguous())
    # Bool gates are masks (scale 1).
    args = (x, w, b, og > 0, ig > 0, s, p, d)
    assert_close(run(args, backend), expected(*args))


@pytest.mark.parametrize("device,backend", device_backends())
def test_layouts(device, backend):
    case = (2, 5, 6, 7, 6, 3, 2, 1, 1, True, True)
    x, w, b, og, ig, s, p, d = make_inputs(case, device)
    # channels_last input: output in channels_last too (the rule of every kernel and of the fake
    # kernel; the reference keeps whatever layout F.conv2d gives).
    kernel = backend != "torch"
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = run((x_cl, w, b, og, ig, s, p, d), backend)
    assert_close(y, expected(x, w, b, og, ig, s, p, d))
    assert not kernel or (y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous())
    # Non-contiguous x, weight and gates (slices): contiguous output.
    big = torch.randn(2, 10, 9, 13, device=device)
    x_nc = big[:, ::2, 1:8, ::2]
    w_nc = torch.randn(6, 5, 3, 6, device=device)[..., ::2]
    og_nc = rand_gate((6, 2), 0.6, device).t()
    ig_nc = rand_gate((5, 2), 0.6, device).t()
    y = run((x_nc, w_nc, b, og_nc, ig_nc, s, p, d), backend)
    assert_close(y, expected(x_nc, w_nc, b, og_nc, ig_nc, s, p, d))
    assert not kernel or y.is_contiguous()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=case_id)
def test_shift(device, backend, case, layout):
    """y = gate * (conv + bias) + shift on the active channels, exact zeros on the others."""
    x, w, b, og, ig, s, p, d = make_inputs(case, device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    shift = torch.randn(w.shape[0], device=device)
    y = dynkernels.channel_sparse_conv2d(x, w, b, og, ig, s, p, d, shift=shift, backend=backend)
    base = reference.channel_sparse_conv2d(x.double(), w.double(), None if b is None else b.double(), og, ig, s, p, d)
    want = torch.where((og > 0)[:, :, None, None], base + shift.double()[None, :, None, None], torch.zeros((), dtype=torch.float64))
    assert_close(y, want.float())
    assert (y[(og <= 0)[:, :, None, None].expand_as(y)] == 0).all()


# CASES[0], [4], [6]: stride 1, so dx runs sparsely through the kernel itself; [2]: stride 2,
# and the 1x1 case padded by 1 (padding > dilation * (kernel - 1)): dx from the dense backward.
GRAD_CASES = [CASES[0], CASES[4], CASES[6], CASES[2], (2, 3, 4, 5, 5, 1, 1, 1, 1, True, True)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
@pytest.mark.parametrize("device,backend", device_backends(include_torch=False))
def test_gradients_match_reference(device, backend, case):
    """fp32 gradients w.r.t. x, weight, bias and out_gate equal those of the reference."""
    x, w, b, og, ig, *rest = make_inputs(case, device)
    grad_y = None
    results = []
    shift = torch.randn(w.shape[0], device=device)
    for fn in (lambda *a, shift: run(a, backend, shift=shift), reference.channel_sparse_conv2d):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, og, shift)]
        y = fn(*leaves[:4], ig, *rest, shift=leaves[4])
        grad_y = torch.randn_like(y) if grad_y is None else grad_y
        y.backward(grad_y)
        results.append([t.grad for t in leaves])
    for name, got, want in zip(("x", "weight", "bias", "out_gate", "shift"), *results):
        assert got is not None, f"no gradient for {name}"
        assert_close(got, want, rtol=1e-4)


@pytest.mark.parametrize(
    "backend",
    ["cpu", pytest.param("triton", marks=[pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed"), needs_interpreter])],
)
def test_stride1_input_gradient_is_sparse_on_cpu(backend, monkeypatch):
    """On CPU tensors at stride 1, dx comes from the channel-sparse kernel itself (no dense
    convolution_backward when only dx is needed), exactly 0 on gated-off input channels."""
    x, w, b, og, ig, *rest = make_inputs(CASES[0], "cpu")
    ig[0] = 0  # sample 0: every input channel gated off
    dense_calls = []

    class CountingPacket:  # counts calls of the packet (as the backward makes them), forwards the rest
        def __init__(self, real):
            self.real = real

        def __call__(self, *a, **k):
            dense_calls.append(1)
            return self.real(*a, **k)

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", CountingPacket(torch.ops.aten.convolution_backward))
    x = x.requires_grad_(True)
    y = run((x, w, b, og, ig, *rest), backend)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert not dense_calls
    assert (grad_x[ig == 0] == 0).all()  # every gated-off input channel, all of sample 0 included
    monkeypatch.undo()
    x_ref = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(reference.channel_sparse_conv2d(x_ref, w, b, og, ig, *rest), x_ref, grad_y)
    assert_close(grad_x, want, rtol=1e-4)

@pytest.mark.parametrize("device,backend", device_backends(include_torch=False))
def test_gradcheck(device, backend):
    skip_float64_on_cuda_kernel(backend)
    case = (2, 2, 3, 4, 4, 3, 1, 1, 1, True, True) if backend != "triton" else (1, 2, 3, 4, 4, 3, 1, 1, 1, True, True)
    x, w, b, og, ig, s, p, d = make_inputs(case, device, torch.float64, density=0.7)
    # y is not differentiable in a gate at 0 (it switches the channel on): only the active
    # gate values are gradcheck inputs; the inactive ones stay exactly 0.
    active = og > 0
    og_vals = og[active].double()

    shift = torch.randn(w.shape[0], device=device, dtype=torch.float64)

    def fn(x, w, b, og_vals, shift):
        gate = torch.zeros(active.shape, dtype=og_vals.dtype, device=device).masked_scatter(active, og_vals)
        return run((x, w, b, gate, ig, s, p, d), backend, shift=shift)

    inputs = tuple(t.requires_grad_(True) for t in (x, w, b, og_vals, shift))
    # The interpreter is slow: Triton uses gradcheck's fast mode (random projections).
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


def _opcheck_args(device):
    x, w, b, og, ig, s, p, d = make_inputs((2, 3, 4, 5, 4, 3, 2, 1, 1, True, True), device)
    return (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), og.requires_grad_(True), ig,
            [2, 2], [1, 1], [1, 1])


def test_opcheck_compiled_op():
    torch.library.opcheck(torch.ops.dynkernels.channel_sparse_conv2d.default, _opcheck_args("cpu"))
    shift = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.dynkernels.channel_sparse_conv2d.default, _opcheck_args("cpu") + (shift, -1))
    args = list(_opcheck_args("cpu"))
    args[0] = args[0].detach().contiguous(memory_format=torch.channels_last)
    args[4] = None
    torch.library.opcheck(torch.ops.dynkernels.channel_sparse_conv2d.default, tuple(args))


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("device", triton_devices())
def test_opcheck_triton_op(device):
    from dynkernels.ops.channel_sparse_conv2d import _triton

    utils = None  # every check
    if device == "cpu":
        # AOT dispatch traces into the triton_op's body, where the interpreter would run the
        # kernel on functional tensors without storage; that check runs on the GPU only.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(_triton().channel_sparse_conv2d_triton, _opcheck_args(device), **kw)


@pytest.mark.cuda
def test_opcheck_cuda_kernel():
    if not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    torch.library.opcheck(torch.ops.dynkernels.channel_sparse_conv2d.default, _opcheck_args("cuda"))


def test_auto_picks_compiled_kernel_on_cpu(monkeypatch):
    args = make_inputs(CASES[2], "cpu")
    want = expected(*args)
    calls = []
    real = reference.channel_sparse_conv2d
    monkeypatch.setattr(reference, "channel_sparse_conv2d", lambda *a: calls.append(1) or real(*a))
    assert_close(dynkernels.channel_sparse_conv2d(*args), want)
    assert not calls, "backend='auto' on CPU must run the C++ kernel, not the reference"


# ----------------------------------------------------------------------------- bad input
def _good():
    x = torch.randn(2, 3, 6, 6)
    return dict(x=x, weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4), out_gate=torch.ones(2, 4),
                in_gate=torch.ones(2, 3), stride=1, padding=1, dilation=1)


BAD = [
    ("x", dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("x", dict(x=torch.randn(3, 6, 6)), ValueError, r"x must be \[N, Cin, H, W\]"),
    ("x", dict(x=torch.ones(2, 3, 6, 6, dtype=torch.int64)), TypeError, "x must be a floating tensor"),
    ("weight", dict(weight=torch.randn(4, 3, 3)), ValueError, "weight must be"),
    ("weight", dict(weight=torch.randn(4, 3, 3, 3).double()), TypeError, "weight must have x's dtype"),
    ("weight", dict(weight=torch.randn(4, 2, 3, 3)), ValueError, "weight has 2 input channels but x has 3"),
    ("bias", dict(bias=torch.randn(5)), ValueError, "bias has 5 entries"),
    ("bias", dict(bias=torch.randn(4).double()), TypeError, "bias must have x's dtype"),
    ("out_gate", dict(out_gate=torch.ones(2, 5)), ValueError, r"out_gate must be \[N, Cout\]"),
    ("out_gate", dict(out_gate=torch.ones(2, 4, dtype=torch.int32)), TypeError, "out_gate must be a floating or bool"),
    ("in_gate", dict(in_gate=torch.ones(3, 3)), ValueError, r"in_gate must be \[N, Cin\]"),
    ("stride", dict(stride=0), ValueError, "stride must be"),
    ("padding", dict(padding=(1, 2, 3)), ValueError, "padding must be"),
    ("dilation", dict(dilation=-1), ValueError, "dilation must be"),
    ("kernel", dict(weight=torch.randn(4, 3, 9, 9), padding=0), ValueError, "larger than the padded input"),
    ("shift", dict(shift=torch.randn(5)), ValueError, "shift has 5 entries"),
    ("shift", dict(shift=torch.randn(4, 1)), ValueError, r"shift must be \[Cout\]"),
    ("shift", dict(shift=torch.randn(4).double()), TypeError, "shift must have x's dtype"),
    ("density", dict(density=1.5), ValueError, r"density must be None or a number in \[0, 1\]"),
    ("density", dict(density="half"), ValueError, "density must be None or a number"),
    ("config", dict(config=-2), ValueError, r"config must be -1 \(the CUDA kernel's own choice\) or a tile configuration id"),
    ("config", dict(config=1.0), ValueError, "config must be -1"),
    ("config", dict(config=True), ValueError, "config must be -1"),
    ("backend", dict(backend="cudnn"), ValueError, "backend must be one of"),
    ("backend", dict(backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors"),
]


@pytest.mark.parametrize("name,change,exc,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(name, change, exc, msg):
    kw = _good()
    kw.update(change)
    backend = kw.pop("backend", "auto")
    with pytest.raises(exc, match=msg):
        dynkernels.channel_sparse_conv2d(**kw, backend=backend)


def test_compiled_op_checks_shapes_itself():
    """Called directly (bypassing the Python checks), the C++ kernel still names the bad argument."""
    kw = _good()
    with pytest.raises(RuntimeError, match="out_gate must be"):
        torch.ops.dynkernels.channel_sparse_conv2d(kw["x"], kw["weight"], kw["bias"], torch.ones(3, 4), None,
                                                  [1, 1], [1, 1], [1, 1])


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("device", triton_devices())
def test_triton_channel_lists_match_compact(device):
    """The Triton kernel's on-device compaction equals dynkernels.reference.compact row by row."""
    from dynkernels.ops.channel_sparse_conv2d import _triton

    gate = rand_gate((5, 37), 0.4, device)
    gate[1] = 0
    gate[2] = 1
    idx, count = _triton()._channel_lists(gate.t().contiguous().t())  # strided rows too
    want_idx, want_count = reference.compact(gate)
    assert torch.equal(idx.cpu(), want_idx.cpu()) and torch.equal(count.cpu(), want_count.cpu())


# (cin, in_gate, layout, config): several pixel and channel tiles with partial and dead ones,
# grouped tile order, split-K, Cin padded to 8 (20) or read in place (16, channels_last).
TRITON_TILE_CASES = [
    (20, True, "nchw", [16, 16, 16, 1, 1, 1, 2]),
    (16, False, "channels_last", [16, 16, 16, 1, 1, 3, 2]),
    (20, False, "channels_last", [32, 16, 32, 1, 1, 2, 1]),
    (16, True, "nchw", [16, 32, 16, 1, 1, 2, 8]),
]


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("cin,with_in_gate,layout,config", TRITON_TILE_CASES, ids=lambda v: str(v))
def test_triton_tile_configs(device, cin, with_in_gate, layout, config):
    """Explicit tile configurations of the Triton kernel against the reference."""
    from dynkernels.ops.channel_sparse_conv2d import _triton

    n, cout = 2, 40
    x = torch.randn(n, cin, 6, 7, device=device)
    w = torch.randn(cout, cin, 3, 3, device=device) / (cin * 9) ** 0.5
    if layout == "channels_last":
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    b, shift = torch.randn(cout, device=device), torch.randn(cout, device=device)
    og = rand_gate((n, cout), 0.6, device)
    og[1] = 0
    og[1, 3] = 1.0  # sample 1: one active channel, every other tile dead
    ig = rand_gate((n, cin), 0.5, device) if with_in_gate else None
    y = _triton().channel_sparse_conv2d_triton(x, w, b, og, ig, [1, 1], [1, 1], [1, 1], shift, config)
    want = reference.channel_sparse_conv2d(x.double(), w.double(), b.double(), og, ig, 1, 1, 1, shift.double())
    assert_close(y, want.float())
    assert (y[(og <= 0)[:, :, None, None].expand_as(y)] == 0).all()
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@needs_interpreter
def test_triton_bad_config_is_a_clear_error():
    from dynkernels.ops.channel_sparse_conv2d import _triton

    x, w, b, og, ig, s, p, d = make_inputs(CASES[0], "cpu")
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        _triton().channel_sparse_conv2d_triton(x, w, b, og, ig, [1, 1], [1, 1], [1, 1], None, [16, 24, 16, 1, 1])


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_every_shipped_config_on_gpu():
    """Each configuration the package can run on a GPU (compile_report.shipped_configs), once,
    in bf16 / fp16 with and without an input gate in turn, against the float64 reference."""
    from dynkernels.ops.channel_sparse_conv2d import _triton
    from dynkernels.triton.compile_report import shipped_configs, variants

    for cfg, dtype, gated in variants(shipped_configs()):
        dt = getattr(torch, dtype)
        n, cin, cout = 3, 72, 136  # partial K, channel and pixel tiles
        x = torch.randn(n, cin, 11, 10, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, 3, 3, device="cuda") / (cin * 9) ** 0.5).to(dt)
        b, shift = torch.randn(cout, device="cuda", dtype=dt), torch.randn(cout, device="cuda", dtype=dt)
        og = rand_gate((n, cout), 0.5, "cuda")
        ig = rand_gate((n, cin), 0.5, "cuda") if gated else None
        y = _triton().channel_sparse_conv2d_triton(x, w, b, og, ig, [1, 1], [1, 1], [1, 1], shift, cfg.to_list())
        want = reference.channel_sparse_conv2d(x.double(), w.double(), b.double(), og, ig, 1, 1, 1, shift.double())
        assert_close(y, want.to(dt), dt)
        assert (y[(og <= 0)[:, :, None, None].expand_as(y)] == 0).all(), cfg


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_default_config_comes_from_the_tables(monkeypatch):
    """Without an explicit config, the Triton op asks dynkernels.tuned_configs for the layer's
    tile (on a GPU; checked here with the interpreter switched off for the choice only)."""
    from dynkernels import tuned_configs
    from dynkernels.ops.channel_sparse_conv2d import _triton

    conv = _triton()
    seen = []
    monkeypatch.setattr(conv, "triton_interpret", lambda: False)
    monkeypatch.setattr(tuned_configs, "triton_config", lambda device, key, density=None: seen.append(key) or "tile")
    x, w, b, og, ig, *_ = make_inputs(CASES[0], "cpu")
    assert conv._pick_config(x, w, ig, (2, 7, 7, 6), [1, 1], None) == "tile"
    assert seen == [tuned_configs.ConvKey(5, 7, 3, 3, (1, 1), 7, 6, 2, "float32", "in+out")]
    assert conv._pick_config(x, w, ig, (2, 7, 7, 6), [1, 1], [32, 16, 16, 1, 1]).block_m == 32
