"""torch.compile(fullgraph=True) over the modules and one model per family in their zero-sync
modes: one graph (fullgraph raises on any graph break, and a host read of a device value such as
.item() or .tolist() is one), and outputs equal to eager execution.

Zero-sync modes compiled here (the plan's kept counts read, if at all, before the compiled call):
    GatedConv2d / FBSConv2d (sparse, eval)       channel gates never read on the host
    SkipBlock, capacity=C / with a RowPlan        plain and scaled
    RouteBlock with a RouteRow                    the route built ahead (RouteBlock.plan)
    BlockDrop backbone, capacity=C                one graph for every policy
    FBS net (fbs_cifarnet, sparse, eval)
    LC-Net C-Net only (lcnet_resnet18_cifar(lnet=False))
    SpotTune backbone with its route built ahead (SpotTuneResNet.route)
Families without a zero-sync mode, so not compiled whole here: LC-Net's L-Net, SkipNet and
ConvNet-AIG compute each block's gate from that block's input on the device and read its kept
count on the host before the block runs (one host sync per block; no capacity option), and
MSDNet / EarlyExit reads the number of samples still in after every exit but the last. Under
torch.compile those reads are graph breaks (one graph per block or per stage).

Most cases use the "aot_eager" backend (AOTAutograd and functionalization, as inductor sees
them, without inductor's slow C++ compile on this machine); GatedConv2d and SkipBlock also run
with inductor. The `cuda` tests repeat the capacity-mode model with inductor on the GPU, and with
mode="reduce-overhead", i.e. replayed from a CUDA graph.
"""
import importlib

import pytest
import torch
import torch.nn as nn
from _utils import assert_close, tame_bn
from torch._dynamo.testing import CompileCounterWithBackend

from dynkernels.models.blockdrop import BasicBranch, BlockDropResNet
from dynkernels.models.fbs import fbs_cifarnet
from dynkernels.models.lcnet import lcnet_resnet18_cifar
from dynkernels.models.spottune import SpotTuneResNet
from dynkernels.nn import FBSConv2d, GatedConv2d, RouteBlock, SkipBlock

pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(module, backend="aot_eager"):
    """(module compiled with fullgraph=True, the counter of the frames it compiled)."""
    counter = CompileCounterWithBackend(backend)
    return torch.compile(module, fullgraph=True, backend=counter), counter


def conv_block(c=8):
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))


def small_blockdrop(capacity):
    """A 6-block CIFAR BlockDrop backbone (2 blocks per stage, 8/16/16 channels)."""
    return tame_bn(BlockDropResNet(BasicBranch, [2, 2, 2], [8, 16, 16], [1, 2, 2], "cifar", 10, capacity=capacity))


def policy_with_at_most(n, blocks, most):
    """A random 0/1 policy [n, blocks] keeping every block on at most `most` samples."""
    keep = torch.rand(n, blocks).argsort(0) < torch.randint(0, most + 1, (blocks,))
    return keep.float()


# ----------------------------------------------------------------------------- modules
@torch.no_grad()
def test_gated_conv_and_fbs_conv_one_graph():
    x = torch.randn(4, 8, 6, 6)
    conv = GatedConv2d(8, 12, 3, padding=1).eval()
    gate = torch.rand(4, 12) * (torch.rand(4, 12) > 0.5)
    in_gate = (torch.rand(4, 8) > 0.3).float()
    fast, counter = compiled(conv, "inductor")
    assert_close(fast(x, gate, in_gate), conv(x, gate, in_gate))
    fbs = FBSConv2d(8, 12, 3, padding=1, density=0.5).eval()
    fbs.bn.running_var.uniform_(0.5, 2.0)
    fast_fbs, fbs_counter = compiled(fbs)
    assert_close(fast_fbs(x, in_gate), fbs(x, in_gate))
    assert counter.frame_count == fbs_counter.frame_count == 1


