"""The C++ CPU kernel of channel_sparse_conv2d at the sizes where its micro-kernel's tiling
shows (several row blocks and pixel tiles, partial vectors, each input layout path), on every
instruction set it has, and the rule by which backend="auto" picks dense execution on the CPU."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dynkernels
from dynkernels import reference
from dynkernels.ops import _conv_cpu_auto as auto

from _utils import assert_close, rand_gate

# (N, Cin, Cout, H, W, kernel, stride, padding, dilation): 13 and 61 output channels (row blocks
# of 6 and 5 with remainders), 20x20 = 400 and 9x11 pixels (tiles of 64, partial vectors),
# "same" padding (the row-shift buffer's flat copy), no padding and dilation (its row by row
# copy), 1x1 (x read in place), stride 2 (im2col), 1 output channel, 1 sample; rows of exactly
# one vector (16x16) and a shift past one vector (dilation and padding 17: the copies that are not
# vector windows); 3x3 layers of 512 output pixels and more, which run with the output channels in
# the vector lanes on channels_last input (padded: through a copy of the input; unpadded, with
# dilation: from x itself), with the AVX2 micro-kernel where they have 64 output channels or
# more (70 and 67: the last vector of each row partial), as does a strided one of 306 output pixels;
# one whose contiguous weight the AVX2 kernel copies channels_last first (enough output pixels
# per weight value), in NCHW.
SHAPES = [
    (2, 19, 61, 20, 20, 3, 1, 1, 1),
    (3, 33, 13, 9, 11, 3, 1, 0, 1),
    (2, 17, 22, 12, 13, 3, 1, 2, 2),
    (2, 40, 37, 10, 9, 1, 1, 0, 1),
    (2, 24, 29, 17, 15, 3, 2, 1, 1),
    (1, 18, 1, 8, 21, 5, 1, 2, 1),
    (2, 16, 20, 16, 16, 3, 1, 1, 1),
    (1, 5, 7, 6, 40, 3, 1, 17, 17),
    (2, 19, 21, 24, 23, 3, 1, 1, 1),
    (2, 9, 35, 30, 26, 3, 1, 0, 2),
    (2, 19, 70, 24, 23, 3, 1, 1, 1),
    (2, 9, 67, 30, 26, 3, 1, 0, 2),
    (2, 24, 66, 33, 35, 3, 2, 1, 1),
    (6, 48, 64, 32, 32, 3, 1, 1, 1),
]


def _case_id(s):
    return "n{}_ci{}_co{}_{}x{}_k{}_s{}_p{}_d{}".format(*s)


def _inputs(shape, dtype=torch.float32, in_gate=True, layout="nchw", density=0.6):
    n, cin, cout, h, w, k, s, p, d = shape
    x = torch.randn(n, cin, h, w, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
    bias = torch.randn(cout, dtype=dtype)
    shift = torch.randn(cout, dtype=dtype)
    og = rand_gate((n, cout), density)
    ig = rand_gate((n, cin), density) if in_gate else None
    return x, weight, bias, og, ig, s, p, d, shift


def _expected(x, weight, bias, og, ig, s, p, d, shift):
    f64 = torch.float64
    y = reference.channel_sparse_conv2d(x.to(f64), weight.to(f64), bias.to(f64), og, ig, s, p, d, shift.to(f64))
    return y.to(x.dtype)


def _check_kernel(shape, dtype, in_gate, layout, density=0.6):
    x, w, b, og, ig, s, p, d, shift = _inputs(shape, dtype, in_gate, layout, density)
    y = dynkernels.channel_sparse_conv2d(x, w, b, og, ig, s, p, d, shift=shift, backend="cpu")
    assert_close(y, _expected(x, w, b, og, ig, s, p, d, shift), dtype)
    inactive = (og <= 0)[:, :, None, None].expand_as(y)
    assert (y[inactive] == 0).all() and not torch.signbit(y[inactive]).any(), "inactive channels must be +0"
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("in_gate", [False, True], ids=["out", "in+out"])
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_kernel_tiles_and_layouts(shape, in_gate, layout):
    _check_kernel(shape, torch.float32, in_gate, layout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_dtypes(dtype, layout):
    for shape in (SHAPES[0], SHAPES[4]):
        _check_kernel(shape, dtype, True, layout)


@pytest.mark.parametrize("weight_layout", ["channels_last", "kw-major", "channel-major"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_reads_any_weight_layout(weight_layout, layout):
    """The kernel reads the weight in place through its strides (a channels_last one, as
    model.to(memory_format=torch.channels_last) leaves it, and views of other layouts); a
    channels_last one tap by tap, in float32 and float64."""
    cases = [(shape, torch.float32) for shape in (SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4], SHAPES[-2])]
    for shape, dtype in cases + [(SHAPES[0], torch.float64), (SHAPES[2], torch.float64)]:
        x, w, b, og, ig, s, p, d, shift = _inputs(shape, dtype, True, layout)
        if weight_layout == "channels_last":
            strided = w.contiguous(memory_format=torch.channels_last)
        elif weight_layout == "kw-major":
            strided = w.transpose(2, 3).contiguous().transpose(2, 3)
        else:
            strided = w.transpose(0, 1).contiguous().transpose(0, 1)
        y = dynkernels.channel_sparse_conv2d(x, strided, b, og, ig, s, p, d, shift=shift, backend="cpu")
        assert_close(y, _expected(x, w, b, og, ig, s, p, d, shift))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("in_gate", [False, True], ids=["out", "in+out"])
def test_kernel_every_channel_active(in_gate, layout):
    """Every gate active: the weights used as they are and the results written into y directly."""
    for shape in (SHAPES[0], SHAPES[4], SHAPES[-3], SHAPES[-2], SHAPES[-1]):
        _check_kernel(shape, torch.float32, in_gate, layout, density=1.0)


def test_one_sample_split_among_threads():
    """With fewer samples than threads each sample's output channels are split among them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for layout in ("nchw", "channels_last"):
            for shape in (SHAPES[0], SHAPES[4], SHAPES[-3]):
                _check_kernel((1,) + shape[1:], torch.float32, True, layout)
    finally:
        torch.set_num_threads(threads)


