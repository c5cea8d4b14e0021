"""compact, gather_rows, scatter_add_rows, scatter_rows and scatter_rows_ on every backend, against dynkernels.reference.

Backends come from _utils.device_backends(): the reference and the C++ kernels on the CPU,
the Triton kernels on CPU tensors under TRITON_INTERPRET=1, and the CUDA / Triton kernels on
a GPU (marked `cuda`, skipped without one). Interpreter cases are kept small.
"""
import os
import subprocess
import sys

import pytest
import torch

import dynkernels
from dynkernels import reference
from dynkernels.ops.sample_gating import _triton

from _utils import HAS_TRITON, assert_close, device_backends, dtypes_for, rand_gate, skip_cuda_throws

ALL = device_backends()
KERNELS = device_backends(include_torch=False)
OPS = ("compact", "gather_rows", "scatter_add_rows", "scatter_rows", "scatter_rows_")


def kernel_op(backend: str, name: str):
    """The registered operator behind a backend: torch.ops.dynkernels.<name>, <name>_triton, or
    for an in-place op <name without _>_triton_."""
    if backend == "triton":
        return getattr(_triton(), f"{name[:-1]}_triton_" if name.endswith("_") else f"{name}_triton")
    return getattr(torch.ops.dynkernels, name).default


def row_layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_layout(out: torch.Tensor, like: torch.Tensor, backend: str):
    """Kernel outputs keep channels_last for channels_last-only inputs (the reference makes plain tensors)."""
    if backend != "torch":
        assert out.is_contiguous(memory_format=row_layout(like)), f"layout of output, strides {out.stride()}"


# ----------------------------------------------------------------------------- cases
def gate_cases(device):
    """(name, gate, threshold): N = 1, odd sizes, all-zero / all-one, bool, thresholds, [B, N], several tiles."""
    g = lambda *shape: rand_gate(shape, 0.5, device)  # noqa: E731
    return [
        ("n1-active", torch.ones(1, device=device), 0.0),
        ("n1-inactive", torch.zeros(1, device=device), 0.0),
        ("empty", torch.zeros(0, device=device), 0.0),
        ("odd", g(37), 0.0),
        ("all-zero", torch.zeros(19, device=device), 0.0),
        ("all-one", torch.ones(19, device=device), 0.0),
        ("bool", torch.rand(23, device=device) > 0.5, 0.0),
        ("bool-threshold", torch.rand(9, device=device) > 0.5, 0.5),
        ("threshold", g(41), 0.5),
        ("negative-threshold", g(13), -1.0),  # zeros are active too
        ("2d", g(3, 29), 0.0),
        ("2d-one-column", g(4, 1), 0.0),
        ("2d-bool", torch.rand(4, 7, device=device) > 0.3, 0.0),
        ("2d-transposed", g(11, 3).t(), 0.25),  # non-contiguous gate
        ("several-tiles", g(2, 5000), 0.5),  # > one tile of the CUDA (4096) and Triton (1024) scans
    ]


def row_cases(device, dtype):
    """(name, x): 1-D to 5-D data, odd sizes, N = 1, non-contiguous, channels_last, unaligned rows."""
    r = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    return [
        ("1d", r(9)),
        ("2d-odd", r(7, 3)),
        ("n1", r(1, 5)),
        ("4d", r(6, 3, 5, 4)),
        ("5d", r(5, 2, 3, 2, 3)),
        ("transposed", r(3, 7).t()),
        ("sliced", r(7, 10)[:, ::3]),
        ("channels_last", r(5, 3, 4, 6).contiguous(memory_format=torch.channels_last)),
        ("unaligned", r(7 * 8 + 1)[1:].view(7, 8)),  # storage offset: no 16-byte vectors
    ]


def plans(n, device, permutations_only=False):
    """(name, idx, count) for n rows: random, all-zero and all-one gates, rows of a [B, n] plan,
    and (unless permutations_only) one branch's part of a route, idx[offsets[b]:], shorter than n."""
    out = []
    for name, gate in (("random", rand_gate((n,), 0.5, device)), ("none", torch.zeros(n, device=device)), ("all", torch.ones(n, device=device))):
        idx, count = reference.compact(gate)
        out.append((name, idx, count))
    idx2, count2 = reference.compact(rand_gate((3, n), 0.6, device))
    for b in (0, 2):
        out.append((f"plan-row-{b}", idx2[b], count2[b : b + 1]))  # views with storage offsets
    if not permutations_only:
        idx, offsets = reference.route(torch.randint(0, 3, (n,), device=device), 3)
        counts = offsets[1:] - offsets[:-1]
        for b in (1, 2):
            out.append((f"route-branch-{b}", idx[int(offsets[b]) :], counts[b : b + 1]))
    return out


def capacities(n, active):
    return sorted({n, max(active - 1, 0), active, n + 2})


# ----------------------------------------------------------------------------- compact
@pytest.mark.parametrize("device,backend", ALL)
def test_compact_matches_reference(device, backend):
    for gate_dtype in dtypes_for(device, backend) + [torch.float64]:
        for name, gate, threshold in gate_cases(device):
            if gate.dtype != torch.bool:
                gate = gate.to(gate_dtype)
            idx, count = dynkernels.compact(gate, threshold, backend=backend)
            ref_idx, ref_count = reference.compact(gate, threshold)
            where = f"{name} ({gate.dtype}, threshold {threshold})"
            assert idx.dtype == torch.int32 and count.dtype == torch.int32, where
            assert idx.shape == gate.shape and count.shape == ref_count.shape, where
            assert torch.equal(idx.cpu(), ref_idx.cpu()), where
            assert torch.equal(count.cpu(), ref_count.cpu()), where


@pytest.mark.parametrize("device,backend", KERNELS)
def test_compact_compares_threshold_exactly(device, backend):
    # 0.1 is not a float32: the kernels compare in float64, so float32(0.1) > 0.1 is active.
    gate = torch.tensor([0.1, 0.0, 0.2, 0.1], device=device)
    idx, count = dynkernels.compact(gate, 0.1, backend=backend)
    exact_idx, exact_count = reference.compact(gate.double(), 0.1)
    assert torch.equal(idx.cpu(), exact_idx.cpu()) and torch.equal(count.cpu(), exact_count.cpu())
    assert int(count) == 3


