"""Build dynkernels._C from csrc/.

The CUDA kernels are compiled whenever torch is a CUDA build and a CUDA toolkit is found,
also on a machine without a GPU; a CPU-only torch gives a CPU-only build.

Environment switches:
  DYNKERNELS_WITH_CUDA=1   require the CUDA kernels (a clear error if they cannot be built)
  DYNKERNELS_WITH_CUDA=0   build the CPU kernels only
  CUDA_HOME                CUDA toolkit (default: /usr/local/cuda when it exists)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default: the visible GPU's, else 9.0)
  MAX_JOBS                 parallel compile jobs (default 2)

Install with `pip install --no-build-isolation -e .` so that the torch already installed
is the one compiled against.
"""
import glob
import os
import re
import sys

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch.utils.cpp_extension reads CUDA_HOME when it is imported: default it first.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("MAX_JOBS", "2")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def read_version():
    text = open(os.path.join(ROOT, "dynkernels", "_version.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def decide_cuda():
    """Return (with_cuda, reason)."""
    switch = os.environ.get("DYNKERNELS_WITH_CUDA", "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False, "DYNKERNELS_WITH_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        problems.append("no CUDA toolkit found (set CUDA_HOME to a toolkit with bin/nvcc)")
    if switch in ("1", "true", "yes", "on") and problems:
        sys.exit(
            "dynkernels: DYNKERNELS_WITH_CUDA=1 but the CUDA kernels cannot be built: "
            + "; ".join(problems)
            + ". Install a CUDA build of torch and a matching CUDA toolkit, or unset DYNKERNELS_WITH_CUDA."
        )
    if problems:
        return False, "; ".join(problems)
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit at {CUDA_HOME}"


def default_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
    else:
        arch = "9.0"  # no GPU to ask: build for Hopper, the project's target
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    return arch


def write_build_config(with_cuda, reason, arch_list):
    path = os.path.join(ROOT, "dynkernels", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_REASON = {reason!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"CUDA_ARCH_LIST = {arch_list!r}\n")


def extension(with_cuda):
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs its loop body on OpenMP threads only in code compiled with
        # OpenMP; without it the CPU kernels' per-sample loops run on one thread (and the GEMMs
        # inside them open a thread team per call). libgomp.so.1 is the runtime torch itself
        # loads, so the extension shares torch's thread pool.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    macros = []
    if not with_cuda:
        return CppExtension(
            "dynkernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    macros.append(("WITH_CUDA", None))
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "dynkernels._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags + ["-DWITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


with_cuda, reason = decide_cuda()
arch_list = default_arch_list() if with_cuda else None
print(f"dynkernels: CUDA kernels {'ON' if with_cuda else 'OFF'} ({reason})" + (f", arch {arch_list}" if with_cuda else ""))
write_build_config(with_cuda, reason, arch_list)

# The license as metadata: an SPDX expression where setuptools reads one (77 and later), else the
# older free-text field, which setuptools deprecates. pyproject.toml declares it dynamic: each of
# its static forms fails on one side of 77, and a --no-build-isolation build uses whatever
# setuptools the environment has.
LICENSE = "BSD-3-Clause"
license_field = "license_expression" if int(setuptools.__version__.split(".")[0]) >= 77 else "license"

setup(
    version=read_version(),
    **{license_field: LICENSE},
    packages=find_packages(include=["dynkernels", "dynkernels.*"]) + ["dynkernels.models"],
    package_dir={"dynkernels.models": "models"},
    # tuned kernel configurations, one JSON table per GPU model (dynkernels/tuned_configs.py)
    package_data={"dynkernels": ["configs/*.json"]},
    ext_modules=[extension(with_cuda)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
