"""EarlyExit: a sample leaves at its first confident exit; sparse execution against masked."""
import math

import pytest
import torch
import torch.nn as nn

from dynkernels.nn import EarlyExit
from dynkernels.nn.early_exit import max_softmax

from _utils import assert_close, device_backends

BACKENDS = [p for p in device_backends() if p.id in ("cpu-torch", "cpu-cpp", "cpu-triton", "cuda-cuda", "cuda-triton")]
RTOL = 1e-4


class Counted(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        self.batches = []

    def forward(self, x):
        self.batches.append((x[0] if isinstance(x, (list, tuple)) else x).shape[0])
        return self.module(x)


class TwoScales(nn.Module):
    """A stage whose state is a list of two tensors (like MSDNet's scales)."""

    def __init__(self, c):
        super().__init__()
        self.fine = nn.Conv2d(c, c, 3, padding=1)
        self.coarse = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, state):
        fine, coarse = state if isinstance(state, list) else (state, state[:, :, ::2, ::2])
        return [torch.relu(self.fine(fine)), torch.relu(self.coarse(fine) + coarse)]


class Head(nn.Module):
    def __init__(self, c, classes=7, scale=4.0):
        super().__init__()
        self.fc = nn.Linear(c, classes)
        self.scale = scale

    def forward(self, state):
        t = state[-1] if isinstance(state, list) else state
        return self.scale * self.fc(t.mean(dim=(2, 3)))


def model(k=3, c=4, multi_scale=False, counted=False, **kw):
    torch.manual_seed(2)
    stages = [TwoScales(c) if multi_scale else nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()) for _ in range(k)]
    if counted:
        stages = [Counted(s) for s in stages]
    m = EarlyExit(stages, [Head(c) for _ in range(k)], kw.pop("threshold", 0.5), **kw).eval()
    return m


@torch.no_grad()
def thresholds_for(m, x, fractions):
    """Thresholds that let about `fractions[k]` of the samples still in leave at exit k (masked scores)."""
    m.execution = "masked"
    state, scores = x, []
    for k in range(m.num_exits - 1):
        state = m.stages[k](state)
        scores.append(max_softmax(m.exits[k](state)))
    still = torch.ones(x.shape[0] if isinstance(x, torch.Tensor) else x[0].shape[0], dtype=torch.bool)
    out = []
    for k, f in enumerate(fractions):
        s = scores[k][still]
        t = float(torch.quantile(s, 1 - f)) if s.numel() else 1.0
        out.append(min(max(t, 0.0), 1.0))
        still &= ~(scores[k] >= out[-1])
    return out


def both(m, x):
    m.execution = "masked"
    masked = m(x)
    m.execution = "sparse"
    return masked, m(x)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_equals_sparse(device, backend):
    for multi_scale in (False, True):
        for n in (1, 2, 17):
            m = model(multi_scale=multi_scale, backend=backend).to(device)
            x = torch.randn(n, 4, 8, 8, device=device)
            m.thresholds = thresholds_for(m, x, [0.3, 0.5])
            (lm, em), (ls, es) = both(m, x)
            assert torch.equal(es, em), (n, multi_scale)
            assert_close(ls, lm, rtol=RTOL)
            assert es.dtype == torch.int64 and ls.shape == (n, 7)


def test_exit_rule_per_sample():
    """Exit k is the first whose max-softmax reaches its threshold; the last exit takes the rest."""
    m = model()
    x = torch.randn(25, 4, 8, 8)
    m.thresholds = [0.5, 0.6]
    m.execution = "masked"
    state, logits = x, []
    for k in range(3):
        state = m.stages[k](state)
        logits.append(m.exits[k](state))
    out, exit_index = m(x)
    for i in range(25):
        k = next((k for k in range(2) if max_softmax(logits[k][i : i + 1])[0] >= m.thresholds[k]), 2)
        assert int(exit_index[i]) == k
        assert torch.equal(out[i], logits[k][i])


def test_later_stages_run_only_on_the_samples_still_in():
    m = model(counted=True)
    x = torch.randn(20, 4, 8, 8)
    m.thresholds = thresholds_for(m, x, [0.25, 0.5])
    for s in m.stages:
        s.batches.clear()
    (_, em), (_, es) = both(m, x)
    left = [20, int((em >= 1).sum()), int((em >= 2).sum())]
    assert [s.batches for s in m.stages] == [[20, 20], [20, left[1]], [20, left[2]]]


def test_every_sample_leaves_at_the_first_exit():
    """Threshold 0: every sample exits at once; later stages never run (an empty stage), except
    in grad mode, where they run on an empty batch so that every parameter gets its (zero)
    gradient, as DistributedDataParallel without find_unused_parameters needs."""
    m = model(counted=True, threshold=0.0)
    x = torch.randn(6, 4, 8, 8)
    with torch.no_grad():
        (lm, em), (ls, es) = both(m, x)
    assert torch.equal(es, torch.zeros(6, dtype=torch.int64)) and torch.equal(em, es)
    assert_close(ls, lm, rtol=RTOL)
    assert [s.batches for s in m.stages] == [[6, 6], [6], [6]]
    m.execution = "sparse"
    logits, _ = m(x)
    logits.sum().backward()
    assert [s.batches for s in m.stages] == [[6, 6, 6], [6, 0], [6, 0]]
    later = [p.grad for k in (1, 2) for p in list(m.stages[k].parameters()) + list(m.exits[k].parameters())]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in later)