# ----------------------------------------------------------------------------- gather_rows
@pytest.mark.parametrize("device,backend", ALL)
def test_gather_rows_matches_reference(device, backend):
    for dtype in dtypes_for(device, backend):
        for name, x in row_cases(device, dtype):
            n = x.shape[0]
            for plan, idx, count in plans(n, device):
                for cap in capacities(n, int(count)) + [None]:
                    y = dynkernels.gather_rows(x, idx, count, cap, backend=backend)
                    ref = reference.gather_rows(x, idx, count, cap)
                    where = f"{name}, plan {plan}, capacity {cap}, {dtype}"
                    assert y.shape == ref.shape and y.dtype == ref.dtype, where
                    assert torch.equal(y.cpu(), ref.cpu()), where
                    check_layout(y, x, backend)
    # gather is a copy: any dtype works, integers too
    x = torch.arange(21, device=device).view(7, 3)
    idx, count = reference.compact(rand_gate((7,), 0.5, device))
    assert torch.equal(dynkernels.gather_rows(x, idx, count, 5, backend=backend).cpu(), reference.gather_rows(x, idx, count, 5).cpu())


# ----------------------------------------------------------------------------- scatter_add_rows
def merge_rows(base, rows):
    """y for a merge op: `rows` random rows shaped like base's (2-D ones non-contiguous)."""
    y = torch.randn((rows,) + tuple(base.shape[1:]), device=base.device).to(base.dtype)
    if y.dim() == 2 and rows > 1:
        y = y.t().contiguous().t()  # same values, non-contiguous
    return y


@pytest.mark.parametrize("device,backend", ALL)
def test_scatter_add_rows_matches_reference(device, backend):
    for dtype in dtypes_for(device, backend):
        for name, base in row_cases(device, dtype):
            n = base.shape[0]
            for plan, idx, count in plans(n, device):
                active = int(count)
                # y with fewer rows than count, exactly count, N and more; scale none, float32
                # or float64 in turn (every combination would be slow under the interpreter).
                for k, rows in enumerate(sorted({active, max(active - 1, 0), n, n + 1})):
                    y = merge_rows(base, rows)
                    scale = [None, torch.rand(n, device=device), torch.rand(n, device=device, dtype=torch.float64)][(k + len(plan)) % 3]
                    out = dynkernels.scatter_add_rows(base, y, idx, count, scale, backend=backend)
                    ref = reference.scatter_add_rows(base, y, idx, count, scale)
                    where = f"{name}, plan {plan}, y rows {rows}, scale {None if scale is None else scale.dtype}"
                    assert out.shape == ref.shape, where
                    assert_close(out, ref, dtype)
                    check_layout(out, base, backend)
                    assert out.data_ptr() != base.data_ptr(), where


# ----------------------------------------------------------------------------- scatter_rows
@pytest.mark.parametrize("device,backend", ALL)
def test_scatter_rows_matches_reference(device, backend):
    for dtype in dtypes_for(device, backend):
        for name, base in row_cases(device, dtype):
            n = base.shape[0]
            for plan, idx, count in plans(n, device, permutations_only=True):
                active = int(count)
                # y with fewer rows than count (the rest stay base), exactly count, N and more
                for rows in sorted({active, max(active - 1, 0), n, n + 1}):
                    y = merge_rows(base, rows)
                    out = dynkernels.scatter_rows(base, y, idx, count, backend=backend)
                    ref = reference.scatter_rows(base, y, idx, count)
                    where = f"{name}, plan {plan}, y rows {rows}, {dtype}"
                    assert out.shape == ref.shape and out.dtype == ref.dtype, where
                    assert torch.equal(out.cpu(), ref.cpu()), where  # a copy: exact
                    check_layout(out, base, backend)
                    assert out.data_ptr() != base.data_ptr(), where
    # a copy: any dtype works, integers too
    base = torch.arange(21, device=device).view(7, 3)
    idx, count = reference.compact(rand_gate((7,), 0.5, device))
    y = -torch.arange(15, device=device).view(5, 3)
    assert torch.equal(dynkernels.scatter_rows(base, y, idx, count, backend=backend).cpu(), reference.scatter_rows(base, y, idx, count).cpu())


@pytest.mark.parametrize("device,backend", ALL)
def test_scatter_rows_is_the_masked_merge(device, backend):
    """scatter_rows(base, y, compact(g)) = where(g > 0, y at its place, base), and the kept rows of
    base are never read: a NaN or inf there does not reach the output."""
    gate = torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0, 0.0, 0.3], device=device)
    idx, count = dynkernels.compact(gate, backend="torch")
    kept = gate > 0
    full = torch.randn(7, 3, 4, device=device)  # the block's output on every sample
    base = torch.randn(7, 3, 4, device=device)
    base[1], base[4] = float("nan"), float("inf")  # kept rows
    out = dynkernels.scatter_rows(base, full[kept], idx, count, backend=backend)
    assert torch.equal(out, torch.where(kept.view(-1, 1, 1), full, base))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- scatter_rows_
