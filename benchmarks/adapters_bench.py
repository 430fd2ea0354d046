"""Few-shot fine-tuning with every adapter of ``decomp.adapters`` against peft and full fine-tuning.

The task (:mod:`benchmarks.adapters_data`): a small ResNet-style CNN pretrained on sklearn's digits
0-4 is fine-tuned on ``--shots`` examples per class of digits 5-9 (a new 5-way head) and scored on
a fixed held-out test set of 5-9. Methods, all trained the same way (AdamW, full-batch, ``--steps``
steps, weight decay 0, BatchNorm statistics frozen in eval mode; the new head is always trained):

* full fine-tuning; head only;
* peft LoRA r=4 and r=8, LoKr r=8 and LoHa r=8 (``inject_adapter_in_model``, peft's other
  defaults) on every conv and linear layer except the head and the depthwise conv (peft's LoRA
  requires ``r % groups == 0`` and cannot merge grouped convs; LoKr and LoHa accept the depthwise
  conv but are kept on LoRA's layers so the peft rows compare the same layers);
* every adapter of ``decomp.adapters`` with its defaults (SNELLA once more with
  ``zero_start=True``), through ``decomp.adapters.apply(model, XParam, target=<every layer but
  the head>, train_heads="head")``. An adapter (or ``apply``) that is still a placeholder is
  reported as "not available"; one that raises is reported as "failed" with the error. No row is
  ever filled in by other means.

Learning rate, per method, chosen without the test set: the first seed's few-shot set is cut
into ``--folds`` stratified folds (:func:`benchmarks.adapters_data.shot_folds`); for every rate of
``--lr-grid`` the method is trained on each fold's complement (same steps, same seed) and scored
on the held-out fold. The rate with the best mean validation accuracy wins (ties: the lower mean
validation cross-entropy; a diverged run's NaN loss counts as infinite), and every seed's final
run trains on all of its shots at that rate and is scored on the test set. ``--select-per-seed``
repeats the choice on every seed's own shots instead (``--seeds`` times the validation runs).
Every method, baselines included, goes through the same procedure.

SNELLA's bi-level allocation: when the adapted model holds :class:`decomp.adapters.SNELLAParam`
layers, the loop builds an :class:`decomp.adapters.Allocator` over them (target sparsity
``--snella-sparsity``, ``total_steps`` = ``--steps``, no warmups, the official scripts' settings)
and calls ``allocator.step()`` after every ``backward()`` (the |p * grad| importance EMAs) and
``allocator.update_budget(t)`` after every optimizer step (the cubic budget schedule and the
cross-layer split; the official code updates once per epoch, and here every full-batch step is an
epoch). Both calls are part of the timed step.

Per method: test accuracy mean ± std over ``--seeds`` seeds (a seed fixes the few-shot draw, the
new head and the adapter's random init), the learning rate of each seed's final run, trainable
parameters, median step time (forward, backward and optimizer step, every step but each run's
first), peak memory of one training step, and the largest relative deviation of the logits at
init from the pretrained model's (0 for a method that starts at the identity). Only the final
runs (all shots) are timed and measured; the validation runs only score.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the first training step (after a
peak reset). On CPU, the bytes of the model's parameters and buffers (and of SNELLA's Allocator
state) plus the peak of the net bytes the CPU allocator hands out during the first training step,
read from ``torch.profiler`` memory events (``profile_memory=True``); the first step is used
because it allocates the gradients and optimizer state, so both definitions count model,
gradients, optimizer state and activations. The process RSS is not used: its high-water mark
cannot be reset between methods.

Then a paper-style table: trainable parameters of every adapter (its closed-form
``trainable_count`` summed over every conv and linear layer, the head included) and of peft LoRA
r=8 on ResNet-50, ConvNeXt-T and ViT-B/16 built from transformers' default configs on the meta
device (no weights allocated, nothing downloaded).

Targets: AtomParam within 1 point of full fine-tuning with under 1% of its trainable
parameters; every adapter's step time <= 1.3x and peak memory <= 1.1x peft LoRA r=8's. Step-time
and peak-memory ratios against peft LoKr and LoHa are reported as information (no target). Misses
are reported as measured; the script exits 0 (it is a report, not a test).

Usage::

    python benchmarks/adapters_bench.py --pretrain            # write the checkpoint (about 1 min)
    python benchmarks/adapters_bench.py --threads 2 --seeds 3 --shots 10 --steps 100
    python benchmarks/adapters_bench.py --only AtomParam,full --seeds 1 --lr-grid 1e-3,1e-2
    python benchmarks/adapters_bench.py --quick               # smoke test, writes nothing
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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
    SmallResNet,
    few_shot,
    load_checkpoint,
    load_digits_split,
    pretrain,
    save_checkpoint,
    shot_folds,
)
from benchmarks.harness import (
    Comparison,
    Target,
    Timing,
    environment,
    format_text_table,
    plot_ratios,
    render_section,
    set_threads,
    write_section,
)
from decomp.adapters.base import AdapterParam

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS = REPO_ROOT / "benchmarks" / "results"
CHECKPOINT = RESULTS / "adapters_pretrained.pt"
QUICK_CHECKPOINT = RESULTS / "adapters_pretrained_quick.pt"
SECTION = "adapters"
TITLE = "Adapters: few-shot fine-tuning on digits"

HEAD = "head"
FINETUNE_CLASSES = 5
ADAPTERS = (
    "AtomParam",
    "LDUParam",
    "SVDParam",
    "DCTParam",
    "TuckerParam",
    "KronParam",
    "LieParam",
    "SNELLAParam",
)
# Extra rows: (adapter, constructor arguments). SNELLA's default starts away from the pretrained
# weights (its kernel is non-zero at init), so its zero-start option gets a row of its own.
ADAPTER_VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "SNELLAParam-zero": ("SNELLAParam", {"zero_start": True})
}
LORA_RANKS = (4, 8)
# peft's LyCORIS methods at peft's default rank 8: key -> (row name, config class name).
LYCORIS_METHODS = {
    "lokr8": ("peft LoKr r=8", "LoKrConfig"),
    "loha8": ("peft LoHa r=8", "LoHaConfig"),
}
LYCORIS_RANK = 8
ANCHOR_KEY, ANCHOR = "lora8", "peft LoRA r=8"
MAX_STEP_RATIO = 1.3
MAX_MEMORY_RATIO = 1.1
ATOM_MAX_ACCURACY_DROP = 1.0
ATOM_MAX_PARAMETER_FRACTION = 0.01
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# 1e-4 to 1e-1 in half-decade steps. In a 1-seed side run on the 3e-4..3e-2 grid the choices
# spanned the whole grid (full fine-tuning 3e-4; head, atoms, LDU, DCT, Lie, LoKr, LoHa 3e-2), and
# LDUParam's validation accuracy still rose from 3e-2 to 0.1: hence a decade more on each side.
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
FOLDS = 2
# The middle of the official SNELLA scripts' per-task target sparsities (0 to 0.93).
SNELLA_TARGET_SPARSITY = 0.5


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


def prepare_peft(config_name: str, rank: int) -> Callable[[nn.Module], None]:
    """Inject peft's ``config_name`` (``"LoraConfig"``, ``"LoKrConfig"``, ...) at ``rank``."""

    def prepare(model: nn.Module) -> None:
        import peft  # imported on use: it takes seconds

        freeze_all_but_head(model)
        config = getattr(peft, config_name)(r=rank, target_modules=peft_targets(model))
        peft.inject_adapter_in_model(config, model)
        model.get_submodule(HEAD).requires_grad_(True)

    return prepare


