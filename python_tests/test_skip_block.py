"""SkipBlock / SkipPlan / SkipSequential: sparse execution equals the masked (papers')
execution, in outputs and gradients; one compact and one host read for a whole plan."""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _utils import HAS_TRITON, assert_close, count_compacts, needs_interpreter

import dynkernels
from dynkernels._extension import _C
from dynkernels.nn import SkipBlock, SkipPlan, SkipSequential

HAS_TRITON_GATING = HAS_TRITON and importlib.util.find_spec("dynkernels.triton.sample_gating") is not None
RTOL = 1e-4  # DESIGN.md: masked and sparse agree to 1e-4 relative in fp32

BACKENDS = [
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param("cpu", "cpu", id="cpu-cpp"),
    pytest.param(
        "cpu",
        "triton",
        id="cpu-triton",
        marks=[
            pytest.mark.triton,
            pytest.mark.skipif(not HAS_TRITON_GATING, reason="Triton sample-gating kernels not in this build"),
            needs_interpreter,
        ],
    ),
    pytest.param("cuda", "auto", id="cuda-auto", marks=pytest.mark.cuda),
]


class TorchvisionBasicBlock(nn.Module):
    """A torchvision-style BasicBlock: its own downsample, residual add and ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + identity)


def branch(c):
    """A residual branch F (no residual add) for the scaled formula."""
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1))


def randomize_bn(module):
    """Non-trivial BatchNorm statistics, so that eval mode is not the identity."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return module


def gates(n, kind):
    if kind == "random":
        return (torch.rand(n) < 0.5).float() * (torch.rand(n) + 0.5)
    if kind == "bool":
        return torch.rand(n) < 0.5
    if kind == "all_skip":
        return torch.zeros(n)
    if kind == "all_keep":
        return torch.ones(n)
    raise ValueError(kind)


def run_both(module, *args):
    module.execution = "sparse"
    sparse = module(*args)
    module.execution = "masked"
    masked = module(*args)
    return sparse, masked


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", ["random", "bool", "all_skip", "all_keep"])
@pytest.mark.parametrize("n", [1, 9])
@pytest.mark.parametrize("downsample", [False, True], ids=["same-shape", "downsample"])
def test_plain_sparse_equals_masked(device, backend, kind, n, downsample):
    torch.manual_seed(n)
    cin, cout, stride = (6, 10, 2) if downsample else (8, 8, 1)
    block = randomize_bn(TorchvisionBasicBlock(cin, cout, stride)).eval().to(device)
    skip = SkipBlock(block, backend=backend)
    x = torch.randn(n, cin, 7, 9, device=device)
    gate = gates(n, kind).to(device)
    sparse, masked = run_both(skip, x, gate)
    assert_close(sparse, masked, rtol=RTOL)
    keep = (gate > 0).cpu()
    # The formula itself: kept samples get block(x), the others the shortcut.
    shortcut = x if not downsample else block.downsample(x)
    assert_close(sparse[~keep.to(device)], shortcut[~keep.to(device)], rtol=RTOL)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", ["random", "all_skip", "all_keep"])
