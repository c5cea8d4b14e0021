"""The benchmark families. Each module has NAME and one function per suite it takes part in,
`sweep(cfg)` and `headline(cfg)`, each returning a list of Cases (see dynkernels.bench)."""
from . import channel_sparse_conv, models, sample_gating, skip_blocks

FAMILIES = {m.NAME: m for m in (sample_gating, channel_sparse_conv, skip_blocks, models)}
SUITES = ("sweep", "headline")


def cases(family: str, suite: str, cfg) -> list:
    """The family's cases in the suite (none where it has no such function)."""
    return getattr(FAMILIES[family], suite, lambda cfg: [])(cfg)
