"""Tuned tile configurations of the channel-sparse conv kernels, one JSON table per GPU model.

The vLLM pattern: `python -m dynkernels.tune --out DIR` times the candidate configurations of
each kernel on the GPU it runs on and writes DIR/<device>.json; copying that file into
dynkernels/configs/ ships it. At run time the table of the current device
(torch.cuda.get_device_name()) is looked up first in $DYNKERNELS_CONFIG_DIR, then in
dynkernels/configs/. A device without a table gets the heuristic below and a one-line warning,
once per process and device.

Table format (schema 1):
  {"schema": 1, "device": NAME, "meta": {...},
   "entries": [{"cin", "cout", "kh", "kw", "stride": [sh, sw], "ho", "wo", "n", "dtype", "gating",
                "density", "dense_ms", "triton": {TileConfig.to_json(), "ms"} or null,
                "cuda": {"config": id, "ms"} or null}, ...]}
  gating is "out" (output gate only) or "in+out"; density is the fraction of the dense FLOPs the
  gates leave active (output density, times input density for "in+out"); dense_ms is the time
  of dense execution (cuDNN conv, gate multiply and shift), triton/cuda the fastest configuration
  of each kernel and its time (null where that kernel was not available to the tuner).

Nearest entry: tables hold fp16/bf16 entries (the tensor-core kernels); a lookup for those
dtypes returns the entry with the smallest distance
    |log2(cin/cin')| + |log2(cout/cout')| + |log2(pixels/pixels')| + |log2(n/n')| + |log2(d/d')|
    + 4 [kernel size differs] + 2 [stride differs] + 4 [gating differs] + 0.5 [dtype differs]
(pixels = ho * wo, densities floored at 1/64; ties go to the earlier entry). float32/float64
always use the heuristic. A lookup without a density (no hint) uses DEFAULT_DENSITY.

Heuristic (triton_heuristic): the tile shrinks with the expected work: BLOCK_N is the active
output-channel count rounded up to a power of two within [32, 128]; BLOCK_M 128, or 64 where a
sample has at most 64 output pixels or 128-pixel tiles would leave SMs idle; BLOCK_K 64 for
fp16/bf16 and 32 for fp32 (the channel count rounded up to a power of two if smaller), halved
with an input gate while the tile exceeds IN_GATED_MAX_TILE (registers: fits_registers); 8 warps
for 128x128 tiles, else 4; the deepest pipeline (2 to 4 stages) that fits SHARED_MEMORY_BUDGET;
split-K doubled (up to 4) while the active tiles times the split still fit in one wave (SMs x
the programs per SM that shared memory allows, at most 4) and each split keeps at least 16 K
steps. float64 gets a fixed small tile (64, 32, 16; no tensor cores). The CUDA kernel's own
heuristic is its config id -1.

Lookups are cached per (device, layer, density) in a bounded cache guarded by a lock, so the
tables are read once and concurrent callers see consistent results.
"""
import collections
import dataclasses
import functools
import json
import math
import os
import re
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

SCHEMA = 1
CONFIG_DIR_ENV = "DYNKERNELS_CONFIG_DIR"
PACKAGE_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
GATINGS = ("out", "in+out")
TABLE_DTYPES = ("float16", "bfloat16")
DEFAULT_DENSITY = 0.5
SHARED_MEMORY_BUDGET = 200 * 1024  # bytes per program; sm_90 allows 227 KB
# The largest tile (BLOCK_M x BLOCK_N x BLOCK_K) of the kernel with an input gate: compiled for
# sm_90 by Triton 3.6 (the version on the H100/H200 machines), 128 x 128 x 64 with 8 warps took
# 255 registers and spilled 72 bytes to local memory (fp16 and bf16, 3 and 4 stages), while
# 128 x 128 x 32 (8 warps) and 128 x 64 x 64 (4 warps) took 255 without spilling; Triton 3.8
# fits 128 x 128 x 64 in 217 (`python -m dynkernels.triton.compile_report --all-variants`).
IN_GATED_MAX_TILE = 128 * 64 * 64
_MIN_DENSITY = 1.0 / 64


