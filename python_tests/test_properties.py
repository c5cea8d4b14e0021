"""Property-based tests of every op against dynkernels.reference (hypothesis).

Each op is run on random shapes (N = 1, one channel, odd sizes, empty batches), dtypes, gates
(zeros, ones, negative, NaN, inf, bool), strides, paddings, dilations, non-contiguous and
channels_last inputs, on every backend that runs here: the C++ kernels ("cpu"), "auto", the
Triton kernels on CPU tensors under TRITON_INTERPRET=1 (few, small examples: the interpreter
is slow), and on a GPU the CUDA and Triton kernels (marked `cuda`). Profiles and the case
counts printed at the end of the run: _hypothesis.py.

What the tests hold the kernels to (the reference's semantics, DESIGN.md):
  * compact / route: exactly the reference's idx and count / offsets. A NaN gate (or a NaN
    threshold) is inactive: NaN > t is false.
  * gather_rows, scatter_rows, scatter_rows_: copies, so bit for bit the reference's result
    (NaN payloads and signed zeros included), any dtype.
  * scatter_add_rows: the reference's float32 (float64) sum rounded once: within the dtype's
    tolerance where finite, and NaN / +-inf at the same places.
  * channel_sparse_conv2d: the reference evaluated in float64 and rounded to x's dtype, within
    the dtype's tolerance; channels whose out_gate is not > 0 (zero, negative, NaN) exactly 0;
    an infinite gate gives +-inf (or NaN where the convolution is exactly 0) like the
    reference, except where the convolution is within rounding of 0 (its sign is then a
    matter of summation order).
Exceptions, by design: bfloat16 through Triton runs on a GPU only (the interpreter mishandles
bf16 arithmetic); the hand-written CUDA conv has no float64 path ("auto" runs the reference
there); the conv properties put inf and NaN into x only where there is no in_gate, since a
non-finite value in a gated-off input channel is skipped by the kernels (that channel costs no
FLOPs) but reaches the reference's output through x * 0 = NaN.
"""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dynkernels
from dynkernels import reference

from _hypothesis import count, examples
from _utils import HAS_TRITON, RTOL, needs_interpreter

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.int32, torch.int64, torch.uint8, torch.bool)
GATE_SPECIALS = (0.0, -0.0, 1.0, -1.0, 0.5, 3.0, 1e-3, math.nan, math.inf, -math.inf)


def _backends():
    """(device, backend, examples): every backend that runs here, and the GPU ones (marked)."""
    no_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
    no_cuda_kernels = pytest.mark.skipif(not dynkernels.cuda_kernels_compiled(), reason="this build has no CUDA kernels")
    gpu = pytest.mark.cuda
    return [
        pytest.param("cpu", "cpu", 150, id="cpu-cpp"),
        pytest.param("cpu", "auto", 80, id="cpu-auto"),
        pytest.param("cpu", "triton", 40, id="cpu-triton", marks=[pytest.mark.triton, no_triton, needs_interpreter]),
        pytest.param("cuda", "cuda", 40, id="cuda-cuda", marks=[gpu, no_cuda_kernels]),
        pytest.param("cuda", "triton", 25, id="cuda-triton", marks=[gpu, pytest.mark.triton, no_triton]),
        pytest.param("cuda", "auto", 25, id="cuda-auto", marks=gpu),
    ]


BACKENDS = _backends()
# NaN and inf gates are part of the properties: the Triton interpreter's numpy warns on them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def run_examples(device: str, backend: str, n: int, test, cases):
    """Run `test(device, backend, case)` on examples(n) cases drawn from `cases` (one
    hypothesis run per op and backend, each with its own budget)."""

    def prop(case):
        test(device, backend, case)

    prop.__qualname__ = f"{test.__name__}[{device}-{backend}]"  # names the run in hypothesis' reports
    given(cases)(settings(max_examples=examples(n))(prop))()


