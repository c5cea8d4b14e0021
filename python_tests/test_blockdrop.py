"""BlockDrop models: sparse equals masked execution, gradients, the release's checkpoint
naming, FLOP counts, the agent, the REINFORCE step, and errors on bad input."""
import pytest
import torch
from _utils import assert_close, bn_keys, count_compacts, random_state, tame_bn

from dynkernels.flops import model_flops
from dynkernels.models.blockdrop import (
    BlockDrop,
    policy_net_cifar,
    policy_net_imagenet,
    resnet32_cifar,
    resnet101_imagenet,
    resnet110_cifar,
)
from dynkernels.models.blockdrop_train import blockdrop_reward, reinforce_step, synthetic_cifar

RTOL = 1e-4


def policies(n, k, kind):
    if kind == "random":
        return (torch.rand(n, k) < 0.5).float()
    if kind == "bool":
        return torch.rand(n, k) < 0.5
    if kind == "all_skip":
        return torch.zeros(n, k)
    return torch.ones(n, k)


def logits_both(model, x, policy):
    model.execution = "sparse"
    sparse = model(x, policy)
    model.execution = "masked"
    return sparse, model(x, policy)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["random", "bool", "all_skip", "all_keep"])
@pytest.mark.parametrize("n", [1, 5])
def test_resnet32_sparse_equals_masked(backend, kind, n):
    model = tame_bn(resnet32_cifar(backend=backend))
    x = torch.randn(n, 3, 32, 32)
    sparse, masked = logits_both(model, x, policies(n, 15, kind))
    assert_close(sparse, masked, rtol=RTOL)


def test_resnet110_sparse_equals_masked_and_dense():
    model = tame_bn(resnet110_cifar(num_classes=100, backend="cpu"))
    x = torch.randn(4, 3, 32, 32)
    policy = policies(4, 54, "random")
    policy[:, 0] = 0  # a stage's first block dropped by all: its downsample still runs
    policy[:, 18] = 0
    sparse, masked = logits_both(model, x, policy)
    assert sparse.shape == (4, 100)
    assert_close(sparse, masked, rtol=RTOL)
    ones = torch.ones(4, 54)
    assert_close(model(x), logits_both(model, x, ones)[0], rtol=RTOL)  # policy=None is the dense ResNet


def test_resnet101_sparse_equals_masked():
    model = tame_bn(resnet101_imagenet(num_classes=7, backend="cpu"))
    x = torch.randn(3, 3, 64, 64)  # small input: the pooling is adaptive
    sparse, masked = logits_both(model, x, policies(3, 33, "random"))
    assert_close(sparse, masked, rtol=RTOL)


@pytest.mark.cuda
def test_resnet32_sparse_equals_masked_on_gpu():
    model = tame_bn(resnet32_cifar()).cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    sparse, masked = logits_both(model, x, policies(16, 15, "random").cuda())
    assert_close(sparse, masked, rtol=RTOL)


def test_gradients_equal_masked():
    model = tame_bn(resnet32_cifar(backend="cpu"))
    x = torch.randn(4, 3, 32, 32)
    policy = policies(4, 15, "random")
    policy[:, 3] = 0  # dropped by every sample: no gradient reaches its branch
    grads = {}
    for execution in ("sparse", "masked"):
        model.execution = execution
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        model(xi, policy).square().sum().backward()
        grads[execution] = [xi.grad] + [
            torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()
        ]
    for g_sparse, g_masked in zip(grads["sparse"], grads["masked"]):
        assert_close(g_sparse, g_masked, rtol=RTOL)
    assert model.blocks[0][3].conv1.weight.grad is None or model.blocks[0][3].conv1.weight.grad.abs().sum() == 0
    assert grads["sparse"][0].abs().sum() > 0


def test_one_compact_per_forward(monkeypatch):
    calls = count_compacts(monkeypatch)
    model = resnet32_cifar(backend="cpu").eval()
    model(torch.randn(3, 3, 32, 32), policies(3, 15, "random"))
    assert calls == [(15, 3)]


def test_capacity_mode_equals_masked():
    n = 4
    model = tame_bn(resnet32_cifar(backend="cpu", capacity=n))
    x = torch.randn(n, 3, 32, 32)
    sparse, masked = logits_both(model, x, policies(n, 15, "random"))
    assert_close(sparse, masked, rtol=RTOL)
    model.execution = "sparse"
    with pytest.raises(RuntimeError, match="zero rows, which would enter BatchNorm"):
        model.train()(x, policies(n, 15, "random"))