def adapter_class(name: str) -> type[AdapterParam] | None:
    """The adapter class ``decomp.adapters.<name>``, or None while it is a placeholder."""
    candidate = getattr(decomp.adapters, name)
    is_adapter = isinstance(candidate, type) and issubclass(candidate, AdapterParam)
    return candidate if is_adapter else None


def apply_is_available() -> bool:
    """Whether ``decomp.adapters.apply`` is the real function (its placeholder is a class)."""
    return inspect.isfunction(decomp.adapters.apply)


def prepare_adapter(cls: type[AdapterParam], **config: object) -> Callable[[nn.Module], None]:
    def prepare(model: nn.Module) -> None:
        decomp.adapters.apply(model, cls, target=is_backbone_layer, train_heads=HEAD, **config)
        head = model.get_submodule(HEAD)
        frozen_head = [name for name, p in head.named_parameters() if not p.requires_grad]
        if frozen_head:
            raise RuntimeError(
                f"apply(..., train_heads={HEAD!r}) left the head frozen: {frozen_head}"
            )

    return prepare


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: ``prepare`` makes a fresh model trainable its way, in place."""

    name: str
    prepare: Callable[[nn.Module], None] | None
    ours: bool
    unavailable: str = ""


def all_methods() -> dict[str, Method]:
    """Every method, keyed by its ``--only`` name; unavailable adapters carry the reason."""
    methods = {
        "full": Method("full fine-tuning", prepare_full, ours=False),
        "head": Method("head only", freeze_all_but_head, ours=False),
    }
    for rank in LORA_RANKS:
        methods[f"lora{rank}"] = Method(
            f"peft LoRA r={rank}", prepare_peft("LoraConfig", rank), ours=False
        )
    for key, (name, config_name) in LYCORIS_METHODS.items():
        methods[key] = Method(name, prepare_peft(config_name, LYCORIS_RANK), ours=False)
    adapters = {name: (name, {}) for name in ADAPTERS} | ADAPTER_VARIANTS
    for key, (name, config) in adapters.items():
        label = name + "".join(f" ({option}={value!r})" for option, value in config.items())
        cls = adapter_class(name)
        if cls is None:
            reason = f"decomp.adapters.{name} is a placeholder"
            methods[key] = Method(label, None, ours=True, unavailable=reason)
        elif not apply_is_available():
            reason = "decomp.adapters.apply is a placeholder"
            methods[key] = Method(label, None, ours=True, unavailable=reason)
        else:
            methods[key] = Method(label, prepare_adapter(cls, **config), ours=True)
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
        (
            event
            for event in profiler.profiler.kineto_results.events()
            if event.name() == "[memory]"
        ),
        key=lambda event: event.start_ns(),
    )
    return max(itertools.accumulate((event.nbytes() for event in events), initial=0))


def step_peak_bytes(
    resident: Iterable[torch.Tensor], step: Callable[[], object], device: torch.device
) -> int:
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


def snella_allocator(
    model: nn.Module, steps: int, target_sparsity: float
) -> decomp.adapters.Allocator | None:
    """SNELLA's :class:`~decomp.adapters.Allocator` over the model's SNELLA (and SNELL) layers.

    None when the model has none. One budget update per full-batch step (``total_steps =
    steps``), no warmups: the official SNELLA scripts' ``init_warmup = final_warmup = 0`` and
    ``mask_interval = 1``, with every full-batch step an epoch. The budget decays from the layers'
    initial kept counts to ``target_sparsity`` zeroed entries at step ``steps``.
    """
    kernel_adapters = tuple(filter(None, (adapter_class("SNELLParam"), adapter_class("SNELLAParam"))))
    layers = [module for module in model.modules() if isinstance(module, kernel_adapters)]
    if not layers:
        return None
    return decomp.adapters.Allocator(layers, target_sparsity=target_sparsity, total_steps=steps)


@dataclass
class Run:
    """One fine-tuning run, scored on the set it was evaluated on (a validation fold or the test).

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
    pretrained: dict[str, torch.Tensor],
    width: int,
    train: Dataset,
    evaluate: Dataset,
    *,
    seed: int,
    steps: int,
    lr: float,
    device: torch.device,
    snella_sparsity: float,
    measure_memory: bool,
) -> Run:
    """Fine-tune a fresh copy of the pretrained model with ``method``; score it on ``evaluate``.

    ``steps`` full-batch AdamW steps on ``train`` at ``lr``, weight decay 0, in eval mode. When the
    adapted model has SNELLA layers, the Allocator of :func:`snella_allocator` runs inside every
    step: ``allocator.step()`` right after the backward, ``allocator.update_budget(t)`` right
    after the ``t``-th optimizer step (``t`` from 1 to ``steps``). Every step but the first is
    timed; with ``measure_memory`` the first step is measured (:func:`step_peak_bytes`).
    """
    torch.manual_seed(seed)
    model = SmallResNet(num_classes=FINETUNE_CLASSES, width=width)
    backbone = {key: value for key, value in pretrained.items() if key.split(".")[0] != HEAD}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or any(key.split(".")[0] != HEAD for key in missing):
        raise RuntimeError(
            f"the checkpoint does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    model.to(device).eval()  # eval mode throughout: BatchNorm keeps its pretrained statistics
    reference = logits(model, evaluate, device)
    method.prepare(model)
    model.to(device)
    deviation = (logits(model, evaluate, device) - reference).abs().max()
    init_deviation = float(deviation / reference.abs().max())
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
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
            resident = itertools.chain(
                resident, *allocator.exp_avg_importance, *allocator.exp_avg_uncertainty
            )
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
    scores = logits(model, evaluate, device)
    return Run(
        lr=lr,
        accuracy=100.0 * float((scores.argmax(dim=1) == evaluate.labels).float().mean()),
        loss=float(F.cross_entropy(scores, evaluate.labels)),
        trainable=sum(parameter.numel() for parameter in trainable),
        step_ms=step_ms,
        init_deviation=init_deviation,
        peak_bytes=peak_bytes,
    )


# --------------------------------------------------------------------------- learning-rate choice


@dataclass(frozen=True)
class LrSelection:
    """The mean validation scores of every rate of a grid, and the rate they choose."""

    grid: tuple[float, ...]
    accuracy: tuple[float, ...]  # mean validation accuracy (%) over the folds, per rate
    loss: tuple[float, ...]  # mean validation cross-entropy over the folds, per rate

    def __post_init__(self) -> None:
        if not self.grid or not len(self.grid) == len(self.accuracy) == len(self.loss):
            raise ValueError(
                "grid, accuracy and loss must have one entry per rate (at least one), got "
                f"{len(self.grid)}, {len(self.accuracy)} and {len(self.loss)}"
            )

    @property
    def chosen(self) -> float:
        """The rate of best mean validation accuracy; ties go to the lower mean validation loss.

        A NaN loss (a run that diverged) counts as infinite; a tie in both goes to the first rate.
        """

        def rank(index: int) -> tuple[float, float]:
            loss = self.loss[index]
            return self.accuracy[index], -(math.inf if math.isnan(loss) else loss)

        return self.grid[max(range(len(self.grid)), key=rank)]


def select_lr(
    method: Method,
    pretrained: dict[str, torch.Tensor],
    width: int,
    shots: Dataset,
    *,
    grid: Sequence[float],
    folds: int,
    seed: int,
    steps: int,
    device: torch.device,
    snella_sparsity: float,
) -> LrSelection:
    """Score every rate of ``grid`` by ``folds``-fold cross-validation on the few-shot set.

    For each rate and each pair of :func:`benchmarks.adapters_data.shot_folds`, a run trains on the
    fit part and is scored on the held-out part; the scores are the means over the folds. A
    one-rate grid needs no choice and runs nothing (its scores are NaN).
    """
    grid = tuple(grid)
    if len(grid) == 1:
        return LrSelection(grid, (math.nan,), (math.nan,))
    splits = shot_folds(shots, folds)
    accuracies, losses = [], []
    for lr in grid:
        runs = [
            fine_tune(
                method,
                pretrained,
                width,
                fit,
                held_out,
                seed=seed,
                steps=steps,
                lr=lr,
                device=device,
                snella_sparsity=snella_sparsity,
                measure_memory=False,
            )
            for fit, held_out in splits
        ]
        accuracies.append(statistics.fmean(run.accuracy for run in runs))
        losses.append(statistics.fmean(run.loss for run in runs))
    return LrSelection(grid, tuple(accuracies), tuple(losses))


@dataclass
class MethodResult:
    """A method's runs over the seeds, or why it has none (``status`` other than "ok").

    ``selections`` are the learning-rate choices made: one (on the first seed's shots) or one per
    seed (``--select-per-seed``).
    """

    method: Method
    status: str
    runs: list[Run] = field(default_factory=list)
    selections: list[LrSelection] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def accuracy_mean(self) -> float:
        return statistics.fmean(run.accuracy for run in self.runs)

    @property
    def accuracy_std(self) -> float:
        """Sample standard deviation over seeds (0 for a single seed)."""
        accuracies = [run.accuracy for run in self.runs]
        return statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0

    @property
    def trainable(self) -> int:
        return self.runs[0].trainable

    @property
    def step(self) -> Timing:
        return Timing.from_samples([ms for run in self.runs for ms in run.step_ms])

    @property
    def peak_bytes(self) -> int:
        return self.runs[0].peak_bytes

    @property
    def init_deviation(self) -> float:
        return max(run.init_deviation for run in self.runs)

    @property
    def lrs(self) -> list[float]:
        """The learning rate of each seed's final run."""
        return [run.lr for run in self.runs]


def run_method(
    method: Method,
    pretrained: dict[str, torch.Tensor],
    width: int,
    split: DigitsSplit,
    settings: argparse.Namespace,
) -> MethodResult:
    """``method`` over ``settings.seeds`` seeds: the learning-rate choice, then the final runs.

    The rate is chosen (:func:`select_lr`) on the first seed's shots and reused for every seed,
    or on each seed's own shots with ``settings.select_per_seed``; each final run trains on all
    of its seed's shots and is scored on the test set. The first error ends the method as a
    "failed" result.
    """
    if method.unavailable:
        print(f"{method.name}: not available ({method.unavailable})", flush=True)
        return MethodResult(method, f"not available: {method.unavailable}")
    result = MethodResult(method, "ok")
    for index, seed in enumerate(range(settings.seed, settings.seed + settings.seeds)):
        shots = few_shot(split.finetune_pool, settings.shots, seed)
        common = {
            "seed": seed,
            "steps": settings.steps,
            "device": settings.device,
            "snella_sparsity": settings.snella_sparsity,
        }
        try:
            if not result.selections or settings.select_per_seed:
                selection = select_lr(
                    method,
                    pretrained,
                    width,
                    shots,
                    grid=settings.lr_grid,
                    folds=settings.folds,
                    **common,
                )
                result.selections.append(selection)
                if len(selection.grid) > 1:
                    validation = ", ".join(
                        f"{lr:g}: {accuracy:.1f}%"
                        for lr, accuracy in zip(selection.grid, selection.accuracy)
                    )
                    print(
                        f"{method.name} seed {seed}: validation accuracy {{{validation}}} "
                        f"-> lr {selection.chosen:g}",
                        flush=True,
                    )
            run = fine_tune(
                method,
                pretrained,
                width,
                shots,
                split.finetune_test,
                lr=result.selections[-1].chosen,
                measure_memory=index == 0,
                **common,
            )
        except Exception as error:  # noqa: BLE001 - a broken adapter is reported, the rest go on
            message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            print(f"{method.name}: failed ({message})", flush=True)
            return MethodResult(method, f"failed: {message}")
        result.runs.append(run)
        print(
            f"{method.name} seed {seed}: lr {run.lr:g}, test accuracy {run.accuracy:.1f}%, "
            f"trainable {run.trainable}",
            flush=True,
        )
    return result


# --------------------------------------------------------------------------- parameter table


def architectures() -> dict[str, Callable[[], nn.Module]]:
    """Builders of the paper-style table's models, from transformers' default configs."""
    from transformers import (
        ConvNextConfig,
        ConvNextModel,
        ResNetConfig,
        ResNetModel,
        ViTConfig,
        ViTModel,
    )

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
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, SUPPORTED_LAYERS)
    ]


