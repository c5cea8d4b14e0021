"""Tensors past 2^31 elements: every index in the kernels must be 64-bit where it can exceed
int32 (the row offset of a gather, the sample or pixel offset of a conv). Each case is checked
against the reference on a part of the output that lies past element 2^31 and on a part before
it. About 4.3 GB per bf16 tensor: each case is skipped where there is less free memory than it
needs. On the GPU the whole tensors are computed; on the CPU (the C++ kernels) the gates leave
only the samples or rows around element 2^31 active, so that a case costs seconds, not minutes."""
import pytest
import torch

import dynkernels
from dynkernels import reference as ref

BIG = 2**31 + 2**20  # elements: past int32's range, but not by much

BACKENDS = [pytest.param("cuda", marks=pytest.mark.skipif(not dynkernels.cuda_kernels_compiled(), reason="no CUDA kernels")),
            pytest.param("triton", marks=pytest.mark.skipif(not dynkernels.triton_available(), reason="no Triton"))]


def _need(gib: float):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


def _need_host(gib: float):
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    free = int(fields["MemAvailable"].split()[0]) * 1024
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of available memory, {free / 2**30:.0f} GiB available")


@pytest.mark.cuda
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


@pytest.mark.cuda
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


# ----------------------------------------------------------------------------- CPU kernels
def test_cpu_gather_and_scatter_rows_past_2_31_elements():
    _need_host(11)
    rows, width = 64, BIG // 64
    x = torch.zeros(rows, width, dtype=torch.bfloat16)
    parts = (slice(0, 4096), slice(width - 4096, width))  # row 63's last part lies past 2^31
    for part in parts:
        x[:, part].normal_()
    gate = torch.zeros(rows)
    gate[[0, 3, 62, 63]] = 1
    idx, count = dynkernels.compact(gate, backend="cpu")
    y = dynkernels.gather_rows(x, idx, count, 8, backend="cpu")
    for part in parts:
        assert torch.equal(y[:, part], ref.gather_rows(x[:, part].contiguous(), idx, count, 8))
    # ... and back: added, scaled, into a copy of x
    scale = torch.rand(rows) + 0.5
    out = dynkernels.scatter_add_rows(x, y, idx, count, scale, backend="cpu")
    for part in parts:
        want = ref.scatter_add_rows(x[:, part].contiguous(), y[:, part].contiguous(), idx, count, scale)
        assert torch.equal(out[:, part], want)
    del out
    # ... and back, in place: rows 0, 3, 62 and 63 of x get y's rows 3, 2, 1, 0.
    swapped = y.flip(0)[4:].contiguous()  # gathered rows in reverse order
    dynkernels.scatter_rows_(x, swapped, idx, count, backend="cpu")
    for part in parts:
        assert torch.equal(x[[0, 3, 62, 63], part], swapped[:, part])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_channel_sparse_conv2d_past_2_31_elements(layout):
    _need_host(12)
    # [513, 64, 256, 256] bf16 in and out: 2^31 + 2^22 elements each; sample 512 starts at
    # element 2^31. Samples 510 - 512 are active (some output and input channels each), the
    # others all off: their output must be exact zeros.
    n, c, h, w = 513, 64, 256, 256
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.zeros(n, c, h, w, dtype=torch.bfloat16).contiguous(memory_format=fmt)
    x[-3:].normal_()
    g = torch.Generator().manual_seed(0)
    weight = (0.1 * torch.randn(c, c, 3, 3, generator=g)).to(torch.bfloat16)
    out_gate = torch.zeros(n, c)
    out_gate[-3:] = (torch.rand(3, c, generator=g) < 0.1) * (torch.rand(3, c, generator=g) + 0.5)
    in_gate = torch.zeros(n, c)
    in_gate[-3:] = (torch.rand(3, c, generator=g) < 0.5).float()
    y = dynkernels.channel_sparse_conv2d(x, weight, None, out_gate, in_gate, 1, 1, backend="cpu")
    assert y.numel() > 2**31 and y.is_contiguous(memory_format=fmt)
    want = ref.channel_sparse_conv2d(x[-3:].float(), weight.float(), None, out_gate[-3:], in_gate[-3:], 1, 1)
    torch.testing.assert_close(y[-3:].float(), want, atol=5e-2, rtol=2e-2)
    assert not y[:4].any() and not y[-4].any()
