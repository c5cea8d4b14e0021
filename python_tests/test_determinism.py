"""Determinism: the same inputs give bit for bit the same forward output, call after call, on
every backend that runs here (and the GPU ones, marked `cuda`), for every op and for
GatedConv2d, SkipBlock and RouteBlock; the C++ kernels also across thread counts and when
called from several Python threads at once. The tuned-configuration cache
(dynkernels.tuned_configs) is safe to use from threads: one table read per device, one
warning for a device without a table, the same answers as a single thread.

Why the kernels are deterministic (README, "Determinism"): no kernel accumulates with atomics;
every output element is summed by one thread in a fixed order (the Triton conv's split-K
partial sums are added by a second kernel in a fixed order), and the C++ kernels split work
by samples or by output rows, never inside one dot product.
"""
import threading

import pytest
import torch
import torch.nn as nn

import dynkernels
from dynkernels import reference, tuned_configs
from dynkernels import nn as dnn

from _utils import HAS_TRITON, device_backends, needs_interpreter, rand_gate

REPEATS = 3


def _backends():
    """device_backends() plus "auto" on each device."""
    return device_backends() + [
        pytest.param("cpu", "auto", id="cpu-auto"),
        pytest.param("cuda", "auto", id="cuda-auto", marks=pytest.mark.cuda),
    ]


BACKENDS = _backends()


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    if not t.dtype.is_floating_point:
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_repeatable(fn, what: str, repeats: int = REPEATS):
    """fn() gives bitwise the same tensor(s) on every call."""
    first = fn()
    first = first if isinstance(first, tuple) else (first,)
    for i in range(1, repeats):
        again = fn()
        again = again if isinstance(again, tuple) else (again,)
        for a, b in zip(first, again):
            assert torch.equal(bits(a), bits(b)), f"{what}: call {i} differs from call 0"


def small(device, backend) -> bool:
    """The Triton interpreter is slow: small inputs there, and two calls (not three) each."""
    return device == "cpu" and backend == "triton"


def repeats(device, backend) -> int:
    return 2 if small(device, backend) else REPEATS


# ----------------------------------------------------------------------------- ops
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ops_are_deterministic(device, backend):
    r = repeats(device, backend)
    n, row = (9, (3, 4, 5)) if small(device, backend) else (64, (16, 7, 7))
    dtypes = (torch.float32, torch.float16) if small(device, backend) else (torch.float32, torch.bfloat16, torch.float16)
    gate = rand_gate((n,), 0.5, device)
    choice = torch.randint(0, 3, (n,), device=device)
    assert_repeatable(lambda: dynkernels.compact(gate, backend=backend), "compact", r)
    assert_repeatable(lambda: dynkernels.route(choice, 3, backend=backend), "route", r)
    idx, count = reference.compact(gate)
    scale = torch.rand(n, device=device)
    for dtype in dtypes:
        x = torch.randn((n,) + row, device=device).to(dtype)
        rows = int(count)
        y = torch.randn((rows,) + row, device=device).to(dtype)
        assert_repeatable(lambda: dynkernels.gather_rows(x, idx, count, backend=backend), f"gather_rows {dtype}", r)
        assert_repeatable(lambda: dynkernels.scatter_add_rows(x, y, idx, count, scale, backend=backend), f"scatter_add_rows {dtype}", r)
        assert_repeatable(lambda: dynkernels.scatter_rows(x, y, idx, count, backend=backend), f"scatter_rows {dtype}", r)
        assert_repeatable(lambda: dynkernels.scatter_rows_(x.clone(), y, idx, count, backend=backend), f"scatter_rows_ {dtype}", r)


