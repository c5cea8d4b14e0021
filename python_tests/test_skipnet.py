"""SkipNet: sparse equals masked execution (eval and every training gating), the original's
parameter naming, calibration, one compact per gated block, FLOPs, and errors on bad input."""
import copy
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
from torch.utils.flop_counter import FlopCounterMode

import dynkernels
from dynkernels.models import skipnet

RTOL = 1e-4


def calibrated(model, x, density):
    tame_bn(model).calibrate(x, density)
    return model


def assert_outputs_equal(sparse, masked):
    assert_close(sparse.logits, masked.logits, rtol=RTOL)
    if ((masked.masks == 0) | (masked.masks == 1)).all():
        assert torch.equal(sparse.masks, masked.masks)  # 0/1 decisions: identical
    else:  # soft masks are the gates' probabilities: equal up to the executions' rounding
        assert_close(sparse.masks, masked.masks, rtol=RTOL)
    assert_close(sparse.probs, masked.probs, rtol=RTOL)


@functools.lru_cache(maxsize=None)
def tamed_resnet38(backend):
    """One network per backend for the tests below (each calibrates it anew)."""
    return tame_bn(skipnet.resnet38_cifar(num_classes=100, backend=backend))


# the compiled kernels at every density and N; the reference backend once
@pytest.mark.parametrize(
    "backend, n, density",
    [("cpu", n, d) for n in (1, 5) for d in (0.0, 0.5, 1.0)] + [("torch", 5, 0.5)],
)
def test_sparse_equals_masked(backend, n, density):
    x = torch.randn(n, 3, 32, 32)
    model = tamed_resnet38(backend)
    model.calibrate(x, density)
    sparse, masked = both_executions(model, lambda: model(x))
    assert_outputs_equal(sparse, masked)
    assert sparse.logits.shape == (n, 100) and sparse.masks.shape == (n, 17)
    assert (sparse.masks.sum(0) == round(density * n)).all()  # calibrated on x itself
    assert torch.equal(sparse.blocks_used, 1 + sparse.masks.sum(1).long())


def test_resnet110_sparse_equals_masked():
    x = torch.randn(3, 3, 32, 32)
    model = calibrated(skipnet.resnet110_cifar(backend="cpu"), x, 0.5)
    sparse, masked = both_executions(model, lambda: model(x))
    assert_outputs_equal(sparse, masked)
    assert sparse.masks.shape == (3, 53) and 0 < sparse.masks.mean() < 1


def test_resnet38_ffgate1_channels_last_and_noncontiguous():
    x = torch.randn(3, 3, 32, 32)
    model = calibrated(skipnet.resnet38_cifar(backend="cpu"), x, 0.5)
    model.execution = "masked"
    reference = model(x)
    for xi in (x.contiguous(memory_format=torch.channels_last), torch.randn(3, 3, 32, 64)[..., ::2].copy_(x)):
        sparse, masked = both_executions(model, lambda: model(xi))
        assert_outputs_equal(sparse, masked)
        assert_close(sparse.logits, reference.logits, rtol=RTOL)


@pytest.mark.parametrize("n", [1, 3])
def test_resnet101_recurrent_gate_sparse_equals_masked(n):
    model = tame_bn(skipnet.resnet101_imagenet(num_classes=7, backend="cpu"))
    model.control.proj.bias.data.fill_(0.0)  # keep probabilities around 0.5: both decisions occur
    x = torch.randn(n, 3, 64, 64)  # small input: the pooling is global
    sparse, masked = both_executions(model, lambda: model(x))
    assert_outputs_equal(sparse, masked)
    assert sparse.masks.shape == (n, 32)


def test_cifar_recurrent_gate():
    x = torch.randn(4, 3, 32, 32)
    model = tame_bn(skipnet.resnet38_cifar(gate="rnn", backend="cpu"))
    sparse, masked = both_executions(model, lambda: model(x))
    assert_outputs_equal(sparse, masked)
    with pytest.raises(ValueError, match="only feed-forward gates can be calibrated"):
        model.calibrate(x, 0.5)


# ----------------------------------------------------------------------------- training
def grads_of(model, x):
    return loss_grads(model, x, lambda out: out.logits.square().sum())


@pytest.mark.parametrize("gating", ["soft", "sample"])
def test_training_gradients_equal_masked(gating):
    x = torch.randn(6, 3, 32, 32)
    model = frozen_bn(calibrated(skipnet.resnet38_cifar(gating=gating, backend="cpu"), x, 0.5))
    (s_out, s_grads), (m_out, m_grads) = both_executions(model, lambda: grads_of(model, x), seed=0)
    assert_outputs_equal(s_out, m_out)
    if gating == "soft":
        assert ((s_out.masks > 0) & (s_out.masks < 1)).all()  # soft masks: every block runs
    else:
        assert set(s_out.masks.unique().tolist()) == {0.0, 1.0}
    assert_all_close(s_grads, m_grads, rtol=RTOL)
    trained = model.group2_gate3.linear_layer.weight.grad is not None
    assert trained == (gating == "soft")  # sampled masks carry no gradient


