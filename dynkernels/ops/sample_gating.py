"""Sample gating ops: compact, gather_rows, scatter_add_rows, scatter_rows, scatter_rows_
(contract: DESIGN.md).

The compiled kernels are torch.ops.dynkernels.{compact, gather_rows, scatter_add_rows,
scatter_rows, scatter_rows_} (schemas in csrc/schemas.cpp, one kernel per device); the Triton
kernels are torch.ops.dynkernels.{...}_triton and scatter_rows_triton_
(dynkernels/triton/sample_gating.py). This file gives both their fake kernels and autograd,
and the public functions that check arguments and pick the backend. No op here reads a
device value on the host (the "torch" reference reads count; see dynkernels.reference).

The row ops take idx [M] and count and move the rows idx[:count]: compact's idx (M = N), or
the part of route's idx that belongs to one branch, idx[offsets[b]:] with count
offsets[b + 1] - offsets[b] (dynkernels.route). scatter_rows alone needs a permutation.

The public functions check every argument on every call. On plain CPU tensors with the
backend "auto" or "cpu" they call the C++ kernel at once: it checks every argument itself (the
index values too: idx in range, scatter_rows' permutation, scatter_rows_' distinct rows, with
the errors of the Python checks), and where it refuses one (a RuntimeError) the Python checks
run to raise the error that names it; on a small tensor the Python checks would cost more than
moving the rows. Where no gradient is needed that call is made from C++
(dynkernels._C.cpu_first, csrc/python_calls.cpp: the arguments unpacked and the op dispatched
below autograd, a microsecond where torch.ops takes three or more). Callers that already
checked once for many calls (dynkernels.nn.SkipBlock, SkipPlan, RoutePlan and EarlyExit: a
gate checked once, idx and count from compact / route) call the `Kernels` of a resolved
backend (`kernels`, `resolved_kernels`), which go straight to the kernel.
"""
import functools
import numbers
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from .. import reference
from .._extension import _C
from .._layout import row_layout
from . import _checks
from ._backend import resolve

_lib = torch.ops.dynkernels
_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_BelowAutograd = torch._C._AutoDispatchBelowAutograd
_AUTOGRAD_CPU = torch._C.DispatchKey.AutogradCPU
_key_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded
_exclude_key = torch._C._dispatch_tls_set_dispatch_key_excluded


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("dynkernels::compact")
def _compact_fake(gate, threshold):
    rows = gate.shape[0] if gate.dim() == 2 else 1
    return gate.new_empty(gate.shape, dtype=torch.int32), gate.new_empty((rows,), dtype=torch.int32)


@torch.library.register_fake("dynkernels::gather_rows")
def _gather_rows_fake(x, idx, count, capacity):
    return x.new_empty((capacity,) + tuple(x.shape[1:])).contiguous(memory_format=row_layout(x))


@torch.library.register_fake("dynkernels::scatter_add_rows")
def _scatter_add_rows_fake(base, y, idx, count, scale):
    return torch.empty_like(base, memory_format=row_layout(base))


@torch.library.register_fake("dynkernels::scatter_rows")
def _scatter_rows_fake(base, y, idx, count):
    return torch.empty_like(base, memory_format=row_layout(base))


@torch.library.register_fake("dynkernels::scatter_rows_")
def _scatter_rows_inplace_fake(base, y, idx, count):
    return None