def _conv_inputs(device, n, cin, cout, hw, density, dtype=torch.float32, channels_last=False):
    x = torch.randn(n, cin, hw, hw, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 3, 3, device=device) / (3 * cin**0.5)).to(dtype)
    b = torch.randn(cout, device=device).to(dtype)
    return x, w, b, rand_gate((n, cout), density, device), rand_gate((n, cin), density, device)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_channel_sparse_conv2d_is_deterministic(device, backend):
    r = repeats(device, backend)
    if small(device, backend):
        shapes = [(2, 5, 6, 6, 0.5)]
        dtypes = (torch.float32,)
    else:
        # N >= threads (samples split over threads) and N = 1 (output rows split); a density
        # that "auto" runs densely on the CPU (oneDNN) and one it runs sparsely
        shapes = [(8, 32, 48, 12, 0.5), (1, 64, 96, 14, 0.5), (4, 16, 24, 10, 1.0)]
        dtypes = (torch.float32, torch.bfloat16) if backend != "cuda" else (torch.float32, torch.float16, torch.bfloat16)
    for n, cin, cout, hw, density in shapes:
        for dtype in dtypes:
            for channels_last in (False, True):
                x, w, b, og, ig = _conv_inputs(device, n, cin, cout, hw, density, dtype, channels_last)
                for stride in (1,) if small(device, backend) else (1, 2):
                    assert_repeatable(
                        lambda: dynkernels.channel_sparse_conv2d(x, w, b, og, ig, stride, 1, 1, backend=backend),
                        f"channel_sparse_conv2d n={n} {dtype} channels_last={channels_last} stride {stride}", r,
                    )


def test_cpp_kernels_do_not_depend_on_the_thread_count():
    """The C++ conv splits samples (or, for fewer samples than threads, output rows) over
    threads, never one dot product: 1 and 2 threads give the same bits (and so do the merges)."""
    cases = [_conv_inputs("cpu", 8, 32, 48, 12, 0.5), _conv_inputs("cpu", 1, 64, 96, 14, 0.5, channels_last=True)]
    base = torch.randn(64, 16, 7, 7)
    idx, count = reference.compact(rand_gate((64,), 0.5))
    y = torch.randn(int(count), 16, 7, 7)
    scale = torch.rand(64)

    def run():
        convs = tuple(dynkernels.channel_sparse_conv2d(x, w, b, og, ig, 1, 1, 1, backend="cpu") for x, w, b, og, ig in cases)
        return convs + (dynkernels.scatter_add_rows(base, y, idx, count, scale, backend="cpu"),)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(bits(a), bits(b))


def test_cpp_kernels_from_several_python_threads():
    """The C++ kernels keep no shared mutable state: four Python threads calling them at once
    get what one thread gets."""
    x, w, b, og, ig = _conv_inputs("cpu", 4, 16, 24, 10, 0.5)
    gate = rand_gate((64,), 0.5)
    data = torch.randn(64, 8, 5, 5)

    def work():
        idx, count = dynkernels.compact(gate, backend="cpu")
        kept = dynkernels.gather_rows(data, idx, count, backend="cpu")
        merged = dynkernels.scatter_rows(data, 2 * kept, idx, count, backend="cpu")
        return dynkernels.channel_sparse_conv2d(x, w, b, og, ig, 1, 1, 1, backend="cpu"), merged

    expected = work()
    results, errors = [], []

    def thread():
        try:
            for _ in range(10):
                results.append(work())
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=thread) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 40
    for r in results:
        for a, e in zip(r, expected):
            assert torch.equal(bits(a), bits(e))


