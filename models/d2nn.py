"""D2NN (Liu & Deng, "Dynamic Deep Neural Networks: Optimizing Accuracy-Efficiency Trade-offs by
Selective Execution", AAAI 2018): control nodes decide per input which regular nodes run.

The four designs of the paper's experiments, each a network of regular nodes and control nodes
(a control node is a small network whose output picks one of its options; at inference the
highest-scoring one):
  - high-low capacity: a shared trunk, then a control node picks a low-capacity head (a linear
    classifier) or a high-capacity one (more convolutions);
  - cascade: a sequence of classifiers of growing capacity; after each but the last, a control
    node decides whether the input stops there or goes on;
  - chain: a chain of nodes, each preceded by a control node that decides whether it runs or
    the input passes by it (the dummy node);
  - hierarchy: a coarse-to-fine classifier: the root control node picks one subtree (a group of
    classes), whose head classifies within the group.
The paper trains the control nodes with Q-learning; we found no public code release of it, so
the layer sizes here are ours (3x3 conv + BN + ReLU nodes on 32x32 inputs) and the parameter
names follow these modules. Control nodes give scores over their options (`ControlNode`); the decision is
their argmax.

Every node that a control node can skip is a branch of a dynkernels.nn.RouteBlock (high-low,
chain, hierarchy) or a stage of a dynkernels.nn.EarlyExit (cascade). execution="masked" runs
every node on every input and selects; execution="sparse" runs each node on the inputs routed
to it only. Host synchronisations per sparse forward: high-low 1, cascade one per control node
(up to K - 1), chain one per link, hierarchy 1 (each decision reads features computed just
before it).
"""
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from dynkernels.nn.early_exit import EarlyExit
from dynkernels.nn.route_block import RouteBlock
from dynkernels.nn.skip_block import check_execution
from dynkernels.ops import _checks


def conv_node(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """A regular node: 3x3 conv, BN, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def linear_head(channels: int, num_classes: int) -> nn.Sequential:
    """Global average pooling, then a linear classifier."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class ControlNode(nn.Module):
    """A control node: global average pooling and a linear layer give one score per option."""

    def __init__(self, channels: int, options: int):
        super().__init__()
        self.fc = nn.Linear(channels, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))

    def decide(self, x: torch.Tensor) -> torch.Tensor:
        """The option of highest score per input [N] (int64)."""
        return self(x).argmax(dim=1)


class StopScore(nn.Module):
    """A two-option control node (0: go on, 1: stop) as the score of an early exit: the
    softmax probability of stopping, so that threshold 0.5 is its argmax."""

    def __init__(self, channels: int):
        super().__init__()
        self.node = ControlNode(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.node(x).float(), dim=1)[:, 1]


class D2NNOutput(NamedTuple):
    logits: torch.Tensor  # [N, num_classes]
    decisions: torch.Tensor  # the control nodes' choices: [N] or [N, links] (int64)


class _D2NN(nn.Module):
    """execution (settable) is passed on to every RouteBlock / EarlyExit inside."""

    def _routed(self):
        return [m for m in self.modules() if isinstance(m, (RouteBlock, EarlyExit))]

    @property
    def execution(self) -> str:
        return self._routed()[0].execution

    @execution.setter
    def execution(self, value: str):
        check_execution(type(self).__name__, value)
        for m in self._routed():
            m.execution = value

    def _check_input(self, x):
        _checks.tensor(type(self).__name__, "x", x, (4,), "[N, 3, H, W]")


class HighLowCapacityD2NN(_D2NN):
    """trunk -> control node -> low-capacity head (option 0) or high-capacity head (option 1)."""

    def __init__(self, num_classes: int = 2, width: int = 16, execution: str = "sparse", backend: str = "auto", bucket="auto"):
        super().__init__()
        check_execution(type(self).__name__, execution)  # named here, not by the RouteBlock inside
        w = width
        self.trunk = nn.Sequential(conv_node(3, w), conv_node(w, w, 2))
        self.control = ControlNode(w, 2)
        low = linear_head(w, num_classes)
        high = nn.Sequential(conv_node(w, 2 * w, 2), conv_node(2 * w, 2 * w), conv_node(2 * w, 4 * w, 2), linear_head(4 * w, num_classes))
        self.heads = RouteBlock([low, high], execution, backend, bucket)

    def forward(self, x: torch.Tensor) -> D2NNOutput:
        self._check_input(x)
        h = self.trunk(x)
        choice = self.control.decide(h)
        return D2NNOutput(self.heads(h, choice), choice)