def test_hard_gating_straight_through_gradients():
    """Sparse execution gives the straight-through gradient of the kept samples' masks; a
    skipped sample's is 0 (it needs the block's output there). The reference is the masked
    execution with exactly that estimator."""
    x = torch.randn(6, 3, 32, 32)
    model = frozen_bn(calibrated(skipnet.resnet38_cifar(gating="hard", backend="cpu"), x, 0.5))
    model.execution = "sparse"
    sparse, s_grads = grads_of(model, x)

    def kept_only_straight_through(p):
        hard = (p > 0.5).to(p.dtype)
        return hard + hard * (p - p.detach())

    model._mask = kept_only_straight_through  # instance attribute: this model only
    model.execution = "masked"
    masked, m_grads = grads_of(model, x)
    assert_outputs_equal(sparse, masked)
    assert set(sparse.masks.unique().tolist()) == {0.0, 1.0}
    assert_all_close(s_grads, m_grads, rtol=RTOL)
    assert model.group2_gate3.linear_layer.weight.grad.abs().sum() > 0  # the gates are trained


def test_training_mode_with_batch_statistics():
    x = torch.randn(8, 3, 32, 32)
    model = calibrated(skipnet.resnet38_cifar(backend="cpu"), x, 0.5).train()
    out = model(x)
    out.logits.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert out.masks.requires_grad  # the straight-through masks


# ----------------------------------------------------------------------------- cost
def test_one_compact_per_gated_block(monkeypatch):
    calls = count_compacts(monkeypatch)
    x = torch.randn(3, 3, 32, 32)
    model = calibrated(skipnet.resnet38_cifar(backend="cpu"), x, 0.5)
    calls.clear()
    model(x)
    assert calls == [(3,)] * 17  # 18 blocks, the first always runs
    model.execution = "masked"
    calls.clear()
    model(x)
    assert calls == []


