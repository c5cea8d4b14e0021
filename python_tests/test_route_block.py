"""RouteBlock and RoutePlan: every sample through the branch it chose; sparse execution against masked."""
import pytest
import torch
import torch.nn as nn

import dynkernels
from dynkernels.nn import RouteBlock, RoutePlan
from dynkernels.nn.route_block import run_sparse

from _utils import assert_close, device_backends

BACKENDS = [p for p in device_backends() if p.id in ("cpu-torch", "cpu-cpp", "cpu-triton", "cuda-cuda", "cuda-triton")]
RTOL = 1e-4  # masked == sparse, fp32 (different batch sizes may take different conv algorithms)


class Counted(nn.Module):
    """A branch that records the batch sizes it ran on."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.module(x)


def conv_branch(cin=3, cout=5, stride=1, bn=True):
    layers = [nn.Conv2d(cin, cout, 3, stride, 1)] + ([nn.BatchNorm2d(cout)] if bn else []) + [nn.ReLU()]
    return nn.Sequential(*layers)


def mixed_branches(k):
    """k branches of different structure that all map [n, 3, H, W] to [n, 5, H/2, W/2]."""
    return [conv_branch(stride=2) if b % 2 == 0 else nn.Sequential(conv_branch(3, 4), conv_branch(4, 5, stride=2)) for b in range(k)]


def block(branches, device, **kw):
    torch.manual_seed(1)
    rb = RouteBlock(branches, **kw).to(device).eval()
    for m in rb.modules():  # BN statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return rb


def both(rb, x, choice, **kw):
    rb.execution = "masked"
    masked = rb(x, choice, **kw)
    rb.execution = "sparse"
    return masked, rb(x, choice, **kw)


def choices(device):
    """(name, choice, branches): odd N, an empty branch, all in one branch, N = 1."""
    return [
        ("odd", torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 2, 1], device=device), 3),
        ("empty-branch", torch.tensor([0, 2, 2, 0, 0, 2, 0], device=device), 3),
        ("all-in-one", torch.full((6,), 1, device=device), 3),
        ("n1", torch.tensor([1], device=device), 2),
        ("one-branch", torch.zeros(5, dtype=torch.int64, device=device), 1),
    ]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_equals_sparse(device, backend):
    for name, choice, k in choices(device):
        n = choice.shape[0]
        for fmt in (torch.contiguous_format, torch.channels_last):
            rb = block(mixed_branches(k), device, backend=backend)
            x = torch.randn(n, 3, 9, 7, device=device).contiguous(memory_format=fmt)
            masked, sparse = both(rb, x, choice)
            assert_close(sparse, masked, rtol=RTOL)


def test_each_branch_runs_only_on_its_samples():
    choice = torch.tensor([2, 0, 2, 2, 0, 2, 0, 2, 2])
    rb = block([Counted(conv_branch()) for _ in range(3)], "cpu")
    x = torch.randn(9, 3, 4, 4)
    masked, sparse = both(rb, x, choice)
    # masked: all 9; sparse: only the chosen (in grad mode the unchosen branch 1 runs on an
    # empty batch, so that its parameters get their zero gradients: see run_sparse)
    assert [b.batches for b in rb.branches] == [[9, 3], [9, 0], [9, 6]]
    with torch.no_grad():
        rb(x, choice)
    assert [b.batches[2:] for b in rb.branches] == [[3], [], [6]]
    assert_close(sparse, masked, rtol=RTOL)


def test_bucketed_batches():
    """bucket pads a branch's compact batch with zero rows, never merged back."""
    choice = torch.tensor([1, 0, 1, 1, 0, 1, 1])  # 2 and 5 samples
    for bucket, sizes in ((4, [4, 7]), ([3, 6], [3, 6]), (None, [2, 5])):
        rb = block([Counted(conv_branch()), Counted(conv_branch())], "cpu", bucket=bucket)
        x = torch.randn(7, 3, 5, 5)
        masked, sparse = both(rb, x, choice)
        assert [b.batches[1] for b in rb.branches] == sizes, bucket
        assert_close(sparse, masked, rtol=RTOL)


