"""FBS networks (Gao et al., "Dynamic Channel Pruning: Feature Boosting and Suppression",
ICLR'19; reference code: the Mayo framework): every gated conv is a dynkernels.nn.FBSConv2d,
and each one's input gate is the previous gated conv's mask, so in execution="sparse" a chain
of gated convs saves on both sides (k / C of the outputs from k' / C' of the inputs).

    fbs_cifarnet   M-CifarNet, Mayo's cifarnet: 8 gated 3x3 convs 64-64-128-128-128-192-192-192
                   (strides 1 1 2 1 1 2 1 1, dropout after the 4th and 7th), global pool, fc
    fbs_vgg16      VGG-16 (13 gated convs), head="imagenet" (7x7 pool, fc 4096-4096) or "cifar"
                   (global pool, one fc)
    fbs_resnet18   ResNet-18 whose two 3x3 convs of every basic block are gated (the second
                   without its own ReLU: it comes after the residual add); stem and downsample
                   shortcuts dense; stem="imagenet" (7x7/2 + max pool) or "cifar" (3x3)
    cifarnet       the dense M-CifarNet (conv + BN + ReLU), the baseline; fbs_convert(cifarnet(), d)
                   gives an FBS M-CifarNet initialised from it

Each FBS constructor takes (num_classes, density=0.5, execution="sparse"|"masked",
backend="auto") and `width` (a channel multiplier, 1 = the published widths). forward(x) ->
logits; forward(x, return_gates=True) -> (logits, the gate [N, C] of every gated conv in order:
g on the k winners, 0 elsewhere). `execution`, `density` and `backend` are settable on the
network and reach every gated conv. Training mode computes every channel (BN batch
statistics) in both executions; at inference "masked" is the dense conv times the mask and
"sparse" the channel-sparse conv with BN and the gate folded in, with the same output.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.nn.fbs import FBSConv2d, check_fbs_density
from dynkernels.nn.skip_block import check_execution
from dynkernels.ops import check_backend

MCIFARNET = ((64, 1), (64, 1), (128, 2), (128, 1), (128, 1), (192, 2), (192, 1), (192, 1))  # (channels, stride)
MCIFARNET_DROPOUT_AFTER = (3, 6)
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
HEADS = ("imagenet", "cifar")
STEMS = ("imagenet", "cifar")


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _check_width(owner: str, width) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"{owner}: width must be a positive number, got {width!r}")
    return float(width)


def _check_image(owner: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{owner}: x must be a [N, 3, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")


def _init_convs(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class FBSNet(nn.Module):
    """What every FBS network shares: its gated convs, the settings that reach all of them,
    and forward(x, return_gates=False) around the network's own _forward(x, gates)."""

    def __init__(self, density: float, execution: str, backend: str):
        super().__init__()
        self._density = check_fbs_density(type(self).__name__, density)
        self._execution = check_execution(type(self).__name__, execution)
        self._backend = check_backend(type(self).__name__, backend)

    def fbs_layers(self) -> List[FBSConv2d]:
        return [m for m in self.modules() if isinstance(m, FBSConv2d)]

    def _gated_conv(self, cin: int, cout: int, stride: int, relu: bool = True) -> FBSConv2d:
        return FBSConv2d(cin, cout, 3, stride, 1, density=self._density, relu=relu, execution=self._execution, backend=self._backend)

    @property
    def density(self) -> float:
        return self._density

    @density.setter
    def density(self, value: float):
        self._density = check_fbs_density(type(self).__name__, value)
        for m in self.fbs_layers():
            m.density = value

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution(type(self).__name__, value)
        for m in self.fbs_layers():
            m.execution = value

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str):
        self._backend = check_backend(type(self).__name__, value)
        for m in self.fbs_layers():
            m.backend = value

    @staticmethod
    def _chain(layer: FBSConv2d, x: torch.Tensor, prev: Optional[FBSConv2d], prev_gate, gates: list):
        """layer on x, with the previous gated conv's gate as input gate (None: dense input)."""
        out = layer.forward_gated(x, prev_gate, None if prev is None else prev.k / prev.out_channels)
        gates.append(out.gate)
        return out.y, out.gate

    def forward(self, x: torch.Tensor, return_gates: bool = False):
        _check_image(type(self).__name__, x)
        gates: List[torch.Tensor] = []
        logits = self._forward(x, gates)
        return (logits, gates) if return_gates else logits


class FBSCifarNet(FBSNet):
    """M-CifarNet with every conv gated (see the module docstring)."""

    def __init__(self, num_classes: int = 10, density: float = 0.5, execution: str = "sparse", backend: str = "auto",
                 width: float = 1.0, dropout: float = 0.5):
        super().__init__(density, execution, backend)
        width = _check_width("FBSCifarNet", width)
        layers, cin = [], 3
        for channels, stride in MCIFARNET:
            layers.append(self._gated_conv(cin, _scaled(channels, width), stride))
            cin = _scaled(channels, width)
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        _init_convs(self)

    def _forward(self, x, gates):
        prev, gate = None, None
        for i, layer in enumerate(self.layers):
            x, gate = self._chain(layer, x, prev, gate, gates)
            prev = layer
            if i in MCIFARNET_DROPOUT_AFTER:
                x = self.dropout(x)  # zeros elements only: the gated-off channels stay 0
        return self.fc(x.mean(dim=(2, 3)))


