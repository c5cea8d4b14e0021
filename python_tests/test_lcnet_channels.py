"""LC-Net with C-Net: masked equals sparse for every variant, gates in range, block and channel
skipping together, the salience penalty, training, errors."""
import pytest
import torch
import torch.nn.functional as F
from _utils import assert_close

from dynkernels.models.lcnet import (
    ChannelGatedBranch, LCNetResNet, LCNetSaliences, leaky_relu1, lcnet_resnet18_cifar, lcnet_resnet50, relu1,
)

RTOL = 1e-4
VARIANTS = [(True, True), (True, False), (False, True)]  # (L-Net, C-Net)
MODELS = {
    "resnet18-cifar": (lambda **k: lcnet_resnet18_cifar(10, width=0.125, **k), 16),
    "resnet50": (lambda **k: lcnet_resnet50(10, **k), 32),
}


def trained_stats(model, size):
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size) * 2 + 0.5)
    return model.eval()


def both(model, fn):
    model.execution = "sparse"
    sparse = fn()
    model.execution = "masked"
    return sparse, fn()


CASES = [
    pytest.param(name, lnet, cnet, n, backend, id=f"{name}-{backend}-L{int(lnet)}C{int(cnet)}-N{n}")
    for name, backends in (("resnet18-cifar", ("torch", "cpu")), ("resnet50", ("cpu",)))
    for backend in backends
    for lnet, cnet in VARIANTS
    for n in (1, 5)
    if name == "resnet18-cifar" or n == 5 or (lnet and cnet)  # ResNet-50 is slow: N = 1 once
]


@pytest.mark.parametrize("name,lnet,cnet,n,backend", CASES)
def test_sparse_equals_masked(name, lnet, cnet, n, backend):
    make, size = MODELS[name]
    torch.manual_seed(0)
    model = trained_stats(make(lnet=lnet, cnet=cnet, backend=backend), size)
    x = torch.randn(n, 3, size, size)
    (sparse, s_sparse), (masked, s_masked) = both(model, lambda: model(x, return_saliences=True))
    assert_close(sparse, masked, rtol=RTOL)
    assert (s_sparse.blocks is None) == (not lnet) and (s_sparse.channels is None) == (not cnet)
    if lnet:
        assert_close(s_sparse.blocks, s_masked.blocks, rtol=RTOL)
        assert ((s_sparse.blocks >= 0) & (s_sparse.blocks <= 1)).all()  # ReLU-1 at inference
    if cnet:
        for a, b in zip(s_sparse.channels, s_masked.channels):
            assert_close(a, b, rtol=RTOL)
            assert ((a >= 0) & (a <= 1)).all()


def test_both_gates_skip_work_together():
    """Random gates skip some blocks and some channels; every sample sees both kinds of skip."""
    torch.manual_seed(3)
    model = trained_stats(lcnet_resnet18_cifar(10, width=0.25), 16)
    _, s = model(torch.randn(6, 3, 16, 16), return_saliences=True)
    assert 0 < (s.blocks == 0).float().mean() < 1
    zero_channels = torch.cat([(c == 0).float() for c in s.channels], 1).mean()
    assert 0 < zero_channels < 1


def test_zero_channel_salience_skips_the_channel():
    torch.manual_seed(0)
    model = trained_stats(lcnet_resnet18_cifar(10, width=0.125, lnet=False), 16)
    block = model.blocks[0]
    with torch.no_grad():
        block.cnet.fc.bias[:4] = -100.0  # channels 0..3 of the first conv: salience 0 for every sample
    x = torch.randn(3, 8, 16, 16)
    branch = block.body
    for execution in ("masked", "sparse"):
        branch.execution = execution
        branch.salience = block.cnet(x.mean((2, 3)))
        assert (branch.salience[:, :4] == 0).all()
        with torch.no_grad():
            b = branch.branch
            h = F.relu(b.bn1(b.conv1(x))) * branch.salience[:, :, None, None]
            assert_close(branch(x), b.bn2(b.conv2(h)), rtol=RTOL)
    branch.salience = None


def test_gates_in_training_are_leaky():
    model = lcnet_resnet18_cifar(10, width=0.125).train()
    x = torch.randn(4, 3, 16, 16)
    _, s = model(x, return_saliences=True)
    stem = model.maxpool(F.relu(model.bn1(model.conv1(x))))
    pooled = stem.mean((2, 3))
    block = model.blocks[0]
    assert torch.equal(s.blocks[:, 0], leaky_relu1(block.gate.fc(pooled).squeeze(1)))
    assert torch.equal(s.channels[0], leaky_relu1(block.cnet.fc(pooled)))
    model.eval()
    _, s = model(x, return_saliences=True)
    stem = model.maxpool(F.relu(model.bn1(model.conv1(x))))
    assert torch.equal(s.channels[0], relu1(block.cnet.fc(stem.mean((2, 3)))))


def test_salience_penalty():
    blocks = torch.tensor([[0.5, 0.0], [1.0, -0.5]])
    channels = [torch.tensor([[1.0, 0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5]])]
    s = LCNetSaliences(blocks, channels)
    assert s.l1(2.0, 3.0).item() == pytest.approx(2.0 * 0.5 + 3.0 * 0.5)
    assert LCNetSaliences(blocks, None).l1().item() == pytest.approx(0.5)
    assert LCNetSaliences(None, None).l1().item() == 0.0


def test_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = lcnet_resnet18_cifar(10, width=0.125)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(3):
        logits, s = model(x, return_saliences=True)
        loss = F.cross_entropy(logits, y) + s.l1(1e-3, 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.blocks[0].cnet.fc.weight.grad.abs().sum() > 0 and model.blocks[0].gate.fc.weight.grad.abs().sum() > 0


def test_dense_baseline_and_errors():
    plain = lcnet_resnet18_cifar(10, width=0.125, lnet=False, cnet=False).eval()
    logits, s = plain(torch.randn(2, 3, 16, 16), return_saliences=True)
    assert logits.shape == (2, 10) and s == LCNetSaliences(None, None)
    model = lcnet_resnet50(10)
    with pytest.raises(ValueError, match=r"x must be a \[N, 3, H, W\] tensor"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="execution must be one of"):
        model.execution = "dense"
    with pytest.raises(ValueError, match="backend must be one of"):
        lcnet_resnet18_cifar(backend="fast")
    with pytest.raises(ValueError, match="width must be a positive number"):
        lcnet_resnet18_cifar(width=-1)
    with pytest.raises(ValueError, match="stem must be"):
        LCNetResNet(None, [1], [8], "tiny", 10)
    branch = model.blocks[0].skip.block
    assert isinstance(branch, ChannelGatedBranch)
    with pytest.raises(ValueError, match="the salience must be set"):
        branch(torch.randn(2, 64, 8, 8))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_equals_masked_on_gpu_channels_last(dtype):
    """Unverified here (no GPU): SkipBlock and the channel-sparse kernel together on CUDA."""
    torch.manual_seed(0)
    model = trained_stats(lcnet_resnet18_cifar(10, width=0.25), 16).cuda().to(dtype)
    x = torch.randn(5, 3, 16, 16, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        sparse, masked = both(model, lambda: model(x))
    assert_close(sparse.float(), masked.float(), rtol=RTOL if dtype == torch.float32 else 0.05)
