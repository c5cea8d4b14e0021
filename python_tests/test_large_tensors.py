"""Tensors past 2^31 elements: every index in the GPU kernels must be 64-bit where it can exceed
int32 (the row offset of a gather, the pixel offset of a conv). Each case is checked against the
reference on a part of the output that lies past element 2^31 and on the first rows. About 4.3 GB
per bf16 tensor: GPU only (skipped where there is less free memory than the case needs)."""
import pytest
import torch

import dynkernels
from dynkernels import reference as ref

BIG = 2**31 + 2**20  # elements: past int32's range, but not by much

pytestmark = pytest.mark.cuda
BACKENDS = [pytest.param("cuda", marks=pytest.mark.skipif(not dynkernels.cuda_kernels_compiled(), reason="no CUDA kernels")),
            pytest.param("triton", marks=pytest.mark.skipif(not dynkernels.triton_available(), reason="no Triton"))]


def _need(gib: float):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rows_past_2_31_elements(backend):
    _need(10)
    rows, width = 64, BIG // 64
    x = torch.empty(rows, width, device="cuda", dtype=torch.bfloat16)
    x[:, :4096].normal_()
    x[:, -4096:].normal_()
    gate = torch.zeros(rows, device="cuda")
    gate[[0, 3, 62, 63]] = 1
    idx, count = dynkernels.compact(gate)
    y = dynkernels.gather_rows(x, idx, count, 8, backend=backend)
    for part in (slice(0, 4096), slice(width - 4096, width)):
        want = ref.gather_rows(x[:, part].contiguous(), idx, count, 8)
        assert torch.equal(y[:, part], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_sparse_conv2d_past_2_31_elements(backend):
    _need(20)
    # [2, 64, 4096, 4104] bf16 channels_last in and out: 2^31 + 2^21 elements each.
    n, c, h, w = 2, 64, 4096, 4104
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    weight = (0.1 * torch.randn(c, c, 1, 1, device="cuda", dtype=torch.bfloat16)).to(memory_format=torch.channels_last)
    out_gate = (torch.rand(n, c, device="cuda") < 0.5).to(torch.bfloat16)
    y = dynkernels.channel_sparse_conv2d(x, weight, None, out_gate, backend=backend)
    assert y.numel() > 2**31
    # A 1x1 conv of a slice of rows is that slice of the conv: the last rows of the last sample
    # hold the elements past 2^31.
    for rows in (slice(0, 8), slice(h - 8, h)):
        want = ref.channel_sparse_conv2d(x[:, :, rows].float(), weight.float(), None, out_gate.float())
        torch.testing.assert_close(y[:, :, rows].float(), want, atol=5e-2, rtol=2e-2)
