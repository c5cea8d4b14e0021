"""CPU runs of the benchmark keep the memory the process frees, so that no timed call pays
the page faults of memory an earlier call gave back to the OS.

torch's CPU allocator does not cache: with glibc's malloc defaults a tensor above the mmap
threshold, or one placed at the heap's top after a block's tensors were freed and trimmed,
comes from fresh pages, and on the virtual machine that CI runs on (an AMD EPYC, Zen 5) each
4 KiB page costs microseconds to fault in. There, in the headline suite of 2026-12-04,
glibc's defaults made the masked BlockDrop ResNet-110 forward 1.49x (1 thread) and 1.91x
(2 threads) slower, and oneDNN's conv of NCHW input 1.46x slower in one case and not in the
next (it depends on what ran before), so that speedups over those baselines exceeded the
ideal. Caching allocators (jemalloc, tcmalloc), which CPU deployments use, keep freed memory
as a matter of course.

`keep_freed_memory` sets glibc's malloc so, then measures whether it took: the report's
"Memory" line gives that measurement. It covers what the main thread allocates (torch's ops
allocate their outputs there); a block of 64 MiB or more that another thread allocates comes
from that thread's own arena, which maps and unmaps such blocks whatever mallopt says.
"""
import ctypes
import ctypes.util
from typing import Optional, Tuple

import torch

MALLOC_DEFAULTS = "the C library's defaults"  # what the report says where the settings stay untouched
PROBE_BYTES = 64 << 20  # above any mmap threshold glibc picks on its own (at most 32 MiB)
KEPT_BELOW_PAGES = 200  # a re-allocation that faults fewer pages than this found its memory kept

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def faults_of_freed_memory_allocated_again(nbytes: int = PROBE_BYTES) -> Tuple[int, str]:
    """(minor page faults, where it lay) of a CPU tensor of nbytes that is allocated, touched
    and freed after others like it were: the fewest over four tries after six (the heap grows
    to its high-water mark first, as small objects land between the blocks)."""
    import resource  # (POSIX only)

    def faults() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(nbytes, dtype=torch.uint8)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    fewest = min([faults() for _ in range(10)][6:])
    # (looked up once, at the end: reading /proc/self/maps between the tries allocates small
    # blocks that keep the heap growing)
    last = torch.ones(nbytes, dtype=torch.uint8)
    return fewest, _mapping_of(last.data_ptr())


def _mapping_of(address: int) -> str:
    """'the heap' or 'an anonymous mapping' (or the mapped file), from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start, end = (int(a, 16) for a in fields[0].split("-"))
                if start <= address < end:
                    name = fields[5] if len(fields) > 5 else ""
                    return "the heap" if name == "[heap]" else name or "an anonymous mapping"
    except OSError:
        pass
    return "memory not found in /proc/self/maps"


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        return libc
    except (OSError, TypeError, AttributeError):
        return None


def _malloc_interposed_by(libc: ctypes.CDLL) -> Optional[str]:
    """The library whose malloc or free the process calls instead of glibc's (an LD_PRELOAD
    allocator, say), or None where the calls reach glibc's own."""
    process = ctypes.CDLL(None)
    for symbol in ("malloc", "free"):
        called = ctypes.cast(getattr(process, symbol), ctypes.c_void_p).value
        if called != ctypes.cast(getattr(libc, symbol), ctypes.c_void_p).value:
            info = _DlInfo()
            process.dladdr(ctypes.c_void_p(called), ctypes.byref(info))
            return (info.dli_fname or b"an unnamed library").decode()
    return None


def keep_freed_memory() -> Tuple[bool, str]:
    """Make glibc's malloc keep the memory the process frees (no block of its own mapping, no
    trimming of the heap), then re-allocate a freed 64 MiB tensor to see how many of its pages
    fault in again. For the whole process (the benchmark is one). Where another malloc is
    interposed (an LD_PRELOAD allocator), nothing is set and that one is measured. Returns
    (kept, what the report says): kept is whether the re-allocation found its memory kept."""
    libc = _glibc()
    if libc is None:
        return False, f"{MALLOC_DEFAULTS} (not glibc)"
    interposer = _malloc_interposed_by(libc)
    if interposer:
        setting = f"malloc here is {interposer}'s, not glibc's"
    elif libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 ** 31 - 1)):
        setting = f"glibc {libc.gnu_get_libc_version().decode()} with mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 2^31 - 1"
    else:
        return False, f"glibc {libc.gnu_get_libc_version().decode()} defaults (mallopt refused the settings)"
    faults, where = faults_of_freed_memory_allocated_again()
    if faults < KEPT_BELOW_PAGES:
        return True, f"freed memory kept: {setting}; a freed 64 MiB tensor allocated again faulted {faults} pages in"
    return False, (f"freed memory NOT kept: {setting}, but a freed 64 MiB tensor allocated again still faulted {faults} "
                   f"pages in (it lay in {where})")