@pytest.mark.parametrize("device,backend", ALL)
def test_scatter_rows_inplace_matches_reference(device, backend):
    for dtype in dtypes_for(device, backend):
        for name, x in row_cases(device, dtype):
            base = x.clone(memory_format=row_layout(x))  # written in place: contiguous or channels_last
            n = base.shape[0]
            for plan, idx, count in plans(n, device):
                active = int(count)
                for rows in sorted({max(active - 1, 0), n + 1}):  # fewer rows than count, more
                    y = merge_rows(base, rows)
                    out = base.clone(memory_format=row_layout(base))
                    ptr = out.data_ptr()
                    returned = dynkernels.scatter_rows_(out, y, idx, count, backend=backend)
                    ref = reference.scatter_rows_(base.clone(), y, idx, count)
                    where = f"{name}, plan {plan}, y rows {rows}, {dtype}"
                    assert returned is out and out.data_ptr() == ptr, where
                    assert torch.equal(out.cpu(), ref.cpu()), where  # a copy: exact
                    assert out.is_contiguous(memory_format=row_layout(base)), where
    # a copy: any dtype works, integers too
    base = torch.arange(21, device=device).view(7, 3)
    idx, offsets = reference.route(torch.tensor([1, 0, 1, 1, 0, 2, 1], device=device), 3)
    y = -torch.arange(12, device=device).view(4, 3)
    out = dynkernels.scatter_rows_(base.clone(), y, idx[int(offsets[1]):], offsets[2:3] - offsets[1:2], backend=backend)
    assert torch.equal(out.cpu(), reference.scatter_rows_(base.clone(), y, idx[int(offsets[1]):], offsets[2:3] - offsets[1:2]).cpu())


@pytest.mark.parametrize("device,backend", ALL)
def test_route_branches_merge_back_in_place(device, backend):
    """Gather each branch of a route, transform it, merge it back with scatter_rows_: every row
    is written once, by its own branch (odd N, an empty branch, a branch with every row)."""
    for choice in (torch.tensor([2, 0, 2, 2, 0, 2, 0], device=device), torch.zeros(5, dtype=torch.int64, device=device)):
        x = torch.randn(choice.shape[0], 2, 3, device=device)
        idx, offsets = dynkernels.route(choice, 3, backend="torch")
        counts = offsets[1:] - offsets[:-1]
        out = torch.full_like(x, float("nan"))
        for b, scale in enumerate((2.0, 3.0, -1.0)):
            start, n = int(offsets[b]), int(counts[b])
            xb = dynkernels.gather_rows(x, idx[start:], counts[b : b + 1], n, backend=backend)
            dynkernels.scatter_rows_(out, scale * xb, idx[start:], counts[b : b + 1], backend=backend)
        expected = x * torch.tensor([2.0, 3.0, -1.0], device=device)[choice].view(-1, 1, 1)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("device,backend", [p for p in KERNELS if p.id != "cpu-cpp"])
def test_out_of_range_entries_are_skipped(device, backend):
    """The kernels never read or write out of bounds: the CUDA and Triton kernels do not check
    idx on the host (on a GPU that would need a sync), so bad entries give zero rows (gather)
    or are ignored (scatter). The C++ CPU kernels reject them (test_cpp_op_errors)."""
    x = torch.randn(5, 3, device=device)
    idx = torch.tensor([4, 5, -1, 0, 1], dtype=torch.int32, device=device)
    count = torch.tensor([4], dtype=torch.int32, device=device)
    y = kernel_op(backend, "gather_rows")(x, idx, count, 5)
    expected = torch.zeros_like(x)
    expected[0], expected[3] = x[4], x[0]
    assert torch.equal(y, expected)
    out = kernel_op(backend, "scatter_add_rows")(x, y, idx, count, None)
    expected = x.clone()
    expected[4] += y[0]
    expected[0] += y[3]
    assert_close(out, expected)
    # scatter_rows: positions 1 (row 5) and 2 (row -1) are skipped, so rows 2 and 3, which no
    # valid entry lists, are left unwritten; the listed rows are right.
    count = torch.tensor([2], dtype=torch.int32, device=device)
    out = kernel_op(backend, "scatter_rows")(x, y, idx, count)
    assert torch.equal(out[4], y[0]) and torch.equal(out[0], x[0]) and torch.equal(out[1], x[1])
    # scatter_rows_: positions 1 (row 5) and 2 (row -1) are skipped, the rest of base is untouched
    out = x.clone()
    kernel_op(backend, "scatter_rows_")(out, y, idx, torch.tensor([5], dtype=torch.int32, device=device))
    expected = x.clone()
    expected[4], expected[0], expected[1] = y[0], y[3], y[4]
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("device,backend", ALL)
def test_gradcheck(device, backend):
    opts = dict(device=device, dtype=torch.float64)
    idx, count = reference.compact(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], device=device))
    x = torch.randn(5, 3, **opts, requires_grad=True)
    for cap in (2, 3, 4):
        assert torch.autograd.gradcheck(lambda x: dynkernels.gather_rows(x, idx, count, cap, backend=backend), (x,))
    base = torch.randn(5, 3, **opts, requires_grad=True)
    y = torch.randn(4, 3, **opts, requires_grad=True)
    scale = torch.rand(5, **opts, requires_grad=True)
    fn = lambda b, y, s: dynkernels.scatter_add_rows(b, y, idx, count, s, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (base, y, scale))
    assert torch.autograd.gradcheck(lambda b, y: fn(b, y, None), (base, y))
    for rows in (2, 3, 4):  # y with fewer rows than count, exactly count, more
        y = torch.randn(rows, 3, **opts, requires_grad=True)
        assert torch.autograd.gradcheck(lambda b, y: dynkernels.scatter_rows(b, y, idx, count, backend=backend), (base, y))
    # one branch of a route: idx shorter than the rows
    ridx, offsets = reference.route(torch.tensor([1, 0, 1, 1, 0], device=device), 2)
    tail, n1 = ridx[int(offsets[1]) :], offsets[2:3] - offsets[1:2]
    assert torch.autograd.gradcheck(lambda x: dynkernels.gather_rows(x, tail, n1, 3, backend=backend), (x,))
    y = torch.randn(3, 3, **opts, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, y: dynkernels.scatter_rows_(b * 1, y, tail, n1, backend=backend), (base, y))
    y = torch.randn(2, 3, **opts, requires_grad=True)  # fewer rows than count
    assert torch.autograd.gradcheck(lambda b, y: dynkernels.scatter_rows_(b * 1, y, idx, count, backend=backend), (base, y))
    assert torch.autograd.gradcheck(lambda b, y: dynkernels.scatter_add_rows(b, y, tail, n1, backend=backend), (base, y))


