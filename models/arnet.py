"""AR-Net (Meng et al., "AR-Net: Adaptive Frame Resolution for Efficient Action Recognition",
ECCV 2020): per video frame, a policy network picks ResNet-50 at 224x224, ResNet-34 at 168x168,
ResNet-18 at 112x112, its own prediction at 84x84, or skipping the frame (and the next 1, 2 or
4 frames); the video's prediction is the average of its frames' predictions.

Semantics and names follow github.com/mengyuest/AR-Net (ops/models_ada.py, TSN_Ada with
--ada_reso_skip --policy_also_backbone, the paper's configuration): `lite_backbone` (a
MobileNetV2 on the 84x84 frames, its classifier replaced by dropout) feeds an LSTM cell `rnn`
(hidden 512) frame by frame; `linear` gives the frame's action log-probabilities, `lite_fc`
the policy's own prediction; `base_model_list.<b>` are the torchvision-style ResNets (fc
replaced by dropout) and `new_fc_list.<b>` their classifiers. A skip action of length s makes
the next s - 1 frames repeat it (their LSTM hidden state and action are the skipping frame's,
as in the release). The prediction is sum over frames of the chosen backbone's logits (or the
policy's own) divided by the number of frames not skipped. The release samples the actions with
a hard Gumbel-softmax at test time too ("gumbel" here); "deterministic" (the default here) takes
their argmax. Checkpoints of the release ({'state_dict': ...} from nn.DataParallel) load with
`load_original_checkpoint`.

execution="masked" is the release's computation: every backbone on every frame, then the
one-hot actions select; execution="sparse" routes each frame to the backbone it chose
(dynkernels.nn.route_block.run_sparse; one host sync per forward for the route's sizes), so
skipped frames and frames answered by the policy cost no backbone at all. Both give the same
predictions. Difference from the release: the lower resolutions are made here from the input
frames by bilinear (antialiased) resizing, where the release's data loader resizes the decoded
frames itself.

torchvision is not needed: the ResNets and MobileNetV2 are built here with torchvision's
module names, so torchvision checkpoints load into them too.
"""
from typing import List, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.models.blockdrop import BasicBranch, BottleneckBranch
from dynkernels.nn.bucket import check_bucket
from dynkernels.nn.route_block import RoutePlan, run_sparse, training_bucket
from dynkernels.nn.skip_block import check_execution
from dynkernels.ops import _checks, check_backend

MODES = ("deterministic", "gumbel")