def float_dtypes(device: str, backend: str):
    """Floating dtypes of the data on a backend: bf16 through Triton on a GPU only."""
    if backend == "triton" and device == "cpu":
        return (torch.float32, torch.float64, torch.float16)
    return FLOATS


# ----------------------------------------------------------------------------- comparisons
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU, floating values as their bit patterns (NaN payloads, signed zeros)."""
    t = t.detach().cpu().contiguous()
    return t.view(_SAME_SIZE_INT[t.element_size()]) if t.dtype.is_floating_point else t


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, where: str):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{where}: {tuple(actual.shape)} {actual.dtype} != {tuple(expected.shape)} {expected.dtype}")
    assert torch.equal(bits(actual), bits(expected)), f"{where}: values differ"


def assert_close_nonfinite(actual, expected, dtype, where: str, ignore=None):
    """NaN and +-inf at the same places, the finite values within the dtype's tolerance
    (relative to the largest finite expected value); `ignore`: a mask of places not compared."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{where}: {tuple(actual.shape)} {actual.dtype} != {tuple(expected.shape)} {expected.dtype}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    keep = torch.ones_like(e, dtype=torch.bool) if ignore is None else ~ignore.cpu()
    a, e = a[keep], e[keep]
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{where}: NaN at other places"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{where}: +-inf at other places"
    finite = torch.isfinite(e)
    if finite.any():
        fa, fe = a[finite], e[finite]
        err, scale = (fa - fe).abs().max().item(), fe.abs().max().item()
        tol = RTOL[dtype] * max(scale, 1e-6)
        assert err <= tol, f"{where}: max abs error {err:.3g} > {tol:.3g} (scale {scale:.3g}, {dtype})"


# ----------------------------------------------------------------------------- strategies
def gate_values(n: int):
    return st.lists(st.one_of(st.sampled_from(GATE_SPECIALS), st.floats(-4, 4, width=32)), min_size=n, max_size=n)


@st.composite
def gates(draw, shape, dtypes, transposed_ok=True):
    """A gate of `shape`: bool, or floating with zeros, ones, negative, tiny, NaN and inf
    entries; sometimes a transposed (non-contiguous) view."""
    numel = math.prod(shape)
    dtype = draw(st.sampled_from((torch.bool,) + tuple(dtypes)))
    vals = torch.tensor(draw(gate_values(numel)), dtype=torch.float64)
    g = (vals > 0.25) if dtype == torch.bool else vals.to(dtype)
    g = g.reshape(shape)
    if transposed_ok and len(shape) == 2 and draw(st.booleans()):
        g = g.t().contiguous().t()  # same values, column-major
    return g


LAYOUTS = ("contiguous", "channels_last", "permuted", "sliced", "offset")


def _values(shape, dtype, seed: int, special: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 100, shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen)
    if special and v.numel():
        pick = torch.randint(0, 5, shape, generator=gen)
        v = torch.where(pick == 0, torch.tensor(math.nan), v)
        v = torch.where(pick == 1, torch.tensor(-math.inf), v)
        v = torch.where(pick == 2, torch.tensor(-0.0), v)
    return v.to(dtype)


def laid_out(v: torch.Tensor, layout: str) -> torch.Tensor:
    """v's values in another memory layout (the same values whatever the layout)."""
    if layout == "channels_last" and v.dim() == 4:
        return v.contiguous(memory_format=torch.channels_last)
    if layout == "permuted" and v.dim() >= 2:
        dims = tuple(reversed(range(v.dim())))
        return v.permute(dims).contiguous().permute(dims)
    if layout == "sliced":
        big = torch.zeros((2 * v.shape[0],) + tuple(v.shape[1:]), dtype=v.dtype)
        big[::2] = v
        return big[::2]
    if layout == "offset":
        flat = torch.zeros(v.numel() + 1, dtype=v.dtype)
        flat[1:] = v.reshape(-1)
        return flat[1:].view(v.shape)
    return v


ROW_SHAPES = ((), (1,), (3,), (2, 3), (3, 2, 5), (1, 1, 1))


