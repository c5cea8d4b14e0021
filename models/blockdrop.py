"""BlockDrop (Wu et al., CVPR 2018): a policy network decides per image which residual blocks
of a ResNet to run; here the dropped blocks really cost nothing ("sparse" execution).

Semantics (DESIGN.md): block t of the backbone, residual = downsample(x) for the first block
of a stage (always computed) and x otherwise; a kept block gives relu(residual + F(x)), a
dropped one gives residual. The policy [N, num_blocks] is binarised as policy > 0.

Module and parameter names follow the original release (github.com/Tushar-N/blockdrop,
models/resnet.py FlatResNet32 / FlatResNet224 / Policy32 / Policy224): conv1, bn1,
blocks.<stage>.<block>.{conv1,bn1,conv2,bn2[,conv3,bn3]}, ds.<stage> (CIFAR: parameter-free
average-pool + zero channels; ImageNet: ds.<stage>.0 conv 1x1, ds.<stage>.1 BN), fc; policy
nets: features.*, logit, vnet. Their checkpoints load with load_state_dict (also the old ones
without BatchNorm's num_batches_tracked); see `load_original_checkpoint`.

Differences from the release, none of which changes results at the published input sizes:
global pooling is adaptive (theirs is AvgPool2d(8) at 32x32 / AvgPool2d(7) at 224x224, so
other input sizes work too), and the CIFAR downsample appends zero channels with F.pad
(theirs concatenates x.mul(0)).
"""
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.nn.graphs import check_graphs_arg, check_inference, compact_like, graph_sizes
from dynkernels.nn.skip_block import check_execution
from dynkernels.nn.skip_plan import SkipPlan, check_rows_args, plan_bucket, run_kept
from dynkernels.ops import _checks, check_backend
from dynkernels.ops.sample_gating import resolved_kernels


# ----------------------------------------------------------------------------- residual branches

