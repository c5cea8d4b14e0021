"""FBS, feature boosting and suppression (Gao et al., ICLR'19), as its reference code (the Mayo
framework) defines it: fbs_gate (k-winners-take-all saliency), FBSConv2d (one gated conv layer)
and fbs_convert (FBS gating added to every Conv2d + BatchNorm2d pair of an existing network).

Per gated conv, from the conv's input x:
    g    = ReLU(FC(GAP(x)))                   saliency [N, Cout] (FC bias initialised to 1)
    mask = the k = ceil(d * Cout) largest g of each sample (k-winners-take-all), and g > 0
    y    = act(mask * g * BN_noaffine(conv(x)) + mask * beta)
BN without scale and shift (g is the scale), beta a per-channel shift, act ReLU (or none, e.g.
the second conv of a residual block, before the residual add). The mask gets no gradient; g
gets one through the product (the FC learns from the loss).

Execution. Training mode always runs the unfolded computation above (BN takes batch
statistics over all samples and channels, so every channel is computed). At inference,
execution="masked" does the same with the running statistics (dense conv times the mask);
execution="sparse" folds BN and the gate into the channel-sparse conv's epilogue:
    channel_sparse_conv2d(x, weight, bias=b - running_mean, out_gate=mask * g / sigma,
                          in_gate, shift=beta),   sigma = sqrt(running_var + eps)
so only the k winners of each sample are computed, and, given the previous gated conv's mask
as in_gate (its inactive channels are exactly 0), only from its active input channels.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import channel_sparse_conv2d, check_backend
from .fold import batchnorm_epilogue
from .gated_conv import GatedConv2d
from .skip_block import check_execution

FC_BIAS_INIT = 1.0  # the reference's saliency predictor: bias 1, weights truncated normal (std 0.05)
FC_WEIGHT_STD = 0.05
BETA_INIT = 0.1  # the reference's constant per-channel shift


def check_fbs_density(owner: str, density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{owner}: density must be in (0, 1], got {density!r}")
    return float(density)


def winners(density: float, channels: int) -> int:
    """k = ceil(density * channels), robust to float rounding (0.3 * 10 is 3, not 4)."""
    return min(channels, max(1, math.ceil(round(density * channels, 9))))


def fbs_gate(x: torch.Tensor, fc: nn.Linear, density: float) -> torch.Tensor:
    """FBS channel saliency: k-winners-take-all of ReLU(fc(GAP(x))).

    x [N, C, H, W]; fc maps C to Cout. Keeps the k = ceil(density * Cout) largest saliencies
    of each sample (their values; the rest are 0). The result is an out_gate [N, Cout] for
    GatedConv2d: a sample has exactly k active channels where at least k of its saliencies
    are positive (a saliency of 0 is inactive, as in the reference's threshold test).
    """
    density = check_fbs_density("fbs_gate", density)
    if x.dim() != 4:
        raise ValueError(f"fbs_gate: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    saliency = F.relu(fc(x.mean(dim=(2, 3))))
    k = winners(density, saliency.shape[1])
    if k >= saliency.shape[1]:
        return saliency
    top = saliency.topk(k, dim=1)
    return torch.zeros_like(saliency).scatter(1, top.indices, top.values)


class FBSOutput(NamedTuple):
    y: torch.Tensor  # [N, Cout, Ho, Wo]
    gate: torch.Tensor  # [N, Cout]: g on the k winners, 0 elsewhere (mask = gate > 0)


class FBSConv2d(nn.Module):
    """Conv + BN (no affine) + FBS gate + activation as one module (see the module docstring).

    FBSConv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
              bias=False, *, density=0.5, relu=True, execution="sparse", backend="auto",
              infer_in_gate=False, eps=1e-5, momentum=0.1)
      forward(x, in_gate=None) -> y;  forward_gated(x, in_gate=None, in_density=None) -> (y, gate)
    in_gate [N, Cin]: the previous gated conv's gate (input channel c of sample n is used where
    in_gate[n, c] > 0); in_density: its density (k / Cin), passed on in the host-side density
    hint. infer_in_gate=True (what fbs_convert sets, where the data flow between convs is not
    known) takes the input channels that are not all zero as in_gate in sparse execution: exact,
    at the cost of one pass over x. Parameters: conv.weight (conv.bias), saliency.{weight,bias}
    (the FC), beta; buffers bn.running_mean / running_var.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = False, *,
        density: float = 0.5, relu: bool = True, execution: str = "sparse", backend: str = "auto",
        infer_in_gate: bool = False, eps: float = 1e-5, momentum: float = 0.1,
    ):
        super().__init__()
        check_backend("FBSConv2d", backend)  # named here, not by the GatedConv2d inside
        self.conv = GatedConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias, backend=backend)
        self.conv._gated_padding()  # groups 1 and a padding the sparse path supports: fail here, not at inference
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=False)
        self.saliency = nn.Linear(in_channels, out_channels)
        self.beta = nn.Parameter(torch.full((out_channels,), BETA_INIT))
        nn.init.trunc_normal_(self.saliency.weight, std=FC_WEIGHT_STD, a=-2 * FC_WEIGHT_STD, b=2 * FC_WEIGHT_STD)
        nn.init.constant_(self.saliency.bias, FC_BIAS_INIT)
        self.density = density
        self.relu = bool(relu)
        self.execution = execution
        self.infer_in_gate = bool(infer_in_gate)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def density(self) -> float:
        return self._density

    @density.setter
    def density(self, value: float):
        self._density = check_fbs_density("FBSConv2d", value)

    @property
    def k(self) -> int:
        """Active output channels per sample."""
        return winners(self._density, self.out_channels)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("FBSConv2d", value)

    @property
    def backend(self) -> str:
        return self.conv.backend

    @backend.setter
    def backend(self, value: str):
        self.conv.backend = check_backend("FBSConv2d", value)

    def extra_repr(self) -> str:
        return f"density={self._density}, k={self.k}, relu={self.relu}, execution={self._execution!r}"

    def _check_input(self, x: torch.Tensor, in_gate: Optional[torch.Tensor]):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FBSConv2d: x must be [N, {self.in_channels}, H, W], got {getattr(x, 'shape', type(x).__name__)}"
            )
        if in_gate is not None and (not isinstance(in_gate, torch.Tensor) or tuple(in_gate.shape) != tuple(x.shape[:2])):
            raise ValueError(
                f"FBSConv2d: in_gate must be [N, Cin] = [{x.shape[0]}, {self.in_channels}], "
                f"got {getattr(in_gate, 'shape', type(in_gate).__name__)}"
            )

    def forward(self, x: torch.Tensor, in_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_gated(x, in_gate).y

    def forward_gated(self, x: torch.Tensor, in_gate: Optional[torch.Tensor] = None, in_density: Optional[float] = None) -> FBSOutput:
        self._check_input(x, in_gate)
        gate = fbs_gate(x, self.saliency, self._density)
        if self._execution == "sparse" and not self.training:
            y = self._folded(x, gate, in_gate, in_density)
        else:
            y = self._unfolded(x, gate, in_gate)
        return FBSOutput(F.relu(y) if self.relu else y, gate)

    def _unfolded(self, x, gate, in_gate):
        if in_gate is not None:
            x = x * (in_gate > 0).to(x.dtype)[:, :, None, None]
        z = self.bn(self.conv(x))
        g = gate.to(z.dtype)[:, :, None, None]
        return g * z + (g > 0).to(z.dtype) * self.beta.to(z.dtype)[None, :, None, None]

    def _folded(self, x, gate, in_gate, in_density):
        if in_gate is None and self.infer_in_gate:
            in_gate = (x != 0).flatten(2).any(2)
            in_density = None
        inv_sigma, bias = batchnorm_epilogue(self.bn, self.conv.bias, x.dtype)
        hint = self.k / self.out_channels * (1.0 if in_density is None else in_density)
        return channel_sparse_conv2d(
            x, self.conv.weight, bias, (gate * inv_sigma).to(x.dtype), in_gate, self.conv.stride,
            self.conv._gated_padding(), self.conv.dilation, shift=self.beta.to(x.dtype), backend=self.backend,
            density=min(1.0, hint),
        )

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, density: float, *, relu: bool = False,
                     execution: str = "sparse", backend: str = "auto", infer_in_gate: bool = True) -> "FBSConv2d":
        """An FBSConv2d computing what bn(conv(x)) computes (then ReLU if relu) at density 1.

        conv's weight Parameter is reused; bn's running statistics, eps and momentum are
        copied into the FBS BN (no affine). The FC gets weight 0 and bias |gamma| (gamma = bn's
        scale), so g = |gamma| for every input, and beta = bn's shift. A channel with gamma < 0
        has its conv weight (and conv bias) and running mean negated in place, which leaves
        gamma * BN(conv(x)) unchanged: |gamma| * BN(conv_{-w}(x)) is the same value. A channel
        with gamma = 0 has saliency 0 and is never active: its output is 0 instead of the
        constant beta (exact where beta = 0, or beta <= 0 followed by a ReLU).
        """
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"FBSConv2d.from_conv_bn: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if bn.num_features != conv.out_channels or not bn.track_running_stats:
            raise ValueError(
                f"FBSConv2d.from_conv_bn: bn must be a BatchNorm2d({conv.out_channels}) with running statistics, got {bn}"
            )
        p = conv.weight
        with torch.device("meta"):
            fbs = cls(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                bias=conv.bias is not None, density=density, relu=relu, execution=execution, backend=backend,
                infer_in_gate=infer_in_gate, eps=bn.eps, momentum=bn.momentum,
            )
        fbs.conv.padding_mode = conv.padding_mode
        fbs.conv._gated_padding()
        fbs.conv.weight, fbs.conv.bias = conv.weight, conv.bias
        fbs.bn.to_empty(device=p.device).to(bn.running_mean.dtype)
        fbs.bn.running_mean.copy_(bn.running_mean)
        fbs.bn.running_var.copy_(bn.running_var)
        fbs.bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean)
        shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
        fbs.saliency = nn.Linear(conv.in_channels, conv.out_channels, device=p.device, dtype=p.dtype)
        fbs.beta = nn.Parameter(shift.to(p.dtype).clone())
        with torch.no_grad():
            fbs.saliency.weight.zero_()
            fbs.saliency.bias.copy_(gamma.abs())
            flip = torch.where(gamma < 0, -1.0, 1.0).to(p.dtype)
            conv.weight.mul_(flip.view(-1, 1, 1, 1))
            if conv.bias is not None:
                conv.bias.mul_(flip)
            fbs.bn.running_mean.mul_(flip.to(fbs.bn.running_mean.dtype))
        fbs.train(conv.training)
        return fbs


