"""SkipNet (Wang et al., "SkipNet: Learning Dynamic Routing in Convolutional Networks", ECCV
2018): a gate after each residual block reads that block's output and decides, per sample,
whether the NEXT block runs; here the skipped blocks really cost nothing ("sparse" execution).

Semantics (the original's ResNetFeedForwardSP / ResNetRecurrentGateSP / *RL forward), block t
of the flat list of blocks, x_t its input, mask m_t from the gate on x_t (= block t-1's output):

    x_{t+1} = m_t * block_t(x_t) + (1 - m_t) * shortcut_t(x_t)

with block_t(x) = relu(F(x) + shortcut_t(x)) a whole residual block and shortcut_t its
downsample (conv 1x1 + BN) for the first block of a group, else the identity: a skipped
downsampling block returns its downsample. The first block always runs; the gate after the
last block is not computed (the original computes it and drops its mask).

Gates: CIFAR ResNet-38/74 use FFGate-I (max-pool, two 3x3 convs, global pool, 1x1 conv to two
logits), ResNet-110 FFGate-II (one stride-2 3x3 conv, pool, 1x1 conv); keep probability
p = softmax(logits)[1]. ImageNet ResNet-101 uses the recurrent gate: per block, global pool
and a 1x1 conv to a 10-d embedding, one LSTM (10 hidden units) shared by all blocks, a
projection and a sigmoid. Masks, by `gating` (training mode; in eval mode every gating keeps
a block where p > 0.5, as the original's inference):
    "hard"    (default; the original's supervised pre-training, FFGate/RNNGate): m = [p > 0.5]
              in the forward pass, d m / d p = 1 in the backward pass (straight-through)
    "soft"    (SoftGate / SoftRNNGate): m = p
    "sample"  (the original's reinforcement-learning stage): m ~ Bernoulli(p), no gradient
              (train the gates with REINFORCE on log p / log(1 - p) from the returned probs)

forward(x) -> SkipNetOutput(logits, masks [N, num_blocks - 1], probs [N, num_blocks - 1]),
unpacked like the original's (logits, masks, gprobs); probs are keep probabilities p (the
original's feed-forward gates return log-softmax or softmax pairs instead).

Executions. "masked" runs every block on every sample and mixes with the mask (the
original's computation). "sparse" runs each block on the samples whose mask keeps it, through
dynkernels.nn.SkipBlock: with a 0/1 mask that needs no gradient (inference, "sample") the
plain merge (kept: block, skipped: downsample; in place into the network's own intermediate
where no autograd graph is recorded); with a soft mask, or a hard one that carries
a straight-through gradient, the scaled merge shortcut(x) + m * (block(x) - shortcut(x)),
which runs the block where m != 0. Both executions give the same outputs. Gradients agree
except (1) the straight-through gradient of a skipped sample's mask, which needs the block's
output on that sample: sparse execution takes it as 0 (a different, cheaper estimator; train
"hard" with execution="masked" to reproduce the original), and (2) in training mode a
block's BatchNorm takes batch statistics over its kept samples only. Each gate depends on the
previous block's output, so sparse execution reads each block's kept count on the host: one
host sync per gated block (53 for ResNet-110, 32 for ResNet-101).

Module and parameter names follow the original (github.com/ucbdrive/skipnet, cifar/models.py
and imagenet/models.py): conv1, bn1, group<g>_layer<i>.{conv1,bn1,conv2,bn2[,conv3,bn3],
downsample.{0,1}}, the same downsample again as group<g>_ds<i>.{0,1}, group<g>_gate<i>.*
(feed-forward: conv1, bn1[, conv2, bn2], linear_layer; recurrent: 1 = the embedding conv),
control.{rnn, proj} (recurrent), fc. Their checkpoints load with load_state_dict or
`load_original_checkpoint`. Differences that do not change results at the published input
sizes: the gate and final pooling are global (adaptive), so other input sizes work too; a
batch of one sample works (the original's squeeze() breaks it); the straight-through mask
equals exactly 0 or 1 (the original's (p > 0.5) - p + p can be off by one rounding).
"""
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.models._gating import bias_for_density, check_density, check_images, original_state_dict
from dynkernels.models.blockdrop import BasicBranch, BottleneckBranch, resnet_init
from dynkernels.nn.skip_block import SkipBlock, check_execution
from dynkernels.ops import check_backend

