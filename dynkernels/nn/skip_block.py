"""Sample-gated residual blocks: run a block only on the samples whose gate keeps it.

A batch of N samples passes a residual block; a gate [N] says which samples keep it. The
papers (BlockDrop, SkipNet, LC-Net) compute the block on all N samples and multiply by the
gate ("masked" execution). Here ("sparse" execution) the kept samples are compacted into a
batch of their own (`compact` -> `gather_rows`), the block runs densely on that smaller
batch, and the results are put back in place (plain blocks: `scatter_rows`, one pass that
copies each output row once, from the block's result or from the shortcut; scaled ones:
`scatter_add_rows`, which adds s * F with the scale fused). No per-sample loops.

Rows a block runs on. The block is a dense module, so the number of rows of its compact
batch must be known on the host; it comes from one of:
    bucket (default "auto")   the kept count, read on the host (a host sync) and rounded up
                              to a bucket (dynkernels.nn.bucket): None = exact counts, an int
                              step (multiples of it, capped at N), or a sorted list of sizes.
                              "auto" = 8 on CUDA tensors (at most N/8 sizes, so cuDNN's
                              benchmark cache and CUDA graphs stay bounded), exact on the CPU
                              and in training mode. Padding rows are zero and never reach
                              the output (the merge ops write back only the first `count`
                              rows); they cost at most step - 1 extra rows of block work.
    capacity=C                one fixed size for every block: no host sync at all, the whole
                              forward is capturable as one CUDA graph, but it saves work only
                              where C < N bounds every block's kept count (checked where that
                              costs no sync: CPU tensors, or DYNKERNELS_CHECK_INDICES=1).
capacity and an explicit bucket exclude each other. Padding rows (bucket or capacity) would
enter the batch statistics of a BatchNorm in training mode: that is an error.

Host synchronisations per forward (reading a device value on the host; free on CPU tensors,
a stall of the launch queue on a GPU):
    execution="masked"                              0
    SkipBlock given a gate, sparse                  1 per block (reads its kept count)
    SkipPlan / SkipSequential / BlockDrop, sparse   1 for all B blocks (one count.tolist())
    any of these with capacity=C                    0
for the compiled and Triton backends; backend="torch" (the reference) also reads the count in
every gather / merge.

Per block the sparse path launches one gather and one merge kernel around the block (plus,
without a plan, `compact`, and for scaled gates one comparison). With cuda_graphs (inference
on CUDA tensors, see dynkernels.nn.graphs) the block itself is one graph replay per bucket
size, after a copy of the compact batch into the graph's static input; blocks kept by every
sample (no gather, no merge) and batches above the pool's max_rows run eagerly.

Per-forward CPU cost: the gate and the plan are checked, and the backend resolved, once per
forward; gather and merge then call the kernels without re-checking idx and count (they
come from `compact`), since on a GPU every microsecond of Python after a host sync leaves
the device idle. A plain block (identity shortcut, not scaled, eager) given its plan on CPU
tensors with no autograd recording goes through two C++ calls instead (the checks and the
gather; the merge): on an AMD EPYC (Zen 2) its host time above the block fell from 18 to
8 - 9 us on a tiny batch (`python -m dynkernels.bench --suite headline --only skip_blocks`).
"""
from typing import Iterable, List, Optional

import torch
import torch.nn as nn

from .. import ops
from .._extension import _C
from ..ops import _checks
from ..ops import sample_gating as _gating
from .compact_convs import compact_batch_convs
from .graphs import GraphPool, check_graphs_arg, check_inference, compact_like, graph_sizes
from .skip_plan import (
    RowPlan,
    SkipPlan,
    active,
    check_capacity,
    check_compact_result,
    check_rows_args,
    compactable,
    merge_result,
    plan_bucket,
    rows_to_run,
    run_kept,
)


EXECUTIONS = ("masked", "sparse")