def adapter_parameter_count(
    cls: type[AdapterParam], model: nn.Module, *, exclude: str | None = None
) -> int:
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


@dataclass(frozen=True)
class ParameterRow:
    architecture: str
    total: int
    counts: dict[str, int | str]  # method -> count, or why there is none


def parameter_table(
    adapter_names: Sequence[str] = ADAPTERS, lora_rank: int = 8
) -> list[ParameterRow]:
    """Trainable parameters of every adapter and of peft LoRA on each architecture."""
    rows = []
    for architecture, builder in architectures().items():
        total = sum(parameter.numel() for parameter in build_on_meta(builder).parameters())
        counts: dict[str, int | str] = {
            f"peft LoRA r={lora_rank}": lora_parameter_count(build_on_meta(builder), lora_rank)
        }
        for name in adapter_names:
            cls = adapter_class(name)
            if cls is None:
                counts[name] = "not available"
                continue
            try:
                counts[name] = adapter_parameter_count(cls, build_on_meta(builder))
            except Exception as error:  # noqa: BLE001 - report a failing closed form, keep the column
                counts[name] = f"failed: {type(error).__name__}"
        rows.append(ParameterRow(architecture, total, counts))
    return rows


# --------------------------------------------------------------------------- reporting


def _count(value: int | str, total: int) -> str:
    return value if isinstance(value, str) else f"{value:,} ({100 * value / total:.2g}%)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_table(results: Sequence[MethodResult], full_trainable: int | None) -> str:
    header = (
        "Method",
        "Accuracy % (mean ± std)",
        "lr (per seed)",
        "Trainable (% of full FT)",
        "Step ms (IQR)",
        "Peak MB",
        "Init deviation",
    )
    rows = []
    for result in results:
        if not result.ok:
            rows.append((result.method.name, result.status, "-", "-", "-", "-", "-"))
            continue
        trainable = f"{result.trainable:,}"
        if full_trainable:
            trainable += f" ({100 * result.trainable / full_trainable:.3g}%)"
        step = result.step
        rows.append(
            (
                result.method.name,
                f"{result.accuracy_mean:.1f} ± {result.accuracy_std:.1f}",
                ", ".join(f"{lr:g}" for lr in result.lrs),
                trainable,
                f"{step.median_ms:.2f} ({step.iqr_ms:.2f})",
                f"{result.peak_bytes / 2**20:.2f}",
                f"{result.init_deviation:.1e}",
            )
        )
    return markdown_table(header, rows)


