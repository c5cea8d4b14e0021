"""Sparse execution under torch.autocast("cpu") in bfloat16 and float16: the masked (papers')
execution's result under the same autocast, within the dtype's tolerance, in the dtype autocast
gives it.

channel_sparse_conv2d runs its operands in the autocast dtype, as conv2d does there (so the C++
kernel and CPU dense execution give one dtype); a sample-gated block whose result comes in the
autocast dtype while its shortcut does not (an identity shortcut of a float32 input) is merged
in the promoted dtype, as masked execution's arithmetic promotes. Decisions that depend on the
data (SkipNet's gates, MSDNet's exits) are compared too: they must come out the same; FBS's
k winners may differ only where two saliencies tie within the dtype's rounding.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _utils import RTOL, assert_close, both_executions, tame_bn

from dynkernels.models import msdnet, skipnet
from dynkernels.models.blockdrop import BasicBranch, BlockDropResNet
from dynkernels.models.fbs import fbs_cifarnet
from dynkernels.models.lcnet import lcnet_resnet18_cifar
from dynkernels.models.spottune import SpotTuneResNet
from dynkernels.nn import FBSConv2d, GatedConv2d, RouteBlock, SkipBlock

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# A whole network accumulates one rounding per layer in both executions: a few times one layer's.
MODEL_RTOL = {torch.bfloat16: 4 * RTOL[torch.bfloat16], torch.float16: 4 * RTOL[torch.float16]}


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype)


def run_both(module, dtype, call):
    """(sparse, masked) results of call() under autocast, no grad."""
    with torch.no_grad(), autocast(dtype):
        return both_executions(module, call)


def conv_block(c=8):
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_gated_conv(dtype, backend):
    """The gated forward against nn.Conv2d's autocast result times the gate, from float32 and
    from autocast-dtype inputs (what the previous autocast layer gives)."""
    conv = GatedConv2d(8, 12, 3, padding=1, backend=backend).eval()
    gate = torch.rand(5, 12) * (torch.rand(5, 12) > 0.5)
    in_gate = (torch.rand(5, 8) > 0.3).float()
    for x in (torch.randn(5, 8, 7, 7), torch.randn(5, 8, 7, 7).to(dtype)):
        with torch.no_grad(), autocast(dtype):
            y = conv(x, gate, in_gate)
            dense = conv(x * in_gate[:, :, None, None].to(x.dtype))
        masked = dense.float() * gate[:, :, None, None]
        assert y.dtype == dtype == dense.dtype
        assert_close(y.float(), masked, dtype=dtype)
        assert torch.all(y[gate == 0] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fbs_conv(dtype):
    fbs = tame_bn(FBSConv2d(8, 12, 3, padding=1, density=0.5))
    x = torch.randn(4, 8, 6, 6)
    sparse, masked = run_both(fbs, dtype, lambda: fbs.forward_gated(x))
    assert torch.equal(sparse.gate > 0, masked.gate > 0)
    assert sparse.y.dtype == masked.y.dtype == dtype
    assert_close(sparse.y, masked.y, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_skip_block(dtype, scaled):
    """A float32 input with an identity shortcut: the block's result comes in the autocast
    dtype, the merge in the promoted float32 (as in masked execution); also with every sample
    kept (no gather) and a fixed capacity."""
    x = torch.randn(6, 8, 5, 5)
    for gate, capacity in ((torch.tensor([0.5, 0, 1, 0, 0.25, 1]), None), (torch.ones(6), None),
                           (torch.tensor([0, 0.5, 0, 0, 1, 0]), 3)):
        block = SkipBlock(conv_block(), scaled=scaled, capacity=capacity).eval()
        sparse, masked = run_both(block, dtype, lambda: block(x, gate))
        assert sparse.dtype == masked.dtype == torch.float32
        assert_close(sparse, masked, rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_block(dtype):
    block = RouteBlock([conv_block(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)]).eval()
    x, choice = torch.randn(7, 8, 5, 5), torch.tensor([0, 2, 1, 1, 0, 2, 0])
    sparse, masked = run_both(block, dtype, lambda: block(x, choice))
    assert sparse.dtype == masked.dtype == dtype
    assert_close(sparse, masked, dtype=dtype)


# ----------------------------------------------------------------------------- models
def blockdrop_case():
    model = tame_bn(BlockDropResNet(BasicBranch, [2, 2, 2], [8, 16, 16], [1, 2, 2], "cifar", 10))
    x, policy = torch.randn(5, 3, 16, 16), (torch.rand(5, 6) < 0.5).float()
    return model, lambda: model(x, policy)


def spottune_case():
    model = tame_bn(SpotTuneResNet((1, 1, 1), num_classes=10))
    x, policy = torch.randn(5, 3, 16, 16), (torch.rand(5, 3) < 0.5).float()
    return model, lambda: model(x, policy)


def fbs_case():
    model = tame_bn(fbs_cifarnet(width=0.125, density=0.5))
    x = torch.randn(16, 3, 16, 16)
    return model, lambda: model(x, return_gates=True)


def lcnet_case():
    model = tame_bn(lcnet_resnet18_cifar(width=0.125, num_classes=10))
    for block in model.blocks[::2]:  # every other block skipped by some samples
        nn.init.normal_(block.gate.fc.bias, 0.0, 0.5)
    x = torch.randn(5, 3, 16, 16)
    return model, lambda: model(x)


def skipnet_case():
    model = tame_bn(skipnet.resnet38_cifar(num_classes=10))
    x = torch.randn(5, 3, 32, 32)
    model.calibrate(x, 0.5)
    return model, lambda: model(x)


def msdnet_case():
    torch.manual_seed(0)
    model = tame_bn(msdnet.msdnet_cifar(10, n_blocks=3, base=1, step=1, n_channels=8, growth_rate=4))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        model.thresholds = msdnet.thresholds_for_fractions(msdnet.exit_confidences(model, x), [0.3, 0.3])
    return model, lambda: model(x)


def fbs_rows_with_the_same_winners(sparse_gates, masked_gates, dtype):
    """The samples whose k winners are the same in every FBS layer of both executions. The two
    round differently in the autocast dtype, so a layer's input differs by about one rounding
    between them, and a k-winners-take-all can swap two channels whose saliencies (nearly) tie:
    where a sample's winners first differ, the saliencies that swapped must agree within the
    dtype's tolerance; such a sample's later layers and logits are not compared. (In bfloat16,
    1 of these 16 samples swapped a pair under torch 2.14, 6 under torch 2.11: each a different
    random network.) At least half must agree."""
    same = torch.ones(sparse_gates[0].shape[0], dtype=torch.bool)
    for gs, gm in zip(sparse_gates, masked_gates):
        gs, gm = gs.float(), gm.float()
        for n in (((gs > 0) != (gm > 0)).any(1) & same).nonzero().flatten().tolist():
            only_sparse = gs[n][(gs[n] > 0) & (gm[n] == 0)].sort().values
            only_masked = gm[n][(gm[n] > 0) & (gs[n] == 0)].sort().values
            tol = 4 * RTOL[dtype] * gm[n].max().item()
            assert only_sparse.shape == only_masked.shape and torch.allclose(only_sparse, only_masked, rtol=0, atol=tol), (
                f"sample {n}: winners {only_sparse.tolist()} (sparse) and {only_masked.tolist()} (masked) are no near-tie")
            same[n] = False
    assert same.sum() >= same.numel() / 2, f"only {same.sum()} of {same.numel()} samples kept their winners"
    return same


CASES = {"blockdrop": blockdrop_case, "spottune": spottune_case, "fbs": fbs_case, "lcnet": lcnet_case,
         "skipnet": skipnet_case, "msdnet": msdnet_case}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", list(CASES))
def test_models(family, dtype):
    model, call = CASES[family]()
    sparse, masked = run_both(model, dtype, call)
    if family == "skipnet":
        assert torch.equal(sparse.masks, masked.masks)
        sparse, masked = sparse.logits, masked.logits
    elif family == "msdnet":
        assert torch.equal(sparse[1], masked[1])  # the same exit for every sample
        sparse, masked = sparse[0], masked[0]
    elif family == "fbs":
        rows = fbs_rows_with_the_same_winners(sparse[1], masked[1], dtype)
        sparse, masked = sparse[0][rows], masked[0][rows]
    assert sparse.dtype == masked.dtype
    assert_close(sparse.float(), masked.float(), rtol=MODEL_RTOL[dtype])
