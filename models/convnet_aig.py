"""ConvNet-AIG (Veit and Belongie, "Convolutional Networks with Adaptive Inference Graphs", ECCV
2018): each residual block has a gate that reads the block's input and decides, per sample,
whether its residual branch runs; here the skipped branches really cost nothing ("sparse").

Semantics (the original's Bottleneck / BasicBlock forward), block input x:

    z = fc2(relu(fc1bn(fc1(GAP(x)))))        gate logits [N, 2] (skip, keep)
    w = hard keep decision from z (below), with a straight-through gradient
    out = relu(shortcut(x) + w * F(x))

with F the residual branch and shortcut a conv 1x1 + BN where the block changes shape, else
the identity; a skipped block gives relu(shortcut(x)).

The decision. The original samples Gumbel noise in training AND at test time (its
GumbleSoftmax is always called with force_hard=True): keep where z_1 + g_1 > z_0 + g_0, g
standard Gumbel; w = that 0/1 value plus (y - y.detach()), y = softmax((z + g) / T)[1], T = 1
(the original ignores its temperature argument). Here `gumbel_noise` says when noise is drawn:
    "train"   (default): in training mode only; in eval mode the decision is deterministic,
              keep where z_1 > z_0 (the same decision without noise), so that a sample's
              path and the logits do not change from run to run
    "always": also in eval mode, as the original
forward(x) -> AIGOutput(logits, gates [N, num_blocks]) (the original returns the logits and
the list of w per block, for its target-rate loss).

Executions. "masked" computes F on every sample and multiplies by w (the original).
"sparse" runs F only where w != 0, through dynkernels.nn.SkipBlock (scaled: shortcut(x) +
w * F(x), the scale fused into the merge), then the ReLU. Both give the same outputs; the
gradients agree except (1) the straight-through gradient of a skipped sample's w, which needs
F on that sample: sparse execution takes it as 0 (train with execution="masked" to reproduce
the original's estimator), and (2) in training mode a branch's BatchNorm takes batch
statistics over the kept samples only. Each gate reads its block's input, so sparse
execution reads each block's kept count on the host: one host sync per block (16 for
ResNet-50).

Module and parameter names follow the original (github.com/andreasveit/convnet-aig,
convnet_aig.py): conv1, bn1, layer<k>.<j>.{conv1,bn1,conv2,bn2[,conv3,bn3], shortcut.{0,1},
fc1, fc1bn, fc2}, linear. Its checkpoints ({'state_dict': ...} from nn.DataParallel) load with
load_state_dict or `load_original_checkpoint`. Differences that do not change results at the
published input sizes: pooling is global (adaptive; the original pools x.size(2) x x.size(2)
windows, which is global only for square inputs), and fc1bn normalises the [N, 16] gate
features (the original passes them as [N, 16, 1, 1], which BatchNorm1d no longer accepts).
"""
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.models._gating import bias_for_density, check_density, check_images, original_state_dict
from dynkernels.models.blockdrop import BasicBranch, BottleneckBranch
from dynkernels.nn.skip_block import SkipBlock, check_execution
from dynkernels.ops import check_backend

NOISE = ("train", "always")
GATE_HIDDEN = 16
GUMBEL_EPS = 1e-10  # the original's


def _gated_block(branch: type, name: str) -> type:
    """A BlockDrop branch (its forward stays F(x)) plus the block's shortcut and its gate."""

    class Block(branch):
        def __init__(self, in_planes: int, planes: int, stride: int = 1):
            super().__init__(in_planes, planes, stride)
            out = planes * self.expansion
            self.shortcut = nn.Sequential()  # empty: the identity, as in the original
            if stride != 1 or in_planes != out:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            self.fc1 = nn.Conv2d(in_planes, GATE_HIDDEN, 1)
            self.fc1bn = nn.BatchNorm1d(GATE_HIDDEN)
            self.fc2 = nn.Conv2d(GATE_HIDDEN, 2, 1)
            with torch.no_grad():  # the original's initial opening rate of about 85%
                self.fc2.bias.copy_(torch.tensor([0.1, 2.0]))

        def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
            """[N, 2] (skip, keep) from the block input x."""
            h = self.fc1(F.adaptive_avg_pool2d(x, 1)).flatten(1)
            h = F.relu(self.fc1bn(h))
            return self.fc2(h[:, :, None, None]).flatten(1)

    Block.__name__ = Block.__qualname__ = name  # the module attribute it is bound to (pickle finds it)
    return Block


