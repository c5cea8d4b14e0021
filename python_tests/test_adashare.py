"""AdaShare: sparse equals masked execution for every kind of policy, what the sparse
execution shares between tasks, the policies, training gradients, the original's parameter
naming, and errors on bad input."""
import functools

import pytest
import torch
from _utils import assert_all_close, assert_loads, bn_keys, both_executions, random_state, state_shapes, tame_bn

from dynkernels.models import adashare

RTOL = 1e-4
TASKS = (5, 3, 2)


@functools.lru_cache(maxsize=None)
def tamed_net():
    """ResNet-18 backbone, three tasks, narrow heads; shared by the tests that do not change it."""
    return tame_bn(adashare.resnet18(TASKS, head_width=32))


def policies(kind):
    t, b = len(TASKS), 8
    if kind == "random":
        return (torch.rand(t, b) < 0.5).float()
    if kind == "bool":
        return torch.rand(t, b) < 0.5
    if kind == "shared_prefix":  # tasks 0 and 1 agree on the first 5 blocks, task 2 on none
        p = torch.tensor([[1, 1, 0, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1, 1, 0]])
        return p.float()
    if kind == "identical":
        return torch.tensor([[1, 0, 1, 1, 0, 1, 1, 0]] * t).float()
    if kind == "soft":
        return torch.rand(t, b)
    return torch.zeros(t, b) if kind == "all_skip" else torch.ones(t, b)


def assert_outputs_equal(sparse, masked):
    assert_all_close(sparse.outputs, masked.outputs, rtol=RTOL)
    assert torch.equal(sparse.policy, masked.policy)


@pytest.mark.parametrize("kind", ["random", "bool", "shared_prefix", "identical", "soft", "all_skip", "all_keep"])
@pytest.mark.parametrize("n", [1, 5])
def test_sparse_equals_masked(kind, n):
    model = tamed_net()
    x = torch.randn(n, 3, 32, 24)
    policy = policies(kind)
    sparse, masked = both_executions(model, lambda: model(x, policy))
    assert_outputs_equal(sparse, masked)
    assert [o.shape for o in sparse.outputs] == [(n, c, 5, 4) for c in TASKS]  # output stride 8


def test_default_policy_and_channels_last():
    model = tamed_net()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.task2_logits[3] = torch.tensor([0.0, 1.0])  # task 2 skips block 3
    try:
        sparse, masked = both_executions(model, lambda: model(x.contiguous(memory_format=torch.channels_last)))
    finally:
        with torch.no_grad():
            model.task2_logits.fill_(0.5)
    assert_outputs_equal(sparse, masked)
    expected = torch.ones(3, 8)
    expected[1, 3] = 0
    assert torch.equal(sparse.policy, expected)  # argmax, ties keep ("equal" init: all 0.5)


def counting_calls(model):
    """{module name: forward calls} for the stem conv and every branch, via forward hooks."""
    calls, hooks = {}, []
    named = [("stem", model.backbone.conv1)] + [
        (f"{s}.{j}", branch) for s, stage in enumerate(model.backbone.blocks) for j, branch in enumerate(stage)
    ]
    for name, m in named:
        calls[name] = 0
        hooks.append(m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)))
    return calls, hooks


def test_sparse_runs_shared_work_once():
    model = tamed_net()
    calls, hooks = counting_calls(model)
    try:
        model.execution = "masked"
        model(torch.randn(2, 3, 32, 32), policies("shared_prefix"))
        assert set(calls.values()) == {3}  # every block for every task
        calls.update((k, 0) for k in calls)
        model.execution = "sparse"
        model(torch.randn(2, 3, 32, 32), policies("shared_prefix"))
    finally:
        for h in hooks:
            h.remove()
    # blocks: 0.0 kept by tasks 0, 1 (one call); 0.1 by all (tasks 0, 1 share it); 1.0 by task 2
    # only; 1.1 by tasks 0, 1 (shared); from 2.1 on task 1 differs from task 0
    assert calls == {"stem": 1, "0.0": 1, "0.1": 2, "1.0": 1, "1.1": 1, "2.0": 2, "2.1": 2, "3.0": 2, "3.1": 2}


def test_policies():
    model = adashare.resnet18((4, 2), head_width=8, skip_layer=2, init_method="random")
    assert model.task_logits().shape == (2, 6, 2)
    p = model.test_policy()
    logits = model.task_logits()
    assert torch.equal(p[:, :2], torch.ones(2, 2)) and torch.equal(p[:, 2:], (logits[..., 0] >= logits[..., 1]).float())
    torch.manual_seed(5)
    sampled = model.test_policy(sample=True)
    torch.manual_seed(5)
    assert torch.equal(model.test_policy(sample=True), sampled) and set(sampled.unique().tolist()) <= {0.0, 1.0}
    soft = model.gumbel_policy()
    assert soft.requires_grad and torch.equal(soft[:, :2], torch.ones(2, 2)) and ((soft[:, 2:] > 0) & (soft[:, 2:] < 1)).all()
    model.hard_sampling = True
    assert set(model.gumbel_policy().unique().tolist()) <= {0.0, 1.0}
    chosen = adashare.resnet18((4,), head_width=8, init_method="all_chosen", init_neg_logits=-3.0)
    assert torch.equal(chosen.task1_logits[0], torch.tensor([0.0, -3.0])) and chosen.test_policy().min() == 1