# ----------------------------------------------------------------------------- modules
def _small_block(c):
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)).eval()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_modules_are_deterministic(device, backend):
    r = repeats(device, backend)
    n, c, hw = (6, 3, 5) if small(device, backend) else (16, 8, 9)
    x = torch.randn(n, c, hw, hw, device=device)
    conv = dnn.GatedConv2d(c, 2 * c, 3, padding=1, backend=backend).to(device)
    gate = rand_gate((n, 2 * c), 0.5, device)
    in_gate = rand_gate((n, c), 0.5, device)
    sample_gate = rand_gate((n,), 0.5, device)
    plain = dnn.SkipBlock(_small_block(c), backend=backend).to(device)
    scaled = dnn.SkipBlock(_small_block(c), scaled=True, backend=backend).to(device)
    routed = dnn.RouteBlock([_small_block(c), _small_block(c), nn.Identity()], backend=backend).to(device)
    choice = torch.randint(0, 3, (n,), device=device)
    with torch.no_grad():
        assert_repeatable(lambda: conv(x, gate, in_gate), "GatedConv2d", r)
        assert_repeatable(lambda: plain(x, sample_gate), "SkipBlock", r)
        assert_repeatable(lambda: scaled(x, sample_gate), "SkipBlock scaled", r)
        assert_repeatable(lambda: routed(x, choice), "RouteBlock", r)


# ----------------------------------------------------------------------------- tuned-config cache
def _fake_table(device: str) -> tuned_configs.Table:
    """A table of three fp16 entries for a made-up device name."""
    entries = []
    for i, (cin, cout, density) in enumerate(((64, 64, 0.25), (128, 256, 0.5), (256, 256, 0.9))):
        key = tuned_configs.ConvKey(cin, cout, 3, 3, (1, 1), 14, 14, 32, "float16", "out")
        tile = tuned_configs.TileConfig(64, 32 << i, 32, 4, 2)
        entries.append(tuned_configs.Entry(key, density, 1.0, tile, 0.5, i, 0.4))
    return tuned_configs.Table(device, tuple(entries), {})


def _keys():
    """Lookups of many layers and densities (more than the small cache the test sets)."""
    out = []
    for cin in (32, 64, 96, 128, 256):
        for cout in (64, 128, 256):
            for density in (None, 0.1, 0.5, 0.95):
                out.append((tuned_configs.ConvKey(cin, cout, 3, 3, (1, 1), 14, 14, 16, "float16", "out"), density))
    return out


def test_tuned_config_cache_from_threads(tmp_path, monkeypatch):
    """Eight threads looking up layers at once (a table device and a device without a table):
    every answer is the single-threaded nearest entry, the table is read once, the missing
    table is warned about once, and the bounded cache stays within its bound."""
    name, missing = "Made-up GPU 80GB", "Made-up GPU without a table"
    table = _fake_table(name)
    tuned_configs.write_table(table, str(tmp_path))
    monkeypatch.setenv(tuned_configs.CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(tuned_configs, "_CHOICE_CACHE_SIZE", 16)
    tuned_configs.clear_cache()
    reads, warnings_ = [], []
    real_load = tuned_configs.load_table

    def slow_load(path):
        reads.append(path)
        threading.Event().wait(0.02)  # widen the window in which another thread could read it too
        return real_load(path)

    monkeypatch.setattr(tuned_configs, "load_table", slow_load)
    monkeypatch.setattr(tuned_configs.warnings, "warn", lambda *a, **k: warnings_.append(a[0]))
    keys = _keys()
    loaded = real_load(str(tmp_path / tuned_configs.table_file_name(name)))
    expected = [tuned_configs.nearest_entry(loaded, k, d) for k, d in keys]
    start = threading.Barrier(8)
    errors, mismatches = [], []

    def thread(offset):
        try:
            start.wait()
            for r in range(3):
                for i in range(len(keys)):
                    j = (i + offset) % len(keys)
                    got = tuned_configs.entry_for(name, *keys[j])
                    if got != expected[j]:
                        mismatches.append((j, got, expected[j]))
                    if tuned_configs.entry_for(missing, *keys[j]) is not None:
                        mismatches.append((j, "entry for a device without a table"))
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=thread, args=(7 * k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert not mismatches, mismatches[:3]
        assert len(reads) == 1, f"the table was read {len(reads)} times"
        assert len(warnings_) == 1 and missing in warnings_[0], warnings_
        assert len(tuned_configs._choices) <= 16
    finally:
        tuned_configs.clear_cache()
