"""Static structure of the Triton conv kernel on Hopper, checked without a GPU: every tile
configuration the package can run (dynkernels.triton.compile_report.shipped_configs) compiled for
sm_90 as the launcher specialises it, for bf16 and fp16, with and without an input gate.

Asserted from the PTX, the TTGIR and the cubin: the K loop issues cp.async copies into a
shared-memory ring num_stages deep (the software pipeline), the dot is wgmma, and there are no
register spills (no local memory, no LDL/STL). Each configuration is compiled once, the four
dtype/gating variants in turn (compiling all four for each would take four times as long), and
every variant is compiled at least once.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def _report(*extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    proc = subprocess.run([sys.executable, "-m", "dynkernels.triton.compile_report", "--json", *extra],
                          capture_output=True, text=True, env=env, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"compile_report printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, rows


def test_every_shipped_config_is_pipelined_wgmma_without_spills():
    from dynkernels.triton.compile_report import shipped_configs

    proc, rows = _report()
    assert len(rows) == len(shipped_configs())
    assert {(r["dtype"], r["in_gated"]) for r in rows} == {(d, g) for d in ("bfloat16", "float16") for g in (False, True)}
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "configurations without the Hopper structure:\n" + "\n".join(json.dumps(r) for r in bad)
    for r in rows:
        assert r["wgmma"] > 0 and r["hgmma_sass"] > 0
        assert r["cp_async"] > 0 and r["ldgsts_sass"] > 0 and r["loop_async"]
        assert r["shared"] >= r["ring_bytes"], "shared memory smaller than the num_stages-deep ring"
        assert r["local_bytes"] == 0 and r["ldl_stl"] == 0
        if not r["in_gated"]:
            assert r["loop_global_loads"] == 0, "a synchronous global load left in the K loop"
    assert proc.returncode == 0


def test_report_flags_a_kernel_that_loses_its_pipeline():
    """The check can fail: a single-stage configuration has no cp.async ring to find."""
    proc, rows = _report("--config", "64,32,64,4,1")
    assert not rows[0]["pipelined"] and not rows[0]["ok"]
    assert proc.returncode == 1
