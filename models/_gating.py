"""What the gated-ResNet models (SkipNet, ConvNet-AIG, AdaShare, LC-Net) share: the input
check, the gate calibration used to benchmark untrained networks at a chosen density, and
the loading of checkpoints saved by the original training scripts."""
import torch

from dynkernels.models.blockdrop import _strip_prefix


def check_images(owner: str, x) -> None:
    """x must be a floating [N, 3, H, W] tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{owner}: x must be a [N, 3, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{owner}: x must be a floating tensor, got {x.dtype}")


def check_density(owner: str, density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{owner}: density must be a number in [0, 1], got {type(density).__name__} {density!r}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"{owner}: density must be in [0, 1], got {density}")
    return float(density)


def bias_for_density(z: torch.Tensor, density: float) -> float:
    """The bias b for which exactly round(density * N) of the scores z [N] have z + b > 0 (b
    lies halfway between the kept-th largest score and the next, so that rounding noise in z
    does not move a sample across the threshold)."""
    n = z.shape[0]
    kept = round(density * n)
    if kept == 0:
        return float(-z.max() - 1.0)
    if kept == n:
        return float(-z.min() + 0.5)
    top = torch.sort(z, descending=True).values
    return float(-(top[kept - 1] + top[kept]) / 2)


def original_state_dict(owner: str, checkpoint) -> dict:
    """The model state in a checkpoint of the original scripts: {'state_dict': ...} (their
    save_checkpoint) or a bare state dict, with or without nn.DataParallel's 'module.' prefix."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"{owner}: checkpoint must be a dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise TypeError(f"{owner}: checkpoint['state_dict'] must be a dict, got {type(state).__name__}")
    return _strip_prefix(state)