def test_isa_follows_torch_cpu_capability():
    """The micro-kernel is the widest torch itself uses here (torch.backends.cpu.get_cpu_capability)."""
    if dynkernels._extension._C is None:
        pytest.skip("loaded from a CMake library, not dynkernels._C")
    want = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "portable")
    assert dynkernels._extension._C.cpu_conv_isa() == want


_ISA_SCRIPT = """
import sys, torch, dynkernels
sys.path.insert(0, {tests!r})
import test_channel_sparse_conv2d_cpu as t
assert dynkernels._extension._C.cpu_conv_isa() == {isa!r}, dynkernels._extension._C.cpu_conv_isa()
for shape in t.SHAPES:
    for layout in ("nchw", "channels_last"):
        t._check_kernel(shape, torch.float32, True, layout)
        t._check_kernel(shape, torch.float32, False, layout)
t._check_kernel(t.SHAPES[0], torch.float64, True, "nchw")
t._check_kernel(t.SHAPES[4], torch.float64, False, "channels_last")
print("ok")
"""


@pytest.mark.parametrize("capability,isa", [("avx2", "avx2"), ("default", "portable")])
def test_narrower_instruction_sets(capability, isa):
    """The AVX2 and portable micro-kernels, picked as on a CPU without AVX-512 / AVX2 by lowering
    torch's CPU capability (ATEN_CPU_CAPABILITY) in a fresh process."""
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    if dynkernels._extension._C is None:
        pytest.skip("loaded from a CMake library, not dynkernels._C")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    script = _ISA_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), isa=isa)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# ----------------------------------------------------------------------------- backend="auto" on CPU
def test_rule_thresholds(monkeypatch):
    """Dense from the measured crossover up, lower for channels_last and strided convs, lower
    still where a sample's output pixels fill the kernel's vectors poorly."""
    px = 16 * 16
    for cl, strided in auto.CPU_DENSE_FROM:
        t = auto.CPU_DENSE_FROM[(cl, strided)]
        assert not auto.cpu_prefers_dense(t - 0.01, cl, strided, px)
        assert auto.cpu_prefers_dense(t, cl, strided, px) and auto.cpu_prefers_dense(1.0, cl, strided, px)
    assert not auto.cpu_prefers_dense(0.5, False, False, px) and not auto.cpu_prefers_dense(0.5, True, False, px)
    assert auto.cpu_prefers_dense(0.75, True, False, px) and not auto.cpu_prefers_dense(0.75, False, False, px)
    # 7x7 outputs fill 49 of the AVX-512 kernel's 64 lanes (of the AVX2 one's 56): the
    # crossover falls by that factor
    for isa, lanes in (("AVX512", 64), ("AVX2", 56)):
        monkeypatch.setattr(auto, "_KERNEL_ISA", isa)
        assert auto.cpu_dense_threshold(False, False, 49) == pytest.approx(auto.CPU_DENSE_FROM[(False, False)] * 49 / lanes)
    monkeypatch.setattr(auto, "_KERNEL_ISA", "AVX512")
    assert auto.cpu_prefers_dense(0.7, False, False, 49) and not auto.cpu_prefers_dense(0.7, False, False, 196)


