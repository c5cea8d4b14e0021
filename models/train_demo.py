"""Train FBS M-CifarNet and LC-Net ResNet-18 on real data, offline, on the CPU, and see what
their gates save: accuracy against the FLOPs each executes per sample, next to the dense
network of the same shape.

    python -m dynkernels.models.train_demo [--quick] [--out DIR] [--epochs E] [--threads T]

Data: scikit-learn's bundled handwritten digits (1797 images of 8x8, 10 classes; no
download), upsampled to 32x32 (bilinear) and repeated over 3 channels; a fixed split of 1437
training and 360 test images. Networks at a quarter of their published widths (so that the
whole run takes a few minutes on two cores), trained with Adam from scratch:
  - M-CifarNet dense (dynkernels.models.fbs.cifarnet) and FBS M-CifarNet at several densities
    d (fbs_cifarnet: k = ceil(d * C) channels per gated conv);
  - ResNet-18 dense (lcnet_resnet18_cifar without gates) and LC-Net ResNet-18 (L-Net + C-Net)
    at several weights of the salience L1 penalty (which sets how much the gates skip).
Test accuracy is measured in execution="sparse" (inference, the channel-sparse and
sample-sparse kernels), FLOPs with dynkernels.model_flops over the test set (executed: the
mean per sample; dense: everything computed). Writes DIR/results.md (a Markdown table),
DIR/results.json and DIR/accuracy_vs_flops.png. --quick (a few seconds: a slice of the data,
one short epoch, two settings per network) is what the tests run.
"""
import argparse
import json
import os
import time
from typing import List, NamedTuple

import torch
import torch.nn.functional as F

from dynkernels.flops import model_flops
from dynkernels.models.fbs import cifarnet, fbs_cifarnet
from dynkernels.models.lcnet import lcnet_resnet18_cifar

CIFARNET_WIDTH = 0.25  # of the published widths: the run fits in a few minutes on two cores
RESNET_WIDTH = 0.125
DROPOUT = 0.1
GATE_OPEN = 0.9
FBS_DENSITIES = (1.0, 0.75, 0.5, 0.25)
LCNET_PENALTIES = (0.0, 3.0, 6.0, 10.0)


class Run(NamedTuple):
    family: str  # "M-CifarNet" or "ResNet-18"
    name: str
    setting: str
    accuracy: float
    executed_mflops: float
    dense_mflops: float
    train_s: float


def load_digits_32(seed: int = 0):
    """(x_train, y_train, x_test, y_test): digits upsampled to [N, 3, 32, 32], standardised."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is needed for this demo only
        raise SystemExit("train_demo needs scikit-learn (pip install scikit-learn) for its bundled digits data") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def open_gates(model):
    """Start every LC-Net gate open (FC weight 0, bias GATE_OPEN: S = GATE_OPEN for every input,
    inside ReLU-1's linear range), so that training starts from the whole network and the
    penalty decides what to skip, as when gates are added to a trained ResNet."""
    with torch.no_grad():
        for block in model.blocks:
            for gate in (block.gate, block.cnet):
                if gate is not None:
                    gate.fc.weight.zero_()
                    gate.fc.bias.fill_(GATE_OPEN)
    return model


def train(model, x, y, epochs: int, batch: int, penalty: float = 0.0, seed: int = 0, lr: float = 5e-3) -> float:
    """Adam on cross entropy (+ penalty * the LC-Net salience L1); returns the seconds spent."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            if penalty:
                logits, saliences = model(x[idx], return_saliences=True)
                loss = F.cross_entropy(logits, y[idx]) + saliences.l1(penalty, penalty)
            else:
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model, x, y) -> tuple:
    """(test accuracy in sparse execution, executed MFLOPs per sample, dense MFLOPs per sample)."""
    model.eval()
    if hasattr(model, "execution"):
        model.execution = "sparse"
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    count = model_flops(model, x, per_sample=False)
    return accuracy, count.executed / 1e6, count.dense / 1e6


