"""Plans of sample-gated blocks: which rows each block runs on, and the unchecked gather ->
block -> merge that SkipBlock and the models share.

A RowPlan is one block's compacted gate: idx and count from `compact`, the rows its compact
batch has (the kept count bucketed, or a fixed capacity; see dynkernels.nn.skip_block for
the rules and their host synchronisations) and the kept count read on the host. A SkipPlan
compacts the gates of B blocks with one `compact` call and one host read. `run_kept` is the
per-block hot path: gather, block (eager or a CUDA-graph replay), merge, without re-checking
what the caller checked once per forward; `gather_kept` and `merge_kept` are its checked
public pieces.
"""
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from .. import ops
from ..ops import _checks
from ..ops import sample_gating as _gating
from . import bucket as _bucket
from .compact_convs import compact_batch_convs
from .graphs import GraphPool


def active(gate: torch.Tensor, scaled: bool) -> torch.Tensor:
    """Which gate entries run the block: gate > 0 (plain), gate != 0 (scaled: any non-zero
    scale, also a negative one from a leaky ReLU-1, changes the output)."""
    if gate.dtype == torch.bool:
        return gate
    return gate != 0 if scaled else gate > 0


def compactable(gate: torch.Tensor, scaled: bool) -> torch.Tensor:
    """What compact(., threshold 0) partitions into the active entries: the gate itself for
    plain and bool gates (compact compares with 0 in its own kernel), gate != 0 for scaled ones."""
    return gate != 0 if scaled and gate.dtype != torch.bool else gate


class RowPlan(NamedTuple):
    """The compacted gate of one block.

    idx [N] int32 (kept rows first, in order), count [1] int32 (number kept, on the device),
    rows (rows the block runs on: the kept count, bucketed, or a fixed capacity), kept (the
    kept count read on the host, None with a fixed capacity), n (the batch size N).
    """

    idx: torch.Tensor
    count: torch.Tensor
    rows: int
    kept: Optional[int]
    n: int

    @property
    def none_kept(self) -> bool:
        return self.rows == 0

    @property
    def all_kept(self) -> bool:
        # With every row kept, compact's stable partition is the identity permutation, so the
        # compact batch is the input itself: no gather, no scatter.
        return self.kept == self.n


def check_capacity(owner: str, capacity: Optional[int], n: int) -> Optional[int]:
    if capacity is not None:
        capacity = _checks.capacity(owner, capacity)
        if capacity > n:
            raise ValueError(f"{owner}: capacity must be at most the batch size {n}, got {capacity}")
    return capacity


def check_rows_args(owner: str, capacity, bucket):
    """(capacity, bucket) checked: capacity None or a non-negative int, bucket as
    dynkernels.nn.bucket.check_bucket; a capacity excludes an explicit bucket."""
    capacity = None if capacity is None else _checks.capacity(owner, capacity)
    bucket = _bucket.check_bucket(owner, bucket)
    if capacity is not None and bucket != _bucket.AUTO:
        raise ValueError(
            f"{owner}: give capacity (one fixed size, no host sync) or bucket (sizes from a bounded set, "
            f"one host sync per plan), not both; got capacity={capacity}, bucket={bucket!r}"
        )
    return capacity, bucket


def plan_bucket(bucket, device: torch.device, training: bool):
    """The resolved bucket of a forward: "auto" means exact counts in training mode (padding rows
    would enter BatchNorm's batch statistics), else the device's default."""
    if bucket == _bucket.AUTO and training:
        return None
    return _bucket.resolve_bucket(bucket, device)


def rows_to_run(owner: str, count: torch.Tensor, n: int, capacity: Optional[int], bucket):
    """(rows each block runs on, the kept counts or None): the kept counts, read with one host
    synchronisation and bucketed, or (capacity=C) C for every block, without reading them (C
    >= every count is checked where that costs no sync: on CPU tensors, or on a GPU when
    DYNKERNELS_CHECK_INDICES=1; not while torch.compile traces, where reading a count would
    break the graph)."""
    if capacity is None:
        kept = count.tolist()
        if bucket is None:
            return kept, kept
        return [_bucket.bucketed_rows(c, bucket, n) for c in kept], kept
    if not torch.compiler.is_compiling() and (count.device.type == "cpu" or _checks.CHECK_INDICES_ON_GPU):
        most = int(count.max()) if count.numel() else 0
        if most > capacity:
            raise ValueError(
                f"{owner}: capacity={capacity} but a block keeps {most} samples; capacity must "
                "be at least the largest number of samples kept by one block"
            )
    return [capacity] * count.shape[0], [None] * count.shape[0]


