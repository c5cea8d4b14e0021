"""What the families share: the run configuration, gates of an exact density, dtypes, and
the variants that call a dynkernels op through each of its backends."""
import os
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from ..harness import Unavailable, Variant

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Our backends in the order they appear in tables; "torch" is dynkernels.reference.
OUR_BACKENDS = ("torch", "cpu", "triton", "cuda", "auto")
# How each backend's variant is named in tables and plots.
BACKEND_VARIANT = {"torch": "reference", "cpu": "cpu", "triton": "triton", "cuda": "cuda", "auto": "auto"}
CL, NCHW = "channels_last", "contiguous"


@dataclass(frozen=True)
class RunConfig:
    device: torch.device
    sweep: str = "quick"  # "smoke" (tiny CPU tensors, seconds), "quick" or "full"
    input_sets: int = 3  # input sets each timed call rotates through

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def full(self) -> bool:
        return self.sweep == "full"

    @property
    def smoke(self) -> bool:
        return self.sweep == "smoke"

    @property
    def gpu_targets(self) -> bool:
        """Whether the headline suite runs its GPU configurations (on a GPU; shrunk, in a smoke run)."""
        return self.gpu or self.smoke

    @property
    def cpu_targets(self) -> bool:
        """Whether the headline suite runs its CPU configurations (on the CPU; shrunk, in a smoke run)."""
        return not self.gpu


def cpu_threads(cfg: RunConfig) -> Sequence[int]:
    """The thread counts of the headline's CPU cases (one in a smoke run: on a loaded machine a
    second thread can cost seconds)."""
    return (1,) if cfg.smoke else (1, 2)


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == CL else torch.contiguous_format


def active_count(n: int, density: float) -> int:
    """How many of n positions are active at a density (at least one)."""
    return max(1, min(n, round(density * n)))


def exact_gate(rows: int, cols: int, density: float, device, dtype=torch.float32, generator=None) -> torch.Tensor:
    """[rows, cols] gate with exactly active_count(cols, density) entries > 0 per row, at random
    positions, values in [0.1, 1.1) (a k-winners-take-all gate, as FBS makes)."""
    k = active_count(cols, density)
    scores = torch.rand(rows, cols, generator=generator)
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    keep.scatter_(1, scores.topk(k, dim=1).indices, True)
    values = torch.rand(rows, cols, generator=generator) + 0.1
    return torch.where(keep, values, torch.zeros(())).to(device=device, dtype=dtype)


def sample_gate(n: int, density: float, device, dtype=torch.float32, generator=None) -> torch.Tensor:
    """[n] 0/1 gate with exactly active_count(n, density) ones (a BlockDrop-style keep decision)."""
    return (exact_gate(1, n, density, "cpu", generator=generator)[0] > 0).to(device=device, dtype=dtype)


def resolved(op: str, backend: str, cfg: RunConfig) -> str:
    """The backend to pass for `backend` here; Unavailable if it cannot run. Triton is timed on
    GPUs only (on the CPU it runs in the interpreter, whose timings mean nothing); a smoke run
    runs it there anyway where the interpreter is on, and runs "cuda" variants on the C++ CPU
    kernels, so that the GPU cases' code runs on tiny CPU tensors."""
    from dynkernels.ops._backend import resolve

    if not cfg.gpu and backend == "triton" and not (cfg.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        raise Unavailable("Triton is timed on GPUs only (on the CPU it runs in the interpreter, whose timings mean nothing)")
    if not cfg.gpu and backend == "cuda" and cfg.smoke:
        backend = "cpu"
    try:
        resolve(op, backend, cfg.device)
    except (ValueError, RuntimeError) as e:
        raise Unavailable(str(e)) from e
    return backend


def backend_variants(
    op: str, cfg: RunConfig, make: Callable[[str], Callable], compare_to: str, backends: Sequence[str] = OUR_BACKENDS,
) -> List[Variant]:
    """One variant per dynkernels backend; make(backend) returns the fn(*inputs) to time. A
    backend that cannot run here (not compiled, wrong device) is recorded as skipped."""
    from dynkernels.ops._backend import resolve

    variants = []
    for b in backends:
        label = b
        if b == "auto":
            try:
                label = f"auto->{resolve(op, 'auto', cfg.device)}"
            except (ValueError, RuntimeError):
                pass
        elif b == "cuda" and cfg.smoke and not cfg.gpu:
            label = "cpu (smoke run)"
        name = BACKEND_VARIANT[b]
        variants.append(Variant(name, lambda b=b: make(resolved(op, b, cfg)), backend=label,
                                compare_to=None if name == compare_to else compare_to, capturable=b != "torch"))
    return variants


def nn_modules():
    """dynkernels.nn (imported here: the package does not import it on its own)."""
    import dynkernels.nn

    return dynkernels.nn


def seeded(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(shape, device, dtype, generator: torch.Generator) -> torch.Tensor:
    """Normal random data made on the device itself (generator on that device): made on the
    CPU and copied over, a full sweep's inputs would take longer than timing them."""
    return torch.randn(shape, device=device, dtype=dtype, generator=generator)


def bounded_residual_init(model: torch.nn.Module, generator: torch.Generator, low: float = 0.1, high: float = 0.3) -> None:
    """Draw the last BatchNorm scale of every residual branch (model.blocks: stages of
    branches, as in BlockDrop's ResNets) from [low, high).

    With the release's initialisation (every BN scale 1) each residual block roughly doubles
    the activations' variance, so a randomly initialised ResNet-110 overflows fp16 (54 blocks:
    NaN outputs). A small last scale (as torchvision's zero_init_residual, but not zero, so
    that the branches still change the output) keeps activations bounded, as in a trained net;
    it changes no shape and so no timing.
    """
    with torch.no_grad():
        for stage in getattr(model, "blocks", []):
            for branch in stage if isinstance(stage, torch.nn.ModuleList) else [stage]:
                bns = [m for m in branch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
                if bns:
                    w = bns[-1].weight
                    w.copy_((torch.rand(w.shape, generator=generator) * (high - low) + low).to(w.device, w.dtype))
