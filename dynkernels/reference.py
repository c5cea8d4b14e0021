"""Pure-PyTorch reference implementations: they define the semantics of every op.

These are the `backend="torch"` implementations, the ground truth in the tests and a
baseline in the benchmarks. They favour clarity over speed, and (unlike the kernels)
`gather_rows`, `scatter_add_rows`, `scatter_rows` and `scatter_rows_` read `count` on the host: one
device synchronisation each on a GPU. Contract: DESIGN.md, "Functional contract".

The row ops take idx [M] and count: the rows they move are idx[:n], n = count clamped to
[0, M] (and to the rows there are room for). compact's idx has M = N; one branch of a route,
idx[offsets[b]:], is shorter.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

IntPair = Union[int, Sequence[int]]


def compact(gate: torch.Tensor, threshold: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable partition of each gate row into active (gate > threshold) then inactive positions.

    Returns idx (gate's shape, int32) and count ([1] for a 1-D gate, [B] for [B, N]).
    """
    # Compare exactly (in float64), like the kernels: `gate > threshold` in the gate's dtype
    # would round the threshold first (an fp32 gate of 0.1 against 0.1 would count as active).
    active = gate.to(torch.float64) > threshold
    # A stable sort on "is inactive" keeps both groups in increasing position order.
    idx = torch.sort((~active).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    count = active.sum(dim=-1, dtype=torch.int32).reshape(-1)
    return idx, count


def route(choice: torch.Tensor, num_branches: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable partition of the rows by branch: branch 0's rows in increasing order, then branch 1's, ...

    choice: [N] or [R, N] integer. Returns idx (choice's shape, int32) and offsets int32
    [num_branches + 1] (or [R, num_branches + 1]): branch b owns idx[offsets[b]:offsets[b + 1]].
    Rows whose choice is outside [0, num_branches) belong to no branch: they come last, in
    increasing order, after offsets[num_branches] (which then is less than N).
    """
    c = choice.to(torch.int64)
    key = torch.where((c >= 0) & (c < num_branches), c, torch.full_like(c, num_branches))
    idx = torch.sort(key, dim=-1, stable=True).indices.to(torch.int32)
    keys = key.reshape(key.shape[0] if key.dim() == 2 else 1, key.shape[-1])
    counts = keys.new_zeros((keys.shape[0], num_branches + 1)).scatter_add_(1, keys, torch.ones_like(keys))
    offsets = torch.zeros_like(counts, dtype=torch.int32)
    offsets[:, 1:] = torch.cumsum(counts[:, :num_branches], dim=1)
    return idx, offsets.reshape(choice.shape[:-1] + (num_branches + 1,))


def _active_rows(idx: torch.Tensor, count: torch.Tensor, limit: int) -> torch.Tensor:
    """idx[:n] as int64, n = count clamped to [0, min(limit, M)]."""
    n = max(0, min(int(count.reshape(-1)[0].item()), limit, idx.shape[0]))
    return idx[:n].long()


def gather_rows(
    x: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, capacity: Optional[int] = None
) -> torch.Tensor:
    """y[i] = x[idx[i]] for i < count; y has `capacity` rows (default x.shape[0]), the rest zero."""
    capacity = x.shape[0] if capacity is None else capacity
    rows = _active_rows(idx, count, capacity)
    y = x.new_zeros((capacity,) + tuple(x.shape[1:]))
    y[: rows.numel()] = x[rows]
    return y


def scatter_add_rows(
    base: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out = base, except out[idx[i]] = base[idx[i]] + scale[idx[i]] * y[i] for i < count.

    The sum is formed in float32 (float64 for float64 data) and rounded once, like the kernels.
    """
    rows = _active_rows(idx, count, y.shape[0])
    n = rows.numel()
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    update = y[:n].to(acc)
    if scale is not None:
        update = update * scale[rows].to(acc).reshape((n,) + (1,) * (y.dim() - 1))
    out = base.clone()
    out[rows] = (base[rows].to(acc) + update).to(base.dtype)
    return out


def scatter_rows(base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The overwrite merge: out[idx[i]] = y[i] for i < count, base[idx[i]] for the other i.

    idx is a permutation of base's N rows whose first count entries are the rows that y
    replaces (exactly what `compact` returns), so every output row comes from one source:
    the kept rows from y (a non-finite base value there does not matter), the others from base.
    count is clamped to [0, min(y.shape[0], N)].
    """
    return scatter_rows_(base.clone(), y, idx, count)


def scatter_rows_(base: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """In place: base[idx[i]] = y[i] for i < count; every other row of base is left as it is.

    idx: [M] int32 whose first count entries are distinct rows of base (one branch of a route:
    idx[offsets[b]:]); count is clamped to [0, min(y.shape[0], M)]. Returns base.
    """
    rows = _active_rows(idx, count, y.shape[0])
    base[rows] = y[: rows.numel()]
    return base


def _pair(v: IntPair) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    return v if len(v) == 2 else (v[0], v[0])


def channel_sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_gate: torch.Tensor,
    in_gate: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y[n, c] = out_gate[n, c] * conv2d(x * [in_gate > 0], weight, bias)[n, c] + shift[c] where
    out_gate[n, c] > 0, else exactly 0 (shift: [Cout] or None for 0).

    The shift is what lets a BatchNorm without affine and a per-channel shift after the gate
    (FBS: mask * g * BN(conv) + mask * beta) fold into one channel-sparse conv."""
    if in_gate is not None:
        x = x * (in_gate > 0).to(x.dtype)[:, :, None, None]
    y = F.conv2d(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation))
    g = out_gate[:, :, None, None]
    y = y * g.to(y.dtype)
    if shift is not None:
        y = y + shift.to(y.dtype)[None, :, None, None]
    return torch.where(g > 0, y, torch.zeros((), dtype=y.dtype, device=y.device))