def test_rule_thresholds_per_cpu(monkeypatch):
    """A CPU of CPU_DENSE_FROM_ON (matched in its model name) takes its own crossovers where it
    has them and CPU_DENSE_FROM's elsewhere; any other CPU takes CPU_DENSE_FROM's."""
    px = 16 * 16
    monkeypatch.setattr(auto, "_KERNEL_ISA", "AVX512")  # (the vector fill of 7x7 outputs below)
    assert auto.CPU_DENSE_FROM_ON["Zen 5"] == {(True, False): 0.82}
    zen5, zen4 = "AMD EPYC (Zen 5, family 26 model 2)", "AMD EPYC (Zen 4, family 25 model 17)"
    assert auto.cpu_dense_threshold(True, False, px, zen5) == pytest.approx(0.82)
    assert auto.cpu_dense_threshold(True, False, 49, zen5) == pytest.approx(0.82 * 49 / 64)
    assert not auto.cpu_prefers_dense(0.8, True, False, px, zen5) and auto.cpu_prefers_dense(0.8, True, False, px, zen4)
    for key, t in auto.CPU_DENSE_FROM.items():
        assert auto.cpu_dense_threshold(*key, px, zen4) == auto.cpu_dense_threshold(*key, px) == t
        if key != (True, False):
            assert auto.cpu_dense_threshold(*key, px, zen5) == t
    # Zen 2: both stride-1 crossovers of its own, the strided ones CPU_DENSE_FROM's
    zen2 = "AMD EPYC (Zen 2, family 23 model 49)"
    assert auto.CPU_DENSE_FROM_ON["Zen 2"] == {(False, False): 0.64, (True, False): 0.58}
    assert auto.cpu_prefers_dense(0.7, False, False, px, zen2) and not auto.cpu_prefers_dense(0.7, False, False, px, zen4)
    assert auto.cpu_prefers_dense(0.6, True, False, px, zen2) and not auto.cpu_prefers_dense(0.6, True, False, px, zen4)
    assert not auto.cpu_prefers_dense(0.5, True, False, px, zen2)
    for key in ((False, True), (True, True)):
        assert auto.cpu_dense_threshold(*key, px, zen2) == auto.CPU_DENSE_FROM[key]


def test_rule_lane_density_where_channels_fill_the_lanes(monkeypatch):
    """On a CPU of CPU_LANES_DENSE_FROM_ON, a stride-1 channels_last layer whose output channels
    the kernel puts in its vector lanes (AVX-512, 3x3, 512 output pixels and more) runs dense
    execution from that CPU's lane density up (a density hint stands for it); its other layers,
    and every layer elsewhere or without AVX-512, follow the FLOP density rule."""
    assert auto.CPU_LANES_DENSE_FROM_ON == {"Zen 5": 0.88}
    w3, w1 = torch.empty(128, 128, 3, 3), torch.empty(128, 128, 1, 1)
    # the layers pixel_rows_apply (csrc/cpu/channel_sparse_conv2d_cpu.cpp) gives that orientation
    monkeypatch.setattr(auto, "_KERNEL_ISA", "AVX2")
    assert auto.kernel_lanes_over_channels(True, False, w3.shape, 28 * 28)
    assert auto.kernel_lanes_over_channels(True, True, w1.shape, 16 * 16)
    for args in ((True, True, w1.shape, 8 * 8), (True, False, (32, 32, 3, 3), 32 * 32), (True, False, w3.shape, 16 * 16),
                 (False, False, w3.shape, 28 * 28)):
        assert not auto.kernel_lanes_over_channels(*args)
    monkeypatch.setattr(auto, "_KERNEL_ISA", "DEFAULT")  # portable code: no compress and expand
    assert not auto.kernel_lanes_over_channels(True, False, w3.shape, 28 * 28)
    monkeypatch.setattr(auto, "_KERNEL_ISA", "AVX512")
    assert auto.kernel_lanes_over_channels(True, False, w3.shape, 28 * 28)
    assert auto.kernel_lanes_over_channels(True, True, w1.shape, 7 * 7)
    assert auto.kernel_lanes_over_channels(True, False, (32, 32, 3, 3), 32 * 32)
    for args in ((False, False, w3.shape, 28 * 28), (True, False, w3.shape, 16 * 16), (True, False, w1.shape, 28 * 28),
                 (True, False, (1, 128, 3, 3), 28 * 28)):
        assert not auto.kernel_lanes_over_channels(*args)
    zen5 = "AMD EPYC (Zen 5, family 26 model 2)"
    for model, lanes_rule in ((zen5, True), ("AMD EPYC (Zen 4, family 25 model 17)", False)):
        monkeypatch.setattr(auto, "cpu_info", lambda model=model: {"model": model})
        # FLOP density 0.8, its lanes 0.875 (112 of 128 channels) or 1.0
        assert auto.cpu_rule(True, False, 8, w3, 28 * 28, 0.8, 0.875) is not lanes_rule
        assert auto.cpu_rule(True, False, 8, w3, 28 * 28, 0.8, 1.0)
        assert auto.cpu_rule(True, False, 8, w3, 28 * 28, 0.87) is not lanes_rule  # a hint: no lane density
        assert auto.cpu_rule(True, False, 32, w3, 16 * 16, 0.85, 0.875)  # output pixels in the lanes
    monkeypatch.setattr(auto, "cpu_info", lambda: {"model": zen5})
    monkeypatch.setattr(auto, "_KERNEL_ISA", "AVX2")  # the lane crossovers are the AVX-512 kernel's
    assert not auto.cpu_rule(True, False, 8, w3, 28 * 28, 0.8, 1.0) and auto.cpu_rule(True, False, 8, w3, 28 * 28, 0.85, 0.875)


