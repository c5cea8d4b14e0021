"""1x1 convolutions of compact batches on the CPU (dynkernels/nn/compact_convs.py): where torch
gave the full batch oneDNN but would give a compact batch of it its own GEMM path at one thread,
the sparse executions run the big ones on oneDNN; elsewhere nothing changes."""
import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from dynkernels.nn import EarlyExit, RouteBlock, SkipBlock
from dynkernels.nn import compact_convs as cc

from _utils import assert_close

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

CL = torch.channels_last
SLOW = "aten::_slow_conv2d_forward"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv_ops(fn):
    """(result of fn(), names of the aten conv implementations it ran)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = fn()
    names = {e.name for e in prof.events()}
    return y, {n for n in names if n in (SLOW, "aten::mkldnn_convolution", "mkldnn::_convolution_pointwise")}


@pytest.mark.parametrize("rows, cin, cout, h, w, channels_last, wins", [
    (12, 2048, 512, 2, 2, False, True),   # slow_conv2d 18x slower here
    (2, 128, 512, 2, 2, False, True),     # 2x2: by rows x Cin x Cout
    (4, 64, 256, 8, 8, False, True),      # 2^22 multiply-adds
    (2, 64, 256, 8, 8, False, False),     # 2^21: slow_conv2d still faster on NCHW
    (2, 64, 256, 8, 8, True, True),       # ... not on channels_last with the weight kept reordered
    (15, 16, 16, 56, 56, False, False),   # narrow channels: oneDNN's fixed cost
    (8, 2048, 512, 1, 1, True, False),    # one pixel: a plain GEMM either way
])
def test_crossover(rows, cin, cout, h, w, channels_last, wins):
    assert cc.onednn_wins(rows, cin, cout, h, w, channels_last) is wins


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("bias", [False, True])
def test_big_pointwise_conv_runs_on_onednn(layout, bias, one_thread):
    torch.manual_seed(0)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    conv = nn.Conv2d(512, 1024, 1, bias=bias).to(memory_format=fmt).eval()
    x = torch.randn(12, 512, 2, 2).contiguous(memory_format=fmt)
    with torch.no_grad():
        want, ops = conv_ops(lambda: conv(x))
        assert ops == {SLOW}  # what torch does with 12 rows at one thread
        with cc.compact_batch_convs(64, 12, x.device):
            y, ops = conv_ops(lambda: conv(x))
    assert SLOW not in ops and ops
    assert_close(y, want)
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("rows, cin, cout, size", [(2, 128, 512, 2), (15, 64, 256, 8), (5, 256, 64, 16)])
@pytest.mark.parametrize("x_layout, w_layout", [("nchw", "channels_last"), ("channels_last", "nchw"), ("channels_last", "channels_last")])
def test_rerouted_convs_match_conv2d_in_value_and_layout(rows, cin, cout, size, x_layout, w_layout, one_thread):
    torch.manual_seed(1)
    fmt = {"nchw": torch.contiguous_format, "channels_last": CL}
    x = torch.randn(rows, cin, size, size).contiguous(memory_format=fmt[x_layout])
    w = torch.randn(cout, cin, 1, 1).contiguous(memory_format=fmt[w_layout])
    b = torch.randn(cout)
    with torch.no_grad():
        want = F.conv2d(x, w, b)
        with cc.compact_batch_convs(32, rows, x.device):
            y, ops = conv_ops(lambda: F.conv2d(x, w, b))
    assert (SLOW not in ops) is cc.onednn_wins(rows, cin, cout, size, size, x_layout == "channels_last")
    assert_close(y, want)
    assert y.stride() == want.stride()


def test_other_convs_are_left_alone(one_thread):
    torch.manual_seed(0)
    x = torch.randn(12, 512, 4, 4)
    with torch.no_grad(), cc.compact_batch_convs(64, 12, x.device):
        for args in [(torch.randn(64, 512, 3, 3), None, 1, 1), (torch.randn(64, 512, 1, 1), None, 2),
                     (torch.randn(8, 8, 1, 1),), (torch.randn(64, 512, 1, 1), None, 1, 0, 2)]:
            xi = x if args[0].shape[1] == 512 else x[:, :8]
            assert cc._pointwise_on_onednn(xi, *args) is None
        assert cc._pointwise_on_onednn(x.bfloat16(), torch.randn(64, 512, 1, 1).bfloat16()) is None
        assert cc._pointwise_on_onednn(x[:1], torch.randn(1024, 512, 1, 1)) is None  # one row: torch's path
        assert cc._pointwise_on_onednn(x[:, :, :1, :1], torch.randn(1024, 512, 1, 1)) is None  # one pixel
        assert cc._pointwise_on_onednn(x, torch.randn(1024, 512, 1, 1)) is not None


@pytest.mark.parametrize("full_rows, rows, grad, threads, device, active", [
    (64, 12, False, 1, "cpu", True),
    (15, 12, False, 1, "cpu", False),   # torch gave the full batch its own path too
    (64, 16, False, 1, "cpu", False),   # 16 rows: oneDNN anyway
    (64, 1, False, 1, "cpu", False),
    (64, 12, True, 1, "cpu", False),    # an autograd graph is recorded
    (64, 12, False, 2, "cpu", False),   # two threads: oneDNN anyway
    (64, 12, False, 1, "meta", False),
])
def test_when_the_mode_is_on(full_rows, rows, grad, threads, device, active):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.set_grad_enabled(grad):
            ctx = cc.compact_batch_convs(full_rows, rows, torch.device(device))
    finally:
        torch.set_num_threads(saved)
    assert isinstance(ctx, torch.overrides.TorchFunctionMode) is active
    assert active or isinstance(ctx, contextlib.nullcontext)


def test_flop_counter_sees_the_convs(one_thread):
    """Under FlopCounterMode the compact batch keeps torch's conv, which the counter counts
    (it does not know oneDNN's op)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, gate = torch.randn(16, 512, 2, 2), (torch.arange(16) % 4 != 0).float()
    skip = SkipBlock(nn.Conv2d(512, 512, 1, bias=False)).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        skip(x, gate)
    assert counter.get_total_flops() == 2 * 12 * 512 * 512 * 4


class Bottleneck(nn.Module):
    def __init__(self, c=512, inner=128):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(c, inner, 1), nn.Conv2d(inner, inner, 3, padding=1), nn.Conv2d(inner, c, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class CertainWhereMarked(nn.Module):
    def forward(self, t):
        return torch.cat([t[:, :1, 0, 0] * 1000, t.new_zeros(t.shape[0], 9)], 1)


class MeanHead(nn.Module):
    def forward(self, t):
        return t.mean(dim=(2, 3))[:, :10]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sparse_executions_run_their_compact_batches_on_onednn(layout, one_thread):
    """SkipBlock (its C++ host path and the scaled one), RouteBlock and EarlyExit: 12 of 16 rows
    each, no slow_conv2d, and the masked execution's result."""
    torch.manual_seed(0)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(16, 512, 4, 4).contiguous(memory_format=fmt)
    gate = (torch.arange(16) % 4 != 0).float()  # 12 kept
    plain = SkipBlock(Bottleneck()).to(memory_format=fmt).eval()
    scaled = SkipBlock(Bottleneck(), scaled=True).to(memory_format=fmt).eval()
    runs = [(plain, lambda: plain(x, gate, plain.plan(gate)), lambda: plain(x, gate)),  # (the C++ host path)
            (scaled, lambda: scaled(x, gate), lambda: scaled(x, gate))]
    route = RouteBlock([Bottleneck(), Bottleneck()]).to(memory_format=fmt).eval()
    choice = (torch.arange(16) % 4 == 0).long()  # 12 rows to branch 0, 4 to branch 1
    runs.append((route, lambda: route(x, choice), lambda: route(x, choice)))

    # EarlyExit: the rows with a marker of 1 are certain at the first exit (threshold 1), the
    # other 12 go on to the bottleneck
    marked = x.clone()
    marked[:, 0, 0, 0] = (torch.arange(16) % 4 == 0).float()
    exit_ = EarlyExit([nn.Identity(), Bottleneck().to(memory_format=fmt)], [CertainWhereMarked(), MeanHead()], threshold=1.0).eval()
    runs.append((exit_, lambda: exit_(marked), lambda: exit_(marked)))
    with torch.inference_mode():
        for module, sparse, masked in runs:
            module.execution = "masked"
            want = masked()
            module.execution = "sparse"
            y, ops = conv_ops(sparse)
            assert SLOW not in ops, type(module).__name__
            for a, b in zip(y if isinstance(y, tuple) else (y,), want if isinstance(want, tuple) else (want,)):
                assert_close(a, b) if a.dtype.is_floating_point else torch.testing.assert_close(a, b)