# ----------------------------------------------------------------------------- autograd
def _register_autograd(gather_op, scatter_op, scatter_rows_op):
    """Backward of gather/scatter built from the same backend's gather/scatter kernels."""

    def gather_setup(ctx, inputs, output):
        x, idx, count, capacity = inputs
        ctx.save_for_backward(idx, count)
        ctx.x_shape = x.shape

    def gather_backward(ctx, grad_y):
        idx, count = ctx.saved_tensors
        zeros = grad_y.new_zeros(ctx.x_shape)
        return scatter_op(zeros, grad_y.contiguous(), idx, count, None), None, None, None

    def scatter_setup(ctx, inputs, output):
        base, y, idx, count, scale = inputs
        ctx.capacity = y.shape[0]
        ctx.save_for_backward(y if ctx.needs_input_grad[4] else None, idx, count, scale)

    def scatter_backward(ctx, grad_out):
        y, idx, count, scale = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_base = grad_out if ctx.needs_input_grad[0] else None
        grad_y = grad_scale = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[4]:
            g_rows = gather_op(grad_out, idx, count, ctx.capacity)  # grad_out[idx[i]], zero past count
            if ctx.needs_input_grad[1]:
                grad_y = g_rows
                if scale is not None:
                    s_rows = gather_op(scale.unsqueeze(1), idx, count, ctx.capacity)  # [capacity, 1]
                    grad_y = g_rows * s_rows.to(g_rows.dtype).view((-1,) + (1,) * (g_rows.dim() - 1))
            if ctx.needs_input_grad[4]:
                dots = (g_rows.float() * y.float()).flatten(1).sum(1).to(scale.dtype)
                grad_scale = scatter_op(torch.zeros_like(scale), dots, idx, count, None)
        return grad_base, grad_y, None, None, grad_scale

    def scatter_rows_setup(ctx, inputs, output):
        base, y, idx, count = inputs
        ctx.capacity = y.shape[0]
        ctx.save_for_backward(idx, count)

    def scatter_rows_backward(ctx, grad_out):
        # out takes y[i] at row idx[i] for i < count and base's row elsewhere, so grad_base is
        # grad_out with those rows zeroed, grad_y those rows of grad_out (zero past count).
        idx, count = ctx.saved_tensors
        grad_base = grad_y = None
        if ctx.needs_input_grad[0]:
            no_rows = grad_out.new_zeros((ctx.capacity,) + tuple(grad_out.shape[1:]))
            grad_base = scatter_rows_op(grad_out, no_rows, idx, count)
        if ctx.needs_input_grad[1]:
            grad_y = gather_op(grad_out, idx, count, ctx.capacity)
        return grad_base, grad_y, None, None

    torch.library.register_autograd(gather_op, gather_backward, setup_context=gather_setup)
    torch.library.register_autograd(scatter_op, scatter_backward, setup_context=scatter_setup)
    torch.library.register_autograd(scatter_rows_op, scatter_rows_backward, setup_context=scatter_rows_setup)


_register_autograd(_lib.gather_rows.default, _lib.scatter_add_rows.default, _lib.scatter_rows.default)


@functools.lru_cache(maxsize=None)
def _triton():
    """Import the Triton kernels on first use (Triton is optional) and give them autograd."""
    from ..triton import sample_gating as triton_sample_gating

    _register_autograd(
        triton_sample_gating.gather_rows_triton,
        triton_sample_gating.scatter_add_rows_triton,
        triton_sample_gating.scatter_rows_triton,
    )
    return triton_sample_gating


# ----------------------------------------------------------------------------- unchecked calls
class Kernels(NamedTuple):
    """The unchecked calls of one resolved backend, with the public ops' signatures minus
    `backend` (compact(gate, threshold) etc.): they go straight to the kernel (or the
    reference), for callers that have checked the arguments already."""

    compact: Callable
    gather_rows: Callable
    scatter_add_rows: Callable
    scatter_rows: Callable
    scatter_rows_: Callable
    # The merge kernels check y's row shape, dtype and device against base's themselves (the
    # compiled ones, csrc/sample_gating_common.h; not Triton's or the reference).
    checks_merge: bool = False


# How the compiled and Triton kernels are called (Kernels per backend and mode): "autograd"
# through _run, which picks per call; "no_grad" below autograd (grad mode off, outside
# torch.compile: no gradient can be needed); "inference" the dispatcher entries themselves
# (inference mode, outside torch.compile: autograd is excluded anyway). resolved_kernels
# picks the mode.
MODES = ("autograd", "no_grad", "inference")


def _below_autograd(op, backend: str) -> Callable:
    """op (an OpOverload) called below autograd: without torch.library's Python autograd
    wrapper, which costs microseconds even where no gradient is needed. The op's direct call
    where it has one (_DIRECT); else its dispatcher entry under a guard. For the CPU kernels
    the CPU autograd key, the one their calls dispatch to, is excluded by hand: the
    thread-local flag read and written costs a few hundred nanoseconds less than creating the
    guard, and is restored as it was (also when the kernel raises)."""
    direct = _DIRECT.get(op)
    if direct is not None:
        return direct
    raw = op._op
    if backend != "cpu":
        def call(*args):
            with _BelowAutograd():
                return raw(*args)

        return call

    def call_cpu(*args):
        was = _key_excluded(_AUTOGRAD_CPU)
        _exclude_key(_AUTOGRAD_CPU, True)
        try:
            return raw(*args)
        finally:
            _exclude_key(_AUTOGRAD_CPU, was)

    return call_cpu