@pytest.mark.parametrize("downsample", [False, True], ids=["same-shape", "downsample"])
def test_inplace_merge_writes_into_the_shortcut_output(device, backend, kind, downsample):
    """inplace=True without autograd: the same output as the out-of-place merge, written into
    x itself under the identity shortcut (the dropped rows untouched); with a downsample
    shortcut x is left alone. With autograd recording, the merge is out of place."""
    torch.manual_seed(4)
    cin, cout, stride = (6, 10, 2) if downsample else (8, 8, 1)
    block = randomize_bn(TorchvisionBasicBlock(cin, cout, stride)).eval().to(device)
    x = torch.randn(9, cin, 5, 7, device=device)
    gate = gates(9, kind).to(device)
    want = SkipBlock(block, backend=backend)(x, gate)
    skip = SkipBlock(block, backend=backend, inplace=True)
    assert "inplace=True" in repr(skip)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            xi = x.clone()
            out = skip(xi, gate)
        assert_close(out, want, rtol=RTOL)
        written = out.data_ptr() == xi.data_ptr()
        if downsample:
            assert torch.equal(xi, x)
        elif kind == "random":  # (all kept: the block's own output; none kept: x itself)
            assert written and torch.equal(xi[gate.cpu() == 0], x[gate.cpu() == 0])
    xg = x.clone().requires_grad_()
    out = skip(xg, gate)
    assert torch.equal(xg.detach(), x) and (kind != "random" or out.data_ptr() != xg.data_ptr())
    assert_close(out, want, rtol=RTOL)
    if out.requires_grad:
        out.sum().backward()
        assert xg.grad is not None
    # scaled blocks merge out of place
    scaled = SkipBlock(branch(cin), scaled=True, backend=backend, inplace=True).to(device)
    with torch.no_grad():
        xs = x.clone()
        scaled(xs, gate)
    assert torch.equal(xs, x)
    with pytest.raises(TypeError, match="SkipBlock: inplace must be a bool, got 1"):
        skip.inplace = 1


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 11])
def test_scaled_sparse_equals_masked(device, backend, n):
    torch.manual_seed(1)
    skip = SkipBlock(branch(5), scaled=True, backend=backend).to(device)
    x = torch.randn(n, 5, 6, 6, device=device)
    # zeros skip, positive and negative (leaky ReLU-1) values scale
    gate = torch.where(torch.rand(n) < 0.4, torch.zeros(n), torch.rand(n) * 1.4 - 0.2).to(device)
    sparse, masked = run_both(skip, x, gate)
    assert_close(sparse, masked, rtol=RTOL)
    zero = gate == 0
    assert torch.equal(sparse[zero], x[zero])


def test_plain_gradients_equal_masked():
    torch.manual_seed(2)
    block = randomize_bn(TorchvisionBasicBlock(6, 12, 2)).eval()
    skip = SkipBlock(block, backend="cpu")
    gate = torch.tensor([1.0, 0.0, 0.7, 0.0, 1.0, 1.0, 0.0])
    x = torch.randn(7, 6, 8, 8)
    weight = torch.randn(7, 12, 4, 4)
    grads = {}
    for execution in ("sparse", "masked"):
        skip.execution = execution
        xi = x.clone().requires_grad_()
        skip.zero_grad()
        (skip(xi, gate) * weight).sum().backward()
        grads[execution] = [xi.grad] + [p.grad.clone() for p in skip.parameters()]
    for g_sparse, g_masked in zip(grads["sparse"], grads["masked"]):
        assert_close(g_sparse, g_masked, rtol=RTOL)
    # Dropped samples reach x only through the downsample shortcut; kept ones also through the block.
    assert grads["sparse"][0][1].abs().sum() > 0
    assert grads["sparse"][1].abs().sum() > 0  # conv1 of the block got a gradient


def test_scaled_gradients_equal_masked_including_gate():
    torch.manual_seed(3)
    skip = SkipBlock(branch(4), scaled=True, backend="cpu")
    x = torch.randn(6, 4, 5, 5)
    logits = torch.tensor([2.0, -1.0, 0.3, -0.5, 0.9, 1.7])  # ReLU-1 gate: zero slope where it is 0
    grads = {}
    for execution in ("sparse", "masked"):
        skip.execution = execution
        xi, li = x.clone().requires_grad_(), logits.clone().requires_grad_()
        skip.zero_grad()
        gate = li.clamp(0, 1)
        skip(xi, gate).pow(2).sum().backward()
        grads[execution] = [xi.grad, li.grad] + [p.grad.clone() for p in skip.parameters()]
    for g_sparse, g_masked in zip(grads["sparse"], grads["masked"]):
        assert_close(g_sparse, g_masked, rtol=RTOL)
    assert grads["sparse"][1][[2, 4]].abs().min() > 0  # gates inside (0, 1) got their gradient


def chain(n_blocks=4, c=8, **kw):
    return SkipSequential([SkipBlock(randomize_bn(TorchvisionBasicBlock(c, c)).eval(), **kw) for _ in range(n_blocks)])


