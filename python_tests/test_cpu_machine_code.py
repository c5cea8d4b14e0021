"""The x86-64 machine code of the CPU kernels in the built extension (objdump), where their speed
rests on it.

- The passes that run at memory speed only when vectorised (dense execution's gate pass over a
  conv output, scatter_add_rows' scaled add) are compiled once per vector ISA: the AVX-512 clone
  uses 512-bit registers, the AVX2 clone 256-bit ones. The gate pass has no FMA in any clone, so
  that it rounds as torch's separate multiply and add do, whatever the CPU.
- The AVX-512 tiles of the channel-sparse conv's micro-kernel keep their accumulators in
  registers: at least one FMA per accumulator and no 512-bit load or store on the stack (a
  spill). The tile shapes are the names' template arguments: rows x vectors of 16 floats.
- The reduction loop of every AVX-512 and AVX2 tile reads per step only its pixel vectors and
  its broadcast weights, plus the offsets its walk takes from the tables: both with the table
  walk, the weight's with an even walk of pixels alone, none with an even walk of both; and
  nothing on the stack. Those loads bound the AVX2 tile's rate on an AMD EPYC (Zen 2).
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
            address, instruction = line.split("\t", 1)
            out[name].append(Instruction(int(address.strip().rstrip(":"), 16), instruction))
    return out


class Instruction(str):
    """One instruction's text (AT&T syntax), with its address."""

    def __new__(cls, address, text):
        self = super().__new__(cls, text)
        self.address = address
        return self


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


# (isa, rows, vectors, tail, walk) of a float32 tile: gemm_tile<VecF, MR, NV, TAIL, Walk>
_TILE = r"(avx512|avx2)::gemm_tile<[\w:() ]*::VecF, (\d+), (\d+), (true|false), \([\w:() ]*::Walk\)(\d)>\("
_WALK_TABLE_READS = {0: 2, 1: 1, 2: 0}  # Walk::tables, even_b, even_ab (conv_gemm_tile.inc)


def _tiles(functions, isa):
    """{name: (rows, vectors, tail, walk, code)} of the float32 micro-kernel tiles of one ISA."""
    out = {}
    for name, code in functions.items():
        m = re.search(_TILE, name)
        if m and m.group(1) == isa:
            out[name] = (int(m.group(2)), int(m.group(3)), m.group(4) == "true", int(m.group(5)), code)
    return out


def _loops(code):
    """The bodies of the innermost loops of a function: from a backward branch's target to the
    branch, holding no other such branch."""
    at = {i.address: k for k, i in enumerate(code)}
    back = []  # (start, end) of every backward branch's span
    for k, i in enumerate(code):
        m = re.match(r"j\w+\s+([0-9a-f]+) ", i)
        if m and int(m.group(1), 16) in at and at[int(m.group(1), 16)] <= k:
            back.append((at[int(m.group(1), 16)], k))
    for start, end in back:
        if not any(start <= e < end for s, e in back if (s, e) != (start, end)):
            yield code[start:end + 1]


def _reads_memory(instruction):
    """Whether an instruction reads a memory operand (AT&T: any memory operand but the last one,
    which is where a store writes); lea computes an address and reads nothing."""
    mnemonic, _, operands = instruction.partition(" ")
    if mnemonic.startswith(("lea", "nop", "prefetch", "j", "call")):
        return False
    parts = re.findall(r"[^,(]*\([^)]*\)|[^,]+", operands.strip())
    return any("(" in p for p in parts[:-1]) or (len(parts) == 1 and "(" in parts[0] and mnemonic.startswith("v"))


@pytest.mark.parametrize("isa, register, accumulators", [("avx512", "%zmm", 24), ("avx2", "%ymm", 12)])
def test_conv_reduction_reads_only_what_its_walk_needs(functions, isa, register, accumulators):
    """The tiles of at least half the full tile's accumulators (the full 6 x 4 / 4 x 3 tile and
    the common partial ones; the smallest, rare, may keep a loop bound on the stack), those
    compiled on their own and those inlined into the loops over tiles (gemm_shaped)."""
    tiles = {n: t for n, t in _tiles(functions, isa).items()
             if not t[2] and 2 * t[0] * t[1] >= accumulators}  # (tails: masked loads)
    assert {t[3] for t in tiles.values()} == set(_WALK_TABLE_READS), f"{isa}: the tiles of every walk"
    inlined = set()
    for name, code in functions.items():
        m = re.search(r"(avx512|avx2)::gemm_shaped<[\w:() ]*::VecF, (\d+), (\d+), \([\w:() ]*::Walk\)(\d)>\(", name)
        if m and m.group(1) == isa:
            tiles[name] = (int(m.group(2)), int(m.group(3)), False, int(m.group(4)), code)
            inlined.add(name)
    for name, (rows, vectors, _, walk, code) in tiles.items():
        if isa == "avx2" and rows == 6 and walk == 0:
            # AVX2's 6-row tile (output pixels by channel vectors) with the table walk runs short
            # of integer registers (six row pointers, two tables, b, the counter) and keeps some
            # on the stack; it runs only for samples of fewer than 8 active input channels
            # (mark_even_runs in csrc/cpu/channel_sparse_conv2d_cpu.cpp)
            continue
        # (the reduction: the loop of one FMA per accumulator that stores nothing; the epilogue's
        # loop over vectors has FMAs too, and stores; a loop with masked loads is a tail's)
        steps = [body for body in _loops(code)
                 if sum(bool(re.match(r"vfmadd\d+ps\b.*" + register, i)) for i in body) == rows * vectors
                 and not any(re.match(r"v\w+\s+%[xyz]mm\d+,[^%]*\(", i) for i in body)
                 and not any("vmaskmov" in i or "{%k" in i for i in body)]
        assert steps or name in inlined, f"{name}: no loop of {rows * vectors} FMAs"
        for body in steps:
            reads = [i for i in body if _reads_memory(i)]
            # (what a step reads: its distinct vector operands; GCC may fold a pixel vector's
            # load into each of its FMAs where it has registers to spare)
            vector = {re.search(r"[-\w]*\([^)]*\)", i).group(0) for i in reads if i.startswith("v")}
            assert not [i for i in body if re.search(r"\(%r[sb]p\)", i)], f"{name}: stack traffic in its loop: {body}"
            assert len(vector) == rows + vectors, f"{name}: {len(vector)} vector operands per step: {sorted(vector)}"
            offsets = [i for i in reads if not i.startswith("v")]
            assert len(offsets) == _WALK_TABLE_READS[walk], f"{name}: offset reads per step: {offsets}"


def test_conv_micro_kernel_tiles_stay_in_registers(functions):
    tiles = {name: (rows * vectors, code) for name, (rows, vectors, _, _, code) in _tiles(functions, "avx512").items()}
    assert tiles, "no AVX-512 float32 micro-kernel tiles (avx512::gemm_tile<VecF, ...>) in the extension"
    for name, (accumulators, code) in tiles.items():
        fmas = sum(bool(re.match(r"vfmadd\d+ps\b.*%zmm", i)) for i in code)
        spills = [i for i in code if "%zmm" in i and re.search(r"\(%r[sb]p\)", i)]
        assert fmas >= accumulators, f"{name}: {fmas} 512-bit FMAs for {accumulators} accumulators"
        assert not spills, f"{name}: 512-bit stack traffic (spills): {spills[:3]}"
