"""Training BlockDrop's policy network with REINFORCE, and a short offline demo.

Reward (Wu et al., CVPR 2018), per sample with policy u over K blocks:
    R(u) = 1 - (|u| / K)^2   if the backbone's prediction under u is correct
    R(u) = gamma             otherwise (gamma = `penalty`, negative)
The baseline is self-critical, as in the release's cl_training.py: the reward of the greedy
policy (probs >= 0.5) is subtracted from the sampled policy's reward. The policy is sampled
from the bounded probabilities alpha * p + (1 - alpha) * (1 - p); an entropy bonus beta * sum
-p log p (the release's form) keeps exploring; with curriculum step c only the last c blocks
are decided by the policy (the others kept).

Demo, offline on synthetic CIFAR-shaped data it makes itself (class templates + noise):
    python -m dynkernels.models.blockdrop_train
(about 30 s on 2 idle CPU cores). It first trains the backbone a few steps with random block drop (so that it tolerates
dropped blocks), then trains the policy and prints reward, accuracy and blocks used.
"""
import argparse
import time
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli

from dynkernels.models.blockdrop import BlockDrop, policy_net_cifar, resnet110_cifar, resnet32_cifar


def blockdrop_reward(logits: torch.Tensor, targets: torch.Tensor, policy: torch.Tensor, penalty: float = -1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(reward [N], correct [N] bool) for logits [N, C], targets [N], policy [N, K] 0/1."""
    usage = (policy > 0).sum(1).to(torch.float32) / policy.shape[1]
    correct = logits.argmax(1) == targets
    reward = torch.where(correct, 1.0 - usage**2, torch.full_like(usage, float(penalty)))
    return reward, correct


class StepStats(NamedTuple):
    loss: float
    reward: float  # mean reward of the sampled policies
    accuracy: float  # of the backbone under the sampled policies
    blocks_used: float  # mean blocks used per sample, sampled policies
    greedy_reward: float  # mean reward of the thresholded (inference) policy: the baseline
    greedy_blocks_used: float  # mean blocks used per sample, thresholded policy


def reinforce_step(
    agent: BlockDrop,
    x: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    penalty: float = -1.0,
    beta: float = 0.1,
    cl_step: Optional[int] = None,
    uniform: Optional[torch.Tensor] = None,
) -> StepStats:
    """One policy-gradient step on the policy network (the backbone is frozen, in eval mode).

    uniform: None, or numbers in [0, 1) of the policy's shape [N, K] that draw it (block k of
    sample n kept where uniform[n, k] < its bounded keep probability), e.g. to replay one draw
    for a batch split across processes (each passes its rows). agent.policy_net may be wrapped
    (DistributedDataParallel: the averaged gradients are those of one step on the combined
    batch, except that the policy net's BatchNorm takes its training statistics per process)."""
    k = agent.backbone.num_blocks
    agent.policy_net.train()
    agent.backbone.eval()
    probs = agent.policy_net(x)
    greedy = (probs.detach() >= 0.5).to(probs.dtype)
    bounded = probs * agent.alpha + (1 - probs) * (1 - agent.alpha)
    distr = Bernoulli(bounded)
    if uniform is None:
        policy = distr.sample()
    else:
        if not isinstance(uniform, torch.Tensor) or uniform.shape != bounded.shape:
            raise ValueError(f"reinforce_step: uniform must be a tensor of the policy's shape {tuple(bounded.shape)}, "
                             f"got {getattr(uniform, 'shape', type(uniform).__name__)}")
        policy = (uniform.to(bounded.device) < bounded.detach()).to(bounded.dtype)
    decided = None
    if cl_step is not None and cl_step < k:  # curriculum: the first k - cl_step blocks stay on
        policy[:, : k - cl_step] = 1
        greedy[:, : k - cl_step] = 1
        decided = torch.zeros_like(policy)
        decided[:, k - cl_step :] = 1
    with torch.no_grad():
        reward_greedy, _ = blockdrop_reward(agent.backbone(x, greedy), targets, greedy, penalty)
        reward, correct = blockdrop_reward(agent.backbone(x, policy), targets, policy, penalty)
    advantage = (reward - reward_greedy).unsqueeze(1)
    loss = -distr.log_prob(policy) * advantage
    if decided is not None:
        loss = loss * decided
    p = bounded.clamp(1e-15, 1 - 1e-15)
    entropy = -(p * torch.log(p)).sum()
    loss = (loss.sum() - beta * entropy) / x.shape[0]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return StepStats(
        float(loss.detach()),
        float(reward.mean()),
        float(correct.float().mean()),
        float(policy.sum(1).mean()),
        float(reward_greedy.mean()),
        float(greedy.sum(1).mean()),
    )


# ----------------------------------------------------------------------------- offline demo
def synthetic_cifar(n: int, num_classes: int = 10, seed: int = 0, noise: float = 0.5):
    """n CIFAR-shaped images [n, 3, 32, 32] and labels: a smooth random template per class
    plus Gaussian noise (learnable in a few steps, nothing to download)."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = templates[labels] + noise * torch.randn(n, 3, 32, 32, generator=g)
    return images, labels


def pretrain_backbone(backbone, images, labels, steps: int, batch_size: int, keep: float = 0.7, lr: float = 0.05):
    """Train the backbone with random block drop (each block kept with probability `keep`)
    so that it still predicts well when the policy drops blocks."""
    opt = torch.optim.SGD(backbone.parameters(), lr=lr, momentum=0.9)
    backbone.train()
    for step in range(steps):
        i = torch.randint(0, images.shape[0], (batch_size,))
        policy = (torch.rand(batch_size, backbone.num_blocks) < keep).float()
        loss = F.cross_entropy(backbone(images[i], policy), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("r32", "r110"), default="r32")
    parser.add_argument("--steps", type=int, default=60, help="policy-gradient steps")
    parser.add_argument("--pretrain-steps", type=int, default=60, help="backbone steps with random block drop")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--execution", choices=("sparse", "masked"), default="sparse")
    parser.add_argument("--penalty", type=float, default=-1.0, help="gamma: reward of a wrong prediction")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    images, labels = synthetic_cifar(2048, seed=args.seed)
    backbone = (resnet32_cifar if args.model == "r32" else resnet110_cifar)(execution=args.execution)
    t0 = time.time()
    pretrain_backbone(backbone, images, labels, args.pretrain_steps, args.batch_size)
    with torch.no_grad():
        acc = float((backbone(images[:256]).argmax(1) == labels[:256]).float().mean())
    print(f"backbone pretrained ({args.pretrain_steps} steps, {time.time() - t0:.1f}s): dense accuracy {acc:.3f}")

    agent = BlockDrop(policy_net_cifar(backbone.num_blocks), backbone)
    opt = torch.optim.Adam(agent.policy_net.parameters(), lr=args.lr)
    print(f"{'step':>5} {'loss':>8} {'reward':>8} {'acc':>6} {'blocks':>7} {'greedy reward':>14} {'greedy blocks':>14}")
    window = []
    for step in range(1, args.steps + 1):
        i = torch.randint(0, images.shape[0], (args.batch_size,))
        window.append(reinforce_step(agent, images[i], labels[i], opt, penalty=args.penalty))
        if step % args.log_every == 0 or step == args.steps:
            m = [sum(s[f] for s in window) / len(window) for f in range(len(StepStats._fields))]
            print(f"{step:5d} {m[0]:8.4f} {m[1]:8.4f} {m[2]:6.3f} {m[3]:7.2f} {m[4]:14.4f} {m[5]:14.2f}")
            window = []
    print(f"done in {time.time() - t0:.1f}s ({backbone.num_blocks} blocks, execution={args.execution})")


if __name__ == "__main__":
    main()