@st.composite
def rows(draw, n: int, dtypes, row_shape=None, layouts=LAYOUTS):
    """A tensor of n rows (1-D to 4-D), its dtype from dtypes, in one of `layouts`; floating
    ones sometimes with NaN, -inf and -0.0 entries."""
    dtype = draw(st.sampled_from(tuple(dtypes)))
    if row_shape is None:
        row_shape = draw(st.sampled_from(ROW_SHAPES))
    special = draw(st.booleans())
    v = _values((n,) + tuple(row_shape), dtype, draw(st.integers(0, 2**16)), special)
    return laid_out(v, draw(st.sampled_from(layouts)))


def _count_tensor(draw, c: int) -> torch.Tensor:
    """count as [1], as a 0-d tensor, or as a view into a longer tensor (storage offset)."""
    form = draw(st.sampled_from(("1", "0d", "view")))
    if form == "0d":
        return torch.tensor(c, dtype=torch.int32)
    if form == "view":
        return torch.tensor([7, c, 9], dtype=torch.int32)[1:2]
    return torch.tensor([c], dtype=torch.int32)


@st.composite
def plans(draw, n: int, kind: str):
    """(idx int32 [M], count) indexing n rows.

    kind "any": idx[:count] any rows (repeats allowed, gather_rows); "distinct": idx[:count]
    distinct rows (scatter_add_rows, scatter_rows_); "permutation": idx a permutation of the n
    rows (scatter_rows). count is drawn in [-1, M + 2] (the ops clamp it); for "any" and
    "distinct" the entries past count are sometimes garbage (out of range, repeated), which
    the ops must not read. Sometimes compact's own result for a drawn gate.
    """
    if draw(st.booleans()):
        idx, c = reference.compact(draw(gates((n,), (torch.float32,))))
        c = int(c)
    else:
        perm = draw(st.permutations(list(range(n))))
        if kind == "any" and n:
            m = draw(st.integers(0, n + 3))
            vals = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))
        elif kind == "distinct":
            vals = perm[: draw(st.integers(0, n))]
        else:
            vals = perm
        idx = torch.tensor(vals, dtype=torch.int32)
        c = draw(st.integers(-1, idx.shape[0] + 2))
    idx = idx.to(torch.int32)
    if kind != "permutation" and draw(st.booleans()):
        head = max(0, min(c, idx.shape[0]))
        tail = draw(st.lists(st.integers(-3, n + 3), min_size=idx.shape[0] - head, max_size=idx.shape[0] - head))
        idx = torch.cat([idx[:head], torch.tensor(tail, dtype=torch.int32)])
    if draw(st.booleans()):  # a view with a storage offset, like a row of a [B, N] plan
        idx = torch.cat([torch.tensor([5, 5], dtype=torch.int32), idx])[2:]
    return idx, _count_tensor(draw, c)


def on(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)


# ----------------------------------------------------------------------------- compact
THRESHOLDS = (0.0, 0.0, 0.5, -1.0, 1.0, 1e-3, math.inf, -math.inf, math.nan)


@st.composite
def compact_cases(draw, dtypes):
    shape = draw(st.sampled_from(("1d", "2d")))
    n = draw(st.integers(0, 40))
    size = (n,) if shape == "1d" else (draw(st.integers(1, 5)), n)
    return draw(gates(size, dtypes)), draw(st.sampled_from(THRESHOLDS))


def check_compact(device, backend, case):
    gate, threshold = case
    count("compact")
    (g,) = on(device, gate)
    idx, cnt = dynkernels.compact(g, threshold, backend=backend)
    ref_idx, ref_cnt = reference.compact(gate, threshold)
    where = f"compact {tuple(gate.shape)} {gate.dtype} threshold {threshold}"
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32, where
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(cnt.cpu(), ref_cnt), where


@pytest.mark.parametrize("device,backend,n", BACKENDS)
def test_compact(device, backend, n):
    run_examples(device, backend, n, check_compact, compact_cases(float_dtypes(device, backend)))


