"""Bucketed compact batches in SkipBlock, SkipPlan, SkipSequential and the models: outputs equal
the masked execution, the block sees only bucket sizes, padding rows never reach the output,
and bad bucket / capacity arguments get clear errors."""
import pytest
import torch
import torch.nn as nn
from _utils import assert_close
from test_skip_block import BACKENDS, TorchvisionBasicBlock, branch, chain, randomize_bn, run_both

from dynkernels.models.blockdrop import resnet32_cifar
from dynkernels.models.lcnet import resnet50
from dynkernels.nn import SkipBlock, SkipPlan, SkipSequential
from dynkernels.nn.bucket import bucket_sizes
from dynkernels.ops import sample_gating

RTOL = 1e-4
BUCKETS = [pytest.param(None, id="exact"), pytest.param(4, id="step4"), pytest.param([2, 3, 8], id="sizes")]


def record_batch_sizes(module):
    """The batch sizes module's forward sees, appended to the returned list."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen


def keep_exactly(n, k):
    gate = torch.zeros(n)
    gate[torch.randperm(n)[:k]] = 1.0
    return gate


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_skip_block_bucket_equals_masked(device, backend, bucket, scaled):
    torch.manual_seed(11)
    n = 9
    block = branch(5) if scaled else randomize_bn(TorchvisionBasicBlock(5, 5)).eval()
    skip = SkipBlock(block.to(device), scaled=scaled, backend=backend, bucket=bucket).eval()
    seen = record_batch_sizes(skip.block)
    x = torch.randn(n, 5, 6, 7, device=device)
    for k in (0, 1, 3, 5, 8, 9):  # none, padded by step 4 / sizes [2, 3, 8] or not, all
        gate = keep_exactly(n, k).to(device) * (torch.rand(n, device=device) + 0.5 if scaled else 1)
        sparse, masked = run_both(skip, x, gate)
        assert_close(sparse, masked, rtol=RTOL)
    sparse_sizes = set(seen[::2])  # each run_both: the sparse forward first, then the masked one on all n
    allowed = set(range(1, n + 1)) if bucket is None else set(bucket_sizes(tuple(bucket) if isinstance(bucket, list) else bucket, n))
    # (in grad mode a block nobody keeps runs on an empty batch, so that its parameters get zero
    # gradients: see run_kept)
    assert sparse_sizes <= allowed | {0}
    seen.clear()
    skip.execution = "sparse"
    with torch.no_grad():
        skip(x, torch.zeros(n, device=device))
    assert seen == []  # without autograd a block nobody keeps is not run


def test_step_bucket_bounds_the_sizes():
    n = 32
    skip = SkipBlock(nn.Conv2d(3, 3, 1), bucket=8).eval()
    seen = record_batch_sizes(skip.block)
    x = torch.randn(n, 3, 2, 2)
    with torch.no_grad():
        for k in range(1, n):
            skip(x, keep_exactly(n, k))
    assert set(seen) == {8, 16, 24, 32}


class NaNOnZeroRows(nn.Module):
    """conv(x), but NaN on every input row that is all zero (as padding rows are)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        y = self.conv(x)
        pad = x.flatten(1).abs().sum(1) == 0
        return torch.where(pad.view(-1, 1, 1, 1), torch.full_like(y, float("nan")), y)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_padding_rows_never_reach_the_output(device, backend, scaled):
    """A block whose output is NaN on the (zero) padding rows: nothing of it reaches the output."""
    torch.manual_seed(12)
    block = NaNOnZeroRows(4).to(device)
    skip = SkipBlock(block, scaled=scaled, backend=backend, bucket=8)
    seen = record_batch_sizes(block)
    x = torch.randn(10, 4, 5, 5, device=device)
    gate = keep_exactly(10, 3).to(device)
    sparse, masked = run_both(skip, x, gate)
    assert seen[0] == 8  # 3 kept, 5 padding rows: NaN in the block's output there
    assert torch.isfinite(sparse).all()
    assert_close(sparse, masked, rtol=RTOL)


def test_garbage_in_padding_rows_does_not_leak(monkeypatch):
    """Even NaN written into the padding rows of every compact batch does not reach the output:
    the merge ops read only the first `count` rows of the block's result."""
    real = sample_gating.resolved_kernels
    padding = []

    def nan_padding(*args):
        k = real(*args)

        def gather_rows(x, idx, count, capacity):
            y = k.gather_rows(x, idx, count, capacity)
            y[int(count):] = float("nan")
            padding.append(capacity - int(count))
            return y

        return k._replace(gather_rows=gather_rows)

    monkeypatch.setattr(sample_gating, "resolved_kernels", nan_padding)
    torch.manual_seed(13)
    seq = chain(n_blocks=3, c=6, backend="cpu")
    seq.bucket = 4
    x = torch.randn(11, 6, 4, 4)
    policy = (torch.rand(11, 3) < 0.4).float()
    policy[:5, 0] = 1.0  # block 0 keeps at least 5: a padded batch
    sparse, masked = run_both(seq, x, policy)
    assert all(p < 4 for p in padding) and sum(padding) > 0  # NaN rows did enter the blocks
    assert torch.isfinite(sparse).all()
    assert_close(sparse, masked, rtol=RTOL)


@pytest.mark.parametrize("bucket,rows", [(None, [0, 3, 7, 10]), (4, [0, 4, 8, 10]), ([2, 3, 8], [0, 3, 8, 10]), ([2], [0, 10, 10, 10])])
def test_plan_rows_are_bucketed(bucket, rows):
    policy = torch.zeros(10, 4)
    for b, k in enumerate((0, 3, 7, 10)):
        policy[:k, b] = 1.0
    plan = SkipPlan(policy, bucket=bucket, backend="cpu")
    assert plan.kept == [0, 3, 7, 10]
    assert plan.rows == rows
    assert [plan[b].all_kept for b in range(4)] == [False, False, False, True]
    assert plan[0].none_kept and not plan[1].none_kept


