"""SpotTune: masked == sparse, one route per forward, gradients, the release's names, the policy."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dynkernels.nn.route_block as route_block
from dynkernels.models import spottune as st

from _utils import assert_close, device_backends

BACKENDS = [p for p in device_backends() if p.id in ("cpu-torch", "cpu-cpp", "cpu-triton", "cuda-cuda")]
RTOL = 1e-4


def half_policy(n, blocks=12, seed=0):
    """Each image fine-tunes a random half of the blocks."""
    g = torch.Generator().manual_seed(seed)
    policy = torch.zeros(n, blocks)
    for i in range(n):
        policy[i, torch.randperm(blocks, generator=g)[: blocks // 2]] = 1
    return policy


def net(device="cpu", **kw):
    torch.manual_seed(0)
    m = st.resnet26(7, **kw).to(device).eval()
    for bn in m.modules():  # BN statistics that are not the identity
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return m


def both(m, x, policy):
    m.execution = "masked"
    masked = m(x, policy)
    m.execution = "sparse"
    return masked, m(x, policy)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_equals_sparse(device, backend):
    m = net(device, backend=backend)
    size = 8 if backend == "triton" else 16  # the Triton interpreter is slow
    for n, policies in ((1, (half_policy(1),)), (5, (half_policy(5), torch.zeros(5, 12), torch.ones(5, 12)))):
        x = torch.randn(n, 3, size, size, device=device)
        for policy in policies:
            with torch.no_grad():
                masked, sparse = both(m, x, policy.to(device))
            assert_close(sparse, masked, rtol=RTOL)
    with torch.no_grad():  # a bool policy, and None: the frozen network
        assert_close(m(x, policy.bool().to(device)), both(m, x, policy.to(device))[0], rtol=RTOL)
        m.execution = "sparse"
        assert_close(m(x, None), m(x, torch.zeros(n, 12, device=device)), rtol=RTOL)


def test_one_route_and_one_sync_per_forward(monkeypatch):
    calls = []
    real = route_block._route
    monkeypatch.setattr(route_block, "_route", lambda *a: calls.append(a[0].shape) or real(*a))
    m = net()
    with torch.no_grad():
        m(torch.randn(6, 3, 16, 16), half_policy(6))
    assert calls == [torch.Size([12, 6])]  # all 12 blocks in one call, read with one tolist()


def test_sparse_flops_are_half():
    m = net()
    x, policy = torch.randn(8, 3, 8, 8), half_policy(8)
    counted = {}
    for e in ("masked", "sparse"):
        m.execution = e
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x, policy)
        counted[e] = fc.get_total_flops()
    assert 1.9 < counted["masked"] / counted["sparse"] < 2.0  # the stem and classifier are shared


def test_gradients_equal_masked():
    m = net()
    x0, policy = torch.randn(6, 3, 8, 8), half_policy(6)
    grads = {}
    for e in ("masked", "sparse"):
        m.execution = e
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        (m(x, policy) * torch.linspace(-1, 1, 42).view(6, 7)).sum().backward()
        grads[e] = [x.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in m.parameters()]
    for gs, gm in zip(grads["sparse"], grads["masked"]):
        assert_close(gs, gm, rtol=RTOL)


def test_training_mode_reaches_the_chosen_copies_only():
    m = net().train()
    policy = torch.zeros(4, 12)
    policy[:, 3] = 1  # only block 3's fine-tuned copy is ever chosen
    m(torch.randn(4, 3, 8, 8), policy).sum().backward()
    tuned = [p.grad for s in m.parallel_blocks for b in s for p in b.parameters()]
    chosen = list(m.parallel_blocks[0][3].parameters())
    assert all(p.grad is not None and p.grad.any() for p in chosen)
    # the copies nobody chose run on empty batches (for DistributedDataParallel): zero gradients
    assert all(g is not None for g in tuned)
    assert sum(bool(g.any()) for g in tuned) == len(chosen)


# ----------------------------------------------------------------------------- the release's naming
# Written from the release's spottune_models.py and agent_net.py, independently of the model code.
def _bn(keys, name, c):
    keys.update({f"{name}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")})
    keys[f"{name}.num_batches_tracked"] = ()


def release_keys(layers, num_out, parallel=True, agent_parallel_inplanes=False):
    keys = {"conv1.weight": (32, 3, 3, 3)}
    _bn(keys, "bn1", 32)
    for group in ("blocks", "parallel_blocks") if parallel else ("blocks",):
        inplanes = 256 if (group == "parallel_blocks" and agent_parallel_inplanes) else 32
        for s, planes in enumerate((64, 128, 256)):
            for b in range(layers[s]):
                name = f"{group}.{s}.{b}"
                keys[f"{name}.conv1.weight"] = (planes, inplanes if b == 0 else planes, 3, 3)
                _bn(keys, f"{name}.bn1", planes)
                keys[f"{name}.conv2.1.weight"] = (planes, planes, 3, 3)
                _bn(keys, f"{name}.bn2", planes)
            inplanes = planes
    _bn(keys, "bn2.0", 256)
    keys.update({"linear.weight": (num_out, 256), "linear.bias": (num_out,)})
    return keys


def random_state(keys):
    return {k: torch.randint(0, 9, s) if k.endswith("num_batches_tracked") else torch.rand(s) + 0.1 for k, s in keys.items()}


def test_release_naming():
    m = st.spottune(10)
    assert {k: tuple(v.shape) for k, v in m.backbone.state_dict().items()} == release_keys([4, 4, 4], 10)
    assert {k: tuple(v.shape) for k, v in m.policy_net.state_dict().items()} == release_keys([1, 1, 1], 24, parallel=False)
    backbone = random_state(release_keys([4, 4, 4], 10))
    m.backbone.load_state_dict(backbone)
    assert torch.equal(m.backbone.parallel_blocks[2][3].conv2[1].weight, backbone["parallel_blocks.2.3.conv2.1.weight"])
    # the release's agent also holds parallel blocks it never runs (built without resetting in_planes)
    agent = random_state(release_keys([1, 1, 1], 24, agent_parallel_inplanes=True))
    m.policy_net.load_state_dict(agent)
    assert torch.equal(m.policy_net.linear.weight, agent["linear.weight"])


def test_decisions():
    logits = torch.randn(5, 12, 2)
    det = st.decide(logits)
    assert torch.equal(det, (logits.argmax(-1) == 1).float())
    torch.manual_seed(1)
    g = st.decide(logits.requires_grad_(True), "gumbel")
    assert set(g.unique().tolist()) <= {0.0, 1.0} and g.requires_grad  # straight through
    m = st.spottune(3).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 16, 16))
    assert out.policy.shape == (2, 12) and out.logits.shape == (2, 3)


def test_bad_input():
    m = net()
    with pytest.raises(ValueError, match=r"SpotTuneResNet: policy must be \[N, num_blocks\] = \[2, 12\], got \(2, 11\)"):
        m(torch.randn(2, 3, 16, 16), torch.zeros(2, 11))
    with pytest.raises(ValueError, match=r"SpotTuneResNet: x must be \[N, 3, H, W\]"):
        m(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"SpotTune: mode must be one of"):
        st.decide(torch.randn(1, 12, 2), "sample")
    with pytest.raises(ValueError, match=r"SpotTuneResNet: execution must be one of"):
        st.resnet26(execution="dense")
    with pytest.raises(ValueError, match=r"SpotTune: the policy net decides 5 blocks but the backbone has 12"):
        st.SpotTune(st.SpotTunePolicyNet(5), st.resnet26())
