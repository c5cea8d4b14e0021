"""dynkernels.flops: the channel-sparse conv's FLOP formula and model_flops on every model
(dense = masked execution, executed = sparse execution, per sample), against hand counts."""
import pytest
import torch
import torch.nn as nn
from _utils import HAS_TRITON, needs_interpreter

import dynkernels
from dynkernels.flops import FlopCount, channel_sparse_conv2d_flops, count, model_flops
from dynkernels.models.blockdrop import BlockDrop, policy_net_cifar, resnet32_cifar
from dynkernels.models.fbs import cifarnet, fbs_cifarnet, fbs_resnet18, fbs_vgg16
from dynkernels.models.lcnet import lcnet_resnet18_cifar, lcnet_resnet50, resnet50
from dynkernels.nn import FBSConv2d, fbs_convert


def conv_flops(conv: nn.Conv2d, out_hw, cin=None, cout=None) -> int:
    kh, kw = conv.kernel_size
    return 2 * kh * kw * out_hw[0] * out_hw[1] * (cin or conv.in_channels) * (cout or conv.out_channels)


def conv_output_sizes(model, *args):
    """{conv module: its output's (H, W)} from one masked forward (every conv module runs)."""
    sizes = {}
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, tuple(o.shape[2:])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    was = model.execution
    model.execution = "masked"
    with torch.no_grad():
        model(*args)
    model.execution = was
    for h in hooks:
        h.remove()
    return sizes


def eval_stats(model, size, *extra):
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size), *extra)
    return model.eval()


# ----------------------------------------------------------------------------- the op's formula
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
@pytest.mark.parametrize("with_in_gate", [False, True])
def test_channel_sparse_conv_counts_active_triples(stride, padding, dilation, with_in_gate):
    x, w = torch.randn(3, 6, 11, 11), torch.randn(8, 6, 3, 3)
    out_gate = (torch.rand(3, 8) < 0.5).float() * torch.rand(3, 8)
    in_gate = (torch.rand(3, 6) < 0.5) if with_in_gate else None
    y = dynkernels.channel_sparse_conv2d(x, w, None, out_gate, in_gate, stride, padding, dilation, backend="cpu")
    ho, wo = y.shape[2:]
    ins = in_gate.sum(1) if with_in_gate else torch.full((3,), 6)
    expected = 2 * 9 * ho * wo * int(((out_gate > 0).sum(1) * ins).sum())
    assert count(dynkernels.channel_sparse_conv2d, x, w, None, out_gate, in_gate, stride, padding, dilation, backend="cpu") == expected
    assert count(dynkernels.channel_sparse_conv2d, x, w, None, torch.zeros(3, 8), in_gate, stride, padding, dilation) == 0


@pytest.mark.triton
@needs_interpreter
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_conv_carries_the_formula():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    out_gate, in_gate = (torch.rand(2, 6) < 0.5).float(), (torch.rand(2, 4) < 0.5).float()
    expected = 2 * 9 * 25 * int(((out_gate > 0).sum(1) * (in_gate > 0).sum(1)).sum())
    assert count(dynkernels.channel_sparse_conv2d, x, w, None, out_gate, in_gate, 1, 1, backend="triton") == expected


def test_formula_without_values_counts_every_triple():
    x, w = torch.empty(2, 4, 5, 5, device="meta"), torch.empty(6, 4, 3, 3, device="meta")
    out = torch.empty(2, 6, 3, 3, device="meta")
    flops = channel_sparse_conv2d_flops(x, w, None, torch.empty(2, 6, device="meta"), None, [1, 1], [0, 0], [1, 1], out_val=out)
    assert flops == 2 * 9 * 9 * 2 * 6 * 4


# ----------------------------------------------------------------------------- models
def test_plain_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    c = model_flops(model, torch.randn(3, 3, 8, 8))
    expected = 2 * 9 * 64 * 3 * 4 + 2 * 256 * 5
    assert c == FlopCount(expected, expected, c.per_sample) and c.per_sample.tolist() == [expected] * 3
    assert c.ratio == 1.0


def test_fbs_network_counts_the_winners_on_both_sides():
    torch.manual_seed(0)
    model = eval_stats(fbs_cifarnet(10, density=0.5, width=0.25), 16)
    x = torch.randn(3, 3, 16, 16)
    sizes = conv_output_sizes(model, x)
    layers = model.fbs_layers()
    gate_fcs = sum(2 * m.in_channels * m.out_channels for m in layers) + 2 * model.fc.in_features * 10
    dense = sum(conv_flops(m.conv, sizes[m.conv]) for m in layers) + gate_fcs
    c = model_flops(model, x)
    assert c.dense == dense
    for i in range(3):
        with torch.no_grad():
            _, gates = model(x[i:i + 1], return_gates=True)
        active = [3] + [int((g > 0).sum()) for g in gates]
        executed = sum(conv_flops(m.conv, sizes[m.conv], active[j], active[j + 1]) for j, m in enumerate(layers)) + gate_fcs
        assert c.per_sample[i] == executed
    assert c.ratio > 2.5  # about 4x on the chained convs (the first has a dense input)
    assert model_flops(model, x, per_sample=False).executed == pytest.approx(c.executed)
    assert model.execution == "sparse" and not model.training  # restored