AIGBasicBlock = _gated_block(BasicBranch, "AIGBasicBlock")
AIGBottleneck = _gated_block(BottleneckBranch, "AIGBottleneck")


def _keep(z: torch.Tensor) -> torch.Tensor:
    """The deterministic decision: 1 where the keep logit is the larger, else 0."""
    return (z[:, 1] > z[:, 0]).to(z.dtype)


class AIGOutput(NamedTuple):
    logits: torch.Tensor  # [N, num_classes]
    gates: torch.Tensor  # [N, num_blocks]: w of every block (0/1 values)

    @property
    def blocks_used(self) -> torch.Tensor:
        """Blocks whose residual branch ran, per sample [N]."""
        return (self.gates != 0).sum(1)


class ConvNetAIG(nn.Module):
    """A ResNet whose every block is gated by its own input (see the module docstring).
    `execution` ("masked" | "sparse") and `gumbel_noise` ("train" | "always") are settable."""

    def __init__(
        self,
        block: type,
        layers: Sequence[int],
        widths: Sequence[int],
        stem: str,
        num_classes: int,
        gumbel_noise: str = "train",
        execution: str = "sparse",
        backend: str = "auto",
    ):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"ConvNetAIG: stem must be 'cifar' or 'imagenet', got {stem!r}")
        backend = check_backend("ConvNetAIG", backend)
        in_planes = widths[0] if stem == "cifar" else 64
        self.conv1 = nn.Conv2d(3, in_planes, 3, 1, 1, bias=False) if stem == "cifar" else nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else None
        blocks = []
        for k, (planes, n) in enumerate(zip(widths, layers), start=1):
            stage = []
            for j in range(n):
                stage.append(block(in_planes, planes, (1 if k == 1 else 2) if j == 0 else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{k}", nn.ModuleList(stage))
            blocks += stage
        self.linear = nn.Linear(in_planes, num_classes)
        self._blocks = blocks  # flat view (the layer<k> attributes are the registered names)
        self.num_blocks = len(blocks)
        self.input_size = 32 if stem == "cifar" else 224
        # SkipBlocks hold no parameters of their own; kept out of the module tree so that the
        # state dict keeps the original names.
        self._skips = [SkipBlock(b, shortcut=b.shortcut, scaled=True, execution=execution, backend=backend) for b in blocks]
        self.execution = execution
        self.gumbel_noise = gumbel_noise
        self.temperature = 1.0
        for name, m in self.named_modules():  # the original's initialisation
            if isinstance(m, nn.Conv2d):
                if stem == "imagenet":
                    n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if name.endswith("fc2"):  # the gate's last layer starts with low variance
                    nn.init.normal_(m.weight, 0.0, 0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("ConvNetAIG", value)
        for skip in self._skips:
            skip.execution = value

    @property
    def gumbel_noise(self) -> str:
        return self._gumbel_noise

    @gumbel_noise.setter
    def gumbel_noise(self, value: str):
        if value not in NOISE:
            raise ValueError(f"ConvNetAIG: gumbel_noise must be one of {NOISE}, got {value!r}")
        self._gumbel_noise = value

    def seed(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return x if self.maxpool is None else self.maxpool(x)

    def _gate(self, z: torch.Tensor) -> torch.Tensor:
        """w [N] from the gate logits z [N, 2]."""
        if not (self.training or self.gumbel_noise == "always"):
            return _keep(z)
        u = torch.rand_like(z)
        y = torch.softmax((z - torch.log(GUMBEL_EPS - torch.log(u + GUMBEL_EPS))) / self.temperature, 1)[:, 1]
        return (y > 0.5).to(y.dtype) + (y - y.detach())  # value exactly 0/1, gradient of y

    def forward(self, x: torch.Tensor) -> AIGOutput:
        check_images("ConvNetAIG", x)
        x = self.seed(x)
        gates = []
        for block, skip in zip(self._blocks, self._skips):
            w = self._gate(block.gate_logits(x))
            x = F.relu(skip(x, w))
            gates.append(w)
        logits = self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return AIGOutput(logits, torch.stack(gates, 1))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, density: float) -> None:
        """Set every gate's keep-logit bias so that a fraction `density` of the samples in x
        keeps each block with the deterministic decision (block by block, each on the input
        the calibrated earlier blocks give). For benchmarks of untrained networks."""
        check_density("ConvNetAIG.calibrate", density)
        check_images("ConvNetAIG.calibrate", x)
        was_training = self.training
        self.eval()
        try:
            x = self.seed(x)
            for block, skip in zip(self._blocks, self._skips):
                bias = block.fc2.bias
                bias.zero_()  # scores without the bias: no cancellation against a large one
                z = block.gate_logits(x)
                bias[1] = bias_for_density(z[:, 1] - z[:, 0], density)
                x = F.relu(skip(x, _keep(block.gate_logits(x))))
        finally:
            self.train(was_training)

    def load_original_checkpoint(self, checkpoint: dict) -> None:
        """Load a checkpoint saved by the original training scripts ({'state_dict': ...},
        with nn.DataParallel's 'module.' prefix) or a bare state dict in the original naming."""
        self.load_state_dict(original_state_dict("ConvNetAIG.load_original_checkpoint", checkpoint))


def _build(block, layers, widths, stem, num_classes, gumbel_noise, execution, backend, density, input_size=None) -> ConvNetAIG:
    model = ConvNetAIG(block, layers, widths, stem, num_classes, gumbel_noise, execution, backend)
    if density is not None:
        size = input_size or model.input_size
        g = torch.Generator().manual_seed(0)
        model.calibrate(torch.randn(32, 3, size, size, generator=g), density)
    return model


def resnet50(num_classes: int = 1000, gumbel_noise: str = "train", execution: str = "sparse", backend: str = "auto", density: Optional[float] = None, calibration_size: int = 64) -> ConvNetAIG:
    """ConvNet-AIG ResNet-50 (bottleneck stages 3/4/6/3: 16 gated blocks). density: if given,
    the gates are calibrated on a fixed random batch (32 images of calibration_size^2) so
    that about that fraction of the samples keeps each block (untrained networks, benchmarks)."""
    return _build(AIGBottleneck, [3, 4, 6, 3], [64, 128, 256, 512], "imagenet", num_classes, gumbel_noise, execution, backend, density, calibration_size)


def resnet101(num_classes: int = 1000, gumbel_noise: str = "train", execution: str = "sparse", backend: str = "auto", density: Optional[float] = None, calibration_size: int = 64) -> ConvNetAIG:
    """ConvNet-AIG ResNet-101 (bottleneck stages 3/4/23/3: 33 gated blocks); density as in resnet50."""
    return _build(AIGBottleneck, [3, 4, 23, 3], [64, 128, 256, 512], "imagenet", num_classes, gumbel_noise, execution, backend, density, calibration_size)


def resnet110_cifar(num_classes: int = 10, gumbel_noise: str = "train", execution: str = "sparse", backend: str = "auto", density: Optional[float] = None) -> ConvNetAIG:
    """ConvNet-AIG CIFAR ResNet-110 (3 stages of 18 basic blocks, 16/32/64 channels: 54 gated
    blocks); density as in resnet50 (on 32x32 images)."""
    return _build(AIGBasicBlock, [18, 18, 18], [16, 32, 64], "cifar", num_classes, gumbel_noise, execution, backend, density)


__all__ = ["AIGBasicBlock", "AIGBottleneck", "AIGOutput", "ConvNetAIG", "resnet50", "resnet101", "resnet110_cifar"]