def test_lane_density_read_from_gates():
    """Active output channels rounded up to whole vectors of 16, per sample, times its active inputs."""
    og = torch.zeros(3, 40)
    og[0, :17], og[1, :16], og[2, :40] = 1.0, 0.5, 2.0  # 32, 16 and 48 lanes of 48
    assert auto.cpu_lane_density(og) == pytest.approx((32 + 16 + 48) / (3 * 48))
    ig = torch.zeros(3, 5)
    ig[0, :5], ig[1, :1], ig[2, :2] = 1.0, 1.0, 1.0
    assert auto.cpu_lane_density(og, ig) == pytest.approx((32 * 5 + 16 * 1 + 48 * 2) / (3 * 48 * 5))
    assert auto.cpu_lane_density(og > 0, ig.half()) == pytest.approx(auto.cpu_lane_density(og, ig))


def test_rule_reads_the_cpu_model(monkeypatch):
    """cpu_rule, the rule backend="auto" runs, takes the crossover of the CPU at hand."""
    weight = torch.empty(128, 128, 3, 3)
    for model, dense_at_08 in (("AMD EPYC (Zen 5, family 26 model 2)", False), ("Some CPU", True)):
        monkeypatch.setattr(auto, "cpu_info", lambda model=model: {"model": model})
        assert auto.cpu_rule(True, False, 32, weight, 16 * 16, 0.8) is dense_at_08
        assert auto.cpu_rule(True, False, 32, weight, 16 * 16, 0.85)


def test_rule_kernel_wins_dense(monkeypatch):
    """The layers where auto keeps the kernel at every density: NCHW, stride 1, a small
    reduction, 16x16 outputs or more and a batch of 8 or more, on the CPUs where that was
    measured (an Intel Xeon, AMD EPYCs with Zen 4 and Zen 5 cores), never elsewhere; and
    use_dense_on_cpu follows it."""
    xeon, epyc = "Intel(R) Xeon(R) Processor", "AMD EPYC 7B13 (Zen 3, family 25 model 1)"
    zen4, zen5 = "AMD EPYC 9B14 (Zen 4, family 25 model 17)", "AMD EPYC (Zen 5, family 26 model 2)"
    for cpu in (xeon, zen4, zen5):
        assert auto.cpu_kernel_wins_dense(cpu, False, False, 32, 128 * 9, 256)
        assert auto.cpu_kernel_wins_dense(cpu, False, False, 8, 64, 32 * 32)
    assert not auto.cpu_kernel_wins_dense(epyc, False, False, 32, 128 * 9, 256)
    assert not auto.cpu_kernel_wins_dense("AMD EPYC 9B14", False, False, 32, 128 * 9, 256)
    assert not auto.cpu_kernel_wins_dense("Neoverse-V2", False, False, 32, 128 * 9, 256)
    for cl, strided, n, depth, px in [(True, False, 32, 1152, 256), (False, True, 32, 1152, 256),
                                      (False, False, 4, 1152, 256), (False, False, 32, 256 * 9, 256),
                                      (False, False, 32, 1152, 14 * 14)]:
        assert not auto.cpu_kernel_wins_dense(xeon, cl, strided, n, depth, px)
    x, w, ones = torch.randn(8, 16, 16, 16), torch.randn(16, 16, 3, 3), torch.ones(8, 16)
    for model, dense in ((xeon, False), (epyc, True)):
        monkeypatch.setattr(auto, "cpu_info", lambda: {"model": model, "isa": [], "logical_cpus": 2})
        assert auto.use_dense_on_cpu(x, w, ones, None, (1, 1), (16, 16)) is dense
        assert auto.use_dense_on_cpu(x.contiguous(memory_format=torch.channels_last), w, ones, None, (1, 1), (16, 16))