@pytest.mark.parametrize("capacity", [None, "full"])
def test_plan_equals_per_block_and_masked(capacity):
    torch.manual_seed(4)
    n = 10
    seq = chain(backend="cpu")
    if capacity == "full":
        seq.capacity = n
    x = torch.randn(n, 8, 6, 6)
    policy = (torch.rand(n, 4) < 0.5).float()
    policy[:, 1] = 0  # one block dropped by everyone
    policy[:, 2] = 1  # one kept by everyone
    planned, masked = run_both(seq, x, policy)
    seq.execution = "sparse"
    per_block = x
    for b, blk in enumerate(seq.blocks):
        per_block = blk(per_block, policy[:, b])  # each block compacts its own gate
    assert_close(planned, masked, rtol=RTOL)
    assert_close(planned, per_block, rtol=RTOL)


def test_plan_compacts_once(monkeypatch):
    calls = count_compacts(monkeypatch)
    seq = chain(n_blocks=5, backend="cpu")
    policy = (torch.rand(3, 5) < 0.5).float()
    seq(torch.randn(3, 8, 4, 4), policy)
    assert calls == [(5, 3)]  # one compact on the [B, N] transposed policy
    plan = SkipPlan(policy)
    assert plan.host_syncs == 1 and plan.rows == (policy > 0).sum(0).tolist()
    assert SkipPlan(policy, capacity=3).host_syncs == 0


def test_plan_rows_match_compact():
    policy = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    plan = SkipPlan(policy, backend="cpu")
    assert plan.rows == [2, 1]
    assert plan[0].idx.tolist() == [0, 2, 1] and plan[0].count.tolist() == [2]
    assert plan[1].idx.tolist() == [2, 0, 1] and plan[1].kept == 1 and plan[1].n == 3