# ----------------------------------------------------------------------------- route
@st.composite
def route_cases(draw):
    branches = draw(st.sampled_from((1, 2, 3, 5, 8, 300)))
    n = draw(st.integers(0, 40))
    two_d = draw(st.booleans())
    shape = (draw(st.integers(1, 4)), n) if two_d else (n,)
    dtype = draw(st.sampled_from((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)))
    hi = min(branches, 100) if dtype in (torch.int8, torch.uint8) else branches
    values = draw(st.lists(st.integers(0, hi - 1), min_size=math.prod(shape), max_size=math.prod(shape)))
    choice = torch.tensor(values, dtype=torch.int64).reshape(shape).to(dtype)
    if two_d and draw(st.booleans()):
        choice = choice.t().contiguous().t()
    return choice, branches


def check_route(device, backend, case):
    choice, branches = case
    count("route")
    (c,) = on(device, choice)
    idx, offsets = dynkernels.route(c, branches, backend=backend)
    ref_idx, ref_offsets = reference.route(choice, branches)
    where = f"route {tuple(choice.shape)} {choice.dtype} over {branches} branches"
    assert idx.dtype == torch.int32 and offsets.dtype == torch.int32, where
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(offsets.cpu(), ref_offsets), where


@pytest.mark.parametrize("device,backend,n", BACKENDS)
def test_route(device, backend, n):
    run_examples(device, backend, n, check_route, route_cases())


# ----------------------------------------------------------------------------- gather_rows
@st.composite
def gather_cases(draw, dtypes):
    n = draw(st.integers(0, 9))
    x = draw(rows(n, dtypes))
    idx, cnt = draw(plans(n, "any"))
    capacity = draw(st.one_of(st.none(), st.integers(0, n + 3)))
    return x, idx, cnt, capacity


def check_gather(device, backend, case):
    x, idx, cnt, capacity = case
    count("gather_rows")
    xd, idxd, cntd = on(device, x, idx, cnt)
    y = dynkernels.gather_rows(xd, idxd, cntd, capacity, backend=backend)
    where = f"gather_rows x {tuple(x.shape)} {x.dtype} strides {x.stride()}, idx {idx.tolist()}, count {int(cnt)}, capacity {capacity}"
    assert_bitwise(y, reference.gather_rows(x, idx, cnt, capacity), where)


@pytest.mark.parametrize("device,backend,n", BACKENDS)
def test_gather_rows(device, backend, n):
    run_examples(device, backend, n, check_gather, gather_cases(float_dtypes(device, backend) + INTS))


# ----------------------------------------------------------------------------- merges
@st.composite
def merge_cases(draw, dtypes, kind, base_layouts=LAYOUTS):
    """(base, y, idx, count): base [n, ...], y [r, ...] of base's row shape and dtype."""
    n = draw(st.integers(0, 9))
    row_shape = draw(st.sampled_from(ROW_SHAPES))
    base = draw(rows(n, dtypes, row_shape, base_layouts))
    y = draw(rows(draw(st.integers(0, n + 2)), (base.dtype,), row_shape))
    idx, cnt = draw(plans(n, kind))
    return base, y, idx, cnt


@st.composite
def scatter_add_cases(draw, dtypes):
    base, y, idx, cnt = draw(merge_cases(dtypes, "distinct"))
    scale = None
    if draw(st.booleans()):
        scale = draw(gates((base.shape[0],), (torch.float32, torch.float64, base.dtype), transposed_ok=False))
        if scale.dtype == torch.bool:
            scale = scale.to(base.dtype)
    return base, y, idx, cnt, scale


