"""Every registered adapter against peft and full fine-tuning: few-shot accuracy and cost at width.

The task (:mod:`benchmarks.adapters_data`): a small ResNet-style CNN pretrained on digits 0-4 is
fine-tuned on a few examples per class of digits 5-9 (a new 5-way head) and scored on a fixed
held-out test set. One case per method of :func:`all_methods` (full fine-tuning, head only, peft
LoRA/LoKr/LoHa, and every class of ``decomp.adapters.registered()`` at its defaults, through
``apply(model, cls, target=<every layer but the head>, train_heads="head")``) with BatchNorm
frozen, one per method of :data:`BN_TRAIN_KEYS` with BatchNorm statistics adapting
(``bn-train:<key>``), ``parameters`` (each adapter's trainable count on standard architectures)
and one per method of :data:`SCALE_KEYS` at transformer width (``scale:<key>``: step time and peak
memory on stacks of 1024- and 4096-wide linear layers, with and without ``parametrize.cached()``).
Every method is trained the same way (AdamW, full batch, weight decay 0; the new head at its own
fixed rate, everything else at a rate chosen on a validation set drawn beside the first seed's
shots, :func:`select_lr`, never on the test set). The protocol, in full, is on the page; targets are in
:mod:`benchmarks.targets`.

Usage::

    python benchmarks/adapters_bench.py --threads 1
    python benchmarks/adapters_bench.py --only 'AtomParam,full,bn-train:AtomParam' --quick
    python benchmarks/adapters_bench.py --only 'scale:*' --threads 2
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: make the repository root importable, as under ``python -m benchmarks...``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

import decomp.adapters
from benchmarks.adapters_data import (
    Dataset,
    DigitsSplit,
    few_shot,
    fine_tuning_model,
    load_digits_split,
    validation_set,
)
from benchmarks.harness import Area, Case, Check, Comparison, Context, Part, Timing, cases, main, timeit
from benchmarks.targets import target
from decomp.adapters.base import AdapterParam

HEAD = "head"
FINETUNE_CLASSES = 5
LORA_RANKS = (4, 8)
# peft's LyCORIS methods at peft's default rank 8: key -> (row name, config class name).
LYCORIS_METHODS = {"lokr8": ("peft LoKr r=8", "LoKrConfig"), "loha8": ("peft LoHa r=8", "LoHaConfig")}
LYCORIS_RANK = 8
ANCHOR_RANK = 8
ANCHOR_KEY, ANCHOR = f"lora{ANCHOR_RANK}", f"peft LoRA r={ANCHOR_RANK}"
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ACCURACY = "Accuracy, parameters, time and memory"
SELECTION = "Learning-rate choice (accuracy on the validation set, first seed)"


@dataclass(frozen=True)
class Settings:
    """The fine-tuning protocol every method shares."""

    seeds: int = 3
    shots: int = 10
    steps: int = 100
    # 1e-4 to 1e-1 in half-decade steps. In a 1-seed side run on the 3e-4..3e-2 grid the choices
    # spanned the whole grid, and LDUParam's validation accuracy still rose from 3e-2 to 0.1.
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    # The new head's own rate, fixed for every method: a fresh linear head needs about 1e-2 to
    # 3e-2, an adapter far less, and one shared rate penalises exactly the small adapters.
    head_lr: float = 3e-2
    # Validation images per class for the rate choice, drawn from the pool beside the first seed's
    # shots (100 images: one image is one point). Two-fold cross-validation on the 50 shots
    # themselves (25 images per fold) was tried first and chose LDU's rate 2 decades off its
    # test-curve peak.
    validation_per_class: int = 20
    # The middle of the official SNELLA scripts' per-task target sparsities (0 to 0.93).
    snella_sparsity: float = 0.5
    # The test-set curves' rates: the protocol grid and, where curves peak, the rates between.
    curve_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 1e-1)
    # peft LoRA r=8's curve also at lora_alpha = r times each multiple: a multiple scales LoRA's
    # first step as a scale rule would scale an adapter's.
    lora_alpha_multiples: tuple[int, ...] = (1, 3, 4, 5, 10)

    def __post_init__(self) -> None:
        if list(self.curve_grid) != sorted(set(self.curve_grid)):
            raise ValueError(f"curve_grid {self.curve_grid} must be ascending without repeats (windows are runs of it)")
        if not set(self.lr_grid) <= set(self.curve_grid):
            raise ValueError(f"curve_grid {self.curve_grid} must hold every rate of lr_grid {self.lr_grid}")


QUICK = Settings(
    seeds=1, shots=2, steps=4, lr_grid=(1e-3, 1e-2), validation_per_class=2,
    curve_grid=(1e-3, 3e-3, 1e-2), lora_alpha_multiples=(1, 3),
)  # fmt: skip


def settings(context: Context) -> Settings:
    return QUICK if context.quick else Settings()


# --------------------------------------------------------------------------- methods


def is_backbone_layer(name: str, module: nn.Module) -> bool:
    """``apply``'s target: every supported layer except the new head."""
    return isinstance(module, SUPPORTED_LAYERS) and name.split(".")[0] != HEAD


def peft_targets(model: nn.Module) -> list[str]:
    """Qualified names of the layers every peft method adapts: backbone convs and linears.

    Grouped (here: depthwise) convs are left out, because peft's LoRA requires ``r % groups == 0``
    and cannot merge them; LoKr and LoHa get the same layers so that the peft rows compare alike.
    """
    return [
        name
        for name, module in model.named_modules()
        if is_backbone_layer(name, module) and getattr(module, "groups", 1) == 1
    ]


def freeze_all_but_head(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".")[0] == HEAD)


def prepare_full(model: nn.Module) -> None:
    model.requires_grad_(True)