def test_gated_conv_backward_under_compile():
    """Training: the custom op's autograd runs inside the compiled graph, gradients equal eager."""
    conv = GatedConv2d(6, 10, 3, padding=1)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    gate = (torch.rand(3, 10) * (torch.rand(3, 10) > 0.4)).requires_grad_()
    fast, _ = compiled(conv)
    grads = []
    for f in (fast, conv):
        (f(x, gate) ** 2).sum().backward()
        grads.append([t.grad.clone() for t in (x, gate, conv.weight, conv.bias)])
        for t in (x, gate, conv.weight, conv.bias):
            t.grad = None
    for a, e in zip(*grads):
        assert_close(a, e)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@torch.no_grad()
def test_skip_block_capacity_one_graph_for_every_gate(scaled):
    """capacity=C: no count is read, so one compiled graph serves every gate."""
    block = SkipBlock(conv_block(), scaled=scaled, capacity=3).eval()
    fast, counter = compiled(block, "inductor" if not scaled else "aot_eager")
    x = torch.randn(5, 8, 4, 4)
    for gate in (torch.tensor([1.0, 0, 0.5, 0, 0]), torch.tensor([0.0, 0.7, 0, 0.2, 1]), torch.zeros(5)):
        assert_close(fast(x, gate), block(x, gate))
    assert counter.frame_count == 1


@torch.no_grad()
def test_skip_block_capacity_one_graph_where_compact_batches_could_take_onednn():
    """16 rows or more cut to a capacity of 8 at one thread, with 1x1 convs: the conditions under
    which eager execution runs the block under the compact-batch conv mode (nn.compact_convs);
    compiled, the test of those conditions leaves the graph whole."""
    block = SkipBlock(nn.Sequential(nn.Conv2d(64, 256, 1), nn.ReLU(), nn.Conv2d(256, 64, 1)), capacity=8).eval()
    x, gate = torch.randn(32, 64, 8, 8), (torch.arange(32) % 5 == 0).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fast, counter = compiled(block, "aot_eager")
        assert_close(fast(x, gate), block(x, gate))
    finally:
        torch.set_num_threads(threads)
    assert counter.frame_count == 1


@torch.no_grad()
def test_skip_block_with_a_plan_one_graph():
    block = SkipBlock(conv_block(), bucket=2).eval()
    x, gate = torch.randn(5, 8, 4, 4), torch.tensor([1.0, 0, 1, 0, 1])
    plan = block.plan(gate)  # the one host read, outside the compiled call
    fast, counter = compiled(block)
    assert_close(fast(x, gate, plan), block(x, gate))
    assert counter.frame_count == 1


@torch.no_grad()
def test_route_block_with_a_plan_one_graph():
    block = RouteBlock([conv_block(), nn.Conv2d(8, 8, 1), nn.Identity()]).eval()
    x, choice = torch.randn(6, 8, 4, 4), torch.tensor([0, 2, 1, 1, 0, 2])
    fast, counter = compiled(block)
    assert_close(fast(x, choice, block.plan(choice)), block(x, choice))
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- models
@torch.no_grad()
def test_blockdrop_capacity_one_graph_for_every_policy():
    model = small_blockdrop(capacity=3)
    fast, counter = compiled(model)
    x = torch.randn(4, 3, 16, 16)
    for _ in range(2):
        policy = policy_with_at_most(4, model.num_blocks, 3)
        assert_close(fast(x, policy), model(x, policy), rtol=1e-5)
    model.execution = "masked"
    assert_close(fast(x, policy), model(x, policy), rtol=1e-4)  # the recompiled masked graph
    assert counter.frame_count == 2


@pytest.mark.parametrize("make", [lambda: fbs_cifarnet(width=0.125, density=0.5),
                                  lambda: lcnet_resnet18_cifar(lnet=False, width=0.125)],
                         ids=["fbs_net", "lcnet_channel_gates"])
@torch.no_grad()
def test_channel_gated_net_one_graph(make):
    model = tame_bn(make())
    fast, counter = compiled(model)
    x = torch.randn(2, 3, 16, 16)
    assert_close(fast(x), model(x), rtol=1e-5)
    assert counter.frame_count == 1


