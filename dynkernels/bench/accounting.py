"""FLOP and byte accounting: what dense execution costs, what sparse execution must cost, the
derived ideal speedup, efficiency and throughput, and the physical floor.

FLOPs count a multiply-add as 2. The "sparse" cost of a case is the work that has to be done
at its density (active samples, active channel pairs); the ideal speedup is dense cost /
sparse cost, the speedup a kernel with the dense kernel's efficiency would reach. The floor
of a variant is the least time its work can take on this device: the larger of its FLOPs
over the device's dense matrix rate in that dtype and its bytes over the device's copy
bandwidth, both measured once per run (`Rates`) with the benchmarks' own timer.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .timing import TimingSettings, measure


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


def derived(median_ms, baseline_ms, dense_cost, sparse_cost, executed_flops, executed_bytes,
            rates: Optional[Dict[str, float]]) -> Dict[str, Optional[float]]:
    """speedup (over the baseline), ideal, efficiency, TFLOP/s, GB/s and floor; None where undefined."""
    ok = median_ms is not None and median_ms > 0
    speedup = baseline_ms / median_ms if ok and baseline_ms else None
    ideal = dense_cost / sparse_cost if dense_cost and sparse_cost else None
    floors = []
    if rates and executed_flops:
        floors.append(executed_flops / (rates["matrix_tflops"] * 1e9))
    if rates and executed_bytes:
        floors.append(executed_bytes / (rates["copy_gbps"] * 1e6))
    return {
        "speedup": speedup,
        "ideal_speedup": ideal,
        "efficiency": speedup / ideal if speedup is not None and ideal else None,
        "tflops": executed_flops / (median_ms * 1e-3) / 1e12 if ok and executed_flops else None,
        "gbps": executed_bytes / (median_ms * 1e-3) / 1e9 if ok and executed_bytes else None,
        "floor_ms": max(floors) if floors else None,
    }


# Problem sizes of the rate measurements: (matmul M=N=K, conv N/C/HW (3x3, C -> C), copied MiB).
RATE_SIZES = {"cuda": (8192, (64, 256, 56), 1024), "cpu": (1024, (32, 128, 16), 128), "smoke": (64, (2, 8, 6), 1)}


class Rates:
    """The device's dense matrix rate per (dtype, threads) and its copy bandwidth, each
    measured the first time a case needs it. The matrix rate is the faster of a square matmul
    and a 3x3 convolution (on some CPUs oneDNN's convolution beats the BLAS matmul by 2x, and
    a floor must not exceed what the device does)."""

    def __init__(self, device: torch.device, settings: TimingSettings, smoke: bool = False):
        self.device = torch.device(device)
        self.settings = settings
        self.sizes = RATE_SIZES["smoke" if smoke else self.device.type]
        self.measured: Dict[str, Dict[str, float]] = {}

    def _median_ms(self, fn, *inputs) -> float:
        (t,) = measure([fn], [inputs], self.device, self.settings)
        if isinstance(t, Exception):
            raise t
        return t.median_ms

    def get(self, dtype: torch.dtype) -> Dict[str, float]:
        """{"matrix_tflops", "matmul_tflops", "conv_tflops", "copy_gbps"} at the current thread count."""
        threads = torch.get_num_threads()
        key = f"{str(dtype).replace('torch.', '')}, {threads} thread{'s' * (threads > 1)}"
        if key not in self.measured:
            dev, (m, (n, c, hw), mib) = self.device, self.sizes
            with torch.inference_mode():
                a = torch.randn(m, m, device=dev, dtype=dtype)
                matmul = 2.0 * m ** 3 / (self._median_ms(torch.mm, a, a) * 1e9)
                x = torch.randn(n, c, hw, hw, device=dev, dtype=dtype)
                w = torch.randn(c, c, 3, 3, device=dev, dtype=dtype)
                conv = conv2d_flops(n * c, c, (3, 3), (hw, hw)) / (self._median_ms(F.conv2d, x, w, None, 1, 1) * 1e9)
                # into memory already touched: a fresh CPU allocation would time its page faults
                src = torch.ones(mib << 20, device=dev, dtype=torch.uint8)
                dst = torch.zeros_like(src)
                copy = 2.0 * src.numel() / (self._median_ms(dst.copy_, src) * 1e6)
            self.measured[key] = {"matrix_tflops": max(matmul, conv), "matmul_tflops": matmul, "conv_tflops": conv,
                                  "copy_gbps": copy}
        return self.measured[key]