def selection_table(results: Sequence[MethodResult]) -> str:
    """Mean validation accuracy of every rate of the grid, per method that ran.

    The mean over the folds, and over the seeds when the rate was chosen per seed.
    """
    ran = [result for result in results if result.ok]
    grid = ran[0].selections[0].grid
    header = ("Method", *(f"val. acc. % at lr {lr:g}" for lr in grid))
    rows = []
    for result in ran:
        per_rate = zip(*(selection.accuracy for selection in result.selections))
        rows.append((result.method.name, *(f"{statistics.fmean(acc):.1f}" for acc in per_rate)))
    return markdown_table(header, rows)


@dataclass(frozen=True)
class TargetCheck:
    description: str
    measured: str
    met: bool | None


def target_checks(results: dict[str, MethodResult]) -> list[TargetCheck]:
    """The benchmark's targets, evaluated on what ran (``met`` None: its inputs did not run).

    AtomParam against full fine-tuning (accuracy and parameter share), and every adapter's step
    time and peak memory against peft LoRA r=8.
    """
    checks = []
    full, atom, anchor = results.get("full"), results.get("AtomParam"), results.get(ANCHOR_KEY)
    if full is not None and full.ok and atom is not None and atom.ok:
        drop = full.accuracy_mean - atom.accuracy_mean
        fraction = atom.trainable / full.trainable
        checks.append(
            TargetCheck(
                f"AtomParam accuracy within {ATOM_MAX_ACCURACY_DROP:g} point of full fine-tuning",
                f"{-drop:+.1f} points",
                drop <= ATOM_MAX_ACCURACY_DROP,
            )
        )
        checks.append(
            TargetCheck(
                "AtomParam trainable parameters < "
                f"{100 * ATOM_MAX_PARAMETER_FRACTION:g}% of full fine-tuning",
                f"{100 * fraction:.2f}%",
                fraction < ATOM_MAX_PARAMETER_FRACTION,
            )
        )
    else:
        checks.append(TargetCheck("AtomParam vs full fine-tuning", "not run", None))
    for result in results.values():
        if not result.method.ours:
            continue
        if not result.ok or anchor is None or not anchor.ok:
            checks.append(
                TargetCheck(f"{result.method.name} step and memory vs {ANCHOR}", "not run", None)
            )
            continue
        step_ratio = result.step.median_ms / anchor.step.median_ms
        memory_ratio = result.peak_bytes / anchor.peak_bytes
        checks.append(
            TargetCheck(
                f"{result.method.name} step time <= {MAX_STEP_RATIO:g}x {ANCHOR}",
                f"{step_ratio:.2f}x",
                step_ratio <= MAX_STEP_RATIO,
            )
        )
        checks.append(
            TargetCheck(
                f"{result.method.name} peak memory <= {MAX_MEMORY_RATIO:g}x {ANCHOR}",
                f"{memory_ratio:.2f}x",
                memory_ratio <= MAX_MEMORY_RATIO,
            )
        )
    return checks