@pytest.mark.parametrize("make,size", [
    (lambda: fbs_vgg16(10, head="cifar", width=0.125), 32),
    (lambda: fbs_resnet18(10, stem="cifar", width=0.125), 16),
])
def test_other_fbs_networks(make, size):
    model = eval_stats(make(), size)
    c = model_flops(model, torch.randn(2, 3, size, size))
    assert 1.5 < c.ratio < 4.0


def test_blockdrop_backbone_and_agent():
    torch.manual_seed(0)
    backbone = eval_stats(resnet32_cifar(), 32)
    x, policy = torch.randn(4, 3, 32, 32), (torch.rand(4, 15) < 0.5).float()
    c = model_flops(backbone, x, policy)
    assert c.dense == model_flops(backbone, x[:1], torch.ones(1, 15)).executed  # every block kept
    assert (c.per_sample < c.dense).all() and len(set(c.per_sample.tolist())) > 1  # (test_blockdrop counts them by hand)
    agent = BlockDrop(policy_net_cifar(15), backbone).eval()
    with torch.no_grad():
        kept, _ = agent.policy(x)
    c = model_flops(agent, x)
    policy_net = count(agent.policy_net, x[:1])
    assert c.per_sample.tolist() == (model_flops(backbone, x, kept).per_sample + policy_net).tolist()
    backbone.execution = "masked"
    model_flops(backbone, x, policy)
    assert backbone.execution == "masked"


def branch_flops(model, x):
    """FLOPs of each block's branch on x, each counted on the input it gets in a masked forward."""
    inputs = {}
    hooks = [b.skip.block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, b in enumerate(model.blocks)]
    model.execution = "masked"
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [count(b.skip.block, inputs[i]) for i, b in enumerate(model.blocks)]


def test_lnet_resnet50_counts_the_kept_blocks():
    model = resnet50(10, density=0.5, calibration_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    c = model_flops(model, x)
    s = model.saliences(x)
    per_block = branch_flops(model, x[:1])  # a dense branch costs the same for every sample
    for i in range(3):
        skipped = sum(f for f, si in zip(per_block, s[i]) if si == 0)
        assert c.per_sample[i] == c.dense - skipped
    assert c.executed < c.dense


def test_lcnet_counts_blocks_and_channels():
    torch.manual_seed(1)
    model = eval_stats(lcnet_resnet18_cifar(10, width=0.25), 16)
    x = torch.randn(3, 3, 16, 16)
    c = model_flops(model, x)
    sizes = conv_output_sizes(model, x)
    for i in range(3):
        with torch.no_grad():
            _, s = model(x[i:i + 1], return_saliences=True)
        saved = 0
        for b, block in enumerate(model.blocks):
            branch = block.skip.block.branch
            full = conv_flops(branch.conv1, sizes[branch.conv1]) + conv_flops(branch.conv2, sizes[branch.conv2])
            if s.blocks[0, b] == 0:
                saved += full  # the whole branch is skipped
            else:
                active = (s.channels[b][0] > 0).float().mean().item()
                saved += (1 - active) * full  # conv1's outputs and conv2's inputs
        assert c.per_sample[i].item() == pytest.approx(c.dense - saved, rel=1e-12)
    assert c.ratio > 1.0
    c50 = model_flops(eval_stats(lcnet_resnet50(10), 32), torch.randn(1, 3, 32, 32))
    assert c50.executed < c50.dense


def test_converted_model():
    model = eval_stats(cifarnet(10, width=0.25), 16)
    x = torch.randn(2, 3, 16, 16)
    original = count(model, x[:1])
    fbs_convert(model, 0.5)
    c = model_flops(model, x)
    fcs = sum(2 * m.in_channels * m.out_channels for m in model.modules() if isinstance(m, FBSConv2d))
    assert c.dense == original + fcs
    assert c.ratio > 2.5  # the input gates are inferred from the zero channels


def test_errors():
    with pytest.raises(ValueError, match="no tensor argument with a batch dimension"):
        model_flops(nn.Identity(), 3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        model_flops(lambda x: x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="the batch is empty"):
        model_flops(nn.Identity(), torch.randn(0, 3))