@functools.lru_cache(maxsize=None)
def kernels(backend: str, mode: str = "autograd") -> Kernels:
    """The Kernels of a resolved backend ("cpu", "cuda", "triton" or "torch") for one of
    MODES (see there; the reference is the same in all of them)."""
    if mode not in MODES:
        raise ValueError(f"kernels: mode must be one of {MODES}, got {mode!r}")
    if backend == "torch":
        return Kernels(reference.compact, reference.gather_rows, reference.scatter_add_rows, reference.scatter_rows,
                       functools.partial(_scatter_rows_, backend=backend))
    names = ("compact", "gather_rows", "scatter_add_rows", "scatter_rows")
    scatter_rows_inplace = functools.partial(_scatter_rows_, backend=backend)
    compiled = backend in ("cpu", "cuda")
    if mode != "autograd" and compiled:  # (no gradient: the direct in-place call where there is one)
        scatter_rows_inplace = _DIRECT.get(_SCATTER_ROWS_INPLACE, scatter_rows_inplace)
    if mode == "inference":
        return Kernels(*(_DIRECT.get(_kernel(name, backend)) or _kernel(name, backend)._op for name in names),
                       scatter_rows_inplace, compiled)
    if mode == "no_grad":
        return Kernels(*(_below_autograd(_kernel(name, backend), backend) for name in names), scatter_rows_inplace,
                       compiled)
    if backend == "triton":
        compact_op = _triton().compact_triton
    else:  # integer outputs: never differentiable
        compact_op = functools.partial(_run, _kernel("compact", backend), differentiable=False)
    return Kernels(compact_op, *(functools.partial(_run, _kernel(name, backend)) for name in names[1:]),
                   scatter_rows_inplace, compiled)


_RESOLVED = {}  # (backend, device) -> resolved backend
_RESOLVED_KERNELS = {}  # (backend, device, mode) -> its Kernels


def resolved_backend(owner: str, backend: str, device: torch.device) -> str:
    """resolve(owner, backend, device), remembered per (backend, device): the answer depends
    only on those and on how dynkernels was built and imported (TRITON_INTERPRET is read
    before import), so callers on a hot path pay a dict lookup, not the checks (keyed by the
    device itself: device.type builds a new string on every call). While torch.compile traces
    it is resolved afresh (traced once per graph): a cache filled during tracing would fail
    the compiled graph's guards on its next call and compile it a second time."""
    if torch.compiler.is_compiling():
        return resolve(owner, backend, device)
    key = (backend, device)
    b = _RESOLVED.get(key)
    if b is None:
        b = _RESOLVED[key] = resolve(owner, backend, device)
    return b


def resolved_kernels(owner: str, backend: str, device: torch.device) -> Kernels:
    """kernels(resolved_backend(owner, backend, device), mode), remembered the same way, the
    mode (MODES) the one that fits the calls made now. For one forward: read here, once. Not
    cached while torch.compile traces (see resolved_backend)."""
    if torch.compiler.is_compiling():
        return kernels(resolve(owner, backend, device), "autograd")
    if torch.is_inference_mode_enabled():
        mode = "inference"
    else:
        mode = "autograd" if torch.is_grad_enabled() else "no_grad"
    key = (backend, device, mode)
    k = _RESOLVED_KERNELS.get(key)
    if k is None:
        k = _RESOLVED_KERNELS[key] = kernels(resolved_backend(owner, backend, device), mode)
    return k


@functools.lru_cache(maxsize=None)
def _kernel(name: str, backend: str):
    """The registered operator of a resolved kernel backend ("cpu", "cuda" or "triton")."""
    if backend == "triton":
        _triton()  # registers the *_triton ops and their autograd
        # in-place ops keep their trailing underscore last: scatter_rows_ -> scatter_rows_triton_
        return getattr(_lib, f"{name[:-1]}_triton_" if name.endswith("_") else f"{name}_triton").default
    return getattr(_lib, name).default