# ----------------------------------------------------------------------------- torchvision-style backbones
class BasicBlock(BasicBranch):
    """torchvision's BasicBlock: relu(F(x) + downsample(x)), F = BlockDrop's BasicBranch."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__(inplanes, planes, stride)
        self.downsample = downsample

    def forward(self, x):
        return F.relu(super().forward(x) + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(BottleneckBranch):
    """torchvision's Bottleneck (stride on the 3x3 conv), F = BlockDrop's BottleneckBranch."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__(inplanes, planes, stride)
        self.downsample = downsample

    def forward(self, x):
        return F.relu(super().forward(x) + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet with `fc` replaced by dropout (AR-Net's backbones): forward(x) gives
    the pooled features [N, feat_dim]."""

    def __init__(self, block: type, layers: Sequence[int], dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes * block.expansion:
                down = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * block.expansion))
            blocks = [block(inplanes, planes, stride, down)]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Dropout(dropout)
        self.feat_dim = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(dropout: float = 0.5) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), dropout)


def resnet34(dropout: float = 0.5) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), dropout)


def resnet50(dropout: float = 0.5) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), dropout)


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [_conv_bn_relu6(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1) with its classifier replaced by dropout (AR-Net's
    policy backbone): forward(x) gives the pooled features [N, 1280]."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        layers, cin = [_conv_bn_relu6(3, 32, stride=2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Dropout(dropout)
        self.feat_dim = 1280
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ----------------------------------------------------------------------------- AR-Net
def _linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)  # the release's make_a_linear
    nn.init.normal_(layer.weight, 0.0, 0.001)
    nn.init.zeros_(layer.bias)
    return layer


def _resized(frames: torch.Tensor, size: int) -> torch.Tensor:
    if frames.shape[-1] == size and frames.shape[-2] == size:
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ARNetOutput(NamedTuple):
    logits: torch.Tensor  # [B, num_classes]: the video's prediction
    actions: torch.Tensor  # [B, T, num_actions] one-hot: 3 backbones, the policy itself, the skips
    choice: torch.Tensor  # [B, T] int64: the action of each frame (argmax of actions)


class ARNet(nn.Module):
    """AR-Net: forward(frames [B, T, 3, H, W], mode="deterministic" | "gumbel") -> (logits,
    actions, choice). Frames are resized to each resolution of reso_list (backbones 0, 1, 2,
    then the policy's); actions 0-2 run backbone b at reso_list[b], action 3 takes the policy's
    own prediction, actions 4.. skip skip_list[a - 4] frames. execution "masked" | "sparse"
    (settable)."""

    def __init__(
        self,
        num_classes: int = 200,
        num_segments: int = 16,
        reso_list: Sequence[int] = (224, 168, 112, 84),
        skip_list: Sequence[int] = (1, 2, 4),
        hidden_dim: int = 512,
        dropout: float = 0.5,
        execution: str = "sparse",
        backend: str = "auto",
        bucket="auto",
    ):
        super().__init__()
        if len(reso_list) != 4:
            raise ValueError(f"ARNet: reso_list needs 4 resolutions (3 backbones, then the policy's), got {list(reso_list)}")
        if any(not isinstance(s, int) or s < 1 for s in skip_list):
            raise ValueError(f"ARNet: skip_list must hold positive ints, got {list(skip_list)}")
        self.num_segments = num_segments
        self.reso_list = list(reso_list)
        self.skip_list = list(skip_list)
        self.num_backbones = 3
        self.reso_dim = self.num_backbones + 1  # the backbones and the policy's own prediction
        self.num_actions = self.reso_dim + len(self.skip_list)
        self.lite_backbone = MobileNetV2(dropout)
        self.rnn = nn.LSTMCell(self.lite_backbone.feat_dim, hidden_dim)
        self.linear = _linear(hidden_dim, self.num_actions)
        self.lite_fc = _linear(hidden_dim, num_classes)
        self.base_model_list = nn.ModuleList([resnet50(dropout), resnet34(dropout), resnet18(dropout)])
        self.new_fc_list = nn.ModuleList(_linear(m.feat_dim, num_classes) for m in self.base_model_list)
        self.num_classes = num_classes
        self.execution = execution
        self.backend = check_backend("ARNet", backend)
        self.bucket = check_bucket("ARNet", bucket)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("ARNet", value)

    def _check_input(self, frames):
        _checks.tensor("ARNet", "frames", frames, (5,), f"[B, T = {self.num_segments}, 3, H, W]")
        if frames.shape[1] != self.num_segments or frames.shape[2] != 3:
            raise ValueError(f"ARNet: frames must be [B, {self.num_segments}, 3, H, W], got {tuple(frames.shape)}")

    def policy(self, frames: torch.Tensor, mode: str = "deterministic", tau: float = 1.0):
        """(actions [B, T, num_actions] one-hot, the policy's own logits [B, T, num_classes])."""
        if mode not in MODES:
            raise ValueError(f"ARNet: mode must be one of {MODES}, got {mode!r}")
        b, t = frames.shape[:2]
        feat = self.lite_backbone(_resized(frames.flatten(0, 1), self.reso_list[-1])).view(b, t, -1)
        hx = feat.new_zeros(b, self.rnn.hidden_size)
        cx = feat.new_zeros(b, self.rnn.hidden_size)
        remain = torch.zeros(b, device=frames.device)  # frames left to skip
        skips = torch.tensor(self.skip_list, dtype=remain.dtype, device=frames.device)
        old_hx = old_r = None
        actions, lite = [], []
        for step in range(t):
            hx, cx = self.rnn(feat[:, step], (hx, cx))
            log_p = torch.log(torch.softmax(self.linear(hx), dim=1).clamp(min=1e-8))
            lite.append(self.lite_fc(hx))
            if mode == "gumbel":
                r = F.gumbel_softmax(log_p, tau, hard=True)
            else:
                r = F.one_hot(log_p.argmax(dim=1), self.num_actions).to(log_p.dtype)
            if old_hx is not None:  # a frame inside a skip repeats the skipping frame's state and action
                take_old = (remain > 0.5).view(-1, 1)
                hx = torch.where(take_old, old_hx, hx)
                r = torch.where(take_old, old_r, r)
            starts = (remain < 0.5) & (r[:, self.reso_dim :].max(dim=1).values > 0.5)
            remain = torch.where(starts, (r[:, self.reso_dim :] * skips).sum(dim=1), remain)
            old_hx, old_r = hx, r
            actions.append(r)
            remain = (remain - 1).clamp(min=0)
        return torch.stack(actions, dim=1), torch.stack(lite, dim=1)

    def _backbone(self, b: int):
        size, net, fc = self.reso_list[b], self.base_model_list[b], self.new_fc_list[b]
        return lambda frames: fc(net(_resized(frames, size)))

    def forward(self, frames: torch.Tensor, mode: str = "deterministic", tau: float = 1.0) -> ARNetOutput:
        self._check_input(frames)
        actions, lite = self.policy(frames, mode, tau)
        b, t = frames.shape[:2]
        choice = actions.argmax(dim=2)
        used = actions[:, :, : self.reso_dim]
        frames = frames.flatten(0, 1)
        if self.execution == "masked":
            preds = [self._backbone(k)(frames).view(b, t, -1) for k in range(self.num_backbones)] + [lite]
            total = (torch.stack(preds, dim=2) * used.unsqueeze(-1)).sum(dim=(1, 2))
        else:
            # frames answered by the policy keep its prediction, skipped ones zero; the rest are
            # written over by the backbone they chose (skips routed together, as branch 4)
            flat = choice.flatten()
            per_frame = torch.where((flat == self.num_backbones).view(-1, 1), lite.flatten(0, 1), torch.zeros((), dtype=lite.dtype, device=lite.device))
            plan = RoutePlan(flat.clamp(max=self.reso_dim), self.reso_dim + 1, self.backend)  # the one host sync
            bucket = training_bucket("ARNet", self.bucket, self, frames.device)
            branches: List = [self._backbone(k) for k in range(self.num_backbones)] + [None, None]
            per_frame = run_sparse(frames, branches, plan[0], bucket, self.backend, out=per_frame.contiguous(), owner="ARNet")
            total = per_frame.view(b, t, -1).sum(dim=1)
        return ARNetOutput(total / used.sum(dim=(1, 2)).clamp(min=1).unsqueeze(1), actions, choice)

    def load_original_checkpoint(self, checkpoint: dict) -> None:
        """Load a checkpoint of the release's main_base.py ({'state_dict': ...}, or the state
        dict itself), with or without nn.DataParallel's 'module.' prefix."""
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise TypeError(f"ARNet.load_original_checkpoint: expected a dict (a checkpoint or a state dict), got {type(checkpoint).__name__}")
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        self.load_state_dict(state)


__all__ = ["ARNet", "ARNetOutput", "ResNet", "MobileNetV2", "resnet18", "resnet34", "resnet50"]
