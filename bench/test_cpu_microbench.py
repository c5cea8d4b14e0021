"""CPU micro-benchmarks as a pytest-benchmark suite (not part of the default test run):

    python -m pytest bench/test_cpu_microbench.py --benchmark-only

Each op is timed through the dynkernels backends that run on the CPU ("torch" is the
reference, "cpu" the C++ kernels) next to its dense PyTorch baseline, in one group per op.
A backend missing from this build is skipped with the reason. Single-threaded: on a shared
machine, multi-threaded timings jump with the scheduler.
"""
import pytest
import torch
import torch.nn.functional as F

import dynkernels
from dynkernels import reference
from dynkernels.bench.families._common import exact_gate, sample_gate, seeded
from dynkernels.bench.families.channel_sparse_conv import naive_channel_sparse_conv2d

torch.set_num_threads(1)
BACKENDS = ["torch", "cpu"]
DENSITY = 0.25


def _run_or_skip(fn):
    """Call fn once; a backend this build lacks is a skip, not a failure."""
    try:
        return fn()
    except NotImplementedError as e:
        pytest.skip(f"not in this build: {e}")


@pytest.fixture(scope="module")
def rows():
    g = seeded(0)
    x = torch.randn(128, 16, 16, 16, generator=g)
    y = torch.randn(128, 16, 16, 16, generator=g)
    gate = sample_gate(128, DENSITY, "cpu", generator=g)
    idx, count = reference.compact(gate)
    return x, y, gate, idx, count


@pytest.fixture(scope="module")
def conv():
    g = seeded(1)
    x = torch.randn(8, 64, 16, 16, generator=g)
    w = torch.randn(64, 64, 3, 3, generator=g) / 24
    return x, w, exact_gate(8, 64, DENSITY, "cpu", generator=g)


@pytest.mark.benchmark(group="compact gate[54x128]")
@pytest.mark.parametrize("backend", BACKENDS)
def test_compact(benchmark, backend):
    gate = exact_gate(54, 128, DENSITY, "cpu", generator=seeded(2))
    _run_or_skip(lambda: dynkernels.compact(gate, backend=backend))
    idx, count = benchmark(dynkernels.compact, gate, backend=backend)
    assert (count == 32).all()


@pytest.mark.benchmark(group="gather_rows x[128x16x16x16] d=0.25")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rows(benchmark, rows, backend):
    x, _, _, idx, count = rows
    _run_or_skip(lambda: dynkernels.gather_rows(x, idx, count, backend=backend))
    out = benchmark(dynkernels.gather_rows, x, idx, count, backend=backend)
    assert torch.equal(out, reference.gather_rows(x, idx, count))


@pytest.mark.benchmark(group="gather_rows x[128x16x16x16] d=0.25")
def test_gather_rows_baseline_copy(benchmark, rows):
    benchmark(rows[0].clone)


@pytest.mark.benchmark(group="scatter_add_rows base[128x16x16x16] d=0.25")
@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_add_rows(benchmark, rows, backend):
    x, y, _, idx, count = rows
    _run_or_skip(lambda: dynkernels.scatter_add_rows(x, y, idx, count, backend=backend))
    out = benchmark(dynkernels.scatter_add_rows, x, y, idx, count, backend=backend)
    torch.testing.assert_close(out, reference.scatter_add_rows(x, y, idx, count))


@pytest.mark.benchmark(group="scatter_add_rows base[128x16x16x16] d=0.25")
def test_scatter_add_rows_baseline_masked(benchmark, rows):
    x, y, gate, _, _ = rows
    benchmark(torch.addcmul, x, gate.view(-1, 1, 1, 1), y)


@pytest.mark.benchmark(group="channel_sparse_conv2d 64->64 3x3 @16 N=8 d=0.25")
@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_sparse_conv2d(benchmark, conv, backend):
    x, w, gate = conv
    _run_or_skip(lambda: dynkernels.channel_sparse_conv2d(x, w, None, gate, padding=1, backend=backend))
    out = benchmark(dynkernels.channel_sparse_conv2d, x, w, None, gate, padding=1, backend=backend)
    torch.testing.assert_close(out, reference.channel_sparse_conv2d(x, w, None, gate, padding=1), rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="channel_sparse_conv2d 64->64 3x3 @16 N=8 d=0.25")
@pytest.mark.parametrize("baseline", ["dense", "masked", "naive"])
def test_channel_sparse_conv2d_baselines(benchmark, conv, baseline):
    x, w, gate = conv
    fns = {
        "dense": lambda: F.conv2d(x, w, None, 1, 1),
        "masked": lambda: F.conv2d(x, w, None, 1, 1) * gate[:, :, None, None],
        "naive": lambda: naive_channel_sparse_conv2d(x, w, gate, None, 1, 1),
    }
    benchmark(fns[baseline])
