"""Choosing the backend that runs an op: backend = "auto" | "cuda" | "cpu" | "triton" | "torch".

"cuda" and "cpu" are the compiled kernels (csrc/cuda, csrc/cpu) and need tensors on that
device; "triton" runs dynkernels.triton (on a GPU, or on CPU tensors under
TRITON_INTERPRET=1); "torch" is dynkernels.reference. "auto" picks the compiled kernels for
the tensors' device, then Triton, then the reference.
"""
import torch

from .._extension import cuda_kernels_compiled, triton_available, triton_interpret

BACKENDS = ("auto", "cuda", "cpu", "triton", "torch")


def check_backend(owner: str, backend) -> str:
    """backend itself, if it is one of BACKENDS; else a ValueError naming `owner`."""
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve(op: str, backend: str, device: torch.device) -> str:
    check_backend(op, backend)
    if backend == "auto":
        if device.type == "cuda":
            if cuda_kernels_compiled():
                return "cuda"
            return "triton" if triton_available() else "torch"
        return "cpu" if device.type == "cpu" else "torch"
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not cuda_kernels_compiled():
            raise RuntimeError(
                f"{op}: backend='cuda' but this build of dynkernels has no CUDA kernels "
                "(see dynkernels.build_info()); rebuild with a CUDA torch and toolkit, "
                "or use backend='triton' or 'torch'"
            )
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' but Triton is not installed (pip install triton)")
        if device.type == "cpu" and not triton_interpret():
            raise ValueError(
                f"{op}: backend='triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing dynkernels"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: backend='triton' needs CUDA (or CPU) tensors, got tensors on {device}")
    return backend