# ----------------------------------------------------------------------------- configurations
@dataclasses.dataclass(frozen=True)
class TileConfig:
    """A tile configuration of the Triton channel-sparse conv kernel."""

    block_m: int  # output pixels per program
    block_n: int  # output channels (positions of a sample's channel list) per program
    block_k: int  # input channels per K step
    num_warps: int
    num_stages: int  # depth of the shared-memory pipeline
    split_k: int = 1  # programs sharing one tile's K range (partial sums added by a second kernel)
    group_m: int = 8  # pixel tiles per group of the grid order within a sample

    _JSON = (("block_m", "BLOCK_M"), ("block_n", "BLOCK_N"), ("block_k", "BLOCK_K"), ("num_warps", "num_warps"),
             ("num_stages", "num_stages"), ("split_k", "SPLIT_K"), ("group_m", "GROUP_M"))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TileConfig: {f.name} must be a positive int, got {v!r}")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig: {name} must be a power of two >= 16, got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"TileConfig: num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")

    def to_list(self) -> List[int]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "TileConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, (list, tuple)) or not 5 <= len(values) <= len(names):
            raise ValueError(f"config must be a list of 5 to {len(names)} ints ({', '.join(names)}), got {values!r}")
        return cls(*values)

    def to_json(self) -> Dict[str, int]:
        return {j: getattr(self, a) for a, j in self._JSON}

    @classmethod
    def from_json(cls, d: dict) -> "TileConfig":
        known = {j for _, j in cls._JSON} | {"ms"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown} (expected {sorted(known)})")
        return cls(**{a: d[j] for a, j in cls._JSON if j in d})

    def fits_registers(self, in_gated: bool) -> bool:
        """Whether the tile stays in registers: with an input gate the kernel gathers each
        weight tile into registers one K step ahead, next to the accumulator, and above
        IN_GATED_MAX_TILE elements (BLOCK_M x BLOCK_N x BLOCK_K) Triton 3.6 spills."""
        return not in_gated or self.block_m * self.block_n * self.block_k <= IN_GATED_MAX_TILE

    def shared_memory(self, elem_size: int, in_gated: bool) -> int:
        """Bytes of shared memory the pipeline needs (an estimate; Triton's own figure is in
        the compiled kernel's metadata). With an input gate only A is a cp.async ring."""
        a, b = self.block_m * self.block_k * elem_size, self.block_n * self.block_k * elem_size
        return self.num_stages * a + (b if in_gated else self.num_stages * b)


# ----------------------------------------------------------------------------- layer keys
@dataclasses.dataclass(frozen=True)
class ConvKey:
    """What a configuration is chosen by: the layer, the batch, the dtype and the gating."""

    cin: int
    cout: int
    kh: int
    kw: int
    stride: Tuple[int, int]
    ho: int
    wo: int
    n: int
    dtype: str  # "bfloat16", "float16", "float32", "float64"
    gating: str  # "out" or "in+out"

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor, in_gate, out_shape: Sequence[int], stride: Sequence[int]):
        return cls(*cls.fields_of(x, weight, in_gate, out_shape, stride))

    @staticmethod
    def fields_of(x: torch.Tensor, weight: torch.Tensor, in_gate, out_shape: Sequence[int], stride: Sequence[int]) -> tuple:
        """The key's fields in order, as a plain tuple (a constant torch.compile can pass on)."""
        # int(): under tracing with dynamic shapes this specialises on the sizes, as the choice of
        # a tile does anyway (and keeps the key hashable)
        return (int(x.shape[1]), int(weight.shape[0]), int(weight.shape[2]), int(weight.shape[3]),
                (int(stride[0]), int(stride[1])), int(out_shape[2]), int(out_shape[3]), int(x.shape[0]),
                str(x.dtype).replace("torch.", ""), "out" if in_gate is None else "in+out")

    @property
    def pixels(self) -> int:
        return self.ho * self.wo

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["stride"] = list(self.stride)
        return d


