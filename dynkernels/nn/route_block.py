"""Routed blocks: every sample runs the one branch it chose (SpotTune, AR-Net, D2NN's control nodes).

A batch of N samples reaches a block of several branches; choice [N] says which branch each
sample takes. The papers run every branch on every sample and select ("masked" execution).
Here ("sparse" execution) `route` partitions the batch by branch on the device, each branch
runs densely on the compact batch of its own samples (`gather_rows` of its part of the route),
and its results are written straight into their rows of the output (`scatter_rows_`, in
place): every row is read once and written once, whatever the number of branches.

Host synchronisations: a branch is a dense module, so the rows it runs on must be known on the
host. One `offsets.tolist()` reads all branch sizes of a block, or of every block of a network
when their choices are known up front (RoutePlan over [N, B] choices):

    execution="masked"                         0 per forward
    RouteBlock, sparse                         1 per forward (all branch sizes at once)
    RoutePlan over B blocks, sparse            1 per forward for all B blocks

(backend="torch", the reference, also reads the counts in every gather and merge.) The same
read reveals choices outside [0, num_branches) at no extra cost (the GPU route kernels list such
rows after the last branch), so sparse execution always rejects them with an IndexError.

Bucketed batches (dynkernels.nn.bucket): with bucket="auto" a branch on CUDA tensors runs on
its sample count rounded up to a multiple of 8 (zero rows pad the compact batch and are never
merged back), exact counts on CPU tensors and in training mode (padding rows would enter the
batch statistics of a BatchNorm in training).
"""
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .. import ops
from .._layout import row_layout
from ..ops import _checks
from ..ops import sample_gating as _gating
from ..ops.route import _route, check_choice, check_num_branches
from .bucket import bucketed_rows, check_bucket, resolve_bucket
from .compact_convs import compact_batch_convs
from .skip_block import check_execution

Branch = Callable[[torch.Tensor], torch.Tensor]


class RouteRow(NamedTuple):
    """The route of one block.

    choice [N] (the branch of each sample), idx [N] int32 (branch 0's samples first, in order,
    then branch 1's, ...), counts [num_branches] int32 on the device (samples per branch),
    starts: offsets[0..num_branches] read on the host (branch b owns idx[starts[b]:starts[b+1]]).
    """

    choice: torch.Tensor
    idx: torch.Tensor
    counts: torch.Tensor
    starts: List[int]

    @property
    def num_branches(self) -> int:
        return len(self.starts) - 1

    def size(self, b: int) -> int:
        """Samples that chose branch b."""
        return self.starts[b + 1] - self.starts[b]


class RoutePlan:
    """The choices of B blocks for one batch, routed with ONE `route` call and read with ONE
    host synchronisation (`offsets.tolist()`).

    choices: [N] (one block) or [N, B] (column b: block b's choice per sample), integer, in
    [0, num_branches). `plan[b]` is block b's RouteRow. Out-of-range choices raise an
    IndexError (checked on the host values just read, so also on a GPU at no extra sync).
    """

    def __init__(self, choices: torch.Tensor, num_branches: int, backend: str = "auto"):
        num_branches = check_num_branches("RoutePlan", num_branches)
        check_choice("RoutePlan", choices, num_branches, "choices", "[N] or [N, B] (samples x blocks)")
        per_block = (choices.unsqueeze(1) if choices.dim() == 1 else choices).t().contiguous()  # [B, N]
        self._rows = _route_rows("RoutePlan", per_block, num_branches, backend)
        self.host_syncs = 1

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, b: int) -> RouteRow:
        return self._rows[b]


def _route_rows(owner: str, per_block: torch.Tensor, num_branches: int, backend: str) -> List[RouteRow]:
    """The RouteRow of each row of a checked [B, N] choice: one route call, one host sync.
    Out-of-range choices (listed after the last branch by the GPU kernels) show in the sizes
    read and raise an IndexError."""
    kernels = _gating.resolved_backend(owner, backend, per_block.device)
    idx, offsets = _route(per_block, num_branches, kernels)
    counts = offsets[:, 1:] - offsets[:, :-1]
    starts = offsets.tolist()  # the one host synchronisation
    n = per_block.shape[1]
    for b, s in enumerate(starts):
        if s[-1] != n:
            raise IndexError(f"{owner}: {n - s[-1]} of the {n} choices of block {b} are outside [0, {num_branches})")
    return [RouteRow(c, i, k, s) for c, i, k, s in zip(per_block.unbind(0), idx.unbind(0), counts.unbind(0), starts)]