def check_scatter_add(device, backend, case):
    base, y, idx, cnt, scale = case
    count("scatter_add_rows")
    args = on(device, base, y, idx, cnt, scale)
    out = dynkernels.scatter_add_rows(*args, backend=backend)
    expected = reference.scatter_add_rows(base, y, idx, cnt, scale)
    where = (f"scatter_add_rows base {tuple(base.shape)} {base.dtype} strides {base.stride()}, y rows {y.shape[0]}, "
             f"idx {idx.tolist()}, count {int(cnt)}, scale {None if scale is None else scale.tolist()}")
    assert_close_nonfinite(out, expected, base.dtype, where)


@pytest.mark.parametrize("device,backend,n", BACKENDS)
def test_scatter_add_rows(device, backend, n):
    run_examples(device, backend, n, check_scatter_add, scatter_add_cases(float_dtypes(device, backend)))


def check_scatter_rows(device, backend, case):
    base, y, idx, cnt = case
    count("scatter_rows")
    out = dynkernels.scatter_rows(*on(device, base, y, idx, cnt), backend=backend)
    where = f"scatter_rows base {tuple(base.shape)} {base.dtype} strides {base.stride()}, y rows {y.shape[0]}, idx {idx.tolist()}, count {int(cnt)}"
    assert_bitwise(out, reference.scatter_rows(base, y, idx, cnt), where)


@pytest.mark.parametrize("device,backend,n", BACKENDS)
def test_scatter_rows(device, backend, n):
    run_examples(device, backend, n, check_scatter_rows,
                 merge_cases(float_dtypes(device, backend) + INTS, "permutation"))


def check_scatter_rows_inplace(device, backend, case):
    base, y, idx, cnt = case
    count("scatter_rows_")
    out, yd, idxd, cntd = on(device, base.clone(memory_format=torch.preserve_format), y, idx, cnt)
    ptr = out.data_ptr()
    returned = dynkernels.scatter_rows_(out, yd, idxd, cntd, backend=backend)
    where = f"scatter_rows_ base {tuple(base.shape)} {base.dtype} strides {base.stride()}, y rows {y.shape[0]}, idx {idx.tolist()}, count {int(cnt)}"
    assert returned is out and out.data_ptr() == ptr, where
    assert_bitwise(out, reference.scatter_rows_(base.clone(), y, idx, cnt), where)


@pytest.mark.parametrize("device,backend,n", BACKENDS)
def test_scatter_rows_(device, backend, n):
    # base is written in place: contiguous or channels_last (others are a documented error)
    run_examples(device, backend, n, check_scatter_rows_inplace,
                 merge_cases(float_dtypes(device, backend) + INTS, "distinct", ("contiguous", "channels_last", "offset")))


# ----------------------------------------------------------------------------- channel_sparse_conv2d
@st.composite
def conv_cases(draw, dtypes, small: bool):
    """(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift)."""
    pair = lambda lo, hi: st.one_of(st.integers(lo, hi), st.tuples(st.integers(lo, hi), st.integers(lo, hi)))  # noqa: E731
    n = draw(st.integers(1, 2 if small else 3))
    cin, cout = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 6 if small else 8)), draw(st.integers(1, 6 if small else 8))
    kh = draw(st.sampled_from((1, 2, 3, 5)))
    kw = draw(st.sampled_from((kh, 1, 3)))
    stride, padding, dilation = draw(pair(1, 3)), draw(pair(0, 2)), draw(pair(1, 2))
    s2, p2, d2 = (v if isinstance(v, tuple) else (v, v) for v in (stride, padding, dilation))
    assume(h + 2 * p2[0] - d2[0] * (kh - 1) >= 1 and w + 2 * p2[1] - d2[1] * (kw - 1) >= 1)
    dtype = draw(st.sampled_from(tuple(dtypes)))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = laid_out(torch.randn(n, cin, h, w, generator=gen).to(dtype), draw(st.sampled_from(("contiguous", "channels_last", "sliced", "permuted"))))
    weight = (torch.randn(cout, cin, kh, kw, generator=gen) / math.sqrt(cin * kh * kw)).to(dtype)
    if draw(st.booleans()):
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout, generator=gen).to(dtype) if draw(st.booleans()) else None
    shift = torch.randn(cout, generator=gen).to(dtype) if draw(st.booleans()) else None
    gate_dtypes = (torch.float32, torch.float64, dtype)
    out_gate = draw(gates((n, cout), gate_dtypes))
    in_gate = draw(gates((n, cin), gate_dtypes)) if draw(st.booleans()) else None
    if in_gate is None and draw(st.booleans()):  # inf and NaN inputs (see the module docstring)
        pick = torch.randint(0, 12, x.shape, generator=gen)
        x = x.clone(memory_format=torch.preserve_format)
        x[pick == 0] = math.inf
        x[pick == 1] = math.nan
    return x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift


