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


def _toolkit_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc"))


def test_cuda_kernels_compiled_whenever_they_should_be():
    info = dynkernels.build_info()
    # The registrations must agree with what the build reports.
    for op in ("compact", "gather_rows", "scatter_add_rows"):
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
