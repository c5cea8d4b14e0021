"""Loading the compiled kernels (dynkernels._C) and describing the build."""
import functools
import importlib.util
import os

import torch

from ._cpu import cpu_info
from ._version import __version__

try:
    from . import _build_config as _config
except ImportError:  # source tree that was never built
    _config = None


def _load():
    """Import dynkernels._C (which registers the C++/CUDA kernels) and check its CUDA version."""
    try:
        from . import _C
    except ImportError as e:
        library = os.environ.get("DYNKERNELS_LIBRARY")
        if library:  # a library built with CMake (see README)
            torch.ops.load_library(library)
            return None
        raise ImportError(
            "dynkernels: the compiled extension dynkernels._C is missing or does not load "
            f"({e}). Build it with `pip install --no-build-isolation -e .` in the source tree "
            "(or set DYNKERNELS_LIBRARY to a library built with CMake)."
        ) from e
    built = _C.cuda_version()
    if built >= 0:
        built_str = f"{built // 1000}.{(built % 1000) // 10}"
        if torch.version.cuda is None:
            raise ImportError(
                f"dynkernels: the CUDA kernels were compiled with CUDA {built_str} but this torch "
                f"({torch.__version__}) is a CPU-only build. Rebuild dynkernels against this torch: "
                "`pip install --no-build-isolation --force-reinstall --no-deps -e .`"
            )
        if torch.version.cuda.split(".")[:2] != built_str.split("."):
            raise ImportError(
                f"dynkernels: the CUDA kernels were compiled with CUDA {built_str} but torch "
                f"{torch.__version__} uses CUDA {torch.version.cuda}. Rebuild dynkernels against "
                "this torch: `pip install --no-build-isolation --force-reinstall --no-deps -e .`"
            )
    return _C


_C = _load()


@torch.compiler.assume_constant_result  # constant per process: compile calls it, not traces it
def cuda_kernels_compiled() -> bool:
    """Whether the hand-written CUDA kernels are in this build."""
    if _C is not None:
        return _C.cuda_version() >= 0
    return torch._C._dispatch_has_kernel_for_dispatch_key("dynkernels::gather_rows", "CUDA")


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # constant per process: compile calls it, not traces it
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result  # constant per process: compile calls it, not traces it
def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def build_info() -> dict:
    """What this build of dynkernels contains and what it was built against."""
    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    cuda = cuda_kernels_compiled()
    compiled = _C.cuda_version() if _C is not None else -1
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_built_against": getattr(_config, "TORCH_VERSION", None),
        "cuda_kernels": cuda,
        "cuda_version": f"{compiled // 1000}.{(compiled % 1000) // 10}" if compiled >= 0 else None,
        "cuda_arch_list": getattr(_config, "CUDA_ARCH_LIST", None) if cuda else None,
        "cuda_build_note": getattr(_config, "CUDA_REASON", None),
        "triton": triton_version,
        "triton_interpret": triton_interpret(),
        "cpu": cpu_info()["model"],
        "cpu_isa": cpu_info()["isa"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