def conv_flops(model, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_masked_runs_every_block_and_sparse_only_the_kept():
    x = torch.randn(4, 3, 32, 32)
    model = calibrated(skipnet.resnet38_cifar(backend="cpu"), x, 1.0)
    model.execution = "masked"
    dense = conv_flops(model, x)
    model.execution = "sparse"
    assert conv_flops(model, x) == dense
    model.calibrate(x, 0.5)
    model.execution = "masked"
    assert conv_flops(model, x) == dense
    model.execution = "sparse"
    half = conv_flops(model, x)
    model.calibrate(x, 0.0)
    none = conv_flops(model, x)  # stem, first block, gates, downsamples, fc
    assert none < half < dense
    assert half - none == pytest.approx((dense - none) / 2, rel=0.02)  # 2 of 4 samples keep each block


# ----------------------------------------------------------------------------- the original's naming
# Written from the original's cifar/models.py and imagenet/models.py (ResNetFeedForwardSP,
# ResNetRecurrentGateSP, RecurrentGatedResNet and their RL twins, which have the same
# parameters), independently of our model code.
def _downsample(keys, prefix, cin, cout, legacy):
    keys[f"{prefix}.0.weight"] = (cout, cin, 1, 1)
    bn_keys(keys, f"{prefix}.1", cout, legacy)


def original_keys(layers, num_classes, gate, imagenet=False, legacy=False):
    keys = {"conv1.weight": (64, 3, 7, 7) if imagenet else (16, 3, 3, 3)}
    bn_keys(keys, "bn1", 64 if imagenet else 16, legacy)
    inplanes, expansion = (64, 4) if imagenet else (16, 1)
    widths = (64, 128, 256, 512) if imagenet else (16, 32, 64)
    for g, planes in enumerate(widths, start=1):
        out = planes * expansion
        for i in range(layers[g - 1]):
            stride = 2 if g > 1 and i == 0 else 1
            layer = f"group{g}_layer{i}"
            if imagenet:
                keys[f"{layer}.conv1.weight"] = (planes, inplanes, 1, 1)
                keys[f"{layer}.conv2.weight"] = (planes, planes, 3, 3)
                keys[f"{layer}.conv3.weight"] = (out, planes, 1, 1)
                for j, c in ((1, planes), (2, planes), (3, out)):
                    bn_keys(keys, f"{layer}.bn{j}", c, legacy)
            else:
                keys[f"{layer}.conv1.weight"] = (planes, inplanes, 3, 3)
                keys[f"{layer}.conv2.weight"] = (planes, planes, 3, 3)
                bn_keys(keys, f"{layer}.bn1", planes, legacy)
                bn_keys(keys, f"{layer}.bn2", planes, legacy)
            if stride != 1 or inplanes != out:  # one module, registered twice
                _downsample(keys, f"group{g}_ds{i}", inplanes, out, legacy)
                _downsample(keys, f"{layer}.downsample", inplanes, out, legacy)
            gate_name = f"group{g}_gate{i}"
            if gate == "rnn":
                keys[f"{gate_name}.1.weight"] = (10, out, 1, 1)
                keys[f"{gate_name}.1.bias"] = (10,)
            else:
                keys[f"{gate_name}.conv1.weight"] = (out, out, 3, 3)
                bn_keys(keys, f"{gate_name}.bn1", out, legacy)
                if gate == "ffgate1":
                    keys[f"{gate_name}.conv2.weight"] = (out, out, 3, 3)
                    bn_keys(keys, f"{gate_name}.bn2", out, legacy)
                keys[f"{gate_name}.linear_layer.weight"] = (2, out, 1, 1)
                keys[f"{gate_name}.linear_layer.bias"] = (2,)
            inplanes = out
    if gate == "rnn":
        keys.update({"control.rnn.weight_ih_l0": (40, 10), "control.rnn.weight_hh_l0": (40, 10),
                     "control.rnn.bias_ih_l0": (40,), "control.rnn.bias_hh_l0": (40,),
                     "control.proj.weight": (1, 10, 1, 1) if imagenet else (1, 10), "control.proj.bias": (1,)})
    keys["fc.weight"] = (num_classes, inplanes)
    keys["fc.bias"] = (num_classes,)
    return keys


def original_state(keys):
    """Random values for keys, equal for the two names of each downsample (one module)."""
    state = random_state(keys)
    for k in state:
        if "_ds" in k:
            group, rest = k.split("_ds")
            i, param = rest.split(".", 1)
            state[f"{group}_layer{i}.downsample.{param}"] = state[k]
    return state


CASES = {
    "resnet38": (lambda: skipnet.resnet38_cifar(), original_keys([6, 6, 6], 10, "ffgate1")),
    "resnet74-cifar100": (lambda: skipnet.resnet74_cifar(100), original_keys([12, 12, 12], 100, "ffgate1")),
    "resnet110": (lambda: skipnet.resnet110_cifar(), original_keys([18, 18, 18], 10, "ffgate2")),
    "resnet110-rnn": (lambda: skipnet.resnet110_cifar(gate="rnn"), original_keys([18, 18, 18], 10, "rnn")),
    "resnet101": (lambda: skipnet.resnet101_imagenet(), original_keys([3, 4, 23, 3], 1000, "rnn", True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_original_naming(name):
    make, keys = CASES[name]
    assert state_shapes(make) == keys


@pytest.mark.parametrize("gate", ["ffgate1", "rnn"])
def test_loads_original_state(gate):
    # PyTorch 0.3/0.4 checkpoints: no num_batches_tracked
    assert_loads(skipnet.resnet38_cifar(gate=gate), original_state(original_keys([6, 6, 6], 10, gate, legacy=True)))


def test_load_original_checkpoint():
    model = skipnet.resnet38_cifar()
    state = original_state(original_keys([6, 6, 6], 10, "ffgate1"))
    model.load_original_checkpoint({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3})
    assert torch.equal(model.group3_gate5.linear_layer.bias, state["group3_gate5.linear_layer.bias"])
    assert model.group2_ds0 is model.group2_layer0.downsample  # still one module
    with pytest.raises(TypeError, match="checkpoint must be a dict"):
        model.load_original_checkpoint([state])


# ----------------------------------------------------------------------------- calibration, errors
def test_calibration_hits_the_density_on_its_batch():
    x = torch.randn(8, 3, 32, 32)
    model = calibrated(skipnet.resnet38_cifar(backend="cpu"), x, 0.25)
    assert (model(x).masks.sum(0) == 2).all()  # 2 of 8 samples keep every gated block
    assert not model.training


def test_density_constructor():
    model = skipnet.resnet38_cifar(density=0.5).eval()  # calibrated on another random batch
    assert 0.35 < model(torch.randn(32, 3, 32, 32)).masks.mean().item() < 0.65


def test_bad_input_errors():
    model = skipnet.resnet38_cifar()
    with pytest.raises(ValueError, match=r"x must be a \[N, 3, H, W\] tensor"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"x must be a \[N, 3, H, W\] tensor"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="execution must be one of"):
        model.execution = "dense"
    with pytest.raises(ValueError, match="execution must be one of"):
        skipnet.resnet38_cifar(execution="fast")
    with pytest.raises(ValueError, match="gating must be one of"):
        model.gating = "gumbel"
    with pytest.raises(ValueError, match="gate must be one of"):
        skipnet.resnet38_cifar(gate="ffgate3")
    with pytest.raises(ValueError, match="backend must be one of"):
        skipnet.resnet38_cifar(backend="gpu")
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        model.calibrate(torch.randn(2, 3, 32, 32), 1.5)


def test_copies_keep_their_own_blocks():
    """The SkipBlocks sit outside the module tree: a deep copy must run its own blocks."""
    model = tame_bn(skipnet.resnet38_cifar(backend="cpu"))
    twin = copy.deepcopy(model)
    assert twin._plain[5].block is twin.group1_layer5 and twin._mixed[7].block.block is twin.group2_layer1
    with torch.no_grad():
        twin.group1_layer5.conv1.weight.zero_()
    x = torch.randn(2, 3, 32, 32)
    model.gating = twin.gating = "soft"
    assert not torch.equal(model.train()(x).logits, twin.train()(x).logits)
