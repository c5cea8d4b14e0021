"""DistributedDataParallel over sparse execution: 2 CPU processes (gloo), no find_unused_parameters.

Each process takes one step of a model on its half of a batch; the gradients DDP averages must
equal those of one process stepping on the whole batch (same initialisation, same data). Every
case has a block, branch or channel that no sample of process 0 uses while process 1's samples
use it: sparse execution does not run a block for nobody, while DDP without
find_unused_parameters expects every parameter's gradient in every step (without one, the
averaged gradients of that block came out wrong here). dynkernels.nn's sparse paths run such a
block on an empty batch in grad mode instead: zero gradients (see run_kept).

BatchNorm in training mode takes its statistics per process under DDP (SyncBatchNorm needs
GPUs), so the backbones step with frozen BatchNorm statistics (eval mode, or training mode with
the BatchNorms in eval), where a sample's result does not depend on the others. The REINFORCE
step trains the policy net with its BatchNorm in training mode: its reference is the same step
taken on each process's half in one process, the gradients averaged.
"""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _utils import assert_close, frozen_bn, tame_bn

from dynkernels.models.blockdrop import BasicBranch, BlockDrop, BlockDropResNet, policy_net_cifar
from dynkernels.models.blockdrop_train import reinforce_step
from dynkernels.models.fbs import fbs_cifarnet
from dynkernels.models.lcnet import lcnet_resnet18_cifar
from dynkernels.models.spottune import SpotTuneResNet

WORLD = 2
PER_RANK = 3  # samples per process
TIMEOUT_S = 45  # a process stuck in a collective fails the test instead of hanging it
DROPPED = 2  # the block (BlockDrop, SpotTune, LC-Net) that process 0's samples do not use


def small_backbone():
    return BlockDropResNet(BasicBranch, [2, 2, 2], [8, 16, 16], [1, 2, 2], "cifar", 10)


def data(case):
    """(images [WORLD * PER_RANK, 3, 16, 16], labels, per-sample extra input) of a case."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    x, y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)
    rank0 = torch.arange(n) < PER_RANK
    if case in ("blockdrop", "spottune"):  # a policy: process 0 never takes block DROPPED
        policy = (torch.rand(n, 6, generator=g) < 0.6).float()
        policy[:, DROPPED] = (~rank0).float() * torch.tensor([1.0, 0.0, 1.0] * WORLD)
        return x, y, policy
    if case == "reinforce":  # the draw of the sampled policy
        return x, y, torch.rand(n, 6, generator=g)
    # lcnet / fbs: a per-sample offset that shuts one gate (block DROPPED's L-Net, or channel 0
    # of the second FBS conv) for process 0's samples
    return x, y, torch.where(rank0, -100.0, 0.0)


def build(case):
    torch.manual_seed(0)
    if case == "reinforce":
        return BlockDrop(policy_net_cifar(6), tame_bn(small_backbone()))
    if case == "blockdrop":
        return frozen_bn(tame_bn(small_backbone()))
    if case == "spottune":
        return frozen_bn(tame_bn(SpotTuneResNet((2, 2, 2), num_classes=10)))
    if case == "fbs":
        model = tame_bn(fbs_cifarnet(width=0.125, density=0.5))  # eval: the folded channel-sparse convs
        layer = model.layers[1].saliency
    else:
        model = tame_bn(lcnet_resnet18_cifar(width=0.125, num_classes=10))  # eval: sparse blocks and channels
        layer = model.blocks[DROPPED].gate.fc
        with torch.no_grad():
            layer.bias.fill_(0.6)  # open for process 1's samples
    offset = torch.zeros(WORLD * PER_RANK)
    model.gate_offset = offset  # the rows of this process, set by step()

    def shut(module, args, out):
        if out.shape[1] == 1:  # L-Net: one salience per sample
            return out + model.gate_offset[:, None]
        return torch.cat([out[:, :1] + model.gate_offset[:, None], out[:, 1:]], 1)

    layer.register_forward_hook(shut)
    return model


def step(case, model, rows, wrap=lambda m: m):
    """One step of `case` on the given rows of its data; returns the gradients (model order)."""
    x, y, extra = (t[rows] for t in data(case))
    if case == "reinforce":
        model.policy_net = wrap(model.policy_net)
        opt = torch.optim.SGD(model.policy_net.parameters(), lr=0.0)
        reinforce_step(model, x, y, opt, uniform=extra)
        params = model.policy_net.parameters()
    else:
        net = wrap(model)
        if case in ("fbs", "lcnet"):
            model.gate_offset = extra
            logits = net(x)
        else:
            logits = net(x, extra)
        F.cross_entropy(logits, y).backward()
        params = model.parameters()
    return [p.grad.clone() if p.grad is not None else None for p in params if p.requires_grad]


CASES = ("reinforce", "blockdrop", "spottune", "fbs", "lcnet")


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        ddp = torch.nn.parallel.DistributedDataParallel
        grads = {case: step(case, build(case), rows, ddp) for case in CASES}
        torch.save(grads, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    """{case: [gradients of process 0, of process 1]}, from one spawn for all cases."""
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    context = mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 3 * TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the DDP processes did not finish within {3 * TIMEOUT_S} s")
    per_rank = [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(WORLD)]
    return {case: [g[case] for g in per_rank] for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_ddp_gradients_equal_one_process_on_the_combined_batch(case, ddp_grads):
    if case == "reinforce":  # the policy net's BatchNorm trains: per-process halves (module docstring)
        halves = [step(case, build(case), slice(r * PER_RANK, (r + 1) * PER_RANK)) for r in range(WORLD)]
        reference = [(a + b) / WORLD for a, b in zip(*halves)]
    else:
        reference = step(case, build(case), slice(None))
    assert all(g is not None for g in reference)
    for rank, grads in enumerate(ddp_grads[case]):
        assert len(grads) == len(reference)
        for i, (g, r) in enumerate(zip(grads, reference)):
            assert g is not None, f"process {rank}: parameter {i} has no gradient"
            assert_close(g, r, rtol=1e-4)


def test_the_dropped_block_is_really_unused_on_process_0():
    """The cases do test what they claim: on process 0's rows alone the dropped block, branch or
    gate gets exact zero gradients (it ran on an empty batch), on process 1's it does not."""
    for case, params in (
        ("blockdrop", lambda m: m.blocks[1][0].parameters()),  # block DROPPED = stage 1, block 0
        ("spottune", lambda m: m.parallel_blocks[1][0].parameters()),
        ("lcnet", lambda m: m.blocks[DROPPED].skip.block.parameters()),
    ):
        sums = []
        for rank in range(WORLD):
            model = build(case)
            step(case, model, slice(rank * PER_RANK, (rank + 1) * PER_RANK))
            sums.append(sum(float(p.grad.abs().sum()) for p in params(model)))
        assert sums[0] == 0.0 and sums[1] > 0.0, (case, sums)


def test_reinforce_step_checks_the_given_draw():
    agent = build("reinforce")
    x, y, uniform = data("reinforce")
    opt = torch.optim.SGD(agent.policy_net.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"reinforce_step: uniform must be a tensor of the policy's shape \(6, 6\), got torch.Size\(\[6, 5\]\)"):
        reinforce_step(agent, x, y, opt, uniform=uniform[:, :5])