def targets_table(checks: Sequence[TargetCheck]) -> str:
    verdict = {True: "yes", False: "**no**", None: "not run"}
    rows = [(check.description, check.measured, verdict[check.met]) for check in checks]
    return markdown_table(("Target", "Measured", "Met"), rows)


def lycoris_ratio_table(results: dict[str, MethodResult]) -> str | None:
    """Step-time and peak-memory ratios of every adapter against peft LoKr and LoHa (no target).

    None when neither LoKr nor LoHa ran, or no adapter did.
    """
    anchors = [results[key] for key in LYCORIS_METHODS if key in results and results[key].ok]
    ours = [result for result in results.values() if result.method.ours and result.ok]
    if not anchors or not ours:
        return None
    header = ["Method"]
    for anchor in anchors:
        header += [f"step / {anchor.method.name}", f"peak memory / {anchor.method.name}"]
    rows = []
    for result in ours:
        row = [result.method.name]
        for anchor in anchors:
            row += [
                f"{result.step.median_ms / anchor.step.median_ms:.2f}x",
                f"{result.peak_bytes / anchor.peak_bytes:.2f}x",
            ]
        rows.append(row)
    return markdown_table(header, rows)


def parameters_markdown(rows: Sequence[ParameterRow]) -> str:
    methods = list(rows[0].counts)
    header = ("Architecture", "Parameters", *methods)
    cells = [
        (
            row.architecture,
            f"{row.total:,}",
            *(_count(row.counts[method], row.total) for method in methods),
        )
        for row in rows
    ]
    return markdown_table(header, cells)


