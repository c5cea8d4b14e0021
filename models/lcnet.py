"""LC-Net's L-Net (Xia et al., "Fully Dynamic Inference with Deep Neural Networks"): a block
salience per sample that skips (0) or scales (> 0) each residual block.

Block i: S_L = ReLU-1(FC(GAP(x_i))) (leaky ReLU-1 in training, so the gate keeps a gradient),
    x_{i+1} = shortcut(x_i) + S_L(x_i) * F(x_i)
with shortcut the identity, or for the first block of a stage the downsample (conv 1x1 + BN,
always computed). This is the scaled dynkernels.nn.SkipBlock: in execution="sparse" F runs
only on the samples with S_L != 0 and the scale is fused into scatter_add_rows. The gates
are computed block by block from the block's input, so sparse execution reads each block's
kept count on the host: one host sync (a 4-byte device-to-host copy) per block (16 for
ResNet-50), then the block on its compact batch, rounded up to `bucket` ("auto": multiples
of 8 on CUDA tensors, exact on the CPU and in training mode) and, with cuda_graphs
(inference on CUDA tensors), replayed from one CUDA graph per bucket size, all blocks
sharing one dynkernels.nn.GraphPool.

LC-Net complete (LCNetResNet, `lcnet_resnet18_cifar`, `lcnet_resnet50`) adds C-Net: from the
same pooled block input, S_C = ReLU-1(FC(GAP(x_i))) [N, C] scales the output channels of the
block's first conv (after its BN and ReLU); a zero salience skips the channel. In sparse
execution at inference that conv runs as a channel-sparse conv (BN folded into its weights,
out_gate = S_C) and the block's second conv reads only the channels with S_C > 0 (in_gate),
inside the SkipBlock that runs the block only on the samples with S_L != 0. L-Net-only
(cnet=False) and C-Net-only (lnet=False: every block runs, unscaled) variants are selectable;
without either it is the plain ResNet, the dense baseline.
"""
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.models._gating import bias_for_density, check_density, check_images
from dynkernels.models.blockdrop import BasicBranch, BottleneckBranch
from dynkernels.nn.fold import fold_batchnorm
from dynkernels.nn.graphs import check_graphs_arg
from dynkernels.nn.skip_block import SkipBlock, check_execution
from dynkernels.nn.skip_plan import gather_kept
from dynkernels.ops import channel_sparse_conv2d, check_backend

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

    def __init__(self, branch: nn.Module, shortcut: Optional[nn.Module], channels: int, execution: str, backend: str,
                 bucket="auto", cuda_graphs=False):
        super().__init__()
        self.gate = LNetGate(channels)
        self.skip = SkipBlock(branch, shortcut, scaled=True, execution=execution, backend=backend, bucket=bucket,
                              cuda_graphs=cuda_graphs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x, self.gate(x))


class LNetResNet(nn.Module):
    """ImageNet-style bottleneck ResNet whose every block carries an L-Net gate.

    forward(x) -> logits; `saliences(x)` -> the S_L of every block [N, num_blocks] (for
    blocks used per sample: (saliences != 0).sum(1)). execution "masked" | "sparse" (settable).
    bucket: every block's (SkipBlock). cuda_graphs: False, True (one GraphPool for all blocks)
    or a GraphPool; settable.
    """

    def __init__(self, layers, num_classes: int = 1000, execution: str = "sparse", backend: str = "auto",
                 bucket="auto", cuda_graphs=False):
        super().__init__()
        pool = check_graphs_arg("LNetResNet", cuda_graphs)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, inplanes = [], 64
        for planes, n, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
            out = planes * BottleneckBranch.expansion
            for j in range(n):
                shortcut = None
                if j == 0 and (stride != 1 or inplanes != out):
                    shortcut = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                branch = BottleneckBranch(inplanes, planes, stride if j == 0 else 1)
                blocks.append(LNetBlock(branch, shortcut, inplanes, execution, backend, bucket, pool))
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

    @property
    def cuda_graphs(self):
        """The GraphPool shared by the blocks' CUDA graphs, or None (eager)."""
        return self.blocks[0].skip.cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, value):
        pool = check_graphs_arg("LNetResNet", value)
        for b in self.blocks:
            b.skip.cuda_graphs = pool

    def seed(self, x):
        check_images("LNetResNet", x)
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


def resnet50(num_classes: int = 1000, density: Optional[float] = None, execution: str = "sparse", backend: str = "auto",
             calibration_size: int = 64, bucket="auto", cuda_graphs=False) -> LNetResNet:
    """L-Net ResNet-50 (bottleneck stages 3/4/6/3: 16 gated blocks). density: if given, the
    gates are calibrated on a fixed random batch (32 images of calibration_size^2) so that
    about that fraction of the samples keeps each block (untrained networks, benchmarks)."""
    model = LNetResNet([3, 4, 6, 3], num_classes, execution, backend, bucket)
    if density is not None:
        g = torch.Generator().manual_seed(0)
        was = model.training
        model.eval()
        model.calibrate(torch.randn(32, 3, calibration_size, calibration_size, generator=g), density)
        model.train(was)
    model.cuda_graphs = cuda_graphs  # after the calibration, which runs on CPU tensors
    return model


