"""MSDNet: masked == sparse early exit, the release's names, budgeted batch classification."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynkernels.models import msdnet as M

from _utils import assert_close, device_backends

BACKENDS = [p for p in device_backends() if p.id in ("cpu-torch", "cpu-cpp", "cpu-triton", "cuda-cuda")]
RTOL = 1e-4
SMALL = dict(n_blocks=3, base=1, step=1, n_channels=8, growth_rate=4)  # a quick CIFAR MSDNet


def cifar(device="cpu", **kw):
    torch.manual_seed(0)
    cfg = dict(SMALL)
    cfg.update(kw.pop("config", {}))
    return M.msdnet_cifar(10, **kw, **cfg).to(device).eval()


def both(m, x):
    m.execution = "masked"
    with torch.no_grad():
        masked = m(x)
        m.execution = "sparse"
        return masked, m(x)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_equals_sparse(device, backend):
    m = cifar(device, backend=backend)
    for n in (1, 13):
        x = torch.randn(n, 3, 32, 32, device=device)
        m.thresholds = M.thresholds_for_fractions(M.exit_confidences(m, x), [0.3, 0.3])
        (lm, em), (ls, es) = both(m, x)
        assert torch.equal(es, em)
        assert_close(ls, lm, rtol=RTOL)


def test_imagenet_masked_equals_sparse():
    torch.manual_seed(0)
    m = M.msdnet_imagenet(5, n_blocks=2, base=1, step=1, n_channels=8, growth_rate=4).eval()
    x = torch.randn(4, 3, 224, 224)
    m.thresholds = M.thresholds_for_fractions(M.exit_confidences(m, x), [0.5])
    (lm, em), (ls, es) = both(m, x)
    assert torch.equal(es, em) and 0 < int((em == 0).sum()) < 4
    assert_close(ls, lm, rtol=RTOL)


def test_the_release_default_configs_build():
    """The README's CIFAR (budgeted batch) and ImageNet networks: block count and parameters."""
    m = M.msdnet_cifar(100)
    assert m.num_exits == 5 and [len(b) for b in m.blocks] == [2, 2, 4, 4, 6]  # layers + transitions (after layers 6 and 11)
    assert sum(p.numel() for p in M.msdnet_imagenet().parameters()) == 23958440


def test_sparse_runs_fewer_flops_and_leaves_stages_empty():
    m = cifar()
    x = torch.randn(12, 3, 32, 32)
    flops = {}
    for thresholds in ([0.0, 0.0], [1.0, 1.0]):  # everyone leaves at exit 0 / nobody leaves early
        m.thresholds = thresholds
        for e in ("masked", "sparse"):
            m.execution = e
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                logits, exits = m(x)
            flops[e, thresholds[0]] = fc.get_total_flops()
        assert int(exits.float().mean()) == (0 if thresholds[0] == 0.0 else 2)
    per_image = m.exit_flops()
    assert flops["sparse", 0.0] == 12 * per_image[0]  # later blocks never ran
    assert flops["sparse", 1.0] == flops["masked", 1.0] == flops["masked", 0.0] == 12 * per_image[-1]


def test_bucketed_batches_equal():
    m = cifar(bucket=4)
    x = torch.randn(13, 3, 32, 32)
    m.thresholds = M.thresholds_for_fractions(M.exit_confidences(m, x), [0.3, 0.3])
    (lm, em), (ls, es) = both(m, x)
    assert torch.equal(es, em)
    assert_close(ls, lm, rtol=RTOL)


# ----------------------------------------------------------------------------- budgeted batch classification
def test_thresholds_follow_the_release_rule():
    """A hand-made case of the release's dynamic_eval_find_threshold."""
    conf = torch.tensor([[0.9, 0.2, 0.8, 0.3, 0.1], [0.5, 0.95, 0.4, 0.6, 0.7], [0.1, 0.1, 0.1, 0.1, 0.1]])
    # exit 0 takes floor(5 * 0.4) = 2 images: the 2nd most confident is 0.8; exit 1 takes 2 of
    # the 3 left (images 1, 3, 4 with 0.95, 0.6, 0.7): threshold 0.7
    t = M.thresholds_for_fractions(conf, [0.4, 0.4, 0.2])
    assert t == pytest.approx([0.8, 0.7])
    assert M.exit_fractions(conf, t).tolist() == [0.4, 0.4, 0.2]
    assert M.expected_flops(conf, t, [1.0, 2.0, 4.0]) == pytest.approx(0.4 * 1 + 0.4 * 2 + 0.2 * 4)
    # none wanted, or more images wanted than are left: nobody leaves there (threshold 1)
    assert M.thresholds_for_fractions(conf, [0.8, 0.9]) == pytest.approx([0.2, 1.0])
    assert M.thresholds_for_fractions(conf, [0.0, 0.2])[0] == 1.0