def test_sequential_bucket_equals_masked_and_bounds_sizes():
    torch.manual_seed(14)
    seq = chain(n_blocks=4, c=6, backend="cpu")
    seq.bucket = 4
    seen = [record_batch_sizes(b.block) for b in seq.blocks]
    x = torch.randn(13, 6, 4, 4)
    policy = (torch.rand(13, 4) < 0.5).float()
    sparse, masked = run_both(seq, x, policy)
    assert_close(sparse, masked, rtol=RTOL)
    for s in seen:
        assert s[0] in bucket_sizes(4, 13)


def test_auto_bucket_is_exact_in_training_mode():
    """In training mode padding rows would enter BatchNorm's batch statistics: "auto" then
    runs exact counts, an explicit bucket is an error."""
    torch.manual_seed(15)
    block = TorchvisionBasicBlock(4, 4).train()
    auto = SkipBlock(block).train()
    gate = keep_exactly(6, 3)
    assert auto.plan(gate).rows == 3
    auto.eval()
    assert auto.plan(gate).rows == 3  # CPU tensors: "auto" is exact anyway
    padded = SkipBlock(block, bucket=4).train()
    with pytest.raises(RuntimeError, match="BatchNorm in training mode"):
        padded(torch.randn(6, 4, 3, 3), gate)
    seq = SkipSequential([SkipBlock(TorchvisionBasicBlock(4, 4))], bucket=4).train()
    with pytest.raises(RuntimeError, match="BatchNorm in training mode"):
        seq(torch.randn(6, 4, 3, 3), gate.unsqueeze(1))
    model = resnet32_cifar(bucket=4).train()
    with pytest.raises(RuntimeError, match="bucket=4 pads"):
        model(torch.randn(2, 3, 8, 8), torch.ones(2, 15))
    model = resnet32_cifar(bucket="auto").train()  # exact: trains
    model(torch.randn(2, 3, 8, 8), torch.ones(2, 15)).sum().backward()


def test_models_bucket_equals_masked():
    torch.manual_seed(16)
    model = resnet32_cifar(backend="cpu", bucket=[2, 4]).eval()
    x = torch.randn(5, 3, 16, 16)
    policy = (torch.rand(5, 15) < 0.5).float()
    model.execution = "sparse"
    sparse = model(x, policy)
    model.execution = "masked"
    assert_close(sparse, model(x, policy), rtol=RTOL)


def test_lnet_bucket_equals_masked():
    torch.manual_seed(17)
    lnet = resnet50(num_classes=10, backend="cpu", bucket=4).eval()
    x = torch.randn(5, 3, 32, 32)
    lnet.calibrate(x, 0.4)  # exactly 2 of the 5 samples keep each block
    seen = record_batch_sizes(lnet.blocks[3].skip.block)
    lnet.execution = "sparse"
    sparse = lnet(x)
    lnet.execution = "masked"
    assert_close(sparse, lnet(x), rtol=RTOL)
    assert seen == [4, 5]  # sparse: 2 kept, bucketed to 4; masked: all 5


BAD_BUCKETS = [0, -2, 2.5, True, [], [4, 2], [3, 3], [1, 0], "8"]


@pytest.mark.parametrize("bad", BAD_BUCKETS)
def test_bad_bucket_errors(bad):
    for make, owner in [
        (lambda: SkipBlock(nn.Identity(), bucket=bad), "SkipBlock"),
        (lambda: SkipPlan(torch.ones(3, 2), bucket=bad), "SkipPlan"),
        (lambda: SkipSequential([SkipBlock(nn.Identity())], bucket=bad), "SkipSequential"),
        (lambda: resnet32_cifar(bucket=bad), "BlockDropResNet"),
        (lambda: resnet50(num_classes=2, bucket=bad), "SkipBlock"),
    ]:
        with pytest.raises(ValueError, match=f"{owner}: bucket must"):
            make()


def test_capacity_and_bucket_exclude_each_other():
    for make, owner in [
        (lambda: SkipBlock(nn.Identity(), capacity=2, bucket=4), "SkipBlock"),
        (lambda: SkipPlan(torch.ones(3, 2), capacity=3, bucket=None), "SkipPlan"),
        (lambda: SkipSequential([SkipBlock(nn.Identity())], capacity=2, bucket=[2]), "SkipSequential"),
        (lambda: resnet32_cifar(capacity=2, bucket=8), "BlockDropResNet"),
    ]:
        with pytest.raises(ValueError, match=f"{owner}: give capacity .* or bucket .*, not both"):
            make()
    # capacity with the default bucket is fine: capacity decides
    assert SkipPlan(torch.ones(3, 2), capacity=3).rows == [3, 3]


def test_capacity_below_a_kept_count_is_an_error():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="SkipBlock: capacity=1 but a block keeps 2 samples"):
        SkipBlock(nn.Identity(), capacity=1)(x, keep_exactly(4, 2))
    with pytest.raises(ValueError, match="SkipPlan: capacity=2 but a block keeps 3 samples"):
        SkipPlan(torch.tensor([[1.0], [1.0], [1.0], [0.0]]), capacity=2)
    model = resnet32_cifar(capacity=1).eval()
    with pytest.raises(ValueError, match="capacity=1 but a block keeps 2 samples"):
        model(torch.randn(2, 3, 8, 8), torch.ones(2, 15))
