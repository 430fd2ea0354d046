"""The library's main job, end to end: pretrain a CNN, then fine-tune it with a tiny adapter.

Everything runs offline on scikit-learn's shipped 8x8 digits (:mod:`benchmarks.adapters_data`:
upsampled to 32x32, digits 0-4 for pretraining, digits 5-9 as the new task) and the small
ResNet-style CNN of the adapters benchmark (strided stem, two residual blocks, a depthwise-separable
block, a linear head).

1. **Pretraining, AdamW against DCTProjectedAdam.** The CNN is trained from the same seed on digits
   0-4 twice, once with ``torch.optim.AdamW`` and once with
   ``opt = DCTProjectedAdam(model.parameters(), lr=..., rank=...)``, which keeps Adam's moments
   only for the top-``rank`` DCT columns of every weight matrix. Same batches, same learning rate,
   same cosine schedule, same betas, eps and weight decay (AdamW takes DCTProjectedAdam's
   defaults).
2. **Fine-tuning, filter atoms against LoRA.** The AdamW-pretrained network gets a new 5-way head
   and ``--shots`` examples per class of digits 5-9. Methods:

   * ``AtomParam``: ``parametrize.register_parametrization(conv, "weight", AtomParam())`` on every
     conv (the depthwise one included); the conv weights are frozen, the atoms' change trains;
   * ``peft LoRA r=1``: peft's own LoRA through ``get_peft_model`` on every conv peft can adapt
     (not the depthwise conv: peft's conv LoRA needs ``r % groups == 0``), the head in
     ``modules_to_save``; rank 1 is the smallest, the budget closest to the atoms';
   * ``head only`` and ``full fine-tuning``, the two ends of the budget scale.

   Every method trains the same way: the new head from the same seed at its own learning rate
   ``--head-lr`` (a fresh head needs about 1e-2 to 3e-2, an adapter far less: one shared rate
   penalises exactly the small adapters), ``--steps`` full-batch AdamW steps, weight decay 0,
   BatchNorm statistics frozen (eval mode), and every other trainable tensor at a learning rate
   chosen from the same ``--lr-grid`` by the lowest loss on a validation set of 20 more images per
   class drawn beside the shots (as the adapters benchmark chooses; never on the test set). Head
   only has no rate to choose; its ``lr`` column is the head's.

The summary table gives, per method, the trainable parameters, the optimizer state, the test
accuracy and cross-entropy and the training time; the plot (``demo.png`` in ``--out``) shows the
training losses. Run ``make demo`` or ``.venv/bin/python examples/demo.py --help``;
``--quick`` is a seconds-long smoke run with a tiny network.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: make the repository root (and so benchmarks/) importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from benchmarks.adapters_data import (
    Dataset,
    SmallResNet,
    few_shot,
    load_digits_split,
    validation_set,
)
from decomp.adapters import AtomParam
from optim import DCTProjectedAdam

PRETRAIN_METHODS = ("AdamW", "DCTProjectedAdam")
FINETUNE_METHODS = ("head only", "full fine-tuning", "AtomParam", "peft LoRA r=1")
HEAD = "head"
# The new head's own rate in every method, the adapters benchmark's (benchmarks/adapters_bench.py)
HEAD_LR = 3e-2
CLASSES = 5
# --quick: a tiny network, one pretraining epoch, a few fine-tuning steps, no learning-rate choice.
VALIDATION_PER_CLASS = 20
QUICK = {"width": 4, "epochs": 1, "batch_size": 128, "steps": 3, "shots": 2}


@dataclass
class Result:
    """One trained model: its stage and method, what it cost and how it scores on the test set.

    ``state_numbers`` counts the optimizer state (moments and projector indices) after training;
    ``losses`` is the training loss of every step; ``lr`` the learning rate of everything but a
    fine-tuned model's new head (which trains at ``--head-lr``), the head's for head only.
    """

    stage: str
    method: str
    trainable: int
    state_numbers: int
    lr: float
    accuracy: float
    loss: float
    seconds: float
    losses: list[float]


def state_numbers(optimizer: torch.optim.Optimizer) -> int:
    """The numbers held in ``optimizer``'s state (every tensor but the scalar step counters)."""
    return sum(
        value.numel()
        for state in optimizer.state.values()
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and key != "step"
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """Accuracy (%) and mean cross-entropy of ``model`` on ``data``."""
    logits = model(data.images)
    accuracy = 100.0 * float((logits.argmax(dim=1) == data.labels).float().mean())
    return accuracy, float(F.cross_entropy(logits, data.labels))


# --------------------------------------------------------------------------- 1. pretraining


def pretrain(
    method: str,
    train: Dataset,
    test: Dataset,
    *,
    width: int,
    epochs: int,
    batch_size: int,
    lr: float,
    rank: int,
    seed: int,
    progress: bool,
) -> tuple[SmallResNet, Result]:
    """Train a fresh :class:`SmallResNet` on ``train`` with ``method``, one of PRETRAIN_METHODS."""
    torch.manual_seed(seed)
    model = SmallResNet(num_classes=CLASSES, width=width)
    if method == "DCTProjectedAdam":
        opt = DCTProjectedAdam(model.parameters(), lr=lr, rank=rank)
    else:
        # AdamW with the projected optimizer's default betas, eps and weight decay, so that the
        # projection is the only difference between the two runs.
        defaults = DCTProjectedAdam([nn.Parameter(torch.zeros(1))]).defaults
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=lr,
            betas=defaults["betas"],
            eps=defaults["eps"],
            weight_decay=defaults["weight_decay"],
        )
    steps_per_epoch = math.ceil(len(train) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    batches = torch.Generator().manual_seed(seed)  # the same batch order for every method
    losses = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"pretrain {method}", disable=not progress)
    with bar:
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=batches)
            for first in range(0, len(train), batch_size):
                batch = order[first : first + batch_size]
                loss = F.cross_entropy(model(train.images[batch]), train.labels[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                losses.append(loss.item())
                bar.update()
    seconds = time.perf_counter() - start
    model.eval()
    accuracy, test_loss = evaluate(model, test)
    trainable = sum(p.numel() for p in model.parameters())
    result = Result(
        "pretrain", method, trainable, state_numbers(opt), lr, accuracy, test_loss, seconds, losses
    )
    return model, result


# --------------------------------------------------------------------------- 2. fine-tuning


def freeze_all_but_head(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.get_submodule(HEAD).requires_grad_(True)
    return model


def full_fine_tuning(model: nn.Module) -> nn.Module:
    return model.requires_grad_(True)


def atoms_on_every_conv(model: nn.Module) -> nn.Module:
    """Filter atoms on every conv, registered as a plain torch parametrization."""
    freeze_all_but_head(model)
    for conv in [module for module in model.modules() if isinstance(module, nn.Conv2d)]:
        parametrize.register_parametrization(conv, "weight", AtomParam())
    return model


def peft_lora(model: nn.Module) -> nn.Module:
    """peft's LoRA at rank 1 on every conv peft can adapt, the new head trained in full."""
    from peft import LoraConfig, get_peft_model  # imported on use: it takes seconds

    convs = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups == 1
    ]
    return get_peft_model(model, LoraConfig(r=1, target_modules=convs, modules_to_save=[HEAD]))


PREPARE: dict[str, Callable[[nn.Module], nn.Module]] = {
    "head only": freeze_all_but_head,
    "full fine-tuning": full_fine_tuning,
    "AtomParam": atoms_on_every_conv,
    "peft LoRA r=1": peft_lora,
}


def fine_tuning_optimizer(model: nn.Module, *, lr: float, head_lr: float) -> torch.optim.AdamW:
    """AdamW (weight decay 0) over ``model``'s trainable tensors: the head's at ``head_lr`` (the
    first group), the others at ``lr`` (a second group, where there are any)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # peft keeps the head under "...head.modules_to_save.default.weight"
    in_head = [HEAD in name.split(".") for name, _ in trainable]
    head = [p for (_, p), is_head in zip(trainable, in_head) if is_head]
    body = [p for (_, p), is_head in zip(trainable, in_head) if not is_head]
    groups = [{"params": head, "lr": head_lr}] + ([{"params": body, "lr": lr}] if body else [])
    return torch.optim.AdamW(groups, weight_decay=0.0)


def fine_tune(
    method: str,
    pretrained: dict[str, torch.Tensor],
    width: int,
    train: Dataset,
    test: Dataset,
    *,
    steps: int,
    lr: float,
    head_lr: float,
    seed: int,
    progress: bool,
) -> Result:
    """Fine-tune a fresh copy of the pretrained backbone with a new head; score it on ``test``.

    The head trains at ``head_lr``, every other trainable tensor at ``lr``."""
    torch.manual_seed(seed)  # the same new head for every method
    model = SmallResNet(num_classes=CLASSES, width=width)
    backbone = {key: value for key, value in pretrained.items() if not key.startswith(HEAD + ".")}
    model.load_state_dict(backbone, strict=False)
    model = PREPARE[method](model.eval())  # eval mode: BatchNorm keeps its pretrained statistics
    opt = fine_tuning_optimizer(model, lr=lr, head_lr=head_lr)
    losses = []
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"fine-tune {method} lr={lr:g}", disable=not progress):
        loss = F.cross_entropy(model(train.images), train.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    accuracy, test_loss = evaluate(model, test)
    count = sum(p.numel() for group in opt.param_groups for p in group["params"])
    trains_body = len(opt.param_groups) > 1
    trained_lr = lr if trains_body else head_lr
    return Result("fine-tune", method, count, state_numbers(opt), trained_lr, accuracy, test_loss, seconds, losses)


def choose_lr(
    method: str,
    pretrained: dict[str, torch.Tensor],
    width: int,
    shots: Dataset,
    validation: Dataset,
    *,
    grid: Sequence[float],
    steps: int,
    head_lr: float,
    seed: int,
    progress: bool,
) -> float:
    """The rate of ``grid`` whose run on ``shots`` has the lowest cross-entropy on ``validation``.

    The loss, not the accuracy: on a hundred images the accuracy moves in coarse steps and ties
    often. A diverged run's NaN loss counts as infinite.
    """
    if len(grid) == 1:
        return grid[0]

    def validation_loss(lr: float) -> float:
        loss = fine_tune(
            method, pretrained, width, shots, validation, steps=steps, lr=lr, head_lr=head_lr, seed=seed, progress=False
        ).loss
        return math.inf if math.isnan(loss) else loss

    return min(tqdm(grid, desc=f"choose lr {method}", disable=not progress), key=validation_loss)


# --------------------------------------------------------------------------- report


def format_table(results: Sequence[Result]) -> str:
    """A fixed-width summary table, one row per result."""
    header = ("stage", "method", "trainable", "opt. state", "lr", "test acc", "test loss", "time")
    rows = [header] + [
        (
            result.stage,
            result.method,
            f"{result.trainable:,}",
            f"{result.state_numbers:,}",
            f"{result.lr:g}",
            f"{result.accuracy:.1f}%",
            f"{result.loss:.3f}",
            f"{result.seconds:.1f} s",
        )
        for result in results
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def plot(results: Sequence[Result], path: Path) -> None:
    """Training-loss curves: pretraining on the left, fine-tuning on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, stage, title in zip(
        figure.subplots(1, 2),
        ("pretrain", "fine-tune"),
        ("Pretraining on digits 0-4", "Fine-tuning on few-shot digits 5-9"),
    ):
        for result in (result for result in results if result.stage == stage):
            label = f"{result.method} ({result.accuracy:.1f}% test)"
            axes.plot(range(1, len(result.losses) + 1), result.losses, label=label)
        axes.set(title=title, xlabel="step", ylabel="training cross-entropy", yscale="log")
        axes.legend()
    figure.savefig(path, dpi=120)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--out", type=Path, default=Path.cwd(), help="folder of demo.png")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (the network is tiny: a second thread gains little, and on shared "
        "cores it can cost several times the time)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=16, help="channels of the CNN's first stage")
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="pretraining batch size")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=4, help="DCTProjectedAdam's rank")
    parser.add_argument("--shots", type=int, default=10, help="fine-tuning examples per class")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps")
    parser.add_argument(
        "--lr-grid", type=lambda text: [float(lr) for lr in text.split(",")],
        default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
        help="fine-tuning learning rates of everything but the new head, comma-separated",
    )
    parser.add_argument("--head-lr", type=float, default=HEAD_LR, help="the new head's learning rate")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK, lr_grid=args.lr_grid[:1])
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    """Run both stages, print the summary table, save the plot; return the results."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> list[Result]:
    progress = not args.no_progress
    split = load_digits_split()
    results = []
    pretrained = {}
    for method in PRETRAIN_METHODS:
        model, result = pretrain(
            method,
            split.pretrain_train,
            split.pretrain_test,
            width=args.width,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.pretrain_lr,
            rank=args.rank,
            seed=args.seed,
            progress=progress,
        )
        pretrained[method] = model.state_dict()
        results.append(result)

    shots = few_shot(split.finetune_pool, args.shots, seed=args.seed)
    validation = validation_set(split.finetune_pool, args.shots, VALIDATION_PER_CLASS, seed=args.seed)
    backbone = pretrained["AdamW"]
    for method in FINETUNE_METHODS:
        if PREPARE[method] is freeze_all_but_head:  # only the head trains: no rate to choose
            lr = args.head_lr
        else:
            lr = choose_lr(
                method,
                backbone,
                args.width,
                shots,
                validation,
                grid=args.lr_grid,
                steps=args.steps,
                head_lr=args.head_lr,
                seed=args.seed,
                progress=progress,
            )
        results.append(
            fine_tune(
                method,
                backbone,
                args.width,
                shots,
                split.finetune_test,
                steps=args.steps,
                lr=lr,
                head_lr=args.head_lr,
                seed=args.seed,
                progress=progress,
            )
        )

    print(
        f"\nPretraining: {len(split.pretrain_train)} images of digits 0-4, {args.epochs} epochs; "
        f"fine-tuning: {args.shots} shots per digit 5-9, {args.steps} steps, "
        f"tested on {len(split.finetune_test)} images. opt. state: numbers in the optimizer state."
    )
    print(format_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "demo.png"
    plot(results, path)
    print(f"\nplot: {path.resolve()}")
    return results


if __name__ == "__main__":
    main()
