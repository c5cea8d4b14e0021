"""The CPU this process runs on: its model name and the vector instruction sets that decide
its dense arithmetic rate (AVX2, AVX-512 and its VNNI/BF16 parts, AMX; NEON/SVE on Arm).
`build_info()` and every benchmark header report them: a CPU figure holds for the CPU it names."""
import functools
import os
import platform
from typing import Dict, Iterable, List, Tuple

# (name, /proc/cpuinfo flag), in the order they are reported.
ISA_FLAGS = [
    ("AVX2", "avx2"),
    ("AVX-512", "avx512f"),
    ("AVX-512 VNNI", "avx512_vnni"),
    ("AVX-512 BF16", "avx512_bf16"),
    ("AVX-512 FP16", "avx512_fp16"),
    ("AVX-VNNI", "avx_vnni"),
    ("AMX BF16", "amx_bf16"),
    ("AMX INT8", "amx_int8"),
    ("NEON", "asimd"),
    ("SVE", "sve"),
]
# torch's own CPU dispatch level, where no flag list can be read (macOS, Windows).
TORCH_CAPABILITY = {"AVX2": ["AVX2"], "AVX512": ["AVX2", "AVX-512"]}


def isa_from_flags(flags: Iterable[str]) -> List[str]:
    """The vector ISA names (ISA_FLAGS) that a CPU flag list contains."""
    present = set(flags)
    return [name for name, flag in ISA_FLAGS if flag in present]


def amd_core(family: int, model: int, flags: Iterable[str]) -> str:
    """The core generation of an AMD CPU's x86 family and model numbers; empty where unknown.
    Family 23 holds Zen and Zen+ (models below 0x30) and Zen 2 (0x30 and up); Zen 3 and Zen 4
    share 25, and only Zen 4 has AVX-512. Two EPYCs of one model name can differ twice in FMA
    rate (Zen 2 and 3 have no AVX-512, Zen 4 runs 512-bit vectors in two halves, Zen 5 in one)."""
    if family == 23:
        return "Zen 2" if model >= 0x30 else "Zen / Zen+"
    if family == 25:
        return "Zen 4" if "avx512f" in set(flags) else "Zen 3"
    return {26: "Zen 5"}.get(family, "")


def _proc_cpuinfo() -> Tuple[str, List[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo, the model name followed by its
    x86 family and model numbers (and, for AMD, its core generation); empty where there is none."""
    model, flags, numbers = "", [], {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
                elif key in ("cpu family", "model") and key not in numbers and value.strip().isdigit():
                    numbers[key] = int(value)
                if model and flags and len(numbers) == 2:
                    break
    except OSError:
        pass
    if model and len(numbers) == 2:
        core = amd_core(numbers["cpu family"], numbers["model"], flags) if model.startswith("AMD") else ""
        model += f" ({core + ', ' if core else ''}family {numbers['cpu family']} model {numbers['model']})"
    return model, flags


@functools.lru_cache(maxsize=None)
def cpu_info() -> Dict[str, object]:
    """{"model": CPU model name, "isa": [vector ISA names], "logical_cpus": int}."""
    model, flags = _proc_cpuinfo()
    if flags:
        isa = isa_from_flags(flags)
    else:
        import torch

        isa = TORCH_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), [])
    return {"model": model or platform.processor() or platform.machine(), "isa": isa, "logical_cpus": os.cpu_count()}


def describe_cpu() -> str:
    """One line: 'AMD EPYC, 2 logical CPUs, AVX2 / AVX-512 / AVX-512 VNNI / AVX-512 BF16'."""
    info = cpu_info()
    return f"{info['model']}, {info['logical_cpus']} logical CPUs, {' / '.join(info['isa']) or 'no AVX2'}"