def test_bad_input_errors():
    skip = SkipBlock(TorchvisionBasicBlock(4, 4).eval())
    x = torch.randn(3, 4, 5, 5)
    with pytest.raises(ValueError, match="gate has 2 entries but x has 3 samples"):
        skip(x, torch.ones(2))
    with pytest.raises(ValueError, match=r"gate must be \[N\]"):
        skip(x, torch.ones(3, 1))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        skip(x, [1, 0, 1])
    with pytest.raises(TypeError, match="gate must be a floating or bool tensor"):
        skip(x, torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        skip(None, torch.ones(3))
    with pytest.raises(ValueError, match="execution must be one of"):
        SkipBlock(nn.Identity(), execution="dense")
    with pytest.raises(ValueError, match="backend must be one of"):
        SkipBlock(nn.Identity(), backend="gpu")
    with pytest.raises(TypeError, match="block must be an nn.Module"):
        SkipBlock(lambda t: t)
    with pytest.raises(ValueError, match="plan must be the RowPlan"):
        skip(x, torch.ones(3), plan=SkipPlan(torch.ones(5, 1))[0])


@pytest.mark.parametrize("execution", ["sparse", "masked"])
def test_shape_changing_block_needs_a_shortcut(execution):
    block = nn.Conv2d(4, 8, 3, 2, 1)  # no downsample attribute: the default shortcut is identity
    skip = SkipBlock(block, execution=execution)
    with pytest.raises(ValueError, match="needs a shortcut that does the same"):
        skip(torch.randn(3, 4, 6, 6), torch.tensor([1.0, 0.0, 1.0]))
    ok = SkipBlock(block, shortcut=nn.Conv2d(4, 8, 1, 2), execution=execution)
    assert ok(torch.randn(3, 4, 6, 6), torch.tensor([1.0, 0.0, 1.0])).shape == (3, 8, 3, 3)


def test_capacity_errors():
    seq = chain(n_blocks=2)
    seq.capacity = 2
    policy = torch.ones(3, 2)
    with pytest.raises(ValueError, match="capacity=2 but a block keeps 3 samples"):
        seq(torch.randn(3, 8, 4, 4), policy)
    with pytest.raises(ValueError, match="capacity must be at most the batch size"):
        SkipPlan(policy, capacity=4)
    skip = SkipBlock(TorchvisionBasicBlock(8, 8), capacity=3).train()
    with pytest.raises(RuntimeError, match="BatchNorm in training mode"):
        skip(torch.randn(3, 8, 4, 4), torch.ones(3))
    with pytest.raises(ValueError, match=r"policy has 3 columns but there are 2 blocks"):
        chain(n_blocks=2)(torch.randn(3, 8, 4, 4), torch.ones(3, 3))
    with pytest.raises(ValueError, match="all scaled or all plain"):
        SkipSequential([SkipBlock(nn.Identity()), SkipBlock(nn.Identity(), scaled=True)])


@pytest.mark.cuda
@pytest.mark.parametrize("capacity,syncs", [(None, 1), ("full", 0)])
def test_plan_host_syncs_on_gpu(capacity, syncs):
    """On a GPU a planned forward synchronises once (capacity=None) or never (capacity=N)."""
    import warnings

    n = 16
    seq = chain(n_blocks=4, backend="auto").cuda()
    if capacity == "full":
        seq.capacity = n
    x = torch.randn(n, 8, 8, 8, device="cuda")
    policy = (torch.rand(n, 4, device="cuda") < 0.5).float()
    seq(x, policy)  # warm-up (lazy initialisation may synchronise)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            seq(x, policy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (the first use of the debug mode also warns that it is a prototype: not a sync)
    assert sum("called a synchronizing" in str(w.message) for w in caught) == syncs


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
def test_capacity_mode_runs_under_a_cuda_graph(backend):
    """capacity=C: no host sync, launches sized by C, counts read on the device, so one
    capture of the whole planned forward replays correctly for new inputs and new policies
    (each block keeping at most C samples)."""
    if backend == "cuda" and not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    if backend == "triton" and not HAS_TRITON_GATING:
        pytest.skip("Triton sample-gating kernels not in this build")
    torch.manual_seed(7)
    n, cap = 16, 10

    def policy_keeping_at_most(c):
        keep = torch.zeros(n, 4, device="cuda")
        for b in range(4):
            keep[torch.randperm(n, device="cuda")[: int(torch.randint(0, c + 1, ()))], b] = 1
        return keep

    seq = chain(n_blocks=4, backend=backend).cuda()
    seq.capacity = cap
    static_x = torch.randn(n, 8, 8, 8, device="cuda")
    static_policy = policy_keeping_at_most(cap)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up (Triton compiles) off the capture stream
        for _ in range(2):
            seq(static_x, static_policy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = seq(static_x, static_policy)
    for _ in range(3):
        x, policy = torch.randn_like(static_x), policy_keeping_at_most(cap)
        static_x.copy_(x)
        static_policy.copy_(policy)
        graph.replay()
        seq.execution = "masked"
        with torch.no_grad():
            want = seq(x, policy)
        seq.execution = "sparse"
        assert_close(static_out, want, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_half_precision_sparse_equals_masked(dtype, scaled):
    torch.manual_seed(5)
    block = TorchvisionBasicBlock(8, 8) if not scaled else branch(8)
    skip = SkipBlock(randomize_bn(block).eval().to(dtype), scaled=scaled, backend="cpu")
    x = torch.randn(7, 8, 5, 5, dtype=dtype)
    gate = gates(7, "random").to(dtype)
    sparse, masked = run_both(skip, x, gate)
    assert sparse.dtype == dtype
    assert_close(sparse, masked)


class InfAt(nn.Module):
    """A shortcut that is inf on the chosen samples (identity elsewhere)."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def forward(self, x):
        x = x.clone()
        x[self.rows] = float("inf")
        return x


def test_plain_sparse_does_not_read_the_shortcut_of_kept_samples():
    """The one-pass merge copies a kept sample's row from the block's result: an inf in the
    shortcut there does not reach the output. Masked execution (block * m + shortcut * (1 - m))
    gives NaN there (inf * 0): the executions differ exactly where the shortcut is not finite."""
    torch.manual_seed(6)
    block = nn.Conv2d(3, 3, 3, 1, 1)
    gate = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    skip = SkipBlock(block, shortcut=InfAt([0, 2]), backend="cpu")  # samples 0 and 2 are kept
    x = torch.randn(5, 3, 4, 4)
    sparse, masked = run_both(skip, x, gate)
    assert torch.isfinite(sparse).all()
    assert_close(sparse[[0, 2, 3]], block(x)[[0, 2, 3]], rtol=RTOL)
    assert torch.equal(sparse[[1, 4]], x[[1, 4]])
    assert torch.isnan(masked[[0, 2]]).all()
    assert_close(sparse[[1, 3, 4]], masked[[1, 3, 4]], rtol=RTOL)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_planned_forward_does_not_recheck_indices(device, backend, monkeypatch):
    """A plan's idx and count come from compact: the sparse forward checks the plan's shape and
    device (cheap) and does not validate idx / count again in every gather and merge."""
    from dynkernels.ops import _checks

    torch.manual_seed(7)
    seq = chain(n_blocks=3, backend=backend).to(device)
    x = torch.randn(6, 8, 5, 5, device=device)
    policy = (torch.rand(6, 3) < 0.5).float().to(device)
    seq.execution = "masked"
    masked = seq(x, policy)
    seq.execution = "sparse"

    def index_args(*args, **kwargs):
        raise AssertionError("index_args was called in a planned sparse forward")

    monkeypatch.setattr(_checks, "index_args", index_args)
    assert_close(seq(x, policy), masked, rtol=RTOL)
    with torch.no_grad():  # below autograd: the same kernels, without torch.library's wrapper
        assert_close(seq(x, policy), masked, rtol=RTOL)


@pytest.mark.skipif(_C is None, reason="the extension's Python module is not loaded (a library loaded by torch.ops)")
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("inplace", [False, True])
def test_plain_block_given_its_plan_takes_the_two_call_host_path(mode, inplace, monkeypatch):
    """A plain SkipBlock given its plan on CPU tensors, no autograd: the C++ checks, gather and
    merge (skip_gather / skip_merge) serve it, run_kept is not reached, and the output equals
    masked execution (inplace: written into x itself)."""
    from dynkernels.nn import skip_block

    torch.manual_seed(3)
    block = randomize_bn(TorchvisionBasicBlock(4, 4)).eval()
    skip = SkipBlock(block, inplace=inplace).eval()
    assert skip._lean
    gate = torch.tensor([1.0, 0.0, 0.3, 1.0, 0.0, 1.0])
    plan = SkipPlan(gate.unsqueeze(1))[0]
    x = torch.randn(6, 4, 5, 5)
    with torch.no_grad():
        expected = block(x) * (gate > 0).float().view(-1, 1, 1, 1) + x * (gate <= 0).float().view(-1, 1, 1, 1)

    def run_kept(*args, **kwargs):
        raise AssertionError("run_kept was reached")

    monkeypatch.setattr(skip_block, "run_kept", run_kept)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        given = x.clone()
        out = skip(given, gate, plan)
    assert_close(out, expected, rtol=RTOL)
    assert (out is given) == inplace
    assert torch.equal(given, expected if inplace else x)


@pytest.mark.skipif(_C is None, reason="the extension's Python module is not loaded (a library loaded by torch.ops)")
def test_two_call_host_path_leaves_the_other_cases_to_the_python_path(monkeypatch):
    """Where the two-call host path does not apply (autograd records, a plan that keeps every
    row, another module configuration) or its merge does not fit the block's result, forward
    takes its Python path: same results, same errors."""
    from dynkernels.nn import skip_block

    torch.manual_seed(5)
    block = nn.Conv2d(3, 3, 1)
    gate = torch.tensor([1.0, 0.0, 1.0, 0.0])
    plan = SkipPlan(gate.unsqueeze(1))[0]
    x = torch.randn(4, 3, 2, 2)
    for kwargs in ({"scaled": True}, {"execution": "masked"}, {"backend": "torch"}, {"shortcut": nn.Identity()}):
        assert not SkipBlock(block, **kwargs)._lean, kwargs
    skip = SkipBlock(block)
    skip.scaled = True
    assert not skip._lean
    skip.scaled = False
    assert skip._lean

    reached = []
    real_run_kept = skip_block.run_kept
    monkeypatch.setattr(skip_block, "run_kept", lambda *a, **k: reached.append(1) or real_run_kept(*a, **k))
    out = skip(x, gate, plan)  # autograd records
    assert reached and out.requires_grad
    with torch.no_grad():
        assert_close(skip(x, gate, plan), out.detach(), rtol=RTOL)
        reached.clear()
        all_kept = SkipPlan(torch.ones(4, 1))[0]
        assert_close(skip(x, torch.ones(4), all_kept), block(x), rtol=RTOL)
        assert reached
        with pytest.raises(ValueError, match=r"plan must be the RowPlan of this gate"):
            skip(x[:3], gate[:3], plan)
        with pytest.raises(ValueError, match=r"SkipBlock: gate has 3 entries but x has 4 samples"):
            skip(x, gate[:3], plan)
        wrong_rows = SkipBlock(_FirstRow(block))
        with pytest.raises(ValueError, match=r"SkipBlock: the compact result must be \[2, 3, 2, 2\]"):
            wrong_rows(x, gate, plan)


class _FirstRow(nn.Module):
    """A block that returns one row whatever its batch."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[:1]


def test_plan_helpers_check_shapes_cheaply():
    from dynkernels.nn import gather_kept, merge_kept

    row = SkipPlan(torch.tensor([[1.0], [0.0], [1.0], [0.0], [1.0]]), backend="cpu")[0]
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"gather_kept: x has shape \(4, 3\) on cpu, but the plan is for 5 samples on cpu"):
        gather_kept(x[:4], row)
    with pytest.raises(ValueError, match=r"merge_kept: the compact result must be \[3, 3\]"):
        merge_kept(x, torch.randn(2, 3), row)
    with pytest.raises(ValueError, match=r"merge_kept: the compact result must be \[3, 3\]"):
        merge_kept(x, torch.randn(3, 4), row)
    with pytest.raises(TypeError, match=r"merge_kept: the compact result must have base's dtype torch.float32"):
        merge_kept(x, torch.randn(3, 3, dtype=torch.float64), row)
    with pytest.raises(ValueError, match=r"merge_kept: base has shape \(6, 3\)"):
        merge_kept(torch.randn(6, 3), torch.randn(3, 3), row)
    y = torch.randn(3, 3)
    out = merge_kept(x, y, row)
    assert torch.equal(out[[0, 2, 4]], y) and torch.equal(out[[1, 3]], x[[1, 3]])
    assert torch.equal(gather_kept(x, row), x[[0, 2, 4]])
    skip = SkipBlock(nn.Identity())
    meta_row = SkipPlan(torch.ones(5, 1, device="meta"), capacity=5)[0]  # a plan for another device
    with pytest.raises(ValueError, match=r"plan must be the RowPlan of this gate \(a SkipPlan row for 5 samples on cpu\)"):
        skip(x, torch.ones(5), plan=meta_row)


def test_block_plan_matches_skip_plan_row():
    gate = torch.tensor([0.0, 0.7, 0.0, 1.0, 0.2])
    for capacity in (None, 4):
        own = SkipBlock(nn.Identity(), capacity=capacity).plan(gate)
        row = SkipPlan(gate.unsqueeze(1), capacity=capacity)[0]
        for a, b in zip(own[:2], row[:2]):
            assert torch.equal(a, b) and a.shape == b.shape
        assert own[2:] == row[2:]
    with pytest.raises(ValueError, match="SkipBlock: capacity must be at most the batch size 5"):
        SkipBlock(nn.Identity(), capacity=6).plan(gate)
    with pytest.raises(ValueError, match="SkipBlock: capacity=1 but a block keeps 3 samples"):
        SkipBlock(nn.Identity(), capacity=1).plan(gate)