def prepare_peft(config_name: str, rank: int, **options: object) -> Callable[[nn.Module], None]:
    """Inject peft's ``config_name`` (``"LoraConfig"``, ``"LoKrConfig"``, ...) at ``rank``, with
    ``options`` (e.g. ``lora_alpha``) passed to the config."""

    def prepare(model: nn.Module) -> None:
        import peft  # imported on use: it takes seconds

        freeze_all_but_head(model)
        config = getattr(peft, config_name)(r=rank, target_modules=peft_targets(model), **options)
        peft.inject_adapter_in_model(config, model)
        model.get_submodule(HEAD).requires_grad_(True)

    return prepare


def prepare_adapter(cls: type[AdapterParam], **config: object) -> Callable[[nn.Module], None]:
    def prepare(model: nn.Module) -> None:
        decomp.adapters.apply(model, cls, target=is_backbone_layer, train_heads=HEAD, **config)
        head = model.get_submodule(HEAD)
        frozen_head = [name for name, p in head.named_parameters() if not p.requires_grad]
        if frozen_head:
            raise RuntimeError(f"apply(..., train_heads={HEAD!r}) left the head frozen: {frozen_head}")

    return prepare


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: ``prepare`` makes a fresh model trainable its way, in place.

    ``sweeps``: whether it trains anything besides the head, so that the lr grid means something
    (head only trains the head at its own rate and has no rate to choose).
    """

    name: str
    prepare: Callable[[nn.Module], None]
    ours: bool
    sweeps: bool = True


def all_methods() -> dict[str, Method]:
    """Every method by case name: the baselines, then every registered adapter class."""
    methods = {
        "full": Method("full fine-tuning", prepare_full, ours=False),
        "head": Method("head only", freeze_all_but_head, ours=False, sweeps=False),
    }
    for rank in LORA_RANKS:
        methods[f"lora{rank}"] = Method(f"peft LoRA r={rank}", prepare_peft("LoraConfig", rank), ours=False)
    for key, (name, config_name) in LYCORIS_METHODS.items():
        methods[key] = Method(name, prepare_peft(config_name, LYCORIS_RANK), ours=False)
    for name, cls in decomp.adapters.registered().items():
        methods[name] = Method(name, prepare_adapter(cls), ours=True)
    return methods


# --------------------------------------------------------------------------- one fine-tuning run


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def profiled_peak_bytes(step: Callable[[], object]) -> int:
    """Peak of the net bytes the CPU allocator hands out while ``step`` runs (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted(
        (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    return max(itertools.accumulate((event.nbytes() for event in events), initial=0))


def step_peak_bytes(resident: Iterable[torch.Tensor], step: Callable[[], object], device: torch.device) -> int:
    """Peak memory of one training ``step`` (see the module docstring for the definition).

    ``resident`` are the tensors alive across steps (parameters, buffers, allocator state),
    counted on the CPU; on CUDA the allocator's own peak already includes them.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resident_bytes(resident) + profiled_peak_bytes(step)


@torch.no_grad()
def logits(model: nn.Module, data: Dataset, device: torch.device) -> torch.Tensor:
    return model(data.images.to(device)).float().cpu()


def snella_allocator(model: nn.Module, steps: int, target_sparsity: float) -> decomp.adapters.Allocator | None:
    """SNELLA's :class:`~decomp.adapters.Allocator` over the model's SNELLA (and SNELL) layers.

    None when the model has none. One budget update per full-batch step (``total_steps =
    steps``), no warmups: the official SNELLA scripts' ``init_warmup = final_warmup = 0`` and
    ``mask_interval = 1``, with every full-batch step an epoch. The budget decays from the layers'
    initial kept counts to ``target_sparsity`` zeroed entries at step ``steps``.
    """
    classes = decomp.adapters.registered()
    kernel_adapters = (classes["SNELLParam"], classes["SNELLAParam"])
    layers = [module for module in model.modules() if isinstance(module, kernel_adapters)]
    if not layers:
        return None
    return decomp.adapters.Allocator(layers, target_sparsity=target_sparsity, total_steps=steps)


@dataclass
class Run:
    """One fine-tuning run, scored on the set it was evaluated on (the validation set or the test).

    ``loss`` is the mean cross-entropy on that set (NaN when the run diverged); ``step_ms`` holds
    every step but the first; ``peak_bytes`` is None unless the run measured it.
    """

    lr: float
    accuracy: float
    loss: float
    trainable: int
    step_ms: list[float]
    init_deviation: float
    peak_bytes: int | None


def fine_tune(
    method: Method,
    quick: bool,
    train: Dataset,
    evaluate: Dataset,
    *,
    seed: int,
    steps: int,
    lr: float,
    head_lr: float,
    bn_train: bool,
    device: torch.device,
    snella_sparsity: float,
    measure_memory: bool,
) -> Run:
    """Fine-tune a fresh copy of the pretrained model with ``method``; score it on ``evaluate``.

    ``steps`` full-batch AdamW steps on ``train``, weight decay 0: the new head at ``head_lr``,
    every other trainable parameter at ``lr``. BatchNorm keeps its pretrained statistics (eval
    mode) unless ``bn_train``, which trains in train mode so the statistics adapt to the new
    images (the official filter-atom recipe); scoring is always in eval mode. When the
    adapted model has SNELLA layers, the Allocator of :func:`snella_allocator` runs inside every
    step: ``allocator.step()`` right after the backward, ``allocator.update_budget(t)`` right
    after the ``t``-th optimizer step (``t`` from 1 to ``steps``). Every step but the first is
    timed; with ``measure_memory`` the first step is measured (:func:`step_peak_bytes`). ``quick``
    picks the quick pretrained network.
    """
    model = fine_tuning_model(quick, FINETUNE_CLASSES, seed).to(device).eval()
    reference = logits(model, evaluate, device)
    method.prepare(model)
    model.to(device)
    deviation = (logits(model, evaluate, device) - reference).abs().max()
    init_deviation = float(deviation / reference.abs().max())
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    head = {id(parameter) for parameter in model.get_submodule(HEAD).parameters()}
    groups = [
        {"params": [p for p in trainable if id(p) not in head], "lr": lr},
        {"params": [p for p in trainable if id(p) in head], "lr": head_lr},
    ]
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]], weight_decay=0.0)
    model.train(bn_train)
    allocator = snella_allocator(model, steps, snella_sparsity)
    images, labels = train.images.to(device), train.labels.to(device)
    budget_updates = itertools.count(1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        if allocator is not None:
            allocator.step()
        optimizer.step()
        if allocator is not None:
            allocator.update_budget(next(budget_updates))

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    peak_bytes = None
    if measure_memory:
        resident = itertools.chain(model.parameters(), model.buffers())
        if allocator is not None:
            resident = itertools.chain(resident, *allocator.exp_avg_importance, *allocator.exp_avg_uncertainty)
        peak_bytes = step_peak_bytes(resident, step, device)
    else:
        step()  # allocates gradients and optimizer state: untimed, like the profiled first step
    step_ms = []
    for _ in range(steps - 1):
        sync()
        start = time.perf_counter()
        step()
        sync()
        step_ms.append((time.perf_counter() - start) * 1e3)
    scores = logits(model.eval(), evaluate, device)
    return Run(
        lr=lr,
        accuracy=100.0 * float((scores.argmax(dim=1) == evaluate.labels).float().mean()),
        loss=float(F.cross_entropy(scores, evaluate.labels)),
        trainable=sum(parameter.numel() for parameter in trainable),
        step_ms=step_ms,
        init_deviation=init_deviation,
        peak_bytes=peak_bytes,
    )


@dataclass(frozen=True)
class LrSelection:
    """The mean validation scores of every rate of a grid, and the rate they choose."""

    grid: tuple[float, ...]
    accuracy: tuple[float, ...]  # validation accuracy (%), per rate
    loss: tuple[float, ...]  # validation cross-entropy, per rate

    def __post_init__(self) -> None:
        if not self.grid or not len(self.grid) == len(self.accuracy) == len(self.loss):
            raise ValueError(
                "grid, accuracy and loss must have one entry per rate (at least one), got "
                f"{len(self.grid)}, {len(self.accuracy)} and {len(self.loss)}"
            )

    @property
    def chosen(self) -> float:
        """The rate of best validation accuracy; ties go to the lower validation loss.

        A NaN loss (a run that diverged) counts as infinite; a tie in both goes to the first rate.
        """

        def rank(index: int) -> tuple[float, float]:
            loss = self.loss[index]
            return self.accuracy[index], -(math.inf if math.isnan(loss) else loss)

        return self.grid[max(range(len(self.grid)), key=rank)]


def select_lr(
    method: Method,
    quick: bool,
    shots: Dataset,
    validation: Dataset,
    *,
    grid: Sequence[float],
    seed: int,
    steps: int,
    head_lr: float,
    bn_train: bool,
    device: torch.device,
    snella_sparsity: float,
) -> LrSelection:
    """Score every rate of ``grid``: a run trains on all of ``shots`` and is scored on
    ``validation`` (:func:`benchmarks.adapters_data.validation_set`, disjoint from the shots and
    the test set). A one-rate grid needs no choice and runs nothing (its scores are NaN)."""
    grid = tuple(grid)
    if len(grid) == 1:
        return LrSelection(grid, (math.nan,), (math.nan,))
    runs = [
        fine_tune(
            method, quick, shots, validation, seed=seed, steps=steps, lr=lr, head_lr=head_lr,
            bn_train=bn_train, device=device, snella_sparsity=snella_sparsity, measure_memory=False,
        )
        for lr in grid
    ]  # fmt: skip
    return LrSelection(grid, tuple(run.accuracy for run in runs), tuple(run.loss for run in runs))


def run_method(
    method: Method, settings: Settings, context: Context, *, bn_train: bool
) -> list[tuple[Run, LrSelection]]:
    """``method`` over the seeds: the rate is chosen (:func:`select_lr`) once, with the first seed's
    shots and validation set, and reused; each seed's final run trains on all of its shots and is scored on the test
    set, the first one measuring the peak memory of a step. A method that trains only the head
    (``sweeps=False``) has no rate to choose: its one-rate grid is the head's rate."""
    split = load_digits_split()
    common = {
        "steps": settings.steps, "head_lr": settings.head_lr, "bn_train": bn_train, "device": context.device,
        "snella_sparsity": settings.snella_sparsity,
    }  # fmt: skip
    grid = settings.lr_grid if method.sweeps else (settings.head_lr,)
    runs: list[tuple[Run, LrSelection]] = []
    for seed in range(settings.seeds):
        shots = few_shot(split.finetune_pool, settings.shots, seed)
        if not runs:
            validation = validation_set(split.finetune_pool, settings.shots, settings.validation_per_class, seed)
            selection = select_lr(method, context.quick, shots, validation, grid=grid, seed=seed, **common)
        run = fine_tune(
            method, context.quick, shots, split.finetune_test, seed=seed, lr=selection.chosen,
            measure_memory=not runs, **common,
        )  # fmt: skip
        print(f"  {method.name} seed {seed}: lr {run.lr:g}, test accuracy {run.accuracy:.1f}%", flush=True)
        runs.append((run, selection))
    return runs


ACCURACY_HEADER = (
    "Method", "Accuracy % (mean ± std)", "lr (per seed)", "Trainable", "Step ms (IQR)", "Peak MB", "Init deviation",
)  # fmt: skip
# The rates every adapter should train well at (issue 12, "one learning rate for all").
SHARED_LRS = (1e-3, 3e-3)
ROBUSTNESS = "One learning rate for all: validation accuracy at the shared rates against the best of the grid"


def robustness_header(scored: str) -> tuple[str, ...]:
    """The shared-rate tables' header, for accuracy ``scored`` on ``"val."`` or ``"test"``."""
    return ("Method", f"Best {scored} acc. % (lr)", *(f"{scored} acc. % at lr {lr:g}" for lr in SHARED_LRS),
            "Worse shared rate - best")  # fmt: skip


BN_MODES = {False: "BatchNorm frozen", True: "BatchNorm statistics adapting"}
BN_TRAIN_PREFIX = "bn-train:"
# BatchNorm adapting is measured for what the targets compare: head only, LoRA r=8, ours.
BN_TRAIN_KEYS = ("head", ANCHOR_KEY, *decomp.adapters.registered())


def shared_rate_gap(grid: Sequence[float], accuracy: Sequence[float]) -> float | None:
    """Points the worse of :data:`SHARED_LRS` trails the best ``accuracy`` over ``grid`` by (<= 0).

    None when the grid lacks a shared rate.

    >>> shared_rate_gap((1e-4, 1e-3, 3e-3), (60.0, 80.0, 78.0))
    -2.0
    """
    if len(grid) != len(accuracy):
        raise ValueError(f"grid and accuracy must have one entry per rate, got {len(grid)} and {len(accuracy)}")
    if not set(SHARED_LRS) <= set(grid):
        return None
    return min(accuracy[list(grid).index(lr)] for lr in SHARED_LRS) - max(accuracy)


def best_cell(grid: Sequence[float], accuracy: Sequence[float]) -> str:
    """The best ``accuracy`` and its rate, as a table cell: ``"92.7 (0.01)"``."""
    best = max(range(len(grid)), key=lambda index: accuracy[index])
    return f"{accuracy[best]:.1f} ({grid[best]:g})"


def robustness_row(name: str, grid: Sequence[float], accuracy: Sequence[float], gap: float | None) -> tuple[str, ...]:
    """A row of the shared-rate tables: the best accuracy (and its rate), those at the shared rates
    (``-`` where ``grid`` lacks one), the gap (``-`` when None)."""
    shared = [f"{accuracy[list(grid).index(lr)]:.1f}" if lr in grid else "-" for lr in SHARED_LRS]
    return (name, best_cell(grid, accuracy), *shared, "-" if gap is None else f"{gap:+.1f}")


def measure_method(key: str, context: Context, *, bn_train: bool = False) -> Part:
    """One method's rows of the accuracy, learning-rate and shared-rate tables of BatchNorm mode
    ``bn_train`` (see :func:`fine_tune`); its figures in ``data``."""
    method, protocol = all_methods()[key], settings(context)
    mode = BN_MODES[bn_train]
    selection_header = ("Method", *(f"val. acc. % at lr {lr:g}" for lr in protocol.lr_grid))
    part = Part(facts=[
        f"fine-tuning: {protocol.shots} shots per class, {protocol.steps} steps, seeds 0..{protocol.seeds - 1}, "
        f"lr grid {', '.join(f'{lr:g}' for lr in protocol.lr_grid)} chosen on seed 0 with {protocol.validation_per_class} "
        "validation images per class from the pool, disjoint from the shots and the test set; "
        f"the new head at its own lr {protocol.head_lr:g} in every method.",
    ])  # fmt: skip
    try:
        runs = run_method(method, protocol, context, bn_train=bn_train)
    except Exception as error:  # noqa: BLE001 - a broken adapter is a row; the rest go on
        status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        part.table(f"{ACCURACY} ({mode})", ACCURACY_HEADER, [(method.name, status, *("-",) * 5)])
        return part
    accuracies = [run.accuracy for run, _ in runs]
    mean, spread = statistics.fmean(accuracies), statistics.stdev(accuracies) if len(runs) > 1 else 0.0
    step = Timing.from_samples([ms for run, _ in runs for ms in run.step_ms])
    first, selection = runs[0]
    part.table(f"{ACCURACY} ({mode})", ACCURACY_HEADER, [(
        method.name, f"{mean:.1f} ± {spread:.1f}", ", ".join(f"{run.lr:g}" for run, _ in runs),
        f"{first.trainable:,}",
        f"{step.median_ms:.2f} ({step.iqr_ms:.2f})", f"{first.peak_bytes / 2**20:.2f}",
        f"{max(run.init_deviation for run, _ in runs):.1e}",
    )])  # fmt: skip
    gap = None
    if len(selection.grid) > 1:
        part.table(f"{SELECTION} ({mode})", selection_header, [(method.name, *(f"{a:.1f}" for a in selection.accuracy))])
        gap = shared_rate_gap(selection.grid, selection.accuracy)
        if gap is not None:
            row = robustness_row(method.name, selection.grid, selection.accuracy, gap)
            part.table(f"{ROBUSTNESS} ({mode})", robustness_header("val."), [row])
    part.data = {
        "name": method.name, "ours": method.ours, "accuracy": mean, "accuracy_std": spread,
        "trainable": first.trainable, "step": asdict(step), "peak_bytes": first.peak_bytes,
        "bn_train": bn_train, "shared_rate_gap": gap,
    }  # fmt: skip
    return part


CURVE_PREFIX = "lr-curve:"
# The test-set curve is measured for the methods the shared-rate target is about: ours, and LoRA.
CURVE_KEYS = (ANCHOR_KEY, *decomp.adapters.registered())
CURVE = "One learning rate for all, on the test set: accuracy % per lr, mean of the seeds (BatchNorm frozen)"
CURVE_ROBUSTNESS = "One learning rate for all, on the test set: the shared rates against the best (BatchNorm frozen)"
# How far below a curve's best a rate may score and still count as good: the shared-rate target's 2 points.
WINDOW_POINTS = 2.0


def curve_on_test_set(
    method: Method, protocol: Settings, context: Context, split: DigitsSplit, grid: Sequence[float]
) -> list[float]:
    """``method``'s test accuracy (%) at every rate of ``grid``, BatchNorm frozen, mean over the seeds."""
    return [
        statistics.fmean(
            fine_tune(
                method, context.quick, few_shot(split.finetune_pool, protocol.shots, seed), split.finetune_test,
                seed=seed, steps=protocol.steps, lr=lr, head_lr=protocol.head_lr, bn_train=False,
                device=context.device, snella_sparsity=protocol.snella_sparsity, measure_memory=False,
            ).accuracy
            for seed in range(protocol.seeds)
        )
        for lr in grid
    ]  # fmt: skip


def good_window(grid: Sequence[float], accuracy: Sequence[float], points: float = WINDOW_POINTS) -> tuple[float, float]:
    """The lowest and highest rate of the run of consecutive ``grid`` rates around the best
    ``accuracy`` that all score within ``points`` of it.

    >>> good_window((1e-3, 3e-3, 1e-2, 3e-2), (88.0, 91.0, 92.0, 20.0))
    (0.003, 0.01)
    """
    if len(grid) != len(accuracy):
        raise ValueError(f"grid and accuracy must have one entry per rate, got {len(grid)} and {len(accuracy)}")
    best = max(range(len(grid)), key=lambda index: accuracy[index])
    low = high = best
    while low > 0 and accuracy[low - 1] >= accuracy[best] - points:
        low -= 1
    while high < len(grid) - 1 and accuracy[high + 1] >= accuracy[best] - points:
        high += 1
    return grid[low], grid[high]


def curve_methods(key: str, protocol: Settings) -> list[Method]:
    """The curves of case ``lr-curve:<key>``: method ``key`` at its defaults and, for peft LoRA r=8,
    also at ``lora_alpha`` = r x each further multiple of :attr:`Settings.lora_alpha_multiples`."""
    method = all_methods()[key]
    if key != ANCHOR_KEY:
        return [method]
    return [method, *(
        Method(f"{ANCHOR}, lora_alpha={ANCHOR_RANK * multiple}",
               prepare_peft("LoraConfig", ANCHOR_RANK, lora_alpha=ANCHOR_RANK * multiple), ours=False)
        for multiple in protocol.lora_alpha_multiples if multiple != 1
    )]  # fmt: skip


def measure_curve(key: str, context: Context) -> Part:
    """Method ``key``'s mean test accuracy over the seeds at every rate of the finer
    :attr:`Settings.curve_grid`, BatchNorm frozen: the shared-rate gap on the protocol grid's rates,
    and the good window, the run of rates of the finer grid within 2 points of its best (a lower
    bound, set by the grid's spacing, on the range of rates that trains that well).

    Not a way to choose the rate (the test set chooses nothing in the accuracy table): it shows how
    much each rate costs, so the shared-rate target has a measure less noisy than the 100
    validation images. The target asks a curve to stay within 2 points of its best over the factor
    3 from 1e-3 to 3e-3. A scale rule multiplies an adapter's first step by a constant, as
    ``lora_alpha`` does LoRA's; to show what a constant does to a curve, peft LoRA r=8 also runs at
    ``lora_alpha`` = r x each of :attr:`Settings.lora_alpha_multiples` (information rows: the
    summary checks the defaults' gap).
    """
    protocol = settings(context)
    multiples = ", ".join(map(str, protocol.lora_alpha_multiples))
    part = Part(facts=[
        f"lr curve: the rates {', '.join(f'{lr:g}' for lr in protocol.curve_grid)}, each on seeds "
        f"0..{protocol.seeds - 1}, BatchNorm frozen, scored on the test set; the shared-rate gap over the protocol "
        f"grid's rates ({', '.join(f'{lr:g}' for lr in protocol.lr_grid)}), the good window over all of them; "
        f"peft LoRA r={ANCHOR_RANK} at lora_alpha = r x {multiples}.",
    ])  # fmt: skip
    split = load_digits_split()
    on_grid = [index for index, lr in enumerate(protocol.curve_grid) if lr in protocol.lr_grid]
    curve_rows, robustness_rows, curves = [], [], []
    for method in curve_methods(key, protocol):
        means = curve_on_test_set(method, protocol, context, split, protocol.curve_grid)
        grid, grid_means = [protocol.curve_grid[i] for i in on_grid], [means[i] for i in on_grid]
        gap = shared_rate_gap(grid, grid_means)
        low, high = good_window(protocol.curve_grid, means)
        curve_rows.append((method.name, *(f"{accuracy:.1f}" for accuracy in means)))
        robustness_rows.append((
            *robustness_row(method.name, grid, grid_means, gap), best_cell(protocol.curve_grid, means),
            f"{low:g} to {high:g}", f"{high / low:.3g}",
        ))  # fmt: skip
        curves.append({"name": method.name, "ours": method.ours, "curve": {"lr": list(protocol.curve_grid),
                       "accuracy": means}, "shared_rate_gap": gap, "window": [low, high]})  # fmt: skip
    header = ("Method", *(f"test acc. % at lr {lr:g}" for lr in protocol.curve_grid))
    part.table(CURVE, header, curve_rows)
    best, *shared, gap_column = robustness_header("test")[1:]
    robustness = (
        "Method", f"{best}, protocol grid", *shared, gap_column, f"{best}, finer grid",
        f"Rates within {WINDOW_POINTS:g} points of that best", "Window width (highest / lowest rate)",
    )  # fmt: skip
    part.table(CURVE_ROBUSTNESS, robustness, robustness_rows)
    part.data = {**curves[0], "variants": curves[1:]}
    return part


def architectures() -> dict[str, Callable[[], nn.Module]]:
    """Builders of the paper-style table's models, from transformers' default configs."""
    from transformers import ConvNextConfig, ConvNextModel, ResNetConfig, ResNetModel, ViTConfig, ViTModel

    return {
        "ResNet-50": lambda: ResNetModel(ResNetConfig()),
        "ConvNeXt-T": lambda: ConvNextModel(ConvNextConfig()),
        "ViT-B/16": lambda: ViTModel(ViTConfig(), add_pooling_layer=False),
    }


def build_on_meta(builder: Callable[[], nn.Module]) -> nn.Module:
    """The model ``builder`` makes, with every tensor on the meta device (shapes only)."""
    with torch.device("meta"):
        return builder()


def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv and linear layer, the head included (``apply(model, cls, target=r".*")``)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SUPPORTED_LAYERS)]


def adapter_parameter_count(cls: type[AdapterParam], model: nn.Module, *, exclude: str | None = None) -> int:
    """Sum of ``cls.trainable_count(weight shape)`` (default config) over the supported layers."""
    return sum(
        cls.trainable_count(tuple(module.weight.shape))
        for name, module in supported_layers(model)
        if exclude is None or name.split(".")[0] != exclude
    )


def lora_parameter_count(model: nn.Module, rank: int, *, exclude: str | None = None) -> int:
    """peft LoRA's trainable parameters on every ungrouped conv and linear, counted by peft."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [
        name
        for name, module in supported_layers(model)
        if getattr(module, "groups", 1) == 1 and (exclude is None or name.split(".")[0] != exclude)
    ]
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=targets), model)
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


OURS_COLOUR, BASELINE_COLOUR = "#1565c0", "#616161"


def plot_accuracy(results: Sequence[dict], path: Path, *, title: str) -> None:
    """Accuracy (mean ± std over seeds) against trainable parameters on a log x axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(8.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for result in results:
        colour = OURS_COLOUR if result["ours"] else BASELINE_COLOUR
        point = (result["trainable"], result["accuracy"])
        axes.errorbar(*point, yerr=result["accuracy_std"], fmt="o", color=colour, capsize=3)
        axes.annotate(result["name"], point, xytext=(5, 3), textcoords="offset points", fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (log scale)")
    axes.set_ylabel("test accuracy on digits 5-9 (%)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(
        handles=[
            Line2D([], [], color=OURS_COLOUR, marker="o", linestyle="", label="decomp.adapters"),
            Line2D(
                [],
                [],
                color=BASELINE_COLOUR,
                marker="o",
                linestyle="",
                label="full, head only, peft LoRA/LoKr/LoHa",
            ),
        ],
        fontsize=8,
        loc="lower right",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def measure_parameters(context: Context) -> Part:
    """Trainable parameters of every adapter and of peft LoRA r=8 on standard architectures."""
    classes = decomp.adapters.registered()
    header = ("Architecture", "Parameters", "peft LoRA r=8", *classes)
    rows = []
    for architecture, builder in architectures().items():
        total = sum(parameter.numel() for parameter in build_on_meta(builder).parameters())
        counts: list[int | str] = [lora_parameter_count(build_on_meta(builder), 8)]
        for cls in classes.values():
            try:
                counts.append(adapter_parameter_count(cls, build_on_meta(builder)))
            except Exception as error:  # noqa: BLE001 - report a failing closed form, keep the column
                counts.append(f"failed: {type(error).__name__}")
        cells = [c if isinstance(c, str) else f"{c:,} ({100 * c / total:.2g}%)" for c in counts]
        rows.append((architecture, f"{total:,}", *cells))
    part = Part()
    part.table("Trainable parameters on standard architectures", header, rows)
    return part


# --------------------------------------------------------------------------- transformer width


@dataclass(frozen=True)
class ScaleSettings:
    """The transformer-width case: stacks of square ``nn.Linear`` layers (no bias), one per width.

    ``widths`` holds ``(width, layers, timed steps)``; the input is ``batch x tokens x width``.
    """

    widths: tuple[tuple[int, int, int], ...] = ((1024, 4, 3), (4096, 2, 2))
    batch: int = 4
    tokens: int = 256


SCALE_QUICK = ScaleSettings(widths=((32, 2, 2), (64, 1, 2)), batch=2, tokens=8)
SCALE_PREFIX = "scale:"
SCALE = "Transformer width: one training step (forward, backward, AdamW) per adapter"
SCALE_HEADER = (
    "Method", "Width x layers", "Trainable", "Forward", "Step ms (IQR)", "Step ms, weight path",
    "Step ms, weight path in parametrize.cached()", "Peak MiB", "Peak MiB, weight path",
    "Peak MiB, weight path in parametrize.cached()",
)  # fmt: skip
# How each mode runs a step: apply's default forward (the branch on linear layers where the method
# has one), the weight path (branch=False: W' formed every forward), and the weight path with one
# parametrize.cached() per step.
SCALE_MODES = ("plain", "weight", "cached")


def scale_model(width: int, layers: int) -> nn.Sequential:
    """``layers`` bias-free ``width x width`` linear layers in a row, weights drawn from seed 0.

    >>> scale_model(8, 2)(torch.zeros(3, 8)).shape
    torch.Size([3, 8])
    """
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))


def prepare_scale(key: str, model: nn.Module, branch: bool = True) -> bool:
    """Adapt every linear layer of ``model`` with method ``key`` (peft LoRA r=8 or one of ours);
    whether some layer runs the branch forward (``apply``'s ``branch``)."""
    if key == ANCHOR_KEY:
        import peft

        model.requires_grad_(False)
        names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        peft.inject_adapter_in_model(peft.LoraConfig(r=8, target_modules=names), model)
        return False
    cls = decomp.adapters.registered()[key]
    decomp.adapters.apply(model, cls, target=lambda name, module: isinstance(module, nn.Linear), branch=branch)
    return any(type(m).forward is not nn.Linear.forward for m in model.modules() if isinstance(m, nn.Linear))


def steady_peak_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], object],
                      device: torch.device) -> int:  # fmt: skip
    """Peak memory of one ``step`` after the first: parameters, buffers and optimizer state
    resident (gradients freed), plus the peak of what ``step`` allocates (:func:`step_peak_bytes`)."""
    optimizer.zero_grad(set_to_none=True)
    state = [value for entry in optimizer.state.values() for value in entry.values() if isinstance(value, torch.Tensor)]
    return step_peak_bytes(itertools.chain(model.parameters(), model.buffers(), state), step, device)


