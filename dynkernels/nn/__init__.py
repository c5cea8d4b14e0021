"""Modules: GatedConv2d, sample-gated block wrappers and gates."""
from .gated_conv import GatedConv2d, convert, fbs_gate

__all__ = ["GatedConv2d", "convert", "fbs_gate"]
