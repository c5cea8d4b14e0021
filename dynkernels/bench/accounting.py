"""FLOP and byte accounting: what dense execution costs, what sparse execution must cost,
and the derived ideal speedup, efficiency and achieved throughput.

FLOPs count a multiply-add as 2. The "sparse" cost of a case is the work that has to be
done at its density (active samples, active channel pairs); the ideal speedup is
dense cost / sparse cost, the speedup a kernel with the dense kernel's efficiency would reach.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn


def conv2d_out_size(size: int, k: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def conv2d_flops(n_out_ch_pairs: float, cin: float, k: Tuple[int, int], out_hw: Tuple[int, int]) -> float:
    """FLOPs of the (sample, output channel) pairs given, each reducing over cin input channels."""
    return 2.0 * n_out_ch_pairs * cin * k[0] * k[1] * out_hw[0] * out_hw[1]


def channel_sparse_conv_flops(out_gate: torch.Tensor, in_gate: Optional[torch.Tensor], cin: int, k, out_hw) -> float:
    """FLOPs that channel-sparse execution needs: sum over samples of |active out| * |active in| * k*k*H*W."""
    active_out = (out_gate > 0).sum(dim=1).double()
    active_in = (in_gate > 0).sum(dim=1).double() if in_gate is not None else torch.full_like(active_out, cin)
    return 2.0 * float((active_out * active_in).sum()) * k[0] * k[1] * out_hw[0] * out_hw[1]


def module_flops_per_sample(module: nn.Module, sample: torch.Tensor) -> float:
    """FLOPs of the convolutions and linear layers of module for one sample (hooks on a dry run)."""
    total = [0.0]

    def conv_hook(m, inputs, out):
        cin = m.in_channels // m.groups
        total[0] += 2.0 * out[0].numel() * cin * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inputs, out):
        total[0] += 2.0 * out[0].numel() * m.in_features

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    try:
        with torch.inference_mode():
            module(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def derived(
    median_ms: Optional[float],
    baseline_ms: Optional[float],
    dense_cost: Optional[float],
    sparse_cost: Optional[float],
    executed_flops: Optional[float],
    executed_bytes: Optional[float],
) -> Dict[str, Optional[float]]:
    """speedup (over the baseline), ideal, efficiency, TFLOP/s and GB/s; None where undefined."""
    ok = median_ms is not None and median_ms > 0
    speedup = baseline_ms / median_ms if ok and baseline_ms else None
    ideal = dense_cost / sparse_cost if dense_cost and sparse_cost else None
    return {
        "speedup": speedup,
        "ideal_speedup": ideal,
        "efficiency": speedup / ideal if speedup is not None and ideal else None,
        "tflops": executed_flops / (median_ms * 1e-3) / 1e12 if ok and executed_flops else None,
        "gbps": executed_bytes / (median_ms * 1e-3) / 1e9 if ok and executed_bytes else None,
    }