GATES = ("ffgate1", "ffgate2", "rnn")
GATINGS = ("hard", "soft", "sample")


# ----------------------------------------------------------------------------- blocks
def _residual_block(branch: type, name: str) -> type:
    """A whole residual block relu(F(x) + shortcut(x)) on top of a BlockDrop branch, with the
    shortcut registered as `downsample` (None: identity), as the original names it."""

    class Block(branch):
        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
            super().__init__(inplanes, planes, stride)
            self.downsample = downsample

        def shortcut(self, x):
            return x if self.downsample is None else self.downsample(x)

        def forward(self, x):
            return F.relu(super().forward(x) + self.shortcut(x))

    Block.__name__ = Block.__qualname__ = name  # the module attribute it is bound to (pickle finds it)
    return Block


BasicBlock = _residual_block(BasicBranch, "BasicBlock")
Bottleneck = _residual_block(BottleneckBranch, "Bottleneck")


class _BlockMinusShortcut(nn.Module):
    """block(x) - shortcut(x): the mixture m * block(x) + (1 - m) * shortcut(x) written as the
    scaled SkipBlock shortcut(x) + m * (block(x) - shortcut(x))."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x) - self.block.shortcut(x)


# ----------------------------------------------------------------------------- gates
class FeedforwardGate(nn.Module):
    """FFGate-I (kind=1: max-pool 2, conv3x3 BN ReLU, conv3x3/2 BN ReLU) or FFGate-II (kind=2:
    conv3x3/2 BN ReLU), then global average pool and a 1x1 conv to two logits (skip, keep).
    forward(x) -> keep probability [N]."""

    def __init__(self, channels: int, kind: int):
        super().__init__()
        if kind not in (1, 2):
            raise ValueError(f"FeedforwardGate: kind must be 1 (FFGate-I) or 2 (FFGate-II), got {kind!r}")
        self.kind = kind
        if kind == 1:
            self.maxpool = nn.MaxPool2d(2)
            self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, 2, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
        else:
            self.conv1 = nn.Conv2d(channels, channels, 3, 2, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
        self.linear_layer = nn.Conv2d(channels, 2, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 2]: (skip, keep)."""
        if self.kind == 1:
            x = F.relu(self.bn1(self.conv1(self.maxpool(x))))
            x = F.relu(self.bn2(self.conv2(x)))
        else:
            x = F.relu(self.bn1(self.conv1(x)))
        # the 1x1 conv on the pooled [N, C, 1, 1] as the matrix product it is: the same weights
        # and sums, a few microseconds where a conv call costs 40 - 70 (oneDNN's fixed cost)
        w = self.linear_layer.weight
        return F.linear(x.mean((2, 3)), w.reshape(w.shape[0], -1), self.linear_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), 1)[:, 1]


class RecurrentGate(nn.Module):
    """The recurrent gate shared by all blocks (the original's `control`): one LSTM step per
    block on that block's embedding [N, embed_dim], a projection to one logit, a sigmoid.
    The projection is a Linear (CIFAR code) or a 1x1 Conv2d (ImageNet code)."""

    def __init__(self, embed_dim: int, hidden_dim: int, conv_proj: bool):
        super().__init__()
        self.rnn = nn.LSTM(embed_dim, hidden_dim)
        self.proj = nn.Conv2d(hidden_dim, 1, 1) if conv_proj else nn.Linear(hidden_dim, 1)

    def forward(self, embedding: torch.Tensor, state=None):
        """-> (keep probability [N], LSTM state for the next block; None starts at zeros)."""
        out, state = self.rnn(embedding.unsqueeze(0), state)
        h = out[0]
        z = self.proj(h[:, :, None, None]) if isinstance(self.proj, nn.Conv2d) else self.proj(h)
        return torch.sigmoid(z.flatten(1)[:, 0]), state


# ----------------------------------------------------------------------------- the network
class SkipNetOutput(NamedTuple):
    logits: torch.Tensor  # [N, num_classes]
    masks: torch.Tensor  # [N, num_blocks - 1]: the mask of each gated block (blocks 1, 2, ...)
    probs: torch.Tensor  # [N, num_blocks - 1]: the keep probabilities the masks came from

    @property
    def blocks_used(self) -> torch.Tensor:
        """Blocks executed per sample [N] (the first block always runs)."""
        return 1 + (self.masks > 0).sum(1)


