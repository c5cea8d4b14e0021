"""fbs_convert: FBS gating added to the Conv2d + BatchNorm2d pairs of torchvision-style networks
(torchvision is not installed: small ResNet- and VGG-like models in its layout are built here)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _utils import assert_close

from dynkernels.models.fbs import cifarnet
from dynkernels.nn import FBSConv2d, fbs_convert

RTOL = 1e-4


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock's layout and forward."""

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """torchvision.models.ResNet's layout (conv1/bn1/relu/maxpool/layerN/avgpool/fc), 2 stages."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_vgg():
    """torchvision.models.vgg's layout with batch norm: features (conv, BN, ReLU, pool), classifier."""
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
        nn.Conv2d(12, 12, 3, padding="same"), nn.BatchNorm2d(12), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    return nn.Sequential(features, nn.Flatten(), nn.Linear(12 * 4 * 4, 5))


def trained(model, negative_scales=True):
    """Non-trivial BN statistics and scales, some of them negative."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(6, 3, 16, 16) * 2 + 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                if negative_scales:
                    m.weight[::3] *= -1
    return model.eval()


MODELS = {"resnet": TinyResNet, "vgg": tiny_vgg, "cifarnet": lambda: cifarnet(5, width=0.125)}


def set_execution(model, execution):
    for m in model.modules():
        if isinstance(m, FBSConv2d):
            m.execution = execution


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n", [1, 3])
def test_density_one_gives_the_original_output(name, n):
    model = trained(MODELS[name]())
    x = torch.randn(n, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    converted = fbs_convert(model, 1.0)
    assert converted is model
    fbs = [m for m in model.modules() if isinstance(m, FBSConv2d)]
    assert len(fbs) == len(weights) and not any(isinstance(m, nn.BatchNorm2d) and m.affine for m in model.modules())
    assert all(f.conv.weight is w for f, w in zip(fbs, weights))  # the same Parameter objects
    for execution in ("masked", "sparse"):
        set_execution(model, execution)
        with torch.no_grad():
            assert_close(model(x), expected, rtol=RTOL)


def test_zero_scale_channel_is_inactive():
    model = trained(tiny_vgg(), negative_scales=False)
    bn = model[0][1]
    with torch.no_grad():
        bn.weight[2] = 0.0
        bn.bias[2] = 0.0  # its output is the constant beta = 0 then: still exact
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    fbs_convert(model, 1.0)
    with torch.no_grad():
        out = model[0][0].forward_gated(x)
        assert (out.gate[:, 2] == 0).all() and (out.y[:, 2] == 0).all()
        assert_close(model(x), expected, rtol=RTOL)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_converted_masked_equals_sparse_below_density_one(backend):
    model = fbs_convert(trained(TinyResNet()), 0.5, backend=backend)
    fbs = [m for m in model.modules() if isinstance(m, FBSConv2d)]
    with torch.no_grad():  # fine-tuned predictors depend on the input
        for m in fbs:
            m.saliency.weight.normal_(0, 0.5)
    x = torch.randn(3, 3, 16, 16)
    outs = {}
    for execution in ("masked", "sparse"):
        set_execution(model, execution)
        with torch.no_grad():
            outs[execution] = model(x)
    assert_close(outs["sparse"], outs["masked"], rtol=RTOL)
    with torch.no_grad():
        gate = fbs[1].forward_gated(torch.randn(3, fbs[1].in_channels, 4, 4)).gate
    assert ((gate > 0).sum(1) == fbs[1].k).all()


def test_converted_model_fine_tunes():
    torch.manual_seed(0)
    model = fbs_convert(trained(tiny_vgg()), 0.5)
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 5, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(m.saliency.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, FBSConv2d))


def test_errors():
    for bad in (0.0, 1.01, -1, "1", None):
        with pytest.raises(ValueError, match=r"fbs_convert: density must be in \(0, 1\]"):
            fbs_convert(tiny_vgg(), bad)
    with pytest.raises(ValueError, match="has no Conv2d followed by a BatchNorm2d"):
        fbs_convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), 0.5)
    with pytest.raises(ValueError, match="has no Conv2d followed by a BatchNorm2d"):
        fbs_convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)), 0.5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fbs_convert("resnet", 0.5)
    with pytest.raises(ValueError, match="execution must be one of"):
        fbs_convert(tiny_vgg(), 0.5, execution="dense")
    model = fbs_convert(TinyResNet(), 0.5)
    with pytest.raises(ValueError, match=r"x must be \[N, 3, H, W\]"):
        model(torch.randn(2, 4, 16, 16))
