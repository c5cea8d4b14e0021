"""Result rows and the files they go to (results.csv, results.json).

Every row carries where and how it was measured (device, CPU model and ISA, versions, the
command, threads), so that a row copied out of its file still says so. A results folder
holds the latest run of each (suite, family): writing a family's rows replaces that
family's older rows and keeps the others, so families run in separate calls (`--only`) add
up to one report. Files of earlier versions load too (their rows miss the newer fields).
"""
import csv
import datetime as _dt
import json
import os
from typing import Dict, Iterable, List, Tuple

import torch

# Column order of results.csv; every row has every field (None -> empty cell / null).
FIELDS = [
    "run_id", "suite", "family", "op", "config", "shape", "batch", "dtype", "layout", "mode", "density", "threads", "load",
    "variant", "backend", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "runs", "timer", "first_call_ms", "graph_ms", "host_ms",
    "baseline", "baseline_ms", "speedup", "overhead_us", "graph_speedup", "ideal_speedup", "efficiency", "floor_ms",
    "target", "target_speedup", "target_met",
    "dense_flops", "sparse_flops", "executed_flops", "executed_bytes", "tflops", "gbps", "max_rel_err",
    "device", "device_name", "cpu", "cpu_isa", "torch", "triton", "cuda", "dynkernels", "cuda_kernels", "command",
]
RENAMED = {"memory_format": "layout"}  # field names of earlier files

STATUSES = ("ok", "skipped", "error", "mismatch")


def environment(device: torch.device, command: str) -> Dict[str, object]:
    """Where and with what the run happens (one dict, also copied into every row)."""
    import dynkernels

    info = dynkernels.build_info()
    device = torch.device(device)
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else info["cpu"],
        "cpu": info["cpu"],
        "cpu_isa": " / ".join(info["cpu_isa"]),
        "torch": torch.__version__,
        "triton": info["triton"],
        "cuda": torch.version.cuda,
        "dynkernels": info["version"],
        "cuda_kernels": info["cuda_kernels"],
        "command": command,
    }


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def complete(row: Dict[str, object]) -> Dict[str, object]:
    """The row with every field of FIELDS (missing ones None), and only those."""
    unknown = set(row) - set(FIELDS)
    if unknown:
        raise KeyError(f"result row has fields not in results.FIELDS: {sorted(unknown)}")
    if row.get("status") not in STATUSES:
        raise ValueError(f"result row status must be one of {STATUSES}, got {row.get('status')!r}")
    return {k: row.get(k) for k in FIELDS}


def load(out_dir: str) -> Tuple[Dict[str, object], List[Dict[str, object]]]:
    """(meta, rows) of out_dir/results.json; ({}, []) where there is none."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return {}, []
    with open(path) as f:
        data = json.load(f)
    names = [RENAMED.get(k, k) for k in data["fields"]]
    rows = []
    for values in data["rows"]:
        row = dict.fromkeys(FIELDS)
        row["suite"] = "sweep"  # earlier files held the sweep only
        row.update((k, v) for k, v in zip(names, values) if k in row)
        rows.append(row)
    return data.get("meta", {}), rows


def merge(old: Iterable[Dict], new: List[Dict]) -> List[Dict]:
    """Old rows of the (suite, family) pairs not in `new`, then the new rows."""
    rerun = {(r["suite"], r["family"]) for r in new}
    return [r for r in old if (r["suite"], r["family"]) not in rerun] + list(new)


def write(out_dir: str, rows: List[Dict[str, object]], meta: Dict[str, object]) -> None:
    """Write results.csv and results.json (rows plus the run's metadata) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [complete(r) for r in rows]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    # JSON rows are value lists in the order of "fields" (a full GPU sweep has thousands of rows),
    # one per line so that the file stays small and diffable; written whole, then renamed, so
    # that a run stopped by a time limit leaves the last complete file.
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        f.write('{"meta": ' + json.dumps(meta) + ',\n "fields": ' + json.dumps(FIELDS) + ',\n "rows": [\n')
        f.write(",\n".join(json.dumps([r[k] for k in FIELDS]) for r in rows))
        f.write("\n]}\n")
    os.replace(tmp, os.path.join(out_dir, "results.json"))
