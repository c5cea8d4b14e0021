"""Timing of channel_sparse_conv2d against the dense nn.Conv2d, for the numbers in issue 3.

CPU:  python bench/targets/time_channel_sparse_conv2d.py --device cpu [--threads 2] [--rounds 40]
      batch 32, 128 -> 128 channels, 3x3, pad 1, 16x16, fp32, NCHW, random per-sample gates.
      The cases run interleaved round after round (so machine load hits them alike); each
      number is the median of the rounds after 3 warm-up calls. Same torch.get_num_threads().
      The dense model is nn.Conv2d with bias; the gated call is dynkernels.channel_sparse_conv2d.
GPU:  python bench/targets/time_channel_sparse_conv2d.py --device cuda [--out DIR]
      = python -m dynkernels.bench.targets conv --device cuda --out DIR (issue 3's GPU target:
      bf16, channels_last, the 3x3 and 1x1 layer shapes of ResNet-18 and ResNet-50, batch 64
      and 128, out 0.5 / in+out 0.5 (CUDA and Triton kernels) and auto at 1.0 against cuDNN;
      see dynkernels/bench/targets/conv.py). bench/gpu_suite.sh OUT targets runs it.
"""
import argparse
import statistics
import time

import torch

import dynkernels


def gate(n, c, density, device):
    keep = torch.rand(n, c, device=device) < density
    return torch.where(keep, torch.rand(n, c, device=device) + 0.1, torch.zeros((), device=device))


def time_cpu(args):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    n, c, hw = 32, 128, 16
    x = torch.randn(n, c, hw, hw)
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    w, b = conv.weight.detach(), conv.bias.detach()
    og, ig, ones = gate(n, c, 0.5, "cpu"), gate(n, c, 0.5, "cpu"), torch.ones(n, c)

    def sparse(out_gate, in_gate):
        return lambda: dynkernels.channel_sparse_conv2d(x, w, b, out_gate, in_gate, 1, 1, 1, backend="cpu")

    cases = {
        "dense nn.Conv2d": lambda: conv(x),
        "out density 0.5": sparse(og, None),
        "in+out density 0.5": sparse(og, ig),
        "out density 1.0": sparse(ones, None),
    }
    times = {k: [] for k in cases}
    with torch.no_grad():
        for f in cases.values():
            for _ in range(3):
                f()
        for _ in range(args.rounds):
            for k, f in cases.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"CPU, torch.get_num_threads() = {torch.get_num_threads()}, {args.rounds} rounds, fp32 NCHW "
          f"[{n}, {c}, {hw}, {hw}] 3x3 pad 1 -> {c}")
    for k, v in med.items():
        print(f"  {k:20s} {v:8.2f} ms   speedup over dense {med['dense nn.Conv2d'] / v:5.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default="bench/out/targets", help="GPU: where targets_conv.json goes")
    args = p.parse_args()
    if args.device == "cpu":
        time_cpu(args)
    else:
        from dynkernels.bench.targets.__main__ import main as targets

        targets(["conv", "summary", "--device", "cuda", "--out", args.out])


if __name__ == "__main__":
    main()
