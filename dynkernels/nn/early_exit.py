"""Early exit (MSDNet, D2NN's cascade): a sample leaves at the first exit confident enough, and
later stages run only on the samples still in.

K stages in sequence, an exit (a classifier) after each. Sample n exits at the first k whose
confidence reaches its threshold, score_k(n) >= threshold[k], where score_k is the max-softmax
of exit k's logits (or a controller's output in [0, 1], as D2NN's control nodes give); the
last exit takes every sample still in. The output is each sample's logits at its exit, and
the exit index.

execution="masked" runs every stage and exit on every sample and selects (how the public code
evaluates it); execution="sparse" runs stage k on the compact batch of the samples not yet
exited: after each exit the staying samples are compacted (`compact`, `gather_rows` of every
tensor of the stage's state), and each exit's logits go straight into their rows of the output
(`scatter_rows_`, in place; a staying sample's row is overwritten by a later exit).

Host synchronisations: whether stage k + 1 runs, and on how many rows, depends on stage k's
exit, so sparse execution reads one count per exit but the last: K - 1 per forward (masked: 0).
Bucketed batches as in dynkernels.nn.route_block (bucket="auto": steps of 8 on CUDA tensors in
eval mode, exact counts otherwise).

The two executions give the same output, except for a sample whose score is within rounding
of a threshold: a stage run on a smaller batch may round differently (another conv algorithm),
and such a sample can then exit at a neighbouring exit.
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .. import ops
from ..ops import sample_gating as _gating
from .bucket import bucketed_rows, check_bucket
from .compact_convs import compact_batch_convs
from .route_block import training_bucket
from .skip_block import check_execution

State = Union[torch.Tensor, Sequence[torch.Tensor]]


def check_thresholds(owner: str, threshold, num_exits: int) -> List[float]:
    """One threshold per exit but the last (which takes every sample left), each in [0, 1].

    threshold: a float (every exit), or a sequence / 1-D tensor of num_exits - 1 values, or of
    num_exits values whose last one is ignored."""
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() > 1:
            raise ValueError(f"{owner}: threshold must be a float or a 1-D sequence, got a tensor of shape {tuple(threshold.shape)}")
        threshold = threshold.tolist()
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        values = [float(threshold)] * (num_exits - 1)
    elif isinstance(threshold, (list, tuple)):
        values = list(threshold)
        if len(values) not in (num_exits - 1, num_exits):
            raise ValueError(f"{owner}: threshold needs {num_exits - 1} values (one per exit but the last), got {len(values)}")
        values = values[: num_exits - 1]
    else:
        raise TypeError(f"{owner}: threshold must be a float or a sequence of floats, got {type(threshold).__name__}")
    for k, t in enumerate(values):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not 0.0 <= t <= 1.0:
            raise ValueError(f"{owner}: threshold[{k}] must be a number in [0, 1] (a confidence), got {t!r}")
    return [float(t) for t in values]


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The confidence of each row of logits [n, C]: its largest softmax probability (in float32)."""
    return torch.softmax(logits.float(), dim=1).max(dim=1).values


def _map_state(state: State, fn):
    if isinstance(state, torch.Tensor):
        return fn(state)
    return type(state)(fn(t) for t in state) if isinstance(state, tuple) else [fn(t) for t in state]


Score = Callable[[int, State, torch.Tensor], torch.Tensor]


def _batch(x: State) -> torch.Tensor:
    first = x if isinstance(x, torch.Tensor) else (x[0] if isinstance(x, (list, tuple)) and x else None)
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("EarlyExit: x must be a tensor with a batch dimension (or a list of such tensors)")
    return first


def _check_logits(k: int, z, rows: int):
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != rows:
        raise ValueError(f"EarlyExit: exit {k} must return logits [{rows}, C], got {getattr(z, 'shape', type(z).__name__)}")


def _max_softmax_score(k: int, state: State, logits: torch.Tensor) -> torch.Tensor:
    return max_softmax(logits)


