"""CPU timing of sample-sparse execution against the papers' masked execution (issue 4 s.6).

    python bench/targets/time_skip_blocks_cpu.py [--threads 1] [--pairs-chain 30] [--pairs-r110 10] [--extra]

Cases (fp32, eval mode, no_grad unless said):
  chain:  4 basic blocks (64 channels, 16x16, batch 64), each block kept by exactly half the
          samples (random which), SkipSequential (one compact, one host read per forward)
  r110:   BlockDrop ResNet-110 (CIFAR 32x32, batch 64), each sample keeps 27 of 54 random blocks
  --extra: r110 with capacity=N (no host read), and a training step (forward + backward)
The executions are timed alternately (one pair per round) so that load from other processes
hits them alike; printed: median times and the median of the per-round ratios masked / x.
The official benchmarks live in dynkernels.bench; this script is for quick CPU checks.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynkernels.models.blockdrop import resnet110_cifar
from dynkernels.nn import SkipBlock, SkipSequential


def compare(fns, rounds, warmup=2):
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(times["masked"], v)) for k, v in times.items()}
    return med, ratio


def show(title, med, ratio, ideal):
    parts = ", ".join(f"{k} {v:.1f} ms ({ratio[k]:.2f}x)" for k, v in med.items())
    print(f"{title}: {parts}; speedup = masked / x, ideal {ideal:.2f}x")


class BasicBlock(nn.Module):
    """torchvision-style basic block with an identity shortcut."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs-chain", type=int, default=30)
    p.add_argument("--pairs-r110", type=int, default=10)
    p.add_argument("--extra", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32")
    n = 64
    with torch.no_grad():
        if args.pairs_chain:
            masked = SkipSequential([SkipBlock(BasicBlock(64), execution="masked") for _ in range(4)]).eval()
            sparse = SkipSequential([SkipBlock(b.block, execution="sparse") for b in masked.blocks]).eval()
            x = torch.randn(n, 64, 16, 16)
            policy = torch.zeros(n, 4)
            for b in range(4):
                policy[torch.randperm(n)[: n // 2], b] = 1
            med, ratio = compare({"masked": lambda: masked(x, policy), "sparse": lambda: sparse(x, policy)}, args.pairs_chain)
            show("chain of 4 basic blocks 64ch 16x16 N=64 keep 0.5", med, ratio, 2.0)
    x = torch.randn(n, 3, 32, 32)
    policy = torch.zeros(n, 54)
    for i in range(n):
        policy[i, torch.randperm(54)[:27]] = 1
    masked = resnet110_cifar(execution="masked").eval()
    sparse = resnet110_cifar(execution="sparse").eval()
    sparse.load_state_dict(masked.state_dict())
    ideal = (masked.flops(torch.ones(1, 54)) / masked.flops(policy)).mean().item()
    with torch.no_grad():
        if args.pairs_r110:
            fns = {"masked": lambda: masked(x, policy), "sparse": lambda: sparse(x, policy), "dense": lambda: masked(x)}
            if args.extra:
                capped = resnet110_cifar(execution="sparse", capacity=n).eval()
                capped.load_state_dict(masked.state_dict())
                fns["sparse capacity=N"] = lambda: capped(x, policy)
            show("BlockDrop ResNet-110 CIFAR N=64, 27/54 blocks per sample, eval", *compare(fns, args.pairs_r110), ideal)
    if args.extra:
        y = torch.randint(0, 10, (n,))
        masked.train()
        sparse.train()

        def step(m):
            m.zero_grad()
            F.cross_entropy(m(x, policy), y).backward()

        show("same, training step (forward + backward)", *compare({"masked": lambda: step(masked), "sparse": lambda: step(sparse)}, 5, 1), ideal)


if __name__ == "__main__":
    main()