def resnet_init(module: nn.Module) -> nn.Module:
    """The initialisation of the ResNet code these models' releases build on: every conv
    He-normal over its fan-out, every BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module

class BasicBranch(nn.Module):
    """F(x) of a basic block: conv3x3(stride) BN ReLU conv3x3 BN (no residual, no final ReLU);
    both convs dilated by `dilation` (padded to keep the size), as DeepLab's later stages."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class BottleneckBranch(nn.Module):
    """F(x) of a bottleneck: conv1x1 BN ReLU conv3x3(stride) BN ReLU conv1x1(4x) BN."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PadDownsample(nn.Module):
    """CIFAR shortcut ("option A"/DownsampleB): average-pool by the stride, then zero channels."""

    def __init__(self, inplanes: int, outplanes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = outplanes - inplanes

    def forward(self, x):
        return F.pad(F.avg_pool2d(x, self.stride), (0, 0, 0, 0, 0, self.extra))


class KeptBlock:
    """Block t of the backbone on its compact batch: relu(residual + F(x)), the residual being
    x itself, or (first block of a stage) the gathered downsample shortcut. One object per
    block, so that its CUDA graphs (keyed by it) outlive a forward."""

    def __init__(self, branch: nn.Module):
        self.branch = branch

    def __call__(self, x, residual=None):
        return F.relu((x if residual is None else residual) + self.branch(x))


# ----------------------------------------------------------------------------- backbone
class BlockDropResNet(nn.Module):
    """A flat ResNet whose blocks a per-sample policy keeps or drops.

    forward(x, policy=None): policy [N, num_blocks] (float or bool, binarised as > 0), None =
    every block kept (the plain dense ResNet). execution="masked" computes every block on
    every sample and mixes with the mask (the release's FlatResNet.forward, without its
    skip of a block that no sample keeps, which costs a host sync per block);
    execution="sparse" runs each block on its kept samples only, planned for the whole
    network with one compact call and one host sync per forward, each block's kept count
    rounded up to `bucket` ("auto": multiples of 8 on CUDA tensors, exact on the CPU and in
    training mode), or with no sync at all with a fixed capacity (blocks then run on
    `capacity` rows; see dynkernels.nn.skip_block). Both give the same logits in eval mode
    (in training mode BN batch statistics of a block are taken over its kept samples only in
    sparse execution). Where no autograd graph is recorded, each block's result is merged into
    the network's own intermediate in place (run_kept's inplace). cuda_graphs (False, True or a
    shared dynkernels.nn.GraphPool; inference
    on CUDA tensors only): each block on its compact batch is one CUDA-graph replay per bucket
    size, so a planned forward costs one host sync and per block a gather, a copy into the
    graph's input, a replay and a merge (see dynkernels.nn.graphs; `capture_graphs` captures
    ahead of the first forward).
    """

    def __init__(
        self,
        branch: type,
        layers: Sequence[int],
        widths: Sequence[int],
        strides: Sequence[int],
        stem: str,
        num_classes: Optional[int],
        execution: str = "sparse",
        backend: str = "auto",
        input_size: int = 32,
        capacity: Optional[int] = None,
        bucket="auto",
        cuda_graphs=False,
    ):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"BlockDropResNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            inplanes = widths[0]
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            inplanes = 64
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else None
        blocks, ds = [], []
        for planes, n, stride in zip(widths, layers, strides):
            out = planes * branch.expansion
            if stride == 1 and inplanes == out:
                ds.append(nn.Identity())
            elif stem == "cifar":
                ds.append(PadDownsample(inplanes, out, stride))
            else:
                ds.append(nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)))
            stage = [branch(inplanes, planes, stride)] + [branch(out, planes) for _ in range(n - 1)]
            blocks.append(nn.ModuleList(stage))
            inplanes = out
        self.blocks = nn.ModuleList(blocks)
        self.ds = nn.ModuleList(ds)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity() if num_classes is None else nn.Linear(inplanes, num_classes)
        self.feat_dim = inplanes
        self.layer_config = list(layers)
        self.num_blocks = sum(layers)
        self.input_size = input_size
        self.execution = execution
        self.backend = check_backend("BlockDropResNet", backend)
        self.capacity, self.bucket = check_rows_args("BlockDropResNet", capacity, bucket)
        self.cuda_graphs = cuda_graphs
        self._kept_blocks = [KeptBlock(branch) for _, _, _, branch in self._stages()]
        resnet_init(self)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("BlockDropResNet", value)

    @property
    def cuda_graphs(self):
        """The dynkernels.nn.GraphPool of the blocks' CUDA graphs, or None (eager)."""
        return self._graph_pool

    @cuda_graphs.setter
    def cuda_graphs(self, value):
        self._graph_pool = check_graphs_arg("BlockDropResNet", value)

    def _apply(self, fn, *args, **kwargs):
        # Graphs replay the parameters they were captured with: moved ones need new graphs.
        if getattr(self, "_graph_pool", None) is not None:
            for kept in self._kept_blocks:
                self._graph_pool.forget(kept)
        return super()._apply(fn, *args, **kwargs)

    def seed(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return x if self.maxpool is None else self.maxpool(x)

    def _stages(self):
        """(block index t, stage s, index j in stage, branch) in network order."""
        t = 0
        for s, stage in enumerate(self.blocks):
            for j, branch in enumerate(stage):
                yield t, s, j, branch
                t += 1

    def _check_input(self, x, policy):
        _checks.tensor("BlockDropResNet", "x", x, (4,), "[N, 3, H, W]")
        if x.shape[1] != self.conv1.in_channels:
            raise ValueError(f"BlockDropResNet: x must be [N, {self.conv1.in_channels}, H, W], got shape {tuple(x.shape)}")
        _checks.floating("BlockDropResNet", "x", x)
        if policy is None:
            return
        _checks.tensor("BlockDropResNet", "policy", policy, (2,), f"[N, {self.num_blocks}] (samples x blocks)")
        if policy.shape != (x.shape[0], self.num_blocks):
            raise ValueError(
                f"BlockDropResNet: policy must be [N, num_blocks] = [{x.shape[0]}, {self.num_blocks}], "
                f"got {tuple(policy.shape)}"
            )
        if not (policy.dtype.is_floating_point or policy.dtype == torch.bool):
            raise TypeError(f"BlockDropResNet: policy must be a floating or bool tensor, got {policy.dtype}")
        _checks.same_device("BlockDropResNet", "policy", policy, "x", x)

    def features(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pooled features [N, feat_dim] before fc."""
        self._check_input(x, policy)
        x = self.seed(x)
        if policy is None:
            for _, s, j, branch in self._stages():
                residual = self.ds[s](x) if j == 0 else x
                x = F.relu(residual + branch(x))
        elif self.execution == "masked":
            keep = (policy > 0).to(x.dtype)
            for t, s, j, branch in self._stages():
                residual = self.ds[s](x) if j == 0 else x
                m = keep[:, t].view(-1, 1, 1, 1)
                x = F.relu(residual + branch(x)) * m + residual * (1 - m)
        else:
            if self.capacity is not None and self.training:
                raise RuntimeError(
                    "BlockDropResNet: a fixed capacity pads each block's compact batch with zero rows, which "
                    "would enter BatchNorm's batch statistics in training mode; use eval() or capacity=None"
                )
            if self.training and self.bucket not in (None, "auto"):
                raise RuntimeError(
                    f"BlockDropResNet: bucket={self.bucket!r} pads each block's compact batch with zero rows, "
                    "which would enter BatchNorm's batch statistics in training mode; use eval(), "
                    "bucket=None or bucket='auto' (exact in training mode)"
                )
            graphs = self._graph_pool
            if graphs is not None:
                check_inference("BlockDropResNet", self.training, x)
            bucket = self.bucket if self.capacity is not None else plan_bucket(self.bucket, x.device, self.training)
            plan = SkipPlan(policy, capacity=self.capacity, bucket=bucket, backend=self.backend)
            k = resolved_kernels("BlockDropResNet", self.backend, x.device)
            for t, s, j, branch in self._stages():
                residual = self.ds[s](x) if j == 0 else x
                inputs = (x,) if j > 0 else (x, residual)
                # (in place: residual is this network's own intermediate)
                x = run_kept("BlockDropResNet", self._kept_blocks[t], inputs, residual, plan[t], k, graphs, inplace=True)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fc(self.features(x, policy))

    @torch.no_grad()
    def capture_graphs(self, x: torch.Tensor, sizes: Optional[Sequence[int]] = None) -> int:
        """Capture every block's CUDA graphs ahead of the first sparse forward, for batches like
        x [N, 3, H, W] (batch size, dtype, layout): compact batches of `sizes` rows (default:
        every bucket size for N, or the capacity). Needs cuda_graphs on and eval mode; returns
        the number of graphs in the pool."""
        owner = "BlockDropResNet.capture_graphs"
        pool = self._graph_pool
        if pool is None:
            raise RuntimeError(f"{owner}: cuda_graphs is off; set cuda_graphs=True (or a GraphPool) first")
        self._check_input(x, None)
        sizes = graph_sizes(owner, self.bucket, self.capacity, x.shape[0], x.device, sizes, pool)
        check_inference(owner, self.training, x)
        h = self.seed(x[:1])
        for t, s, j, _ in self._stages():
            kept = self._kept_blocks[t]
            inputs = (h,) if j > 0 else (h, self.ds[s](h))
            for size in sizes:
                pool.capture(kept, *(compact_like(i, size) for i in inputs))
            h = kept(*inputs)
        return len(pool)


def resnet32_cifar(num_classes: int = 10, execution: str = "sparse", backend: str = "auto", capacity: Optional[int] = None,
                   bucket="auto", cuda_graphs=False) -> BlockDropResNet:
    """CIFAR ResNet-32 (3 stages of 5 basic blocks, 16/32/64 channels): 15 blocks."""
    return BlockDropResNet(BasicBranch, [5, 5, 5], [16, 32, 64], [1, 2, 2], "cifar", num_classes, execution, backend, 32,
                           capacity, bucket, cuda_graphs)


def resnet110_cifar(num_classes: int = 10, execution: str = "sparse", backend: str = "auto", capacity: Optional[int] = None,
                    bucket="auto", cuda_graphs=False) -> BlockDropResNet:
    """CIFAR ResNet-110 (3 stages of 18 basic blocks, 16/32/64 channels): 54 blocks."""
    return BlockDropResNet(BasicBranch, [18, 18, 18], [16, 32, 64], [1, 2, 2], "cifar", num_classes, execution, backend, 32,
                           capacity, bucket, cuda_graphs)


def resnet101_imagenet(num_classes: int = 1000, execution: str = "sparse", backend: str = "auto", capacity: Optional[int] = None,
                       bucket="auto", cuda_graphs=False) -> BlockDropResNet:
    """ImageNet ResNet-101 (bottleneck stages of 3/4/23/3 blocks): 33 blocks."""
    return BlockDropResNet(BottleneckBranch, [3, 4, 23, 3], [64, 128, 256, 512], [1, 2, 2, 2], "imagenet", num_classes,
                           execution, backend, 224, capacity, bucket, cuda_graphs)


# ----------------------------------------------------------------------------- policy networks
class PolicyNet(nn.Module):
    """BlockDrop's policy network: a small ResNet (`features`, no fc), then `logit` gives one
    keep probability per block (sigmoid). `vnet` is the release's value head: BlockDrop trains
    with a self-critical baseline and never uses it; it is kept so that the release's agent
    checkpoints load with strict=True, and its parameters do not require grad, so that
    DistributedDataParallel (without find_unused_parameters) does not wait for their gradients.
    `input_pool`: average-pooling factor applied to the input first (ImageNet: 2, so a 224x224
    image is seen at 112x112)."""

    def __init__(self, features: BlockDropResNet, num_blocks: int, input_pool: int = 1):
        super().__init__()
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"PolicyNet: num_blocks must be a positive int, got {num_blocks!r}")
        self.features = features
        self.logit = nn.Linear(features.feat_dim, num_blocks)
        self.vnet = nn.Linear(features.feat_dim, 1).requires_grad_(False)
        self.num_blocks = num_blocks
        self.input_pool = input_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] -> keep probabilities [N, num_blocks]."""
        _checks.tensor("PolicyNet", "x", x, (4,), "[N, 3, H, W]")
        if self.input_pool > 1:
            x = F.avg_pool2d(x, self.input_pool)
        return torch.sigmoid(self.logit(self.features(x)))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Like the release: its older checkpoints still hold the feature net's classifier.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("features.fc.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def policy_net_cifar(num_blocks: int) -> PolicyNet:
    """ResNet-8 (one basic block per stage, 16/32/64 channels) on the 32x32 input."""
    return PolicyNet(BlockDropResNet(BasicBranch, [1, 1, 1], [16, 32, 64], [1, 2, 2], "cifar", None, input_size=32), num_blocks)


def policy_net_imagenet(num_blocks: int) -> PolicyNet:
    """ResNet-10 (one basic block per stage, 64..512 channels) on the input average-pooled
    to 112x112 (by 2, from 224x224)."""
    features = BlockDropResNet(BasicBranch, [1, 1, 1, 1], [64, 128, 256, 512], [1, 2, 2, 2], "imagenet", None, input_size=112)
    return PolicyNet(features, num_blocks, input_pool=2)


# ----------------------------------------------------------------------------- the agent
class BlockDropOutput(NamedTuple):
    logits: torch.Tensor  # [N, num_classes]
    policy: torch.Tensor  # [N, num_blocks] 0/1 float
    probs: torch.Tensor  # [N, num_blocks]: the keep probabilities the policy was drawn from

    @property
    def blocks_used(self) -> torch.Tensor:
        """Blocks executed per sample [N]."""
        return self.policy.sum(1)


MODES = ("sample", "threshold")


class BlockDrop(nn.Module):
    """Policy network + backbone. forward(x, mode) -> (logits, policy, probs), with
    `.blocks_used` per sample. mode="threshold" (inference): keep where probs >= 0.5.
    mode="sample" (training): probs are bounded to alpha * p + (1 - alpha) * (1 - p) (the
    release's exploration bound, alpha = 0.8) and each block is drawn from Bernoulli(probs);
    the bounded probs are returned. The backbone runs in its own `execution`."""

    def __init__(self, policy_net: PolicyNet, backbone: BlockDropResNet, alpha: float = 0.8):
        super().__init__()
        if policy_net.num_blocks != backbone.num_blocks:
            raise ValueError(
                f"BlockDrop: the policy net gives {policy_net.num_blocks} decisions but the backbone has "
                f"{backbone.num_blocks} blocks"
            )
        if not 0.5 <= alpha <= 1.0:
            raise ValueError(f"BlockDrop: alpha must be in [0.5, 1], got {alpha}")
        self.policy_net = policy_net
        self.backbone = backbone
        self.alpha = alpha

    def policy(self, x: torch.Tensor, mode: str = "threshold"):
        """(policy [N, num_blocks] 0/1 float, probs)."""
        if mode not in MODES:
            raise ValueError(f"BlockDrop: mode must be one of {MODES}, got {mode!r}")
        probs = self.policy_net(x)
        if mode == "threshold":
            return (probs >= 0.5).to(probs.dtype), probs
        probs = probs * self.alpha + (1 - probs) * (1 - self.alpha)
        return torch.bernoulli(probs.detach()), probs

    def forward(self, x: torch.Tensor, mode: str = "threshold") -> BlockDropOutput:
        policy, probs = self.policy(x, mode)
        return BlockDropOutput(self.backbone(x, policy), policy, probs)

    def load_original_checkpoint(self, checkpoint: dict) -> None:
        """Load a checkpoint saved by the release's scripts: {'resnet': backbone state,
        'agent': policy state} (either may be missing; old ones hold the agent as 'net'),
        with or without nn.DataParallel's 'module.' prefix."""
        if not isinstance(checkpoint, dict):
            raise TypeError(f"BlockDrop.load_original_checkpoint: checkpoint must be a dict, got {type(checkpoint).__name__}")
        found = False
        for key, target in (("resnet", self.backbone), ("agent", self.policy_net), ("net", self.policy_net)):
            if key in checkpoint:
                target.load_state_dict(_strip_prefix(checkpoint[key]))
                found = True
        if not found:
            raise KeyError(
                "BlockDrop.load_original_checkpoint: the checkpoint has none of the keys 'resnet', 'agent', 'net' "
                f"(it has {sorted(checkpoint)[:8]})"
            )


def _strip_prefix(state: dict) -> dict:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state

