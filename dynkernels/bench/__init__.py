"""dynkernels.bench: the benchmark harness, one for every figure the project reports.

    python -m dynkernels.bench                      the sweep suite: speedup versus density of every
                                                    op, module and model (quick; --full on a GPU)
    python -m dynkernels.bench --suite headline     the configurations of the speed targets, with
                                                    target verdicts at the top of the report
    ... --smoke                                     either suite on tiny CPU tensors (seconds; the tests)

Both suites are lists of Cases run by one Runner (harness: build, output check, timing, rows),
timed by one timer (timing: interleaved rounds on the CPU, `triton.testing.do_bench` on a GPU,
optionally CUDA-graph replay and host time), counted by one accounting (FLOPs, bytes, ideal,
the physical floor from rates measured in the run), written as one row format (results:
results.csv and results.json) and one Markdown report with plots (report).

How to add a case: in the family module it belongs to (`families/sample_gating.py`,
`channel_sparse_conv.py`, `skip_blocks.py`, `models.py`; a new module goes into
`families/__init__.py`), write one function `def my_cases(cfg: RunConfig) -> List[Case]` and
call it from the module's `sweep(cfg)` or `headline(cfg)`. A Case names its coordinates
(family, op, config, shape, batch, dtype, density, layout, threads) and a `setup()` that
allocates nothing until the case runs and returns a `Setup`: the input sets, the Variants
(each a `build()` returning fn(*inputs); the baseline named by `Case.baseline`, the others
with `compare_to=` the variant whose output they must match), and the dense and sparse FLOPs
and bytes. Reuse an existing case builder where one fits, e.g.
`dataclasses.replace(skip_blocks._case(cfg, spec, "bfloat16", 128, CL, 0.5),
variants=["dense", "SkipBlock-cuda+plan"], targets={"SkipBlock-cuda+plan": Target("...", 1.8)},
graph=True, host_time=True)`. Shrink the shapes when `cfg.smoke` (the tests run every case that
way), and use `_common.resolved()` / `backend_variants()` for backends, so that a backend
missing here becomes a skipped row with its reason.
"""
from .harness import Case, Setup, Target, Unavailable, Variant
from .timing import Timing, TimingSettings, measure

__all__ = ["Case", "Setup", "Target", "Unavailable", "Variant", "Timing", "TimingSettings", "measure"]
