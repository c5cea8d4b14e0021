"""Timing of channel_sparse_conv2d against the dense nn.Conv2d, for the numbers in issue 3.

CPU:  python bench/targets/time_channel_sparse_conv2d.py --device cpu [--threads 2] [--rounds 40]
      batch 32, 128 -> 128 channels, 3x3, pad 1, 16x16, fp32, NCHW, random per-sample gates.
      The cases run interleaved round after round (so machine load hits them alike); each
      number is the median of the rounds after 3 warm-up calls. Same torch.get_num_threads().
GPU:  python bench/targets/time_channel_sparse_conv2d.py --device cuda [--backend triton] [--dtype bf16]
      3x3 and 1x1 layer shapes of ResNet-18/50, batch 64 and 128, channels_last, against
      cuDNN dense in the same dtype; triton.testing.do_bench medians (ms).
The dense model is nn.Conv2d with bias; the gated call is dynkernels.channel_sparse_conv2d.
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


# (name, Cin, Cout, H=W, kernel, stride): ResNet-18 and ResNet-50 layer shapes at 224x224 input.
GPU_SHAPES = [
    ("r18.l1.3x3", 64, 64, 56, 3, 1),
    ("r18.l2.3x3", 128, 128, 28, 3, 1),
    ("r18.l3.3x3", 256, 256, 14, 3, 1),
    ("r18.l4.3x3", 512, 512, 7, 3, 1),
    ("r50.l1.1x1a", 256, 64, 56, 1, 1),
    ("r50.l1.1x1b", 64, 256, 56, 1, 1),
    ("r50.l3.3x3", 256, 256, 14, 3, 1),
    ("r50.l3.1x1a", 1024, 256, 14, 1, 1),
    ("r50.l3.1x1b", 256, 1024, 14, 1, 1),
]


def time_gpu(args):
    import triton.testing

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    print(f"GPU {torch.cuda.get_device_name()}, {args.dtype}, channels_last, backend={args.backend}; "
          "do_bench medians in ms; speedup = cuDNN dense / sparse")
    print(f"{'shape':12s} {'N':>4s} {'dense':>8s} {'out0.5':>8s} {'x':>6s} {'io0.5':>8s} {'x':>6s} {'out1.0':>8s} {'x':>6s}")
    for name, cin, cout, hw, k, s in GPU_SHAPES:
        for n in args.batches:
            x = torch.randn(n, cin, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=k // 2).to("cuda", dtype)
            conv = conv.to(memory_format=torch.channels_last)
            w, b = conv.weight.detach(), conv.bias.detach()
            og, ig, ones = gate(n, cout, 0.5, "cuda"), gate(n, cin, 0.5, "cuda"), torch.ones(n, cout, device="cuda")

            def sparse(out_gate, in_gate):
                return lambda: dynkernels.channel_sparse_conv2d(
                    x, w, b, out_gate, in_gate, s, k // 2, 1, backend=args.backend)

            with torch.no_grad():
                dense = triton.testing.do_bench(lambda: conv(x), return_mode="median")
                t_out = triton.testing.do_bench(sparse(og, None), return_mode="median")
                t_io = triton.testing.do_bench(sparse(og, ig), return_mode="median")
                t_one = triton.testing.do_bench(sparse(ones, None), return_mode="median")
            print(f"{name:12s} {n:4d} {dense:8.3f} {t_out:8.3f} {dense / t_out:6.2f} {t_io:8.3f} {dense / t_io:6.2f} "
                  f"{t_one:8.3f} {dense / t_one:6.2f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--backend", default="triton")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    args = p.parse_args()
    time_cpu(args) if args.device == "cpu" else time_gpu(args)


if __name__ == "__main__":
    main()
