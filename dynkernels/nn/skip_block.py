"""Sample-gated residual blocks: run a block only on the samples whose gate keeps it.

A batch of N samples passes a residual block; a gate [N] says which samples keep it. The
papers (BlockDrop, SkipNet, LC-Net) compute the block on all N samples and multiply by the
gate ("masked" execution). Here ("sparse" execution) the kept samples are compacted into a
batch of their own (`compact` -> `gather_rows`), the block runs densely on that smaller
batch, and the results are put back in place (plain blocks: `scatter_rows`, one pass that
copies each output row once, from the block's result or from the shortcut; scaled ones:
`scatter_add_rows`, which adds s * F with the scale fused). No per-sample loops.

Per-forward CPU cost: the gate and the plan are checked, and the backend resolved, once per
forward; gather and merge then call the kernels without re-checking idx and count (they
come from `compact`), since on a GPU every microsecond of Python after a host sync leaves
the device idle.

Host synchronisations (reading a device value on the host; free on CPU tensors, a stall of
the launch queue on a GPU). The block is a dense module, so the number of rows it runs on
must be known on the host:

    execution="masked"                        0 per forward
    SkipBlock alone, sparse, capacity=None    1 per block (reads its kept count)
    SkipPlan / SkipSequential / BlockDrop     1 per forward for all B blocks (one count.tolist())
      models, sparse, capacity=None
    any of these, sparse, capacity=C          0 (each block runs on C rows: no saving for C = N)

These counts are for the compiled and Triton backends, which read `count` on the device;
backend="torch" (the reference) also reads it in every gather_rows / scatter_rows /
scatter_add_rows.

With capacity=C the launches are sized by C and the kernels read `count` on the device, so
the whole forward can be captured in a CUDA graph; it only saves work when the caller can
bound the kept samples per block by C < N.
"""
from typing import Iterable, List, NamedTuple, Optional

import torch
import torch.nn as nn

from .. import ops
from ..ops import _checks
from ..ops import sample_gating as _gating

EXECUTIONS = ("masked", "sparse")


def check_execution(owner: str, execution) -> str:
    if execution not in EXECUTIONS:
        raise ValueError(f"{owner}: execution must be one of {EXECUTIONS}, got {execution!r}")
    return execution


def active(gate: torch.Tensor, scaled: bool) -> torch.Tensor:
    """Which gate entries run the block: gate > 0 (plain), gate != 0 (scaled: any non-zero
    scale, also a negative one from a leaky ReLU-1, changes the output)."""
    if gate.dtype == torch.bool:
        return gate
    return gate != 0 if scaled else gate > 0


def _row_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, ...] broadcastable against `like`'s rows."""
    return mask.view((-1,) + (1,) * (like.dim() - 1))


class RowPlan(NamedTuple):
    """The compacted gate of one block.

    keep [N] bool (samples that run the block), idx [N] int32 (kept rows first, in order),
    count [1] int32 (number kept, on the device), rows (rows the block runs on: the count
    read on the host, or a fixed capacity), exact (rows is the count itself).
    """

    keep: torch.Tensor
    idx: torch.Tensor
    count: torch.Tensor
    rows: int
    exact: bool

    @property
    def none_kept(self) -> bool:
        return self.exact and self.rows == 0

    @property
    def all_kept(self) -> bool:
        # With every row kept, compact's stable partition is the identity permutation, so the
        # compact batch is the input itself: no gather, no scatter.
        return self.exact and self.rows == self.keep.shape[0]


def _check_capacity(owner: str, capacity: Optional[int], n: int) -> Optional[int]:
    if capacity is not None:
        capacity = _checks.capacity(owner, capacity)
        if capacity > n:
            raise ValueError(f"{owner}: capacity must be at most the batch size {n}, got {capacity}")
    return capacity


def _rows_to_run(owner: str, count: torch.Tensor, capacity: Optional[int]):
    """(rows each block runs on, exact): the kept counts, read with one host synchronisation,
    or (capacity=C) C for every block, without reading them (C >= every count is checked
    where that costs no sync: on CPU tensors, or on a GPU when DYNKERNELS_CHECK_INDICES=1)."""
    if capacity is None:
        return count.tolist(), True
    if count.device.type == "cpu" or _checks.CHECK_INDICES_ON_GPU:
        most = int(count.max()) if count.numel() else 0
        if most > capacity:
            raise ValueError(
                f"{owner}: capacity={capacity} but a block keeps {most} samples; capacity must "
                "be at least the largest number of samples kept by one block"
            )
    return [capacity] * count.shape[0], False


