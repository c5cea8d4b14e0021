"""Test setup shared by every test file.

On a machine without a GPU the Triton kernels run on CPU tensors under the Triton
interpreter, which must be switched on before any kernel module is imported: this file
does it first. Tests that need a GPU carry the `cuda` marker and are skipped here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