def test_route_plan_for_many_blocks():
    """One RoutePlan over [N, B] choices drives B blocks: the same outputs as each block alone."""
    torch.manual_seed(3)
    choices_ = torch.randint(0, 3, (10, 4))
    plan = RoutePlan(choices_, 3)
    assert len(plan) == 4 and plan.host_syncs == 1
    blocks = [block([conv_branch(5, 5) for _ in range(3)], "cpu") for _ in range(4)]
    x = torch.randn(10, 5, 4, 4)
    planned = alone = x
    for b, rb in enumerate(blocks):
        planned = rb(planned, choices_[:, b], plan[b])
        alone = rb(alone, choices_[:, b])
        idx, offsets = dynkernels.route(choices_[:, b], 3)
        assert torch.equal(plan[b].idx, idx) and plan[b].starts == offsets.tolist()
    assert torch.equal(planned, alone)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients_reach_the_chosen_branches_only(device, backend):
    choice = torch.tensor([0, 2, 0, 0, 2, 2, 0], device=device)  # branch 1 unused
    x0 = torch.randn(7, 3, 5, 5, device=device)
    grads = {}
    rb = block([conv_branch(bn=False) for _ in range(3)], device, backend=backend)
    for execution in ("masked", "sparse"):
        rb.execution = execution
        rb.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = rb(x, choice)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        grads[execution] = (x.grad, [[None if p.grad is None else p.grad.clone() for p in br.parameters()] for br in rb.branches])
    (gx_m, gp_m), (gx_s, gp_s) = grads["masked"], grads["sparse"]
    assert_close(gx_s, gx_m, rtol=RTOL)
    # an unchosen branch runs on an empty batch in grad mode: exact zero gradients (as masked gives)
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in gp_s[1])
    assert all(torch.count_nonzero(g) == 0 for g in gp_m[1])
    for b in (0, 2):
        for gs, gm in zip(gp_s[b], gp_m[b]):
            assert_close(gs, gm, rtol=RTOL)


def test_training_mode_batchnorm_over_each_branch():
    """In training mode (bucket='auto' gives exact counts) each branch's BN sees its own samples."""
    choice = torch.tensor([1, 0, 1, 1, 0])
    rb = block([conv_branch(), conv_branch()], "cpu").train()
    x = torch.randn(5, 3, 4, 4)
    out = rb(x, choice)
    for b in (0, 1):
        rows = (choice == b).nonzero().flatten()
        assert_close(out[rows], rb.branches[b](x[rows]), rtol=1e-5)


def test_run_sparse_with_callables():
    """Models use run_sparse with their own modules (their own parameter names) as branches."""
    convs = nn.ModuleList([nn.Conv2d(2, 2, 1) for _ in range(2)])
    choice = torch.tensor([1, 0, 1])
    x = torch.randn(3, 2, 2, 2)
    out = run_sparse(x, [lambda t, c=c: torch.relu(t + c(t)) for c in convs], RoutePlan(choice, 2)[0])
    expected = torch.stack([torch.relu(x[i : i + 1] + convs[int(choice[i])](x[i : i + 1]))[0] for i in range(3)])
    assert_close(out, expected)


def test_empty_batch():
    rb = block([conv_branch(), conv_branch()], "cpu")
    out = rb(torch.randn(0, 3, 4, 4), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 5, 4, 4)


