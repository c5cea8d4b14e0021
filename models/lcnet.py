"""LC-Net's L-Net (Xia et al., "Fully Dynamic Inference with Deep Neural Networks"): a block
salience per sample that skips (0) or scales (> 0) each residual block.

Block i: S_L = ReLU-1(FC(GAP(x_i))) (leaky ReLU-1 in training, so the gate keeps a gradient),
    x_{i+1} = shortcut(x_i) + S_L(x_i) * F(x_i)
with shortcut the identity, or for the first block of a stage the downsample (conv 1x1 + BN,
always computed). This is the scaled dynkernels.nn.SkipBlock: in execution="sparse" F runs
only on the samples with S_L != 0 and the scale is fused into scatter_add_rows. The gates
are computed block by block from the block's input, so sparse execution reads each block's
kept count on the host: one host sync per block (16 for ResNet-50).

Only the L-Net part is here; C-Net (channel salience on the first conv of each block) needs
the channel-gated convolution (dynkernels.nn.GatedConv2d).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.models._gating import bias_for_density, check_density
from dynkernels.models.blockdrop import BottleneckBranch
from dynkernels.nn.skip_block import SkipBlock, check_execution

LEAKY_SLOPE = 0.01


def relu1(x: torch.Tensor) -> torch.Tensor:
    """min(max(x, 0), 1)."""
    return x.clamp(0.0, 1.0)


def leaky_relu1(x: torch.Tensor, slope: float = LEAKY_SLOPE) -> torch.Tensor:
    """x on [0, 1], slope * x below 0, 1 + slope * (x - 1) above 1."""
    return torch.where(x < 0, slope * x, torch.where(x > 1, 1 + slope * (x - 1), x))


class LNetGate(nn.Module):
    """S_L [N] = ReLU-1(FC(GAP(x))); leaky ReLU-1 in training mode."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x.mean(dim=(2, 3))).squeeze(1)
        return leaky_relu1(z) if self.training else relu1(z)


class LNetBlock(nn.Module):
    """A residual block gated by its L-Net: shortcut(x) + S_L(x) * F(x)."""

    def __init__(self, branch: nn.Module, shortcut: Optional[nn.Module], channels: int, execution: str, backend: str):
        super().__init__()
        self.gate = LNetGate(channels)
        self.skip = SkipBlock(branch, shortcut, scaled=True, execution=execution, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x, self.gate(x))


class LNetResNet(nn.Module):
    """ImageNet-style bottleneck ResNet whose every block carries an L-Net gate.

    forward(x) -> logits; `saliences(x)` -> the S_L of every block [N, num_blocks] (for
    blocks used per sample: (saliences != 0).sum(1)). execution "masked" | "sparse" (settable).
    """

    def __init__(self, layers, num_classes: int = 1000, execution: str = "sparse", backend: str = "auto"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, inplanes = [], 64
        for planes, n, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
            out = planes * BottleneckBranch.expansion
            for j in range(n):
                shortcut = None
                if j == 0 and (stride != 1 or inplanes != out):
                    shortcut = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                blocks.append(LNetBlock(BottleneckBranch(inplanes, planes, stride if j == 0 else 1), shortcut, inplanes, execution, backend))
                inplanes = out
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_blocks = len(blocks)
        self._execution = check_execution("LNetResNet", execution)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("LNetResNet", value)
        for b in self.blocks:
            b.skip.execution = value

    def seed(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"LNetResNet: x must be a [N, 3, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.seed(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))

    def saliences(self, x: torch.Tensor) -> torch.Tensor:
        """S_L of every block for x, [N, num_blocks]."""
        out = []
        x = self.seed(x)
        for block in self.blocks:
            s = block.gate(x)
            out.append(s)
            x = block.skip(x, s)
        return torch.stack(out, 1)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, density: float) -> None:
        """Set every gate's bias so that a fraction `density` of the samples in x keeps each
        block (block by block, each on the input the calibrated earlier blocks give). For
        benchmarks of untrained networks at a chosen density."""
        check_density("LNetResNet.calibrate", density)
        x = self.seed(x)
        for block in self.blocks:
            z = block.gate.fc(x.mean(dim=(2, 3))).squeeze(1) - block.gate.fc.bias
            block.gate.fc.bias.fill_(bias_for_density(z, density))
            x = block.skip(x, block.gate(x))


def resnet50(num_classes: int = 1000, density: Optional[float] = None, execution: str = "sparse", backend: str = "auto", calibration_size: int = 64) -> LNetResNet:
    """L-Net ResNet-50 (bottleneck stages 3/4/6/3: 16 gated blocks). density: if given, the
    gates are calibrated on a fixed random batch (32 images of calibration_size^2) so that
    about that fraction of the samples keeps each block (untrained networks, benchmarks)."""
    model = LNetResNet([3, 4, 6, 3], num_classes, execution, backend)
    if density is not None:
        g = torch.Generator().manual_seed(0)
        was = model.training
        model.eval()
        model.calibrate(torch.randn(32, 3, calibration_size, calibration_size, generator=g), density)
        model.train(was)
    return model


__all__ = ["LNetGate", "LNetBlock", "LNetResNet", "relu1", "leaky_relu1", "resnet50"]