SCALE_KEYS = (ANCHOR_KEY, *decomp.adapters.registered())


def _scale_run(model: nn.Module, inputs: torch.Tensor, repeats: int, context: Context,
               modes: tuple[str, ...]) -> dict[str, dict]:  # fmt: skip
    """Step time and peak memory of one AdamW training step of ``model``, per ``modes``
    (``"cached"``: inside one ``parametrize.cached()`` per step)."""
    from torch.nn.utils import parametrize

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(inputs).square().mean().backward()
        optimizer.step()

    def cached_step() -> None:
        # One cache per step: the adapter's parameters change at every optimizer step.
        with parametrize.cached():
            step()

    step()  # allocates the gradients and the optimizer state
    measured = {}
    for mode in modes:
        run = cached_step if mode == "cached" else step
        peak = steady_peak_bytes(model, optimizer, run, context.device)
        timing = timeit(run, repeats=repeats, warmup=0, sync=context.sync)
        measured[mode] = {"step": asdict(timing), "peak_bytes": peak}
    return measured


def measure_scale(key: str, context: Context) -> Part:
    """Step time and peak memory of method ``key`` on every width of :class:`ScaleSettings`:
    ``apply``'s default forward, the weight path, and the weight path in ``parametrize.cached()``
    (the two are one model when no layer takes the branch)."""
    protocol = SCALE_QUICK if context.quick else ScaleSettings()
    name = ANCHOR if key == ANCHOR_KEY else key
    part = Part(facts=[
        f"transformer width: widths x layers {', '.join(f'{w}x{n}' for w, n, _ in protocol.widths)}, input "
        f"{protocol.batch} x {protocol.tokens} tokens, fp32, loss mean(output^2), AdamW; "
        f"timed steps per width {', '.join(str(r) for _, _, r in protocol.widths)} after an untimed one.",
        "transformer width: 'branch' runs adapted linear layers as x W^T + b + adapter.branch(x) (apply's "
        "default where the method has a branch form); 'weight' forms W' every forward (branch=False).",
    ])  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    widths, rows = {}, []
    for width, layers, repeats in protocol.widths:
        inputs = torch.randn(protocol.batch, protocol.tokens, width, generator=generator).to(context.device)
        try:
            model = scale_model(width, layers)
            branched = prepare_scale(key, model)
            model.to(context.device)
            measured = _scale_run(model, inputs, repeats, context, ("plain",) if branched else SCALE_MODES)
            if branched:
                del model
                model = scale_model(width, layers)
                prepare_scale(key, model, branch=False)
                model.to(context.device)
                measured |= _scale_run(model, inputs, repeats, context, ("weight", "cached"))
            else:
                measured["weight"] = measured["plain"]
        except Exception as error:  # noqa: BLE001 - a broken adapter is a row; the rest go on
            rows.append((name, f"{width} x {layers}", f"failed: {type(error).__name__}: {str(error)[:160]}",
                         *("-",) * 7))  # fmt: skip
            continue
        count = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        widths[str(width)] = {"layers": layers, "trainable": count, "branch": branched, **measured}
        timings = {mode: Timing(**measured[mode]["step"]) for mode in SCALE_MODES}
        rows.append((
            name, f"{width} x {layers}", f"{count:,}", "branch" if branched else "weight",
            *(f"{timings[mode].median_ms:.1f} ({timings[mode].iqr_ms:.1f})" for mode in SCALE_MODES),
            *(f"{measured[mode]['peak_bytes'] / 2**20:.1f}" for mode in SCALE_MODES),
        ))  # fmt: skip
        print(f"  {name} width {width}: " + ", ".join(f"{m} {timings[m].median_ms:.1f} ms" for m in SCALE_MODES),
              flush=True)  # fmt: skip
    part.table(SCALE, SCALE_HEADER, rows)
    if widths:
        part.data = {"name": name, "ours": key != ANCHOR_KEY, "widths": widths}
    return part


