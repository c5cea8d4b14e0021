"""Modules: GatedConv2d, sample-gated block wrappers and gates."""
from .skip_block import RowPlan, SkipBlock, SkipPlan, SkipSequential, gather_kept, merge_kept

__all__ = ["SkipBlock", "SkipPlan", "SkipSequential", "RowPlan", "gather_kept", "merge_kept"]
