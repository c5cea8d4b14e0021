"""Timing of channel_sparse_conv2d against the dense nn.Conv2d, for the numbers in issue 3.

CPU:  python bench/targets/time_channel_sparse_conv2d.py --device cpu [--threads 2] [--rounds 40] [--density-sweep | --backward]
      batch 32, 128 -> 128 channels, 3x3, pad 1, 16x16, fp32, NCHW, random per-sample gates.
      The cases run interleaved round after round (so machine load hits them alike); each
      number is the median of the rounds after 3 warm-up calls. Same torch.get_num_threads().
      The dense model is nn.Conv2d with bias; the gated one is GatedConv2d.from_conv of it
      (backend="auto"). --density-sweep times the C++ kernel itself at densities 0.5 .. 1.0;
      --backward times forward + backward (gradients of x, weight and bias).
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
from dynkernels.nn import GatedConv2d


def gate(n, c, density, device):
    keep = torch.rand(n, c, device=device) < density
    return torch.where(keep, torch.rand(n, c, device=device) + 0.1, torch.zeros((), device=device))


def _interleaved_medians(cases, rounds, grad=False):
    """Median ms of each case over `rounds` rounds run case after case (after 3 warm-up calls
    each), so that a change in machine load hits every case alike."""
    times = {k: [] for k in cases}
    with torch.set_grad_enabled(grad):
        for f in cases.values():
            for _ in range(3):
                f()
        for _ in range(rounds):
            for k, f in cases.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def time_cpu(args):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    n, c, hw = 32, 128, 16
    x = torch.randn(n, c, hw, hw)
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    gated = GatedConv2d.from_conv(conv)  # shares conv's parameters; backend="auto": the C++ kernel
    og, ig, ones = gate(n, c, 0.5, "cpu"), gate(n, c, 0.5, "cpu"), torch.ones(n, c)
    header = (f"CPU, torch.get_num_threads() = {torch.get_num_threads()}, {args.rounds} rounds, fp32 NCHW "
              f"[{n}, {c}, {hw}, {hw}] 3x3 pad 1 -> {c}")
    if args.density_sweep:
        w, b = conv.weight.detach(), conv.bias.detach()
        cases = {"dense nn.Conv2d": lambda: conv(x)}
        for d in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            g = ones if d == 1.0 else gate(n, c, d, "cpu")
            cases[f"C++ kernel, out {d:.1f}"] = (
                lambda g=g: dynkernels.channel_sparse_conv2d(x, w, b, g, None, 1, 1, 1, backend="cpu"))
        med = _interleaved_medians(cases, args.rounds)
        print(header + "; the C++ kernel (backend='cpu') at each output density against the dense conv")
    elif args.backward:
        xg = x.clone().requires_grad_(True)
        grad_y = torch.randn(n, c, hw, hw)

        def train_step(f):
            def step():
                conv.zero_grad(set_to_none=True)
                xg.grad = None
                f().backward(grad_y)
            return step

        cases = {
            "dense nn.Conv2d": train_step(lambda: conv(xg)),
            "GatedConv2d out 0.5": train_step(lambda: gated(xg, og)),
            "GatedConv2d in+out 0.5": train_step(lambda: gated(xg, og, ig)),
            "GatedConv2d out 1.0": train_step(lambda: gated(xg, ones)),
        }
        med = _interleaved_medians(cases, args.rounds, grad=True)
        print(header + "; forward + backward (x, weight and bias gradients), GatedConv2d against the conv")
    else:
        cases = {
            "dense nn.Conv2d": lambda: conv(x),
            "GatedConv2d out 0.5": lambda: gated(x, og),
            "GatedConv2d in+out 0.5": lambda: gated(x, og, ig),
            "GatedConv2d out 1.0": lambda: gated(x, ones),
        }
        med = _interleaved_medians(cases, args.rounds)
        print(header + "; GatedConv2d.from_conv(conv) with backend='auto' against the conv itself")
    for k, v in med.items():
        print(f"  {k:24s} {v:8.2f} ms   speedup over dense {med['dense nn.Conv2d'] / v:5.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--backward", action="store_true", help="CPU: time forward + backward instead of the forward")
    p.add_argument("--density-sweep", action="store_true",
                   help="CPU: time the C++ kernel at output densities 0.5 .. 1.0 against the dense conv")
    p.add_argument("--out", default="bench/out/targets", help="GPU: where targets_conv.json goes")
    args = p.parse_args()
    if args.device == "cpu":
        time_cpu(args)
    else:
        from dynkernels.bench.targets.__main__ import main as targets

        targets(["conv", "summary", "--device", "cuda", "--out", args.out])


if __name__ == "__main__":
    main()
