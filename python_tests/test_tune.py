"""python -m dynkernels.tune on the CPU: what it would tune and time (not the timing itself)."""
import math

import pytest
import torch

from dynkernels import tune, tuned_configs
from dynkernels.tuned_configs import ConvKey, TileConfig

from _utils import needs_interpreter


def test_tuning_set_covers_the_resnet_layers_most_important_first():
    work = tune.tuning_set()
    per_gating = {g: len(d) for g, d in tune.DENSITIES.items()}
    assert len(work) == len(tune.LAYERS) * len(tune.BATCHES) * len(tune.DTYPES) * sum(per_gating.values())
    keys = [key for _, key, _ in work]
    assert {(k.cin, k.cout, k.kh, k.ho) for k in keys} == {(c, o, k, hw) for _, c, o, k, hw in tune.LAYERS}
    assert {k.n for k in keys} == {64, 128} and {k.gating for k in keys} == {"out", "in+out"}
    assert all(k.stride == (1, 1) for k in keys)
    first_fp16 = next(i for i, k in enumerate(keys) if k.dtype == "float16")
    assert all(k.dtype == "bfloat16" for k in keys[:first_fp16]) and keys[0].n == 128
    assert work[0][2] == 0.5  # the headline density first


def test_triton_candidates_follow_the_work():
    l4 = ConvKey(512, 512, 3, 3, (1, 1), 7, 7, 128, "bfloat16", "out")
    sparse = tune.triton_candidates(l4, 0.05)
    assert sparse and all(c.block_n == 32 for c in sparse)  # 26 active channels
    dense = tune.triton_candidates(l4, 1.0)
    assert {c.block_n for c in dense} == {32, 64, 128}
    assert all(c.block_m == 64 for c in dense)  # 49 pixels: no 128-pixel tiles
    l1 = ConvKey(64, 64, 3, 3, (1, 1), 56, 56, 128, "bfloat16", "out")
    assert any(c.block_m == 128 for c in tune.triton_candidates(l1, 1.0))


def test_triton_candidates_are_valid_and_bounded():
    for _, key, density in tune.tuning_set():
        cands = tune.triton_candidates(key, density)
        assert 1 <= len(cands) <= len(tune.TRITON_TILES) + 1
        assert len(set(cands)) == len(cands)
        h = tuned_configs.triton_heuristic(key, density)
        assert TileConfig(h.block_m, h.block_n, h.block_k, h.num_warps, h.num_stages) in cands
        active = tuned_configs.expected_active_outputs(key, density)
        for c in cands:
            assert c.split_k == 1
            assert c.block_n <= max(32, 1 << math.ceil(math.log2(active)))
            assert c.shared_memory(2, key.gating == "in+out") <= tuned_configs.SHARED_MEMORY_BUDGET
            assert c.fits_registers(key.gating == "in+out")


def test_split_k_candidates_only_for_few_tiles():
    best = TileConfig(64, 32, 64, 4, 4)
    small = ConvKey(512, 512, 3, 3, (1, 1), 7, 7, 64, "bfloat16", "out")
    assert [c.split_k for c in tune.split_k_candidates(best, small, 0.05)] == [2, 4]
    big = ConvKey(64, 64, 3, 3, (1, 1), 56, 56, 128, "bfloat16", "out")
    assert tune.split_k_candidates(best, big, 0.05) == []


def test_the_whole_set_is_sized_for_the_time_budget():
    """About 5 minutes on an H100: the number of Triton timings stays within ~9 per entry."""
    work = tune.tuning_set()
    timings = sum(len(tune.triton_candidates(key, d)) for _, key, d in work)
    assert timings <= 9 * len(work)
    assert len(work) <= 450


def test_cuda_candidates(monkeypatch):
    from dynkernels import _extension

    if _extension._C is not None and not hasattr(_extension._C, "cuda_conv_configs"):
        assert tune.cuda_candidates() == []
    fake = type("C", (), {"cuda_conv_configs": staticmethod(lambda: [{"id": 0, "BM": 128}, {"id": 1, "BM": 64}])})
    monkeypatch.setattr(_extension, "_C", fake)
    tuned_configs.cuda_config_ids.cache_clear()
    try:
        assert tune.cuda_candidates() == [0, 1]
    finally:
        monkeypatch.undo()
        tuned_configs.cuda_config_ids.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_tune_without_gpu_says_so(tmp_path, capsys):
    assert tune.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.triton
@needs_interpreter
def test_tuner_bookkeeping_under_the_interpreter(monkeypatch, tmp_path):
    """One entry through Tuner.entry on CPU tensors (timings faked, kernels real): the fastest
    candidate that matches dense execution is kept, and the table it makes round-trips."""
    times = iter(range(1, 100))
    monkeypatch.setattr(tune, "_bench", lambda fn, warmup_ms, rep_ms: float(next(times)))
    monkeypatch.setattr(tune, "TRITON_TILES", [(16, 16, 16, 1, 1), (32, 16, 16, 1, 1)])
    lines = []
    tuner = tune.Tuner(1, 1, use_triton=True, use_cuda=True, log=lines.append, device="cpu")
    key = ConvKey(8, 24, 3, 3, (1, 1), 6, 6, 2, "float16", "in+out")
    e = tuner.entry("tiny", key, 0.49)
    assert e.dense_ms == 1.0 and e.triton == TileConfig(16, 16, 16, 1, 1) and e.triton_ms == 2.0
    assert e.cuda is None  # the CUDA kernel is timed on a GPU only
    assert any(line.startswith("    triton [32, 16, 16, 1, 1, 1, 8]") for line in lines)
    path = tuned_configs.write_table(tuned_configs.Table("Fake GPU", (e,), {}), str(tmp_path))
    assert tuned_configs.load_table(path).entries == (e,)


def test_compile_jobs_cover_each_candidate_once():
    work = tune.tuning_set()
    job_args = tune.compile_jobs(work, 132, per_job=4)
    compiled = [(kh, gating, dtype, tuple(cfg)) for kh, gating, dtype, cfgs in job_args for cfg in cfgs]
    assert len(compiled) == len(set(compiled))
    wanted = {(key.kh, key.gating, key.dtype, tuple(c.to_list())) for _, key, d in work for c in tune.triton_candidates(key, d)}
    assert set(compiled) == wanted
    assert all(1 <= len(cfgs) <= 4 for *_, cfgs in job_args)