def test_threshold_one_keeps_everyone_to_the_last_exit():
    m = model(threshold=1.0)
    x = torch.randn(6, 4, 8, 8)
    (lm, em), (ls, es) = both(m, x)
    assert torch.equal(es, torch.full((6,), 2, dtype=torch.int64)) and torch.equal(em, es)
    assert_close(ls, lm, rtol=RTOL)


def test_controllers_decide():
    """D2NN-style control nodes: a module's score in [0, 1] instead of the max-softmax."""
    torch.manual_seed(4)
    controllers = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1), nn.Sigmoid(), nn.Flatten(0)) for _ in range(2)]
    m = model(controllers=controllers, threshold=[0.5, 0.5])
    x = torch.randn(30, 4, 8, 8)
    (lm, em), (ls, es) = both(m, x)
    assert torch.equal(es, em)
    assert_close(ls, lm, rtol=RTOL)
    first = controllers[0](m.stages[0](x))
    assert torch.equal(em == 0, first >= 0.5)


def test_bucketed_batches():
    m = model(counted=True, bucket=8)
    x = torch.randn(20, 4, 8, 8)
    m.thresholds = thresholds_for(m, x, [0.3, 0.5])
    for s in m.stages:
        s.batches.clear()
    (lm, em), (ls, es) = both(m, x)
    assert torch.equal(es, em)
    assert_close(ls, lm, rtol=RTOL)
    assert all(b % 8 == 0 or b == 20 for s in m.stages for b in s.batches[1:])


def test_gradients_equal_masked():
    m = model()
    for s in m.stages:  # no BN: training mode would take batch statistics over different batches
        s[1] = nn.Identity()
    x0 = torch.randn(15, 4, 8, 8)
    m.thresholds = thresholds_for(m, x0, [0.3, 0.5])
    grads = {}
    for execution in ("masked", "sparse"):
        m.execution = execution
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        logits, _ = m(x)
        (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        grads[execution] = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
    for gs, gm in zip(grads["sparse"], grads["masked"]):
        assert_close(gs, gm, rtol=RTOL)


@pytest.mark.parametrize(
    "threshold,exc,match",
    [
        (-0.1, ValueError, r"EarlyExit: threshold\[0\] must be a number in \[0, 1\] \(a confidence\), got -0.1"),
        (1.5, ValueError, r"threshold\[0\] must be a number in \[0, 1\]"),
        ([0.5, 2.0], ValueError, r"threshold\[1\] must be a number in \[0, 1\] \(a confidence\), got 2.0"),
        ([0.5, math.nan], ValueError, r"threshold\[1\] must be a number in \[0, 1\] \(a confidence\), got nan"),
        ([0.5], ValueError, r"EarlyExit: threshold needs 2 values \(one per exit but the last\), got 1"),
        ("0.5", TypeError, r"EarlyExit: threshold must be a float or a sequence of floats, got str"),
        (True, TypeError, r"threshold must be a float or a sequence of floats, got bool"),
        (torch.ones(2, 2), ValueError, r"threshold must be a float or a 1-D sequence"),
    ],
)
def test_bad_thresholds(threshold, exc, match):
    with pytest.raises(exc, match=match):
        model(threshold=threshold)
    m = model()
    with pytest.raises(exc, match=match):
        m.thresholds = threshold


def test_thresholds_accepted():
    assert model(threshold=0.7).thresholds == [0.7, 0.7]
    assert model(threshold=[0.1, 0.2, 0.9]).thresholds == [0.1, 0.2]  # the last exit's is ignored
    assert model(threshold=torch.tensor([0.0, 1.0])).thresholds == [0.0, 1.0]


def test_bad_construction_and_input():
    c = nn.Identity()
    with pytest.raises(ValueError, match=r"EarlyExit: one exit per stage: got 2 stages and 1 exits"):
        EarlyExit([c, c], [c], 0.5)
    with pytest.raises(TypeError, match=r"EarlyExit: stages and exits must be non-empty sequences of nn.Module"):
        EarlyExit([], [], 0.5)
    with pytest.raises(ValueError, match=r"EarlyExit: controllers must be 1 modules"):
        EarlyExit([c, c], [c, c], 0.5, controllers=[c, c])
    with pytest.raises(ValueError, match=r"EarlyExit: execution must be one of"):
        EarlyExit([c], [c], 0.5, execution="dense")
    with pytest.raises(ValueError, match=r"EarlyExit: x must be a tensor with a batch dimension"):
        model()(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"EarlyExit: exit 0 must return logits \[3, C\]"):
        EarlyExit([nn.Identity()], [nn.Identity()], 0.5)(torch.randn(3, 2, 2))