@dataclasses.dataclass(frozen=True)
class Entry:
    key: ConvKey
    density: float
    dense_ms: Optional[float]
    triton: Optional[TileConfig]
    triton_ms: Optional[float]
    cuda: Optional[int]
    cuda_ms: Optional[float]

    def to_json(self) -> dict:
        d = self.key.to_json()
        d["density"] = self.density
        d["dense_ms"] = self.dense_ms
        d["triton"] = None if self.triton is None else dict(self.triton.to_json(), ms=self.triton_ms)
        d["cuda"] = None if self.cuda is None else {"config": self.cuda, "ms": self.cuda_ms}
        return d


@dataclasses.dataclass(frozen=True)
class Table:
    device: str
    entries: Tuple[Entry, ...]
    meta: dict
    path: Optional[str] = None

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "device": self.device, "meta": self.meta,
                "entries": [e.to_json() for e in self.entries]}


# ----------------------------------------------------------------------------- reading and writing
def table_file_name(device_name: str) -> str:
    """File name of a device's table: the name with every run of characters other than letters,
    digits, '.', '-' replaced by '_' (e.g. NVIDIA_H100_80GB_HBM3.json)."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", device_name).strip("_") + ".json"


def _number(where: str, d: dict, name: str, kind=(int, float), optional=False, positive=True):
    v = d.get(name)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, kind) or (positive and v <= 0):
        raise ValueError(f"{where}: {name} must be a positive {'int' if kind is int else 'number'}, got {v!r}")
    return v


def _entry_from_json(where: str, d: dict) -> Entry:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: an entry must be an object, got {type(d).__name__}")
    stride = d.get("stride")
    if not (isinstance(stride, list) and len(stride) == 2 and all(isinstance(s, int) and s >= 1 for s in stride)):
        raise ValueError(f"{where}: stride must be a list of two positive ints, got {stride!r}")
    if d.get("dtype") not in TABLE_DTYPES:
        raise ValueError(f"{where}: dtype must be one of {TABLE_DTYPES}, got {d.get('dtype')!r}")
    if d.get("gating") not in GATINGS:
        raise ValueError(f"{where}: gating must be one of {GATINGS}, got {d.get('gating')!r}")
    key = ConvKey(*(_number(where, d, f, int) for f in ("cin", "cout", "kh", "kw")), stride=tuple(stride),
                  ho=_number(where, d, "ho", int), wo=_number(where, d, "wo", int), n=_number(where, d, "n", int),
                  dtype=d["dtype"], gating=d["gating"])
    density = _number(where, d, "density")
    if density > 1:
        raise ValueError(f"{where}: density must be in (0, 1], got {density!r}")
    triton_cfg = triton_ms = cuda_id = cuda_ms = None
    if d.get("triton") is not None:
        t = d["triton"]
        try:
            triton_cfg = TileConfig.from_json(t)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where}: triton: {e}") from None
        triton_ms = _number(where + ": triton", t, "ms")
    if d.get("cuda") is not None:
        c = d["cuda"]
        cuda_id = _number(where + ": cuda", c, "config", int, positive=False)
        if cuda_id < 0:
            raise ValueError(f"{where}: cuda: config must be an int >= 0, got {cuda_id}")
        cuda_ms = _number(where + ": cuda", c, "ms")
    known = set(ConvKey.__dataclass_fields__) | {"density", "dense_ms", "triton", "cuda"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")
    return Entry(key, float(density), _number(where, d, "dense_ms", optional=True), triton_cfg, triton_ms, cuda_id, cuda_ms)


def table_from_json(data, where: str = "table") -> Table:
    """A Table from parsed JSON; a ValueError naming `where`, the entry and the field otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{where}: schema must be {SCHEMA}, got {data.get('schema')!r}")
    if not isinstance(data.get("device"), str):
        raise ValueError(f"{where}: device must be a string, got {data.get('device')!r}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: entries must be a list")
    parsed = tuple(_entry_from_json(f"{where}: entries[{i}]", e) for i, e in enumerate(entries))
    return Table(data["device"], parsed, dict(data.get("meta") or {}), where)


