"""ConvNet-AIG: sparse equals masked execution (deterministic and Gumbel gates, training
gradients), the original's parameter naming, one compact per block, and errors on bad input."""
import functools

import pytest
import torch
from _utils import (
    assert_all_close,
    assert_close,
    assert_loads,
    bn_keys,
    both_executions,
    count_compacts,
    frozen_bn,
    loss_grads,
    random_state,
    state_shapes,
    tame_bn,
)

import dynkernels
from dynkernels.models import convnet_aig

RTOL = 1e-4


def calibrated(model, x, density):
    tame_bn(model).calibrate(x, density)
    return model


def assert_outputs_equal(sparse, masked):
    assert_close(sparse.logits, masked.logits, rtol=RTOL)
    assert torch.equal(sparse.gates, masked.gates)


@functools.lru_cache(maxsize=None)
def tamed_resnet50(backend):
    """One network per backend for the tests below (each calibrates it anew)."""
    return tame_bn(convnet_aig.resnet50(num_classes=10, backend=backend))


# the compiled kernels at every density and N; the reference backend once
@pytest.mark.parametrize(
    "backend, n, density",
    [("cpu", n, d) for n in (1, 5) for d in (0.0, 0.5, 1.0)] + [("torch", 5, 0.5)],
)
def test_resnet50_sparse_equals_masked(backend, n, density):
    x = torch.randn(n, 3, 32, 32)  # small input: the pooling is global
    model = tamed_resnet50(backend)
    model.calibrate(x, density)
    sparse, masked = both_executions(model, lambda: model(x))
    assert_outputs_equal(sparse, masked)
    assert sparse.logits.shape == (n, 10) and sparse.gates.shape == (n, 16)
    assert (sparse.gates.sum(0) == round(density * n)).all()  # calibrated on x itself
    assert torch.equal(sparse.blocks_used, sparse.gates.sum(1).long())


def test_cifar_resnet110_channels_last():
    x = torch.randn(3, 3, 32, 32)
    model = calibrated(convnet_aig.resnet110_cifar(backend="cpu"), x, 0.5)
    sparse, masked = both_executions(model, lambda: model(x.contiguous(memory_format=torch.channels_last)))
    assert_outputs_equal(sparse, masked)
    assert sparse.gates.shape == (3, 54) and 0 < sparse.gates.mean() < 1


def test_gumbel_noise_modes():
    x = torch.randn(6, 3, 32, 32)
    model = calibrated(convnet_aig.resnet50(num_classes=10, backend="cpu"), x, 0.5)
    deterministic = model(x)
    assert torch.equal(model(x).gates, deterministic.gates)  # "train" (default): no noise in eval mode
    z = model.layer1[0].gate_logits(model.seed(x))
    assert torch.equal(deterministic.gates[:, 0], (z[:, 1] > z[:, 0]).float())
    model.gumbel_noise = "always"  # the original: noise at test time too
    sparse, masked = both_executions(model, lambda: model(x), seed=3)
    assert_outputs_equal(sparse, masked)
    assert not torch.equal(sparse.gates, deterministic.gates)
    assert set(sparse.gates.unique().tolist()) <= {0.0, 1.0}


def test_training_straight_through_gradients():
    """Sparse execution gives the straight-through gradient of the kept samples' gates; a
    skipped sample's is 0 (it needs F there). The reference is the masked execution with
    exactly that estimator, on the same Gumbel noise."""
    x = torch.randn(4, 3, 32, 32)
    model = frozen_bn(calibrated(convnet_aig.resnet50(num_classes=10, backend="cpu"), x, 0.5))
    loss = lambda out: out.logits.square().sum()  # noqa: E731
    model.execution = "sparse"
    torch.manual_seed(1)
    sparse, s_grads = loss_grads(model, x, loss)

    real_gate = model._gate

    def kept_only_straight_through(z):
        w = real_gate(z)
        return torch.where(w.detach() > 0, w, w.detach())

    model._gate = kept_only_straight_through  # instance attribute: this model only
    model.execution = "masked"
    torch.manual_seed(1)
    masked, m_grads = loss_grads(model, x, loss)
    assert_outputs_equal(sparse, masked)
    assert 0 < sparse.gates.mean() < 1 and sparse.gates.requires_grad
    assert_all_close(s_grads, m_grads, rtol=RTOL)
    assert model.layer3[2].fc2.weight.grad.abs().sum() > 0  # the gates are trained


def test_training_mode_with_batch_statistics():
    model = convnet_aig.resnet50(num_classes=10, backend="cpu").train()
    out = model(torch.randn(4, 3, 32, 32))
    out.logits.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_one_compact_per_block(monkeypatch):
    calls = count_compacts(monkeypatch)
    x = torch.randn(3, 3, 32, 32)
    model = tamed_resnet50("cpu")
    model.calibrate(x, 0.5)
    model.execution = "sparse"
    calls.clear()
    model(x)
    assert calls == [(3,)] * 16
    model.execution = "masked"
    calls.clear()
    model(x)
    assert calls == []


