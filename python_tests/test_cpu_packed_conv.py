"""The dense execution's conv2d on channels_last CPU tensors, with oneDNN's reordered weight kept
between calls (dynkernels/ops/_cpu_packed_conv.py): conv2d's result, a cache entry only where
it is used, and never a stale weight."""
import gc
import threading

import pytest
import torch
import torch.nn.functional as F

from dynkernels.ops import _cpu_packed_conv as packed

from _utils import assert_close

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

CL = torch.channels_last


@pytest.fixture(autouse=True)
def _empty_cache():
    packed.clear_cache()
    yield
    packed.clear_cache()


@pytest.mark.parametrize("stride, padding, dilation", [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (1, 2))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
def test_matches_conv2d_and_reuses_the_reordered_weight(stride, padding, dilation, bias, weight_layout):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 9, 7).contiguous(memory_format=CL)
    w, b = torch.randn(6, 8, 3, 3), torch.randn(6) if bias else None
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=CL)
    want = F.conv2d(x, w, b, stride, padding, dilation)
    for _ in range(2):
        y = packed.conv2d_channels_last(x, w, b, stride, padding, dilation)
        assert_close(y, want)
        assert y.is_contiguous(memory_format=CL)
    assert len(packed._CACHE) == 1
    entry = packed._CACHE[id(w)]
    packed.conv2d_channels_last(x, w, b, stride, padding, dilation)
    assert packed._CACHE[id(w)] is entry  # reused, not reordered again
    # another batch size: the same entry, still conv2d's result; another image size: a new entry
    assert_close(packed.conv2d_channels_last(x[:1], w, b, stride, padding, dilation), want[:1])
    assert packed._CACHE[id(w)] is entry
    x2 = torch.randn(2, 8, 5, 6).contiguous(memory_format=CL)
    assert_close(packed.conv2d_channels_last(x2, w, b, stride, padding, dilation),
                 F.conv2d(x2, w, b, stride, padding, dilation))
    assert packed._CACHE[id(w)] is not entry


def test_weight_writes_are_seen():
    """Writes through .data (which autograd's version counter does not see), in place under
    no_grad, and a new tensor assigned to .data: the next call uses the weight as it is now."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=CL)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1).to(memory_format=CL)  # (a channels_last weight)
    run = lambda: packed.conv2d_channels_last(x, conv.weight, conv.bias, (1, 1), (1, 1), (1, 1))
    with torch.no_grad():
        run()
        assert id(conv.weight) in packed._CACHE
        conv.weight.data[0, 0, 0, 0] += 1.0
        assert_close(run(), F.conv2d(x, conv.weight, conv.bias, 1, 1))
        conv.weight.mul_(-1)
        assert_close(run(), F.conv2d(x, conv.weight, conv.bias, 1, 1))
        conv.weight.data = torch.randn(5, 4, 3, 3)
        assert_close(run(), F.conv2d(x, conv.weight, conv.bias, 1, 1))


def test_conv2d_where_the_reordered_weight_does_not_apply():
    """NCHW input, a gradient to record, a non-contiguous weight: plain conv2d, no cache entry;
    gradients flow as through conv2d."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3)
    assert_close(packed.conv2d_channels_last(x, w, None, (1, 1), (1, 1), (1, 1)), F.conv2d(x, w, None, 1, 1))
    wt = torch.randn(4, 5, 3, 3).transpose(0, 1)  # neither contiguous nor channels_last
    xc = x.contiguous(memory_format=CL)
    assert_close(packed.conv2d_channels_last(xc, wt, None, (1, 1), (1, 1), (1, 1)), F.conv2d(xc, wt, None, 1, 1))
    wg = w.clone().requires_grad_(True)
    packed.conv2d_channels_last(xc, wg, None, (1, 1), (1, 1), (1, 1)).sum().backward()
    assert_close(wg.grad, torch.autograd.grad(F.conv2d(xc, w.requires_grad_(True), None, 1, 1).sum(), w)[0])
    assert not packed._CACHE


def test_entry_dropped_with_its_weight():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=CL)
    w = torch.randn(5, 4, 3, 3)
    packed.conv2d_channels_last(x, w, None, (1, 1), (1, 1), (1, 1))
    assert len(packed._CACHE) == 1
    del w
    gc.collect()
    assert not packed._CACHE


def test_threads_share_the_cache():
    """Calls from several threads on one weight, with two image sizes that keep replacing each
    other's entry: every result is conv2d's."""
    torch.manual_seed(0)
    w, b = torch.randn(6, 4, 3, 3), torch.randn(6)
    xs = [torch.randn(2, 4, s, s).contiguous(memory_format=CL) for s in (5, 7)]
    wants = [F.conv2d(x, w, b, 1, 1) for x in xs]
    failures = []

    def work(k):
        for i in range(20):
            j = (i + k) % 2
            y = packed.conv2d_channels_last(xs[j], w, b, (1, 1), (1, 1), (1, 1))
            if not torch.allclose(y, wants[j], rtol=1e-5, atol=1e-5):
                failures.append((k, i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
