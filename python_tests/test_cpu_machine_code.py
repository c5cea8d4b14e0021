"""The x86-64 machine code of the CPU kernels in the built extension (objdump), where their speed
rests on it.

- The passes that run at memory speed only when vectorised (dense execution's gate pass over a
  conv output, scatter_add_rows' scaled add) are compiled once per vector ISA: the AVX-512 clone
  uses 512-bit registers, the AVX2 clone 256-bit ones. The gate pass has no FMA in any clone, so
  that it rounds as torch's separate multiply and add do, whatever the CPU.
- The AVX-512 tiles of the channel-sparse conv's micro-kernel keep their accumulators in
  registers: at least one FMA per accumulator and no 512-bit load or store on the stack (a
  spill). The tile shapes are the names' template arguments: rows x vectors of 16 floats.
"""
import platform
import re
import shutil
import subprocess
import sys

import pytest

from dynkernels._extension import _C

pytestmark = pytest.mark.skipif(
    _C is None or platform.machine() != "x86_64" or not sys.platform.startswith("linux"),
    reason="reads the x86-64 Linux build of dynkernels._C",
)


@pytest.fixture(scope="module")
def functions():
    """{demangled name: its instructions} of the extension's host code."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to read the extension's machine code"
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                          check=True).stdout
    out, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1)
            out[name] = []
        elif name is not None and "\t" in line:
            out[name].append(line.split("\t", 1)[1])
    return out


def _clones(functions, base):
    """{isa: instructions} of the target_clones of a function named `base` (its .avx512f,
    .avx2 and .default clones; GCC names them so)."""
    found = {}
    for name, code in functions.items():
        m = re.search(r"\b" + base + r"\(.*\) \[clone \.(avx512f|avx2|default)\]$", name) or re.search(
            r"\b" + base + r"\.(avx512f|avx2|default)\b", name)
        if m:
            found.setdefault(m.group(1), []).extend(code)
    return found


@pytest.mark.parametrize("base, fma_free", [("gate_row", True), ("gate_plane", True), ("add_scaled_row", False)])
def test_memory_speed_passes_are_vectorised_per_isa(functions, base, fma_free):
    clones = _clones(functions, base)
    assert set(clones) == {"avx512f", "avx2", "default"}, f"{base}: clones found {sorted(clones)}"
    assert any("%zmm" in i for i in clones["avx512f"]), f"{base}: the AVX-512 clone uses no 512-bit register"
    assert any("%ymm" in i for i in clones["avx2"]), f"{base}: the AVX2 clone uses no 256-bit register"
    if fma_free:
        for isa, code in clones.items():
            assert not any("fmadd" in i for i in code), f"{base}: the {isa} clone contracts into FMAs"


def test_conv_micro_kernel_tiles_stay_in_registers(functions):
    tiles = {}
    for name, code in functions.items():
        m = re.search(r"avx512::gemm_tile<[\w:() ]*avx512::VecF, (\d+), (\d+), (?:true|false)>\(", name)
        if m:
            tiles[name] = (int(m.group(1)) * int(m.group(2)), code)
    assert tiles, "no AVX-512 float32 micro-kernel tiles (avx512::gemm_tile<VecF, ...>) in the extension"
    for name, (accumulators, code) in tiles.items():
        fmas = sum(bool(re.match(r"vfmadd\d+ps\b.*%zmm", i)) for i in code)
        spills = [i for i in code if "%zmm" in i and re.search(r"\(%r[sb]p\)", i)]
        assert fmas >= accumulators, f"{name}: {fmas} 512-bit FMAs for {accumulators} accumulators"
        assert not spills, f"{name}: 512-bit stack traffic (spills): {spills[:3]}"