class SkipNet(nn.Module):
    """A ResNet whose blocks are gated by the output of the block before (see the module
    docstring). `execution` ("masked" | "sparse") and `gating` are settable attributes."""

    def __init__(
        self,
        block: type,
        layers: Sequence[int],
        widths: Sequence[int],
        stem: str,
        num_classes: int,
        gate: str,
        gating: str = "hard",
        execution: str = "sparse",
        backend: str = "auto",
        embed_dim: int = 10,
        hidden_dim: int = 10,
    ):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"SkipNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        if gate not in GATES:
            raise ValueError(f"SkipNet: gate must be one of {GATES}, got {gate!r}")
        backend = check_backend("SkipNet", backend)
        inplanes = widths[0] if stem == "cifar" else 64
        self.conv1 = nn.Conv2d(3, inplanes, 3, 1, 1, bias=False) if stem == "cifar" else nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else None
        # Flat lists (not registered again: the group<g>_* attributes are the registered names).
        self._blocks, self._gates = [], []
        for g, (planes, n) in enumerate(zip(widths, layers), start=1):
            out = planes * block.expansion
            for i in range(n):
                stride = 2 if g > 1 and i == 0 else 1
                ds = None
                if stride != 1 or inplanes != out:
                    ds = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                layer = block(inplanes, planes, stride, ds)
                if gate == "rnn":
                    gate_layer = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(out, embed_dim, 1))
                else:
                    gate_layer = FeedforwardGate(out, 1 if gate == "ffgate1" else 2)
                setattr(self, f"group{g}_ds{i}", ds)
                setattr(self, f"group{g}_layer{i}", layer)
                setattr(self, f"group{g}_gate{i}", gate_layer)
                self._blocks.append(layer)
                self._gates.append(gate_layer)
                inplanes = out
        self.control = RecurrentGate(embed_dim, hidden_dim, conv_proj=stem == "imagenet") if gate == "rnn" else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.gate = gate
        self.num_blocks = len(self._blocks)
        self.input_size = 32 if stem == "cifar" else 224
        # SkipBlocks hold no parameters of their own; kept out of the module tree so that the
        # state dict keeps the original names. Block 0 always runs: no SkipBlock.
        # (inplace: each block's input is this network's own intermediate, not needed after the merge)
        self._plain = [None] + [SkipBlock(b, execution=execution, backend=backend, inplace=True) for b in self._blocks[1:]]
        self._mixed = [None] + [
            SkipBlock(_BlockMinusShortcut(b), shortcut=b.downsample, scaled=True, execution=execution, backend=backend)
            for b in self._blocks[1:]
        ]
        self.execution = execution
        self.gating = gating
        resnet_init(self)  # the original's initialisation
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.weight.shape[0] * m.weight.shape[1])))

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("SkipNet", value)
        for skip in self._plain[1:] + self._mixed[1:]:
            skip.execution = value

    @property
    def gating(self) -> str:
        return self._gating

    @gating.setter
    def gating(self, value: str):
        if value not in GATINGS:
            raise ValueError(f"SkipNet: gating must be one of {GATINGS}, got {value!r}")
        self._gating = value

    def seed(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return x if self.maxpool is None else self.maxpool(x)

    def _keep_prob(self, t: int, x: torch.Tensor, state):
        """Keep probability of block t from its input x (block t-1's output), and the LSTM state."""
        gate = self._gates[t - 1]
        if self.control is None:
            return gate(x), None
        return self.control(gate(x).flatten(1), state)

    def _mask(self, p: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return (p > 0.5).to(p.dtype)
        if self.gating == "hard":
            return (p > 0.5).to(p.dtype) + (p - p.detach())  # value exactly 0/1, gradient of p
        if self.gating == "soft":
            return p
        return torch.bernoulli(p.detach())

    def _run_block(self, t: int, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        mixed = m.requires_grad or (self.training and self.gating == "soft")
        return (self._mixed if mixed else self._plain)[t](x, m)

    def forward(self, x: torch.Tensor) -> SkipNetOutput:
        check_images("SkipNet", x)
        x = self._blocks[0](self.seed(x))
        state, masks, probs = None, [], []
        for t in range(1, self.num_blocks):
            p, state = self._keep_prob(t, x, state)
            m = self._mask(p)
            x = self._run_block(t, x, m)
            masks.append(m)
            probs.append(p)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return SkipNetOutput(logits, torch.stack(masks, 1), torch.stack(probs, 1))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, density: float) -> None:
        """Set every feed-forward gate's keep-logit bias so that a fraction `density` of the
        samples in x keeps each gated block in eval mode (block by block, each on the input
        the calibrated earlier blocks give). For benchmarks of untrained networks at a chosen
        density. The recurrent gate shares one projection across blocks and cannot be
        calibrated per block this way."""
        check_density("SkipNet.calibrate", density)
        if self.control is not None:
            raise ValueError("SkipNet.calibrate: only feed-forward gates can be calibrated (the recurrent gate shares one projection across blocks)")
        check_images("SkipNet.calibrate", x)
        was_training = self.training
        self.eval()
        try:
            x = self._blocks[0](self.seed(x))
            for t in range(1, self.num_blocks):
                gate = self._gates[t - 1]
                bias = gate.linear_layer.bias
                bias.zero_()  # scores without the bias: no cancellation against a large one
                z = gate.logits(x)
                bias[1] = bias_for_density(z[:, 1] - z[:, 0], density)  # p > 0.5 where z_1 > z_0
                x = self._plain[t](x, self._mask(gate(x)))
        finally:
            self.train(was_training)

    def load_original_checkpoint(self, checkpoint: dict) -> None:
        """Load a checkpoint saved by the original training scripts ({'state_dict': ...},
        with nn.DataParallel's 'module.' prefix) or a bare state dict in the original naming."""
        self.load_state_dict(original_state_dict("SkipNet.load_original_checkpoint", checkpoint))


def _build(block, layers, widths, stem, num_classes, gate, gating, execution, backend, density) -> SkipNet:
    model = SkipNet(block, layers, widths, stem, num_classes, gate, gating, execution, backend)
    if density is not None:
        g = torch.Generator().manual_seed(0)
        model.calibrate(torch.randn(32, 3, model.input_size, model.input_size, generator=g), density)
    return model


def resnet38_cifar(num_classes: int = 10, gate: str = "ffgate1", gating: str = "hard", execution: str = "sparse", backend: str = "auto", density: Optional[float] = None) -> SkipNet:
    """SkipNet-38 (3 groups of 6 basic blocks, 16/32/64 channels; FFGate-I). density: if
    given, the gates are calibrated on a fixed random batch (32 images) so that about that
    fraction of the samples keeps each gated block (untrained networks, benchmarks)."""
    return _build(BasicBlock, [6, 6, 6], [16, 32, 64], "cifar", num_classes, gate, gating, execution, backend, density)


def resnet74_cifar(num_classes: int = 10, gate: str = "ffgate1", gating: str = "hard", execution: str = "sparse", backend: str = "auto", density: Optional[float] = None) -> SkipNet:
    """SkipNet-74 (3 groups of 12 basic blocks; FFGate-I); density as in resnet38_cifar."""
    return _build(BasicBlock, [12, 12, 12], [16, 32, 64], "cifar", num_classes, gate, gating, execution, backend, density)


def resnet110_cifar(num_classes: int = 10, gate: str = "ffgate2", gating: str = "hard", execution: str = "sparse", backend: str = "auto", density: Optional[float] = None) -> SkipNet:
    """SkipNet-110 (3 groups of 18 basic blocks; FFGate-II): 54 blocks, 53 gated; density as
    in resnet38_cifar."""
    return _build(BasicBlock, [18, 18, 18], [16, 32, 64], "cifar", num_classes, gate, gating, execution, backend, density)


def resnet101_imagenet(num_classes: int = 1000, gating: str = "hard", execution: str = "sparse", backend: str = "auto") -> SkipNet:
    """SkipNet-101 (bottleneck groups of 3/4/23/3 blocks) with the recurrent gate: 33 blocks,
    32 gated."""
    return _build(Bottleneck, [3, 4, 23, 3], [64, 128, 256, 512], "imagenet", num_classes, "rnn", gating, execution, backend, None)


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "FeedforwardGate",
    "RecurrentGate",
    "SkipNet",
    "SkipNetOutput",
    "resnet38_cifar",
    "resnet74_cifar",
    "resnet110_cifar",
    "resnet101_imagenet",
]