class SkipPlan:
    """The gates of B blocks for one batch, compacted with ONE `compact` call.

    policy: [N, B] (one column per block, e.g. BlockDrop's policy), floating or bool.
    capacity=None reads all B kept counts with one host synchronisation (`count.tolist()`);
    capacity=C reads none and sizes every block's compact batch to C rows (C must be at least
    every block's kept count: checked where that costs no sync, i.e. on CPU tensors, or on a
    GPU when DYNKERNELS_CHECK_INDICES=1). `plan[b]` is block b's RowPlan.
    """

    def __init__(self, policy: torch.Tensor, *, scaled: bool = False, capacity: Optional[int] = None, backend: str = "auto"):
        _checks.tensor("SkipPlan", "policy", policy, (2,), "[N, B] (samples x blocks)")
        if not (policy.dtype.is_floating_point or policy.dtype == torch.bool):
            raise TypeError(f"SkipPlan: policy must be a floating or bool tensor, got {policy.dtype}")
        ops.check_backend("SkipPlan", backend)
        capacity = _check_capacity("SkipPlan", capacity, policy.shape[0])
        self.scaled = bool(scaled)
        self.keep = active(policy, self.scaled).t().contiguous()  # [B, N]: one row per block
        self.idx, self.count = ops.compact(self.keep, backend=backend)
        self.rows: List[int]
        self.rows, self.exact = _rows_to_run("SkipPlan", self.count, capacity)
        self.host_syncs = 1 if capacity is None else 0
        # Every block's row at once (three calls, not three slices per block and forward).
        self._row_plans = [
            RowPlan(keep, idx, count, rows, self.exact)
            for keep, idx, count, rows in zip(self.keep.unbind(0), self.idx.unbind(0), self.count.split(1), self.rows)
        ]

    def __len__(self) -> int:
        return self.keep.shape[0]

    def __getitem__(self, b: int) -> RowPlan:
        return self._row_plans[b]


def _check_plan_rows(owner: str, name: str, t: torch.Tensor, row: RowPlan):
    """t has the plan's samples, on the plan's device (cheap: no value is read)."""
    n = row.idx.shape[0]
    if t.dim() == 0 or t.shape[0] != n or t.device != row.idx.device:
        raise ValueError(
            f"{owner}: {name} has shape {tuple(t.shape)} on {t.device}, but the plan is for {n} samples on {row.idx.device}"
        )


def _check_compact_result(owner: str, base: torch.Tensor, y: torch.Tensor, rows: int):
    """y: the block's result on the compact batch of `rows` rows, to be merged into base."""
    if y.dim() != base.dim() or y.shape[0] != rows or y.shape[1:] != base.shape[1:]:
        raise ValueError(
            f"{owner}: the compact result must be [{rows}, {', '.join(map(str, base.shape[1:]))}] "
            f"(the compact batch's rows, base's row shape), got {tuple(y.shape)}"
        )
    if y.dtype != base.dtype:
        raise TypeError(f"{owner}: the compact result must have base's dtype {base.dtype}, got {y.dtype}")
    if y.device != base.device:
        raise ValueError(f"{owner}: the compact result is on {y.device} but base is on {base.device}")


def gather_kept(x: torch.Tensor, row: RowPlan, backend: str = "auto") -> torch.Tensor:
    """The compact batch: x's kept rows in order (plus zero rows up to a fixed capacity).

    row: a SkipPlan row for x's batch. Its idx and count come from `compact`, so they are not
    checked again here; only that x has the plan's samples and device.
    """
    if row.all_kept:
        return x
    _check_plan_rows("gather_kept", "x", x, row)
    b = _gating.resolved_backend("gather_kept", backend, x.device)
    return _gating._gather_rows(x, row.idx, row.count, row.rows, b)


def merge_kept(base: torch.Tensor, y: torch.Tensor, row: RowPlan, backend: str = "auto") -> torch.Tensor:
    """out = base with the kept rows replaced by the compact results y.

    One pass (`scatter_rows`): every output row is copied once, from y (kept) or from base
    (dropped); the kept rows of base are not read. So a non-finite value in a kept row of
    base does not reach the output, while the masked execution, y * m + base * (1 - m), gives
    NaN there (inf * 0); the two executions agree wherever base is finite.
    """
    if row.all_kept:
        return y
    _check_plan_rows("merge_kept", "base", base, row)
    _check_compact_result("merge_kept", base, y, row.rows)
    b = _gating.resolved_backend("merge_kept", backend, base.device)
    return _gating._scatter_rows(base, y, row.idx, row.count, b)


def _shape_error(block_shape, shortcut_shape, shortcut_name):
    return ValueError(
        f"SkipBlock: the block maps a sample to shape {tuple(block_shape)} but the shortcut "
        f"({shortcut_name}) gives {tuple(shortcut_shape)}; a block that changes the shape (stride, "
        "channels) needs a shortcut that does the same, e.g. shortcut=<its downsample module>"
    )


