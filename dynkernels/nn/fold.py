"""BatchNorm folded into a convolution at inference (running statistics).

BN(z) = gamma * (z - mu) / sigma + beta, sigma = sqrt(running_var + eps), per channel. Folded,
a gated convolution needs no normalisation pass of its own: either into the weights
(`fold_batchnorm`: any gamma, used where the gate is a per-sample scale after BN, C-Net), or
into the channel-sparse conv's epilogue (`batchnorm_epilogue`: scale 1 / sigma, bias -mu, for a
BN without affine whose scale comes from the gate, FBS).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn


def _check(owner: str, bn: nn.BatchNorm2d, channels: int):
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"{owner}: bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f"{owner}: bn must track running statistics (track_running_stats=True) to be folded")
    if bn.num_features != channels:
        raise ValueError(f"{owner}: bn has {bn.num_features} channels but the convolution has {channels} outputs")


def batchnorm_epilogue(bn: nn.BatchNorm2d, conv_bias: Optional[torch.Tensor], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inv_sigma, bias) with BN_noaffine(conv(x) + conv_bias) = inv_sigma * (conv(x) + bias):
    inv_sigma = 1 / sqrt(running_var + eps), bias = conv_bias - running_mean (bias in dtype)."""
    _check("batchnorm_epilogue", bn, bn.num_features)
    inv_sigma = torch.rsqrt(bn.running_var + bn.eps)
    bias = -bn.running_mean if conv_bias is None else conv_bias - bn.running_mean
    return inv_sigma, bias.to(dtype)


def fold_batchnorm(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight', bias') with conv(x, weight') + bias' = BN(conv(x, weight) + bias) at inference."""
    _check("fold_batchnorm", bn, weight.shape[0])
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale if bias is None else (bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale.to(weight.dtype).view(-1, 1, 1, 1), shift.to(weight.dtype)