@pytest.mark.parametrize("device,backend", ALL)
def test_scatter_rows_gradients(device, backend):
    """grad_base = grad_out with the kept rows zeroed; grad_y = grad_out's kept rows, zero past count."""
    gate = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], device=device)
    idx, count = dynkernels.compact(gate, backend="torch")
    base = torch.randn(5, 2, 3, device=device, requires_grad=True)
    y = torch.randn(4, 2, 3, device=device, requires_grad=True)  # capacity 4 > count 3
    grad_out = torch.randn(5, 2, 3, device=device)
    dynkernels.scatter_rows(base, y, idx, count, backend=backend).backward(grad_out)
    kept = (gate > 0).view(-1, 1, 1)
    assert torch.equal(base.grad, torch.where(kept, torch.zeros_like(grad_out), grad_out))
    assert torch.equal(y.grad[:3], grad_out[[0, 2, 4]]) and torch.equal(y.grad[3], torch.zeros_like(y.grad[3]))


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("device,backend", KERNELS)
def test_opcheck(device, backend):
    def t(*shape, grad=False):
        return torch.randn(*shape, device=device, requires_grad=grad)

    idx, count = reference.compact(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], device=device))
    samples = {
        "compact": [(rand_gate((7,), 0.5, device), 0.0), (torch.rand(2, 5, device=device) > 0.5, 0.5)],
        "gather_rows": [(t(5, 3, grad=True), idx, count, 4), (t(5, 2, 3, 4).contiguous(memory_format=torch.channels_last), idx, count, 2)],
        "scatter_add_rows": [
            (t(5, 3, grad=True), t(3, 3, grad=True), idx, count, torch.rand(5, device=device, requires_grad=True)),
            (t(5, 3, grad=True), t(2, 3, grad=True), idx, count, None),
        ],
        "scatter_rows": [
            (t(5, 3, grad=True), t(3, 3, grad=True), idx, count),
            (t(5, 2, 3, 4, grad=True), t(4, 2, 3, 4, grad=True), idx, count),
            (t(5, 2, 3, 4).contiguous(memory_format=torch.channels_last), t(3, 2, 3, 4), idx, count),
        ],
        "scatter_rows_": [
            (t(5, 3), t(3, 3), idx, count),
            (t(5, 2, 3, 4).contiguous(memory_format=torch.channels_last), t(4, 2, 3, 4), idx[2:], count),
        ],
    }
    # Under TRITON_INTERPRET=1, wrap_triton hands back the interpreted kernel itself, which
    # cannot run on the fake tensors of the fake-tensor and AOT tests: those two run on a GPU.
    interpreted = device == "cpu" and backend == "triton"
    only = {"test_utils": ("test_schema", "test_autograd_registration")} if interpreted else {}
    for name in OPS:
        for args in samples[name]:
            torch.library.opcheck(kernel_op(backend, name), args, **only)


# ----------------------------------------------------------------------------- bad input
def _cpu_args():
    x = torch.randn(5, 3)
    idx, count = reference.compact(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]))
    return x, idx, count