def _conv_bn_pairs(model: nn.Module):
    """(parent, conv name, bn name) for every nn.Conv2d child immediately followed, in its
    parent's registration order, by a BatchNorm2d child over its output channels (how
    torchvision's ResNet/VGG blocks and nn.Sequential stacks define conv + BN)."""
    pairs = []
    for parent in model.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if (
                type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.num_features == conv.out_channels
                and bn.track_running_stats and conv.groups == 1 and conv.padding_mode == "zeros"
            ):
                pairs.append((parent, conv_name, bn_name))
    return pairs


def fbs_convert(model: nn.Module, density: float, execution: str = "sparse", backend: str = "auto") -> nn.Module:
    """Add FBS gating to every Conv2d + BatchNorm2d pair of `model` (in place); returns model.

    A pair is an nn.Conv2d child (groups 1, zero padding) immediately followed in its parent's
    registration order by an nn.BatchNorm2d child with running statistics over its outputs, as
    in torchvision's ResNet and VGG (conv1/bn1, conv2/bn2, downsample.0/.1, features.i/.i+1).
    The conv becomes an FBSConv2d computing conv + BN + gate (no activation: the model's own
    ReLU stays where it was), the BN an nn.Identity. Weights are kept (the conv's Parameter
    objects are reused), and each saliency predictor is initialised so that at density 1 the
    converted model computes what the original did wherever the BN scales are non-zero (see
    FBSConv2d.from_conv_bn: a negative scale flips the sign of its conv channel in place; a
    zero scale makes the channel inactive, its output 0 instead of the constant BN shift).
    Until it is fine-tuned the saliency does not depend on the input (the FC weights are 0),
    so at density < 1 every sample keeps the channels with the largest |scale|.

    In sparse execution each converted conv takes as its input gate the input channels that
    are not all zero (e.g. after the previous gated conv and a ReLU), since the data flow
    between the modules is not known here.
    """
    density = check_fbs_density("fbs_convert", density)
    check_execution("fbs_convert", execution)
    check_backend("fbs_convert", backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fbs_convert: model must be an nn.Module, got {type(model).__name__}")
    pairs = _conv_bn_pairs(model)
    if not pairs:
        raise ValueError(
            "fbs_convert: the model has no Conv2d followed by a BatchNorm2d over its outputs (in one parent module's "
            "registration order, e.g. conv1/bn1 or nn.Sequential(conv, bn, ...)); nothing to gate"
        )
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, FBSConv2d.from_conv_bn(conv, bn, density, execution=execution, backend=backend))
        setattr(parent, bn_name, nn.Identity())
    return model


__all__ = ["FBSConv2d", "FBSOutput", "fbs_convert", "fbs_gate", "winners"]