class SkipBlock(nn.Module):
    """Run `block` only on the samples whose gate keeps it.

    Plain (scaled=False; BlockDrop, SkipNet), gate g [N], sample n:
        out[n] = block(x)[n]     if g[n] > 0   (block: a whole residual block, e.g. a
                                                 torchvision BasicBlock/Bottleneck with its own
                                                 residual add and ReLU)
        out[n] = shortcut(x)[n]  otherwise      (identity by default; the kept rows are
                                                 copied, so the shortcut's value there is
                                                 never read: see merge_kept)
    Scaled (scaled=True; LC-Net's L-Net), with F = `block` the residual branch only:
        out[n] = shortcut(x)[n] + g[n] * F(x)[n]   (F is computed where g[n] != 0; the scale is
                                                     fused into scatter_add_rows)

    shortcut=None means the block's own `downsample` module when it has one that is not None
    (torchvision blocks; it is called, not re-registered), else identity. The shortcut runs
    on all N samples (BlockDrop always computes the downsample shortcut). A bool gate acts
    as 0/1.

    execution="masked" is the papers' dense-times-mask computation (plain:
    block(x) * m + shortcut(x) * (1 - m) with m = [g > 0]); execution="sparse" runs the block
    on the compact batch of kept samples only. Both give the same output (plain blocks: where
    the shortcut is finite; masked execution turns an inf or NaN of the shortcut in a kept
    sample into NaN, sparse execution does not read it). Gradients agree
    too, except (scaled) the gradient with respect to a gate entry that is exactly 0, which
    sparse execution takes as 0 since F is not computed there (ReLU-1 gates have zero slope
    there anyway), and in training mode a BatchNorm inside the block takes its batch
    statistics over the kept samples only (masked: over all samples).

    capacity=None runs the block on exactly the kept samples, reading their count on the
    host (one sync per block, unless a SkipPlan row is passed to forward); capacity=C runs it
    on C rows, zero-padded, with no sync (see the module docstring).
    """

    def __init__(
        self,
        block: nn.Module,
        shortcut: Optional[nn.Module] = None,
        scaled: bool = False,
        execution: str = "sparse",
        backend: str = "auto",
        capacity: Optional[int] = None,
    ):
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"SkipBlock: block must be an nn.Module, got {type(block).__name__}")
        if shortcut is not None and not isinstance(shortcut, nn.Module):
            raise TypeError(f"SkipBlock: shortcut must be an nn.Module or None, got {type(shortcut).__name__}")
        self.block = block
        self.shortcut = shortcut
        # The block's own downsample is called through the block, not registered a second
        # time here, so the state dict keeps the block's own parameter names.
        self._use_block_downsample = shortcut is None and isinstance(getattr(block, "downsample", None), nn.Module)
        self.scaled = bool(scaled)
        self.execution = check_execution("SkipBlock", execution)
        self.backend = ops.check_backend("SkipBlock", backend)
        self.capacity = None if capacity is None else _checks.capacity("SkipBlock", capacity)

    def extra_repr(self) -> str:
        return f"scaled={self.scaled}, execution={self.execution!r}, backend={self.backend!r}, capacity={self.capacity}"

    def _shortcut(self, x):
        if self.shortcut is not None:
            return self.shortcut(x)
        return self.block.downsample(x) if self._use_block_downsample else x

    def _batchnorm_training(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.block.modules())

    def _shortcut_name(self) -> str:
        if self.shortcut is not None:
            return "shortcut"
        return "the block's downsample" if self._use_block_downsample else "identity"

    def _check_gate(self, x, gate):
        _checks.tensor("SkipBlock", "x", x)
        if x.dim() == 0:
            raise ValueError("SkipBlock: x must have a batch dimension, got a 0-d tensor")
        _checks.tensor("SkipBlock", "gate", gate, (1,), f"[N] = [{x.shape[0]}] (one entry per sample)")
        if gate.shape[0] != x.shape[0]:
            raise ValueError(f"SkipBlock: gate has {gate.shape[0]} entries but x has {x.shape[0]} samples; they must match")
        if not (gate.dtype.is_floating_point or gate.dtype == torch.bool):
            raise TypeError(f"SkipBlock: gate must be a floating or bool tensor, got {gate.dtype}")
        _checks.same_device("SkipBlock", "gate", gate, "x", x)

    def plan(self, gate: torch.Tensor) -> RowPlan:
        """Compact this block's gate (one host sync unless capacity is set): the RowPlan that
        SkipPlan(gate.unsqueeze(1))[0] gives, without its [N, B] transposes and views."""
        capacity = _check_capacity("SkipBlock", self.capacity, gate.shape[0])
        keep = active(gate, self.scaled)
        idx, count = ops.compact(keep, backend=self.backend)
        (rows,), exact = _rows_to_run("SkipBlock", count, capacity)
        return RowPlan(keep, idx, count, rows, exact)

    def forward(self, x: torch.Tensor, gate: torch.Tensor, plan: Optional[RowPlan] = None) -> torch.Tensor:
        """x [N, ...], gate [N]; plan: this block's row of a SkipPlan built from the same gate
        (then no sync here), or None to compact the gate now."""
        self._check_gate(x, gate)
        if self.execution == "masked":
            return self._masked(x, gate)
        if plan is None:
            plan = self.plan(gate)
        elif not isinstance(plan, RowPlan) or plan.keep.shape != gate.shape or plan.idx.device != x.device:
            raise ValueError(
                f"SkipBlock: plan must be the RowPlan of this gate (a SkipPlan row for {gate.shape[0]} samples on {x.device})"
            )
        if not plan.exact and self._batchnorm_training():
            raise RuntimeError(
                "SkipBlock: a fixed capacity pads the compact batch with zero rows, which would enter the "
                "batch statistics of the block's BatchNorm in training mode; use eval() or capacity=None"
            )
        # Resolved once per forward; gather and merge then only look it up.
        backend = _gating.resolved_backend("SkipBlock", self.backend, x.device)
        if self.scaled:
            return self._scaled_sparse(x, gate, plan, backend)
        return self._plain_sparse(x, plan, backend)

    def _masked(self, x, gate):
        base = self._shortcut(x)
        y = self.block(x)
        if y.shape != base.shape:
            raise _shape_error(y.shape[1:], base.shape[1:], self._shortcut_name())
        if self.scaled:
            return base + _row_mask(gate.to(y.dtype), y) * y
        m = _row_mask(active(gate, False).to(y.dtype), y)
        return y * m + base * (1 - m)

    def _run_kept(self, x, plan, backend):
        """(shortcut(x), the block on the compact batch of kept samples, or None if none kept)."""
        base = self._shortcut(x)
        if plan.none_kept:
            return base, None
        y = self.block(gather_kept(x, plan, backend))
        if y.shape[1:] != base.shape[1:]:
            raise _shape_error(y.shape[1:], base.shape[1:], self._shortcut_name())
        return base, y

    def _plain_sparse(self, x, plan, backend):
        base, y = self._run_kept(x, plan, backend)
        return base if y is None else merge_kept(base, y, plan, backend)

    def _scaled_sparse(self, x, gate, plan, backend):
        base, y = self._run_kept(x, plan, backend)
        if y is None:
            return base
        _check_compact_result("SkipBlock", base, y, plan.rows)
        if not base.dtype.is_floating_point:
            raise TypeError(f"SkipBlock: scaled=True needs a floating shortcut, got {base.dtype}")
        scale = gate.to(y.dtype) if gate.dtype == torch.bool else gate
        return _gating._scatter_add_rows(base, y, plan.idx, plan.count, scale, backend)