def _bad_inputs():
    """(id, call, exception, match): every check of the public functions."""
    x, idx, count = _cpu_args()
    dk = dynkernels
    i64 = idx.long()
    out_of_range = torch.tensor([0, 5, 1, 2, 3], dtype=torch.int32)
    negative = torch.tensor([0, -1, 1, 2, 3], dtype=torch.int32)
    repeated = torch.tensor([1, 1, 0, 2, 3], dtype=torch.int32)
    return [
        ("compact-rank", lambda: dk.compact(torch.zeros(2, 2, 2)), ValueError, r"compact: gate must be \[N\] or \[B, N\]"),
        ("compact-int-gate", lambda: dk.compact(torch.zeros(3, dtype=torch.int32)), TypeError, r"compact: gate must be a floating or bool tensor"),
        ("gather-0d-x", lambda: dk.gather_rows(torch.tensor(1.0), idx, count), ValueError, r"gather_rows: x must have at least one dimension"),
        ("gather-idx-rank", lambda: dk.gather_rows(x, idx.view(1, 5), count), ValueError, r"gather_rows: idx must be a 1-D tensor"),
        ("gather-idx-int64", lambda: dk.gather_rows(x, i64, count), TypeError, r"gather_rows: idx must be int32"),
        ("gather-count-float", lambda: dk.gather_rows(x, idx, count.float()), TypeError, r"gather_rows: count must be an int32 tensor with one element"),
        ("gather-count-numel", lambda: dk.gather_rows(x, idx, torch.tensor([1, 2], dtype=torch.int32)), TypeError, r"count must be an int32 tensor with one element"),
        ("gather-idx-past-x", lambda: dk.gather_rows(x[:3], idx, count), IndexError, r"gather_rows: idx\[2\] = 3 is out of range for x with 3 rows"),
        ("gather-idx-out-of-range", lambda: dk.gather_rows(x, out_of_range, count), IndexError, r"gather_rows: idx\[1\] = 5 is out of range for x with 5 rows"),
        ("gather-idx-negative", lambda: dk.gather_rows(x, negative, count), IndexError, r"gather_rows: idx\[1\] = -1 is out of range"),
        ("gather-capacity-negative", lambda: dk.gather_rows(x, idx, count, -1), ValueError, r"gather_rows: capacity must be a non-negative int, got -1"),
        ("gather-capacity-float", lambda: dk.gather_rows(x, idx, count, 2.5), ValueError, r"capacity must be a non-negative int, got 2.5"),
        ("gather-capacity-bool", lambda: dk.gather_rows(x, idx, count, True), ValueError, r"capacity must be a non-negative int, got True"),
        ("gather-wrong-device", lambda: dk.gather_rows(torch.empty(5, 3, device="meta"), idx, count), ValueError, r"gather_rows: idx is on cpu but x is on meta"),
        ("bad-backend", lambda: dk.gather_rows(x, idx, count, backend="cudnn"), ValueError, r"gather_rows: backend must be one of .* got 'cudnn'"),
        ("cuda-backend-on-cpu", lambda: dk.compact(torch.ones(3), backend="cuda"), ValueError, r"compact: backend='cuda' needs CUDA tensors"),
        ("scatter-y-rows", lambda: dk.scatter_add_rows(x, torch.randn(3, 4), idx, count), ValueError, r"scatter_add_rows: y must be \[capacity, 3\] like base's rows"),
        ("scatter-y-rank", lambda: dk.scatter_add_rows(x, torch.randn(3), idx, count), ValueError, r"scatter_add_rows: y must be \[capacity, 3\]"),
        ("scatter-y-dtype", lambda: dk.scatter_add_rows(x, torch.randn(3, 3).double(), idx, count), TypeError, r"scatter_add_rows: y must have base's dtype torch.float32"),
        ("scatter-base-int", lambda: dk.scatter_add_rows(x.int(), x.int(), idx, count), TypeError, r"scatter_add_rows: base must be a floating tensor"),
        ("scatter-idx-past-base", lambda: dk.scatter_add_rows(x[:3], x, idx, count), IndexError, r"scatter_add_rows: idx\[2\] = 3 is out of range for base with 3 rows"),
        ("scatter-idx-out-of-range", lambda: dk.scatter_add_rows(x, x, out_of_range, count), IndexError, r"scatter_add_rows: idx\[1\] = 5 is out of range"),
        ("scatter-scale-length", lambda: dk.scatter_add_rows(x, x, idx, count, torch.rand(4)), ValueError, r"scatter_add_rows: scale has 4 entries but base has 5 rows"),
        ("scatter-scale-rank", lambda: dk.scatter_add_rows(x, x, idx, count, torch.rand(5, 1)), ValueError, r"scatter_add_rows: scale must be a 1-D tensor"),
        ("scatter-scale-int", lambda: dk.scatter_add_rows(x, x, idx, count, torch.ones(5, dtype=torch.int32)), TypeError, r"scatter_add_rows: scale must be a floating tensor"),
        ("scatter-repeated-rows-cpu", lambda: dk.scatter_add_rows(x, x, repeated, count, backend="cpu"), RuntimeError, r"scatter_add_rows: idx repeats row 1 among its first count entries"),
        ("scatter-rows-0d-base", lambda: dk.scatter_rows(torch.tensor(1.0), x, idx, count), ValueError, r"scatter_rows: base must have at least one dimension"),
        ("scatter-rows-y-type", lambda: dk.scatter_rows(x, x.tolist(), idx, count), TypeError, r"scatter_rows: y must be a torch.Tensor"),
        ("scatter-rows-y-shape", lambda: dk.scatter_rows(x, torch.randn(3, 4), idx, count), ValueError, r"scatter_rows: y must be \[capacity, 3\] like base's rows"),
        ("scatter-rows-y-dtype", lambda: dk.scatter_rows(x, x.double(), idx, count), TypeError, r"scatter_rows: y must have base's dtype torch.float32"),
        ("scatter-rows-y-device", lambda: dk.scatter_rows(x, torch.empty(3, 3, device="meta"), idx, count), ValueError, r"scatter_rows: y is on meta but base is on cpu"),
        ("scatter-rows-mismatched-n", lambda: dk.scatter_rows(torch.randn(4, 3), x, idx, count), ValueError, r"scatter_rows: idx has 5 entries but base has 4 rows"),
        ("scatter-rows-idx-int64", lambda: dk.scatter_rows(x, x, i64, count), TypeError, r"scatter_rows: idx must be int32"),
        ("scatter-rows-count-float", lambda: dk.scatter_rows(x, x, idx, count.float()), TypeError, r"scatter_rows: count must be an int32 tensor"),
        ("scatter-rows-idx-out-of-range", lambda: dk.scatter_rows(x, x, out_of_range, count), IndexError, r"scatter_rows: idx\[1\] = 5 is out of range for base with 5 rows"),
        # past count too: every entry of idx is checked, not only the first count
        ("scatter-rows-tail-out-of-range", lambda: dk.scatter_rows(x, x, torch.tensor([0, 1, 2, 3, 7], dtype=torch.int32), count), IndexError, r"scatter_rows: idx\[4\] = 7 is out of range"),
        ("scatter-rows-repeated", lambda: dk.scatter_rows(x, x, repeated, count), ValueError, r"scatter_rows: idx lists row 1 more than once; idx must be a permutation of base's 5 rows"),
        ("scatter-rows-tail-repeated", lambda: dk.scatter_rows(x, x, torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32), count), ValueError, r"scatter_rows: idx lists row 3 more than once"),
        ("scatter-rows-backend", lambda: dk.scatter_rows(x, x, idx, count, backend="cudnn"), ValueError, r"scatter_rows: backend must be one of"),
        ("scatter-rows_-y-shape", lambda: dk.scatter_rows_(x.clone(), torch.randn(3, 4), idx, count), ValueError, r"scatter_rows_: y must be \[capacity, 3\] like base's rows"),
        ("scatter-rows_-y-dtype", lambda: dk.scatter_rows_(x.clone(), x.double(), idx, count), TypeError, r"scatter_rows_: y must have base's dtype torch.float32"),
        ("scatter-rows_-idx-int64", lambda: dk.scatter_rows_(x.clone(), x, i64, count), TypeError, r"scatter_rows_: idx must be int32"),
        ("scatter-rows_-not-contiguous", lambda: dk.scatter_rows_(x.t().contiguous().t(), x, idx, count), ValueError, r"scatter_rows_: base is written in place, so it must be contiguous \(or channels_last\)"),
        ("scatter-rows_-out-of-range", lambda: dk.scatter_rows_(x[:3].clone(), x, idx, count), IndexError, r"scatter_rows_: idx\[2\] = 3 is out of range for base with 3 rows"),
        ("scatter-rows_-repeated", lambda: dk.scatter_rows_(x.clone(), x, repeated, count), ValueError, r"scatter_rows_: the first count entries of idx list row 1 more than once"),
        ("scatter-rows_-backend", lambda: dk.scatter_rows_(x.clone(), x, idx, count, backend="cudnn"), ValueError, r"scatter_rows_: backend must be one of"),
    ]