def _bad_inputs():
    rb = RouteBlock([nn.Identity(), nn.Identity()])
    x = torch.randn(4, 3)
    c = torch.tensor([0, 1, 1, 0])
    two_shapes = RouteBlock([nn.Identity(), nn.Linear(3, 2)])
    bn = RouteBlock([nn.BatchNorm1d(3), nn.BatchNorm1d(3)], bucket=4).train()
    return [
        ("no-branches", lambda: RouteBlock([]), TypeError, r"RouteBlock: branches must be a non-empty sequence of nn.Module"),
        ("branch-not-module", lambda: RouteBlock([nn.Identity(), torch.relu]), TypeError, r"branches must be a non-empty sequence"),
        ("execution", lambda: RouteBlock([nn.Identity()], execution="dense"), ValueError, r"RouteBlock: execution must be one of"),
        ("bucket", lambda: RouteBlock([nn.Identity()], bucket=0), ValueError, r"RouteBlock: bucket must be a positive int step"),
        ("backend", lambda: RouteBlock([nn.Identity()], backend="cub"), ValueError, r"RouteBlock: backend must be one of"),
        ("choice-float", lambda: rb(x, c.float()), TypeError, r"RouteBlock: choice must be an integer tensor"),
        ("choice-length", lambda: rb(x, c[:3]), ValueError, r"RouteBlock: choice has 3 entries but x has 4 samples"),
        ("choice-rank", lambda: rb(x, c.view(2, 2)), ValueError, r"RouteBlock: choice must be \[N\] = \[4\]"),
        ("choice-out-of-range", lambda: rb(x, torch.tensor([0, 2, 1, 0])), IndexError, r"RouteBlock: choice\[1\] = 2 is out of range for 2 branches"),
        ("plan-out-of-range", lambda: RoutePlan(torch.tensor([[0, 1], [1, 2]]), 2), IndexError, r"RoutePlan: choices\[1, 1\] = 2 is out of range for 2 branches"),
        ("masked-out-of-range", lambda: RouteBlock([nn.Identity()] * 2, execution="masked")(x, torch.tensor([0, -1, 1, 0])), IndexError, r"RouteBlock: choice\[1\] = -1 is out of range"),
        ("branch-shapes", lambda: two_shapes(x, c), ValueError, r"RouteBlock: every branch must map a sample to the same shape"),
        ("plan-mismatch", lambda: rb(x, c, RoutePlan(torch.tensor([0, 1]), 2)[0]), ValueError, r"RouteBlock: plan must be the RouteRow of this choice"),
        ("bucket-in-training", lambda: bn(x, c), RuntimeError, r"RouteBlock: bucket=4 pads compact batches with zero rows"),
        ("plan-choices-3d", lambda: RoutePlan(torch.zeros(2, 2, 2, dtype=torch.int64), 2), ValueError, r"RoutePlan: choices must be \[N\] or \[N, B\]"),
    ]


@pytest.mark.parametrize("call,exc,match", [pytest.param(c, e, m, id=i) for i, c, e, m in _bad_inputs()])
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.cuda
def test_out_of_range_choice_on_gpu_is_caught_by_the_plan():
    """On a GPU the route kernel lists out-of-range rows after the last branch; the plan sees
    that in the sizes it reads anyway and raises."""
    rb = RouteBlock([nn.Identity(), nn.Identity()]).cuda()
    with pytest.raises(IndexError, match=r"RouteBlock: 1 of the 4 choices of block 0 are outside \[0, 2\)"):
        rb(torch.randn(4, 3, device="cuda"), torch.tensor([0, 1, 9, 0], device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync_with_a_plan(backend):
    """Given its RoutePlan row, a sparse RouteBlock forward reads nothing on the host."""
    if backend == "cuda" and not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    rb = block([conv_branch(), conv_branch(), conv_branch()], "cuda", backend=backend)
    x = torch.randn(32, 3, 8, 8, device="cuda")
    choice = torch.randint(0, 3, (32,), device="cuda")
    plan = RoutePlan(choice, 3, backend)
    rb(x, choice, plan[0])  # load kernels, pick conv algorithms
    torch.cuda.set_sync_debug_mode("error")
    try:
        rb(x, choice, plan[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