class SkipSequential(nn.Module):
    """A chain of SkipBlocks driven by one policy [N, B] (column b gates block b), planned
    with one `compact` call and (capacity=None) one host sync per forward for all blocks.
    `capacity` is the plan's (see SkipPlan); the blocks' own capacity applies only when a
    block is called alone and compacts its own gate."""

    def __init__(self, blocks: Iterable[SkipBlock], capacity: Optional[int] = None):
        super().__init__()
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, SkipBlock) for b in blocks):
            raise TypeError("SkipSequential: blocks must be a non-empty sequence of SkipBlock modules")
        if len({b.scaled for b in blocks}) != 1:
            raise ValueError("SkipSequential: all blocks must share one formula (all scaled or all plain)")
        self.blocks = nn.ModuleList(blocks)
        self.capacity = None if capacity is None else _checks.capacity("SkipSequential", capacity)

    @property
    def execution(self) -> str:
        return self.blocks[0].execution

    @execution.setter
    def execution(self, value: str):
        check_execution("SkipSequential", value)
        for b in self.blocks:
            b.execution = value

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        _checks.tensor("SkipSequential", "policy", policy, (2,), f"[N, {len(self.blocks)}] (samples x blocks)")
        if policy.shape[1] != len(self.blocks):
            raise ValueError(f"SkipSequential: policy has {policy.shape[1]} columns but there are {len(self.blocks)} blocks")
        plan = None
        if self.execution == "sparse":
            plan = SkipPlan(policy, scaled=self.blocks[0].scaled, capacity=self.capacity, backend=self.blocks[0].backend)
        for b, block in enumerate(self.blocks):
            x = block(x, policy[:, b], None if plan is None else plan[b])
        return x
