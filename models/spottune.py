"""SpotTune (Guo et al., CVPR 2019): per image, each residual block of a ResNet-26 runs either
its frozen pre-trained copy or its fine-tuned copy, as a small policy network decides.

Semantics (the release, github.com/gyhui14/spottune, spottune_models.py / agent_net.py /
main.py): the backbone is a CIFAR-style ResNet-26 (a 3x3 stem of 32 channels without ReLU,
three stages of 4 basic blocks with 64/128/256 channels, each stage starting with stride 2, an
average-pool-and-zero-channels shortcut, BN + ReLU, global pooling, a linear classifier), and
every block t exists twice: `blocks` (frozen) and `parallel_blocks` (fine-tuned). With the
policy's decision a_t per image (1: fine-tuned), block t gives
    x = relu(ds(x) + blocks[t](x)) * (1 - a_t) + relu(parallel_ds(x) + parallel_blocks[t](x)) * a_t.
The policy network is the same ResNet with one block per stage; its `linear` gives two logits
per block, and the decision is the hard Gumbel-softmax sample of them (temperature 5), at test
time too ("gumbel" here), or their argmax ("deterministic", the default here: the same image
always takes the same path).

execution="masked" is the release's computation (both copies of every block on every image,
mixed by the mask); execution="sparse" routes the images of each block to the copy they chose
(dynkernels.nn.route_block: `route`, a compact batch per copy, an in-place merge). The decisions
for all 12 blocks come from the policy network up front, so sparse execution routes all of
them with one `route` call and one host synchronisation per forward. Both give the same logits;
the gradient with respect to the decisions (which trains the policy through the straight-through
Gumbel sample) exists only in masked execution, as both copies are needed for it.

Module and parameter names follow the release: conv1, bn1, blocks.<s>.<b>.{conv1, bn1,
conv2.1, bn2}, parallel_blocks.<s>.<b>.*, bn2.0, linear (the shortcuts have no parameters).
The release's policy network also builds `parallel_blocks` it never uses;
SpotTunePolicyNet.load_state_dict drops them.
"""
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.models._gating import check_images
from dynkernels.models.blockdrop import BasicBranch, PadDownsample, resnet_init
from dynkernels.nn.route_block import RoutePlan, run_sparse, training_bucket
from dynkernels.nn.bucket import check_bucket
from dynkernels.nn.skip_block import check_execution
from dynkernels.ops import _checks, check_backend

MODES = ("deterministic", "gumbel")


class SpotTuneBranch(BasicBranch):
    """F(x) of the release's basic block: conv3x3(stride) BN ReLU, then conv2 = (ReLU, conv3x3), BN."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__(inplanes, planes, stride)
        self.conv2 = nn.Sequential(nn.ReLU(), self.conv2)  # the release's naming: conv2.1.weight


def _stage_layout(layers: Sequence[int], inplanes: int = 32, widths=(64, 128, 256)):
    """[(inplanes, planes, stride)] of every block, and the shortcut of each stage's first block."""
    blocks, shortcuts = [], []
    for planes, n in zip(widths, layers):
        shortcuts.append(PadDownsample(inplanes, planes, 2))
        blocks.append([(inplanes, planes, 2)] + [(planes, planes, 1)] * (n - 1))
        inplanes = planes
    return blocks, shortcuts