# --------------------------------------------------------------------------- the area


def _step(data: dict) -> Timing:
    return Timing(**data["step"])


def _cnn_cost(ran: dict[str, dict], result: Part) -> None:
    """Step time against peft LoRA r=8 (a target for ours), peak memory, AtomParam against full
    fine-tuning and the ratios against LoKr and LoHa (information), BatchNorm frozen."""
    anchor, full, atom = ran.get(ANCHOR_KEY), ran.get("full"), ran.get("AtomParam")
    if anchor is not None:
        for key, data in ran.items():
            if key == ANCHOR_KEY:
                continue
            bound = target("adapters: step time vs LoRA r=8") if data["ours"] else None
            result.comparisons.append(Comparison(f"{data['name']} step", _step(data), ANCHOR, _step(anchor), bound))
            if data["ours"]:
                ratio = data["peak_bytes"] / anchor["peak_bytes"]
                bound = target("adapters: peak memory vs LoRA r=8")
                result.checks.append(Check(f"{data['name']} peak memory", ratio, bound, f"{ratio:.2f}x"))
    if full is not None and atom is not None:
        gap = atom["accuracy"] - full["accuracy"]
        bound = target("adapters: AtomParam accuracy vs full fine-tuning")
        result.checks.append(Check("AtomParam accuracy - full fine-tuning's", gap, bound, f"{gap:+.1f} points"))
        share = 100 * atom["trainable"] / full["trainable"]
        bound = target("adapters: AtomParam trainable fraction of full fine-tuning")
        result.checks.append(Check("AtomParam trainable share of full fine-tuning", share, bound, f"{share:.2f}%"))
    lycoris = [ran[key] for key in LYCORIS_METHODS if key in ran]
    ours = [data for data in ran.values() if data["ours"]]
    if lycoris and ours:
        header = ["Method", *(f"{kind} / {a['name']}" for a in lycoris for kind in ("step", "peak memory"))]
        rows = [
            [data["name"], *(f"{value:.2f}x" for a in lycoris for value in (
                _step(data).median_ms / _step(a).median_ms, data["peak_bytes"] / a["peak_bytes"]))]
            for data in ours
        ]  # fmt: skip
        result.table("Step time and peak memory against peft LoKr and LoHa (information, no target)", header, rows)