# ----------------------------------------------------------------------------- the original's naming
# Written from the original's convnet_aig.py (ResNet_ImageNet, ResNet_cifar, Bottleneck,
# BasicBlock), independently of our model code.
def original_keys(layers, bottleneck, num_classes, legacy=False):
    imagenet = bottleneck
    keys = {"conv1.weight": (64, 3, 7, 7) if imagenet else (16, 3, 3, 3)}
    bn_keys(keys, "bn1", 64 if imagenet else 16, legacy)
    in_planes, expansion = (64, 4) if bottleneck else (16, 1)
    widths = (64, 128, 256, 512) if imagenet else (16, 32, 64)
    for k, planes in enumerate(widths, start=1):
        out = planes * expansion
        for j in range(layers[k - 1]):
            stride = 2 if k > 1 and j == 0 else 1
            name = f"layer{k}.{j}"
            if bottleneck:
                keys[f"{name}.conv1.weight"] = (planes, in_planes, 1, 1)
                keys[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
                keys[f"{name}.conv3.weight"] = (out, planes, 1, 1)
                for i, c in ((1, planes), (2, planes), (3, out)):
                    bn_keys(keys, f"{name}.bn{i}", c, legacy)
            else:
                keys[f"{name}.conv1.weight"] = (planes, in_planes, 3, 3)
                keys[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
                bn_keys(keys, f"{name}.bn1", planes, legacy)
                bn_keys(keys, f"{name}.bn2", planes, legacy)
            if stride != 1 or in_planes != out:
                keys[f"{name}.shortcut.0.weight"] = (out, in_planes, 1, 1)
                bn_keys(keys, f"{name}.shortcut.1", out, legacy)
            keys[f"{name}.fc1.weight"] = (16, in_planes, 1, 1)
            keys[f"{name}.fc1.bias"] = (16,)
            bn_keys(keys, f"{name}.fc1bn", 16, legacy)
            keys[f"{name}.fc2.weight"] = (2, 16, 1, 1)
            keys[f"{name}.fc2.bias"] = (2,)
            in_planes = out
    keys["linear.weight"] = (num_classes, in_planes)
    keys["linear.bias"] = (num_classes,)
    return keys


CASES = {
    "resnet50": (lambda: convnet_aig.resnet50(), original_keys([3, 4, 6, 3], True, 1000)),
    "resnet101": (lambda: convnet_aig.resnet101(), original_keys([3, 4, 23, 3], True, 1000)),
    "resnet110-cifar": (lambda: convnet_aig.resnet110_cifar(), original_keys([18, 18, 18], False, 10)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_original_naming(name):
    make, keys = CASES[name]
    assert state_shapes(make) == keys


def test_loads_original_state():
    # PyTorch 0.3 checkpoints: no num_batches_tracked
    assert_loads(convnet_aig.resnet110_cifar(), random_state(original_keys([18, 18, 18], False, 10, legacy=True)))


def test_load_original_checkpoint():
    model = convnet_aig.resnet50()
    state = random_state(original_keys([3, 4, 6, 3], True, 1000))
    model.load_original_checkpoint({"state_dict": {"module." + k: v for k, v in state.items()}, "best_prec1": 70.0})
    assert torch.equal(model.layer4[2].fc2.bias, state["layer4.2.fc2.bias"])


def test_initial_opening_rate():
    """The original initialises the gates to open for about 85% of the samples (fc2 bias
    (0.1, 2), weights of std 0.001): untrained, every block runs."""
    model = convnet_aig.resnet50(num_classes=10).eval()
    assert model(torch.randn(2, 3, 32, 32)).gates.min() == 1
    assert torch.equal(model.layer2[1].fc2.bias.data, torch.tensor([0.1, 2.0]))


def test_bad_input_errors():
    model = convnet_aig.resnet50(num_classes=10)
    with pytest.raises(ValueError, match=r"x must be a \[N, 3, H, W\] tensor"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"x must be a \[N, 3, H, W\] tensor"):
        model(torch.randn(2, 4, 64, 64))
    with pytest.raises(ValueError, match="execution must be one of"):
        model.execution = "dense"
    with pytest.raises(ValueError, match="gumbel_noise must be one of"):
        model.gumbel_noise = "never"
    with pytest.raises(ValueError, match="backend must be one of"):
        convnet_aig.resnet50(backend="gpu")
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        model.calibrate(torch.randn(2, 3, 64, 64), -0.1)
