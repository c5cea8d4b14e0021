"""route on every backend, against dynkernels.reference: the stable partition of a batch by branch.

Backends come from _utils.device_backends(): the reference and the C++ kernel on the CPU, the
Triton kernel on CPU tensors under TRITON_INTERPRET=1, and the CUDA / Triton kernels on a GPU
(marked `cuda`, skipped without one). Gathering and merging by a route is tested with the row
ops in test_sample_gating.py.
"""
import pytest
import torch

import dynkernels
from dynkernels import reference
from dynkernels.ops.route import _triton

from _utils import device_backends, skip_cuda_throws

ALL = device_backends()
KERNELS = device_backends(include_torch=False)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def kernel_op(backend: str):
    return _triton().route_triton if backend == "triton" else torch.ops.dynkernels.route.default


def choice_cases(device):
    """(name, choice, num_branches): odd N, one branch, empty branches, all in one branch, N = 1,
    N = 0, [R, N], a non-contiguous choice, more rows than one warp chunk, many branches."""
    r = lambda hi, *shape: torch.randint(0, hi, shape, device=device)  # noqa: E731
    return [
        ("odd", r(3, 37), 3),
        ("one-branch", torch.zeros(9, dtype=torch.int64, device=device), 1),
        ("empty-branches", torch.tensor([3, 0, 3, 3, 0, 0, 3], device=device), 5),
        ("all-in-last", torch.full((11,), 3, device=device), 4),
        ("n1", torch.tensor([1], device=device), 2),
        ("n0", torch.zeros(0, dtype=torch.int64, device=device), 3),
        ("2d", r(4, 3, 29), 4),
        ("2d-one-column", r(2, 5, 1), 2),
        ("2d-transposed", r(3, 13, 4).t(), 3),  # non-contiguous
        ("long", r(6, 1000), 6),  # several steps of 32 per warp chunk
        ("many-branches", r(2000, 50), 2000),  # the CUDA kernel's count table in global memory
    ]


@pytest.mark.parametrize("device,backend", ALL)
def test_route_matches_reference(device, backend):
    # every integer dtype through the compiled kernels; two under the (slow) Triton interpreter
    dtypes = (torch.int64, torch.uint8) if (device, backend) == ("cpu", "triton") else INT_DTYPES
    for name, choice, branches in choice_cases(device):
        for dtype in dtypes:
            if dtype in (torch.uint8, torch.int8) and branches > 100:
                continue
            c = choice.to(dtype)
            idx, offsets = dynkernels.route(c, branches, backend=backend)
            ref_idx, ref_offsets = reference.route(c, branches)
            where = f"{name} ({dtype})"
            assert idx.dtype == torch.int32 and offsets.dtype == torch.int32, where
            assert idx.shape == c.shape and offsets.shape == c.shape[:-1] + (branches + 1,), where
            assert idx.device == c.device and offsets.device == c.device, where
            assert torch.equal(idx.cpu(), ref_idx.cpu()), where
            assert torch.equal(offsets.cpu(), ref_offsets.cpu()), where


def test_reference_is_a_stable_partition():
    """The reference itself: branch b owns idx[offsets[b]:offsets[b+1]], in increasing order."""
    choice = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    idx, offsets = reference.route(choice, 4)
    assert offsets.tolist() == [0, 2, 4, 7, 7]
    assert idx.tolist() == [1, 3, 2, 6, 0, 4, 5]


@pytest.mark.parametrize("device,backend", ALL)
def test_compact_is_the_two_way_route(device, backend):
    """compact(keep) lists the kept rows first: route(1 - keep, 2), whose offsets[1] is the count."""
    for keep in (torch.rand(23, device=device) > 0.5, torch.ones(6, dtype=torch.bool, device=device), torch.zeros(4, dtype=torch.bool, device=device)):
        idx, count = dynkernels.compact(keep, backend=backend)
        ridx, offsets = dynkernels.route((~keep).to(torch.int32), 2, backend=backend)
        assert torch.equal(idx, ridx)
        assert torch.equal(count, offsets[1:2]) and int(offsets[2]) == keep.shape[0]


@pytest.mark.parametrize("device,backend", [p for p in KERNELS if p.id != "cpu-cpp"])
def test_out_of_range_rows_come_last(device, backend):
    """The CUDA and Triton kernels do not read choice on the host: rows outside [0, num_branches)
    belong to no branch and are listed after offsets[num_branches], in order (the C++ CPU
    kernel rejects them: test_cpp_route_errors)."""
    choice = torch.tensor([1, 7, 0, -1, 1, 2, 0], device=device)
    idx, offsets = kernel_op(backend)(choice, 2)
    assert offsets.tolist() == [0, 2, 4]
    assert idx.tolist() == [2, 6, 0, 4, 1, 3, 5]
    ref_idx, ref_offsets = reference.route(choice, 2)
    assert torch.equal(idx.cpu(), ref_idx.cpu()) and torch.equal(offsets.cpu(), ref_offsets.cpu())


@pytest.mark.parametrize("device,backend", KERNELS)
def test_opcheck(device, backend):
    samples = [
        (torch.randint(0, 3, (9,), device=device), 3),
        (torch.randint(0, 2, (3, 5), device=device, dtype=torch.uint8), 2),
        (torch.zeros(0, dtype=torch.int64, device=device), 1),
    ]
    # Under TRITON_INTERPRET=1 the interpreted kernel cannot run on fake tensors (see test_sample_gating).
    interpreted = device == "cpu" and backend == "triton"
    only = {"test_utils": ("test_schema", "test_autograd_registration")} if interpreted else {}
    for args in samples:
        torch.library.opcheck(kernel_op(backend), args, **only)


