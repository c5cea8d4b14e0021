"""MSDNet (Huang et al., ICLR 2018): a multi-scale dense network with a classifier after each
block; in budgeted batch classification a confident image leaves at an early classifier and
the later blocks run only on the images still in.

Architecture and names follow github.com/kalviny/MSDNet-PyTorch (models/msdnet.py): `blocks.<k>`
(nn.Sequential of MSDNFirstLayer / MSDNLayer / transition ParallelModule layers, each made of
ConvBasic / ConvBN `net` sequences, ConvNormal's `conv_normal`, ConvDownNormal's `conv_down` and
`conv_normal`) and `classifier.<k>` (ClassifierModule: `m`, then `linear`). The configuration
fields are the release's command-line options (nBlocks -> n_blocks, nChannels -> n_channels,
base, stepmode -> step_mode, step, growthRate -> growth_rate, grFactor -> gr_factor,
bnFactor -> bn_factor, prune, reduction, bottleneck); its checkpoints ({'state_dict': ...}
saved from nn.DataParallel) load with `load_original_checkpoint`. Weights start from PyTorch's
default initialisation, as in the release (its _init_weights only sees each block's top-level
layers, none of which is a Conv2d or BatchNorm2d).

Budgeted batch classification (the release's adaptive_inference.py): on held-out data, the
max-softmax confidence of every classifier is collected; for an exit distribution q_k
proportional to p^k (k = 1..K), thresholds are chosen exit by exit so that a fraction q_k of
the images leaves at exit k (the confidence of the last image to leave, among those still in);
p is searched so that the average FLOPs per image meets a budget (`calibrate`). Here the
thresholds then drive real early exit (dynkernels.nn.early_exit): execution="sparse" runs block
k only on the images still in (one host sync per exit but the last), execution="masked" runs
every block on every image and selects (how the release evaluates), with the same logits and
exits. Differences from the release: an exit that no image should leave at gets threshold 1
(the release's "never" is 1e8, outside the [0, 1] of a confidence), so an image of confidence
exactly 1 still leaves there; the calibrated FLOPs follow that rule too.
"""
import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dynkernels.models._gating import check_images
from dynkernels.nn.bucket import check_bucket
from dynkernels.nn.early_exit import check_thresholds, max_softmax, run_masked, run_sparse
from dynkernels.nn.route_block import training_bucket
from dynkernels.nn.skip_block import check_execution
from dynkernels.ops import _checks, check_backend


@dataclass(frozen=True)
class MSDNetConfig:
    """The release's architecture options (see the module docstring for their names there)."""

    data: str = "cifar"  # "cifar" (3x3 stem, 32x32) or "imagenet" (7x7 stem + max-pool, 224x224)
    n_blocks: int = 5
    n_channels: int = 16
    base: int = 1
    step_mode: str = "lin_grow"  # "even": step layers per block; "lin_grow": step * k + 1 for block k
    step: int = 1
    growth_rate: int = 6
    gr_factor: Tuple[int, ...] = (1, 2, 4)
    bn_factor: Tuple[int, ...] = (1, 2, 4)
    prune: str = "max"
    reduction: float = 0.5
    bottleneck: bool = True

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)

    def check(self):
        if self.data not in ("cifar", "imagenet"):
            raise ValueError(f"MSDNet: data must be 'cifar' or 'imagenet', got {self.data!r}")
        if self.step_mode not in ("even", "lin_grow"):
            raise ValueError(f"MSDNet: step_mode must be 'even' or 'lin_grow', got {self.step_mode!r}")
        if self.prune not in ("min", "max"):
            raise ValueError(f"MSDNet: prune must be 'min' or 'max', got {self.prune!r}")
        if len(self.bn_factor) != len(self.gr_factor):
            raise ValueError(f"MSDNet: gr_factor and bn_factor need one entry per scale, got {self.gr_factor} and {self.bn_factor}")
        if self.n_blocks < 1:
            raise ValueError(f"MSDNet: n_blocks must be >= 1, got {self.n_blocks}")


