"""A small workload that calls every CUDA and Triton kernel once, for compute-sanitizer.

    compute-sanitizer --tool memcheck|racecheck|initcheck --error-exitcode 1 python bench/sanitizer_workload.py

Each op runs on small CUDA tensors through each GPU backend (cuda, triton) and is checked against
dynkernels.reference; odd sizes so that every tile has a ragged edge, gates with inactive rows and
channels so that the early exits run. Prints one line per kernel and exits non-zero on a mismatch
(the sanitizer's own errors make it exit with --error-exitcode). Needs a GPU; `--cpu` runs the
same checks on the CPU backends, to check the script itself.
"""
import sys

import torch

import dynkernels
from dynkernels import reference as ref


def close(name: str, got, want, atol: float) -> bool:
    got, want = (got if isinstance(got, (tuple, list)) else (got,)), (want if isinstance(want, (tuple, list)) else (want,))
    ok = all(torch.allclose(g.float().cpu(), w.float().cpu(), atol=atol, rtol=atol) for g, w in zip(got, want))
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    return ok


def sample_gating(backend: str, dev: str) -> bool:
    ok = True
    gate = torch.rand(37, device=dev) - 0.5
    idx, count = dynkernels.compact(gate, backend=backend)
    ok &= close(f"compact/{backend}", (idx, count), ref.compact(gate), 0)
    x = torch.randn(37, 5, 3, 7, device=dev)
    y = dynkernels.gather_rows(x, idx, count, 24, backend=backend)
    ok &= close(f"gather_rows/{backend}", y, ref.gather_rows(x, idx, count, 24), 0)
    f = torch.randn_like(y)
    ok &= close(f"scatter_add_rows/{backend}", dynkernels.scatter_add_rows(x, f, idx, count, backend=backend),
                ref.scatter_add_rows(x, f, idx, count), 1e-6)
    ok &= close(f"scatter_rows/{backend}", dynkernels.scatter_rows(x, f, idx, count, backend=backend),
                ref.scatter_rows(x, f, idx, count), 0)
    base = x.clone()
    dynkernels.scatter_rows_(base, f, idx, count, backend=backend)
    ok &= close(f"scatter_rows_/{backend}", base, ref.scatter_rows(x, f, idx, count), 0)
    choice = torch.randint(0, 3, (41,), device=dev)
    ok &= close(f"route/{backend}", dynkernels.route(choice, 3, backend=backend), ref.route(choice, 3), 0)
    return ok


def conv(backend: str, dev: str) -> bool:
    ok = True
    # The Triton interpreter mishandles bf16 (the --cpu check): float32 there instead.
    first = torch.bfloat16 if dev == "cuda" else torch.float32
    for dtype, layout in ((first, torch.channels_last), (torch.float16, torch.contiguous_format)):
        x = torch.randn(3, 40, 9, 11, device=dev, dtype=dtype).to(memory_format=layout)
        w = (0.1 * torch.randn(72, 40, 3, 3, device=dev, dtype=dtype)).to(memory_format=layout)
        bias = torch.randn(72, device=dev, dtype=dtype)
        out_gate = (torch.rand(3, 72, device=dev) * (torch.rand(3, 72, device=dev) < 0.4)).to(dtype)
        out_gate[1] = 0  # a sample with no active channel
        in_gate = (torch.rand(3, 40, device=dev) < 0.6).to(dtype)
        for gi in (None, in_gate):
            got = dynkernels.channel_sparse_conv2d(x, w, bias, out_gate, gi, 1, 1, backend=backend)
            want = ref.channel_sparse_conv2d(x.double(), w.double(), bias.double(), out_gate.double(),
                                             None if gi is None else gi.double(), 1, 1)
            ok &= close(f"channel_sparse_conv2d/{backend} {dtype} {'in+out' if gi is not None else 'out'}", got, want, 5e-2)
    return ok


def main() -> int:
    if "--cpu" in sys.argv:  # the same checks on the CPU backends (Triton under TRITON_INTERPRET=1), to check this script
        dev, backends = "cpu", ["cpu"] + ["triton"] * dynkernels.triton_available()
    elif torch.cuda.is_available():
        dev = "cuda"
        backends = [b for b, on in (("cuda", dynkernels.cuda_kernels_compiled()), ("triton", dynkernels.triton_available())) if on]
    else:
        print("sanitizer_workload: needs a CUDA GPU (or --cpu)", file=sys.stderr)
        return 2
    print("device:", dev, "backends:", *backends, flush=True)
    ok = all([f(b, dev) for b in backends for f in (sample_gating, conv)])
    if dev == "cuda":
        torch.cuda.synchronize()
    return 0 if ok and backends else 1


if __name__ == "__main__":
    sys.exit(main())
