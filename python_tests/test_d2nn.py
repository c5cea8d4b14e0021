"""D2NN's four designs: masked == sparse, only the chosen nodes run, decisions, errors."""
import pytest
import torch
import torch.nn as nn

from dynkernels.models import d2nn as D

from _utils import assert_close

RTOL = 1e-4
DESIGNS = (D.HighLowCapacityD2NN, D.CascadeD2NN, D.ChainD2NN, D.HierarchicalD2NN)


@torch.no_grad()
def split_decisions(model, x):
    """Give every control node weights that split the batch among its options (an untrained
    node tends to send every input to one option)."""
    torch.manual_seed(5)
    for node in model.modules():
        if isinstance(node, D.ControlNode):
            nn.init.normal_(node.fc.weight, std=10.0)
            nn.init.zeros_(node.fc.bias)
    # center each node's scores on this batch: run once, then subtract the mean score per option
    model.execution = "masked"
    scores = {}
    hooks = [n.register_forward_hook(lambda m, i, o: scores.setdefault(m, o)) for n in model.modules() if isinstance(n, D.ControlNode)]
    model(x)
    for h in hooks:
        h.remove()
    for node, s in scores.items():
        node.fc.bias -= s.mean(dim=0)


def build(cls, **kw):
    torch.manual_seed(0)
    return cls(**kw).eval()


def both(model, x):
    model.execution = "masked"
    with torch.no_grad():
        masked = model(x)
        model.execution = "sparse"
        return masked, model(x)


@pytest.mark.parametrize("cls", DESIGNS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("n", [1, 11])
def test_masked_equals_sparse(cls, n):
    model = build(cls, width=8)
    x = torch.randn(n, 3, 32, 32)
    split_decisions(model, x)
    masked, sparse = both(model, x)
    assert torch.equal(sparse.decisions, masked.decisions)
    torch.testing.assert_close(sparse.logits, masked.logits, rtol=RTOL, atol=RTOL * masked.logits[masked.logits.isfinite()].abs().max().item())
    if n == 11:
        assert sparse.decisions.unique().numel() > 1, "the decisions should differ between inputs"


def test_high_low_capacity_runs_each_head_on_its_inputs():
    model = build(D.HighLowCapacityD2NN, width=8)
    x = torch.randn(12, 3, 32, 32)
    split_decisions(model, x)
    seen = []
    model.heads.branches[1].register_forward_pre_hook(lambda m, i: seen.append(i[0].shape[0]))
    model.execution = "sparse"
    with torch.no_grad():
        out = model(x)
    assert seen == [int((out.decisions == 1).sum())]  # the high-capacity head ran on its inputs only


def test_cascade_exits_where_its_control_node_says_stop():
    model = build(D.CascadeD2NN, width=8, stages=3)
    x = torch.randn(16, 3, 32, 32)
    split_decisions(model, x)
    model.execution = "sparse"
    with torch.no_grad():
        out = model(x)
        h = model.cascade.stages[0](x)
        stop = model.cascade.controllers[0].node(h).argmax(dim=1) == 1
    assert torch.equal(out.decisions == 0, stop)


def test_chain_link_nobody_runs():
    model = build(D.ChainD2NN, width=8, links=2)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        model.controls[0].fc.bias.copy_(torch.tensor([50.0, -50.0]))  # every input passes by link 0
    masked, sparse = both(model, x)
    assert (sparse.decisions[:, 0] == 0).all()
    assert torch.equal(sparse.decisions, masked.decisions)
    assert_close(sparse.logits, masked.logits, rtol=RTOL)


def test_hierarchy_rules_out_other_groups():
    model = build(D.HierarchicalD2NN, num_classes=7, groups=[[0, 3], [1, 2, 6], [4, 5]], width=8)
    x = torch.randn(9, 3, 32, 32)
    split_decisions(model, x)
    model.execution = "sparse"
    with torch.no_grad():
        out = model(x)
    for i in range(9):
        finite = out.logits[i].isfinite().nonzero().flatten().tolist()
        assert finite == sorted(model.groups[int(out.decisions[i])])


def test_bad_input():
    with pytest.raises(ValueError, match=r"HierarchicalD2NN: groups must partition range\(4\)"):
        D.HierarchicalD2NN(num_classes=4, groups=[[0, 1], [1, 2, 3]])
    with pytest.raises(ValueError, match=r"CascadeD2NN: stages must be >= 1"):
        D.CascadeD2NN(stages=0)
    with pytest.raises(ValueError, match=r"ChainD2NN: x must be \[N, 3, H, W\]"):
        D.ChainD2NN()(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"HighLowCapacityD2NN: execution must be one of"):
        D.HighLowCapacityD2NN().execution = "dense"