# ----------------------------------------------------------------------------- layers
class ConvBasic(nn.Module):
    def __init__(self, n_in: int, n_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(n_in, n_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(n_out), nn.ReLU())

    def forward(self, x):
        return self.net(x)


class ConvBN(nn.Module):
    """[1x1 bottleneck conv BN ReLU] then a 3x3 conv (stride 1: "normal", 2: "down") BN ReLU."""

    def __init__(self, n_in: int, n_out: int, kind: str, bottleneck: bool, bn_width: int):
        super().__init__()
        layers, inner = [], n_in
        if bottleneck:
            inner = min(inner, bn_width * n_out)
            layers += [nn.Conv2d(n_in, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU()]
        layers += [nn.Conv2d(inner, n_out, 3, 2 if kind == "down" else 1, 1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ConvDownNormal(nn.Module):
    """The next scale's features: [x_fine downsampled, x_coarse convolved, x_coarse] concatenated."""

    def __init__(self, n_in1: int, n_in2: int, n_out: int, bottleneck: bool, bn_width1: int, bn_width2: int):
        super().__init__()
        self.conv_down = ConvBN(n_in1, n_out // 2, "down", bottleneck, bn_width1)
        self.conv_normal = ConvBN(n_in2, n_out // 2, "normal", bottleneck, bn_width2)

    def forward(self, x):
        return torch.cat([x[1], self.conv_down(x[0]), self.conv_normal(x[1])], dim=1)


class ConvNormal(nn.Module):
    def __init__(self, n_in: int, n_out: int, bottleneck: bool, bn_width: int):
        super().__init__()
        self.conv_normal = ConvBN(n_in, n_out, "normal", bottleneck, bn_width)

    def forward(self, x):
        x = x if isinstance(x, list) else [x]
        return torch.cat([x[0], self.conv_normal(x[0])], dim=1)


class MSDNFirstLayer(nn.Module):
    """The image -> its features at every scale."""

    def __init__(self, n_out: int, cfg: MSDNetConfig):
        super().__init__()
        self.layers = nn.ModuleList()
        width = n_out * cfg.gr_factor[0]
        if cfg.data == "cifar":
            self.layers.append(ConvBasic(3, width, 3, 1, 1))
        else:  # the release's ImageNet stem (its 7x7 conv has a bias)
            self.layers.append(nn.Sequential(nn.Conv2d(3, width, 7, 2, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)))
        for s in range(1, cfg.n_scales):
            self.layers.append(ConvBasic(width, n_out * cfg.gr_factor[s], 3, 2, 1))
            width = n_out * cfg.gr_factor[s]

    def forward(self, x):
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class MSDNLayer(nn.Module):
    """One dense layer over the scales: growth_rate new channels per scale (times gr_factor);
    with in_scales > out_scales the finest scale is dropped."""

    def __init__(self, n_in: int, n_out: int, cfg: MSDNetConfig, in_scales: int, out_scales: int):
        super().__init__()
        self.in_scales, self.out_scales = in_scales, out_scales
        self.discard = in_scales - out_scales
        offset = cfg.n_scales - out_scales
        gr, bn = cfg.gr_factor, cfg.bn_factor
        self.layers = nn.ModuleList()
        if self.discard > 0:
            self.layers.append(ConvDownNormal(n_in * gr[offset - 1], n_in * gr[offset], n_out * gr[offset], cfg.bottleneck, bn[offset - 1], bn[offset]))
        else:
            self.layers.append(ConvNormal(n_in * gr[offset], n_out * gr[offset], cfg.bottleneck, bn[offset]))
        for s in range(offset + 1, cfg.n_scales):
            self.layers.append(ConvDownNormal(n_in * gr[s - 1], n_in * gr[s], n_out * gr[s], cfg.bottleneck, bn[s - 1], bn[s]))

    def forward(self, x):
        if self.discard > 0:
            inputs = [[x[s - 1], x[s]] for s in range(1, self.out_scales + 1)]
        else:
            inputs = [[x[0]]] + [[x[s - 1], x[s]] for s in range(1, self.out_scales)]
        return [layer(inp) for layer, inp in zip(self.layers, inputs)]


class ParallelModule(nn.Module):
    """One module per scale (the transition layers' 1x1 convolutions)."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.m = nn.ModuleList(modules)

    def forward(self, x):
        return [m(t) for m, t in zip(self.m, x)]


class ClassifierModule(nn.Module):
    """Classifier on the coarsest scale: convolutions `m`, then `linear`."""

    def __init__(self, m: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.m = m
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.linear(torch.flatten(self.m(x[-1]), 1))


# ----------------------------------------------------------------------------- the network
def _layers_per_block(cfg: MSDNetConfig) -> List[int]:
    return [cfg.base] + [cfg.step if cfg.step_mode == "even" else cfg.step * k + 1 for k in range(1, cfg.n_blocks)]


def _scales(cfg: MSDNetConfig, layer: int, total: int) -> Tuple[int, int]:
    """(in_scales, out_scales) of the layer-th dense layer (from 1) of `total` (the release's pruning)."""
    if cfg.prune == "min":
        return min(cfg.n_scales, total - layer + 2), min(cfg.n_scales, total - layer + 1)
    interval = math.ceil(total / cfg.n_scales)
    return cfg.n_scales - math.floor(max(0, layer - 2) / interval), cfg.n_scales - math.floor((layer - 1) / interval)


def _transition(n_in: int, n_out: int, out_scales: int, offset: int, cfg: MSDNetConfig) -> ParallelModule:
    return ParallelModule([ConvBasic(n_in * cfg.gr_factor[offset + s], n_out * cfg.gr_factor[offset + s], 1, 1, 0) for s in range(out_scales)])


class MSDNet(nn.Module):
    """MSDNet with early exit.

    forward(x) -> (logits [N, num_classes] at each image's exit, exit index [N] int64), with the
    current `thresholds` (one per classifier but the last, in [0, 1]; default 1: every image
    runs to the last classifier unless a classifier is exactly certain). `exit_logits(x)` gives
    every classifier's logits (the release's forward, anytime prediction). execution "masked" |
    "sparse" (settable), bucket as in dynkernels.nn.EarlyExit.
    """

    def __init__(self, cfg: MSDNetConfig, num_classes: int, threshold=1.0, execution: str = "sparse", backend: str = "auto", bucket="auto"):
        super().__init__()
        cfg.check()
        self.config = cfg
        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()
        steps = _layers_per_block(cfg)
        total, done, n_in = sum(steps), 0, cfg.n_channels
        for k, step in enumerate(steps):
            layers = [MSDNFirstLayer(n_in, cfg)] if k == 0 else []
            for _ in range(step):
                done += 1
                in_scales, out_scales = _scales(cfg, done, total)
                layers.append(MSDNLayer(n_in, cfg.growth_rate, cfg, in_scales, out_scales))
                n_in += cfg.growth_rate
                thirds = done in (math.floor(total / 3), math.floor(2 * total / 3))
                if cfg.reduction > 0 and ((cfg.prune == "max" and in_scales > out_scales) or (cfg.prune == "min" and thirds)):
                    reduced = math.floor(cfg.reduction * n_in)
                    layers.append(_transition(n_in, reduced, out_scales, cfg.n_scales - out_scales, cfg))
                    n_in = reduced
            self.blocks.append(nn.Sequential(*layers))
            self.classifier.append(self._classifier(n_in * cfg.gr_factor[-1], num_classes))
        self.num_classes = num_classes
        self.thresholds = threshold
        self.execution = execution
        self.backend = check_backend("MSDNet", backend)
        self.bucket = check_bucket("MSDNet", bucket)
        self._flops_cache = {}

    def _classifier(self, channels: int, num_classes: int) -> ClassifierModule:
        inner = 128 if self.config.data == "cifar" else channels
        conv = nn.Sequential(ConvBasic(channels, inner, 3, 2, 1), ConvBasic(inner, inner, 3, 2, 1), nn.AvgPool2d(2))
        return ClassifierModule(conv, inner, num_classes)

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    @property
    def thresholds(self) -> List[float]:
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, value):
        self._thresholds = check_thresholds("MSDNet", value, self.num_exits)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str):
        self._execution = check_execution("MSDNet", value)

    def _check_input(self, x):
        _checks.tensor("MSDNet", "x", x, (4,), "[N, 3, H, W]")
        check_images("MSDNet", x)

    def exit_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Every classifier's logits on every image [N, num_classes] (the release's forward)."""
        self._check_input(x)
        out = []
        for block, classifier in zip(self.blocks, self.classifier):
            x = block(x)
            out.append(classifier(x))
        return out

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        if self.execution == "masked":
            return run_masked(x, self.blocks, self.classifier, self._thresholds)
        bucket = training_bucket("MSDNet", self.bucket, self, x.device)
        return run_sparse(x, self.blocks, self.classifier, self._thresholds, bucket=bucket, backend=self.backend)

    # ------------------------------------------------------------------------- FLOPs
    @torch.no_grad()
    def exit_flops(self, input_size: Optional[int] = None) -> List[float]:
        """FLOPs for one image to reach each classifier's output: blocks 0..k and classifiers
        0..k (an image that leaves at k has run every earlier classifier too), counted with
        torch.utils.flop_counter.FlopCounterMode on one input_size^2 image (default 32 for
        CIFAR, 224 for ImageNet)."""
        size = input_size or (32 if self.config.data == "cifar" else 224)
        if size not in self._flops_cache:
            p = next(self.parameters())
            state = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
            was, total, out = self.training, 0.0, []
            self.eval()
            try:
                for block, classifier in zip(self.blocks, self.classifier):
                    with FlopCounterMode(display=False) as counter:
                        state = block(state)
                        classifier(state)
                    total += counter.get_total_flops()
                    out.append(total)
            finally:
                self.train(was)
            self._flops_cache[size] = out
        return list(self._flops_cache[size])

    def load_original_checkpoint(self, checkpoint: dict) -> None:
        """Load a checkpoint of the release's main.py: {'state_dict': ...} (or the state dict
        itself), with or without nn.DataParallel's 'module.' prefix."""
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise TypeError(f"MSDNet.load_original_checkpoint: expected a dict (a checkpoint or a state dict), got {type(checkpoint).__name__}")
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        self.load_state_dict(state)


def msdnet_cifar(num_classes: int = 10, threshold=1.0, execution: str = "sparse", backend: str = "auto", bucket="auto", **config) -> MSDNet:
    """The release's CIFAR MSDNet for budgeted batch classification (README: --nBlocks 5
    --stepmode lin_grow --step 1 --base 1 --nChannels 16, growth rate 6, scales 1-2-4);
    `config` overrides MSDNetConfig fields (e.g. n_blocks=7, step_mode="even", step=2, base=4
    for the anytime-prediction network)."""
    return MSDNet(MSDNetConfig(data="cifar", **config), num_classes, threshold, execution, backend, bucket)


def msdnet_imagenet(num_classes: int = 1000, threshold=1.0, execution: str = "sparse", backend: str = "auto", bucket="auto", **config) -> MSDNet:
    """The release's ImageNet MSDNet (README: --nBlocks 5 --stepmode even --step 4 --base 4
    --nChannels 32 --growthRate 16 --grFactor 1-2-4-4 --bnFactor 1-2-4-4)."""
    cfg = dict(n_blocks=5, n_channels=32, base=4, step_mode="even", step=4, growth_rate=16, gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4))
    cfg.update(config)
    return MSDNet(MSDNetConfig(data="imagenet", **cfg), num_classes, threshold, execution, backend, bucket)


# ----------------------------------------------------------------------------- budgeted batch classification
@torch.no_grad()
def exit_confidences(model: MSDNet, data: Union[torch.Tensor, Iterable]) -> torch.Tensor:
    """Max-softmax confidence of every classifier on held-out images: [num_exits, n] (float32).
    data: a tensor [n, 3, H, W], or an iterable of such batches (or of (images, labels))."""
    batches = [data] if isinstance(data, torch.Tensor) else data
    was = model.training
    model.eval()
    try:
        out = []
        for batch in batches:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            out.append(torch.stack([max_softmax(z) for z in model.exit_logits(images)]))
    finally:
        model.train(was)
    if not out:
        raise ValueError("exit_confidences: data holds no images")
    return torch.cat(out, dim=1).cpu()


def thresholds_for_fractions(confidences: torch.Tensor, fractions: Sequence[float]) -> List[float]:
    """Thresholds (one per exit but the last) that make about a fraction `fractions[k]` of all
    images leave at exit k: the release's dynamic_eval_find_threshold. Exit by exit, among the
    images not yet gone, the floor(n * fractions[k])-th most confident one's confidence becomes
    the threshold (1, i.e. nobody, when there are not that many images left, or none should go)."""
    k_exits, n = confidences.shape
    if len(fractions) not in (k_exits - 1, k_exits):
        raise ValueError(f"thresholds_for_fractions: need {k_exits - 1} or {k_exits} fractions, got {len(fractions)}")
    gone = torch.zeros(n, dtype=torch.bool)
    out = []
    for k in range(k_exits - 1):
        want = math.floor(n * float(fractions[k]))
        order = torch.argsort(confidences[k], descending=True, stable=True)
        left = order[~gone[order]]
        t = float(confidences[k, left[want - 1]]) if 0 < want <= left.numel() else 1.0
        t = min(max(t, 0.0), 1.0)
        out.append(t)
        gone |= confidences[k] >= t
    return out


def exit_fractions(confidences: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Fraction of the images leaving at each exit [num_exits] under `thresholds` (the rule of
    dynkernels.nn.early_exit: the first exit whose confidence reaches its threshold)."""
    k_exits, n = confidences.shape
    exit_index = torch.full((n,), k_exits - 1, dtype=torch.int64)
    for k in reversed(range(k_exits - 1)):
        exit_index = torch.where(confidences[k] >= thresholds[k], k, exit_index)
    return torch.bincount(exit_index, minlength=k_exits).double() / max(n, 1)


def expected_flops(confidences: torch.Tensor, thresholds: Sequence[float], flops: Sequence[float]) -> float:
    """Average FLOPs per image: sum over exits of (fraction leaving there) x (FLOPs to get there)."""
    return float(exit_fractions(confidences, thresholds) @ torch.tensor(flops, dtype=torch.float64))


def geometric_fractions(p: float, k_exits: int) -> List[float]:
    """The release's exit distribution: q_k proportional to p^k, k = 1..K."""
    w = [p ** k for k in range(1, k_exits + 1)]
    return [v / sum(w) for v in w]


def calibrate(model: MSDNet, data, budget: float, input_size: Optional[int] = None, iterations: int = 60) -> List[float]:
    """Set model.thresholds for an average budget of `budget` FLOPs per image on held-out `data`.

    The exit distribution is the release's geometric one (q_k ~ p^k); p is searched (bisection
    on log p) for the largest average FLOPs on `data` that stays within the budget. Returns the
    thresholds (also set on the model)."""
    confidences = exit_confidences(model, data)
    flops = model.exit_flops(input_size)
    k_exits = model.num_exits
    if budget < flops[0]:
        raise ValueError(f"calibrate: a budget of {budget:.4g} FLOPs is below the {flops[0]:.4g} FLOPs of the first exit")

    def thresholds(log_p):
        return thresholds_for_fractions(confidences, geometric_fractions(math.exp(log_p), k_exits))

    lo, hi = math.log(1e-4), math.log(1e4)
    best = thresholds(lo)
    if expected_flops(confidences, best, flops) > budget:  # even the most eager exits cost more
        best = [0.0] * (k_exits - 1)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        t = thresholds(mid)
        if expected_flops(confidences, t, flops) <= budget:
            best, lo = t, mid
        else:
            hi = mid
    model.thresholds = best
    return best


__all__ = [
    "MSDNet",
    "MSDNetConfig",
    "msdnet_cifar",
    "msdnet_imagenet",
    "exit_confidences",
    "thresholds_for_fractions",
    "exit_fractions",
    "expected_flops",
    "geometric_fractions",
    "calibrate",
]
