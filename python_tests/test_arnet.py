"""AR-Net: masked == sparse, frames routed to their backbone, skips, the release's names."""
import pytest
import torch
import torch.nn as nn

from dynkernels.models import arnet as A

from _utils import assert_close

RTOL = 1e-4
SMALL = dict(num_classes=5, num_segments=6, reso_list=(32, 28, 24, 16))
SIZE = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = A.ARNet(**SMALL).eval()
    with torch.no_grad():
        for fc in list(m.new_fc_list) + [m.lite_fc]:
            nn.init.normal_(fc.weight, std=0.1)
    return m


def prescribed(m, choice):
    """m.policy replaced by one giving these actions [B, T] (and its own lite predictions)."""
    real = type(m).policy

    def policy(frames, mode="deterministic", tau=1.0):
        _, lite = real(m, frames, mode, tau)
        return torch.nn.functional.one_hot(choice, m.num_actions).float(), lite

    return policy


def both(m, frames, mode="deterministic"):
    out = {}
    for e in ("masked", "sparse"):
        m.execution = e
        torch.manual_seed(3)  # the same Gumbel noise for both
        with torch.no_grad():
            out[e] = m(frames, mode)
    return out["masked"], out["sparse"]


def test_masked_equals_sparse(model, monkeypatch):
    """Frames routed to every backbone, the policy's own prediction and skips at once."""
    frames = torch.randn(2, 6, 3, SIZE, SIZE)
    for choice in (torch.tensor([[0, 1, 2, 3, 4, 0], [5, 6, 2, 1, 0, 3]]),):
        monkeypatch.setattr(model, "policy", prescribed(model, choice))
        masked, sparse = both(model, frames)
        assert torch.equal(sparse.choice, choice) and torch.equal(masked.choice, choice)
        assert_close(sparse.logits, masked.logits, rtol=RTOL)


def test_policy_modes(model):
    """The real policy: one-hot actions; Gumbel noise drawn the same gives the same actions and
    equal predictions in both executions; deterministic actions are the argmax (no noise)."""
    frames = torch.randn(2, 6, 3, SIZE, SIZE)
    masked, sparse = both(model, frames, "gumbel")
    assert torch.equal(sparse.actions, masked.actions)
    assert set(sparse.actions.unique().tolist()) <= {0.0, 1.0} and torch.equal(sparse.actions.sum(2), torch.ones(2, 6))
    assert_close(sparse.logits, masked.logits, rtol=RTOL)
    with torch.no_grad():
        first, _ = model.policy(frames)
        again, _ = model.policy(frames)
    assert torch.equal(first, again)


def test_frames_run_their_chosen_backbone_only(model, monkeypatch):
    """Each backbone sees only its frames, at its resolution; the prediction is the mean over
    the frames not skipped of their chosen predictions."""
    choice = torch.tensor([[0, 0, 2, 3, 4, 0], [5, 6, 6, 6, 6, 2]])
    monkeypatch.setattr(model, "policy", prescribed(model, choice))
    frames = torch.randn(2, 6, 3, SIZE, SIZE)
    seen = {b: [] for b in range(3)}
    hooks = [model.base_model_list[b].register_forward_pre_hook(lambda m, i, b=b: seen[b].append((i[0].shape[0], i[0].shape[-1]))) for b in range(3)]
    model.execution = "sparse"
    try:
        with torch.no_grad():
            out = model(frames)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {0: [(3, 32)], 1: [], 2: [(2, 24)]}  # frames per backbone, at its resolution
    with torch.no_grad():
        _, lite = model.policy(frames)
        flat = frames.flatten(0, 1)
        preds = [model._backbone(b)(flat).view(2, 6, -1) for b in (0, 2)]
    expected = [(preds[0][0, 0] + preds[0][0, 1] + preds[1][0, 2] + lite[0, 3] + preds[0][0, 5]) / 5, preds[1][1, 5]]
    assert_close(out.logits, torch.stack(expected), rtol=1e-5)


def test_skips_repeat_for_their_length(model, monkeypatch):
    bias = torch.tensor([0, 0, 0, 0, 0, 20.0, 0])  # always "skip 2"
    monkeypatch.setattr(model.linear, "bias", torch.nn.Parameter(bias))
    frames = torch.randn(2, 6, 3, SIZE, SIZE)
    with torch.no_grad():
        actions, _ = model.policy(frames)
    assert actions.argmax(dim=2).tolist() == [[5] * 6] * 2
    for out in both(model, frames):  # every frame skipped: no prediction at all
        assert torch.equal(out.logits, torch.zeros(2, 5))


def test_release_naming():
    m = A.ARNet(num_classes=200)
    sd = m.state_dict()
    expected = {
        "lite_backbone.features.0.0.weight": (32, 3, 3, 3),
        "lite_backbone.features.1.conv.0.0.weight": (32, 1, 3, 3),  # expand ratio 1: depthwise first
        "lite_backbone.features.2.conv.0.0.weight": (96, 16, 1, 1),
        "lite_backbone.features.18.0.weight": (1280, 320, 1, 1),
        "rnn.weight_ih": (2048, 1280),
        "rnn.weight_hh": (2048, 512),
        "linear.weight": (7, 512),  # 3 backbones, the policy itself, 3 skips
        "lite_fc.weight": (200, 512),
        "base_model_list.0.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "base_model_list.0.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "base_model_list.1.layer3.5.conv2.weight": (256, 256, 3, 3),
        "base_model_list.2.layer2.0.downsample.1.running_var": (128,),
        "new_fc_list.0.weight": (200, 2048),
        "new_fc_list.2.weight": (200, 512),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.endswith(("fc.weight", "classifier.1.weight")) and k.startswith(("base_model_list", "lite_backbone")) for k in sd)
    # torchvision's parameter counts without their classifiers
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert [count(b) for b in m.base_model_list] == [25557032 - 2049000, 21797672 - 513000, 11689512 - 513000]
    assert count(m.lite_backbone) == 3504872 - 1281000
    # a checkpoint of the release: {'state_dict': ...} saved from nn.DataParallel
    state = {"module." + k: v.clone() for k, v in sd.items()}
    state["module.lite_fc.bias"] = torch.arange(200.0)
    m.load_original_checkpoint({"state_dict": state, "epoch": 1})
    assert torch.equal(m.lite_fc.bias, torch.arange(200.0))


def test_bad_input(model):
    with pytest.raises(ValueError, match=r"ARNet: frames must be \[B, 6, 3, H, W\], got \(2, 5, 3, 32, 32\)"):
        model(torch.randn(2, 5, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"ARNet: mode must be one of"):
        model(torch.randn(1, 6, 3, SIZE, SIZE), mode="sample")
    with pytest.raises(ValueError, match=r"ARNet: reso_list needs 4 resolutions"):
        A.ARNet(reso_list=(224, 112))