# The host path of a plain SkipBlock given its plan on CPU tensors (csrc/python_calls.cpp:
# the forward's checks, the gather and the merge in two C++ calls, NotImplemented where they do
# not apply), or None without the compiled module.
_SKIP_GATHER = None if _C is None else _C.cpu_first.skip_gather
_SKIP_MERGE = None if _C is None else _C.cpu_first.skip_merge


def check_execution(owner: str, execution) -> str:
    if execution not in EXECUTIONS:
        raise ValueError(f"{owner}: execution must be one of {EXECUTIONS}, got {execution!r}")
    return execution


def _row_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, ...] broadcastable against `like`'s rows."""
    return mask.view((-1,) + (1,) * (like.dim() - 1))


def _shape_error(block_shape, shortcut_shape, shortcut_name):
    return ValueError(
        f"SkipBlock: the block maps a sample to shape {tuple(block_shape)} but the shortcut "
        f"({shortcut_name}) gives {tuple(shortcut_shape)}; a block that changes the shape (stride, "
        "channels) needs a shortcut that does the same, e.g. shortcut=<its downsample module>"
    )


def _batchnorms(module: nn.Module):
    return tuple(m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


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
    as 0/1. The gate may be computed on the device from x (SkipNet, ConvNet-AIG, L-Net):
    forward(x, gate) compacts it and reads its kept count (one small device-to-host copy).

    execution="masked" is the papers' dense-times-mask computation (plain:
    block(x) * m + shortcut(x) * (1 - m) with m = [g > 0]); execution="sparse" runs the block
    on the compact batch of kept samples only. Both give the same output (plain blocks: where
    the shortcut is finite; masked execution turns an inf or NaN of the shortcut in a kept
    sample into NaN, sparse execution does not read it). Gradients agree
    too, except (scaled) the gradient with respect to a gate entry that is exactly 0, which
    sparse execution takes as 0 since F is not computed there (ReLU-1 gates have zero slope
    there anyway), and in training mode a BatchNorm inside the block takes its batch
    statistics over the kept samples only (masked: over all samples).

    inplace (plain blocks; settable): where no autograd graph is recorded, the kept rows are
    written into the shortcut's output, which is returned (under the identity shortcut: into
    x itself), as nn.ReLU(inplace=True) writes into its input: no new tensor and no copy of
    the dropped rows. For a caller that does not need x afterwards (the models use it
    between their own blocks); with autograd recording, or scaled, the merge is out of place.

    bucket / capacity: the rows the block runs on (module docstring). cuda_graphs: False
    (eager), True (a GraphPool of its own) or a GraphPool shared with other blocks: the block
    replays a CUDA graph per bucket size (inference only: eval mode, no autograd, CUDA
    tensors, else an error; see dynkernels.nn.graphs). Settable after construction.
    """

    def __init__(
        self,
        block: nn.Module,
        shortcut: Optional[nn.Module] = None,
        scaled: bool = False,
        execution: str = "sparse",
        backend: str = "auto",
        capacity: Optional[int] = None,
        bucket="auto",
        cuda_graphs=False,
        inplace: bool = False,
    ):
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"SkipBlock: block must be an nn.Module, got {type(block).__name__}")
        if shortcut is not None and not isinstance(shortcut, nn.Module):
            raise TypeError(f"SkipBlock: shortcut must be an nn.Module or None, got {type(shortcut).__name__}")
        self.block = block
        self.shortcut = shortcut
        self.scaled = bool(scaled)
        self.execution = check_execution("SkipBlock", execution)
        self.backend = ops.check_backend("SkipBlock", backend)
        self.capacity, self.bucket = check_rows_args("SkipBlock", capacity, bucket)
        self.cuda_graphs = cuda_graphs
        self.inplace = inplace
        self._bns = _batchnorms(block)  # refreshed by train() / eval()

    _inplace = False  # (the default for a SkipBlock pickled before the attribute existed)
    _lean = False  # (likewise)

    @property
    def inplace(self) -> bool:
        """Whether the merge writes into the shortcut's output (see the class docstring)."""
        return self._inplace

    @inplace.setter
    def inplace(self, value):
        if not isinstance(value, bool):
            raise TypeError(f"SkipBlock: inplace must be a bool, got {value!r}")
        self._inplace = value

    @property
    def cuda_graphs(self) -> Optional[GraphPool]:
        """The GraphPool the block's graphs live in, or None (eager)."""
        return self._graph_pool

    @cuda_graphs.setter
    def cuda_graphs(self, value):
        self._graph_pool = check_graphs_arg("SkipBlock", value)

    def extra_repr(self) -> str:
        return (f"scaled={self.scaled}, execution={self.execution!r}, backend={self.backend!r}, "
                f"capacity={self.capacity}, bucket={self.bucket!r}, cuda_graphs={self._graph_pool is not None}, "
                f"inplace={self._inplace}")

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("block", "shortcut"):
            block, shortcut = self.__dict__["_modules"].get("block"), getattr(self, "shortcut", None)
            # The block's own downsample is called through the block, not registered a second
            # time here, so the state dict keeps the block's own parameter names.
            downsample = shortcut is None and isinstance(getattr(block, "downsample", None), nn.Module)
            # Plain attributes for the hot path (no nn.Module.__getattr__ per forward), set
            # whenever block or shortcut is assigned.
            self.__dict__.update(_block=block, _use_block_downsample=downsample,
                                 _identity_shortcut=shortcut is None and not downsample)
        if name in ("block", "shortcut", "execution", "scaled", "backend", "_graph_pool"):
            # Whether forward tries the two-call host path first (_SKIP_GATHER, _SKIP_MERGE).
            d = self.__dict__
            d["_lean"] = (_SKIP_GATHER is not None and d.get("execution") == "sparse" and d.get("scaled") is False
                          and d.get("backend") in ("auto", "cpu") and d.get("_graph_pool", False) is None
                          and d.get("_identity_shortcut") is True)

    def train(self, mode: bool = True):
        self._bns = _batchnorms(self.block)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # Graphs replay the parameters they were captured with: moved ones need new graphs.
        if self._graph_pool is not None:
            self._graph_pool.forget(self.block)
        return super()._apply(fn, *args, **kwargs)

    def _shortcut(self, x):
        if self.shortcut is not None:
            return self.shortcut(x)
        return self.block.downsample(x) if self._use_block_downsample else x

    def _shortcut_name(self) -> str:
        if self.shortcut is not None:
            return "shortcut"
        return "the block's downsample" if self._use_block_downsample else "identity"

    def _check_gate(self, x, gate):
        if (type(x) is torch.Tensor and type(gate) is torch.Tensor and gate.dim() == 1 and x.dim() > 0
                and gate.shape[0] == x.shape[0] and (gate.dtype.is_floating_point or gate.dtype == torch.bool)
                and gate.device == x.device):
            return
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
        n = gate.shape[0]
        capacity = check_capacity("SkipBlock", self.capacity, n)
        k = _gating.resolved_kernels("SkipBlock", self.backend, gate.device)
        idx, count = k.compact(compactable(gate, self.scaled), 0.0)
        bucket = plan_bucket(self.bucket, gate.device, self.training)
        (rows,), (kept,) = rows_to_run("SkipBlock", count, n, capacity, bucket)
        return RowPlan(idx, count, rows, kept, n)

    def forward(self, x: torch.Tensor, gate: torch.Tensor, plan: Optional[RowPlan] = None) -> torch.Tensor:
        """x [N, ...], gate [N]; plan: this block's row of a SkipPlan built from the same gate
        (then no sync here), or None to compact the gate now."""
        if plan is not None and self._lean and type(plan) is RowPlan and not torch.compiler.is_compiling():
            # Plain CPU tensors, no autograd: the checks, gather and merge in C++ (NotImplemented
            # where a case of the path below applies, or an argument is bad).
            compact = _SKIP_GATHER(x, gate, plan)
            if compact is not NotImplemented:
                with compact_batch_convs(plan.n, plan.rows, x.device):
                    y = self._block(compact)
                out = _SKIP_MERGE(x, y, plan, self._inplace)
                if out is not NotImplemented:
                    return out
                k = _gating.resolved_kernels("SkipBlock", self.backend, x.device)
                return merge_result("SkipBlock", x, y, plan, k, None, self._check_result, self._inplace)
        # One compound test accepts the usual arguments (each attribute read once); anything
        # else goes to _check_gate, which says what is wrong (or accepts a tensor subclass).
        device = x.device if type(x) is torch.Tensor else None
        n = gate.shape[0] if type(gate) is torch.Tensor and gate.dim() == 1 else -1
        if not (device is not None and x.dim() and n == x.shape[0] and (gate.dtype.is_floating_point or gate.dtype is torch.bool)
                and gate.device == device):
            self._check_gate(x, gate)
            device, n = x.device, gate.shape[0]
        if self.execution == "masked":
            return self._masked(x, gate)
        if plan is None:
            plan = self.plan(gate)
        elif type(plan) is not RowPlan or plan.n != n or plan.idx.device != device:
            raise ValueError(f"SkipBlock: plan must be the RowPlan of this gate (a SkipPlan row for {n} samples on {device})")
        if plan.rows != plan.kept and any(m.training for m in self._bns):
            raise RuntimeError(
                "SkipBlock: a bucket or a fixed capacity pads the compact batch with zero rows, which would "
                "enter the batch statistics of the block's BatchNorm in training mode; use eval(), "
                "bucket=None or bucket='auto' (exact in training mode)"
            )
        graphs = self._graph_pool
        if graphs is not None:
            check_inference("SkipBlock", self.training or self._block.training, x)
        # Resolved once per forward; gather and merge then go straight to the kernels.
        k = _gating.resolved_kernels("SkipBlock", self.backend, device)
        base = x if self._identity_shortcut else self._shortcut(x)
        if not self.scaled:
            return run_kept("SkipBlock", self._block, (x,), base, plan, k, graphs, None, self._check_result, self._inplace)
        if not base.dtype.is_floating_point:
            raise TypeError(f"SkipBlock: scaled=True needs a floating shortcut, got {base.dtype}")
        scale = gate.to(base.dtype) if gate.dtype is torch.bool else gate
        return run_kept("SkipBlock", self._block, (x,), base, plan, k, graphs, scale, self._check_result)

    def _check_result(self, owner, base, y, rows):
        """A block result of another row shape than the shortcut's: the block changes the
        shape and the shortcut does not (the likely cause), said in those words."""
        if isinstance(y, torch.Tensor) and y.dim() > 0 and y.shape[1:] != base.shape[1:]:
            raise _shape_error(y.shape[1:], base.shape[1:], self._shortcut_name())
        check_compact_result(owner, base, y, rows)

    def _masked(self, x, gate):
        base = self._shortcut(x)
        y = self.block(x)
        if y.shape != base.shape:
            raise _shape_error(y.shape[1:], base.shape[1:], self._shortcut_name())
        if self.scaled:
            return base + _row_mask(gate.to(y.dtype), y) * y
        m = _row_mask(active(gate, False).to(y.dtype), y)
        return y * m + base * (1 - m)

    @torch.no_grad()
    def capture_graphs(self, x: torch.Tensor, sizes: Optional[Iterable[int]] = None) -> int:
        """Capture the block's CUDA graphs ahead of their first use, for compact batches of x's
        row shape, dtype and layout: `sizes` (default: every bucket size for x's batch size,
        up to the pool's max_rows). Needs cuda_graphs on and eval mode. Returns the number of
        graphs the pool holds."""
        return self._capture_graphs("SkipBlock.capture_graphs", x, x.shape[0], sizes, self.bucket, self.capacity)

    def _capture_graphs(self, owner, x, n, sizes, bucket, capacity) -> int:
        """Capture for compact batches of x's rows out of batches of n samples."""
        pool = self._graph_pool
        if pool is None:
            raise RuntimeError(f"{owner}: cuda_graphs is off; set cuda_graphs=True (or a GraphPool) first")
        sizes = graph_sizes(owner, bucket, capacity, n, x.device, sizes, pool)
        check_inference(owner, self.training or self.block.training, x)
        for s in sizes:
            pool.capture(self.block, compact_like(x, s))
        return len(pool)