def _run(op, *args, differentiable: bool = True):
    """Call a registered op (an OpOverload). When no gradient is needed this goes below
    autograd directly: the call torch.library's autograd wrapper would make, without that
    Python wrapper (microseconds per op, paid by every eager forward), through the op's
    direct call where it has one (_DIRECT). Inference mode excludes autograd itself, so
    there the dispatcher entry is called as it is (or the direct call)."""
    if torch.compiler.is_compiling():  # (first: compile cannot trace the other checks)
        return op(*args)
    # (inference mode turns grad mode off, and where it is turned on again inside, autograd
    # stays excluded for the op's call anyway)
    if differentiable and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return op(*args)
    direct = _DIRECT.get(op)
    if direct is not None:
        return direct(*args)
    if torch.is_inference_mode_enabled():
        return op._op(*args)
    with _BelowAutograd():
        return op._op(*args)


def _scatter_rows_kernel_(base, y, idx, count, backend: str):
    """The in-place kernel itself, no autograd (checked arguments, resolved backend)."""
    if backend == "torch":
        reference.scatter_rows_(base, y, idx, count)
    else:
        _kernel("scatter_rows_", backend)(base, y, idx, count)


class _ScatterRowsInPlace(torch.autograd.Function):
    """Autograd of scatter_rows_ (torch.library.register_autograd takes functional ops only):
    base's gradient is grad_out with the written rows zeroed, y's the written rows of grad_out
    (zero past count), both built from the same backend's kernels."""

    @staticmethod
    def forward(ctx, base, y, idx, count, backend):
        _scatter_rows_kernel_(base, y, idx, count, backend)
        ctx.mark_dirty(base)
        ctx.save_for_backward(idx, count)
        ctx.rows, ctx.backend = y.shape[0], backend
        return base

    @staticmethod
    def backward(ctx, grad_out):
        idx, count = ctx.saved_tensors
        grad_base = grad_y = None
        if ctx.needs_input_grad[1]:
            grad_y = kernels(ctx.backend).gather_rows(grad_out.contiguous(), idx, count, ctx.rows)
        if ctx.needs_input_grad[0]:
            grad_base = grad_out.clone(memory_format=row_layout(grad_out))
            no_rows = grad_out.new_zeros((ctx.rows,) + tuple(grad_out.shape[1:]))
            _scatter_rows_kernel_(grad_base, no_rows, idx, count, ctx.backend)
        return grad_base, grad_y, None, None, None


def _scatter_rows_(base, y, idx, count, backend: str):
    """scatter_rows_ with checked arguments and a resolved backend; returns base."""
    if torch.is_grad_enabled() and (base.requires_grad or y.requires_grad):
        return _ScatterRowsInPlace.apply(base, y, idx, count, backend)
    _scatter_rows_kernel_(base, y, idx, count, backend)
    return base


def _check_permutation(op: str, idx: torch.Tensor, rows: int):
    """idx lists each of the `rows` rows exactly once (reads idx: a host sync on a GPU)."""
    if rows == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= rows:
        bad = int(((idx < 0) | (idx >= rows)).nonzero()[0])
        raise IndexError(f"{op}: idx[{bad}] = {int(idx[bad])} is out of range for base with {rows} rows")
    seen = torch.bincount(idx.long(), minlength=rows)
    if int(seen.max()) > 1:
        twice = int((seen > 1).nonzero()[0])
        raise ValueError(f"{op}: idx lists row {twice} more than once; idx must be a permutation of base's {rows} rows (as compact returns)")