def _check_branch_result(owner: str, y: torch.Tensor, rows: int, like: Optional[torch.Tensor], b: int):
    if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != rows:
        raise ValueError(f"{owner}: branch {b} must return a tensor of {rows} rows (one per input row), got {getattr(y, 'shape', type(y).__name__)}")
    if like is not None and (y.shape[1:] != like.shape[1:] or y.dtype != like.dtype or y.device != like.device):
        raise ValueError(
            f"{owner}: every branch must map a sample to the same shape and dtype; branch {b} gives "
            f"{tuple(y.shape[1:])} {y.dtype} on {y.device}, an earlier one {tuple(like.shape[1:])} {like.dtype} on {like.device}"
        )


def run_sparse(
    x: torch.Tensor,
    branches: Sequence[Optional[Branch]],
    row: RouteRow,
    bucket=None,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
    owner: str = "RouteBlock",
) -> torch.Tensor:
    """Branch b on the compact batch of the samples that chose it, merged in place into one output.

    row: the RouteRow of x's batch (its idx and counts come from `route`, so they are not
    checked again); bucket: a resolved bucket (None, a step, or sizes; see nn.bucket); backend:
    for the gathers and merges. out: None (a new output), or a tensor [N, ...] the branches'
    results are written into (and returned). A branch None is not run: its samples keep their
    rows of out, which is then required. Branches that no sample chose are not called; a
    branch every sample chose runs on x itself (the route is then the identity). No host sync
    beyond the one that made `row`.

    Where autograd records (grad mode), a branch no sample chose runs on an empty batch, and a
    branch every sample chose on its gathered batch like the others, so that every branch's
    parameters take part in the backward (exact zero gradients for the unchosen ones):
    DistributedDataParallel without find_unused_parameters waits for a gradient of every
    parameter, and another process's samples may have chosen the branch.
    """
    n = x.shape[0]
    if row.idx.shape[0] != n or row.idx.device != x.device:
        raise ValueError(f"{owner}: the route is for {row.idx.shape[0]} samples on {row.idx.device}, x has {n} on {x.device}")
    if len(branches) != row.num_branches:
        raise ValueError(f"{owner}: the route has {row.num_branches} branches but {len(branches)} were given")
    if out is None and any(b is None for b in branches):
        raise ValueError(f"{owner}: a branch that is not run (None) keeps its samples' rows of `out`, so out must be given")
    kernels = _gating.resolved_backend(owner, backend, x.device)
    k = _gating.kernels(kernels)
    every_branch = torch.is_grad_enabled() and len(branches) > 1  # (see the docstring)
    for b, branch in enumerate(branches):
        size = row.size(b)
        if branch is None or (size == 0 and not every_branch):
            continue
        if size == n and not every_branch:  # every sample chose this branch
            y = branch(x)
            _check_branch_result(owner, y, n, out, b)
            return y
        rows = bucketed_rows(size, bucket, n)
        part, count = row.idx[row.starts[b]:], row.counts[b : b + 1]
        compact = k.gather_rows(x, part, count, rows)
        with compact_batch_convs(n, rows, x.device):
            y = branch(compact)
        _check_branch_result(owner, y, rows, out, b)
        if out is None:
            out = torch.empty((n,) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device, memory_format=row_layout(y))
        out = k.scatter_rows_(out, y, part, count)
    if out is None:  # an empty batch: the first branch gives the output's shape
        out = branches[0](x)
    return out


def run_masked(x: torch.Tensor, branches: Sequence[Branch], choice: torch.Tensor, owner: str = "RouteBlock") -> torch.Tensor:
    """Every branch on every sample, then each sample's row from the branch it chose (the
    papers' execution; a choice outside [0, len(branches)) gives a zero row). No host sync."""
    ys = []
    for b, branch in enumerate(branches):
        y = branch(x)
        _check_branch_result(owner, y, x.shape[0], ys[0] if ys else None, b)
        ys.append(y)
    pick = choice.view((-1,) + (1,) * (ys[0].dim() - 1))
    out = torch.zeros_like(ys[0])
    for b, y in enumerate(ys):
        out = torch.where(pick == b, y, out)
    return out


