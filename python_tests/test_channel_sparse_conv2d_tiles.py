"""The index arithmetic of the CUDA channel_sparse_conv2d kernel, on the CPU.

csrc/cuda/channel_sparse_conv2d_tiles.h holds every index computation of the kernel as a
__host__ __device__ function; python_tests/cpp/conv_tiles_test.cpp checks them (bijective
swizzles, copy coverage, aligned cp.async sources, conflict-free shared-memory phases) and
emulates the kernel's whole data flow, lane by lane, for small convolutions against their
definition. Needs only a C++ compiler, no GPU and no CUDA toolkit.
"""
import os
import shutil
import subprocess

import pytest

import dynkernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "python_tests", "cpp", "conv_tiles_test.cpp")


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(not os.path.exists(SOURCE), reason="needs the source tree")
def test_tile_index_arithmetic(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (set CXX)")
    exe = tmp_path / "conv_tiles_test"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-o", str(exe), SOURCE],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr + run.stdout
    assert run.stdout.startswith("ok: "), run.stdout


def test_cuda_conv_configs_describe_the_kernel():
    """dynkernels._C.cuda_conv_configs(): one dict per config id ([] without CUDA kernels)."""
    from dynkernels._extension import _C

    if _C is None:
        pytest.skip("loaded from a CMake library, not dynkernels._C")
    configs = _C.cuda_conv_configs()
    assert isinstance(configs, list)
    if not dynkernels.cuda_kernels_compiled():
        assert configs == []
        return
    assert [c["id"] for c in configs] == list(range(len(configs))) and len(configs) >= 4
    for c in configs:
        assert set(c) == {"id", "BM", "BN", "BK", "stages", "warps", "warps_m", "warps_n", "smem_bytes"}
        assert c["warps"] == c["warps_m"] * c["warps_n"] and c["stages"] >= 3
        assert c["smem_bytes"] >= c["stages"] * (c["BM"] + c["BN"]) * c["BK"] * 2
    assert any(128 in (c["BM"], c["BN"]) for c in configs)
    assert len({(c["BM"], c["BN"], c["BK"]) for c in configs}) == len(configs), "two ids with one tile shape"