def _bad_inputs():
    c = torch.tensor([0, 1, 2, 1])
    dk = dynkernels
    return [
        ("not-a-tensor", lambda: dk.route([0, 1], 2), TypeError, r"route: choice must be a torch.Tensor"),
        ("rank", lambda: dk.route(torch.zeros(2, 2, 2, dtype=torch.int64), 2), ValueError, r"route: choice must be \[N\] or \[R, N\]"),
        ("0d", lambda: dk.route(torch.tensor(1), 2), ValueError, r"route: choice must be \[N\] or \[R, N\]"),
        ("float", lambda: dk.route(c.float(), 3), TypeError, r"route: choice must be an integer tensor .* got torch.float32"),
        ("bool", lambda: dk.route(c > 0, 2), TypeError, r"route: choice must be an integer tensor .* got torch.bool"),
        ("no-branches", lambda: dk.route(c, 0), ValueError, r"route: num_branches must be an int in \[1, 2\^31 - 2\], got 0"),
        ("bool-branches", lambda: dk.route(c, True), ValueError, r"route: num_branches must be an int .* got True"),
        ("float-branches", lambda: dk.route(c, 3.0), ValueError, r"route: num_branches must be an int .* got 3.0"),
        ("too-large", lambda: dk.route(c, 2), IndexError, r"route: choice\[2\] = 2 is out of range for 2 branches"),
        ("negative", lambda: dk.route(torch.tensor([0, -1, 1]), 2), IndexError, r"route: choice\[1\] = -1 is out of range for 2 branches"),
        ("2d-out-of-range", lambda: dk.route(torch.tensor([[0, 1], [1, 5]]), 2), IndexError, r"route: choice\[1, 1\] = 5 is out of range"),
        ("backend", lambda: dk.route(c, 3, backend="cub"), ValueError, r"route: backend must be one of"),
        ("cuda-backend-on-cpu", lambda: dk.route(c, 3, backend="cuda"), ValueError, r"route: backend='cuda' needs CUDA tensors"),
    ]


@pytest.mark.parametrize("call,exc,match", [pytest.param(c, e, m, id=i) for i, c, e, m in _bad_inputs()])
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, skip_cuda_throws])])
def test_cpp_route_errors(device):
    if device == "cuda" and not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    op = torch.ops.dynkernels.route
    cases = [
        (lambda: op(torch.zeros(2, 2, 2, dtype=torch.int64, device=device), 2), r"route: choice must be \[N\] or \[R, N\]"),
        (lambda: op(torch.zeros(3, device=device), 2), r"route: choice must be an integer tensor, got Float"),
        (lambda: op(torch.zeros(3, dtype=torch.bool, device=device), 2), r"route: choice must be an integer tensor, got Bool"),
        (lambda: op(torch.zeros(3, dtype=torch.int64, device=device), 0), r"route: num_branches must be in \[1, 2\^31 - 2\], got 0"),
    ]
    if device == "cpu":  # choice values are checked on the CPU only (on a GPU it would cost a host sync)
        cases += [
            (lambda: op(torch.tensor([0, 3, 1]), 2), r"route: choice\[1\] = 3 is out of range for 2 branches"),
            (lambda: op(torch.tensor([[0, 1], [-2, 1]]), 2), r"route: choice\[1, 0\] = -2 is out of range for 2 branches"),
        ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


def test_cuda_kernel_registered_when_built():
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("dynkernels::route", "CUDA")
    assert registered == dynkernels.cuda_kernels_compiled()


# ----------------------------------------------------------------------------- GPU properties
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync(backend):
    if backend == "cuda" and not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    choice = torch.randint(0, 4, (3, 64), device="cuda")
    dynkernels.route(choice, 4, backend=backend)  # compile / load the kernel first
    torch.cuda.set_sync_debug_mode("error")
    try:
        dynkernels.route(choice, 4, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_route_checks_choice_on_gpu_only_on_request(monkeypatch):
    from dynkernels.ops import _checks

    choice = torch.tensor([0, 1, 5], device="cuda")
    monkeypatch.setattr(_checks, "CHECK_INDICES_ON_GPU", True)
    with pytest.raises(IndexError, match=r"route: choice\[2\] = 5 is out of range for 2 branches"):
        dynkernels.route(choice, 2)
    monkeypatch.setattr(_checks, "CHECK_INDICES_ON_GPU", False)
    idx, offsets = dynkernels.route(choice, 2)  # not checked: row 2 is in no branch
    assert offsets.tolist() == [0, 1, 2] and idx.tolist() == [0, 1, 2]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_large_batch_on_gpu(backend):
    """More rows than fit one step per warp by far, and one block per row of a [R, N] choice."""
    if backend == "cuda" and not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    for choice, branches in ((torch.randint(0, 7, (100_003,), device="cuda"), 7), (torch.randint(0, 3, (54, 128), device="cuda"), 3)):
        idx, offsets = dynkernels.route(choice, branches, backend=backend)
        ref_idx, ref_offsets = reference.route(choice, branches)
        assert torch.equal(idx, ref_idx) and torch.equal(offsets, ref_offsets)
