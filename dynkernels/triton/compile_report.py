"""Compile the Triton channel-sparse conv kernel for sm_90 (no GPU needed) and report its structure.

    python -m dynkernels.triton.compile_report [--config BM,BN,BK,warps,stages[,split,group] ...]
                                               [--all-variants] [--json]

For each tile configuration (by default shipped_configs(): those of the shipped tables, the
heuristic's over the tuning set of dynkernels.tune, and the tuner's candidates), compiles the
kernel as the launcher specialises it for a channels_last 3x3 layer (256 -> 256 channels at
14x14), in bf16 or fp16, with or without an input gate (each config in one of the four variants
in turn; --all-variants: all four; a shipped config only with the gatings the package runs it
with), and reads from the PTX, the TTGIR and the cubin:
  wgmma        wgmma.mma_async instructions (Hopper tensor cores)
  cp_async     cp.async copies (global -> shared, the software pipeline's loads)
  loop_async   whether the main loop itself issues them (TTGIR: async copies inside scf.for)
  shared       shared memory bytes, against the num_stages-deep ring the config asks for
  registers, spills (cuobjdump -res-usage: LOCAL/STACK bytes) and LDL/STL in the SASS.
A configuration is ok when it is pipelined (cp.async in the loop, shared memory at least the
ring), uses wgmma and spills nothing; the exit status is 1 if any is not. Needs Triton's CUDA
backend (ptxas and cuobjdump ship with it) and TRITON_INTERPRET unset.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Tuple

from .. import tune, tuned_configs
from .._extension import triton_interpret
from ..tuned_configs import ConvKey, TileConfig

# A representative layer: the launcher specialises ints on == 1 and on divisibility by 16.
_LAYER = dict(N=128, H=14, W=14, Ho=14, Wo=14, Cin=256, Cout=256, XC=256, WC=256, sgn=256, sgc=1,
              syn=256 * 196, syp=256, syc=1, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1)
_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def heuristic_configs() -> List[Tuple[ConvKey, float, TileConfig]]:
    """(key, density, heuristic config) over the tuning set (dynkernels.tune.tuning_set)."""
    return [(key, d, tuned_configs.triton_heuristic(key, d)) for _, key, d in tune.tuning_set(dtypes=("bfloat16",))]


def shipped_configs() -> List[TileConfig]:
    """Every distinct configuration the package may run on a GPU: the tables in
    dynkernels/configs/, the heuristic's over the tuning set, and the tuner's candidates."""
    found = {cfg for _, _, cfg in heuristic_configs()}
    found |= {TileConfig(*t) for t in tune.TRITON_TILES}
    for path in sorted(glob.glob(os.path.join(tuned_configs.PACKAGE_CONFIG_DIR, "*.json"))):
        found |= {e.triton for e in tuned_configs.load_table(path).entries if e.triton is not None}
    return sorted(found, key=lambda c: c.to_list())


def compile_sm90(cfg: TileConfig, dtype: str, in_gated: bool):
    """The kernel compiled for sm_90 (triton.compile of an ASTSource): a CompiledKernel."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    from . import channel_sparse_conv2d as conv

    if triton_interpret():
        raise RuntimeError("compile_report: unset TRITON_INTERPRET (the interpreter replaces the compiled kernels)")
    kernel = conv._channel_sparse_conv2d_kernel
    names = kernel.arg_names
    consts = dict(KH=3, KW=3, HAS_BIAS=True, HAS_SHIFT=True, IN_GATED=in_gated, ACC_DTYPE=tl.float32,
                  INPUT_PRECISION="tf32" if dtype == "float32" else "ieee", BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=cfg.split_k)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if "idx" in name or "cnt" in name else "*fp32" if name == "ws_ptr" else _PTR[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            kind, spec = native_specialize_impl(BaseBackend, _LAYER[name], False, True, True)
            if kind == "constexpr":
                signature[name] = "constexpr"
                consts[name] = spec
            else:
                signature[name] = kind
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _resources(cubin: bytes) -> Dict[str, int]:
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return {"registers": int(fields.get("REG", -1)), "local_bytes": int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
            "ldl_stl": len(re.findall(r"\b(?:LDL|STL)\b", sass)), "hgmma_sass": len(re.findall(r"\bHGMMA\b", sass)),
            "ldgsts_sass": len(re.findall(r"\bLDGSTS\b", sass))}


def _main_loop(ttgir: str) -> str:
    """The body of the kernel's K loop: the scf.for region (up to the closing brace at the
    loop's indentation) that holds the dot."""
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip().startswith("}") and len(nxt) - len(nxt.lstrip()) == indent:
                break
            body.append(nxt)
        text = "\n".join(body)
        if "warp_group_dot" in text or "tt.dot" in text:
            return text
    return ""


def report(cfg: TileConfig, dtype: str, in_gated: bool) -> dict:
    k = compile_sm90(cfg, dtype, in_gated)
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    loop = _main_loop(ttgir)
    ring = cfg.num_stages * cfg.block_m * cfg.block_k * tuned_configs.ELEMENT_SIZE[dtype]  # the A operand's stages alone
    row = {"config": cfg.to_list(), "dtype": dtype, "in_gated": in_gated,
           "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
           "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg|bulk)", ptx)),
           "loop_async": "async_copy_global_to_local" in loop or "async_tma" in loop,
           "loop_global_loads": len(re.findall(r"tt\.load", loop)),
           "shared": k.metadata.shared, "ring_bytes": ring}
    row.update(_resources(k.asm["cubin"]))
    row["pipelined"] = row["cp_async"] > 0 and row["loop_async"] and row["shared"] >= ring
    row["ok"] = row["pipelined"] and row["wgmma"] > 0 and row["local_bytes"] == 0 and row["ldl_stl"] == 0
    return row


def variants(configs: Iterable[TileConfig], every_variant: bool = False, shipped: bool = False):
    """(config, dtype, in_gated) to compile: each config once, the four (dtype, gating)
    variants in turn (every_variant: all four for every config). shipped: only the gatings the
    package runs the config with (no input gate for a tile that does not fit the registers
    with one: TileConfig.fits_registers)."""
    kinds = [(d, g) for g in (False, True) for d in ("bfloat16", "float16")]
    for i, cfg in enumerate(configs):
        allowed = [k for k in kinds if not shipped or cfg.fits_registers(k[1])]
        for dtype, gated in (allowed if every_variant else [allowed[i % len(allowed)]]):
            yield cfg, dtype, gated


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dynkernels.triton.compile_report", description=__doc__.split("\n")[0])
    ap.add_argument("--all-variants", action="store_true", help="compile every config in all four dtype/gating variants")
    ap.add_argument("--config", action="append", default=[], help="a config as BM,BN,BK,warps,stages[,split,group] (repeatable)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per compiled kernel")
    args = ap.parse_args(argv)
    configs = [TileConfig.from_list([int(v) for v in c.split(",")]) for c in args.config] or shipped_configs()
    failed = 0
    for cfg, dtype, gated in variants(configs, args.all_variants, shipped=not args.config):
        row = report(cfg, dtype, gated)
        failed += not row["ok"]
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {cfg.to_list()} {dtype:8s} {'in+out' if gated else 'out   '} "
                  f"wgmma {row['wgmma']:2d} cp.async {row['cp_async']:3d} (loop {row['loop_async']}) "
                  f"smem {row['shared']:6d} (ring {row['ring_bytes']:6d}) regs {row['registers']:3d} "
                  f"local {row['local_bytes']} LDL/STL {row['ldl_stl']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
