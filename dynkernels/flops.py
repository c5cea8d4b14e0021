"""FLOPs of any model of this project, counted from the layers that actually run.

    count = model_flops(model, x, ...)    # the model's own forward arguments
    count.dense       FLOPs per sample with every block and channel computed
    count.executed    FLOPs per sample that the gates of this input leave to compute (mean)
    count.per_sample  the executed FLOPs of each sample, float64 [N] (per_sample=True)
    count.ratio       dense / executed: the ideal speedup of sparse over dense execution

Both counts come from torch.utils.flop_counter.FlopCounterMode (matrix products and
convolutions, 2 FLOPs per multiply-add; element-wise ops, pooling and normalisation count 0):
`dense` over the model's masked execution (the papers' dense-times-mask: everything runs),
`executed` over its sparse execution. Every module with an `execution` attribute of "masked" /
"sparse" is switched for the count (and switched back), so a network needs no FLOP formula of
its own: a skipped block is a smaller batch for its convolutions, a skipped channel an inactive
triple of the channel-sparse convolution, whose ops carry the formula below (registered by
dynkernels.ops). Both counts include the gates themselves (their FC layers, a policy network
that is part of the model) and the parts every sample runs (stem, shortcuts, classifier).

What the count assumes:
  - eval mode (set for the count, then restored): gates and BN are per sample.
  - the compiled and Triton channel-sparse kernels; backend="torch" (the reference) runs a
    dense conv on masked inputs and is counted as such, and so is a conv that backend="auto"
    runs densely.
  - per_sample=True runs the sparse forward once per sample (N forwards of batch 1): exact for
    each sample whatever the batch; per_sample=False runs it once on the batch and divides by
    N, which equals the mean of the per-sample counts unless the sparse path pads its compact
    batches (a bucket or capacity rounding the kept count up: the padding rows run and count).
"""
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

EXECUTIONS = ("masked", "sparse")


def channel_sparse_conv2d_flops(x, weight, bias, out_gate, in_gate=None, stride=None, padding=None, dilation=None,
                                *args, out_val=None, **kwargs) -> int:
    """FLOPs of one channel-sparse conv: 2 * kh * kw * Ho * Wo per active (sample, output
    channel, input channel) triple (out_gate > 0, and in_gate > 0 or no in_gate). On tensors
    without values (fake or meta tensors, e.g. while tracing) every triple counts."""
    n, cin = x.shape[:2]
    cout, _, kh, kw = weight.shape
    ho, wo = out_val.shape[2:]
    per_triple = 2 * kh * kw * ho * wo
    gates = [g for g in (out_gate, in_gate) if g is not None]
    if any(g.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(g) for g in gates):
        return per_triple * n * cout * cin
    outs = (out_gate > 0).sum(1, dtype=torch.int64)
    if in_gate is None:
        return per_triple * cin * int(outs.sum())
    ins = (in_gate > 0).sum(1, dtype=torch.int64)
    return per_triple * int((outs * ins).sum())


def register_channel_sparse_formula(op_packet) -> None:
    """Register channel_sparse_conv2d_flops for a channel-sparse conv op (an OpOverloadPacket
    with channel_sparse_conv2d's leading arguments), once."""
    if op_packet not in flop_registry:
        register_flop_formula(op_packet, get_raw=True)(channel_sparse_conv2d_flops)


def count(fn: Callable, *args, **kwargs) -> int:
    """Total FLOPs of fn(*args, **kwargs) (no gradient), as FlopCounterMode counts them. fn runs
    twice when its call registers a formula (an op's first use), so that the count includes it."""
    known = len(flop_registry)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    if len(flop_registry) != known:
        # A formula was registered during the call (an op's first use, e.g. the Triton conv's
        # lazy import), after the counter had copied the registry: count again with it.
        return count(fn, *args, **kwargs)
    return counter.get_total_flops()


class FlopCount(NamedTuple):
    dense: float  # FLOPs per sample, masked execution (everything computed)
    executed: float  # mean FLOPs per sample, sparse execution
    per_sample: Optional[torch.Tensor]  # float64 [N] executed FLOPs of each sample, or None

    @property
    def ratio(self) -> float:
        """dense / executed, the ideal speedup (inf when nothing runs)."""
        return self.dense / self.executed if self.executed else float("inf")


def _switchable(model: nn.Module):
    """The modules of model that have an execution of "masked" or "sparse", outermost first."""
    return [m for m in model.modules() if getattr(m, "execution", None) in EXECUTIONS]


def _set_execution(modules, value: str) -> None:
    for m in modules:
        m.execution = value


def _batch_size(args, kwargs) -> int:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            return leaf.shape[0]
    raise ValueError("model_flops: no tensor argument with a batch dimension was given (e.g. model_flops(model, x))")


def _rows(tree: Any, n: int, start: int, stop: int) -> Any:
    """tree with every tensor of n rows cut to rows [start, stop)."""
    return pytree.tree_map(
        lambda t: t[start:stop] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n else t, tree
    )


def model_flops(model: nn.Module, *args, per_sample: bool = True, **kwargs) -> FlopCount:
    """Dense and executed FLOPs per sample of model(*args, **kwargs) (see the module docstring).

    args / kwargs: the model's forward arguments for a batch of N samples; every tensor with N
    rows (the input, a BlockDrop policy, ...) is cut per sample where needed. The model's
    execution modes and training flags are restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_flops: model must be an nn.Module, got {type(model).__name__}")
    n = _batch_size(args, kwargs)
    if n == 0:
        raise ValueError("model_flops: the batch is empty")
    switchable = _switchable(model)
    saved_execution = [m.execution for m in switchable]
    saved_training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        _set_execution(switchable, "masked")
        dense = count(model, *_rows(args, n, 0, 1), **_rows(kwargs, n, 0, 1))
        _set_execution(switchable, "sparse")
        if per_sample:
            each = [count(model, *_rows(args, n, i, i + 1), **_rows(kwargs, n, i, i + 1)) for i in range(n)]
            per = torch.tensor(each, dtype=torch.float64)
            executed = float(per.mean())
        else:
            per = None
            executed = count(model, *args, **kwargs) / n
    finally:
        for m, value in zip(switchable, saved_execution):
            m.execution = value
        for m, was in saved_training:
            m.training = was
    return FlopCount(float(dense), executed, per)


__all__ = ["FlopCount", "model_flops", "count", "channel_sparse_conv2d_flops", "register_channel_sparse_formula"]