def policy_grads(model, x, policy):
    """(outputs, grads of x, of every parameter, and of policy) of a loss on all task outputs."""
    model.zero_grad(set_to_none=True)
    xi, pi = x.clone().requires_grad_(), policy.detach().clone().requires_grad_()
    out = model(xi, pi)
    sum(o.square().sum() for o in out.outputs).backward()
    grads = [xi.grad, pi.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    return out, grads


def test_training_gradients():
    """Soft policies (every block runs): the gradients agree exactly. 0/1 policies: sparse
    execution takes the gradient with respect to a skipped block's weight as 0, the
    reference is the masked execution with those weights detached."""
    model = tamed_net().train()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)):
            m.eval()
    x = torch.randn(2, 3, 24, 24)
    try:
        soft = policies("soft")
        (s_out, s_grads), (m_out, m_grads) = both_executions(model, lambda: policy_grads(model, x, soft))
        assert_outputs_equal(s_out, m_out)
        assert_all_close(s_grads, m_grads, rtol=RTOL)

        hard = policies("shared_prefix")
        model.execution = "sparse"
        s_out, s_grads = policy_grads(model, x, hard)
        model.execution = "masked"
        m_out, m_grads = policy_grads(model, x, hard)
        skipped = hard == 0
        m_grads[1] = torch.where(skipped, torch.zeros(()), m_grads[1])
        assert s_grads[1][skipped].abs().sum() == 0 and m_out.outputs[0].requires_grad
        assert_outputs_equal(s_out, m_out)
        assert_all_close(s_grads, m_grads, rtol=RTOL)
    finally:
        model.eval()


def test_training_mode_gumbel_policy():
    model = adashare.resnet18((3,), head_width=8, hard_sampling=True).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.policy.requires_grad and set(out.policy.unique().tolist()) <= {0.0, 1.0}
    out.outputs[0].square().sum().backward()
    assert model.task1_logits.grad is not None and torch.isfinite(model.task1_logits.grad).all()


# ----------------------------------------------------------------------------- the original's naming
# Written from the original's models/deeplab_resnet.py and models/base.py (MTL2,
# Deeplab_ResNet_Backbone, BasicBlock, Classification_Module), independently of our model code.
def original_keys(layers, tasks_num_class, skip_layer=0, width=1024, legacy=False):
    keys = {"backbone.conv1.weight": (64, 3, 7, 7)}
    bn_keys(keys, "backbone.bn1", 64, legacy)
    inplanes = 64
    for s, (planes, stride, dilation) in enumerate(zip((64, 128, 256, 512), (1, 2, 1, 1), (1, 1, 2, 4))):
        if stride != 1 or inplanes != planes or dilation in (2, 4):
            keys[f"backbone.ds.{s}.0.weight"] = (planes, inplanes, 1, 1)
            bn_keys(keys, f"backbone.ds.{s}.1", planes, legacy)
        for j in range(layers[s]):
            name = f"backbone.blocks.{s}.{j}"
            keys[f"{name}.conv1.weight"] = (planes, inplanes if j == 0 else planes, 3, 3)
            keys[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
            bn_keys(keys, f"{name}.bn1", planes, legacy)
            bn_keys(keys, f"{name}.bn2", planes, legacy)
        inplanes = planes
    for t, num_class in enumerate(tasks_num_class, start=1):
        for c in range(4):
            head = f"task{t}_fc1_c{c}"
            keys.update({f"{head}.conv1.weight": (width, 512, 3, 3), f"{head}.conv1.bias": (width,),
                         f"{head}.conv2.weight": (width, width, 1, 1), f"{head}.conv2.bias": (width,),
                         f"{head}.conv3.weight": (num_class, width, 1, 1), f"{head}.conv3.bias": (num_class,)})
        keys[f"task{t}_logits"] = (sum(layers) - skip_layer, 2)
    return keys


def test_original_naming():
    # Cityscapes: segmentation, depth; the original's 1024-wide heads
    assert state_shapes(lambda: adashare.resnet34((19, 1))) == original_keys([3, 4, 6, 3], (19, 1))


def test_loads_original_snapshot():
    model = adashare.resnet18((40, 3, 1), head_width=16, skip_layer=3)
    keys = original_keys([2, 2, 2, 2], (40, 3, 1), 3, 16, legacy=True)
    assert state_shapes(lambda: adashare.resnet18((40, 3, 1), head_width=16, skip_layer=3)) == original_keys([2, 2, 2, 2], (40, 3, 1), 3, 16)
    state = random_state(keys)
    model.load_original_checkpoint({"mtl-net": state, "alphas": {}, "iter": 4000})  # the original's snapshot
    assert_loads(model, state)
    model.load_original_checkpoint({"state_dict": {"module." + k: -v for k, v in state.items()}})
    assert torch.equal(model.task3_logits, -state["task3_logits"])


def test_bad_input_errors():
    model = tamed_net()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"policy must be a \[num_tasks, num_blocks\] = \[3, 8\] tensor"):
        model(x, torch.ones(3, 7))
    with pytest.raises(ValueError, match=r"policy must be a \[num_tasks, num_blocks\]"):
        model(x, [[1] * 8] * 3)
    with pytest.raises(TypeError, match="policy must be a floating or bool tensor"):
        model(x, torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must be a \[N, 3, H, W\] tensor"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="execution must be one of"):
        model.execution = "dense"
    with pytest.raises(ValueError, match="tasks_num_class must be a non-empty list of positive ints"):
        adashare.resnet18(())
    with pytest.raises(ValueError, match=r"skip_layer must be an int in \[0, 8\)"):
        adashare.resnet18((2,), head_width=8, skip_layer=8)
    with pytest.raises(ValueError, match="init_method must be one of"):
        adashare.resnet18((2,), head_width=8, init_method="zeros")
    with pytest.raises(ValueError, match="needs init_neg_logits"):
        adashare.resnet18((2,), head_width=8, init_method="all_chosen")
