"""Tune the channel-sparse conv kernels on this GPU and write its configuration table.

    python -m dynkernels.tune --out DIR [--budget-s 330] [--quick] ...

For each (layer, batch, dtype, gating, density) of the tuning set (the stride-1 3x3 and 1x1
conv layers of ResNet-18 and ResNet-50 at batch 64 and 128, bf16 then fp16, channels_last input
and weight, output gating and input + output gating, densities in DENSITIES), times with
triton.testing.do_bench (medians):
  - the Triton kernel's candidate tile configurations (triton_candidates; then split-K
    variants of the fastest where its active tiles do not fill the GPU),
  - the CUDA kernel's configurations (dynkernels._C.cuda_conv_configs(); none in a build
    without it),
  - dense execution (cuDNN conv, gate multiply, shift), once per layer, batch, dtype and gating;
and writes DIR/<device>.json (dynkernels.tuned_configs format: the fastest configuration of each
kernel and its time, and the dense time) and DIR/tune.log (every timing). Copy the JSON into
dynkernels/configs/ to ship it. The winners are checked against dense execution. Work is done
most important first (bf16 before fp16, batch 128 before 64) and stops at --budget-s, so a
partial table is still written; the whole set is sized for about 5 minutes on an H100
(progress is printed per entry). The Triton candidates are compiled first, in --jobs processes.
"""
import argparse
import datetime
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import tuned_configs
from .tuned_configs import ConvKey, Entry, Table, TileConfig

# (label, cin, cout, kernel, hw): stride 1, padding kernel // 2.
LAYERS = [
    ("R18/R50 layer1 3x3", 64, 64, 3, 56),
    ("R18/R50 layer2 3x3", 128, 128, 3, 28),
    ("R18/R50 layer3 3x3", 256, 256, 3, 14),
    ("R18/R50 layer4 3x3", 512, 512, 3, 7),
    ("R50 layer1 1x1 reduce", 256, 64, 1, 56),
    ("R50 layer1 1x1 expand", 64, 256, 1, 56),
    ("R50 layer2 1x1 reduce", 512, 128, 1, 28),
    ("R50 layer2 1x1 expand", 128, 512, 1, 28),
    ("R50 layer3 1x1 reduce", 1024, 256, 1, 14),
    ("R50 layer3 1x1 expand", 256, 1024, 1, 14),
    ("R50 layer4 1x1 reduce", 2048, 512, 1, 7),
    ("R50 layer4 1x1 expand", 512, 2048, 1, 7),
]
BATCHES = (128, 64)
DTYPES = ("bfloat16", "float16")
# FLOP densities per gating; for "in+out" each side keeps sqrt(density) of its channels.
DENSITIES = {"out": (0.5, 1.0, 0.1, 0.25, 0.05), "in+out": (0.25, 1.0, 0.0625, 0.49)}

# Triton candidates (block_m, block_n, block_k, num_warps, num_stages): 128- and 64-pixel tiles,
# 32/64/128 output channels, pipelines of 3-4 stages; filtered per layer by triton_candidates.
TRITON_TILES = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 4, 4),
    (128, 32, 64, 4, 4),
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (64, 32, 64, 4, 4),
    (64, 32, 128, 4, 3),
]


def tuning_set(dtypes: Sequence[str] = DTYPES, batches: Sequence[int] = BATCHES, gatings=("out", "in+out"),
               layers=LAYERS) -> List[Tuple[str, ConvKey, float]]:
    """(layer label, key, density) in the order they are tuned (most important first)."""
    out = []
    for dtype in dtypes:
        for n in batches:
            for gating in gatings:
                for label, cin, cout, k, hw in layers:
                    key = ConvKey(cin, cout, k, k, (1, 1), hw, hw, n, dtype, gating)
                    out += [(label, key, d) for d in DENSITIES[gating]]
    return out


def triton_candidates(key: ConvKey, density: float, num_sms: int = 132) -> List[TileConfig]:
    """The Triton configurations timed for (key, density), split-K aside: the TRITON_TILES
    whose channel tile is not wider than the expected active channels need (at least 32), whose
    pixel tile is not taller than a sample's pixels need (at least 64), whose pipeline fits
    the shared-memory budget and whose tile fits the registers (TileConfig.fits_registers), with
    BLOCK_K cut to the channel count; plus the heuristic's choice without split-K. No
    duplicates, in TRITON_TILES order."""
    active = tuned_configs.expected_active_outputs(key, density)
    max_n = max(32, tuned_configs.pow2_at_least(active))
    max_m = max(64, tuned_configs.pow2_at_least(key.pixels))
    max_k = max(16, tuned_configs.pow2_at_least(tuned_configs.channel_stride(key.cin)))
    elem, gated = tuned_configs.ELEMENT_SIZE[key.dtype], key.gating == "in+out"
    out = []
    for bm, bn, bk, warps, stages in TRITON_TILES:
        cfg = TileConfig(bm, bn, min(bk, max_k), warps, stages)
        if (bn <= max_n and bm <= max_m and cfg.shared_memory(elem, gated) <= tuned_configs.SHARED_MEMORY_BUDGET
                and cfg.fits_registers(gated)):
            out.append(cfg)
    h = tuned_configs.triton_heuristic(key, density, num_sms)
    out.append(TileConfig(h.block_m, h.block_n, h.block_k, h.num_warps, h.num_stages))
    return list(dict.fromkeys(out))


