"""Test setup shared by every test file.

On a machine without a GPU the Triton kernels run on CPU tensors under the Triton
interpreter, which must be switched on before any kernel module is imported: this file
does it first. Tests that need a GPU carry the `cuda` marker and are skipped here; tests of
the Triton kernels carry the `triton` marker and are skipped where Triton is not installed.

The hypothesis profile of the property tests ("ci" or "deep", from
DYNKERNELS_HYPOTHESIS_PROFILE) is loaded here too (_hypothesis.py), and the number of
property cases each op ran is printed at the end of the run, with what tests found about
this machine (_utils.SUMMARY).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import _hypothesis  # noqa: E402  (registers and loads the profile)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    from _utils import HAS_TRITON

    skip_triton = pytest.mark.skip(reason="Triton is not installed (optional with a CPU-only torch)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    from _utils import SUMMARY

    for topic, line in SUMMARY.items():
        terminalreporter.write_line(f"{topic}: {line}")
    if _hypothesis.CASES:
        cases = ", ".join(f"{op} {n}" for op, n in sorted(_hypothesis.CASES.items()))
        terminalreporter.write_line(f"property cases: {cases} ({_hypothesis.describe()})")