class SpotTuneResNet(nn.Module):
    """ResNet-26 with a frozen and a fine-tuned copy of every block.

    forward(x, policy=None): x [N, 3, H, W]; policy [N, num_blocks], 1 (or True, or > 0.5)
    where the image takes the fine-tuned copy of a block, 0 for the frozen one; None runs the
    frozen network (the release's forward without a policy). execution "masked" | "sparse"
    (settable), bucket as in dynkernels.nn.RouteBlock. forward(x, policy, plan) with plan =
    route(policy) built ahead reads nothing on the host (sparse execution without a host
    sync: torch.compile(fullgraph=True) traces it as one graph).
    """

    def __init__(self, layers: Sequence[int] = (4, 4, 4), num_classes: int = 10, execution: str = "sparse", backend: str = "auto", bucket="auto"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layout, shortcuts = _stage_layout(layers)
        self.blocks = nn.ModuleList(nn.ModuleList(SpotTuneBranch(*a) for a in stage) for stage in layout)
        self.ds = nn.ModuleList(shortcuts)
        self.parallel_blocks = nn.ModuleList(nn.ModuleList(SpotTuneBranch(*a) for a in stage) for stage in layout)
        self.parallel_ds = nn.ModuleList(_stage_layout(layers)[1])
        self.bn2 = nn.Sequential(nn.BatchNorm2d(256), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(256, num_classes)
        self.layer_config = list(layers)
        self.num_blocks = sum(layers)
        self.execution = execution
        self.backend = check_backend("SpotTuneResNet", backend)
        self.bucket = check_bucket("SpotTuneResNet", bucket)
        resnet_init(self)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("SpotTuneResNet", value)

    def seed(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))  # no ReLU, as in the release

    def _copies(self):
        """(block index t, frozen copy, fine-tuned copy) as callables x -> relu(shortcut(x) + F(x))."""
        t = 0
        for s, n in enumerate(self.layer_config):
            for b in range(n):
                ds, pds = (self.ds[s], self.parallel_ds[s]) if b == 0 else (None, None)
                frozen, tuned = self.blocks[s][b], self.parallel_blocks[s][b]
                yield t, _residual(frozen, ds), _residual(tuned, pds)
                t += 1

    def _check_input(self, x, policy):
        _checks.tensor("SpotTuneResNet", "x", x, (4,), "[N, 3, H, W]")
        check_images("SpotTuneResNet", x)
        if policy is None:
            return
        _checks.tensor("SpotTuneResNet", "policy", policy, (2,), f"[N, {self.num_blocks}] (images x blocks)")
        if policy.shape != (x.shape[0], self.num_blocks):
            raise ValueError(f"SpotTuneResNet: policy must be [N, num_blocks] = [{x.shape[0]}, {self.num_blocks}], got {tuple(policy.shape)}")
        _checks.same_device("SpotTuneResNet", "policy", policy, "x", x)

    def route(self, policy: torch.Tensor) -> RoutePlan:
        """The route of every block for a policy [N, num_blocks] (one `route` call, one host
        sync): what a sparse forward builds, for a caller that builds it ahead, e.g. outside a
        torch.compile'd forward, which then reads nothing on the host."""
        choice = (policy > 0.5).to(torch.int64) if policy.dtype != torch.bool else policy.to(torch.int64)
        return RoutePlan(choice, 2, self.backend)

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None, plan: Optional[RoutePlan] = None) -> torch.Tensor:
        """plan: route(policy) built ahead (sparse execution), or None to build it here."""
        self._check_input(x, policy)
        if plan is not None and (policy is None or not isinstance(plan, RoutePlan) or len(plan) != self.num_blocks):
            raise ValueError(f"SpotTuneResNet: plan must be route(policy) for the given policy ({self.num_blocks} blocks)")
        x = self.seed(x)
        if policy is None:
            for _, frozen, _ in self._copies():
                x = frozen(x)
        elif self.execution == "masked":
            mask = policy.to(x.dtype) if policy.dtype == torch.bool else policy
            for t, frozen, tuned in self._copies():
                m = mask[:, t].to(x.dtype).view(-1, 1, 1, 1)
                x = frozen(x) * (1 - m) + tuned(x) * m
        else:
            if plan is None:
                plan = self.route(policy)  # every block's route, one host sync
            bucket = training_bucket("SpotTuneResNet", self.bucket, self, x.device)
            for t, frozen, tuned in self._copies():
                x = run_sparse(x, [frozen, tuned], plan[t], bucket, self.backend, owner="SpotTuneResNet")
        x = self.bn2(x)
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _residual(branch: nn.Module, shortcut: Optional[nn.Module]):
    if shortcut is None:
        return lambda x: F.relu(x + branch(x))
    return lambda x: F.relu(shortcut(x) + branch(x))