@torch.no_grad()
def test_spottune_with_its_route_built_ahead_one_graph():
    model = tame_bn(SpotTuneResNet((1, 1, 1), num_classes=5))
    x, policy = torch.randn(4, 3, 16, 16), torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]])
    fast, counter = compiled(model)
    assert_close(fast(x, policy, model.route(policy)), model(x, policy), rtol=1e-5)
    assert counter.frame_count == 1
    with pytest.raises(ValueError, match=r"SpotTuneResNet: plan must be route\(policy\) for the given policy \(3 blocks\)"):
        model(x, None, model.route(policy))


@torch.no_grad()
def test_autocast_inside_a_compiled_forward():
    conv = GatedConv2d(8, 12, 3, padding=1).eval()
    block = SkipBlock(conv_block(), capacity=3).eval()
    x, gate, keep = torch.randn(4, 8, 6, 6), torch.rand(4, 12), torch.tensor([1.0, 0, 1, 0])

    def forward(x, gate, keep):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return conv(x, gate), block(x, keep)

    fast, counter = compiled(forward)
    for a, e in zip(fast(x, gate, keep), forward(x, gate, keep)):
        assert_close(a, e)  # (one dtype each: bfloat16 conv, the merge promoted to float32)
    assert counter.frame_count == 1


@pytest.mark.filterwarnings("ignore:dynkernels. no tuned conv configurations")
def test_host_side_choices_are_constants_under_compile(monkeypatch):
    """What the CUDA paths ask the build and the tuned tables (files read under a lock) is
    taken as a constant while torch.compile traces, not traced into (checked on the CPU with a
    mocked device: the GPU tests run the real thing)."""
    from dynkernels import _extension, tuned_configs

    conv_ops = importlib.import_module("dynkernels.ops.channel_sparse_conv2d")  # the module, not the function

    monkeypatch.setattr(tuned_configs, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(tuned_configs, "num_sms", lambda device: 132)
    key = (64, 64, 3, 3, (1, 1), 16, 16, 32, "float16", "out")

    def choices(x):
        flags = (_extension.cuda_kernels_compiled(), _extension.triton_available(), _extension.triton_interpret())
        return x + sum(flags) + len(tuned_configs.cuda_config_ids()), [
            conv_ops._gpu_choice(key, torch.device("cuda", 0), backend, resolved, 0.5)
            for backend, resolved in (("auto", "cuda"), ("triton", "triton"))
        ]

    fast, counter = compiled(choices)
    x = torch.zeros(2)
    (y, got), (y_eager, expected) = fast(x), choices(x)
    assert got == expected and torch.equal(y, y_eager) and counter.frame_count == 1


# ----------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["inductor", "cuda-graph"])
@torch.no_grad()
def test_blockdrop_capacity_compiled_on_the_gpu(mode):
    """Inductor on CUDA tensors; reduce-overhead replays the compiled forward from a CUDA graph
    (captured on the first calls, replayed for new policies of the same shape)."""
    model = small_blockdrop(capacity=6).cuda()
    fast = torch.compile(model, fullgraph=True, mode=mode)
    x = torch.randn(8, 3, 16, 16, device="cuda")
    for _ in range(4):
        policy = policy_with_at_most(8, model.num_blocks, 6).cuda()
        assert_close(fast(x, policy).clone(), model(x, policy), rtol=1e-4)


@pytest.mark.cuda
@torch.no_grad()
def test_gated_conv_and_skip_block_compiled_on_the_gpu():
    x = torch.randn(8, 16, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    conv = GatedConv2d(16, 32, 3, padding=1).cuda().eval().to(memory_format=torch.channels_last)
    gate = (torch.rand(8, 32, device="cuda") * (torch.rand(8, 32, device="cuda") > 0.5))
    assert_close(torch.compile(conv, fullgraph=True)(x, gate), conv(x, gate), rtol=1e-4)
    block = SkipBlock(conv_block(16), capacity=4).cuda().eval()
    gate = torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0], device="cuda")
    assert_close(torch.compile(block, fullgraph=True)(x, gate), block(x, gate), rtol=1e-4)
