"""The CPU benchmark's memory setting (dynkernels.bench.malloc), in child processes: the
setting is process-wide. A 64 MiB tensor allocated again after one was freed faults its pages
in again with glibc's defaults (it is mapped and unmapped), and hardly any once malloc keeps
freed memory; the setting's own report gives the count it judged by."""
import os
import shutil
import subprocess
import sys

import pytest

from _utils import SUMMARY
from dynkernels.bench import malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")

CHILD = """
import sys
from dynkernels.bench import malloc
kept, said = malloc.keep_freed_memory() if sys.argv[1] == "keep" else (False, "defaults")
faults, where = malloc.faults_of_freed_memory_allocated_again()
print(kept, faults, "|", where, "|", said)
"""

# Forwards malloc and free to glibc's own: an allocator interposed with LD_PRELOAD
SHIM = """
#include <stddef.h>
void *__libc_malloc(size_t);
void __libc_free(void *);
void *malloc(size_t n) { return __libc_malloc(n); }
void free(void *p) { __libc_free(p); }
"""


def _child(mode, env=None):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env=env).stdout.strip().rsplit("\n", 1)[-1]
    counts, where, said = out.split(" | ", 2)
    kept, faults = counts.split()
    return kept == "True", int(faults), where, said


def test_keep_freed_memory_spares_a_second_allocation_its_page_faults():
    kept, faults, where, said = _child("keep")
    SUMMARY["malloc (keep)"] = said
    if "not glibc" in said or "malloc here is" in said:
        pytest.skip(f"not glibc's malloc: {said}")
    assert kept and said.startswith("freed memory kept: glibc") and "faulted " in said, said
    # a second measurement in the same process agrees
    assert faults < malloc.KEPT_BELOW_PAGES, (faults, where, said)
    _, default, default_where, _ = _child("default")
    SUMMARY["malloc (defaults)"] = f"a freed 64 MiB tensor allocated again faulted {default} pages in (it lay in {default_where})"
    if default < malloc.KEPT_BELOW_PAGES:
        pytest.skip(f"glibc's defaults keep freed memory here too ({default} pages faulted in): nothing to spare")
    assert default > faults, (default, faults)  # (16385 with 4 KiB pages, fewer with transparent huge pages)


def test_an_interposed_malloc_is_named_and_left_alone(tmp_path):
    cc = next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "shim.c").write_text(SHIM)
    shim = tmp_path / "libshim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c")], check=True)
    kept, faults, _, said = _child("keep", env=dict(os.environ, LD_PRELOAD=str(shim)))
    assert f"malloc here is {shim}'s, not glibc's" in said, said
    assert "mallopt" not in said
    assert said.startswith("freed memory kept" if kept else "freed memory NOT kept"), said
    # nothing set: glibc's defaults map and unmap the 64 MiB block
    assert kept == (faults < malloc.KEPT_BELOW_PAGES), (kept, faults, said)