def test_rule_small_batches(monkeypatch):
    """Batches of one or two, NCHW, on Zen 5 only (strided layers up to 8x8 outputs): the kernel
    at any density from 4 output pixels (one sample) or 16 (two), two samples of 4 - 15 pixels
    from density 0.8 on (the vector fill not counted); everything else the general rule."""
    xeon, epyc = "Intel(R) Xeon(R) Processor", "AMD EPYC 7B13 (Zen 3, family 25 model 1)"
    zen4, zen5 = "AMD EPYC 9B14 (Zen 4, family 25 model 17)", "AMD EPYC (Zen 5, family 26 model 2)"
    for n, px in ((1, 4), (1, 7 * 7), (2, 4 * 4), (2, 56 * 56)):
        assert auto.small_batch_crossover(zen5, False, False, n, px) == math.inf
    for n, px in ((1, 4), (1, 8 * 8), (2, 4 * 4), (2, 8 * 8)):
        assert auto.small_batch_crossover(zen5, False, True, n, px) == math.inf
    for strided in (False, True):
        assert auto.small_batch_crossover(zen5, False, strided, 2, 4) == auto.small_batch_crossover(zen5, False, strided, 2, 15) == 0.8
    for cpu in (xeon, zen4, epyc):
        assert auto.small_batch_crossover(cpu, False, False, 1, 7 * 7) is None
    for cl, strided, n, px in [(True, False, 1, 7 * 7), (True, True, 1, 7 * 7), (False, True, 1, 9 * 9), (False, True, 2, 14 * 14),
                               (False, False, 1, 1), (False, False, 2, 1), (False, False, 3, 7 * 7), (False, False, 4, 7 * 7)]:
        assert auto.small_batch_crossover(zen5, cl, strided, n, px) is None
    w = torch.empty(512, 512, 3, 3)
    for model, kernel_at_1 in ((zen5, True), (zen4, False)):
        monkeypatch.setattr(auto, "cpu_info", lambda model=model: {"model": model})
        assert auto.cpu_rule(False, False, 1, w, 7 * 7, 1.0) is not kernel_at_1
        assert auto.cpu_rule(False, False, 2, w, 4 * 4, 1.0) is not kernel_at_1
        assert auto.cpu_rule(True, False, 1, w, 7 * 7, 1.0)  # channels_last: the general rule
    monkeypatch.setattr(auto, "cpu_info", lambda: {"model": zen5})
    monkeypatch.setattr(auto, "_KERNEL_ISA", "AVX512")  # (vectors of 16 for the fill below)
    assert not auto.cpu_rule(False, False, 2, w, 2 * 2, 0.79) and auto.cpu_rule(False, False, 2, w, 2 * 2, 0.8)
    assert auto.cpu_rule(False, False, 8, w, 2 * 2, 0.3)  # batch 8: the crossover times the vector fill, 0.85 x 4 / 16
    reads = []
    assert not auto.cpu_rule(False, False, 1, w, 7 * 7, lambda below: reads.append(below) or 1.0) and not reads


def test_flop_density_read_from_gates():
    og = rand_gate((5, 7), 0.6)
    ig = rand_gate((5, 3), 0.5)
    want = float(((og > 0).sum(1) * (ig > 0).sum(1)).sum()) / (5 * 7 * 3)
    assert auto.cpu_flop_density(og, ig) == pytest.approx(want)
    assert auto.cpu_flop_density(og) == pytest.approx(float((og > 0).float().mean()))
    for dtype in (torch.bfloat16, torch.float16, torch.bool):
        assert auto.cpu_flop_density(og.to(dtype), ig.to(dtype)) == pytest.approx(want)
    # below the threshold on the output gate alone, in_gate is not read
    assert auto.cpu_flop_density(og, ig, below=1.0) == pytest.approx(float((og > 0).float().mean()))


