"""The functional contract (DESIGN.md), registered as torch.ops.dynkernels.* with fake
kernels and autograd, each function taking backend="auto" | "cuda" | "cpu" | "triton" | "torch"."""
from ._backend import BACKENDS, check_backend
from .channel_sparse_conv2d import channel_sparse_conv2d
from .route import route
from .sample_gating import compact, gather_rows, scatter_add_rows, scatter_rows, scatter_rows_

__all__ = [
    "BACKENDS",
    "check_backend",
    "compact",
    "route",
    "gather_rows",
    "scatter_add_rows",
    "scatter_rows",
    "scatter_rows_",
    "channel_sparse_conv2d",
]
