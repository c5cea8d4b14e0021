"""What the families share: the run configuration, gates of an exact density, dtypes, and
the variants that call a dynkernels op through each of its backends."""
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from ..harness import Unavailable, Variant
from ..timing import TimingSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Our backends in the order they appear in tables; "torch" is dynkernels.reference.
OUR_BACKENDS = ("torch", "cpu", "triton", "cuda", "auto")
# How each backend's variant is named in tables and plots.
BACKEND_VARIANT = {"torch": "reference", "cpu": "cpu", "triton": "triton", "cuda": "cuda", "auto": "auto"}


@dataclass(frozen=True)
class RunConfig:
    device: torch.device
    full: bool  # --full sweep (the GPU report) rather than --quick
    timing: TimingSettings
    input_sets: int  # input sets each timed call rotates through

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


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


def resolved(op: str, backend: str, device: torch.device) -> str:
    """The backend dynkernels would run for `backend` here; Unavailable if it cannot run."""
    from dynkernels.ops._backend import resolve

    try:
        return resolve(op, backend, device)
    except (ValueError, RuntimeError) as e:
        raise Unavailable(str(e)) from e


def backend_variants(
    op: str, device: torch.device, make: Callable[[str], Callable], compare_to: str,
    backends: Sequence[str] = OUR_BACKENDS,
) -> List[Variant]:
    """One variant per dynkernels backend; make(backend) returns the fn(*inputs) to time.

    A backend that cannot run here (not compiled, wrong device, Triton on the CPU without
    the interpreter, whose timings would mean nothing anyway) is recorded as skipped.
    """
    variants = []
    for b in backends:
        label = b
        if b == "auto":
            try:
                label = f"auto->{resolved(op, 'auto', device)}"
            except Unavailable:
                pass

        def build(b=b):
            if b == "triton" and device.type == "cpu":
                raise Unavailable("Triton is timed on GPUs only (on the CPU it runs in the interpreter, whose timings mean nothing)")
            resolved(op, b, device)
            return make(b)

        name = BACKEND_VARIANT[b]
        variants.append(Variant(name, build, backend=label, compare_to=None if name == compare_to else compare_to))
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