def training_bucket(owner: str, bucket, module: nn.Module, device: torch.device):
    """The bucket to use now: "auto" is exact counts while `module` trains (padding rows would
    enter BatchNorm's batch statistics); an explicit bucket with a BatchNorm in training mode
    is an error."""
    if bucket == "auto" and module.training:
        return None
    resolved = resolve_bucket(bucket, device)
    if resolved is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules()):
        raise RuntimeError(
            f"{owner}: bucket={bucket!r} pads compact batches with zero rows, which would enter the batch "
            "statistics of a BatchNorm in training mode; use eval(), bucket=None or bucket='auto'"
        )
    return resolved


class RouteBlock(nn.Module):
    """Run each sample through the one branch it chose.

    forward(x, choice): x [N, ...], choice [N] integer in [0, len(branches)). Every branch maps
    a sample to the same shape; out[n] = branches[choice[n]](x)[n].

    execution="sparse" (default) runs branch b only on the samples that chose it (a compact
    batch, bucketed per `bucket`), writes its results into their rows of the output in place,
    and reads all branch sizes with one host synchronisation per forward (none here when a
    RoutePlan row is passed: the plan paid it for all its blocks). execution="masked" runs
    every branch on every sample and selects (the papers' semantics). Both give the same
    output (in training mode, BatchNorm batch statistics are taken over each branch's own
    samples in sparse execution); gradients reach each branch through the samples that chose
    it only. Out-of-range choices raise an IndexError in sparse execution (and in masked
    execution on CPU tensors, or on a GPU with DYNKERNELS_CHECK_INDICES=1; unchecked, masked
    execution gives them a zero row).
    """

    def __init__(self, branches: Sequence[nn.Module], execution: str = "sparse", backend: str = "auto", bucket="auto"):
        super().__init__()
        branches = list(branches)
        if not branches or not all(isinstance(b, nn.Module) for b in branches):
            raise TypeError("RouteBlock: branches must be a non-empty sequence of nn.Module")
        self.branches = nn.ModuleList(branches)
        self.execution = check_execution("RouteBlock", execution)
        self.backend = ops.check_backend("RouteBlock", backend)
        self.bucket = check_bucket("RouteBlock", bucket)

    def extra_repr(self) -> str:
        return f"execution={self.execution!r}, backend={self.backend!r}, bucket={self.bucket!r}"

    def _check_input(self, x, choice):
        _checks.tensor("RouteBlock", "x", x)
        if x.dim() == 0:
            raise ValueError("RouteBlock: x must have a batch dimension, got a 0-d tensor")
        _checks.tensor("RouteBlock", "choice", choice, (1,), f"[N] = [{x.shape[0]}] (one branch per sample)")
        if choice.shape[0] != x.shape[0]:
            raise ValueError(f"RouteBlock: choice has {choice.shape[0]} entries but x has {x.shape[0]} samples; they must match")
        _checks.same_device("RouteBlock", "choice", choice, "x", x)

    def plan(self, choice: torch.Tensor) -> RouteRow:
        """Route this block's checked choice (one host sync): what RoutePlan(choice, len(branches))[0] gives."""
        return _route_rows("RouteBlock", choice.unsqueeze(0), len(self.branches), self.backend)[0]

    def forward(self, x: torch.Tensor, choice: torch.Tensor, plan: Optional[RouteRow] = None) -> torch.Tensor:
        """plan: this block's row of a RoutePlan built from the same choice (then no sync here)."""
        self._check_input(x, choice)
        check_choice("RouteBlock", choice, len(self.branches), shape=f"[N] = [{x.shape[0]}] (one branch per sample)")
        if self.execution == "masked":
            return run_masked(x, self.branches, choice)
        if plan is None:
            plan = self.plan(choice)
        elif not isinstance(plan, RouteRow) or plan.choice.shape != choice.shape:
            raise ValueError(f"RouteBlock: plan must be the RouteRow of this choice (a RoutePlan row for {choice.shape[0]} samples)")
        bucket = training_bucket("RouteBlock", self.bucket, self, x.device)
        return run_sparse(x, self.branches, plan, bucket, self.backend)