def test_gate_summary():
    """(entries > 0, min, max) of a gate: the C++ pass for contiguous float32 gates, numpy for
    the others, the same answers (NaN in min and max where a gate is NaN; -0 not active)."""
    torch.manual_seed(0)
    g = torch.randn(6, 9)
    g[1, 2], g[3, 3] = -0.0, 0.0
    cases = [g, g.abs() + 0.5, torch.ones(2, 3), g.t(), g.half(), g > 0, torch.full((1, 1), -2.0)]
    for gate in cases:
        active, lo, hi = auto._gate_summary(gate)
        assert active == int((gate > 0).sum())
        assert float(lo) == float(gate.min()) and float(hi) == float(gate.max())
    nan = g.clone()
    nan[4, 4] = float("nan")
    active, lo, hi = auto._gate_summary(nan)
    assert active == int((nan > 0).sum()) and math.isnan(lo) and math.isnan(hi)
    if auto._GATE_SUMMARY is not None:  # the C++ pass takes exactly the contiguous float32 gates
        assert auto._GATE_SUMMARY(g) is not NotImplemented and auto._GATE_SUMMARY(g.t()) is NotImplemented
        assert auto._GATE_SUMMARY(g.half()) is NotImplemented and auto._GATE_SUMMARY(g[:0]) is NotImplemented


def op_module():
    """The module of channel_sparse_conv2d (the package exports the function under its name)."""
    return sys.modules["dynkernels.ops.channel_sparse_conv2d"]


def test_auto_decision(monkeypatch):
    """auto takes the dense path exactly where the rule says so, from the densities of the
    gates themselves (a density hint does not change it on CPU tensors); float32 only."""
    calls = []
    real = auto.dense_then_gate
    counted = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(op_module(), "dense_then_gate", counted)  # (the Python path)
    monkeypatch.setattr(auto, "dense_then_gate", counted)  # (after the C++ read of the inputs)
    monkeypatch.setattr(auto, "cpu_info", lambda: {"model": "Some CPU"})  # the crossover table alone decides
    x, w, b, og, ig, s, p, d, shift = _inputs(SHAPES[0], in_gate=False)
    ones = torch.ones_like(og)

    def runs_dense(gate, xx=x, **kw):
        calls.clear()
        y = dynkernels.channel_sparse_conv2d(xx, w.to(xx.dtype), b.to(xx.dtype), gate, None, s, p, d, **kw)
        assert_close(y, _expected(xx, w.to(xx.dtype), b.to(xx.dtype), gate, None, s, p, d, torch.zeros_like(b).to(xx.dtype)))
        return bool(calls)

    assert runs_dense(ones) and not runs_dense(og)  # density 1 / 0.6
    assert not runs_dense(og, density=1.0) and runs_dense(ones, density=0.5)  # the gates decide, not a hint
    assert not runs_dense(ones, backend="cpu")  # backend="cpu" is the kernel
    assert not runs_dense(ones, xx=x.double())
    assert runs_dense(ones, xx=x.contiguous(memory_format=torch.channels_last))


def _auto_inputs():
    if op_module()._CPU_AUTO_INPUTS is None:
        pytest.skip("the extension's Python module (dynkernels._C) is not built")
    return op_module()._CPU_AUTO_INPUTS