@pytest.mark.parametrize("call,exc,match", [pytest.param(c, e, m, id=i) for i, c, e, m in _bad_inputs()])
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _cpp_bad_inputs(device):
    """(id, call, match): the C++ / CUDA kernels' own checks (csrc/sample_gating_common.h)."""
    ops = torch.ops.dynkernels
    x = torch.randn(5, 3, device=device)
    idx = torch.arange(5, dtype=torch.int32, device=device)
    count = torch.tensor([3], dtype=torch.int32, device=device)
    cases = [
        ("compact-rank", lambda: ops.compact(torch.zeros(2, 2, 2, device=device), 0.0), r"compact: gate must be \[N\] or \[B, N\]"),
        ("gather-idx-int64", lambda: ops.gather_rows(x, idx.long(), count, 5), r"gather_rows: idx must be a 1-D int32 tensor, got Long"),
        ("gather-count-float", lambda: ops.gather_rows(x, idx, count.float(), 5), r"gather_rows: count must be an int32 tensor with one element"),
        ("gather-capacity", lambda: ops.gather_rows(x, idx, count, -2), r"gather_rows: capacity must be >= 0, got -2"),
        ("scatter-y-shape", lambda: ops.scatter_add_rows(x, x[:, :2], idx, count, None), r"scatter_add_rows: y must be \[capacity, \[3\]\] like base's rows"),
        ("scatter-y-dtype", lambda: ops.scatter_add_rows(x, x.double(), idx, count, None), r"scatter_add_rows: y must have base's dtype Float"),
        ("scatter-base-int", lambda: ops.scatter_add_rows(x.int(), x.int(), idx, count, None), r"scatter_add_rows: base must be a floating tensor"),
        ("scatter-scale", lambda: ops.scatter_add_rows(x, x, idx, count, torch.ones(4, device=device)), r"scatter_add_rows: scale must be a 1-D floating tensor with 5 entries"),
        ("scatter-rows-y-shape", lambda: ops.scatter_rows(x, x[:, :2], idx, count), r"scatter_rows: y must be \[capacity, \[3\]\] like base's rows"),
        ("scatter-rows-y-dtype", lambda: ops.scatter_rows(x, x.double(), idx, count), r"scatter_rows: y must have base's dtype Float"),
        ("scatter-rows-0d", lambda: ops.scatter_rows(x[0, 0], x, idx, count), r"scatter_rows: base must have at least one dimension"),
        ("scatter-rows-mismatched-n", lambda: ops.scatter_rows(x[:4], x, idx, count), r"scatter_rows: idx has 5 entries but base has 4 rows"),
        ("scatter-rows_-y-shape", lambda: ops.scatter_rows_(x.clone(), x[:, :2], idx, count), r"scatter_rows_: y must be \[capacity, \[3\]\] like base's rows"),
        ("scatter-rows_-not-contiguous", lambda: ops.scatter_rows_(x.t().contiguous().t(), x, idx, count), r"scatter_rows_: base is written in place, so it must be contiguous"),
        ("scatter-rows_-idx-rank", lambda: ops.scatter_rows_(x.clone(), x, idx.view(1, 5), count), r"scatter_rows_: idx must be a 1-D int32 tensor"),
    ]
    # (a device mismatch is tested in test_wrong_device_errors_on_gpu: with one CPU and one meta
    # tensor the dispatcher picks the meta kernel, which does not check devices)
    cases = [(name, call, RuntimeError, match) for name, call, match in cases]
    if device == "cpu":  # index values are checked on the CPU only (on a GPU it would cost a host sync)
        # with the errors of the Python functions, which leave these checks to the CPU kernels
        bad = torch.tensor([0, 7, 1, 2, 3], dtype=torch.int32)
        rep = torch.tensor([2, 2, 1, 0, 3], dtype=torch.int32)
        cases += [
            ("gather-idx-out-of-range", lambda: ops.gather_rows(x, bad, count, 5), IndexError, r"gather_rows: idx\[1\] = 7 is out of range for x with 5 rows"),
            # past capacity too, as the Python check does: the first count entries are checked
            ("gather-idx-past-capacity", lambda: ops.gather_rows(x, bad, count, 1), IndexError, r"gather_rows: idx\[1\] = 7 is out of range"),
            ("scatter-idx-out-of-range", lambda: ops.scatter_add_rows(x, x, bad, count, None), IndexError, r"scatter_add_rows: idx\[1\] = 7 is out of range for base with 5 rows"),
            ("scatter-repeated-rows", lambda: ops.scatter_add_rows(x, x, rep, count, None), RuntimeError, r"scatter_add_rows: idx repeats row 2"),
            ("scatter-rows-not-a-permutation", lambda: ops.scatter_rows(x, x, torch.tensor([0, 4, 2, 4, 2], dtype=torch.int32), count), ValueError, r"scatter_rows: idx lists row 2 more than once; idx must be a permutation of base's 5 rows"),
            ("scatter-rows-out-of-range", lambda: ops.scatter_rows(x, x, torch.tensor([0, 1, 1, 3, -1], dtype=torch.int32), count), IndexError, r"scatter_rows: idx\[4\] = -1 is out of range for base with 5 rows"),
            ("gather-idx-past-x", lambda: ops.gather_rows(x[:2], idx, count, 5), IndexError, r"gather_rows: idx\[2\] = 2 is out of range for x with 2 rows"),
            ("scatter-rows_-repeated", lambda: ops.scatter_rows_(x.clone(), x, rep, count), ValueError, r"scatter_rows_: the first count entries of idx list row 2 more than once"),
            ("scatter-rows_-out-of-range", lambda: ops.scatter_rows_(x.clone(), x, bad, count), IndexError, r"scatter_rows_: idx\[1\] = 7 is out of range for base with 5 rows"),
        ]
    return cases