def _accuracy_targets(ran: dict[str, dict], mode: str, result: Part) -> None:
    """Issue 12's accuracy targets in one BatchNorm mode, between methods that both ran."""

    def check(name: str, value: float, key: str, shown: str) -> None:
        result.checks.append(Check(f"[{mode}] {name}", value, target(key), shown))

    head, lora = ran.get("head"), ran.get(ANCHOR_KEY)
    for data in (data for data in ran.values() if data["ours"]):
        if head is not None:
            gap = data["accuracy"] - head["accuracy"]
            check(f"{data['name']} accuracy - head only's", gap, "adapters: accuracy vs head only", f"{gap:+.1f} points")
        if data.get("shared_rate_gap") is not None:
            gap = data["shared_rate_gap"]
            check(f"{data['name']} val. accuracy at the worse of lr {' and '.join(f'{lr:g}' for lr in SHARED_LRS)}"
                  " - the grid's best", gap, "adapters: shared learning rates vs the best", f"{gap:+.1f} points")  # fmt: skip
    for key in ("SNELLAParam", "AtomParam"):
        if key in ran and lora is not None:
            gap = ran[key]["accuracy"] - lora["accuracy"]
            check(f"{key} accuracy - {ANCHOR}'s", gap, f"adapters: {key} accuracy vs LoRA r=8", f"{gap:+.1f} points")
    if "AtomParam" in ran and lora is not None and head is not None:
        # The adapters' own parameters: both counts include the same new head, which head only trains.
        ratio = (ran["AtomParam"]["trainable"] - head["trainable"]) / (lora["trainable"] - head["trainable"])
        check(f"AtomParam trainable / {ANCHOR}'s (head excluded)", ratio, "adapters: AtomParam trainable vs LoRA r=8",
              f"{ratio:.3f}x")  # fmt: skip
    if "LDUParam" in ran:
        spread = ran["LDUParam"]["accuracy_std"]
        check("LDUParam accuracy std over seeds", spread, "adapters: LDUParam accuracy std", f"{spread:.1f} points")


