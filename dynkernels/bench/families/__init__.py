"""The benchmark families: each module has NAME, cases(cfg) -> [Case], and its sweeps."""
from . import channel_sparse_conv, models, sample_gating, skip_blocks

FAMILIES = {m.NAME: m for m in (sample_gating, channel_sparse_conv, skip_blocks, models)}