def run_masked(
    x: State, stages: Sequence[Callable], exits: Sequence[Callable], thresholds: Sequence[float], score: Score = _max_softmax_score
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every stage and exit on every sample, then each sample's logits at its first exit whose
    score(k, state, logits) reaches thresholds[k] (the last exit takes the rest). No host sync."""
    n = _batch(x).shape[0]
    logits, scores = [], []
    state = x
    for k in range(len(stages)):
        state = stages[k](state)
        z = exits[k](state)
        _check_logits(k, z, n)
        logits.append(z)
        if k < len(stages) - 1:
            scores.append(score(k, state, z))
    exit_index = torch.full((n,), len(stages) - 1, dtype=torch.int64, device=logits[0].device)
    for k in reversed(range(len(stages) - 1)):  # the first confident exit wins
        exit_index = torch.where(scores[k] >= thresholds[k], k, exit_index)
    stacked = torch.stack(logits, dim=1)  # [N, K, C]
    pick = exit_index.view(-1, 1, 1).expand(-1, 1, stacked.shape[2])
    return stacked.gather(1, pick).squeeze(1), exit_index


def run_sparse(
    x: State,
    stages: Sequence[Callable],
    exits: Sequence[Callable],
    thresholds: Sequence[float],
    score: Score = _max_softmax_score,
    bucket=None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stage k on the compact batch of the samples still in; each exit's logits written into
    their rows of the output in place. bucket: a resolved bucket (see nn.bucket). One host
    sync per exit but the last. Once every sample has left, the later stages and exits are not
    run, except in grad mode: there they run on an empty batch, so that their parameters get
    (zero) gradients, which DistributedDataParallel without find_unused_parameters waits for."""
    first = _batch(x)
    n, device = first.shape[0], first.device
    kernels = _gating.resolved_backend("EarlyExit", backend, device)
    kern = _gating.kernels(kernels)
    rows_of = torch.arange(n, dtype=torch.int32, device=device)  # sample of each row of the batch
    count = torch.full((1,), n, dtype=torch.int32, device=device)  # real rows (the rest pads)
    real = n
    out = exit_index = None
    state = x
    for k in range(len(stages)):
        rows = rows_of.shape[0]
        with compact_batch_convs(n, rows, device):
            state = stages[k](state)
            z = exits[k](state)
        _check_logits(k, z, rows)
        if out is None:
            out = torch.empty((n, z.shape[1]), dtype=z.dtype, device=device)
            exit_index = torch.empty((n,), dtype=torch.int64, device=device)
        # every row still in takes this exit's logits; a sample that stays is overwritten later
        out = kern.scatter_rows_(out, z, rows_of, count)
        kern.scatter_rows_(exit_index, torch.full((rows,), k, dtype=torch.int64, device=device), rows_of, count)
        if k == len(stages) - 1:
            break
        stay = ~(score(k, state, z) >= thresholds[k])  # the negation of the masked exit test
        stay[real:] = False  # padding rows
        idx, count = ops.compact(stay, backend=kernels)
        staying = int(count)  # the one host synchronisation of this exit
        if staying == 0 and not torch.is_grad_enabled():
            break  # (in grad mode the later stages run on an empty batch: see the docstring)
        if staying == real:  # nobody left: the batch stays as it is
            continue
        rows = bucketed_rows(staying, bucket, n)
        state = _map_state(state, lambda t: kern.gather_rows(t, idx, count, rows))
        rows_of = kern.gather_rows(rows_of, idx, count, rows)
        real = staying
    return out, exit_index


class EarlyExit(nn.Module):
    """stages[k] then exits[k] for k = 0..K-1; each sample leaves at its first confident exit.

    forward(x) -> (logits [N, C] at each sample's exit, exit index [N] int64). A stage maps the
    previous stage's state (x for stage 0) to its own: a tensor [n, ...] or a list / tuple of
    such tensors (MSDNet's scales), all with one row per sample. exits[k] maps stage k's state
    to logits [n, C]. controllers: None (the score of exit k is the max-softmax of its logits)
    or K - 1 modules mapping stage k's state to a score in [0, 1] per sample [n] (D2NN's control
    nodes). threshold: see check_thresholds (settable: `thresholds`). A threshold outside
    [0, 1] is a ValueError; threshold 1 lets only samples of score exactly 1 leave.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        exits: Sequence[nn.Module],
        threshold,
        controllers: Optional[Sequence[nn.Module]] = None,
        execution: str = "sparse",
        backend: str = "auto",
        bucket="auto",
    ):
        super().__init__()
        stages, exits = list(stages), list(exits)
        if not stages or not all(isinstance(m, nn.Module) for m in stages + exits):
            raise TypeError("EarlyExit: stages and exits must be non-empty sequences of nn.Module")
        if len(exits) != len(stages):
            raise ValueError(f"EarlyExit: one exit per stage: got {len(stages)} stages and {len(exits)} exits")
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)
        if controllers is not None:
            controllers = list(controllers)
            if len(controllers) != len(stages) - 1 or not all(isinstance(m, nn.Module) for m in controllers):
                raise ValueError(f"EarlyExit: controllers must be {len(stages) - 1} modules (one per exit but the last), got {len(controllers)}")
            self.controllers = nn.ModuleList(controllers)
        else:
            self.controllers = None
        self.thresholds = threshold
        self.execution = check_execution("EarlyExit", execution)
        self.backend = ops.check_backend("EarlyExit", backend)
        self.bucket = check_bucket("EarlyExit", bucket)

    @property
    def thresholds(self) -> List[float]:
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, value):
        self._thresholds = check_thresholds("EarlyExit", value, len(self.stages))

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def extra_repr(self) -> str:
        return f"thresholds={self._thresholds}, execution={self.execution!r}, backend={self.backend!r}, bucket={self.bucket!r}"

    def score(self, k: int, state: State, logits: torch.Tensor) -> torch.Tensor:
        """Exit k's score per row [n] (float32), compared against threshold[k]."""
        if self.controllers is None:
            return max_softmax(logits)
        s = self.controllers[k](state)
        if not isinstance(s, torch.Tensor) or s.shape != logits.shape[:1]:
            raise ValueError(f"EarlyExit: controller {k} must return one score per sample [{logits.shape[0]}], got {getattr(s, 'shape', type(s).__name__)}")
        return s.float()

    def forward(self, x: State) -> Tuple[torch.Tensor, torch.Tensor]:
        first = _batch(x)
        if self.execution == "masked":
            return run_masked(x, self.stages, self.exits, self._thresholds, self.score)
        bucket = training_bucket("EarlyExit", self.bucket, self, first.device)
        return run_sparse(x, self.stages, self.exits, self._thresholds, self.score, bucket, self.backend)