def _scale_cost(ran: dict[str, dict], result: Part) -> None:
    """Every adapter's step time and peak memory against peft LoRA r=8's at each width: targets
    on ``apply``'s default forward; the weight path, in and out of ``parametrize.cached()``, is
    information where the default is the branch."""
    anchor = ran.get(ANCHOR_KEY)
    if anchor is None:
        return
    for data in (data for data in ran.values() if data["ours"]):
        for width, measured in data["widths"].items():
            if width not in anchor["widths"]:
                continue
            lora = anchor["widths"][width]
            lora_step = _step(lora["plain"])
            suffixes = {"plain": "", "weight": ", weight path", "cached": ", weight path in cached()"}
            if not measured.get("branch"):
                suffixes = {"plain": "", "cached": ", cached()"}
            for mode, suffix in suffixes.items():
                bound = target("adapters: width step time vs LoRA r=8") if mode == "plain" else None
                label = f"{data['name']} step, width {width}{suffix}"
                result.comparisons.append(Comparison(label, _step(measured[mode]), ANCHOR, lora_step, bound))
            ratio = measured["plain"]["peak_bytes"] / lora["plain"]["peak_bytes"]
            bound = target("adapters: width peak memory vs LoRA r=8")
            result.checks.append(Check(f"{data['name']} peak memory, width {width}", ratio, bound, f"{ratio:.2f}x"))


