"""Modules: GatedConv2d, sample-gated block wrappers and gates."""
from .gated_conv import GatedConv2d, convert, fbs_gate
from .skip_block import RowPlan, SkipBlock, SkipPlan, SkipSequential, gather_kept, merge_kept

__all__ = [
    "GatedConv2d",
    "convert",
    "fbs_gate",
    "SkipBlock",
    "SkipPlan",
    "SkipSequential",
    "RowPlan",
    "gather_kept",
    "merge_kept",
]