def test_no_grad_kernels_exclude_autograd_only_for_their_call():
    """The Kernels for grad mode off go below autograd by a thread-local flag: set for the call
    only (also when the kernel raises), so gradients flow as before afterwards."""
    from dynkernels.ops import sample_gating as sg

    excluded = lambda: torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradCPU)  # noqa: E731
    x = torch.randn(5, 3, requires_grad=True)
    idx, count = dynkernels.compact(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))
    k = sg.kernels("cpu", "no_grad")
    with torch.no_grad():
        y = k.gather_rows(x, idx, count, 3)
        assert torch.equal(y, x[[0, 2, 3]]) and not excluded()
        assert torch.equal(k.scatter_rows(x, y * 2, idx, count)[[0, 2, 3]], 2 * x[[0, 2, 3]])
        with pytest.raises(IndexError, match="out of range"):
            k.gather_rows(x, torch.tensor([0, 9, 1, 2, 3], dtype=torch.int32), count, 3)
        assert not excluded()
    dynkernels.gather_rows(x, idx, count).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])[:, None].expand(5, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        sg.kernels("cpu", "fast")


@pytest.mark.skipif(dynkernels._extension._C is None, reason="kernels loaded as a library, without dynkernels._C")
def test_direct_calls_below_autograd():
    """dynkernels._C.below_autograd / cpu_first: the ops' results, through the dispatcher (the
    profiler sees them); cpu_first declines (NotImplemented) what the public ops must send
    elsewhere: a gradient needed, a tensor subclass or a tensor off the CPU, a capacity that
    is not an int. The public ops then still give gradients."""
    C = dynkernels._extension._C
    x, base = torch.randn(5, 3), torch.randn(5, 3)
    gate = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    idx, count = C.below_autograd.compact(gate, 0.0)
    assert torch.equal(idx, reference.compact(gate)[0]) and torch.equal(count, reference.compact(gate)[1])
    for calls in (C.below_autograd, C.cpu_first):
        cap = None if calls is C.cpu_first else 5
        assert torch.equal(calls.gather_rows(x, idx, count, cap), reference.gather_rows(x, idx, count, 5))
        assert torch.equal(calls.scatter_rows(base, x, idx, count), reference.scatter_rows(base, x, idx, count))
        assert_close(calls.scatter_add_rows(base, x, idx, count, gate), reference.scatter_add_rows(base, x, idx, count, gate))
    with torch.profiler.profile() as prof:
        C.below_autograd.gather_rows(x, idx, count, 3)
    assert "dynkernels::gather_rows" in {e.name for e in prof.events()}

    class Sub(torch.Tensor):
        pass

    leaf = x.clone().requires_grad_()
    declined = [(leaf, idx, count, None), (x.as_subclass(Sub), idx, count, None), (x.to("meta"), idx, count, None),
                (x, idx, count, True), (x, idx, count, 2.0)]
    for args in declined:
        assert C.cpu_first.gather_rows(*args) is NotImplemented
    with torch.no_grad():
        assert torch.equal(C.cpu_first.gather_rows(leaf, idx, count, 3), x[[0, 2, 3]])
    with pytest.raises(TypeError, match="not a subclass"):
        C.below_autograd.gather_rows(x.as_subclass(Sub), idx, count, 3)
    with pytest.raises(TypeError, match="takes 4 arguments"):
        C.below_autograd.gather_rows(x, idx, count)
    dynkernels.scatter_add_rows(base, dynkernels.gather_rows(leaf, idx, count, 3), idx, count).sum().backward()
    assert torch.equal(leaf.grad, gate[:, None].expand(5, 3))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, skip_cuda_throws])])
def test_cpp_op_errors(device):
    if device == "cuda" and not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    for name, call, exc, match in _cpp_bad_inputs(device):
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.cuda
def test_wrong_device_errors_on_gpu():
    x = torch.randn(5, 3, device="cuda")
    idx, count = reference.compact(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"gather_rows: idx is on cpu but x is on cuda"):
        dynkernels.gather_rows(x, idx, count)
    with pytest.raises(ValueError, match=r"scatter_add_rows: scale is on cpu but base is on cuda"):
        dynkernels.scatter_add_rows(x, x, idx.cuda(), count.cuda(), torch.ones(5))
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors"):
        dynkernels.compact(x[:, 0], backend="cpu")


