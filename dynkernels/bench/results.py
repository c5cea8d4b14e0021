"""Result rows and the files they go to (results.csv, results.json).

Every row carries its environment (device name, versions, timer) so that a row copied out
of its file still says where it was measured. A results folder holds the latest run of each
family: writing a family's rows replaces that family's older rows and keeps the others, so
families run in separate calls (`--only`) add up to one report.
"""
import csv
import datetime as _dt
import json
import os
import platform
from typing import Dict, Iterable, List

import torch

# Column order of results.csv; every row has every field (None -> empty cell / null).
FIELDS = [
    "run_id", "family", "op", "config", "shape", "batch", "dtype", "memory_format", "mode", "density",
    "variant", "backend", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "runs", "timer",
    "baseline", "baseline_ms", "speedup", "ideal_speedup", "efficiency",
    "dense_flops", "sparse_flops", "executed_flops", "executed_bytes", "tflops", "gbps", "max_rel_err",
    "device", "device_name", "torch", "triton", "cuda", "dynkernels", "cuda_kernels", "threads",
]

STATUSES = ("ok", "skipped", "error", "mismatch")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict[str, object]:
    """Where and with what the run happens (one dict, also copied into every row)."""
    import dynkernels

    info = dynkernels.build_info()
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({os.cpu_count()} logical CPUs)"
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": info["triton"],
        "cuda": torch.version.cuda,
        "dynkernels": info["version"],
        "cuda_kernels": info["cuda_kernels"],
        "threads": torch.get_num_threads(),
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


def load_rows(out_dir: str) -> List[Dict[str, object]]:
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return [dict(zip(data["fields"], values)) for values in data["rows"]]


def merge(old: Iterable[Dict], new: List[Dict]) -> List[Dict]:
    """Old rows of families not in `new`, then the new rows."""
    rerun = {r["family"] for r in new}
    return [r for r in old if r["family"] not in rerun] + list(new)


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
    # one per line so that the file stays small and diffable.
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        f.write('{"meta": ' + json.dumps(meta) + ',\n "fields": ' + json.dumps(FIELDS) + ',\n "rows": [\n')
        f.write(",\n".join(json.dumps([r[k] for k in FIELDS]) for r in rows))
        f.write("\n]}\n")