def load_table(path: str) -> Table:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return table_from_json(data, path)


def write_table(table: Table, directory: str) -> str:
    """Write `table` as DIR/table_file_name(device); returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, table_file_name(table.device))
    with open(path + ".tmp", "w") as f:
        json.dump(table.to_json(), f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


# ----------------------------------------------------------------------------- nearest entry
def _log_ratio(a: float, b: float) -> float:
    return abs(math.log2(a / b))


def distance(key: ConvKey, density: float, entry: Entry) -> float:
    """How far `entry` is from (key, density); the formula is in the module docstring."""
    e = entry.key
    d = (_log_ratio(key.cin, e.cin) + _log_ratio(key.cout, e.cout) + _log_ratio(key.pixels, e.pixels)
         + _log_ratio(key.n, e.n) + _log_ratio(max(density, _MIN_DENSITY), max(entry.density, _MIN_DENSITY)))
    d += 4.0 * ((key.kh, key.kw) != (e.kh, e.kw)) + 2.0 * (tuple(key.stride) != tuple(e.stride))
    d += 4.0 * (key.gating != e.gating) + 0.5 * (key.dtype != e.dtype)
    return d


def nearest_entry(table: Optional[Table], key: ConvKey, density: Optional[float]) -> Optional[Entry]:
    """The entry of `table` nearest to (key, density), or None (no table, no entries, or a
    dtype that tables do not cover)."""
    if table is None or not table.entries or key.dtype not in TABLE_DTYPES:
        return None
    d = DEFAULT_DENSITY if density is None else density
    return min(table.entries, key=lambda e: distance(key, d, e))


# ----------------------------------------------------------------------------- heuristic
ELEMENT_SIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def pow2_at_least(v: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(v, 1))))


def expected_active_outputs(key: ConvKey, density: Optional[float]) -> int:
    """Active output channels per sample implied by a FLOP density (for "in+out", whose density
    is the product of the two sides, each side is taken as its square root)."""
    d = DEFAULT_DENSITY if density is None else density
    d_out = math.sqrt(d) if key.gating == "in+out" else d
    return max(1, math.ceil(d_out * key.cout))


def channel_stride(cin: int) -> int:
    """Channels per pixel of the kernel's NHWC input (Cin rounded up to 8)."""
    return (cin + 7) // 8 * 8