# ----------------------------------------------------------------------------- public ops
def compact(gate: torch.Tensor, threshold: float = 0.0, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable partition of a gate into its active positions (gate > threshold), then the rest.

    gate: [N] or [B, N], floating or bool. Returns (idx, count): idx int32 of gate's shape,
    each row the active positions in increasing order followed by the inactive ones;
    count int32 [1] or [B], the number of active positions per row. No host sync.
    """
    _checks.gate("compact", "gate", gate)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        # float() would also take a string, or a tensor (reading a device value on the host)
        raise TypeError(f"compact: threshold must be a real number, got {type(threshold).__name__} {threshold!r}")
    return kernels(resolve("compact", backend, gate.device)).compact(gate, float(threshold))


def kernel_first(kernel: Callable, args: tuple, check: Callable, *check_args, **check_kwargs):
    """kernel(*args) with arguments not checked beforehand (the compiled kernels check them
    themselves). Where the kernel refuses them (a RuntimeError), _refused raises the error
    that names the argument, outside the except block, so that it does not carry the
    kernel's as its context."""
    try:
        return kernel(*args)
    except RuntimeError as e:
        refused = e
    _refused(refused, check, *check_args, **check_kwargs)


def _refused(error: RuntimeError, check: Callable, *check_args, **check_kwargs):
    """A compiled kernel refused its arguments with `error`: check(*check_args, **check_kwargs)
    runs to raise the error that names the argument; if it finds nothing, `error` is raised.
    (Called outside the except block that caught `error`.)"""
    check(*check_args, **check_kwargs)
    raise error


def _cpu_fast(backend: str, *tensors) -> bool:
    """Whether a call may go straight to the C++ CPU kernel, which checks every argument itself
    (the same conditions, the index values too): plain CPU tensors (no subclass, no tensor on
    another device, which would dispatch elsewhere) and the backend "auto" or "cpu". The Python
    checks then run only where the kernel refuses the arguments (a RuntimeError), to raise the
    error that names the argument; the saved microseconds are most of a small tensor's call."""
    if backend != "auto" and backend != "cpu":
        return False
    for t in tensors:
        if type(t) is not _Tensor or not t.is_cpu:
            return False
    return True


def gather_rows(
    x: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    capacity: Optional[int] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """y[i] = x[idx[i]] for i < count; y has `capacity` rows (default x.shape[0]), the rest zero.

    idx: [M] int32 rows of x (compact's idx, M = N; or one branch's part of route's idx,
    idx[offsets[b]:]); count: one int32 (compact's count, count[b:b+1] of a [B, N] plan, or
    offsets[b+1] - offsets[b]), clamped to [0, min(M, capacity)]. Differentiable in x. No host
    sync.
    """
    if (backend == "auto" or backend == "cpu") and _CPU_FIRST is not None and not _is_compiling():
        try:
            y = _CPU_FIRST.gather_rows(x, idx, count, capacity)
        except RuntimeError as e:
            y = e
        if y is not NotImplemented:
            return y if type(y) is _Tensor else _refused(y, _check_gather_args, x, idx, count, capacity, values=False)
    if _cpu_fast(backend, x, idx, count) and x.dim():
        cap = x.shape[0] if capacity is None else _checks.capacity("gather_rows", capacity)
        return kernel_first(_run, (_GATHER_ROWS, x, idx, count, cap), _check_gather_args, x, idx, count, capacity, values=False)
    b, capacity = _check_gather_args(x, idx, count, capacity, backend=backend)
    return kernels(b).gather_rows(x, idx, count, capacity)


def _check_gather_args(x, idx, count, capacity, backend: str = "auto", values: bool = True):
    """gather_rows' checks; returns (resolved backend, capacity). values=False: the index values
    are left to the CPU kernel (as they are on the resolved "cpu" backend)."""
    _checks.tensor("gather_rows", "x", x)
    if x.dim() == 0:
        raise ValueError("gather_rows: x must have at least one dimension (the rows), got a 0-d tensor")
    capacity = _checks.capacity("gather_rows", x.shape[0] if capacity is None else capacity)
    b = resolved_backend("gather_rows", backend, x.device)
    _checks.index_args("gather_rows", idx, count, x.shape[0], "x", x, any_length=True, values=values and b != "cpu")
    return b, capacity


def _check_merge_args(op: str, base, y, idx, count, floating_base: bool, permutation: bool, backend: str = "auto",
                      values: bool = True) -> str:
    """The checks the merge ops (scatter_add_rows, scatter_rows, scatter_rows_) share, in this
    order: base has rows (and is floating, if asked), y has base's row shape, dtype and device,
    idx/count index base's rows (idx has base's N entries where it must be a permutation; their
    values are checked too, unless the CPU kernel checks them: values=False or the resolved
    backend "cpu"; see _checks.index_args). Returns the resolved backend."""
    _checks.tensor(op, "base", base)
    b = resolved_backend(op, backend, base.device)
    if base.dim() == 0:
        raise ValueError(f"{op}: base must have at least one dimension (the rows), got a 0-d tensor")
    if floating_base:
        _checks.floating(op, "base", base)
    _checks.tensor(op, "y", y)
    if y.dim() != base.dim() or y.shape[1:] != base.shape[1:]:
        raise ValueError(f"{op}: y must be [capacity, {', '.join(map(str, base.shape[1:]))}] like base's rows, got shape {tuple(y.shape)}")
    if y.dtype != base.dtype:
        raise TypeError(f"{op}: y must have base's dtype {base.dtype}, got {y.dtype}")
    _checks.same_device(op, "y", y, "base", base)
    _checks.index_args(op, idx, count, base.shape[0], "base", base, any_length=not permutation,
                       values=values and b != "cpu")
    return b


def scatter_add_rows(
    base: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """out = base, except out[idx[i]] = base[idx[i]] + scale[idx[i]] * y[i] for i < count.

    base: [N, ...] floating; y: [capacity, ...] of base's dtype; idx: [M] int32 whose first
    count entries are distinct rows (count clamped to [0, min(M, capacity)]); scale: [N]
    floating or None (1). The sum is formed in float32 and rounded once. Differentiable in
    base, y and scale. No host sync.
    """
    if (backend == "auto" or backend == "cpu") and _CPU_FIRST is not None and not _is_compiling():
        try:
            out = _CPU_FIRST.scatter_add_rows(base, y, idx, count, scale)
        except RuntimeError as e:
            out = e
        if out is not NotImplemented:
            return out if type(out) is _Tensor else _refused(out, _check_scatter_add_args, base, y, idx, count, scale,
                                                             values=False)
    if _cpu_fast(backend, base, y, idx, count) and (scale is None or _cpu_fast(backend, scale)):
        return kernel_first(_run, (_SCATTER_ADD_ROWS, base, y, idx, count, scale), _check_scatter_add_args,
                            base, y, idx, count, scale, values=False)
    b = _check_scatter_add_args(base, y, idx, count, scale, backend=backend)
    return kernels(b).scatter_add_rows(base, y, idx, count, scale)


def _check_scatter_add_args(base, y, idx, count, scale, backend: str = "auto", values: bool = True) -> str:
    op = "scatter_add_rows"
    b = _check_merge_args(op, base, y, idx, count, floating_base=True, permutation=False, backend=backend, values=values)
    if scale is not None:
        _checks.tensor(op, "scale", scale, (1,), "a 1-D tensor [N]")
        _checks.floating(op, "scale", scale)
        if scale.shape[0] != base.shape[0]:
            raise ValueError(f"{op}: scale has {scale.shape[0]} entries but base has {base.shape[0]} rows; they must match")
        _checks.same_device(op, "scale", scale, "base", base)
    return b


def scatter_rows(
    base: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The overwrite merge: out[idx[i]] = y[i] for i < count, out[idx[i]] = base[idx[i]] otherwise.

    idx: [N] int32, a permutation of base's N rows whose first count entries are the rows
    that y replaces: exactly what compact returns. Checked on CPU tensors; on CUDA tensors
    only with DYNKERNELS_CHECK_INDICES=1 (it reads idx: a host sync); the CUDA and Triton
    kernels never read or write out of bounds, but a row that idx does not list is left
    unwritten. base: [N, ...] of any dtype; y: [capacity, ...] of base's dtype and device,
    its rows past count unread; count is clamped to [0, min(capacity, N)].

    One pass, each output row written once and each source row read once (N row reads, N row
    writes), where zeroing the kept rows of base and adding y with scatter_add_rows takes
    three. The kept rows of base are not read, so a non-finite value there does not reach
    the output. Differentiable in base (grad_out with the kept rows zeroed) and y (the kept
    rows of grad_out, zero past count). No host sync.
    """
    op = "scatter_rows"
    if (backend == "auto" or backend == "cpu") and _CPU_FIRST is not None and not _is_compiling():
        try:
            out = _CPU_FIRST.scatter_rows(base, y, idx, count)
        except RuntimeError as e:
            out = e
        if out is not NotImplemented:
            return out if type(out) is _Tensor else _refused(out, _check_merge_args, op, base, y, idx, count,
                                                             floating_base=False, permutation=True, values=False)
    if _cpu_fast(backend, base, y, idx, count):
        return kernel_first(_run, (_SCATTER_ROWS, base, y, idx, count), _check_merge_args,
                            op, base, y, idx, count, floating_base=False, permutation=True, values=False)
    b = _check_merge_args(op, base, y, idx, count, floating_base=False, permutation=True, backend=backend)
    if b != "cpu" and (idx.device.type == "cpu" or _checks.CHECK_INDICES_ON_GPU):
        _check_permutation(op, idx, base.shape[0])
    return kernels(b).scatter_rows(base, y, idx, count)


def scatter_rows_(
    base: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The overwrite merge in place: base[idx[i]] = y[i] for i < count; every other row of base
    is left as it is. Returns base.

    idx: [M] int32 whose first count entries are distinct rows of base (count clamped to
    [0, min(M, capacity)]): one branch's part of a route, idx[offsets[b]:] with count
    offsets[b + 1] - offsets[b], so that merging every branch writes each row of base once
    (dynkernels.nn.RouteBlock). With idx a permutation (as compact returns), base ends up as
    scatter_rows(base, y, idx, count) would return it. base: [N, ...] of any dtype, contiguous
    or channels_last (it is written in place); y: [capacity, ...] of base's dtype and device,
    its rows past count unread. Range and distinctness are checked on CPU tensors; on CUDA
    tensors only with DYNKERNELS_CHECK_INDICES=1 (it reads idx: a host sync), the CUDA and
    Triton kernels skipping out-of-range entries (never an out-of-bounds access; repeated rows
    are written by one of their entries, unspecified which).

    Each written row is read once from y and written once: count row copies, nothing else.
    Differentiable in base (grad_out with the written rows zeroed) and y (the written rows of
    grad_out, zero past count). No host sync.
    """
    if _cpu_fast(backend, base, y, idx, count):
        return kernel_first(_scatter_rows_, (base, y, idx, count, "cpu"), _check_scatter_rows_inplace_args,
                            base, y, idx, count, values=False)
    b = _check_scatter_rows_inplace_args(base, y, idx, count, backend=backend)
    return kernels(b).scatter_rows_(base, y, idx, count)


def _check_scatter_rows_inplace_args(base, y, idx, count, backend: str = "auto", values: bool = True) -> str:
    op = "scatter_rows_"
    b = _check_merge_args(op, base, y, idx, count, floating_base=False, permutation=False, backend=backend, values=values)
    if not base.is_contiguous(memory_format=row_layout(base)):
        raise ValueError(f"{op}: base is written in place, so it must be contiguous (or channels_last), got strides {base.stride()}")
    if values and b != "cpu" and (idx.device.type == "cpu" or _checks.CHECK_INDICES_ON_GPU):
        n = max(0, min(int(count.reshape(-1)[0]), idx.shape[0], y.shape[0]))
        if n and int(torch.bincount(idx[:n].long(), minlength=1).max()) > 1:
            twice = int((torch.bincount(idx[:n].long()) > 1).nonzero()[0])
            raise ValueError(f"{op}: the first count entries of idx list row {twice} more than once; they must be distinct")
    return b


_GATHER_ROWS = _lib.gather_rows.default
_SCATTER_ADD_ROWS = _lib.scatter_add_rows.default
_SCATTER_ROWS = _lib.scatter_rows.default
_SCATTER_ROWS_INPLACE = _lib.scatter_rows_.default
# The compiled ops' direct calls below autograd (dynkernels._C.below_autograd, csrc/python_calls.cpp:
# the arguments unpacked and the op dispatched in C++, a microsecond where torch.ops takes
# three or more), by OpOverload. Empty where the kernels were loaded as a library without the
# Python module (torch.ops.load_library): then the dispatcher entries are called instead.
_DIRECT = {} if _C is None else {
    _lib.compact.default: _C.below_autograd.compact,
    _GATHER_ROWS: _C.below_autograd.gather_rows,
    _SCATTER_ADD_ROWS: _C.below_autograd.scatter_add_rows,
    _SCATTER_ROWS: _C.below_autograd.scatter_rows,
    _SCATTER_ROWS_INPLACE: _C.below_autograd.scatter_rows_,
}
# The row ops' first try (dynkernels._C.cpu_first: plain CPU tensors where no gradient is
# needed, else NotImplemented), or None in such a library. Each op makes it inline rather than
# through a helper: measured on a 1 MiB gather, one Python call more per op cost 2 - 8% of it
# (the copy evicts the interpreter's data from the caches, so every step of Python is slow).
_CPU_FIRST = None if _C is None else _C.cpu_first
