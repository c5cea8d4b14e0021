"""The speed targets of issues 3 and 4, measured in exactly their configurations.

    python -m dynkernels.bench.targets conv|skip_block|blockdrop ... --device cuda --out DIR
    python -m dynkernels.bench.targets summary --out DIR        (DIR/targets.md from the steps' JSON)
    python -m dynkernels.bench.targets all --device cpu --smoke --out DIR   (tiny CPU run of every step)

conv: channel_sparse_conv2d vs cuDNN (issue 3); skip_block: a ResNet-101 bottleneck under
SkipBlock vs dense (issue 4); blockdrop: BlockDrop ResNet-101 with 25/33 blocks per sample vs
the dense ResNet-101, with the FLOP-ratio ideal (issue 4). Each step writes
DIR/targets_<step>.json after every measurement; bench/gpu_suite.sh's `targets` phase runs
each step in its own process under a time limit, then the summary.
"""
from . import blockdrop, conv, skip_block

STEPS = {m.NAME: m for m in (conv, skip_block, blockdrop)}
