"""GatedConv2d is a drop-in nn.Conv2d; its gated forward follows channel_sparse_conv2d; convert()."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynkernels
from dynkernels import reference
from dynkernels.nn import GatedConv2d, convert, fbs_gate

from _utils import assert_close, device_backends, rand_gate

CONV_KWARGS = [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, groups=2),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding="same"),
]


@pytest.mark.parametrize("kwargs", CONV_KWARGS, ids=range(len(CONV_KWARGS)))
def test_ungated_forward_equals_conv2d_and_state_dict_round_trips(kwargs):
    conv = nn.Conv2d(**kwargs)
    gated = GatedConv2d(**kwargs)
    assert isinstance(gated, nn.Conv2d)
    assert gated.state_dict().keys() == conv.state_dict().keys()
    gated.load_state_dict(conv.state_dict())
    x = torch.randn(2, kwargs["in_channels"], 9, 8)
    assert torch.equal(gated(x), conv(x))
    back = nn.Conv2d(**kwargs)
    back.load_state_dict(gated.state_dict())
    assert torch.equal(back(x), conv(x))


def test_from_conv_shares_parameters():
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2).double()
    gated = GatedConv2d.from_conv(conv)
    assert gated.weight is conv.weight and gated.bias is conv.bias
    assert (gated.stride, gated.padding, gated.dilation, gated.groups) == (conv.stride, conv.padding, conv.dilation, 1)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    assert torch.equal(gated(x), conv(x))
    with torch.no_grad():
        conv.weight.mul_(2)
    assert torch.equal(gated(x), conv(x))
    nobias = GatedConv2d.from_conv(nn.Conv2d(3, 2, 1, bias=False))
    assert nobias.bias is None
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        GatedConv2d.from_conv(nn.Linear(2, 2))


@pytest.mark.parametrize("device,backend", device_backends())
def test_gated_forward_follows_contract(device, backend):
    torch.manual_seed(1)
    gated = GatedConv2d(4, 6, 3, stride=2, padding=1, backend=backend).to(device)
    x = torch.randn(2, 4, 7, 6, device=device)
    gate, in_gate = rand_gate((2, 6), 0.5, device), rand_gate((2, 4), 0.5, device)
    want = reference.channel_sparse_conv2d(x, gated.weight, gated.bias, gate, in_gate, 2, 1, 1)
    assert_close(gated(x, gate, in_gate), want)
    want = reference.channel_sparse_conv2d(x, gated.weight, gated.bias, gate, None, 2, 1, 1)
    assert_close(gated(x, gate), want)
    # Gradients reach the parameters through the gated path.
    gated(x, gate, in_gate).sum().backward()
    assert gated.weight.grad is not None and gated.bias.grad is not None


def test_gated_forward_padding_strings():
    x, gate = torch.randn(2, 3, 6, 6), rand_gate((2, 4), 0.5)
    same = GatedConv2d(3, 4, 3, padding="same")
    assert_close(same(x, gate), reference.channel_sparse_conv2d(x, same.weight, same.bias, gate, None, 1, 1, 1))
    valid = GatedConv2d(3, 4, 3, padding="valid")
    assert_close(valid(x, gate), reference.channel_sparse_conv2d(x, valid.weight, valid.bias, gate, None, 1, 0, 1))


def test_gated_forward_rejects_unsupported_modules():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="groups=1"):
        GatedConv2d(4, 4, 3, groups=2)(x, torch.ones(1, 4))
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        GatedConv2d(4, 2, 3, padding=1, padding_mode="circular")(x, torch.ones(1, 2))
    with pytest.raises(ValueError, match="asymmetrically"):
        GatedConv2d(4, 2, 4, padding="same")(x, torch.ones(1, 2))
    with pytest.raises(ValueError, match="in_gate was given without gate"):
        GatedConv2d(4, 2, 3)(x, None, torch.ones(1, 4))
    with pytest.raises(ValueError, match="out_gate must be"):
        GatedConv2d(4, 2, 3)(x, torch.ones(1, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        GatedConv2d(4, 2, 3, backend="cudnn")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.depthwise(self.body(self.stem(x))).mean((2, 3)))


def test_convert_swaps_convs_and_keeps_outputs():
    model = _Net().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = model(x)
    params = {name: p for name, p in model.named_parameters()}
    out = convert(model, backend="cpu")
    assert out is model
    assert type(model.stem) is GatedConv2d and type(model.body[1]) is GatedConv2d
    assert type(model.depthwise) is nn.Conv2d, "groups != 1 is left alone by default"
    assert model.stem.backend == "cpu"
    for name, p in model.named_parameters():
        assert p is params[name], f"{name} is not the same Parameter after convert"
    assert model.stem.weight.dtype == torch.float64 and not model.training
    assert torch.equal(model(x), before)
    # A gated call on a converted conv follows the contract.
    gate = rand_gate((2, 8), 0.5, dtype=torch.float64)
    assert_close(model.stem(x, gate), reference.channel_sparse_conv2d(x, model.stem.weight, model.stem.bias, gate, None, 1, 1, 1))


def test_convert_filter_and_single_conv():
    model = _Net()
    convert(model, filter=lambda name, conv: name == "body.1")
    assert type(model.stem) is nn.Conv2d and type(model.body[1]) is GatedConv2d
    single = nn.Conv2d(2, 3, 1)
    converted = convert(single)
    assert type(converted) is GatedConv2d and converted.weight is single.weight
    with pytest.raises(ValueError, match="backend must be one of"):
        convert(_Net(), backend="fast")


def test_fbs_gate_keeps_top_k():
    torch.manual_seed(2)
    fc = nn.Linear(4, 10)
    x = torch.randn(3, 4, 5, 5)
    g = fbs_gate(x, fc, 0.35)
    saliency = F.relu(fc(x.mean((2, 3))))
    k = math.ceil(0.35 * 10)
    assert ((g != 0).sum(1) <= k).all()
    top = saliency.topk(k, dim=1)
    assert torch.equal(g.gather(1, top.indices), top.values)
    assert torch.equal(fbs_gate(x, fc, 1.0), saliency)
    with pytest.raises(ValueError, match="density must be in"):
        fbs_gate(x, fc, 0.0)
