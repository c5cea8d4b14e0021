"""dynkernels: kernels that make dynamic networks run faster, not just count fewer FLOPs.

Layers (each imports only the ones below it): models (dynkernels.models) -> modules
(dynkernels.nn) -> ops (dynkernels.ops, torch.ops.dynkernels.*) -> backends (csrc/ C++ and
CUDA, dynkernels.triton, dynkernels.reference).
"""
from ._version import __version__
from ._extension import build_info, cuda_kernels_compiled, triton_available
from . import reference
from . import flops
from . import ops
from .flops import FlopCount, model_flops
from .ops import channel_sparse_conv2d, compact, gather_rows, route, scatter_add_rows, scatter_rows, scatter_rows_

__all__ = [
    "__version__",
    "build_info",
    "cuda_kernels_compiled",
    "triton_available",
    "reference",
    "ops",
    "compact",
    "route",
    "gather_rows",
    "scatter_add_rows",
    "scatter_rows",
    "scatter_rows_",
    "channel_sparse_conv2d",
    "flops",
    "FlopCount",
    "model_flops",
]
