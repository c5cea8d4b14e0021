"""backend="auto" on CUDA tensors: the decision rule (on the CPU, with mocked tables), dense
execution against the reference, and (on a GPU) that the op follows the rule."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import dynkernels
from dynkernels import reference, tuned_configs
from dynkernels.ops.channel_sparse_conv2d_gpu_rule import DENSE_ABOVE, gpu_execution
from dynkernels.tuned_configs import ConvKey, Entry, Table, TileConfig

from _utils import assert_close, rand_gate

conv_ops = importlib.import_module("dynkernels.ops.channel_sparse_conv2d")  # the module, not the function

KEY = ConvKey(256, 256, 3, 3, (1, 1), 14, 14, 128, "bfloat16", "out")
TILE = TileConfig(64, 64, 64, 4, 4)


def entry(dense_ms=1.0, triton_ms=0.6, cuda_ms=0.5, density=0.5):
    return Entry(KEY, density, dense_ms, TILE if triton_ms else None, triton_ms, 0 if cuda_ms else None, cuda_ms)


# ----------------------------------------------------------------------------- the rule
def test_table_picks_the_fastest_available():
    assert gpu_execution(entry(cuda_ms=0.5, triton_ms=0.6), 0.5, True, True) == "cuda"
    assert gpu_execution(entry(cuda_ms=0.7, triton_ms=0.6), 0.5, True, True) == "triton"
    assert gpu_execution(entry(cuda_ms=0.5, triton_ms=0.6), 0.5, False, True) == "triton"  # not in this build
    assert gpu_execution(entry(cuda_ms=0.5, triton_ms=0.6), 0.5, True, False) == "cuda"


def test_table_says_where_dense_wins():
    slow_kernels = entry(dense_ms=0.4, cuda_ms=0.5, triton_ms=0.6, density=1.0)
    assert gpu_execution(slow_kernels, 1.0, True, True) == "dense"
    assert gpu_execution(slow_kernels, None, True, True) == "cuda"  # no hint: the gates may be sparse


def test_table_without_timed_kernels_falls_back():
    only_dense = entry(dense_ms=0.4, cuda_ms=None, triton_ms=None)
    assert gpu_execution(only_dense, 0.3, True, True) == "dense"
    assert gpu_execution(only_dense, None, True, True) == "cuda"
    assert gpu_execution(entry(cuda_ms=0.5, triton_ms=None), None, False, True) == "triton"


def test_no_table_uses_the_density_threshold():
    assert gpu_execution(None, DENSE_ABOVE + 0.01, True, True) == "dense"
    assert gpu_execution(None, DENSE_ABOVE, True, True) == "cuda"
    assert gpu_execution(None, 0.1, False, True) == "triton"
    assert gpu_execution(None, None, True, True) == "cuda"
    assert gpu_execution(None, None, False, False) == "dense"


def test_rule_with_a_mocked_device_table(tmp_path, monkeypatch):
    """The lookup the op makes (device name -> table -> nearest entry) feeding the rule."""
    monkeypatch.setenv(tuned_configs.CONFIG_DIR_ENV, str(tmp_path))
    tuned_configs.clear_cache()
    try:
        table = Table("Mock GPU", (entry(dense_ms=0.4, cuda_ms=0.9, triton_ms=0.8, density=1.0),
                                   entry(dense_ms=0.4, cuda_ms=0.3, triton_ms=0.2, density=0.25)), {})
        tuned_configs.write_table(table, str(tmp_path))
        near = ConvKey(256, 256, 3, 3, (1, 1), 14, 14, 64, "float16", "out")
        pick = lambda d: gpu_execution(tuned_configs.entry_for("Mock GPU", near, d), d, True, True)  # noqa: E731
        assert pick(0.95) == "dense"
        assert pick(0.3) == "triton"
        assert pick(None) == "triton"  # DEFAULT_DENSITY 0.5 is nearer the 0.25 entry
    finally:
        tuned_configs.clear_cache()


def test_gpu_choice_with_a_mocked_device(tmp_path, monkeypatch):
    """What the op does for CUDA tensors, run on CPU tensors with the device name, SM count, the
    build's kernels and its CUDA config ids mocked, and a table in $DYNKERNELS_CONFIG_DIR."""
    monkeypatch.setenv(tuned_configs.CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(tuned_configs, "device_name", lambda device: "Mock GPU")
    monkeypatch.setattr(tuned_configs, "num_sms", lambda device: 132)
    monkeypatch.setattr(tuned_configs, "cuda_config_ids", lambda: (0, 1, 2))
    monkeypatch.setattr(conv_ops, "cuda_kernels_compiled", lambda: True)
    monkeypatch.setattr(conv_ops, "triton_available", lambda: True)
    x = torch.randn(8, 64, 14, 14, dtype=torch.bfloat16)
    w = torch.randn(64, 64, 3, 3, dtype=torch.bfloat16)
    key = ConvKey.of(x, w, None, (8, 64, 14, 14), (1, 1))
    tile = TileConfig(128, 32, 64, 4, 4)
    tuned_configs.write_table(Table("Mock GPU", (
        Entry(key, 1.0, 0.1, tile, 0.3, 2, 0.2),   # dense wins at density 1
        Entry(key, 0.25, 0.1, tile, 0.03, 7, 0.05),  # Triton wins; CUDA id 7 is not in this build
    ), {}), str(tmp_path))
    tuned_configs.clear_cache()
    try:
        choose = lambda backend, resolved, d: conv_ops.gpu_choice(  # noqa: E731
            x, w, None, (1, 1), (1, 1), (1, 1), backend, resolved, d)
        assert choose("auto", "cuda", 1.0) == ("dense", None)
        assert choose("auto", "cuda", 0.25) == ("triton", tile.to_list())
        # no hint: DEFAULT_DENSITY 0.5 ties between 0.25 and 1.0 (the earlier entry wins), and
        # dense execution is not an option
        assert choose("auto", "cuda", None) == ("cuda", 2)
        assert choose("cuda", "cuda", 1.0) == ("cuda", 2)
        assert choose("cuda", "cuda", 0.25) == ("cuda", -1)  # id 7: the kernel's own heuristic
        assert choose("triton", "triton", 1.0) == ("triton", tile.to_list())
        fp32 = x.float()  # no table entries for fp32: heuristic tile, threshold rule
        assert choose("triton", "triton", 0.5)[1] == tile.to_list()
        got = conv_ops.gpu_choice(fp32, w.float(), None, (1, 1), (1, 1), (1, 1), "auto", "cuda", 0.5)
        assert got == ("cuda", -1)
        got = conv_ops.gpu_choice(fp32, w.float(), None, (1, 1), (1, 1), (1, 1), "triton", "triton", 0.5)
        assert got == ("triton", tuned_configs.triton_heuristic(ConvKey.of(fp32, w, None, (8, 64, 14, 14), (1, 1)), 0.5).to_list())
    finally:
        tuned_configs.clear_cache()


# ----------------------------------------------------------------------------- dense execution
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_in_gate", [False, True])
def test_dense_execution_matches_reference(layout, with_in_gate):
    n, cin, cout = 3, 5, 6
    x = torch.randn(n, cin, 7, 6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, shift = torch.randn(cout, cin, 3, 3, dtype=torch.float64), torch.randn(cout, dtype=torch.float64), torch.randn(cout, dtype=torch.float64)
    og = rand_gate((n, cout), 0.6, dtype=torch.float64) - 0.05  # some negative entries: inactive too
    ig = rand_gate((n, cin), 0.5) if with_in_gate else None
    args = (x, w, b, og, ig, (2, 1), (1, 0), (1, 2), shift)
    y = conv_ops.dense_channel_gated_conv2d(*args)
    assert_close(y, reference.channel_sparse_conv2d(*args))
    assert (y[(og <= 0)[:, :, None, None].expand_as(y)] == 0).all()
    assert y.is_contiguous(memory_format=dynkernels._layout.row_layout(x))
    # gradients through autograd equal the reference's
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, og, shift)]
    grads = torch.autograd.grad(conv_ops.dense_channel_gated_conv2d(*leaves[:4], ig, *args[5:8], leaves[4]).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w, b, og, shift)]
    ref = torch.autograd.grad(reference.channel_sparse_conv2d(*ref_leaves[:4], ig, *args[5:8], ref_leaves[4]).sum(), ref_leaves)
    for g, r in zip(grads, ref):
        assert_close(g, r)


