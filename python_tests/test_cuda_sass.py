"""The machine code (SASS) of the CUDA channel_sparse_conv2d GEMM kernels in the built extension.

Runs without a GPU wherever the CUDA kernels are compiled (CI). For every instantiation of
channel_sparse_conv2d_gemm_kernel (fp16 and bf16 x every tile configuration x with the weight
gathered in the kernel or read as k-contiguous rows, and the two fp32 ones) and every GPU architecture in the build, it asserts the
structure the kernel's speed rests on: tensor-core MMAs (HMMA with fp32 accumulation; FFMA for
fp32), the cp.async pipeline (LDGSTS and its waits), ldmatrix (LDSM) for the tensor-core operands,
and no local-memory traffic (no LDL/STL: nothing spilled). It prints registers and shared memory
per kernel (cuobjdump -res-usage).
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

import dynkernels
from dynkernels._extension import _C

pytestmark = pytest.mark.skipif(not dynkernels.cuda_kernels_compiled(), reason="this build has no CUDA kernels")

KERNEL = "channel_sparse_conv2d_gemm_kernel"


def _tool(name):
    """A CUDA binary tool: on PATH, in CUDA_HOME, /usr/local/cuda, or the one Triton ships."""
    candidates = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _extension_binary():
    if _C is not None:
        return _C.__file__
    library = os.environ.get("DYNKERNELS_LIBRARY")
    assert library, "no dynkernels._C and no DYNKERNELS_LIBRARY"
    return library


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    assert cxxfilt, "c++filt (binutils) is needed to read the kernel names"
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _instantiation(demangled):
    """(dtype, config id or 'fp32', gathered weight) of a GEMM kernel's demangled name."""
    m = re.search(KERNEL + r"<(c10::Half|c10::BFloat16|float), [\w:]*(MmaCompute<[\w:]+, (\d+)>|FmaCompute), (true|false)>",
                  demangled)
    assert m, f"unexpected kernel name {demangled}"
    dtype = {"c10::Half": "fp16", "c10::BFloat16": "bf16", "float": "fp32"}[m.group(1)]
    return dtype, int(m.group(3)) if m.group(3) else "fp32", m.group(4) == "true"


@pytest.fixture(scope="module")
def sass():
    """{arch: {mangled name: [opcodes]}} of the GEMM kernels, and the demangled names."""
    cuobjdump = _tool("cuobjdump")
    assert cuobjdump, "no cuobjdump (CUDA toolkit or Triton's copy) to read the extension's SASS"
    text = subprocess.run([cuobjdump, "-sass", _extension_binary()], capture_output=True, text=True, check=True).stdout
    kernels, arch, name = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\s*code for (sm_\w+)", line):
            arch, name = m.group(1), None
        elif m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1) if KERNEL in m.group(1) else None
            if name:
                kernels.setdefault(arch, {})[name] = []
        elif name and (m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", line)):
            kernels[arch][name].append(m.group(1))
    names = sorted({n for per_arch in kernels.values() for n in per_arch})
    return kernels, _demangle(names)


def test_every_instantiation_is_built(sass):
    kernels, demangled = sass
    configs = range(len(_C.cuda_conv_configs())) if _C is not None else range(5)
    want = {(dt, cfg, g) for dt in ("fp16", "bf16") for cfg in configs for g in (False, True)}
    want |= {("fp32", "fp32", False), ("fp32", "fp32", True)}
    assert kernels, "no channel_sparse_conv2d GEMM kernel in the extension's SASS"
    for arch, per_arch in kernels.items():
        got = {_instantiation(demangled[n]) for n in per_arch}
        assert got == want, f"{arch}: missing {sorted(want - got, key=str)}, unexpected {sorted(got - want, key=str)}"


def test_pipeline_and_tensor_core_instructions(sass):
    kernels, demangled = sass
    for arch, per_arch in kernels.items():
        for name, ops in per_arch.items():
            dtype, cfg, gated = _instantiation(demangled[name])
            what = f"{arch} {dtype} config {cfg} {'gathered weight' if gated else 'weight rows'}"
            base = {op.split(".")[0] for op in ops}
            assert "LDGSTS" in base, f"{what}: no cp.async (LDGSTS)"
            assert "LDGDEPBAR" in base and "DEPBAR" in base, f"{what}: no cp.async group commit / wait"
            assert not base & {"LDL", "STL"}, f"{what}: local-memory traffic {sorted(base & {'LDL', 'STL'})}"
            if dtype == "fp32":
                assert "FFMA" in base, f"{what}: no FFMA"
                continue
            hmma = [op for op in ops if op.startswith("HMMA.16816.F32")]
            assert hmma, f"{what}: no HMMA.16816 with fp32 accumulation"
            assert all(("BF16" in op) == (dtype == "bf16") for op in hmma), f"{what}: HMMA of the wrong type {set(hmma)}"
            assert "LDSM" in base, f"{what}: no ldmatrix (LDSM)"


def test_report_registers_and_shared_memory(sass, capsys):
    """Registers, stack, local memory and shared memory per GEMM kernel (cuobjdump -res-usage)."""
    kernels, demangled = sass
    text = subprocess.run([_tool("cuobjdump"), "-res-usage", _extension_binary()], capture_output=True, text=True,
                          check=True).stdout
    usage = {}
    arch = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif (m := re.match(r"\s*Function (\S+):", line)) and KERNEL in m.group(1):
            usage[(arch, m.group(1))] = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
    configs = {c["id"]: c for c in (_C.cuda_conv_configs() if _C is not None else [])}
    rows = []
    for (arch, name), u in sorted(usage.items(), key=lambda kv: (kv[0][0], str(_instantiation(demangled[kv[0][1]])))):
        dtype, cfg, gated = _instantiation(demangled[name])
        assert u["STACK"] == "0" and u["LOCAL"] == "0", f"{arch} {dtype} config {cfg}: stack or local memory {u}"
        c = configs.get(cfg)
        tile = f"{c['BM']}x{c['BN']}x{c['BK']} {c['stages']}st {c['warps']}w" if c else "64x64x32 3st 4w"
        dynamic = c["smem_bytes"] if c else None
        rows.append(f"{arch} {dtype:4} {str(cfg):4} {'gather' if gated else 'rows':6} {tile:22} REG {u['REG']:>3}  "
                    f"dynamic smem {dynamic if dynamic is not None else '-':>6}  static smem {u['SHARED']}")
    assert rows
    with capsys.disabled():
        print("\nchannel_sparse_conv2d GEMM kernels (arch, dtype, config, weight gathered / as rows, tile, registers, "
              "shared memory):")
        print("\n".join("  " + r for r in rows))