def split_k_candidates(best: TileConfig, key: ConvKey, density: float, num_sms: int = 132) -> List[TileConfig]:
    """Split-K variants (2, 4) of `best`, where its active tiles fill less than half of the SMs."""
    active = tuned_configs.expected_active_outputs(key, density)
    live = key.n * math.ceil(key.pixels / best.block_m) * math.ceil(active / best.block_n)
    if best.split_k != 1 or live * 2 > num_sms:
        return []
    return [TileConfig(best.block_m, best.block_n, best.block_k, best.num_warps, best.num_stages, split_k=s)
            for s in (2, 4)]


def cuda_candidates() -> List[int]:
    """The CUDA kernel's config ids (none in a build without the CUDA kernels)."""
    return list(tuned_configs.cuda_config_ids())


# ----------------------------------------------------------------------------- timing (GPU)
def exact_gate(n: int, c: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """[n, c]: round(density * c) (at least 1) positive entries per row at random positions."""
    k = max(1, round(density * c))
    keep = torch.zeros(n, c, dtype=torch.bool)
    keep.scatter_(1, torch.rand(n, c, generator=generator).topk(k, dim=1).indices, True)
    return torch.where(keep, torch.rand(n, c, generator=generator) + 0.1, torch.zeros(()))


class _Inputs:
    """GPU tensors of one tuning entry: channels_last x and weight (made on the GPU, shared by
    the entries of one layer, batch and dtype) and gates of the entry's density."""

    _data: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __init__(self, key: ConvKey, density: float, device: str = "cuda", seed: int = 0):
        dt = getattr(torch, key.dtype)
        g = torch.Generator().manual_seed(seed)
        data_key = (key.cin, key.cout, key.kh, key.kw, key.ho, key.wo, key.n, key.dtype, device)
        if data_key not in self._data:
            self._data.clear()  # one layer at a time on the GPU
            gd = torch.Generator(device).manual_seed(seed)
            cl = torch.channels_last
            x = torch.randn(key.n, key.cin, key.ho, key.wo, generator=gd, device=device, dtype=dt)
            w = torch.randn(key.cout, key.cin, key.kh, key.kw, generator=gd, device=device, dtype=dt)
            w /= math.sqrt(key.cin * key.kh * key.kw)
            self._data[data_key] = (x.contiguous(memory_format=cl), w.contiguous(memory_format=cl))
        self.x, self.weight = self._data[data_key]
        self.pad = key.kh // 2
        side = math.sqrt(density) if key.gating == "in+out" else density
        self.out_gate = exact_gate(key.n, key.cout, side, g).to(device, dt)
        self.in_gate = None
        if key.gating == "in+out":
            self.in_gate = exact_gate(key.n, key.cin, side, g).to(device, dt)
            # the input's gated-off channels hold zeros, as a previous gated layer leaves them
            self.x = (self.x * (self.in_gate > 0).to(dt)[:, :, None, None]).contiguous(memory_format=torch.channels_last)

    def args(self):
        p = [self.pad, self.pad]
        return (self.x, self.weight, None, self.out_gate, self.in_gate, [1, 1], p, [1, 1], None)


def _bench(fn, warmup_ms: float, rep_ms: float) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.float().abs().max().item()
    return (a.float() - b.float()).abs().max().item() / max(scale, 1e-6)


class Tuner:
    """Times the candidates of one entry at a time (on `device`: the GPU; CPU tensors under
    the Triton interpreter only for testing the tuner's bookkeeping)."""

    def __init__(self, warmup_ms: float, rep_ms: float, use_triton: bool, use_cuda: bool, log, device: str = "cuda"):
        from ._extension import cuda_kernels_compiled, triton_available

        self.warmup_ms, self.rep_ms, self.log, self.device = warmup_ms, rep_ms, log, device
        self.use_triton = use_triton and triton_available()
        self.cuda_ids = cuda_candidates() if use_cuda and cuda_kernels_compiled() and device == "cuda" else []
        self.num_sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
        self.dense_ms: Dict[ConvKey, Optional[float]] = {}

    def _time(self, what: str, fn) -> Optional[float]:
        try:
            fn()
            if self.device == "cuda":
                torch.cuda.synchronize()
            ms = _bench(fn, self.warmup_ms, self.rep_ms)
        except Exception as e:  # a configuration that does not compile or launch here
            self.log(f"    {what}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        self.log(f"    {what}: {ms:.4f} ms")
        return ms

    def entry(self, label: str, key: ConvKey, density: float) -> Entry:
        from .ops.channel_sparse_conv2d import _triton, dense_channel_gated_conv2d

        args = _Inputs(key, density, self.device).args()
        dense = lambda: dense_channel_gated_conv2d(*args)  # noqa: E731
        if key not in self.dense_ms:  # dense execution costs the same at every density
            self.dense_ms[key] = self._time("dense", dense)
        reference = dense()
        best_t = best_t_ms = best_c = best_c_ms = None
        if self.use_triton:
            triton_op = _triton().channel_sparse_conv2d_triton
            timed = []
            for cfg in triton_candidates(key, density, self.num_sms):
                ms = self._time(f"triton {cfg.to_list()}", lambda: triton_op(*args, cfg.to_list()))
                if ms is not None:
                    timed.append((ms, cfg))
            if timed:
                best = min(timed, key=lambda t: t[0])[1]
                for cfg in split_k_candidates(best, key, density, self.num_sms):
                    ms = self._time(f"triton {cfg.to_list()}", lambda: triton_op(*args, cfg.to_list()))
                    if ms is not None:
                        timed.append((ms, cfg))
                for ms, cfg in sorted(timed, key=lambda t: t[0]):
                    err = _rel_err(triton_op(*args, cfg.to_list()), reference)
                    if err <= 5e-2:
                        best_t, best_t_ms = cfg, ms
                        break
                    self.log(f"    triton {cfg.to_list()}: output differs from dense execution (max rel err {err:.3g}); dropped")
        if self.cuda_ids:
            cuda_op = torch.ops.dynkernels.channel_sparse_conv2d
            timed = [(ms, cid) for cid in self.cuda_ids
                     if (ms := self._time(f"cuda config {cid}", lambda: cuda_op(*args, cid))) is not None]
            for ms, cid in sorted(timed):
                err = _rel_err(cuda_op(*args, cid), reference)
                if err <= 5e-2:
                    best_c, best_c_ms = cid, ms
                    break
                self.log(f"    cuda config {cid}: output differs from dense execution (max rel err {err:.3g}); dropped")
        return Entry(key, density, self.dense_ms[key], best_t, best_t_ms, best_c, best_c_ms)


def _compile_job(kh: int, gating: str, dtype: str, configs: List[List[int]]) -> Tuple[int, float, List[str]]:
    """Child process of precompile(): run each config once on a small layer that the launcher
    specialises like every layer of the tuning set (channel counts and strides divisible by 16,
    spatial sizes not), which leaves the compiled kernels in Triton's on-disk cache."""
    t0 = time.monotonic()
    from .ops.channel_sparse_conv2d import _triton

    key = ConvKey(64, 64, kh, kh, (1, 1), 14, 14, 16, dtype, gating)
    args = _Inputs(key, 0.5).args()
    op = _triton().channel_sparse_conv2d_triton
    errors = []
    for cfg in configs:
        try:
            op(*args, cfg)
        except Exception as e:  # reported by the main process when it times this config
            errors.append(f"{cfg}: {type(e).__name__}")
    torch.cuda.synchronize()
    return len(configs), time.monotonic() - t0, errors


def compile_jobs(work, num_sms: int, per_job: int = 4) -> List[Tuple[int, str, str, List[List[int]]]]:
    """(kh, gating, dtype, configs) jobs for _compile_job: each distinct Triton candidate of
    `work` once per kind of compiled kernel (kernel size, gating, dtype), per_job per job."""
    kinds: Dict[tuple, dict] = {}
    for _, key, density in work:
        for cfg in triton_candidates(key, density, num_sms):
            kinds.setdefault((key.kh, key.gating, key.dtype), {})[tuple(cfg.to_list())] = None
    job_args = []
    for (kh, gating, dtype), cfgs in kinds.items():
        cfgs = [list(c) for c in cfgs]
        job_args += [(kh, gating, dtype, cfgs[i:i + per_job]) for i in range(0, len(cfgs), per_job)]
    return job_args


def precompile(work, jobs: int, num_sms: int, log) -> None:
    """Compile the Triton candidates of `work` in `jobs` processes at once (Triton compiles on
    the CPU, one kernel at a time per process), so that timing finds them in the cache."""
    import concurrent.futures
    import multiprocessing

    job_args = compile_jobs(work, num_sms)
    t0 = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    done = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for n, seconds, errors in pool.map(_compile_job, *zip(*job_args)):
            done += n
            for e in errors:
                log(f"    precompile failed: {e}")
    log(f"precompiled {done} Triton kernels in {len(job_args)} jobs on {jobs} processes in {time.monotonic() - t0:.0f} s",
        echo=True)


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m dynkernels.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for <device>.json and tune.log")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new entries after this many seconds")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, from " + ", ".join(DTYPES))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--gatings", default="out,in+out")
    ap.add_argument("--quick", action="store_true", help="bf16, the first batch size, densities 0.25, 0.5 and 1.0 only")
    ap.add_argument("--warmup-ms", type=float, default=2.0)
    ap.add_argument("--rep-ms", type=float, default=8.0)
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes compiling the Triton candidates before timing (0: compile while timing)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("python -m dynkernels.tune: needs a CUDA GPU (torch.cuda.is_available() is False); nothing tuned",
              file=sys.stderr)
        return 2
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batches.split(",") if b]
    gatings = [g for g in args.gatings.split(",") if g]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"python -m dynkernels.tune: --dtypes: {d!r} is not one of {DTYPES}")
    for g in gatings:
        if g not in tuned_configs.GATINGS:
            raise SystemExit(f"python -m dynkernels.tune: --gatings: {g!r} is not one of {tuned_configs.GATINGS}")
    work = tuning_set(dtypes, batches, gatings)
    if args.quick:
        work = [w for w in work if w[1].dtype == "bfloat16" and w[1].n == batches[0] and w[2] in (0.5, 0.25, 1.0)]
    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name()
    log_file = open(os.path.join(args.out, "tune.log"), "a")

    def log(line: str, echo: bool = False):
        log_file.write(line + "\n")
        log_file.flush()
        if echo:
            print(line, flush=True)

    import triton

    meta = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": "python -m dynkernels.tune " + " ".join(argv if argv is not None else sys.argv[1:])}
    tuner = Tuner(args.warmup_ms, args.rep_ms, not args.no_triton, not args.no_cuda, log)
    log(f"{device}: {len(work)} entries; triton {'on' if tuner.use_triton else 'off'}, cuda config ids "
        f"{tuner.cuda_ids}; budget {args.budget_s:.0f} s; {meta}", echo=True)
    start = time.monotonic()
    if tuner.use_triton and args.jobs > 0:
        try:
            precompile(work, args.jobs, tuner.num_sms, log)
        except Exception as e:  # e.g. a worker that died: the kernels then compile while timing
            log(f"precompile failed ({type(e).__name__}: {e}); compiling while timing instead", echo=True)
    entries: List[Entry] = []
    with torch.inference_mode():
        for i, (label, key, density) in enumerate(work):
            elapsed = time.monotonic() - start
            if elapsed > args.budget_s:
                log(f"time budget used up after {i} of {len(work)} entries ({elapsed:.0f} s); the rest is not tuned", echo=True)
                break
            log(f"[{i + 1}/{len(work)}] {label}: {key.to_json()} density {density}")
            try:
                e = tuner.entry(label, key, density)
            except Exception as err:  # e.g. out of memory: this entry stays untuned
                log(f"[{i + 1:3d}/{len(work)}] {label}: failed ({type(err).__name__}: {err})", echo=True)
                continue
            if e.dense_ms is None and e.triton is None and e.cuda is None:
                continue
            entries.append(e)
            fmt = lambda ms: "-" if ms is None else f"{ms:.4f}"  # noqa: E731
            log(f"[{i + 1:3d}/{len(work)}] {elapsed:5.0f}s {label} N={key.n} {key.dtype} {key.gating} d={density}: "
                f"dense {fmt(e.dense_ms)} ms, triton {fmt(e.triton_ms)} ms {e.triton.to_list() if e.triton else ''}, "
                f"cuda {fmt(e.cuda_ms)} ms {'' if e.cuda is None else '#' + str(e.cuda)}", echo=True)
            if (i + 1) % 20 == 0:  # keep what is done if the run is cut short
                path = tuned_configs.write_table(Table(device, tuple(entries), meta), args.out)
    path = tuned_configs.write_table(Table(device, tuple(entries), meta), args.out)
    log(f"wrote {path} ({len(entries)} entries) in {time.monotonic() - start:.0f} s; copy it into "
        f"{tuned_configs.PACKAGE_CONFIG_DIR} to ship it", echo=True)
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
