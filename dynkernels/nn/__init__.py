"""Modules: GatedConv2d, sample-gated block wrappers and gates."""
