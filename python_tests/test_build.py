"""The build: what it contains, that CUDA kernels are compiled whenever they should be, and
that a build that does not match torch says so."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dynkernels
from dynkernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_fields():
    info = dynkernels.build_info()
    assert info["version"] == dynkernels.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    if info["cuda_kernels"]:
        assert info["cuda_version"] == ".".join(torch.version.cuda.split(".")[:2])
        assert info["cuda_arch_list"]
    else:
        assert info["cuda_version"] is None
    if dynkernels.triton_available():
        import triton

        assert info["triton"] == triton.__version__


def test_installed_metadata_names_the_license():
    # setup.py gives the license as an SPDX expression or, before setuptools 77, as free text.
    from importlib import metadata

    try:
        md = metadata.metadata("dynkernels")
    except metadata.PackageNotFoundError:
        pytest.skip("dynkernels is not installed (imported from the source tree)")
    assert "BSD-3-Clause" in (md.get("License-Expression"), md.get("License")), dict(md)


def _toolkit_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc"))


def test_cuda_kernels_compiled_whenever_they_should_be():
    info = dynkernels.build_info()
    # The registrations must agree with what the build reports.
    for op in ("compact", "gather_rows", "scatter_add_rows", "scatter_rows_", "route"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dynkernels::{op}", "CUDA") == info["cuda_kernels"]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dynkernels::{op}", "CPU")
    disabled = "DYNKERNELS_WITH_CUDA=0" in (info["cuda_build_note"] or "")
    if torch.version.cuda is not None and _toolkit_present() and not disabled:
        assert info["cuda_kernels"], f"a CUDA torch and toolkit are present but no CUDA kernels were built: {info}"


def test_cuda_version_mismatch_is_a_clear_import_error(monkeypatch):
    if _extension._C is None:
        pytest.skip("loaded from a CMake library, not dynkernels._C")
    monkeypatch.setattr(_extension._C, "cuda_version", lambda: 12080)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ImportError, match=r"compiled with CUDA 12\.8 but torch .* uses CUDA 13\.0.*Rebuild"):
        _extension._load()
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ImportError, match=r"compiled with CUDA 12\.8 but this torch .* CPU-only"):
        _extension._load()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert _extension._load() is _extension._C


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "setup.py")), reason="needs the source tree")
def test_forcing_cuda_without_a_toolkit_is_an_error(tmp_path):
    # Run setup.py's decision only (`--name`), in a copy so the real tree is not touched.
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path)
    (tmp_path / "dynkernels").mkdir()
    shutil.copy(os.path.join(ROOT, "dynkernels", "_version.py"), tmp_path / "dynkernels")
    env = dict(os.environ, DYNKERNELS_WITH_CUDA="1", CUDA_HOME=str(tmp_path / "no-toolkit"))
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "DYNKERNELS_WITH_CUDA=1 but the CUDA kernels cannot be built" in proc.stderr + proc.stdout
    assert not (tmp_path / "dynkernels" / "_build_config.py").exists()


# Errors thrown by TORCH_CHECKs inside the nvcc-compiled host code of the CUDA kernels must
# raise, like those of the C++ CPU kernels. On the H100 test machine of 2026-11-22 direct
# torch.ops calls with bad arguments on CUDA tensors crashed the process instead (README,
# "Known issues"). The argument checks come before any CUDA call, so redispatching each CUDA
# kernel to CPU tensors reaches them without a GPU ("cpu": this runs in CI, where the CUDA
# kernels are compiled); on a GPU machine the same once more after the CUDA context exists
# ("gpu"), and the direct calls on CUDA tensors that crashed ("cuda-tensors"). A subprocess,
# so that a crash fails this test instead of killing the test run, and a line printed per
# call, so that the output shows which call crashed.
_CUDA_KERNEL_THROWS = r"""
import sys
import torch
import dynkernels

context = sys.argv[1]
device = "cuda" if context == "cuda-tensors" else "cpu"
if context != "cpu":
    torch.zeros(1, device="cuda")  # the CUDA context exists before the throw
cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
ops = torch.ops.dynkernels
z = lambda *shape: torch.zeros(*shape, device=device)
idx = torch.arange(4, dtype=torch.int32, device=device)
count = torch.tensor([2], dtype=torch.int32, device=device)
# The CUDA conv refuses CPU tensors first; on CUDA tensors, a weight of another dtype.
conv_weight = z(3, 2, 3, 3).half() if device == "cuda" else z(3, 2, 3, 3)
cases = [
    (ops.compact.default, (z(2, 2, 2), 0.0)),
    (ops.gather_rows.default, (z(4, 3), idx.long(), count, 4)),
    (ops.scatter_add_rows.default, (z(4, 3), z(4, 5), idx, count, None)),
    (ops.scatter_rows.default, (z(4, 3), z(4, 5), idx, count)),
    (ops.scatter_rows_.default, (z(4, 3), z(4, 5), idx, count)),
    (ops.route.default, (z(4), 2)),
    (ops.channel_sparse_conv2d.default,
     (z(1, 2, 4, 4), conv_weight, None, torch.ones(1, 3, device=device), None, [1, 1], [1, 1], [1, 1])),
]
for op, args in cases:
    print("calling:", op, flush=True)
    try:
        op(*args) if device == "cuda" else op.redispatch(cuda_key, *args)
    except RuntimeError as e:
        print("raised:", str(e).splitlines()[0], flush=True)
    else:
        print("no error:", op, flush=True)
"""


@pytest.mark.parametrize("context", ["cpu", pytest.param("gpu", marks=pytest.mark.cuda),
                                     pytest.param("cuda-tensors", marks=pytest.mark.cuda)])
def test_cuda_kernel_argument_errors_raise(context):
    if not dynkernels.cuda_kernels_compiled():
        pytest.skip("this build has no CUDA kernels")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _CUDA_KERNEL_THROWS, context],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"a TORCH_CHECK thrown in the CUDA extension's host code ended the process (exit code {proc.returncode}) "
        f"instead of raising, in the last call below:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    )
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("calling:")]
    assert len(lines) == 7 and all(line.startswith("raised:") for line in lines), proc.stdout
    assert "compact: gate must be [N] or [B, N]" in lines[0]
    assert "gather_rows: idx must be a 1-D int32 tensor" in lines[1]
    assert "scatter_add_rows: y must be [capacity, [3]]" in lines[2]
    assert "scatter_rows: y must be [capacity, [3]]" in lines[3]
    assert "scatter_rows_: y must be [capacity, [3]]" in lines[4]
    assert "route: choice must be an integer tensor" in lines[5]
    if context == "cuda-tensors":
        assert "channel_sparse_conv2d: weight must have x's dtype" in lines[6]
    else:
        assert "channel_sparse_conv2d: the CUDA kernel needs x on a CUDA device" in lines[6]