# ----------------------------------------------------------------------------- the release's naming
# Written from the release's models/resnet.py and models/base.py (FlatResNet32, FlatResNet224,
# Policy32, Policy224, BasicBlock, Bottleneck, DownsampleB), independently of our model code.
def flat_resnet32_keys(layers, num_classes, legacy=False, prefix=""):
    keys = {f"{prefix}conv1.weight": (16, 3, 3, 3)}
    bn_keys(keys, f"{prefix}bn1", 16, legacy)
    inplanes = 16
    for s, planes in enumerate((16, 32, 64)):
        for j in range(layers[s]):
            name = f"{prefix}blocks.{s}.{j}"
            keys[f"{name}.conv1.weight"] = (planes, inplanes if j == 0 else planes, 3, 3)
            bn_keys(keys, f"{name}.bn1", planes, legacy)
            keys[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
            bn_keys(keys, f"{name}.bn2", planes, legacy)
        inplanes = planes  # DownsampleB has no parameters
    if num_classes is not None:
        keys[f"{prefix}fc.weight"] = (num_classes, 64)
        keys[f"{prefix}fc.bias"] = (num_classes,)
    return keys


def flat_resnet224_keys(layers, bottleneck, num_classes, legacy=False, prefix=""):
    keys = {f"{prefix}conv1.weight": (64, 3, 7, 7)}
    bn_keys(keys, f"{prefix}bn1", 64, legacy)
    inplanes, expansion = 64, (4 if bottleneck else 1)
    for s, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
        out = planes * expansion
        if stride != 1 or inplanes != out:
            keys[f"{prefix}ds.{s}.0.weight"] = (out, inplanes, 1, 1)
            bn_keys(keys, f"{prefix}ds.{s}.1", out, legacy)
        for j in range(layers[s]):
            name, cin = f"{prefix}blocks.{s}.{j}", inplanes if j == 0 else out
            if bottleneck:
                keys[f"{name}.conv1.weight"] = (planes, cin, 1, 1)
                keys[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
                keys[f"{name}.conv3.weight"] = (out, planes, 1, 1)
                for i, c in ((1, planes), (2, planes), (3, out)):
                    bn_keys(keys, f"{name}.bn{i}", c, legacy)
            else:
                keys[f"{name}.conv1.weight"] = (planes, cin, 3, 3)
                keys[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
                bn_keys(keys, f"{name}.bn1", planes, legacy)
                bn_keys(keys, f"{name}.bn2", planes, legacy)
        inplanes = out
    if num_classes is not None:
        keys[f"{prefix}fc.weight"] = (num_classes, 512 * expansion)
        keys[f"{prefix}fc.bias"] = (num_classes,)
    return keys


def policy_keys(features, feat_dim, num_blocks):
    keys = dict(features)
    keys.update({"logit.weight": (num_blocks, feat_dim), "logit.bias": (num_blocks,), "vnet.weight": (1, feat_dim), "vnet.bias": (1,)})
    return keys


CASES = {
    "resnet32": (lambda: resnet32_cifar(), lambda legacy: flat_resnet32_keys([5, 5, 5], 10, legacy)),
    "resnet110": (lambda: resnet110_cifar(100), lambda legacy: flat_resnet32_keys([18, 18, 18], 100, legacy)),
    "resnet101": (lambda: resnet101_imagenet(), lambda legacy: flat_resnet224_keys([3, 4, 23, 3], True, 1000, legacy)),
    "policy32": (
        lambda: policy_net_cifar(54),
        lambda legacy: policy_keys(flat_resnet32_keys([1, 1, 1], None, legacy, "features."), 64, 54),
    ),
    "policy224": (
        lambda: policy_net_imagenet(33),
        lambda legacy: policy_keys(flat_resnet224_keys([1, 1, 1, 1], False, None, legacy, "features."), 512, 33),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_release_naming(name):
    make, keys = CASES[name]
    model = make()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == keys(False)
    legacy = random_state(keys(True))  # the release's PyTorch 0.3 checkpoints: no num_batches_tracked
    model.load_state_dict(legacy)
    for k, v in legacy.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_load_original_checkpoint():
    agent = BlockDrop(policy_net_cifar(15), resnet32_cifar())
    resnet = random_state(flat_resnet32_keys([5, 5, 5], 10))
    policy = random_state(policy_keys(flat_resnet32_keys([1, 1, 1], None, True, "features."), 64, 15))
    policy["features.fc.weight"] = torch.randn(10, 64)  # old agent checkpoints still hold it
    agent.load_original_checkpoint({"resnet": {"module." + k: v for k, v in resnet.items()}, "agent": policy, "epoch": 3})
    assert torch.equal(agent.backbone.blocks[2][4].conv2.weight, resnet["blocks.2.4.conv2.weight"])
    assert torch.equal(agent.policy_net.logit.weight, policy["logit.weight"])
    with pytest.raises(KeyError, match="none of the keys"):
        agent.load_original_checkpoint({"state_dict": {}})


# ----------------------------------------------------------------------------- FLOPs
def test_flops():
    model = resnet32_cifar()
    # Counted by hand: stage s at resolution 32 / 2^s with 16 * 2^s channels; the first block of
    # stages 1 and 2 has a stride-2 conv1 from half the channels; 2 FLOPs per multiply-add.
    expected = []
    for s in range(3):
        hw, c = (32 >> s) ** 2, 16 << s
        for j in range(5):
            cin = c // 2 if (j == 0 and s > 0) else c
            expected.append(2.0 * hw * c * 9 * (cin + c))
    fixed = 2.0 * (32 * 32 * 16 * 27 + 64 * 10)
    policy = policies(6, 15, "random")
    count = model_flops(model, torch.randn(6, 3, 32, 32), policy)
    assert count.dense == fixed + sum(expected)
    assert torch.equal(count.per_sample, fixed + policy.double() @ torch.tensor(expected, dtype=torch.float64))


def test_resnet101_flops_are_resnet101s():
    count = model_flops(resnet101_imagenet(), torch.randn(1, 3, 224, 224), torch.ones(1, 33), per_sample=False)
    assert 15.5e9 < count.dense < 15.8e9  # ResNet-101: 7.8 G multiply-adds at 224x224
    assert count.executed == count.dense  # every block kept


# ----------------------------------------------------------------------------- agent and training
def test_agent_modes():
    agent = BlockDrop(policy_net_cifar(15), tame_bn(resnet32_cifar())).eval()
    x = torch.randn(5, 3, 32, 32)
    out = agent(x, "threshold")
    assert torch.equal(out.policy, (out.probs >= 0.5).float())
    assert torch.equal(out.blocks_used, out.policy.sum(1))
    assert_close(out.logits, agent.backbone(x, out.policy))
    logits, policy, probs = agent(x, mode="sample")
    assert probs.min() >= 0.2 - 1e-6 and probs.max() <= 0.8 + 1e-6  # alpha = 0.8 bound
    assert set(policy.unique().tolist()) <= {0.0, 1.0} and logits.shape == (5, 10)
    with pytest.raises(ValueError, match="mode must be one of"):
        agent(x, mode="greedy")
    with pytest.raises(ValueError, match="gives 54 decisions but the backbone has 15 blocks"):
        BlockDrop(policy_net_cifar(54), resnet32_cifar())


def test_imagenet_policy_sees_112():
    seen = []
    net = policy_net_imagenet(33)
    net.features.conv1.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 33)
    assert seen == [(112, 112)]


def test_reward():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    targets = torch.tensor([0, 0, 0])
    policy = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    reward, correct = blockdrop_reward(logits, targets, policy, penalty=-5.0)
    assert correct.tolist() == [True, False, True]
    assert reward.tolist() == [1 - 0.25**2, -5.0, 1 - 0.5**2]


@pytest.mark.parametrize("cl_step", [None, 3])
def test_reinforce_step_trains_the_policy_only(cl_step):
    torch.manual_seed(0)
    agent = BlockDrop(policy_net_cifar(15), tame_bn(resnet32_cifar(backend="cpu")))
    images, labels = synthetic_cifar(6)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    opt = torch.optim.Adam(agent.policy_net.parameters(), lr=1e-2)
    stats = reinforce_step(agent, images, labels, opt, cl_step=cl_step)
    after = agent.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["policy_net.logit.weight"], after["policy_net.logit.weight"])
    assert 0 <= stats.blocks_used <= 15 and -1 <= stats.reward <= 1
    if cl_step is not None:
        assert stats.blocks_used >= 15 - cl_step


# ----------------------------------------------------------------------------- errors
def test_bad_input_errors():
    model = resnet32_cifar()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"policy must be \[N, num_blocks\] = \[2, 15\], got \(2, 14\)"):
        model(x, torch.ones(2, 14))
    with pytest.raises(ValueError, match=r"policy must be \[N, num_blocks\] = \[2, 15\], got \(3, 15\)"):
        model(x, torch.ones(3, 15))
    with pytest.raises(ValueError, match=r"policy must be \[N, 15\]"):
        model(x, torch.ones(15))
    with pytest.raises(TypeError, match="policy must be a floating or bool tensor"):
        model(x, torch.ones(2, 15, dtype=torch.int32))
    with pytest.raises(TypeError, match="policy must be a torch.Tensor"):
        model(x, [[1] * 15] * 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model("image", None)
    with pytest.raises(ValueError, match=r"x must be \[N, 3, H, W\]"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="execution must be one of"):
        model.execution = "dense"
    with pytest.raises(ValueError, match="execution must be one of"):
        resnet110_cifar(execution="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        resnet32_cifar(backend="gpu")