class SkipPlan:
    """The gates of B blocks for one batch, compacted with ONE `compact` call.

    policy: [N, B] (one column per block, e.g. BlockDrop's policy), floating or bool.
    capacity=None reads all B kept counts with one host synchronisation (`count.tolist()`)
    and rounds each up to `bucket` ("auto": 8 on CUDA tensors, exact elsewhere; the rules:
    dynkernels.nn.skip_block); capacity=C reads none and sizes every block's compact batch to C rows
    (C must be at least every block's kept count: checked where that costs no sync, i.e. on
    CPU tensors, or on a GPU when DYNKERNELS_CHECK_INDICES=1). `plan[b]` is block b's RowPlan.
    """

    def __init__(
        self,
        policy: torch.Tensor,
        *,
        scaled: bool = False,
        capacity: Optional[int] = None,
        bucket="auto",
        backend: str = "auto",
    ):
        _checks.tensor("SkipPlan", "policy", policy, (2,), "[N, B] (samples x blocks)")
        if not (policy.dtype.is_floating_point or policy.dtype == torch.bool):
            raise TypeError(f"SkipPlan: policy must be a floating or bool tensor, got {policy.dtype}")
        ops.check_backend("SkipPlan", backend)
        capacity, bucket = check_rows_args("SkipPlan", capacity, bucket)
        n = policy.shape[0]
        capacity = check_capacity("SkipPlan", capacity, n)
        self.scaled = bool(scaled)
        k = _gating.resolved_kernels("SkipPlan", backend, policy.device)
        gates = compactable(policy, self.scaled).t().contiguous()  # [B, N]: one row per block
        self.idx, self.count = k.compact(gates, 0.0)
        self.rows: List[int]
        self.rows, self.kept = rows_to_run("SkipPlan", self.count, n, capacity, _bucket.resolve_bucket(bucket, policy.device))
        self.host_syncs = 1 if capacity is None else 0
        # Every block's row at once (two calls, not two slices per block and forward).
        self._row_plans = [
            RowPlan(idx, count, rows, kept, n)
            for idx, count, rows, kept in zip(self.idx.unbind(0), self.count.split(1), self.rows, self.kept)
        ]

    def __len__(self) -> int:
        return self.idx.shape[0]

    def __getitem__(self, b: int) -> RowPlan:
        return self._row_plans[b]


def check_plan_rows(owner: str, name: str, t: torch.Tensor, row: RowPlan):
    """t has the plan's samples, on the plan's device (cheap: no value is read)."""
    n = row.idx.shape[0]
    if t.dim() == 0 or t.shape[0] != n or t.device != row.idx.device:
        raise ValueError(
            f"{owner}: {name} has shape {tuple(t.shape)} on {t.device}, but the plan is for {n} samples on {row.idx.device}"
        )


