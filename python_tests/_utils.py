"""Helpers for the tests: which (device, backend) pairs to run, and tolerances per dtype."""
import importlib.util
import os

import pytest
import torch

import dynkernels

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA_GPU = torch.cuda.is_available()

# Lines that conftest.py prints at the end of the run (what a test found about this machine)
SUMMARY = {}

# Triton on CPU tensors needs the interpreter, which conftest.py switches on only on a machine
# without a GPU (on a GPU machine Triton runs on the CUDA tensors instead).
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)


def triton_devices():
    """pytest params for the device of a Triton test: CPU tensors under the interpreter, CUDA."""
    return [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=pytest.mark.cuda)]


def device_backends(include_torch: bool = True):
    """pytest params (device, backend) for every backend that can run here or on a GPU.

    CUDA pairs carry the `cuda` marker (skipped without a GPU); Triton pairs the `triton`
    marker, and on the CPU they run under TRITON_INTERPRET=1 (set by conftest.py).
    """
    no_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
    no_cuda_kernels = pytest.mark.skipif(
        not dynkernels.cuda_kernels_compiled(), reason="this build has no CUDA kernels"
    )
    params = []
    if include_torch:
        params.append(pytest.param("cpu", "torch", id="cpu-torch"))
    params += [
        pytest.param("cpu", "cpu", id="cpu-cpp"),
        pytest.param("cpu", "triton", id="cpu-triton", marks=[pytest.mark.triton, no_triton, needs_interpreter]),
        pytest.param("cuda", "cuda", id="cuda-cuda", marks=[pytest.mark.cuda, no_cuda_kernels]),
        pytest.param("cuda", "triton", id="cuda-triton", marks=[pytest.mark.cuda, pytest.mark.triton, no_triton]),
    ]
    if include_torch:
        params.append(pytest.param("cuda", "torch", id="cuda-torch", marks=pytest.mark.cuda))
    return params


def dtypes_for(device: str, backend: str):
    """Floating dtypes a backend is tested in here. The Triton interpreter mishandles bf16
    arithmetic, so bf16 runs through Triton on a GPU only."""
    dts = [torch.float32, torch.float16, torch.bfloat16]
    if device == "cpu" and backend == "triton":
        dts.remove(torch.bfloat16)
    return dts


# Relative tolerances (max |a - b| / max |b|): fp32 1e-5; fp16/bf16 about twice PyTorch's own
# rounding error in that dtype (one ulp at the result's scale) plus a small floor.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2 * 2**-10 + 1e-3, torch.bfloat16: 2 * 2**-7 + 4e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, rtol=None):
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any() or torch.isnan(e).any(), "NaN in result"
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    tol = (rtol if rtol is not None else RTOL[dtype]) * max(scale, 1e-6)
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g} (scale {scale:.3g}, dtype {dtype})"


def assert_all_close(actual, expected, rtol=None):
    """assert_close for each pair of two equally long sequences of tensors."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, rtol=rtol)


def tame_bn(model):
    """BatchNorm statistics that keep a random-init network's activations O(1), so that
    comparisons of its outputs are not dominated by a few exploding values; eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(2.0, 4.0)
            if m.weight is not None:  # (FBS's BatchNorm has no affine parameters)
                m.weight.data.uniform_(0.3, 0.6)
    return model.eval()


def both_executions(model, fn, seed=None):
    """(fn() with model.execution = "sparse", then with "masked"), each run after
    torch.manual_seed(seed) if a seed is given (gates that draw random numbers)."""
    out = {}
    for execution in ("sparse", "masked"):
        model.execution = execution
        if seed is not None:
            torch.manual_seed(seed)
        out[execution] = fn()
    return out["sparse"], out["masked"]


def frozen_bn(model):
    """Training mode, except BatchNorm in eval mode: in training mode a gated block's
    BatchNorm takes its statistics over the samples it runs on, which differ by execution."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def loss_grads(model, x, loss):
    """(model(x), [grad of x] + the grad of every parameter, zeros where none) of loss(model(x))."""
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = model(xi)
    loss(out).backward()
    return out, [xi.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def bn_keys(keys: dict, name: str, c: int, legacy: bool = False):
    """Add a BatchNorm's state-dict entries (name -> shape) for c channels to keys; legacy:
    as PyTorch 0.3 saved them, without num_batches_tracked."""
    for item in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{item}"] = (c,)
    if not legacy:
        keys[f"{name}.num_batches_tracked"] = ()


def state_shapes(make) -> dict:
    """{name: shape} of the state dict of the model make() builds, built on the meta device
    (shapes only: no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = make()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def assert_loads(model, state: dict):
    """model.load_state_dict(state) (strict) takes every value of state."""
    model.load_state_dict(state)
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def random_state(keys: dict) -> dict:
    """A state dict with random values for keys (name -> shape)."""
    return {
        k: torch.randint(0, 100, s) if k.endswith("num_batches_tracked") else torch.randn(s).abs() + 0.1
        for k, s in keys.items()
    }


def rand_gate(shape, density: float, device="cpu", dtype=torch.float32):
    """A gate whose entries are > 0 with probability `density` (values in (0.1, 1.1])."""
    keep = torch.rand(shape, device=device) < density
    vals = torch.rand(shape, device=device) + 0.1
    return torch.where(keep, vals, torch.zeros((), device=device)).to(dtype)


# On the H100 test machine (torch 2.11+cu130, nvcc 13.0) an error thrown by a TORCH_CHECK inside
# our nvcc-compiled code crashed the process (SIGSEGV) instead of raising, while the same checks
# raise normally from the C++ CPU kernels. The public Python API checks every argument before a
# kernel runs, so only direct torch.ops calls with bad arguments reach those checks. Tests that
# make such calls on CUDA are skipped unless DYNKERNELS_TEST_CUDA_THROWS=1 (to re-check a fix).
skip_cuda_throws = pytest.mark.skipif(
    os.environ.get("DYNKERNELS_TEST_CUDA_THROWS") != "1",
    reason="a TORCH_CHECK thrown from the CUDA extension crashed the process on the H100 test machine "
    "(README: Known issues); set DYNKERNELS_TEST_CUDA_THROWS=1 to run it",
)


def count_compacts(monkeypatch) -> list:
    """Record the gate shape of every compact that the modules (SkipBlock, SkipPlan, the models)
    make through their resolved kernels; returns the list the shapes are appended to."""
    from dynkernels.ops import sample_gating

    calls = []
    real = sample_gating.resolved_kernels

    def resolved_kernels(*args):
        k = real(*args)

        def compact(gate, threshold):
            calls.append(tuple(gate.shape))
            return k.compact(gate, threshold)

        return k._replace(compact=compact)

    monkeypatch.setattr(sample_gating, "resolved_kernels", resolved_kernels)
    return calls