def triton_heuristic(key: ConvKey, density: Optional[float], num_sms: int = 132) -> TileConfig:
    """The documented fallback configuration (see the module docstring)."""
    elem = ELEMENT_SIZE[key.dtype]
    in_gated = key.gating == "in+out"
    active = expected_active_outputs(key, density)
    if elem == 8:  # no tensor cores for float64 here: small FMA tiles
        return TileConfig(64, 32, 16, 4, 2)
    block_n = min(128, max(32, pow2_at_least(active)))
    block_n_tiles = math.ceil(active / block_n)
    if key.pixels <= 64 or key.n * math.ceil(key.pixels / 128) * block_n_tiles < num_sms:
        block_m = 64
    else:
        block_m = 128
    xc = channel_stride(key.cin)
    block_k = max(16, min(64 if elem == 2 else 32, pow2_at_least(xc)))
    while block_k > 16 and not TileConfig(block_m, block_n, block_k, 4, 2).fits_registers(in_gated):
        block_k //= 2
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    stages = 2
    for s in (4, 3):
        if TileConfig(block_m, block_n, block_k, num_warps, s).shared_memory(elem, in_gated) <= SHARED_MEMORY_BUDGET:
            stages = s
            break
    live_tiles = key.n * math.ceil(key.pixels / block_m) * block_n_tiles
    tile = TileConfig(block_m, block_n, block_k, num_warps, stages)
    resident = num_sms * max(1, min(4, SHARED_MEMORY_BUDGET // tile.shared_memory(elem, in_gated)))
    d = DEFAULT_DENSITY if density is None else density
    k_len = channel_stride(math.ceil(key.cin * math.sqrt(d))) if in_gated else xc
    k_steps = math.ceil(k_len / block_k) * key.kh * key.kw
    split = 1
    while split < 4 and live_tiles * split * 2 <= resident and k_steps >= 32 * split:
        split *= 2
    return TileConfig(block_m, block_n, block_k, num_warps, stages, split_k=split)


# ----------------------------------------------------------------------------- run-time lookup
_lock = threading.Lock()
_tables: Dict[str, Optional[Table]] = {}
_choices: "collections.OrderedDict[tuple, Optional[Entry]]" = collections.OrderedDict()
_CHOICE_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=None)
def _device_properties(index: int):
    return torch.cuda.get_device_properties(index)


def _index(device) -> int:
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name of a CUDA device (a host-side property query, cached)."""
    return _device_properties(_index(device)).name


def num_sms(device: torch.device) -> int:
    return _device_properties(_index(device)).multi_processor_count


def find_table_file(name: str) -> Optional[str]:
    for directory in (os.environ.get(CONFIG_DIR_ENV), PACKAGE_CONFIG_DIR):
        if directory:
            path = os.path.join(directory, table_file_name(name))
            if os.path.isfile(path):
                return path
    return None


def table_for_device(name: str) -> Optional[Table]:
    """The table of device `name` (read once per process), or None with a one-line warning (the
    first time) when there is none."""
    with _lock:
        if name in _tables:
            return _tables[name]
        path = find_table_file(name)
        table = load_table(path) if path is not None else None
        _tables[name] = table
    if table is None:
        warnings.warn(
            f"dynkernels: no tuned conv configurations for {name!r} (looked for {table_file_name(name)} in "
            f"${CONFIG_DIR_ENV} and {PACKAGE_CONFIG_DIR}); using the heuristic; `python -m dynkernels.tune` makes one",
            RuntimeWarning, stacklevel=2,
        )
    return table


def clear_cache() -> None:
    """Forget the tables read and the choices made (after changing $DYNKERNELS_CONFIG_DIR)."""
    with _lock:
        _tables.clear()
        _choices.clear()


def entry_for(name: str, key: ConvKey, density: Optional[float]) -> Optional[Entry]:
    """nearest_entry of device `name`'s table, cached."""
    cache_key = (name, key, None if density is None else round(density, 4))
    with _lock:
        if cache_key in _choices:
            _choices.move_to_end(cache_key)
            return _choices[cache_key]
    entry = nearest_entry(table_for_device(name), key, density)
    with _lock:
        _choices[cache_key] = entry
        if len(_choices) > _CHOICE_CACHE_SIZE:
            _choices.popitem(last=False)
    return entry


def triton_config(device: torch.device, key: ConvKey, density: Optional[float] = None) -> TileConfig:
    """The Triton kernel's tile for this layer on this device: the nearest table entry's, else
    triton_heuristic."""
    entry = entry_for(device_name(device), key, density)
    if entry is not None and entry.triton is not None:
        return entry.triton
    return triton_heuristic(key, density, num_sms(device))


def cuda_conv_configs() -> List[dict]:
    """The CUDA kernel's tile configurations (dynkernels._C.cuda_conv_configs(): one dict per
    config id), or [] where this build has none."""
    from ._extension import _C

    fn = getattr(_C, "cuda_conv_configs", None)
    return list(fn()) if fn is not None else []


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # (inside the cache, which torch.compile sees through)
def cuda_config_ids() -> Tuple[int, ...]:
    """The CUDA kernel's config ids (read once: a build's configurations do not change)."""
    return tuple(int(c["id"]) for c in cuda_conv_configs())


def cuda_config(device: torch.device, key: ConvKey, density: Optional[float] = None) -> int:
    """The CUDA kernel's config id for this layer on this device: the nearest table entry's,
    else -1 (the kernel's own heuristic)."""
    entry = entry_for(device_name(device), key, density)
    return entry.cuda if entry is not None and entry.cuda is not None else -1
