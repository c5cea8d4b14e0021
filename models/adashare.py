"""AdaShare (Sun et al., "AdaShare: Learning What To Share For Efficient Deep Multi-Task
Learning", NeurIPS 2020): one backbone for several tasks; each task learns which residual
blocks it runs (a policy per task, the same for every sample of the batch).

Semantics (the original's MTL2 with Deeplab_ResNet_Backbone), task k, block t, keep weight
g = policy[k, t]:

    x_{t+1} = g * relu(residual + F(x_t)) + (1 - g) * residual

residual = the stage's downsample (conv 1x1 + BN; where the stride, width or dilation
changes) for the first block of a stage, else x_t; then per task four dilated heads (rates
6, 12, 18, 24, summed) on the task's features. The backbone is DeepLab's ResNet-18/34 (basic
blocks; output stride 8: stages 3 and 4 dilated by 2 and 4 instead of strided).

Policies [num_tasks, num_blocks] (the first skip_layer blocks always run; the other entries
come from the per-task logits task<k>_logits [num_blocks - skip_layer, 2], column 0 = keep):
    training mode, policy=None: Gumbel-softmax of the logits (F.gumbel_softmax with
        `temperature`, `hard_sampling` as the original's hard_sampling), keep weight column 0
    eval mode, policy=None: `test_policy()`: keep where the keep logit is at least the skip
        logit (the original's argmax); test_policy(sample=True) draws keep ~ softmax(logits)[0]
        (the original samples a policy once and then evaluates with it fixed: pass it as
        `policy=`)
    policy=<[num_tasks, num_blocks] tensor>: given keep weights (0/1, or soft)
forward(x, policy=None) -> AdaShareOutput(outputs: one [N, classes_k, H/8, W/8] per task,
policy [num_tasks, num_blocks]).

Executions. "masked" runs every block for every task and mixes with the weights (the
original: num_tasks full backbone passes). "sparse" runs a block for a task only where its
weight is non-zero, and computes what tasks share once: the stem, and every block while the
tasks' policies agree (tasks whose policies are equal up to block t have equal features
there). Since a policy holds for the whole batch, this is a plain skip per task: no
per-sample compaction and no sparse kernel are needed, only the policy's values on the host
(one host sync per forward, none when the policy is a CPU tensor). Both executions give the
same outputs. Gradients agree except the gradient with respect to a weight that is exactly 0
(a skipped block; hard Gumbel samples), which needs the skipped block's output: sparse
execution takes it as 0.

Module and parameter names follow the original (github.com/sunxm2357/AdaShare,
models/deeplab_resnet.py and models/base.py): backbone.{conv1, bn1, blocks.<stage>.<block>.
{conv1,bn1,conv2,bn2}, ds.<stage>.{0,1}}, task<k>_fc1_c<0-3>.{conv1,conv2,conv3},
task<k>_logits. Its snapshots ({'mtl-net': state, ...}, see `load_original_checkpoint`) load.
Only the basic-block backbones are built (the original also has a ResNet-101 bottleneck
variant).
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.models._gating import check_images, original_state_dict
from dynkernels.models.blockdrop import BasicBranch
from dynkernels.nn.skip_block import check_execution

HEAD_RATES = (6, 12, 18, 24)
INIT_METHODS = ("equal", "random", "all_chosen")


class ClassificationModule(nn.Module):
    """A task head (the original's Classification_Module): dilated conv3x3 ReLU Dropout,
    conv1x1 ReLU Dropout, conv1x1 to the task's channels."""

    def __init__(self, inplanes: int, num_classes: int, rate: int, width: int = 1024):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 3, 1, rate, rate)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.conv3 = nn.Conv2d(width, num_classes, 1)
        self.dropout = nn.Dropout()

    def forward(self, x):
        x = self.dropout(F.relu(self.conv1(x)))
        x = self.dropout(F.relu(self.conv2(x)))
        return self.conv3(x)