class SpotTunePolicyNet(nn.Module):
    """The release's policy network: the same ResNet with one block per stage (frozen copies only;
    the release also builds parallel copies it never runs), whose `linear` gives 2 logits per
    backbone block. forward(x) -> logits [N, num_blocks, 2] (index 1: fine-tuned copy)."""

    def __init__(self, num_blocks: int = 12, layers: Sequence[int] = (1, 1, 1)):
        super().__init__()
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"SpotTunePolicyNet: num_blocks must be a positive int, got {num_blocks!r}")
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layout, shortcuts = _stage_layout(layers)
        self.blocks = nn.ModuleList(nn.ModuleList(SpotTuneBranch(*a) for a in stage) for stage in layout)
        self.ds = nn.ModuleList(shortcuts)
        self.bn2 = nn.Sequential(nn.BatchNorm2d(256), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(256, 2 * num_blocks)
        self.layer_config = list(layers)
        self.num_blocks = num_blocks
        resnet_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.tensor("SpotTunePolicyNet", "x", x, (4,), "[N, 3, H, W]")
        x = self.bn1(self.conv1(x))
        for s, stage in enumerate(self.blocks):
            for b, branch in enumerate(stage):
                x = F.relu((self.ds[s](x) if b == 0 else x) + branch(x))
        x = torch.flatten(self.avgpool(self.bn2(x)), 1)
        return self.linear(x).view(x.shape[0], self.num_blocks, 2)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("parallel_blocks.", "parallel_ds."))}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def decide(logits: torch.Tensor, mode: str = "deterministic", temperature: float = 5.0) -> torch.Tensor:
    """Per-block decisions [N, num_blocks] (float 0/1, 1 = fine-tuned) from logits [N, num_blocks, 2].

    "deterministic": the argmax; "gumbel": the release's hard Gumbel-softmax sample (straight
    through: the value is 0/1, the gradient that of the soft sample)."""
    if mode not in MODES:
        raise ValueError(f"SpotTune: mode must be one of {MODES}, got {mode!r}")
    if mode == "gumbel":
        return F.gumbel_softmax(logits, tau=temperature, hard=True, dim=-1)[..., 1]
    return (logits[..., 1] > logits[..., 0]).to(logits.dtype)


class SpotTuneOutput(NamedTuple):
    logits: torch.Tensor  # [N, num_classes]
    policy: torch.Tensor  # [N, num_blocks], 1 = fine-tuned copy


class SpotTune(nn.Module):
    """Policy network + backbone: forward(x, mode="deterministic" | "gumbel") -> (logits, policy).
    The backbone runs in its own `execution`."""

    def __init__(self, policy_net: SpotTunePolicyNet, backbone: SpotTuneResNet, temperature: float = 5.0):
        super().__init__()
        if policy_net.num_blocks != backbone.num_blocks:
            raise ValueError(f"SpotTune: the policy net decides {policy_net.num_blocks} blocks but the backbone has {backbone.num_blocks}")
        self.policy_net = policy_net
        self.backbone = backbone
        self.temperature = temperature

    def forward(self, x: torch.Tensor, mode: str = "deterministic") -> SpotTuneOutput:
        self.backbone._check_input(x, None)  # before the policy net sees x
        policy = decide(self.policy_net(x), mode, self.temperature)
        return SpotTuneOutput(self.backbone(x, policy), policy)


def resnet26(num_classes: int = 10, execution: str = "sparse", backend: str = "auto", bucket="auto") -> SpotTuneResNet:
    """The release's ResNet-26 (3 stages of 4 blocks) with frozen and fine-tuned copies."""
    return SpotTuneResNet((4, 4, 4), num_classes, execution, backend, bucket)


def spottune(num_classes: int = 10, execution: str = "sparse", backend: str = "auto", bucket="auto") -> SpotTune:
    """ResNet-26 backbone and its policy network (ResNet with one block per stage, 24 logits)."""
    backbone = resnet26(num_classes, execution, backend, bucket)
    return SpotTune(SpotTunePolicyNet(backbone.num_blocks), backbone)


__all__ = ["SpotTune", "SpotTuneResNet", "SpotTunePolicyNet", "SpotTuneBranch", "decide", "resnet26", "spottune"]