def test_auto_inputs_read_what_the_python_path_reads():
    """conv_auto_inputs (backend="auto"'s read of a plain float32 CPU call): the layout, the
    argument pairs, the output size, the FLOP density, out_gate's range and whether every
    input is active, as the Python path computes them; NotImplemented for any call it does
    not cover (other dtypes, a gradient needed, autocast, other argument kinds, bad
    arguments: then the Python path's checks name them)."""
    read = _auto_inputs()
    x, w, b, og, ig, s, p, d, shift = _inputs(SHAPES[4], density=0.6)
    og[0, 0] = float("nan")
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        for in_gate in (None, ig, torch.ones_like(ig)):
            cl, stride, padding, dilation, out_hw, density, lanes, lo, hi, every = read(xx, w, b, og, in_gate, s, [p, p], (d, d),
                                                                                      shift)
            assert cl == (xx is not x) and (stride, padding, dilation) == ((s, s), (p, p), (d, d))
            assert out_hw == tuple(F.conv2d(xx, w, None, s, p, d).shape[2:])
            assert density == pytest.approx(auto.cpu_flop_density(og, in_gate))
            assert lanes == pytest.approx(auto.cpu_lane_density(og, in_gate))
            assert math.isnan(lo) and math.isnan(hi) and every == (in_gate is None or bool((in_gate > 0).all()))
    good = (x, w, b, og, ig, s, p, d, shift)
    declined = [
        (x.double(), w.double(), b.double(), og, ig, s, p, d, shift.double()), (x, w, b, og.double(), ig, s, p, d, shift),
        (x, w, b, og > 0, ig, s, p, d, shift), (x, w, b, og.t().contiguous().t(), ig, s, p, d, shift),
        (x, w, b, og[:, :0], ig, s, p, d, shift), (x, w, b[:3], og, ig, s, p, d, shift), (x, w[:, :3], b, og, ig, s, p, d, shift),
        (x, w, b, og, ig, True, p, d, shift), (x, w, b, og, ig, (s, s, s), p, d, shift), (x, w, b, og, ig, 0, p, d, shift),
        (x, w, b, og, ig, s, -1, d, shift), (x, w, b, og, ig, s, p, 40, shift), (x[0], w, b, og, ig, s, p, d, shift),
        (x, w, b, og, ig.double(), s, p, d, shift), (x.detach().requires_grad_(), w, b, og, ig, s, p, d, shift),
    ]
    assert read(*good) is not NotImplemented
    for args in declined:
        assert read(*args) is NotImplemented
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert read(*good) is NotImplemented


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[5]], ids=_case_id)
def test_auto_after_the_cpp_read_matches_the_python_path(shape, layout, monkeypatch):
    """backend="auto" through conv_auto_inputs gives bitwise what the Python path gives, on the
    kernel and on dense execution, with and without input gating, shift and a density hint."""
    read = _auto_inputs()
    x, w, b, og, ig, s, p, d, shift = _inputs(shape, layout=layout, density=0.6)
    calls, reads, check = [], [], op_module().check_args
    monkeypatch.setattr(op_module(), "_CPU_AUTO_INPUTS", lambda *a: reads.append(read(*a)) or reads[-1])
    for gate in (og, torch.rand_like(og) + 0.1):
        for in_gate, t, hint in ((None, None, None), (ig, shift, None), (torch.ones_like(ig), shift, None),
                                 (None, shift, 1.0), (ig, None, 0.2)):
            fast = dynkernels.channel_sparse_conv2d(x, w, b, gate, in_gate, s, p, d, shift=t, density=hint)
            assert reads.pop() is not NotImplemented
            with monkeypatch.context() as m:
                m.setattr(op_module(), "_CPU_AUTO_INPUTS", None)
                m.setattr(op_module(), "check_args", lambda *a: calls.append(1) or check(*a))
                slow = dynkernels.channel_sparse_conv2d(x, w, b, gate, in_gate, s, p, d, shift=t, density=hint)
            assert torch.equal(fast, slow) and fast.stride() == slow.stride()
    assert calls  # (the Python path did run)



@pytest.mark.parametrize("gate_pass", ["cpp", "torch"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=_case_id)
def test_dense_execution_matches_reference(shape, layout, gate_pass, monkeypatch):
    """The dense path: same values, exact +0 on inactive channels (also where the conv is
    infinite, and where a gate is negative, -0 or NaN), channels_last out for channels_last in;
    its gate pass in C++ (where the extension has it) or in torch ops."""
    if gate_pass == "torch":
        monkeypatch.setattr(auto, "_GATE_SCALE", None)
    elif auto._GATE_SCALE is None:
        pytest.skip("the extension's Python module (dynkernels._C) is not built")
    x, w, b, og, ig, s, p, d, shift = _inputs(shape, layout=layout, density=0.9)
    odd = og.clone()
    odd[0, :3] = torch.tensor([-0.5, -0.0, float("nan")])
    for args in ((og, ig, shift), (og, None, None), (odd, None, shift), (torch.ones_like(og), None, None),
                 (torch.rand_like(og) + 0.1, ig, shift)):
        gate, in_gate, t = args
        y = auto.dense_then_gate(x, w, b, gate, in_gate, (s, s), (p, p), (d, d), t)
        want = _expected(x, w, b, gate, in_gate, s, p, d, torch.zeros_like(b) if t is None else t)
        assert_close(y, want)
        inactive = ~(gate > 0)[:, :, None, None].expand_as(y)
        assert (y[inactive] == 0).all() and not torch.signbit(y[inactive]).any()
        assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    x_inf = x.clone()
    x_inf[0, 0, 0, 0] = float("inf")
    y = auto.dense_then_gate(x_inf, w, b.abs() + 1, og, None, (s, s), (p, p), (d, d), None)
    assert (y[(og <= 0)[:, :, None, None].expand_as(y)] == 0).all()


def test_gate_scale_takes_only_what_it_computes():
    """dynkernels._C.cpu_first.gate_scale_: float32 CPU outputs (contiguous or channels_last)
    with gates [N, C] and shift [C] of float32; NotImplemented for anything else and where
    autograd records; the torch ops' values where it runs."""
    if auto._GATE_SCALE is None:
        pytest.skip("the extension's Python module (dynkernels._C) is not built")
    torch.manual_seed(3)
    y, g, t = torch.randn(3, 5, 4, 6), torch.randn(3, 5), torch.randn(5)
    g[1, 1] = float("nan")
    for yy in (y, y.contiguous(memory_format=torch.channels_last)):
        for shift in (None, t):
            out = yy.clone()
            assert auto._GATE_SCALE(out, g, shift) is None
            want = torch.where((g > 0)[:, :, None, None], yy * g[:, :, None, None] + (0 if shift is None else shift[:, None, None]),
                               torch.zeros(()))
            assert_close(out, want, rtol=1e-6)
            assert not torch.signbit(out[~(g > 0)[:, :, None, None].expand_as(out)]).any()
    for args in ((y.double(), g, None), (y, g.double(), None), (y, g[:, :4], None), (y, g, t[:4]), (y, g.t().contiguous().t(), None),
                 (y[:, :, :, ::2], g, None), (y[0], g, None), (y.requires_grad_(), g, None)):
        assert auto._GATE_SCALE(*args) is NotImplemented


@pytest.mark.parametrize("gates", ["some off", "all on"])
def test_dense_execution_gradients(gates):
    """Through the dense path, the gradients of the reference (x, weight, bias, gate, shift)."""
    x, w, b, og, ig, s, p, d, shift = _inputs(SHAPES[1], density=0.9 if gates == "some off" else 1.0)
    grad_y, results = None, []
    for fn in (lambda *a: auto.dense_then_gate(*a[:5], (s, s), (p, p), (d, d), a[5]),
               lambda *a: reference.channel_sparse_conv2d(*a[:5], s, p, d, a[5])):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, og)]
        t = shift.detach().clone().requires_grad_(True)
        y = fn(*leaves, ig, t)
        grad_y = torch.randn_like(y) if grad_y is None else grad_y
        y.backward(grad_y)
        results.append([v.grad for v in leaves + [t]])
    for got, want in zip(*results):
        assert_close(got, want, rtol=1e-4)


