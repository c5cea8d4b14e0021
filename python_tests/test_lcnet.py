"""LC-Net L-Net ResNet: masked equals sparse (outputs and gradients), gates, calibration."""
import pytest
import torch
from _utils import assert_close

from dynkernels.models.lcnet import leaky_relu1, relu1, resnet50

RTOL = 1e-4


def both(model, fn):
    model.execution = "sparse"
    sparse = fn()
    model.execution = "masked"
    return sparse, fn()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_sparse_equals_masked(backend, density):
    model = resnet50(num_classes=10, density=density, backend=backend, calibration_size=32).eval()
    x = torch.randn(6, 3, 32, 32)
    sparse, masked = both(model, lambda: model(x))
    assert_close(sparse, masked, rtol=RTOL)
    used = (model.saliences(x) != 0).float().mean().item()
    if density in (0.0, 1.0):
        assert used == density
    else:
        assert 0.0 < used < 1.0


def test_calibration_hits_the_density_on_its_batch():
    model = resnet50(num_classes=10, backend="cpu").eval()
    x = torch.randn(8, 3, 32, 32)
    model.calibrate(x, 0.25)
    s = model.saliences(x)
    assert ((s != 0).sum(0) == 2).all()  # 2 of 8 samples keep every block


def test_gradients_equal_masked():
    torch.manual_seed(0)
    model = resnet50(num_classes=10, density=0.5, backend="cpu", calibration_size=32).eval()
    x = torch.randn(4, 3, 32, 32)
    grads = {}
    for execution in ("sparse", "masked"):
        model.execution = execution
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        model(xi).square().sum().backward()
        grads[execution] = [xi.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    for a, b in zip(grads["sparse"], grads["masked"]):
        assert_close(a, b, rtol=RTOL)


def test_gates():
    z = torch.tensor([-2.0, 0.0, 0.5, 1.0, 3.0])
    assert relu1(z).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert torch.allclose(leaky_relu1(z), torch.tensor([-0.02, 0.0, 0.5, 1.0, 1.02]))
    model = resnet50(num_classes=10)
    x = torch.randn(2, 64, 8, 8)
    gate = model.blocks[0].gate
    assert torch.equal(gate.train()(x), leaky_relu1(gate.fc(x.mean((2, 3))).squeeze(1)))
    assert torch.equal(gate.eval()(x), relu1(gate.fc(x.mean((2, 3))).squeeze(1)))


def test_errors():
    model = resnet50(num_classes=10)
    with pytest.raises(ValueError, match=r"x must be a \[N, 3, H, W\] tensor"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="execution must be one of"):
        model.execution = "dense"
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        model.calibrate(torch.randn(2, 3, 32, 32), 1.5)