class DeepLabResNet(nn.Module):
    """The shared backbone (the original's Deeplab_ResNet_Backbone with basic blocks): the
    stem, then stages of 64/128/256/512 channels with strides 1/2/1/1 and dilations 1/1/2/4.
    `blocks[s][j]` are residual branches F, `ds[s]` the stages' downsamples (None: identity)."""

    def __init__(self, layers: Sequence[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        blocks, ds, inplanes = [], [], 64
        for planes, n, stride, dilation in zip((64, 128, 256, 512), layers, (1, 2, 1, 1), (1, 1, 2, 4)):
            down = None
            if stride != 1 or inplanes != planes or dilation > 1:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            ds.append(down)
            blocks.append(nn.ModuleList([BasicBranch(inplanes if j == 0 else planes, planes, stride if j == 0 else 1, dilation) for j in range(n)]))
            inplanes = planes
        self.blocks = nn.ModuleList(blocks)
        self.ds = nn.ModuleList(ds)
        self.layer_config = list(layers)
        self.num_blocks = sum(layers)
        self.out_channels = inplanes
        for m in self.modules():  # the original's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def seed(self, x):
        return self.maxpool(F.relu(self.bn1(self.conv1(x))))

    def units(self):
        """(downsample or None, branch) of every block in order; the downsample only for the
        first block of a stage."""
        for s, stage in enumerate(self.blocks):
            for j, branch in enumerate(stage):
                yield (self.ds[s] if j == 0 else None), branch


class AdaShareOutput(NamedTuple):
    outputs: List[torch.Tensor]  # one [N, classes_k, h, w] per task
    policy: torch.Tensor  # [num_tasks, num_blocks]: the keep weights used


def _mix(fx: torch.Tensor, residual: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return fx * w + residual * (1 - w)


class AdaShare(nn.Module):
    """Multi-task network with a learned per-task block policy (see the module docstring).
    `execution` ("masked" | "sparse"), `temperature` and `hard_sampling` are settable."""

    def __init__(
        self,
        layers: Sequence[int],
        tasks_num_class: Sequence[int],
        execution: str = "sparse",
        skip_layer: int = 0,
        init_method: str = "equal",
        init_neg_logits: Optional[float] = None,
        head_width: int = 1024,
        temperature: float = 5.0,
        hard_sampling: bool = False,
    ):
        super().__init__()
        tasks_num_class = list(tasks_num_class)
        if not tasks_num_class or not all(isinstance(c, int) and c > 0 for c in tasks_num_class):
            raise ValueError(f"AdaShare: tasks_num_class must be a non-empty list of positive ints, got {tasks_num_class!r}")
        self.backbone = DeepLabResNet(layers)
        self.num_tasks = len(tasks_num_class)
        self.num_blocks = self.backbone.num_blocks
        if not isinstance(skip_layer, int) or not 0 <= skip_layer < self.num_blocks:
            raise ValueError(f"AdaShare: skip_layer must be an int in [0, {self.num_blocks}), got {skip_layer!r}")
        if init_method not in INIT_METHODS:
            raise ValueError(f"AdaShare: init_method must be one of {INIT_METHODS}, got {init_method!r}")
        if init_method == "all_chosen" and init_neg_logits is None:
            raise ValueError("AdaShare: init_method='all_chosen' needs init_neg_logits (the skip logit)")
        self.skip_layer = skip_layer
        for k, num_class in enumerate(tasks_num_class, start=1):
            for c, rate in enumerate(HEAD_RATES):
                setattr(self, f"task{k}_fc1_c{c}", ClassificationModule(self.backbone.out_channels, num_class, rate, head_width))
        for k in range(1, self.num_tasks + 1):
            rows = self.num_blocks - skip_layer
            if init_method == "equal":
                logits = 0.5 * torch.ones(rows, 2)
            elif init_method == "random":
                logits = 1e-3 * torch.randn(rows, 2)
            else:
                logits = float(init_neg_logits) * torch.ones(rows, 2)
                logits[:, 0] = 0
            self.register_parameter(f"task{k}_logits", nn.Parameter(logits))
        self.execution = execution
        self.temperature = temperature
        self.hard_sampling = hard_sampling

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("AdaShare", value)

    def task_logits(self) -> torch.Tensor:
        """[num_tasks, num_blocks - skip_layer, 2] (keep, skip)."""
        return torch.stack([getattr(self, f"task{k}_logits") for k in range(1, self.num_tasks + 1)])

    def _pad(self, keep: torch.Tensor) -> torch.Tensor:
        """Prepend the always-kept first skip_layer blocks."""
        return torch.cat([keep.new_ones(self.num_tasks, self.skip_layer), keep], 1)

    def gumbel_policy(self) -> torch.Tensor:
        """Training-time keep weights [num_tasks, num_blocks]: Gumbel-softmax samples of the
        task logits (soft, or 0/1 with a straight-through gradient if hard_sampling)."""
        logits = self.task_logits()
        return self._pad(F.gumbel_softmax(logits, tau=self.temperature, hard=self.hard_sampling, dim=-1)[..., 0])

    @torch.no_grad()
    def test_policy(self, sample: bool = False) -> torch.Tensor:
        """A 0/1 policy [num_tasks, num_blocks]: keep where the keep logit is at least the skip
        logit, or (sample=True) keep with probability softmax(logits)[0]."""
        logits = self.task_logits()
        keep = torch.bernoulli(torch.softmax(logits, -1)[..., 0]) if sample else (logits[..., 0] >= logits[..., 1]).to(logits.dtype)
        return self._pad(keep)

    def _check_policy(self, policy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = (self.num_tasks, self.num_blocks)
        if not isinstance(policy, torch.Tensor) or tuple(policy.shape) != shape:
            raise ValueError(f"AdaShare: policy must be a [num_tasks, num_blocks] = {list(shape)} tensor, got {getattr(policy, 'shape', type(policy).__name__)}")
        if not (policy.dtype.is_floating_point or policy.dtype == torch.bool):
            raise TypeError(f"AdaShare: policy must be a floating or bool tensor, got {policy.dtype}")
        return policy.to(x.dtype)

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> AdaShareOutput:
        check_images("AdaShare", x)
        if policy is None:
            policy = self.gumbel_policy() if self.training else self.test_policy()
        policy = self._check_policy(policy, x)
        if self.execution == "masked":
            feats = self._features_masked(x, policy.to(x.device))
        else:
            feats = self._features_sparse(x, policy)
        outputs = [
            sum(getattr(self, f"task{k + 1}_fc1_c{c}")(f) for c in range(len(HEAD_RATES)))
            for k, f in enumerate(feats)
        ]
        return AdaShareOutput(outputs, policy)

    def _features_masked(self, x, policy):
        """Every block for every task, mixed by the weights (the original)."""
        feats = []
        for k in range(self.num_tasks):
            h = self.backbone.seed(x)
            for t, (ds, branch) in enumerate(self.backbone.units()):
                residual = h if ds is None else ds(h)
                h = _mix(F.relu(residual + branch(h)), residual, policy[k, t])
            feats.append(h)
        return feats

    def _features_sparse(self, x, policy):
        """Each block only for the tasks that keep it, and once for tasks that share it.

        `paths` holds (tasks, features) with one features tensor per group of tasks whose
        features are equal so far. At each block a group splits by the tasks' weights: weight
        0 gives the residual and weight 1 (without a gradient to the policy) the block's
        output, both shared by the tasks with that weight; any other weight, or one that
        carries a gradient, gives each task its own mix.
        """
        weights = policy.tolist()  # the one host sync (none for a CPU policy)
        on_device = policy.to(x.device)
        paths = [(list(range(self.num_tasks)), self.backbone.seed(x))]
        for t, (ds, branch) in enumerate(self.backbone.units()):
            next_paths = []
            for tasks, h in paths:
                residual = h if ds is None else ds(h)
                fx = None
                groups = {}
                for k in tasks:
                    w = weights[k][t]
                    shared = w == 0 or (w == 1 and not policy.requires_grad)
                    groups.setdefault(w if shared else ("own", k), []).append(k)
                for key, members in groups.items():
                    if key == 0:
                        next_paths.append((members, residual))
                        continue
                    if fx is None:
                        fx = F.relu(residual + branch(h))
                    out = fx if key == 1 else _mix(fx, residual, on_device[members[0], t])
                    next_paths.append((members, out))
            paths = next_paths
        feats = [None] * self.num_tasks
        for tasks, h in paths:
            for k in tasks:
                feats[k] = h
        return feats

    def load_original_checkpoint(self, checkpoint: dict) -> None:
        """Load a snapshot saved by the original's environment ({'mtl-net': state dict, ...,
        'iter': ...}), or {'state_dict': ...}, or a bare state dict in the original naming."""
        if isinstance(checkpoint, dict) and "mtl-net" in checkpoint:
            checkpoint = checkpoint["mtl-net"]
        self.load_state_dict(original_state_dict("AdaShare.load_original_checkpoint", checkpoint))


def resnet18(tasks_num_class: Sequence[int] = (40, 3), execution: str = "sparse", **kwargs) -> AdaShare:
    """AdaShare on DeepLab ResNet-18 (2/2/2/2 basic blocks: 8 policy blocks per task); the
    default tasks are NYU v2's segmentation (40 classes) and surface normals (3). kwargs:
    skip_layer, init_method, init_neg_logits, head_width, temperature, hard_sampling."""
    return AdaShare([2, 2, 2, 2], tasks_num_class, execution, **kwargs)


def resnet34(tasks_num_class: Sequence[int] = (19, 1), execution: str = "sparse", **kwargs) -> AdaShare:
    """AdaShare on DeepLab ResNet-34 (3/4/6/3 basic blocks: 16 policy blocks per task); the
    default tasks are Cityscapes' segmentation (19 classes) and depth (1); kwargs as resnet18."""
    return AdaShare([3, 4, 6, 3], tasks_num_class, execution, **kwargs)


__all__ = ["AdaShare", "AdaShareOutput", "ClassificationModule", "DeepLabResNet", "resnet18", "resnet34"]