class FBSVGG16(FBSNet):
    """VGG-16 with its 13 convs gated; max pooling keeps a gated-off (all-zero) channel 0, so
    the input gate chains across it."""

    def __init__(self, num_classes: int = 1000, density: float = 0.5, execution: str = "sparse", backend: str = "auto",
                 head: str = "imagenet", width: float = 1.0):
        super().__init__(density, execution, backend)
        if head not in HEADS:
            raise ValueError(f"FBSVGG16: head must be one of {HEADS}, got {head!r}")
        width = _check_width("FBSVGG16", width)
        layers, cin = [], 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(self._gated_conv(cin, _scaled(v, width), 1))
                cin = _scaled(v, width)
        self.features = nn.ModuleList(layers)
        self.head = head
        if head == "imagenet":
            hidden = _scaled(4096, width)
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(cin * 49, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(cin, num_classes)
        _init_convs(self)

    def _forward(self, x, gates):
        prev, gate = None, None
        for layer in self.features:
            if isinstance(layer, FBSConv2d):
                x, gate = self._chain(layer, x, prev, gate, gates)
                prev = layer
            else:
                x = layer(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


class FBSBasicBlock(nn.Module):
    """relu(shortcut(x) + FBS(conv2)(FBS(conv1)(x))), conv2's input gate being conv1's mask."""

    def __init__(self, net: FBSNet, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = net._gated_conv(cin, planes, stride)
        self.conv2 = net._gated_conv(planes, planes, 1, relu=False)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor, gates: list) -> torch.Tensor:
        h, gate = FBSNet._chain(self.conv1, x, None, None, gates)
        y, _ = FBSNet._chain(self.conv2, h, self.conv1, gate, gates)
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class FBSResNet18(FBSNet):
    """ResNet-18 (basic blocks 2-2-2-2, 64-128-256-512 channels) with gated block convs."""

    def __init__(self, num_classes: int = 1000, density: float = 0.5, execution: str = "sparse", backend: str = "auto",
                 stem: str = "imagenet", width: float = 1.0):
        super().__init__(density, execution, backend)
        if stem not in STEMS:
            raise ValueError(f"FBSResNet18: stem must be one of {STEMS}, got {stem!r}")
        width = _check_width("FBSResNet18", width)
        cin = _scaled(64, width)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, cin, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, cin, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(cin)
        blocks = []
        for planes, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
            planes = _scaled(planes, width)
            blocks += [FBSBasicBlock(self, cin, planes, stride), FBSBasicBlock(self, planes, planes, 1)]
            cin = planes
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, num_classes)
        self.stem = stem
        _init_convs(self)

    def _forward(self, x, gates):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for block in self.blocks:
            x = block(x, gates)
        return self.fc(x.mean(dim=(2, 3)))


def fbs_cifarnet(num_classes: int = 10, density: float = 0.5, execution: str = "sparse", backend: str = "auto",
                 width: float = 1.0, dropout: float = 0.5) -> FBSCifarNet:
    """FBS M-CifarNet: 8 gated convs 64-64-128-128-128-192-192-192 (times width)."""
    return FBSCifarNet(num_classes, density, execution, backend, width, dropout)


def fbs_vgg16(num_classes: int = 1000, density: float = 0.5, execution: str = "sparse", backend: str = "auto",
              head: str = "imagenet", width: float = 1.0) -> FBSVGG16:
    """FBS VGG-16; head="imagenet" (224x224 input) or "cifar" (32x32 input)."""
    return FBSVGG16(num_classes, density, execution, backend, head, width)


def fbs_resnet18(num_classes: int = 1000, density: float = 0.5, execution: str = "sparse", backend: str = "auto",
                 stem: str = "imagenet", width: float = 1.0) -> FBSResNet18:
    """FBS ResNet-18; stem="imagenet" (7x7/2 conv + max pool) or "cifar" (3x3 conv)."""
    return FBSResNet18(num_classes, density, execution, backend, stem, width)


class CifarNet(nn.Module):
    """The dense M-CifarNet: 8 x (3x3 conv, BN, ReLU), dropout after the 4th and 7th, global
    pool, fc. `features` is an nn.Sequential of conv/BN pairs, the form fbs_convert gates."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        width = _check_width("CifarNet", width)
        mods, cin = [], 3
        for i, (channels, stride) in enumerate(MCIFARNET):
            c = _scaled(channels, width)
            mods += [nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            if i in MCIFARNET_DROPOUT_AFTER:
                mods.append(nn.Dropout(dropout))
            cin = c
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(cin, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image("CifarNet", x)
        return self.fc(self.features(x).mean(dim=(2, 3)))


def cifarnet(num_classes: int = 10, width: float = 1.0, dropout: float = 0.5) -> CifarNet:
    """The dense M-CifarNet (the baseline of fbs_cifarnet)."""
    return CifarNet(num_classes, width, dropout)


__all__ = [
    "FBSNet", "FBSCifarNet", "FBSVGG16", "FBSResNet18", "FBSBasicBlock", "CifarNet",
    "fbs_cifarnet", "fbs_vgg16", "fbs_resnet18", "cifarnet",
]