class SkipSequential(nn.Module):
    """A chain of SkipBlocks driven by one policy [N, B] (column b gates block b), planned
    with one `compact` call and (capacity=None) one host sync per forward for all blocks.
    `capacity` and `bucket` are the plan's (see SkipPlan; "auto" is exact in training mode);
    the blocks' own apply only when a block is called alone and compacts its own gate.
    cuda_graphs: True or a GraphPool sets one pool on every block (settable; False turns them
    all off); at construction the default False leaves the blocks' own settings."""

    def __init__(self, blocks: Iterable[SkipBlock], capacity: Optional[int] = None, bucket="auto", cuda_graphs=False):
        super().__init__()
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, SkipBlock) for b in blocks):
            raise TypeError("SkipSequential: blocks must be a non-empty sequence of SkipBlock modules")
        if len({b.scaled for b in blocks}) != 1:
            raise ValueError("SkipSequential: all blocks must share one formula (all scaled or all plain)")
        self.blocks = nn.ModuleList(blocks)
        self.capacity, self.bucket = check_rows_args("SkipSequential", capacity, bucket)
        if cuda_graphs is not False:
            self.cuda_graphs = cuda_graphs

    @property
    def execution(self) -> str:
        return self.blocks[0].execution

    @execution.setter
    def execution(self, value: str):
        check_execution("SkipSequential", value)
        for b in self.blocks:
            b.execution = value

    @property
    def cuda_graphs(self) -> Optional[GraphPool]:
        return self.blocks[0].cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, value):
        pool = check_graphs_arg("SkipSequential", value)
        for b in self.blocks:
            b.cuda_graphs = pool

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        _checks.tensor("SkipSequential", "policy", policy, (2,), f"[N, {len(self.blocks)}] (samples x blocks)")
        if policy.shape[1] != len(self.blocks):
            raise ValueError(f"SkipSequential: policy has {policy.shape[1]} columns but there are {len(self.blocks)} blocks")
        plan = None
        if self.execution == "sparse":
            first = self.blocks[0]
            bucket = self.bucket if self.capacity is not None else plan_bucket(self.bucket, policy.device, self.training)
            plan = SkipPlan(policy, scaled=first.scaled, capacity=self.capacity, bucket=bucket, backend=first.backend)
        for b, block in enumerate(self.blocks):
            x = block(x, policy[:, b], None if plan is None else plan[b])
        return x

    @torch.no_grad()
    def capture_graphs(self, x: torch.Tensor, sizes: Optional[Iterable[int]] = None) -> int:
        """Capture every block's CUDA graphs ahead of their first use (SkipBlock.capture_graphs)
        for batches like x, the default sizes from this chain's bucket. Returns the number of
        graphs in the pool."""
        if self.cuda_graphs is None:
            raise RuntimeError("SkipSequential.capture_graphs: cuda_graphs is off; set cuda_graphs=True first")
        n, sample = x.shape[0], x[:1]
        for block in self.blocks:
            block._capture_graphs("SkipSequential.capture_graphs", sample, n, sizes, self.bucket, self.capacity)
            sample = block.block(sample)  # the next block's row shape
        return len(self.cuda_graphs)
