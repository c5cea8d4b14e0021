"""Modules: GatedConv2d, FBS layers, sample-gated block wrappers and gates, routed blocks and early exits."""
from .compact_convs import compact_batch_convs
from .early_exit import EarlyExit
from .fbs import FBSConv2d, fbs_convert, fbs_gate
from .fold import fold_batchnorm
from .gated_conv import GatedConv2d, convert
from .graphs import GraphPool
from .route_block import RouteBlock, RoutePlan, RouteRow
from .skip_block import SkipBlock, SkipSequential
from .skip_plan import RowPlan, SkipPlan, gather_kept, merge_kept

__all__ = [
    "GatedConv2d",
    "convert",
    "fbs_gate",
    "FBSConv2d",
    "fbs_convert",
    "fold_batchnorm",
    "SkipBlock",
    "SkipPlan",
    "SkipSequential",
    "RowPlan",
    "GraphPool",
    "gather_kept",
    "merge_kept",
    "compact_batch_convs",
    "RouteBlock",
    "RoutePlan",
    "RouteRow",
    "EarlyExit",
]