def check_compact_result(owner: str, base: torch.Tensor, y: torch.Tensor, rows: int):
    """y: the block's result on the compact batch of `rows` rows, to be merged into base."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{owner}: the block must return a tensor, got {type(y).__name__}")
    if y.dim() != base.dim() or y.shape[0] != rows or y.shape[1:] != base.shape[1:]:
        raise ValueError(
            f"{owner}: the compact result must be [{rows}, {', '.join(map(str, base.shape[1:]))}] "
            f"(the compact batch's rows, base's row shape), got {tuple(y.shape)}"
        )
    if y.dtype != base.dtype:
        raise TypeError(f"{owner}: the compact result must have base's dtype {base.dtype}, got {y.dtype}")
    if y.device != base.device:
        raise ValueError(f"{owner}: the compact result is on {y.device} but base is on {base.device}")


def run_kept(
    owner: str,
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    base: torch.Tensor,
    row: RowPlan,
    k: _gating.Kernels,
    graphs: Optional[GraphPool] = None,
    scale: Optional[torch.Tensor] = None,
    check_result: Callable = None,
    inplace: bool = False,
) -> torch.Tensor:
    """base with the kept rows merged with fn(*the compact batches of inputs): replaced
    (scale None: scatter_rows) or added to, scaled (scatter_add_rows).

    inplace (scale None only): where no autograd graph is recorded, the kept rows are written
    into base itself (scatter_rows_), which is returned: no new tensor and no copy of the
    dropped rows. For callers that own base and do not need it afterwards.

    Unchecked: the caller has checked inputs and base against the plan (samples, device) and
    resolved the backend's kernels k. fn runs eagerly (under compact_batch_convs), or (graphs
    given) as that pool's graph replay. fn's result is checked against base (rows, row shape,
    dtype, device: see merge_result); where it does not fit, check_result(owner, base, y, rows)
    (default check_compact_result) raises.

    A block no row keeps is not run, except where autograd records (grad mode): there it runs
    on an empty batch, so that its parameters take part in the backward with exact zero
    gradients. DistributedDataParallel (without find_unused_parameters) waits for a gradient
    of every parameter, and another process may have run the block; an empty batch costs a
    few empty kernel calls and the merge one copy of base (BatchNorm leaves its running
    statistics alone on an empty batch).
    """
    rows = row.rows
    if rows == 0 and not torch.is_grad_enabled():
        return base
    if row.kept == row.n:  # every row kept: the inputs are their own compact batch
        y = fn(*inputs)
        base, y = autocast_merge_dtypes(base, y)
        if type(y) is not torch.Tensor or y.shape != base.shape or y.dtype != base.dtype:
            (check_compact_result if check_result is None else check_result)(owner, base, y, rows)
        return y if scale is None else k.scatter_add_rows(base, y, row.idx, row.count, scale)
    if len(inputs) == 1:
        compact = (k.gather_rows(inputs[0], row.idx, row.count, rows),)
    else:
        compact = tuple(k.gather_rows(t, row.idx, row.count, rows) for t in inputs)
    if graphs is None:
        with compact_batch_convs(row.n, rows, base.device):
            y = fn(*compact)
        return merge_result(owner, base, y, row, k, scale, check_result, inplace)
    with graphs.lock:  # the replay's output is static: merged before the next replay
        return merge_result(owner, base, graphs.run(fn, *compact), row, k, scale, check_result, inplace)


def autocast_merge_dtypes(base, y):
    """(base, y) in one dtype where torch.autocast is on and they are floating tensors of two
    dtypes (a block's result in the autocast dtype, an identity shortcut of a float32 input):
    the promoted one, which masked execution's arithmetic (y * m + base * (1 - m)) gives.
    Otherwise unchanged (outside autocast two dtypes are an error of the block)."""
    if (type(y) is torch.Tensor and y.dtype != base.dtype and y.dtype.is_floating_point and base.dtype.is_floating_point
            and base.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(base.device.type)):
        dtype = torch.promote_types(base.dtype, y.dtype)
        return base.to(dtype), y.to(dtype)
    return base, y


def merge_result(owner, base, y, row, k, scale, check_result, inplace=False):
    """The merge of the compact result y into base (inplace: into base itself, see run_kept).
    The compiled kernels check y's row shape, dtype and device against base's themselves
    (k.checks_merge): then only what they cannot see is tested here (a tensor of the compact
    batch's rows; not a meta tensor, which would dispatch to the fake kernel), and a kernel's
    refusal (a RuntimeError) becomes the error of check_result (default
    check_compact_result), which names the problem."""
    base, y = autocast_merge_dtypes(base, y)
    # (`is None`, not `or`: torch 2.11's dynamo cannot take the truth of a bound method)
    rows, check = row.rows, check_compact_result if check_result is None else check_result
    if not (k.checks_merge and type(y) is torch.Tensor and y.dim() and y.shape[0] == rows and not y.is_meta):
        # (tuple slices: slicing a torch.Size costs several times more)
        if type(y) is not torch.Tensor or y.dtype != base.dtype or tuple(y.shape) != (rows,) + tuple(base.shape)[1:]:
            check(owner, base, y, rows)
    if scale is None:
        if inplace and not (torch.is_grad_enabled() and (base.requires_grad or y.requires_grad)):
            return _gating.kernel_first(k.scatter_rows_, (base, y, row.idx, row.count), check, owner, base, y, rows)
        return _gating.kernel_first(k.scatter_rows, (base, y, row.idx, row.count), check, owner, base, y, rows)
    return _gating.kernel_first(k.scatter_add_rows, (base, y, row.idx, row.count, scale), check, owner, base, y, rows)


def gather_kept(x: torch.Tensor, row: RowPlan, backend: str = "auto") -> torch.Tensor:
    """The compact batch: x's kept rows in order (plus zero rows up to row.rows).

    row: a SkipPlan row for x's batch. Its idx and count come from `compact`, so they are not
    checked again here; only that x has the plan's samples and device. Run the block on it
    under `compact_batch_convs(row.n, row.rows, x.device)`, as SkipBlock does: on the CPU at one
    thread that keeps its large 1x1 convs on oneDNN (see dynkernels.nn.compact_convs).
    """
    if row.all_kept:
        return x
    check_plan_rows("gather_kept", "x", x, row)
    return _gating.resolved_kernels("gather_kept", backend, x.device).gather_rows(x, row.idx, row.count, row.rows)


def merge_kept(base: torch.Tensor, y: torch.Tensor, row: RowPlan, backend: str = "auto") -> torch.Tensor:
    """out = base with the kept rows replaced by the compact results y (its rows past the
    kept count, the padding, are not read).

    One pass (`scatter_rows`): every output row is copied once, from y (kept) or from base
    (dropped); the kept rows of base are not read. So a non-finite value in a kept row of
    base does not reach the output, while the masked execution, y * m + base * (1 - m), gives
    NaN there (inf * 0); the two executions agree wherever base is finite.
    """
    if row.all_kept:
        return y
    check_plan_rows("merge_kept", "base", base, row)
    check_compact_result("merge_kept", base, y, row.rows)
    return _gating.resolved_kernels("merge_kept", backend, base.device).scatter_rows(base, y, row.idx, row.count)
