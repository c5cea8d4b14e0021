"""End-to-end models: BlockDrop ResNet-110 (CIFAR) and ResNet-101 (ImageNet) with a random
policy of density d (each sample keeps each block with probability d), run dense (policy
None), masked (the paper's code: dense compute times the policy) and sparse (our kernels,
per backend). The ideal speedup is dense FLOPs / policy FLOPs from the model's own flops().
The BlockDrop models get a small last BN scale in every residual branch
(_common.bounded_residual_init), so that their activations stay finite in fp16.
FBS ResNet-18, LC-Net ResNet-50 and SkipNet ResNet-110 are covered when dynkernels.models.fbs /
.lcnet / .skipnet exist (each against its own masked execution; SkipNet in float32: its untrained
activations overflow fp16, and its gates are calibrated to the density on a fixed batch).
"""
import importlib
import inspect
from typing import Dict, List

import torch

from ..harness import RTOL, Case, Setup, Unavailable, Variant
from ._common import DTYPES, OUR_BACKENDS, RunConfig, bounded_residual_init, randn, resolved, seeded

NAME = "models"


CL, NCHW = "channels_last", "contiguous"


def _sweep(cfg: RunConfig):
    """[(model, dtype, batch, input size, memory format)], densities; most important first (a
    family past its time budget loses the cases at the end)."""
    if cfg.full:
        runs = [("resnet101_imagenet", "bfloat16", 64, 224, CL), ("resnet110_cifar", "bfloat16", 128, 32, NCHW),
                ("resnet110_cifar", "float16", 128, 32, NCHW), ("resnet110_cifar", "bfloat16", 64, 32, NCHW),
                ("resnet110_cifar", "float32", 64, 32, NCHW), ("resnet101_imagenet", "float16", 64, 224, CL),
                ("fbs_resnet18", "bfloat16", 128, 224, NCHW), ("lcnet_resnet50", "bfloat16", 64, 224, NCHW),
                ("skipnet_resnet110", "float32", 64, 32, NCHW)]
        return runs, [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    if cfg.gpu:
        return [("resnet110_cifar", "float16", 64, 32, NCHW), ("resnet101_imagenet", "bfloat16", 16, 224, CL),
                ("fbs_resnet18", "float16", 32, 224, NCHW), ("lcnet_resnet50", "float16", 16, 224, NCHW),
                ("skipnet_resnet110", "float32", 64, 32, NCHW)], [0.25, 0.5, 1.0]
    # CPU: small batches, and ResNet-101 on 64x64 inputs to keep the quick report quick
    return [("resnet110_cifar", "float32", 8, 32, NCHW), ("resnet101_imagenet", "float32", 2, 64, NCHW),
            ("fbs_resnet18", "float32", 2, 64, NCHW), ("lcnet_resnet50", "float32", 2, 64, NCHW),
            ("skipnet_resnet110", "float32", 8, 32, NCHW)], [0.125, 0.25, 0.5, 0.75, 1.0]


# model name -> (module under dynkernels.models, constructor, kwargs)
BLOCKDROP = {"resnet110_cifar": {"num_classes": 10}, "resnet101_imagenet": {"num_classes": 1000}}
OTHERS = {"fbs_resnet18": ("fbs", "resnet18"), "lcnet_resnet50": ("lcnet", "resnet50"), "skipnet_resnet110": ("skipnet", "resnet110_cifar")}


def _import(module: str):
    try:
        return importlib.import_module(f"dynkernels.models.{module}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("dynkernels.models"):
            raise Unavailable(f"dynkernels.models.{module} is not available in this build") from e
        raise


# Models built for the current (model, dtype), reused across densities and batch sizes: building
# a ResNet-101 takes longer than timing it. A new (model, dtype) frees the previous ones.
_BUILT: Dict[tuple, torch.nn.Module] = {}


def _built(ctor, name, dtype, dev, fmt, execution, backend, base=None) -> torch.nn.Module:
    key = (ctor, name, dtype, str(dev), fmt, execution, backend)
    if key not in _BUILT:
        if any(k[:5] != key[:5] for k in _BUILT):
            _BUILT.clear()
        torch.manual_seed(6)
        m = ctor(**BLOCKDROP[name], execution=execution, backend=backend)
        if base is None:
            bounded_residual_init(m, seeded(6))
        else:
            m.load_state_dict(base.state_dict())
        mf = torch.channels_last if fmt == CL else torch.contiguous_format
        _BUILT[key] = m.to(dev, DTYPES[dtype]).to(memory_format=mf).eval()
    return _BUILT[key]


def _blockdrop_setup(cfg: RunConfig, name, dtype, batch, size, fmt, d) -> Setup:
    dt, dev = DTYPES[dtype], cfg.device
    blockdrop = _import("blockdrop")
    ctor = getattr(blockdrop, name, None)
    if ctor is None:
        raise Unavailable(f"dynkernels.models.blockdrop.{name} is not available in this build")
    base = _built(ctor, name, dtype, dev, fmt, "masked", "auto")
    mf = torch.channels_last if fmt == CL else torch.contiguous_format
    g, gd = seeded(6), seeded(6, dev)
    sets = []
    for _ in range(cfg.input_sets):
        x = randn((batch, 3, size, size), dev, dt, gd).contiguous(memory_format=mf)
        policy = (torch.rand(batch, base.num_blocks, generator=g) < d).to(dev, dt)
        sets.append((x, policy))
    policy = sets[0][1]
    dense_flops = float(torch.as_tensor(base.flops(torch.ones_like(policy))).double().sum())
    sparse_flops = float(torch.as_tensor(base.flops(policy)).double().sum())

    def masked():
        base.execution = "masked"
        return lambda x, p: base(x, p)

    def sparse(b):
        def build():
            if b == "triton" and dev.type == "cpu":
                raise Unavailable("Triton is timed on GPUs only")
            resolved("gather_rows", b, dev)
            m = _built(ctor, name, dtype, dev, fmt, "sparse", b, base)
            return lambda x, p: m(x, p)

        return build

    variants = [
        Variant("dense", lambda: lambda x, p: base(x, None), work="dense",
                shared_key=(name, dtype, batch, size, fmt, "dense")),
        Variant("masked", masked, work="dense", shared_key=(name, dtype, batch, size, fmt, "masked")),
    ] + [Variant(f"sparse-{b}", sparse(b), backend=b, compare_to="masked") for b in OUR_BACKENDS]
    # deep nets accumulate rounding differences between execution orders: a looser check
    return Setup(sets, variants, dense_flops=dense_flops, sparse_flops=sparse_flops, rtol=10 * RTOL[dtype])


def _other_setup(cfg: RunConfig, name, dtype, batch, size, fmt, d) -> Setup:
    """FBS / LC-Net / SkipNet: whichever constructor arguments the module takes (density, execution)."""
    module_name, ctor_name = OTHERS[name]
    module = _import(module_name)
    ctor = getattr(module, ctor_name, None)
    if ctor is None:
        raise Unavailable(f"dynkernels.models.{module_name}.{ctor_name} is not available in this build")
    params = inspect.signature(ctor).parameters
    density_arg = next((a for a in ("density", "d", "keep_ratio") if a in params), None)
    if density_arg is None:
        raise Unavailable(f"dynkernels.models.{module_name}.{ctor_name} takes no density argument (density, d or keep_ratio)")
    if "execution" not in params:
        raise Unavailable(f"dynkernels.models.{module_name}.{ctor_name} takes no execution= argument: cannot compare masked and sparse")
    dt, dev = DTYPES[dtype], cfg.device
    kwargs = {density_arg: d}
    torch.manual_seed(7)
    base = ctor(execution="masked", **kwargs).to(dev, dt).eval()
    gd = seeded(7, dev)
    sets = [(randn((batch, 3, size, size), dev, dt, gd),) for _ in range(cfg.input_sets)]

    def sparse(b):
        def build():
            if b == "triton" and dev.type == "cpu":
                raise Unavailable("Triton is timed on GPUs only")
            resolved("channel_sparse_conv2d", b, dev)
            kw = dict(kwargs, backend=b) if "backend" in params else kwargs
            m = ctor(execution="sparse", **kw).to(dev, dt).eval()
            m.load_state_dict(base.state_dict())
            return lambda x: m(x)

        return build

    variants = [Variant("masked", lambda: lambda x: base(x), work="dense")]
    variants += [Variant(f"sparse-{b}", sparse(b), backend=b, compare_to="masked") for b in OUR_BACKENDS]
    return Setup(sets, variants, rtol=10 * RTOL[dtype])


def _case(cfg: RunConfig, name, dtype, batch, size, fmt, d) -> Case:
    config = f"{name} N={batch} {size}x{size} {dtype}" + (f" {fmt}" if fmt == CL else "")

    def setup():
        if name in BLOCKDROP:
            return _blockdrop_setup(cfg, name, dtype, batch, size, fmt, d)
        return _other_setup(cfg, name, dtype, batch, size, fmt, d)

    baseline = "dense" if name in BLOCKDROP else "masked"
    return Case(NAME, name, config, f"{batch}x3x{size}x{size}", batch, dtype, d, setup, memory_format=fmt, baseline=baseline)


def cases(cfg: RunConfig) -> List[Case]:
    runs, densities = _sweep(cfg)
    return [_case(cfg, *run, d) for run in runs for d in densities]