def run_all(quick: bool, epochs: int, finetune_epochs: int, seed: int, log=print) -> List[Run]:
    """Dense networks trained from scratch; the gated ones trained at the first setting, then
    fine-tuned at each next one from the previous weights (FBS's recipe: lower the density
    step by step; LC-Net: raise the penalty step by step)."""
    x_train, y_train, x_test, y_test = load_digits_32(seed)
    densities, penalties, batch = FBS_DENSITIES, LCNET_PENALTIES, 64
    if quick:
        x_train, y_train, x_test, y_test = x_train[:32], y_train[:32], x_test[:16], y_test[:16]
        densities, penalties, epochs, finetune_epochs, batch = densities[::3], penalties[::2], 1, 1, 32
    runs = []

    def record(family, name, setting, model, seconds):
        accuracy, executed, dense = evaluate(model, x_test, y_test)
        runs.append(Run(family, name, setting, accuracy, executed, dense, seconds))
        log(f"{family:10s} {name:6s} {setting:16s} accuracy {100 * accuracy:5.1f}%  "
            f"{executed:7.2f} of {dense:7.2f} MFLOPs/sample  (trained {seconds:.0f} s)")

    torch.manual_seed(seed)
    dense = cifarnet(10, CIFARNET_WIDTH, DROPOUT)
    record("M-CifarNet", "dense", "no gates", dense, train(dense, x_train, y_train, epochs, batch, seed=seed))
    torch.manual_seed(seed)
    fbs = fbs_cifarnet(10, densities[0], width=CIFARNET_WIDTH, dropout=DROPOUT)
    for i, d in enumerate(densities):
        fbs.density = d
        seconds = train(fbs, x_train, y_train, epochs if i == 0 else finetune_epochs, batch, seed=seed)
        record("M-CifarNet", "FBS", f"d = {d}", fbs, seconds)

    torch.manual_seed(seed)
    dense = lcnet_resnet18_cifar(10, lnet=False, cnet=False, width=RESNET_WIDTH)
    record("ResNet-18", "dense", "no gates", dense, train(dense, x_train, y_train, epochs, batch, seed=seed))
    torch.manual_seed(seed)
    lcnet = open_gates(lcnet_resnet18_cifar(10, width=RESNET_WIDTH))
    for i, p in enumerate(penalties):
        seconds = train(lcnet, x_train, y_train, epochs if i == 0 else finetune_epochs, batch, p, seed=seed)
        record("ResNet-18", "LC-Net", f"L1 = {p}", lcnet, seconds)
    return runs


def table(runs: List[Run]) -> str:
    rows = ["| network | gates | accuracy | executed MFLOPs / sample | dense MFLOPs | dense / executed | training |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        rows.append(f"| {r.family} | {r.name}, {r.setting} | {100 * r.accuracy:.1f}% | {r.executed_mflops:.2f} | "
                    f"{r.dense_mflops:.2f} | {r.dense_mflops / r.executed_mflops:.2f}x | {r.train_s:.0f} s |")
    return "\n".join(rows)


def plot(runs: List[Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for family, color in (("M-CifarNet", "tab:blue"), ("ResNet-18", "tab:orange")):
        gated = sorted((r for r in runs if r.family == family and r.name != "dense"), key=lambda r: r.executed_mflops)
        dense = [r for r in runs if r.family == family and r.name == "dense"]
        if gated:
            label = f"{'FBS' if family == 'M-CifarNet' else 'LC-Net'} {family}"
            ax.plot([r.executed_mflops for r in gated], [100 * r.accuracy for r in gated], "o-", color=color, label=label)
            for r in gated:
                ax.annotate(r.setting, (r.executed_mflops, 100 * r.accuracy), fontsize=7, xytext=(3, -9), textcoords="offset points")
        if dense:
            ax.plot([r.executed_mflops for r in dense], [100 * r.accuracy for r in dense], "*", ms=14, color=color,
                    label=f"{family}, dense")
    ax.set_xlabel("executed MFLOPs per sample (test set mean)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits (8x8 upsampled to 32x32), reduced widths, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> List[Run]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few seconds: a slice of the data, one epoch, two settings")
    p.add_argument("--out", default="train_demo_out", help="folder for results.md, results.json, accuracy_vs_flops.png")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the first training of each network")
    p.add_argument("--finetune-epochs", type=int, default=2, help="epochs of each later fine-tuning step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.finetune_epochs < 1:
        p.error("--epochs and --finetune-epochs must be at least 1")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run_and_write(args)
    finally:
        torch.set_num_threads(threads)


def _run_and_write(args) -> List[Run]:
    start = time.perf_counter()
    runs = run_all(args.quick, args.epochs, args.finetune_epochs, args.seed)
    os.makedirs(args.out, exist_ok=True)
    schedule = "--quick" if args.quick else f"{args.epochs} epochs, then {args.finetune_epochs} per fine-tuning step"
    header = (f"digits upsampled to 32x32, {schedule}, widths {CIFARNET_WIDTH} (M-CifarNet) and {RESNET_WIDTH} "
              f"(ResNet-18), {torch.get_num_threads()} threads, total {time.perf_counter() - start:.0f} s")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{header}\n\n{table(runs)}\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"header": header, "runs": [r._asdict() for r in runs]}, f, indent=1)
    plot(runs, os.path.join(args.out, "accuracy_vs_flops.png"))
    print(f"\n{header}\n\n{table(runs)}\n\nwritten to {args.out}/")
    return runs


if __name__ == "__main__":
    main()
