"""dynkernels.tuned_configs on the CPU: configurations, the table format, the nearest-entry lookup,
the heuristic, the missing-table warning and the cache (the device name is mocked)."""
import glob
import json
import os
import threading
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from dynkernels import tuned_configs as tc
from dynkernels.tuned_configs import ConvKey, Entry, Table, TileConfig

R18_L4 = ConvKey(512, 512, 3, 3, (1, 1), 7, 7, 128, "bfloat16", "out")
R18_L1 = ConvKey(64, 64, 3, 3, (1, 1), 56, 56, 128, "bfloat16", "out")


def entry(key=R18_L4, density=0.5, dense_ms=1.0, triton=(TileConfig(64, 64, 64, 4, 4), 0.6), cuda=(2, 0.5)):
    t_cfg, t_ms = triton if triton else (None, None)
    c_id, c_ms = cuda if cuda else (None, None)
    return Entry(key, density, dense_ms, t_cfg, t_ms, c_id, c_ms)


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """An empty $DYNKERNELS_CONFIG_DIR, no shipped tables, and fresh caches."""
    monkeypatch.setenv(tc.CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(tc, "PACKAGE_CONFIG_DIR", str(tmp_path / "no-shipped-tables"))
    tc.clear_cache()
    yield tmp_path
    tc.clear_cache()


# ----------------------------------------------------------------------------- TileConfig
def test_tile_config_round_trips():
    cfg = TileConfig(128, 64, 32, 4, 3, split_k=2, group_m=4)
    assert TileConfig.from_list(cfg.to_list()) == cfg
    assert TileConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert cfg.to_json() == {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3,
                             "SPLIT_K": 2, "GROUP_M": 4}
    assert TileConfig.from_list([64, 32, 64, 4, 4]) == TileConfig(64, 32, 64, 4, 4, 1, 8)  # defaults


@pytest.mark.parametrize("values,msg", [
    ([64, 48, 64, 4, 4], "block_n must be a power of two >= 16"),
    ([8, 32, 64, 4, 4], "block_m must be a power of two >= 16"),
    ([64, 32, 64, 3, 4], "num_warps must be 1, 2, 4, 8 or 16"),
    ([64, 32, 64, 4, 0], "num_stages must be a positive int"),
    ([64, 32, 64, 4, 4, True], "split_k must be a positive int"),
    ([64, 32, 64], "config must be a list of 5 to 7 ints"),
    ("64,32", "config must be a list"),
])
def test_tile_config_rejects_bad_values(values, msg):
    with pytest.raises(ValueError, match=msg):
        TileConfig.from_list(values)


def test_shared_memory_estimate():
    cfg = TileConfig(128, 64, 64, 4, 3)
    assert cfg.shared_memory(2, in_gated=False) == 3 * (128 + 64) * 64 * 2
    assert cfg.shared_memory(2, in_gated=True) == 3 * 128 * 64 * 2 + 64 * 64 * 2  # B is not a cp.async ring


# ----------------------------------------------------------------------------- table format
def test_table_json_round_trip(tmp_path):
    entries = (entry(), entry(R18_L1, 1.0, 0.2, None, (0, 0.3)), entry(density=0.1, cuda=None, dense_ms=None))
    table = Table("NVIDIA H100 80GB HBM3", entries, {"triton": "3.8.0"})
    path = tc.write_table(table, str(tmp_path))
    assert os.path.basename(path) == "NVIDIA_H100_80GB_HBM3.json"
    back = tc.load_table(path)
    assert back.entries == entries and back.device == table.device and back.meta == table.meta
    assert json.loads(Path(path).read_text())["schema"] == tc.SCHEMA


def test_table_file_name():
    assert tc.table_file_name("NVIDIA H200") == "NVIDIA_H200.json"
    assert tc.table_file_name("NVIDIA A100-SXM4-80GB (MIG 1g.10gb)") == "NVIDIA_A100-SXM4-80GB_MIG_1g.10gb.json"


def _good_entry_json():
    return entry().to_json()


@pytest.mark.parametrize("change,msg", [
    (dict(dtype="float32"), r"entries\[0\]: dtype must be one of"),
    (dict(gating="in"), r"entries\[0\]: gating must be one of"),
    (dict(cin=0), r"entries\[0\]: cin must be a positive int"),
    (dict(stride=[1]), r"entries\[0\]: stride must be a list of two positive ints"),
    (dict(density=1.5), r"entries\[0\]: density must be in \(0, 1\]"),
    (dict(density=0), r"entries\[0\]: density must be a positive number"),
    (dict(colour="red"), r"entries\[0\]: unknown fields \['colour'\]"),
    (dict(triton={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4, "ms": -1}),
     r"entries\[0\]: triton: ms must be a positive number"),
    (dict(triton={"BLOCK_M": 60, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4, "ms": 1}),
     r"entries\[0\]: triton: TileConfig: block_m must be a power of two"),
    (dict(triton={"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "ms": 1}), r"entries\[0\]: triton"),
    (dict(cuda={"config": -1, "ms": 1.0}), r"entries\[0\]: cuda: config must be an int >= 0"),
])
def test_table_schema_errors_name_the_field(change, msg):
    e = _good_entry_json()
    e.update(change)
    with pytest.raises(ValueError, match=msg):
        tc.table_from_json({"schema": 1, "device": "X", "entries": [e]}, "X.json")


@pytest.mark.parametrize("data,msg", [
    ([], "expected a JSON object"),
    ({"schema": 2, "device": "X", "entries": []}, "schema must be 1"),
    ({"schema": 1, "device": None, "entries": []}, "device must be a string"),
    ({"schema": 1, "device": "X", "entries": {}}, "entries must be a list"),
])
def test_table_header_errors(data, msg):
    with pytest.raises(ValueError, match=msg):
        tc.table_from_json(data, "X.json")


def test_invalid_json_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        tc.load_table(str(p))


def test_shipped_tables_load():
    """Every table shipped in dynkernels/configs/ parses and is named after its device."""
    assert os.path.isdir(tc.PACKAGE_CONFIG_DIR)
    for path in glob.glob(os.path.join(tc.PACKAGE_CONFIG_DIR, "*.json")):
        table = tc.load_table(path)
        assert os.path.basename(path) == tc.table_file_name(table.device)


# ----------------------------------------------------------------------------- nearest entry
def test_nearest_entry_prefers_exact_match():
    exact = entry(R18_L4, 0.5)
    others = [entry(R18_L1, 0.5), entry(R18_L4, 0.25), entry(R18_L4, 1.0)]
    table = Table("X", tuple(others + [exact]), {})
    assert tc.nearest_entry(table, R18_L4, 0.5) is exact


def test_nearest_entry_by_density_and_shape():
    e05, e1 = entry(R18_L4, 0.5), entry(R18_L4, 1.0)
    table = Table("X", (e05, e1), {})
    assert tc.nearest_entry(table, R18_L4, 0.9) is e1
    assert tc.nearest_entry(table, R18_L4, 0.6) is e05
    assert tc.nearest_entry(table, R18_L4, None) is e05  # no hint: DEFAULT_DENSITY
    # another batch size and a slightly different layer still find the same layer's entries
    near = ConvKey(480, 512, 3, 3, (1, 1), 7, 7, 96, "bfloat16", "out")
    assert tc.nearest_entry(table, near, 1.0) is e1


def test_nearest_entry_penalties():
    one_by_one = ConvKey(512, 512, 1, 1, (1, 1), 7, 7, 128, "bfloat16", "out")
    gated = ConvKey(512, 512, 3, 3, (1, 1), 7, 7, 128, "bfloat16", "in+out")
    fp16 = ConvKey(512, 512, 3, 3, (1, 1), 7, 7, 128, "float16", "out")
    e_3x3, e_1x1, e_gated = entry(R18_L4), entry(one_by_one), entry(gated)
    table = Table("X", (e_3x3, e_1x1, e_gated), {})
    assert tc.nearest_entry(table, one_by_one, 0.5) is e_1x1
    assert tc.nearest_entry(table, gated, 0.5) is e_gated
    assert tc.nearest_entry(table, fp16, 0.5) is e_3x3  # the other 16-bit dtype stands in
    assert tc.distance(fp16, 0.5, e_3x3) == pytest.approx(0.5)
    assert tc.distance(one_by_one, 0.5, e_3x3) == pytest.approx(4.0)


def test_nearest_entry_none_without_table_or_for_fp32():
    table = Table("X", (entry(),), {})
    assert tc.nearest_entry(None, R18_L4, 0.5) is None
    assert tc.nearest_entry(Table("X", (), {}), R18_L4, 0.5) is None
    fp32 = ConvKey(512, 512, 3, 3, (1, 1), 7, 7, 128, "float32", "out")
    assert tc.nearest_entry(table, fp32, 0.5) is None


# ----------------------------------------------------------------------------- heuristic
def test_heuristic_tile_shrinks_with_the_work():
    wide = ConvKey(512, 512, 3, 3, (1, 1), 28, 28, 128, "bfloat16", "out")
    assert tc.triton_heuristic(wide, 1.0).block_n == 128
    assert tc.triton_heuristic(wide, 0.1).block_n == 64
    assert tc.triton_heuristic(wide, 0.05).block_n == 32
    assert tc.triton_heuristic(R18_L4, 0.5).block_m == 64  # 49 pixels per sample
    assert tc.triton_heuristic(R18_L1, 0.5).block_m == 128


def test_heuristic_split_k_only_when_tiles_are_few():
    small = ConvKey(512, 512, 3, 3, (1, 1), 7, 7, 64, "bfloat16", "out")
    assert tc.triton_heuristic(small, 0.05, num_sms=132).split_k > 1  # 64 tiles, 72 K steps
    assert tc.triton_heuristic(R18_L1, 0.05, num_sms=132).split_k == 1  # thousands of tiles
    assert tc.triton_heuristic(small, 0.05, num_sms=8).split_k == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("gating", tc.GATINGS)
def test_heuristic_fits_shared_memory(dtype, gating):
    elem = 4 if dtype == "float32" else 2
    for cin, cout, k, hw in [(64, 64, 3, 56), (512, 512, 3, 7), (2048, 512, 1, 7), (3, 64, 7, 112), (20, 40, 3, 9)]:
        for density in (0.05, 0.5, 1.0, None):
            key = ConvKey(cin, cout, k, k, (1, 1), hw, hw, 64, dtype, gating)
            cfg = tc.triton_heuristic(key, density)
            assert cfg.shared_memory(elem, gating == "in+out") <= tc.SHARED_MEMORY_BUDGET
            assert cfg.fits_registers(gating == "in+out")
            if elem == 2:
                assert cfg.num_stages >= 3
            assert cfg.block_k <= max(16, 1 << (tc.channel_stride(cin) - 1).bit_length())  # no wider than the channels


def test_an_input_gate_keeps_the_tile_in_registers():
    """With an input gate the weight tile is gathered into registers a step ahead: 128 x 128 x 64
    spilled with Triton 3.6, so the heuristic halves BLOCK_K there (not without the gate)."""
    assert not TileConfig(128, 128, 64, 8, 4).fits_registers(True)
    assert TileConfig(128, 128, 64, 8, 4).fits_registers(False)
    assert TileConfig(128, 128, 32, 8, 4).fits_registers(True) and TileConfig(128, 64, 64, 4, 4).fits_registers(True)
    wide = ConvKey(512, 512, 3, 3, (1, 1), 28, 28, 128, "bfloat16", "in+out")
    gated, plain = tc.triton_heuristic(wide, 1.0), tc.triton_heuristic(replace(wide, gating="out"), 1.0)
    assert (gated.block_m, gated.block_n, gated.block_k) == (128, 128, 32)
    assert (plain.block_m, plain.block_n, plain.block_k) == (128, 128, 64)


def test_heuristic_float64():
    key = ConvKey(8, 8, 3, 3, (1, 1), 8, 8, 2, "float64", "out")
    assert tc.triton_heuristic(key, None) == TileConfig(64, 32, 16, 4, 2)


# ----------------------------------------------------------------------------- run-time lookup
def test_missing_table_warns_once(config_dir, monkeypatch):
    with pytest.warns(RuntimeWarning, match="no tuned conv configurations for 'Fake GPU'") as record:
        assert tc.entry_for("Fake GPU", R18_L4, 0.5) is None
        assert tc.entry_for("Fake GPU", R18_L1, None) is None
        assert tc.table_for_device("Fake GPU") is None
    assert len(record) == 1
    assert "\n" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tc.entry_for("Fake GPU", R18_L4, 0.25)  # still no second warning


def test_table_found_in_config_dir(config_dir):
    table = Table("Fake GPU", (entry(R18_L4, 0.5), entry(R18_L4, 1.0, cuda=(5, 0.1))), {})
    tc.write_table(table, str(config_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tc.entry_for("Fake GPU", R18_L4, 0.5) == table.entries[0]
        assert tc.entry_for("Fake GPU", R18_L4, 0.95) == table.entries[1]


def test_triton_and_cuda_config_choice(config_dir, monkeypatch):
    monkeypatch.setattr(tc, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(tc, "num_sms", lambda device: 132)
    tuned = TileConfig(128, 32, 64, 4, 4)
    tc.write_table(Table("Fake GPU", (entry(R18_L4, 0.5, triton=(tuned, 0.1), cuda=(3, 0.2)),), {}), str(config_dir))
    assert tc.triton_config("cuda:0", R18_L4, 0.5) == tuned
    assert tc.cuda_config("cuda:0", R18_L4, 0.5) == 3
    fp32 = ConvKey(512, 512, 3, 3, (1, 1), 7, 7, 128, "float32", "out")  # not in tables: the heuristic
    assert tc.triton_config("cuda:0", fp32, 0.5) == tc.triton_heuristic(fp32, 0.5, 132)
    assert tc.cuda_config("cuda:0", fp32, 0.5) == -1


def test_lookup_is_thread_safe(config_dir):
    tc.write_table(Table("Fake GPU", tuple(entry(R18_L4, d) for d in (0.1, 0.5, 1.0)), {}), str(config_dir))
    results, errors = [], []

    def work(i):
        try:
            results.append(tc.entry_for("Fake GPU", R18_L4, (0.1, 0.5, 1.0)[i % 3]).density == (0.1, 0.5, 1.0)[i % 3])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 24 and all(results)