class CascadeD2NN(_D2NN):
    """K stages of growing capacity, a classifier after each; control nodes after all but the
    last decide whether to stop (exit) or go on."""

    def __init__(self, num_classes: int = 2, width: int = 16, stages: int = 4, execution: str = "sparse", backend: str = "auto", bucket="auto"):
        super().__init__()
        check_execution(type(self).__name__, execution)  # named here, not by the RouteBlock inside
        if stages < 1:
            raise ValueError(f"CascadeD2NN: stages must be >= 1, got {stages}")
        widths = [width * 2**k for k in range(stages)]
        nodes = [nn.Sequential(conv_node(3, widths[0]), conv_node(widths[0], widths[0], 2))]
        nodes += [nn.Sequential(conv_node(widths[k - 1], widths[k], 2), conv_node(widths[k], widths[k])) for k in range(1, stages)]
        self.cascade = EarlyExit(
            nodes,
            [linear_head(c, num_classes) for c in widths],
            0.5,
            controllers=[StopScore(c) for c in widths[:-1]],
            execution=execution,
            backend=backend,
            bucket=bucket,
        )

    def forward(self, x: torch.Tensor) -> D2NNOutput:
        self._check_input(x)
        return D2NNOutput(*self.cascade(x))


class ChainD2NN(_D2NN):
    """stem -> `links` nodes, each run or passed by as its control node decides (0: pass by,
    1: run) -> classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16, links: int = 4, execution: str = "sparse", backend: str = "auto", bucket="auto"):
        super().__init__()
        check_execution(type(self).__name__, execution)  # named here, not by the RouteBlock inside
        w = 2 * width
        self.stem = nn.Sequential(conv_node(3, width), conv_node(width, w, 2))
        self.controls = nn.ModuleList(ControlNode(w, 2) for _ in range(links))
        self.links = nn.ModuleList(
            RouteBlock([nn.Identity(), nn.Sequential(conv_node(w, w), conv_node(w, w))], execution, backend, bucket) for _ in range(links)
        )
        self.head = linear_head(w, num_classes)

    def forward(self, x: torch.Tensor) -> D2NNOutput:
        self._check_input(x)
        h = self.stem(x)
        decisions = []
        for control, link in zip(self.controls, self.links):
            choice = control.decide(h)
            h = link(h, choice)
            decisions.append(choice)
        return D2NNOutput(self.head(h), torch.stack(decisions, dim=1))


class SubtreeHead(nn.Module):
    """A subtree's classifier over its own classes, placed at their positions in the full
    class vector; the classes of other subtrees get -inf (this subtree rules them out)."""

    def __init__(self, channels: int, classes: Sequence[int], num_classes: int):
        super().__init__()
        self.node = conv_node(channels, 2 * channels, 2)
        self.fc = nn.Linear(2 * channels, len(classes))
        self.register_buffer("classes", torch.tensor(list(classes), dtype=torch.int64), persistent=False)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(self.node(x).mean(dim=(2, 3)))
        out = z.new_full((z.shape[0], self.num_classes), float("-inf"))
        return out.index_copy(1, self.classes, z)


class HierarchicalD2NN(_D2NN):
    """trunk -> root control node over the class groups -> the chosen group's head.

    groups: a partition of range(num_classes) (default: three groups of consecutive classes).
    The logits of classes outside the chosen group are -inf."""

    def __init__(self, num_classes: int = 10, groups: Optional[Sequence[Sequence[int]]] = None, width: int = 16, execution: str = "sparse", backend: str = "auto", bucket="auto"):
        super().__init__()
        check_execution(type(self).__name__, execution)  # named here, not by the RouteBlock inside
        if groups is None:
            bounds = [round(num_classes * g / 3) for g in range(4)]
            groups = [list(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
        flat = sorted(c for g in groups for c in g)
        if flat != list(range(num_classes)) or any(len(g) == 0 for g in groups):
            raise ValueError(f"HierarchicalD2NN: groups must partition range({num_classes}) into non-empty groups, got {groups}")
        self.groups = [list(g) for g in groups]
        self.trunk = nn.Sequential(conv_node(3, width), conv_node(width, 2 * width, 2))
        self.root = ControlNode(2 * width, len(groups))
        self.subtrees = RouteBlock([SubtreeHead(2 * width, g, num_classes) for g in groups], execution, backend, bucket)

    def forward(self, x: torch.Tensor) -> D2NNOutput:
        self._check_input(x)
        h = self.trunk(x)
        group = self.root.decide(h)
        return D2NNOutput(self.subtrees(h, group), group)


__all__ = [
    "ControlNode",
    "StopScore",
    "SubtreeHead",
    "D2NNOutput",
    "HighLowCapacityD2NN",
    "CascadeD2NN",
    "ChainD2NN",
    "HierarchicalD2NN",
    "conv_node",
    "linear_head",
]
