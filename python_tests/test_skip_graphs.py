"""The sparse block's launches (one gather and one merge per block), and CUDA-graph replay of
the blocks on their compact batches: errors where graphs cannot apply, a thread-safe graph
cache, and (on a GPU) replay equal to eager execution for SkipBlock, SkipSequential, BlockDrop
and L-Net."""
import copy
import threading
import time

import pytest
import torch
import torch.nn as nn
from _utils import assert_close
from test_skip_block import TorchvisionBasicBlock, branch, chain, randomize_bn
from torch.utils._python_dispatch import TorchDispatchMode

from dynkernels.models.blockdrop import resnet32_cifar
from dynkernels.models.lcnet import resnet50
from dynkernels.nn import GraphPool, SkipBlock, SkipPlan, SkipSequential
from dynkernels.nn.bucket import bucket_sizes

RTOL = 1e-4


class RecordOps(TorchDispatchMode):
    """The names of the operators dispatched inside the context, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func).removesuffix(".default"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bucket", [None, 4], ids=["exact", "step4"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_one_gather_and_one_merge_per_sparse_block(bucket, grad):
    """Around the block itself a sparse forward dispatches one gather and one merge (given a
    plan); given only the gate, one compact before them (scaled gates: and one comparison).
    No copies, no zero fills, no index ops besides."""
    block = nn.Conv2d(4, 4, 1).eval()
    x = torch.randn(8, 4, 4, 4)
    gate = torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1])
    with torch.set_grad_enabled(grad):
        for scaled, merge, prelude in [(False, "dynkernels.scatter_rows", []), (True, "dynkernels.scatter_add_rows", ["aten.ne.Scalar"])]:
            skip = SkipBlock(block, scaled=scaled, bucket=bucket).eval()
            plan = SkipPlan(gate[:, None], scaled=scaled, bucket=bucket)[0]
            with RecordOps() as planned:
                skip(x, gate, plan=plan)
            assert planned.ops == ["dynkernels.gather_rows", "aten.convolution", merge]
            with RecordOps() as gated:
                skip(x, gate)
            assert gated.ops == prelude + ["dynkernels.compact", "dynkernels.gather_rows", "aten.convolution", merge]


def test_planned_network_dispatches_one_compact_and_per_block_one_gather_and_merge():
    torch.manual_seed(21)
    model = resnet32_cifar(backend="cpu").eval()
    policy = (torch.rand(6, 15) < 0.5).float()
    policy[:, 3] = 1.0  # kept by all: no gather, no merge
    policy[:, 4] = 0.0  # kept by none: the block does not run
    with torch.no_grad(), RecordOps() as rec:
        model(torch.randn(6, 3, 8, 8), policy)
    ours = [op for op in rec.ops if op.startswith("dynkernels.")]
    kept = (policy > 0).sum(0).tolist()
    firsts = {0, 5, 10}  # first blocks of a stage also gather their downsample shortcut
    want = ["dynkernels.compact"]
    for t, k in enumerate(kept):
        if 0 < k < 6:
            # (no gradient recorded: the network merges into its own intermediate, in place)
            want += ["dynkernels.gather_rows"] * (2 if t in firsts else 1) + ["dynkernels.scatter_rows_"]
    assert ours == want


# ----------------------------------------------------------------------------- errors (any device)
def graph_owners():
    """(name, module, call) for each module that takes cuda_graphs."""
    x4, g4 = torch.randn(4, 8, 4, 4), torch.tensor([1.0, 0.0, 1.0, 1.0])
    img, policy = torch.randn(2, 3, 8, 8), torch.ones(2, 15)
    policy[0, :5] = 0
    return [
        ("SkipBlock", SkipBlock(TorchvisionBasicBlock(8, 8), cuda_graphs=True), lambda m: m(x4, g4)),
        ("SkipBlock", SkipSequential([chain(n_blocks=2).blocks[0]], cuda_graphs=True), lambda m: m(x4, g4[:, None])),
        ("BlockDropResNet", resnet32_cifar(cuda_graphs=True), lambda m: m(img, policy)),
        ("SkipBlock", resnet50(num_classes=3, cuda_graphs=True), lambda m: m(img)),
    ]


def test_graphs_need_eval_mode_no_grad_and_cuda_tensors():
    for owner, module, call in graph_owners():
        module.train()
        with torch.no_grad(), pytest.raises(RuntimeError, match=f"{owner}: cuda_graphs is for inference, but the module is in training mode"):
            call(module)
        module.eval()
        with pytest.raises(RuntimeError, match=rf"{owner}: cuda_graphs is for inference: run the forward under torch.no_grad\(\)"):
            call(module)
        with torch.no_grad(), pytest.raises(ValueError, match=f"{owner}: cuda_graphs needs CUDA tensors, got x on cpu"):
            call(module)
        module.cuda_graphs = False  # the switch: eager again
        with torch.no_grad():
            call(module)


def test_graph_arguments_are_checked():
    with pytest.raises(TypeError, match="SkipBlock: cuda_graphs must be a bool or a GraphPool, got str"):
        SkipBlock(nn.Identity(), cuda_graphs="yes")
    with pytest.raises(TypeError, match="BlockDropResNet: cuda_graphs must be a bool or a GraphPool"):
        resnet32_cifar(cuda_graphs=1)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="GraphPool: max_rows must be a positive int or None"):
            GraphPool(max_rows=bad)
    with pytest.raises(RuntimeError, match="SkipBlock.capture_graphs: cuda_graphs is off"):
        SkipBlock(nn.Identity()).capture_graphs(torch.randn(4, 2))
    exact = SkipBlock(nn.Identity(), bucket=None, cuda_graphs=True).eval()
    with pytest.raises(ValueError, match=r"with exact counts \(bucket=None\) give the sizes to capture"):
        exact.capture_graphs(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"sizes must be in \[1, 4\]"):
        exact.capture_graphs(torch.randn(4, 2), sizes=[2, 5])
    with pytest.raises(RuntimeError, match="BlockDropResNet.capture_graphs: cuda_graphs is off"):
        resnet32_cifar().capture_graphs(torch.randn(2, 3, 8, 8))


def test_a_shared_pool_and_copies():
    seq = SkipSequential([SkipBlock(nn.Identity()) for _ in range(3)], cuda_graphs=True)
    pools = {id(b.cuda_graphs) for b in seq.blocks}
    assert len(pools) == 1 and seq.cuda_graphs is seq.blocks[0].cuda_graphs
    twin = copy.deepcopy(seq)  # a copy gets its own (empty) pool, shared by its blocks
    assert twin.cuda_graphs is not seq.cuda_graphs and len(twin.cuda_graphs) == 0
    assert len({id(b.cuda_graphs) for b in twin.blocks}) == 1
    pool = GraphPool(max_rows=16)
    model = resnet50(num_classes=2, cuda_graphs=pool)
    assert all(b.skip.cuda_graphs is pool for b in model.blocks)
    model.cuda_graphs = False
    assert model.cuda_graphs is None and all(b.skip.cuda_graphs is None for b in model.blocks)


class FakeGraphPool(GraphPool):
    """GraphPool with its CUDA parts replaced, to test the cache and its lock on the CPU: a
    'graph' computes fn on the static inputs into its static output, slowly."""

    def __init__(self):
        super().__init__()
        self.captures = []

    def _follow_last_stream(self, device):
        pass

    def _capture(self, fn, inputs):
        self.captures.append(tuple(t.shape[0] for t in inputs))
        time.sleep(0.01)  # a wide window for a second capture of the same key
        static = tuple(t.clone() for t in inputs)
        out = fn(*static)

        class Replay:
            def replay(self):
                time.sleep(0.0005)
                out.copy_(fn(*static))

        from dynkernels.nn.graphs import _Graph

        return _Graph(Replay(), static, out)


def test_graph_cache_is_thread_safe():
    """Threads replaying one pool's graphs concurrently: each key is captured once, and every
    caller reads the output of its own replay (the lock spans replay and read)."""
    pool = FakeGraphPool()
    fn = nn.Linear(3, 3)
    errors = []

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(30):
                rows = [2, 4, 6][int(torch.randint(0, 3, (), generator=g))]
                x = torch.randn(rows, 3, generator=g)
                with torch.no_grad(), pool.lock:
                    got = pool.run(fn, x).clone()
                assert torch.allclose(got, fn(x).detach(), atol=1e-6), "read another call's replay"
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sorted(pool.captures) == [(2,), (4,), (6,)]
    assert len(pool) == 3


def test_rows_above_max_rows_run_eagerly():
    pool = FakeGraphPool()
    pool.max_rows = 4
    fn = nn.Linear(3, 3)
    with torch.no_grad():
        pool.run(fn, torch.randn(4, 3))
        pool.run(fn, torch.randn(6, 3))
    assert pool.captures == [(4,)]


# ----------------------------------------------------------------------------- on a GPU
def cuda_chain(n_blocks, c, **kw):
    blocks = [SkipBlock(randomize_bn(TorchvisionBasicBlock(c, c)).eval(), **kw) for _ in range(n_blocks)]
    return SkipSequential(blocks).cuda().eval()


@pytest.mark.cuda
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_skip_block_graph_replay_equals_eager(scaled, dtype):
    torch.manual_seed(22)
    n = 24
    block = (branch(8) if scaled else randomize_bn(TorchvisionBasicBlock(8, 8))).cuda().to(dtype).eval()
    block = block.to(memory_format=torch.channels_last)
    eager = SkipBlock(block, scaled=scaled).eval()
    graphed = SkipBlock(block, scaled=scaled, cuda_graphs=True).eval()
    outs = []
    with torch.no_grad():
        for k in (0, 1, 5, 8, 9, 17, 23, 24, 5, 9):  # repeats replay graphs captured before
            x = torch.randn(n, 8, 6, 6, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
            gate = torch.zeros(n, device="cuda", dtype=dtype)
            gate[torch.randperm(n, device="cuda")[:k]] = 0.5 + torch.rand(k, device="cuda").to(dtype)
            got = graphed(x, gate)
            outs.append((got, eager(x, gate)))
            eager.execution = "masked"
            assert_close(got, eager(x, gate), rtol=RTOL if dtype == torch.float32 else None)
            eager.execution = "sparse"
    for got, want in outs:  # every output is its own tensor: later replays did not overwrite it
        assert_close(got, want, rtol=RTOL if dtype == torch.float32 else None)
    # sizes 8, 16, 24 (1..7 -> 8, 9 and 17 -> 16 and 24); 24 kept = all kept runs eagerly; 0 runs nothing
    assert len(graphed.cuda_graphs) == len({8, 16, 24})


@pytest.mark.cuda
def test_sequential_graphs_one_sync_per_forward_and_ahead_of_time_capture():
    import warnings

    torch.manual_seed(23)
    n = 16
    seq = cuda_chain(4, 8, backend="auto")
    seq.cuda_graphs = GraphPool()
    x = torch.randn(n, 8, 8, 8, device="cuda")
    with torch.no_grad():
        captured = seq.capture_graphs(x)
        assert captured == 4 * len(bucket_sizes(8, n))
        for _ in range(3):
            policy = (torch.rand(n, 4, device="cuda") < 0.5).float()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    got = seq(x, policy)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            assert sum("called a synchronizing" in str(w.message) for w in caught) == 1
            seq.execution = "masked"
            assert_close(got, seq(x, policy), rtol=RTOL)
            seq.execution = "sparse"
    assert len(seq.cuda_graphs) == captured  # nothing new captured


@pytest.mark.cuda
def test_blockdrop_and_lnet_graph_replay_equal_masked():
    torch.manual_seed(24)
    model = resnet32_cifar(cuda_graphs=True).cuda().eval()
    x = torch.randn(12, 3, 16, 16, device="cuda")
    with torch.no_grad():
        n_graphs = model.capture_graphs(x, sizes=[8])
        assert n_graphs == 15
        for _ in range(2):
            policy = (torch.rand(12, 15, device="cuda") < 0.5).float()
            model.execution = "sparse"
            got = model(x, policy)
            model.execution = "masked"
            assert_close(got, model(x, policy), rtol=RTOL)
    lnet = resnet50(num_classes=10, density=0.5, calibration_size=32, cuda_graphs=True).cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        got = lnet(x)
    with torch.no_grad():  # graphs captured under inference mode replay under no_grad too
        again = lnet(x)
        lnet.execution = "masked"
        want = lnet(x)
    assert_close(got, want, rtol=RTOL)
    assert_close(again, want, rtol=RTOL)
    assert len(lnet.cuda_graphs) > 0


@pytest.mark.cuda
def test_graph_pool_max_rows_and_moving_the_module():
    torch.manual_seed(25)
    n = 32
    pool = GraphPool(max_rows=8)
    skip = SkipBlock(nn.Conv2d(4, 4, 3, 1, 1).cuda(), cuda_graphs=pool).eval()
    x = torch.randn(n, 4, 5, 5, device="cuda")
    with torch.no_grad():
        for k in (3, 20, 31):
            gate = torch.zeros(n, device="cuda")
            gate[:k] = 1
            want = torch.where(gate.view(-1, 1, 1, 1) > 0, skip.block(x), x)
            assert_close(skip(x, gate), want, rtol=RTOL)
        assert len(pool) == 1  # only 3 -> 8 rows replays; 24 and 32 rows ran eagerly
        skip.double()  # moved parameters: the block's graphs are dropped and recaptured
        assert len(pool) == 0
        xd = x.double()
        gate = torch.zeros(n, device="cuda", dtype=torch.float64)
        gate[:5] = 1
        want = torch.where(gate.view(-1, 1, 1, 1) > 0, skip.block(xd), xd)
        assert_close(skip(xd, gate), want, rtol=RTOL)


@pytest.mark.cuda
def test_graph_replays_from_two_threads_on_their_own_streams():
    torch.manual_seed(26)
    n = 16
    skip = SkipBlock(randomize_bn(TorchvisionBasicBlock(8, 8)).cuda().eval(), cuda_graphs=True).eval()
    inputs = [(torch.randn(n, 8, 6, 6, device="cuda"), (torch.rand(n, device="cuda") < 0.5).float()) for _ in range(8)]
    with torch.no_grad():
        wants = [torch.where(g.view(-1, 1, 1, 1) > 0, skip.block(x), x) for x, g in inputs]
    results, errors = {}, []

    def worker(tid):
        stream = torch.cuda.Stream()
        try:
            with torch.no_grad(), torch.cuda.stream(stream):
                for rep in range(5):
                    for i, (x, g) in enumerate(inputs):
                        results[(tid, rep, i)] = skip(x, g)
            stream.synchronize()
        except Exception as e:
            errors.append(e)

    torch.cuda.synchronize()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert not errors, errors[0]
    for (tid, rep, i), got in results.items():
        assert_close(got, wants[i], rtol=RTOL)