def check_conv(device, backend, case):
    x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift = case
    count("channel_sparse_conv2d")
    args = on(device, x, weight, bias, out_gate, in_gate)
    y = dynkernels.channel_sparse_conv2d(*args, stride, padding, dilation, shift=None if shift is None else shift.to(device),
                                         backend=backend)
    d = torch.float64
    as64 = lambda t: None if t is None else t.to(d)  # noqa: E731
    expected = reference.channel_sparse_conv2d(as64(x), as64(weight), as64(bias), out_gate, in_gate, stride, padding,
                                               dilation, as64(shift))
    # the convolution itself (gate 1 on the active channels): where an infinite gate meets a
    # convolution within rounding of 0, the sign of the result is the summation order's
    z = reference.channel_sparse_conv2d(as64(x), as64(weight), as64(bias), torch.ones(out_gate.shape, dtype=d), in_gate,
                                        stride, padding, dilation)
    near_zero = z.abs() <= 4 * RTOL[x.dtype] * max(z.abs().max().item(), 1e-6)
    ambiguous = torch.isinf(out_gate.to(d))[:, :, None, None] & near_zero & (z != 0)
    where = (f"channel_sparse_conv2d x {tuple(x.shape)} {x.dtype} strides {x.stride()}, weight {tuple(weight.shape)}, "
             f"bias {bias is not None}, shift {shift is not None}, stride {stride}, padding {padding}, dilation {dilation}, "
             f"out_gate {out_gate.tolist()}, in_gate {None if in_gate is None else in_gate.tolist()}")
    assert_close_nonfinite(y, expected.to(x.dtype), x.dtype, where, ignore=ambiguous)
    inactive = ~(out_gate.to(d) > 0)[:, :, None, None].expand_as(y)
    assert (y.cpu()[inactive] == 0).all(), f"{where}: inactive channels must be exactly 0"


def conv_dtypes(device: str, backend: str):
    if backend == "cuda":  # the CUDA kernel has no float64 path (a clear error: test_bad_input)
        return (torch.float32, torch.float16, torch.bfloat16)
    return float_dtypes(device, backend)


@pytest.mark.parametrize("device,backend,n", BACKENDS)
def test_channel_sparse_conv2d(device, backend, n):
    small = backend == "triton" and device == "cpu"
    run_examples(device, backend, n, check_conv, conv_cases(conv_dtypes(device, backend), small))


@pytest.mark.parametrize("grad", [False, True])
def test_nan_out_gate_on_the_dense_cpu_path(grad):
    """A case the deep profile found: "auto" on CPU tensors runs dense execution for dense
    gates, which multiplied a NaN gate into its channel (NaN) instead of leaving it exactly 0
    like every kernel and the reference (NaN > 0 is false: inactive)."""
    x = torch.ones(2, 1, 1, 1, requires_grad=grad)
    weight = torch.ones(2, 1, 1, 1)
    out_gate = torch.tensor([[0.0, 0.0], [1.0, math.nan]]) if not grad else torch.tensor([[1.0, 2.0], [1.0, math.nan]])
    with torch.set_grad_enabled(grad):
        y = dynkernels.channel_sparse_conv2d(x, weight, None, out_gate, backend="auto", density=1.0)
    assert torch.equal(y.detach(), reference.channel_sparse_conv2d(x.detach(), weight, None, out_gate))