def test_calibrate_meets_the_budget():
    m = cifar()
    val = torch.randn(40, 3, 32, 32)
    flops = m.exit_flops()
    budget = (flops[0] + flops[-1]) / 2
    t = M.calibrate(m, [(val[:20], None), (val[20:], None)], budget)
    conf = M.exit_confidences(m, val)
    assert m.thresholds == t and all(0.0 <= v <= 1.0 for v in t)
    spent = M.expected_flops(conf, t, flops)
    assert flops[0] <= spent <= budget
    assert spent > 0.8 * budget  # close to the budget, not far below it
    with pytest.raises(ValueError, match="below the .* FLOPs of the first exit"):
        M.calibrate(m, val, flops[0] / 2)


def test_geometric_fractions():
    assert M.geometric_fractions(1.0, 4) == pytest.approx([0.25] * 4)
    q = M.geometric_fractions(0.5, 3)
    assert q == pytest.approx([4 / 7, 2 / 7, 1 / 7])


# ----------------------------------------------------------------------------- the release's naming
def test_release_naming():
    """Shapes derived by hand from the release's MSDNet for the README's CIFAR network
    (nChannels 16, growthRate 6, grFactor 1-2-4, bnFactor 1-2-4, bottleneck, prune max, 5 lin_grow blocks)."""
    sd = M.msdnet_cifar(10).state_dict()
    expected = {
        "blocks.0.0.layers.0.net.0.weight": (16, 3, 3, 3),  # MSDNFirstLayer
        "blocks.0.0.layers.1.net.0.weight": (32, 16, 3, 3),
        "blocks.0.0.layers.2.net.0.weight": (64, 32, 3, 3),
        "blocks.0.1.layers.0.conv_normal.net.0.weight": (6, 16, 1, 1),  # ConvNormal: bottleneck min(16, 1 * 6)
        "blocks.0.1.layers.0.conv_normal.net.3.weight": (6, 6, 3, 3),
        "blocks.0.1.layers.1.conv_down.net.0.weight": (6, 16, 1, 1),  # ConvDownNormal(16, 32, 12)
        "blocks.0.1.layers.1.conv_normal.net.0.weight": (12, 32, 1, 1),
        "blocks.0.1.layers.2.conv_normal.net.3.weight": (12, 48, 3, 3),  # ConvBN(64, 12, bnWidth 4)
        "blocks.2.2.layers.0.conv_down.net.0.weight": (6, 46, 1, 1),  # layer 6: 3 -> 2 scales
        "blocks.2.3.m.0.net.0.weight": (52, 104, 1, 1),  # transition 52 -> 26 channels
        "blocks.2.3.m.1.net.0.weight": (104, 208, 1, 1),
        "classifier.0.m.0.net.0.weight": (128, 88, 3, 3),  # 22 channels x grFactor 4
        "classifier.0.m.1.net.0.weight": (128, 128, 3, 3),
        "classifier.0.linear.weight": (10, 128),
        "classifier.2.m.0.net.0.weight": (128, 104, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    imagenet = M.msdnet_imagenet().state_dict()
    assert tuple(imagenet["blocks.0.0.layers.0.0.weight"].shape) == (32, 3, 7, 7) and "blocks.0.0.layers.0.0.bias" in imagenet


def test_load_original_checkpoint():
    m, other = cifar(), cifar()
    for p in other.parameters():
        p.data.uniform_()
    m.load_original_checkpoint({"state_dict": {"module." + k: v for k, v in other.state_dict().items()}, "epoch": 7})
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))
    with pytest.raises(TypeError, match="expected a dict"):
        m.load_original_checkpoint([1])


def test_bad_input():
    with pytest.raises(ValueError, match=r"MSDNet: step_mode must be 'even' or 'lin_grow'"):
        M.msdnet_cifar(step_mode="log")
    with pytest.raises(ValueError, match=r"MSDNet: threshold\[0\] must be a number in \[0, 1\]"):
        cifar(threshold=[1.2, 0.5])
    with pytest.raises(ValueError, match=r"MSDNet: x must be \[N, 3, H, W\]"):
        cifar()(torch.randn(3, 32, 32))