@pytest.mark.cuda
@skip_cuda_throws
def test_wrong_device_errors_from_cuda_kernel():
    if not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    x = torch.randn(5, 3, device="cuda")
    idx, count = reference.compact(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(RuntimeError, match=r"gather_rows: idx \(on cpu\) and count \(on cpu\) must be on x's device cuda"):
        torch.ops.dynkernels.gather_rows(x, idx, count, 5)


# ----------------------------------------------------------------------------- GPU properties
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync(backend):
    if backend == "cuda" and not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("Triton is not installed")
    gate = rand_gate((64,), 0.5, "cuda")
    x = torch.randn(64, 8, 7, 7, device="cuda", dtype=torch.bfloat16)

    def run():
        idx, count = dynkernels.compact(gate, backend=backend)
        y = dynkernels.gather_rows(x, idx, count, 48, backend=backend)
        dynkernels.scatter_rows(x, y, idx, count, backend=backend)
        dynkernels.scatter_rows_(x.clone(), y, idx, count, backend=backend)
        return dynkernels.scatter_add_rows(x, y, idx, count, gate, backend=backend)

    run()  # compile / load kernels first
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_scatter_rows_checks_permutation_on_gpu_only_on_request(monkeypatch):
    """On CUDA tensors the permutation check reads idx (a host sync): only with DYNKERNELS_CHECK_INDICES=1."""
    from dynkernels.ops import _checks

    x = torch.randn(5, 3, device="cuda")
    idx = torch.tensor([0, 1, 2, 4, 4], dtype=torch.int32, device="cuda")
    count = torch.tensor([3], dtype=torch.int32, device="cuda")
    monkeypatch.setattr(_checks, "CHECK_INDICES_ON_GPU", True)
    with pytest.raises(ValueError, match=r"scatter_rows: idx lists row 4 more than once"):
        dynkernels.scatter_rows(x, x, idx, count)
    monkeypatch.setattr(_checks, "CHECK_INDICES_ON_GPU", False)
    out = dynkernels.scatter_rows(x, x, idx, count)  # not checked: row 3 is left unwritten
    assert torch.equal(out[:3], x[:3]) and torch.equal(out[4], x[4])


@pytest.mark.cuda
def test_large_rows_on_gpu():
    """Shapes of the bandwidth target (rows of 64x56x56 bf16), smaller N, on every GPU backend."""
    x = torch.randn(12, 64, 56, 56, device="cuda", dtype=torch.bfloat16)
    idx, count = reference.compact(rand_gate((12,), 0.5, "cuda"))
    for backend in ("cuda", "triton"):
        if (backend == "cuda" and not dynkernels.cuda_kernels_compiled()) or (backend == "triton" and not HAS_TRITON):
            continue
        y = dynkernels.gather_rows(x, idx, count, 8, backend=backend)
        assert torch.equal(y, reference.gather_rows(x, idx, count, 8))
        out = dynkernels.scatter_add_rows(x, y, idx, count, backend=backend)
        assert_close(out, reference.scatter_add_rows(x, y, idx, count))
        for base in (x, x.contiguous(memory_format=torch.channels_last)):
            out = dynkernels.scatter_rows(base, y, idx, count, backend=backend)
            assert torch.equal(out, reference.scatter_rows(base, y, idx, count))


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_ops_under_torch_compile():
    """triton_op makes the kernels visible to torch.compile: one graph, same results as eager."""
    sg = _triton()
    gate = rand_gate((33,), 0.5, "cuda")
    x = torch.randn(33, 4, 5, device="cuda", dtype=torch.float16)

    def step(gate, x):
        idx, count = sg.compact_triton(gate, 0.0)
        y = sg.gather_rows_triton(x, idx, count, 20)
        return sg.scatter_rows_triton(sg.scatter_add_rows_triton(x, y * 2, idx, count, gate), y, idx, count)

    compiled = torch.compile(step, fullgraph=True)
    assert_close(compiled(gate, x), step(gate, x))


def test_cuda_kernels_registered_when_built():
    """setup.py records whether it compiled the CUDA kernels; then all of them must be registered."""
    has_cuda = dynkernels.cuda_kernels_compiled()
    config = dynkernels._extension._config
    if config is not None:  # absent for a CMake-built library
        assert config.WITH_CUDA == has_cuda, f"setup.py built CUDA={config.WITH_CUDA} ({config.CUDA_REASON}) but the extension says {has_cuda}"
    for name in OPS:
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"dynkernels::{name}", "CUDA")
        assert registered == has_cuda, f"dynkernels::{name}: CUDA kernel registered {registered}, build says {has_cuda}"


# ----------------------------------------------------------------------------- Triton for the GPU
@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernels_compile_for_hopper(tmp_path):
    """Compile the Triton kernels for sm_90 ahead of time, with the dtypes the interpreter cannot
    run (bf16): a machine without a GPU still catches what would fail to compile on one.

    In a subprocess without TRITON_INTERPRET (under the interpreter even triton.language's own
    helpers, e.g. tl.sum's combine function, are interpreted and cannot be compiled) and with
    an empty Triton cache, so the kernels really are compiled, not read back from an earlier run.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    code = "import test_sample_gating as t; t.compile_triton_kernels_for_hopper()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def compile_triton_kernels_for_hopper():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sg = _triton()
    ptrs = lambda **kw: {k: f"*{v}" for k, v in kw.items()}  # noqa: E731
    cases = [
        (sg._compact_kernel, {**ptrs(gate_ptr="bf16", idx_ptr="i32", count_ptr="i32"), "N": "i32", "threshold_bits": "i64"}, {"BLOCK": 1024}),
        (sg._compact_kernel, {**ptrs(gate_ptr="u8", idx_ptr="i32", count_ptr="i32"), "N": "i32", "threshold_bits": "i32"}, {"BLOCK": 16}),
        (sg._gather_rows_kernel, {**ptrs(x_ptr="bf16", idx_ptr="i32", count_ptr="i32", y_ptr="bf16"), "N": "i32", "M": "i32", "capacity": "i32", "row_elems": "i32"}, {"BLOCK": 2048}),
        (sg._scatter_rows_inplace_kernel, {**ptrs(base_ptr="bf16", y_ptr="bf16", idx_ptr="i32", count_ptr="i32"), "N": "i32", "limit": "i32", "row_elems": "i32"}, {"BLOCK": 2048}),
        (sg._inverse_index_kernel, {**ptrs(idx_ptr="i32", count_ptr="i32", inv_ptr="i32"), "N": "i32", "limit": "i32"}, {"BLOCK": 256}),
        (sg._scatter_rows_kernel, {**ptrs(base_ptr="bf16", y_ptr="bf16", idx_ptr="i32", count_ptr="i32", out_ptr="bf16"), "N": "i32", "limit": "i32", "row_elems": "i32"}, {"BLOCK": 2048}),
    ]
    for dt, acc, has_scale in (("bf16", "fp32", True), ("fp16", "fp32", False), ("fp64", "fp64", True)):
        sig = {**ptrs(base_ptr=dt, y_ptr=dt, idx_ptr="i32", count_ptr="i32", inv_ptr="i32", scale_ptr=acc, out_ptr=dt), "N": "i32", "limit": "i32", "row_elems": "i32"}
        cases.append((sg._scatter_add_rows_kernel, sig, {"HAS_SCALE": has_scale, "FP64": dt == "fp64", "BLOCK": 2048}))
    from dynkernels.triton import route as triton_route

    for choice in ("i64", "u8"):
        sig = {**ptrs(choice_ptr=choice, idx_ptr="i32", offsets_ptr="i32"), "N": "i32", "num_branches": "i32"}
        cases.append((triton_route._route_kernel, sig, {"BLOCK_N": 128, "BLOCK_K": 32}))
    for fn, sig, constexprs in cases:
        sig = {**sig, **{name: "constexpr" for name in constexprs}}
        names = list(sig)
        assert names == fn.arg_names, f"{fn.__name__}: signature {names} != {fn.arg_names}"
        src = ASTSource(fn, sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), f"{fn.__name__} did not compile to a cubin"