def summary(parts: dict[str, Part]) -> Part:
    """What only several cases together show: the cost targets against peft LoRA r=8 on the CNN
    and at transformer width, and the accuracy targets in each BatchNorm mode."""
    frozen, adapting, scale, curves = {}, {}, {}, {}
    for key, part in parts.items():
        if not part.data:
            continue
        if key.startswith(CURVE_PREFIX):
            curves[key.removeprefix(CURVE_PREFIX)] = part.data
        elif key.startswith(SCALE_PREFIX):
            scale[key.removeprefix(SCALE_PREFIX)] = part.data
        elif key.startswith(BN_TRAIN_PREFIX):
            adapting[key.removeprefix(BN_TRAIN_PREFIX)] = part.data
        else:
            frozen[key] = part.data
    result = Part()
    _cnn_cost(frozen, result)
    for bn_train, ran in ((False, frozen), (True, adapting)):
        _accuracy_targets(ran, BN_MODES[bn_train], result)
    for data in (data for data in curves.values() if data["ours"] and data["shared_rate_gap"] is not None):
        gap = data["shared_rate_gap"]
        name = f"[{BN_MODES[False]}] {data['name']} test accuracy at the worse of lr 1e-3 and 3e-3 - the grid's best"
        result.checks.append(Check(name, gap, target("adapters: shared learning rates vs the best"), f"{gap:+.1f} points"))
    _scale_cost(scale, result)
    return result


def plot(parts: dict[str, Part]) -> dict[str, Callable[[Path], None]]:
    """Accuracy against trainable parameters (BatchNorm frozen), for the methods that ran."""
    ran = [part.data for key, part in parts.items() if part.data and ":" not in key]
    title = "Few-shot digits 5-9, BatchNorm frozen: accuracy vs trainable"
    return {"accuracy": functools.partial(plot_accuracy, ran, title=title)} if ran else {}


AREA = Area(
    section="adapters",
    title="Adapters: few-shot fine-tuning on digits",
    cases=(
        *cases(measure_method, all_methods()),
        *cases(functools.partial(measure_method, bn_train=True), BN_TRAIN_KEYS, BN_TRAIN_PREFIX),
        *cases(measure_curve, CURVE_KEYS, CURVE_PREFIX),
        Case("parameters", measure_parameters),
        *cases(measure_scale, SCALE_KEYS, SCALE_PREFIX),
    ),
    summary=summary,
    plot=plot,
)

if __name__ == "__main__":
    sys.exit(main(AREA))