def test_cpu_first_conv_call():
    """dynkernels._C.cpu_first.channel_sparse_conv2d: the op's result, through the dispatcher
    (the profiler sees it); NotImplemented for what the public op must send through torch.ops
    (a gradient needed, a tensor subclass or off the CPU, arguments of other types), which then
    still gives gradients."""
    conv = dynkernels._extension._C.cpu_first.channel_sparse_conv2d
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 6, 6), torch.randn(4, 5, 3, 3), torch.randn(4)
    og, ig = rand_gate((2, 4), 0.5), rand_gate((2, 5), 0.6)
    want = reference.channel_sparse_conv2d(x, w, b, og, ig, 1, 1, 1)
    assert_close(conv(x, w, b, og, ig, [1, 1], [1, 1], [1, 1], None, -1), want)
    with torch.profiler.profile() as prof:
        conv(x, w, None, og, None, (1, 1), (0, 0), (1, 1), None, -1)
    assert "dynkernels::channel_sparse_conv2d" in {e.name for e in prof.events()}

    class Sub(torch.Tensor):
        pass

    leaf = x.clone().requires_grad_()
    declined = [(leaf, w, b, og, ig, [1, 1], [1, 1], [1, 1], None, -1),
                (x.as_subclass(Sub), w, b, og, ig, [1, 1], [1, 1], [1, 1], None, -1),
                (x.to("meta"), w, b, og, ig, [1, 1], [1, 1], [1, 1], None, -1),
                (x, w, 0.5, og, ig, [1, 1], [1, 1], [1, 1], None, -1),
                (x, w, b, og, ig, [1, 1.0], [1, 1], [1, 1], None, -1),
                (x, w, b, og, ig, 1, [1, 1], [1, 1], None, -1),
                (x, w, b, og, ig, [1, 1], [1, 1], [1, 1], None, True)]
    for args in declined:
        assert conv(*args) is NotImplemented
    with pytest.raises(TypeError, match="takes 10 arguments"):
        conv(x, w, b, og)
    with pytest.raises(RuntimeError, match="out_gate must be"):
        conv(x, w, b, og[:1], ig, [1, 1], [1, 1], [1, 1], None, -1)
    with torch.no_grad():
        assert_close(conv(leaf, w, b, og, ig, [1, 1], [1, 1], [1, 1], None, -1), want)
    y = dynkernels.channel_sparse_conv2d(leaf, w, b, og, ig, 1, 1, backend="cpu")
    y.sum().backward()
    ref_leaf = x.clone().requires_grad_()
    reference.channel_sparse_conv2d(ref_leaf, w, b, og, ig, 1, 1, 1).sum().backward()
    assert_close(leaf.grad, ref_leaf.grad)