def test_dense_execution_without_bias_and_shift():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 1, 1)
    og = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 0.5, 0.0, 0.0]])
    y = conv_ops.dense_channel_gated_conv2d(x, w, None, og > 0, None, (1, 1), (0, 0), (1, 1))
    assert_close(y, F.conv2d(x, w) * (og > 0).float()[:, :, None, None])


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
def test_auto_on_cuda_follows_the_table(tmp_path, monkeypatch):
    """With a table that says dense execution wins at density 1, auto runs it (and gives the
    contract's result); with a hint of 0.25 it runs a sparse kernel."""
    dt = torch.bfloat16
    x = torch.randn(4, 32, 8, 8, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 32, 3, 3, device="cuda", dtype=dt) / 17
    og = rand_gate((4, 32), 1.0, "cuda")
    key = ConvKey.of(x, w, None, (4, 32, 8, 8), (1, 1))
    table = Table(torch.cuda.get_device_name(), (
        Entry(key, 1.0, 0.01, TILE, 0.5, None, None), Entry(key, 0.25, 0.5, TILE, 0.01, None, None)), {})
    monkeypatch.setenv(tuned_configs.CONFIG_DIR_ENV, str(tmp_path))
    tuned_configs.clear_cache()
    calls = []
    real_dense = conv_ops.dense_channel_gated_conv2d
    monkeypatch.setattr(conv_ops, "dense_channel_gated_conv2d", lambda *a: calls.append("dense") or real_dense(*a))
    try:
        tuned_configs.write_table(table, str(tmp_path))
        want = reference.channel_sparse_conv2d(x.float(), w.float(), None, og, None, 1, 1, 1).to(dt)
        y = dynkernels.channel_sparse_conv2d(x, w, None, og, None, 1, 1, density=1.0)
        assert calls == ["dense"]
        assert_close(y, want)
        y = dynkernels.channel_sparse_conv2d(x, w, None, og, None, 1, 1, density=0.25)
        assert calls == ["dense"]
        assert_close(y, want)
    finally:
        tuned_configs.clear_cache()
