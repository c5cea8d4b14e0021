"""backend="auto" for channel_sparse_conv2d on CUDA tensors: the CUDA kernel, the Triton kernel,
or dense execution (cuDNN conv, then one pass for gate scale, shift and zeros).

The rule reads nothing from the device (no host synchronisation): it uses the layer shape, the
caller's `density` hint (the expected fraction of the dense FLOPs that the gates leave active)
and the tuned table of the device (dynkernels.tuned_configs), whose entries hold the measured
time of each kernel's best configuration and of dense execution per layer, batch, dtype, gating
and density.
  - With a table entry (the nearest one, tuned_configs.nearest_entry): the fastest of the
    kernels built here and, only when a density hint is given, dense execution.
  - Without one (no table for this GPU, or a dtype tables do not cover): dense execution when
    the hint is above DENSE_ABOVE, else the CUDA kernel if this build has it, else Triton.
  - Without a hint the gates may be sparse or dense; a sparse kernel runs (it costs little more
    than dense execution when they are dense, much less when they are sparse).
"""
from typing import Optional

from .. import tuned_configs

DENSE_ABOVE = 0.8  # the fallback's density threshold for dense execution (no table entry)


def gpu_execution(entry: Optional[tuned_configs.Entry], density: Optional[float], have_cuda: bool,
                  have_triton: bool) -> str:
    """"cuda", "triton" or "dense" for a call with this table entry (or None) and hint."""
    kernels = [("cuda", have_cuda), ("triton", have_triton)]
    if entry is not None:
        timed = [(ms, name) for name, ms in (("cuda", entry.cuda_ms), ("triton", entry.triton_ms))
                 if ms is not None and dict(kernels)[name]]
        if density is not None and entry.dense_ms is not None:
            timed.append((entry.dense_ms, "dense"))
        if timed:
            return min(timed)[1]
    if density is not None and density > DENSE_ABOVE:
        return "dense"
    for name, available in kernels:
        if available:
            return name
    return "dense"