OURS_COLOUR, BASELINE_COLOUR = "#1565c0", "#616161"


def plot_accuracy(results: Sequence[MethodResult], path: Path, *, title: str) -> None:
    """Accuracy (mean ± std over seeds) against trainable parameters on a log x axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(8.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for result in results:
        colour = OURS_COLOUR if result.method.ours else BASELINE_COLOUR
        axes.errorbar(
            result.trainable,
            result.accuracy_mean,
            yerr=result.accuracy_std,
            fmt="o",
            color=colour,
            capsize=3,
        )
        axes.annotate(
            result.method.name,
            (result.trainable, result.accuracy_mean),
            xytext=(5, 3),
            textcoords="offset points",
            fontsize=8,
        )
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


def relative_image(image: Path, page: Path) -> str:
    """The link to ``image`` from the Markdown ``page``."""
    return os.path.relpath(image.resolve(), page.resolve().parent)


# --------------------------------------------------------------------------- command line


def _learning_rates(text: str) -> tuple[float, ...]:
    """``--lr-grid``: comma-separated finite rates > 0, at least one, no repeats."""
    try:
        rates = tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not rates or not all(math.isfinite(rate) and rate > 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"expected finite rates > 0, got {text!r}")
    if len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"expected distinct rates, got {text!r}")
    return rates


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    methods = all_methods()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pretrain", action="store_true", help="pretrain on digits 0-4, save the checkpoint, exit"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run (1 seed, 2 shots, 4 steps); writes nothing unless --out",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per method (default 3; 1 with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--shots", type=int, default=None, help="examples per class (default 10; 2 with --quick)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="full-batch steps (default 100; 4 with --quick)"
    )
    parser.add_argument(
        "--lr-grid",
        type=_learning_rates,
        default=LR_GRID,
        help="comma-separated AdamW learning rates to choose from by cross-validation on the "
        f"shots (default {','.join(f'{lr:g}' for lr in LR_GRID)}; a single rate skips the choice)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=FOLDS,
        help=f"cross-validation folds of the shots for the rate choice (default {FOLDS})",
    )
    parser.add_argument(
        "--select-per-seed",
        action="store_true",
        help="choose the rate on every seed's shots (default: once, on the first seed's shots)",
    )
    parser.add_argument(
        "--snella-sparsity",
        type=float,
        default=SNELLA_TARGET_SPARSITY,
        help=f"SNELLA Allocator's target sparsity, in [0, 1) (default {SNELLA_TARGET_SPARSITY:g})",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="threads for every library (default 2)"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device to fine-tune on (default cpu)"
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=None,
        help="pretraining epochs (default 10; 1 with --quick)",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help=f"checkpoint path (default {CHECKPOINT})"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"page to write to (default {DEFAULT_OUT}; none with --quick)",
    )
    parser.add_argument(
        "--only",
        default=",".join(methods),
        help=f"comma-separated subset of {','.join(methods)}",
    )
    parser.add_argument(
        "--no-parameter-table", action="store_true", help="skip the ResNet-50/ConvNeXt/ViT table"
    )
    arguments = parser.parse_args(argv)
    quick = arguments.quick
    defaults = (("seeds", 3, 1), ("shots", 10, 2), ("steps", 100, 4), ("pretrain_epochs", 10, 1))
    for option, full_default, quick_default in defaults:
        if getattr(arguments, option) is None:
            setattr(arguments, option, quick_default if quick else full_default)
        if getattr(arguments, option) < 1:
            flag = option.replace("_", "-")
            parser.error(f"--{flag} must be >= 1, got {getattr(arguments, option)}")
    if arguments.steps < 2:
        parser.error("--steps must be >= 2: the first step is untimed")
    if arguments.threads < 1:
        parser.error(f"--threads must be >= 1, got {arguments.threads}")
    if len(arguments.lr_grid) > 1 and not 2 <= arguments.folds <= arguments.shots:
        parser.error(
            f"--folds must be in [2, --shots={arguments.shots}] to choose among "
            f"{len(arguments.lr_grid)} rates, got {arguments.folds}"
        )
    if not 0.0 <= arguments.snella_sparsity < 1.0:
        parser.error(f"--snella-sparsity must be in [0, 1), got {arguments.snella_sparsity}")
    selected = [name.strip() for name in arguments.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(methods))
    if unknown or not selected:
        parser.error(f"--only must name some of {list(methods)}, got {arguments.only!r}")
    arguments.methods = {name: methods[name] for name in selected}
    arguments.device = torch.device(arguments.device)
    if arguments.checkpoint is None:
        arguments.checkpoint = QUICK_CHECKPOINT if quick else CHECKPOINT
    arguments.out = arguments.out if arguments.out is not None or quick else DEFAULT_OUT
    return arguments


def pretrained_model(arguments: argparse.Namespace, split: DigitsSplit) -> tuple[SmallResNet, dict]:
    if arguments.pretrain or not arguments.checkpoint.exists():
        print(f"pretraining on digits 0-4 for {arguments.pretrain_epochs} epochs ...", flush=True)
        start = time.perf_counter()
        model, test_accuracy = pretrain(
            split, seed=arguments.seed, epochs=arguments.pretrain_epochs
        )
        metadata = {
            "test_accuracy": test_accuracy,
            "epochs": arguments.pretrain_epochs,
            "seed": arguments.seed,
        }
        save_checkpoint(model, arguments.checkpoint, **metadata)
        print(
            f"pretrained in {time.perf_counter() - start:.0f} s: test accuracy "
            f"{test_accuracy:.1f}% on digits 0-4; wrote {arguments.checkpoint}",
            flush=True,
        )
        return model, metadata
    return load_checkpoint(arguments.checkpoint)


def run_notes(
    arguments: argparse.Namespace,
    split: DigitsSplit,
    metadata: dict,
    width: int,
    *,
    with_parameter_table: bool,
) -> list[str]:
    """The section's notes: the setup of this run, stated from the values it used."""
    import peft

    lora_defaults = peft.LoraConfig()
    last_seed = arguments.seed + arguments.seeds - 1
    pretrain_accuracy = float(metadata.get("test_accuracy", float("nan")))
    if arguments.device.type == "cuda":
        memory = "torch.cuda.max_memory_allocated over the first step."
    else:
        memory = (
            "parameters + buffers (+ SNELLA's Allocator state) + the peak net bytes allocated "
            "during the first step (torch.profiler)."
        )
    grid = ", ".join(f"{lr:g}" for lr in arguments.lr_grid)
    if len(arguments.lr_grid) > 1:
        held_out = arguments.shots // arguments.folds
        if arguments.select_per_seed:
            when = "chosen per method and seed, on that seed's shots,"
        else:
            when = (
                f"chosen once per method, on the first seed's ({arguments.seed}) shots, and "
                "reused for every seed,"
            )
        lr_note = (
            f"Learning rate: {when} from {{{grid}}} by {arguments.folds}-fold cross-validation "
            f"(each fold: train on the rest, about {arguments.shots - held_out} per class, with "
            f"the same steps and seed; score on the held-out {held_out} per class); best mean "
            "validation accuracy, ties to the lower validation cross-entropy (a diverged run's "
            "NaN loss counts as infinite); the final runs train on all the shots at that rate. "
            "The test set plays no part in the choice. Every method (baselines included) is "
            "chosen this way; the *lr* column lists the rate each seed's final run used."
        )
    else:
        lr_note = f"Learning rate: {grid} for every method (a one-rate grid: no choice made)."
    lycoris_defaults = "; ".join(
        f"{name} (alpha={config.alpha}, rank_dropout={config.rank_dropout}, "
        f"use_effective_conv2d={config.use_effective_conv2d})"
        for name, config in (
            (name, getattr(peft, config_name)(r=LYCORIS_RANK))
            for name, config_name in LYCORIS_METHODS.values()
        )
    )
    snella = adapter_class("SNELLAParam")
    snella_notes = []
    if snella is not None:
        snella_notes.append(
            "SNELLA (both rows): the loop calls its Allocator (importance EMAs of |p * grad| "
            "after every backward, the cubic budget schedule and cross-layer split after every "
            f"step, total_steps={arguments.steps}, no warmups) from the default initial sparsity "
            f"{snella.default_sparsity:g} down to the target sparsity "
            f"{arguments.snella_sparsity:g}; both calls are in the timed step."
        )
    notes = (
        ["QUICK MODE: a smoke test; these are not the benchmark's figures."]
        if arguments.quick
        else []
    )
    notes += [
        (
            f"Task: {arguments.shots} examples per class of digits 5-9 ({5 * arguments.shots} "
            f"images, full batch), {arguments.steps} AdamW steps, weight decay 0, seeds "
            f"{arguments.seed}..{last_seed}; test set {len(split.finetune_test)} images. "
            f"Pretraining: {metadata.get('epochs')} epochs, {pretrain_accuracy:.1f}% on held-out "
            "digits 0-4."
        ),
        lr_note,
        (
            f"Every method trains the new 5-way head ({FINETUNE_CLASSES * (2 * width + 1)} "
            "parameters, included in its trainable count); BatchNorm runs in eval mode (pretrained "
            "statistics) and its affine parameters train only under full fine-tuning."
        ),
        (
            f"peft LoRA: peft defaults except r (lora_alpha={lora_defaults.lora_alpha}, "
            f"lora_dropout={lora_defaults.lora_dropout}); {lycoris_defaults}: peft's defaults. "
            "All on every conv and linear but the head and the depthwise conv: peft's LoRA "
            "requires r % groups == 0; peft's LoKr and LoHa do accept the depthwise conv but are "
            "kept on LoRA's layers, so the peft rows compare the same layers. Our adapters also "
            "adapt the depthwise conv."
        ),
        *snella_notes,
        (
            "Step time: median over every step but each run's first, final runs of all seeds "
            f"pooled. Peak memory: {memory}"
        ),
        (
            "Init deviation: max |logits at init - pretrained logits| / max |pretrained logits| "
            "on the test set (0 for methods that start at the identity; SNELLA's default does "
            "not)."
        ),
    ]
    if with_parameter_table:
        notes.append(
            "Parameter table: transformers' ResNetConfig(), ConvNextConfig() and ViTConfig() "
            "defaults built on the meta device (ViT without the pooler); each adapter's "
            "closed-form trainable_count at its defaults, summed over every conv and linear "
            "layer; peft LoRA r=8 counted by peft on every ungrouped conv and linear layer."
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    library_threads = set_threads(arguments.threads)
    split = load_digits_split()
    model, metadata = pretrained_model(arguments, split)
    if arguments.pretrain:
        return 0
    pretrained = {key: value.clone() for key, value in model.state_dict().items()}
    results = {
        key: run_method(method, pretrained, model.width, split, arguments)
        for key, method in arguments.methods.items()
    }
    ran = [result for result in results.values() if result.ok]
    full = results.get("full")
    full_trainable = full.trainable if full is not None and full.ok else None
    accuracy_markdown = accuracy_table(list(results.values()), full_trainable)
    selection_markdown = selection_table(ran) if ran and len(arguments.lr_grid) > 1 else None
    checks = target_checks(results)
    lycoris_markdown = lycoris_ratio_table(results)
    anchor = results.get(ANCHOR_KEY)
    comparisons = []
    if anchor is not None and anchor.ok:
        comparisons = [
            Comparison(
                f"{result.method.name} step",
                result.step,
                ANCHOR,
                anchor.step,
                Target.ratio(MAX_STEP_RATIO) if result.method.ours else None,
            )
            for key, result in results.items()
            if result.ok and key != ANCHOR_KEY
        ]
    parameter_rows = [] if arguments.no_parameter_table else parameter_table()

    notes = run_notes(
        arguments, split, metadata, model.width, with_parameter_table=bool(parameter_rows)
    )

    title = f"{TITLE} (quick smoke test)" if arguments.quick else TITLE
    env = environment(library_threads)
    print(f"\n{title}\n{env.describe()}\n{env.command}\n")
    print(accuracy_markdown, "\n")
    if selection_markdown:
        print(selection_markdown, "\n")
    print(targets_table(checks), "\n")
    if lycoris_markdown:
        print(lycoris_markdown, "\n")
    if comparisons:
        print(format_text_table(comparisons), "\n")
    if parameter_rows:
        print(parameters_markdown(parameter_rows), "\n")
    for note in notes:
        print(f"- {note}")

    if arguments.out is None:
        return 0
    out = Path(arguments.out)
    time_plot = out.parent / "img" / "adapters_bench_time.png"
    accuracy_plot = out.parent / "img" / "adapters_bench_accuracy.png"
    if comparisons:
        plot_ratios(comparisons, time_plot, title=f"Adapters: step time against {ANCHOR}")
    time_image = relative_image(time_plot, out) if comparisons else None
    body = [render_section(comparisons, title=title, env=env, image=time_image)]
    body += ["", "### Accuracy, parameters, time and memory", "", accuracy_markdown]
    if ran:
        plot_accuracy(
            ran, accuracy_plot, title="Few-shot digits 5-9: accuracy vs trainable parameters"
        )
        image = relative_image(accuracy_plot, out)
        body += ["", f"![accuracy against trainable parameters]({image})"]
    if selection_markdown:
        body += [
            "",
            "### Learning-rate choice (mean accuracy on the validation folds of the shots)",
            "",
            selection_markdown,
        ]
    body += ["", "### Targets", "", targets_table(checks)]
    if lycoris_markdown:
        body += [
            "",
            "### Step time and peak memory against peft LoKr and LoHa (information, no target)",
            "",
            lycoris_markdown,
        ]
    if parameter_rows:
        body += [
            "",
            "### Trainable parameters on standard architectures",
            "",
            parameters_markdown(parameter_rows),
        ]
    body += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    write_section(out, SECTION, "\n".join(body))
    print(f"\nwrote section {SECTION!r} of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