# ----------------------------------------------------------------------------- C-Net and LC-Net
def salience(z: torch.Tensor, training: bool) -> torch.Tensor:
    """LC-Net's gate activation: leaky ReLU-1 in training (a gradient everywhere), ReLU-1 at inference."""
    return leaky_relu1(z) if training else relu1(z)


class CNetGate(nn.Module):
    """S_C [N, channels] = ReLU-1(FC(pooled)) (leaky ReLU-1 in training); pooled = GAP of the
    block input [N, in_channels], shared with the block's L-Net."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, channels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return salience(self.fc(pooled), self.training)


class ChannelGatedBranch(nn.Module):
    """F(x) of a basic or bottleneck branch whose first conv's output channels are scaled by
    the C-Net salience s [N, C]: h = s * ReLU(BN1(conv1(x))), then the rest of the branch.

    The block sets `salience` (rows matching x: the compact batch's rows under a SkipBlock)
    for each call. In sparse execution at inference (s >= 0, so s * ReLU(.) = ReLU(s * .)),
    conv1 with BN1 folded into its weights runs only the channels with s > 0, scaled by s
    (out_gate = s), and conv2 (BN2 folded) reads only those channels (in_gate = s). Training
    mode runs the unfolded computation (BN batch statistics) in both executions.
    """

    def __init__(self, branch: nn.Module, execution: str, backend: str):
        super().__init__()
        if not isinstance(branch, (BasicBranch, BottleneckBranch)):
            raise TypeError(f"ChannelGatedBranch: branch must be a BasicBranch or BottleneckBranch, got {type(branch).__name__}")
        self.branch = branch
        self.execution = check_execution("ChannelGatedBranch", execution)
        self.backend = check_backend("ChannelGatedBranch", backend)
        self.salience: Optional[torch.Tensor] = None

    def _sparse_conv(self, x, conv, bn, out_gate, in_gate):
        weight, bias = fold_batchnorm(conv.weight, conv.bias, bn)
        return channel_sparse_conv2d(
            x, weight, bias, out_gate.to(x.dtype), in_gate, conv.stride, conv.padding, conv.dilation, backend=self.backend
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b = self.salience, self.branch
        if s is None or s.shape != (x.shape[0], b.conv1.out_channels):
            raise ValueError(
                f"ChannelGatedBranch: the salience must be set to [N, {b.conv1.out_channels}] for x of {x.shape[0]} "
                f"samples before the call, got {None if s is None else tuple(s.shape)}"
            )
        if self.execution == "sparse" and not self.training:
            h = F.relu(self._sparse_conv(x, b.conv1, b.bn1, s, None))
            z = self._sparse_conv(h, b.conv2, b.bn2, x.new_ones(x.shape[0], b.conv2.out_channels), s)
        else:
            h = F.relu(b.bn1(b.conv1(x))) * s.to(x.dtype)[:, :, None, None]
            z = b.bn2(b.conv2(h))
        if isinstance(b, BottleneckBranch):
            return b.bn3(b.conv3(F.relu(z)))
        return z


class LCNetSaliences(NamedTuple):
    blocks: Optional[torch.Tensor]  # S_L [N, num_blocks] (None without L-Net)
    channels: Optional[List[torch.Tensor]]  # S_C [N, C_b] of every block (None without C-Net)

    def l1(self, block_weight: float = 1.0, channel_weight: float = 1.0) -> torch.Tensor:
        """The salience L1 penalty: block_weight * mean |S_L| + channel_weight * mean over the
        blocks of mean |S_C| (means over samples and units, so the weights do not depend on
        the depth or width). Add it to the classification loss to push saliences to 0 (skips)."""
        parts = []
        if self.blocks is not None:
            parts.append(block_weight * self.blocks.abs().mean())
        if self.channels is not None:
            parts.append(channel_weight * torch.stack([c.abs().mean() for c in self.channels]).mean())
        return sum(parts) if parts else torch.zeros(())


class LCNetBlock(nn.Module):
    """shortcut(x) + S_L(x) * F(x; S_C(x)), with S_L and S_C from one pool of x.

    lnet=False: S_L = 1 (the block always runs); cnet=False: F is the plain branch. With L-Net
    the block is a scaled SkipBlock (sparse: F runs on the samples with S_L != 0 only, their
    C-Net saliences gathered with the same plan).
    """

    def __init__(self, branch: nn.Module, shortcut: Optional[nn.Module], channels: int, lnet: bool, cnet: bool,
                 execution: str, backend: str):
        super().__init__()
        self.gate = LNetGate(channels) if lnet else None
        self.cnet = CNetGate(channels, branch.conv1.out_channels) if cnet else None
        body = ChannelGatedBranch(branch, execution, backend) if cnet else branch
        if lnet:
            self.skip = SkipBlock(body, shortcut, scaled=True, execution=execution, backend=backend)
        else:
            self.body, self.shortcut = body, shortcut

    @property
    def _body(self) -> nn.Module:
        return self.skip.block if self.gate is not None else self.body

    def set_execution(self, value: str) -> None:
        if self.gate is not None:
            self.skip.execution = value
        if self.cnet is not None:
            self._body.execution = value

    def forward(self, x: torch.Tensor):
        """(output, S_L [N] or None, S_C [N, C] or None)."""
        pooled = x.mean(dim=(2, 3))
        s_l = salience(self.gate.fc(pooled).squeeze(1), self.training) if self.gate is not None else None
        s_c = self.cnet(pooled) if self.cnet is not None else None
        body = self._body
        try:
            if self.gate is None:
                if s_c is not None:
                    body.salience = s_c
                return (x if self.shortcut is None else self.shortcut(x)) + body(x), s_l, s_c
            plan = None
            if s_c is not None:
                if self.skip.execution == "sparse":
                    plan = self.skip.plan(s_l)
                    body.salience = gather_kept(s_c, plan, self.skip.backend)
                else:
                    body.salience = s_c
            return self.skip(x, s_l, plan), s_l, s_c
        finally:
            if s_c is not None:
                body.salience = None


class LCNetResNet(nn.Module):
    """A ResNet whose blocks carry LC-Net gates: L-Net (block salience), C-Net (channel salience
    on each block's first conv), or both (see the module docstring).

    forward(x) -> logits; forward(x, return_saliences=True) -> (logits, LCNetSaliences), whose
    .l1() is the salience penalty for training. execution "masked" | "sparse" (settable).
    Blocks are `shortcut(x) + S_L * F(x)` with no ReLU after the sum (as in LNetResNet); the
    head applies ReLU, global pooling and fc.
    """

    def __init__(self, branch: type, layers, widths, stem: str, num_classes: int, lnet: bool = True, cnet: bool = True,
                 execution: str = "sparse", backend: str = "auto"):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"LCNetResNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        inplanes = widths[0] if stem == "cifar" else 64
        self.conv1 = nn.Conv2d(3, inplanes, 3, 1, 1, bias=False) if stem == "cifar" else nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        blocks = []
        for planes, n, stride in zip(widths, layers, (1, 2, 2, 2)):
            out = planes * branch.expansion
            for j in range(n):
                shortcut = None
                if j == 0 and (stride != 1 or inplanes != out):
                    shortcut = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                blocks.append(LCNetBlock(branch(inplanes, planes, stride if j == 0 else 1), shortcut, inplanes, lnet, cnet, execution, backend))
                inplanes = out
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_blocks = len(blocks)
        self.lnet, self.cnet = bool(lnet), bool(cnet)
        self.execution = execution
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("LCNetResNet", value)
        for b in self.blocks:
            b.set_execution(value)

    def forward(self, x: torch.Tensor, return_saliences: bool = False):
        check_images("LCNetResNet", x)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        s_l, s_c = [], []
        for block in self.blocks:
            x, sl, sc = block(x)
            s_l.append(sl)
            s_c.append(sc)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))
        if not return_saliences:
            return logits
        return logits, LCNetSaliences(torch.stack(s_l, 1) if self.lnet else None, s_c if self.cnet else None)


def lcnet_resnet18_cifar(num_classes: int = 10, lnet: bool = True, cnet: bool = True, execution: str = "sparse",
                         backend: str = "auto", width: float = 1.0) -> LCNetResNet:
    """LC-Net CIFAR ResNet-18 (3x3 stem, basic blocks 2-2-2-2, 64-128-256-512 channels times
    width, 1x1 conv + BN shortcuts): 8 gated blocks."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"lcnet_resnet18_cifar: width must be a positive number, got {width!r}")
    widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
    return LCNetResNet(BasicBranch, [2, 2, 2, 2], widths, "cifar", num_classes, lnet, cnet, execution, backend)


def lcnet_resnet50(num_classes: int = 1000, lnet: bool = True, cnet: bool = True, execution: str = "sparse",
                   backend: str = "auto") -> LCNetResNet:
    """LC-Net ResNet-50 (ImageNet stem, bottleneck stages 3/4/6/3): 16 gated blocks."""
    return LCNetResNet(BottleneckBranch, [3, 4, 6, 3], [64, 128, 256, 512], "imagenet", num_classes, lnet, cnet, execution, backend)


__all__ = [
    "LNetGate", "LNetBlock", "LNetResNet", "relu1", "leaky_relu1", "resnet50", "salience", "CNetGate",
    "ChannelGatedBranch", "LCNetSaliences", "LCNetBlock", "LCNetResNet", "lcnet_resnet18_cifar", "lcnet_resnet50",
]
