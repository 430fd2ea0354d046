"""Few-shot fine-tuning with every registered adapter against peft and full fine-tuning.

The task (:mod:`benchmarks.adapters_data`): a small ResNet-style CNN pretrained on digits 0-4 is
fine-tuned on a few examples per class of digits 5-9 (a new 5-way head) and scored on a fixed
held-out test set. One case per method of :func:`all_methods` (full fine-tuning, head only, peft
LoRA/LoKr/LoHa, and every class of ``decomp.adapters.registered()`` at its defaults, through
``apply(model, cls, target=<every layer but the head>, train_heads="head")``), plus
``parameters``: each adapter's trainable count on standard architectures. Every method is trained
the same way (AdamW, full batch, weight decay 0, BatchNorm in eval mode) at a learning rate chosen
by cross-validation on the first seed's shots (:func:`select_lr`), never on the test set. The
protocol, in full, is on the page; targets are in :mod:`benchmarks.targets`.

Usage::

    python benchmarks/adapters_bench.py --threads 2
    python benchmarks/adapters_bench.py --only 'AtomParam,full' --quick
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
from benchmarks.adapters_data import Dataset, few_shot, fine_tuning_model, load_digits_split, shot_folds
from benchmarks.harness import Area, Case, Check, Comparison, Context, Part, Timing, cases, main
from benchmarks.targets import target
from decomp.adapters.base import AdapterParam

HEAD = "head"
FINETUNE_CLASSES = 5
# Extra rows: (adapter, constructor arguments). SNELLA's default starts away from the pretrained
# weights (its kernel is non-zero at init), so its zero-start option gets a row of its own.
ADAPTER_VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "SNELLAParam-zero": ("SNELLAParam", {"zero_start": True})
}
LORA_RANKS = (4, 8)
# peft's LyCORIS methods at peft's default rank 8: key -> (row name, config class name).
LYCORIS_METHODS = {"lokr8": ("peft LoKr r=8", "LoKrConfig"), "loha8": ("peft LoHa r=8", "LoHaConfig")}
LYCORIS_RANK = 8
ANCHOR_KEY, ANCHOR = "lora8", "peft LoRA r=8"
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ACCURACY = "Accuracy, parameters, time and memory"
SELECTION = "Learning-rate choice (mean accuracy on the validation folds of the shots)"


@dataclass(frozen=True)
class Settings:
    """The fine-tuning protocol every method shares."""

    seeds: int = 3
    shots: int = 10
    steps: int = 100
    # 1e-4 to 1e-1 in half-decade steps. In a 1-seed side run on the 3e-4..3e-2 grid the choices
    # spanned the whole grid, and LDUParam's validation accuracy still rose from 3e-2 to 0.1.
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    folds: int = 2
    # The middle of the official SNELLA scripts' per-task target sparsities (0 to 0.93).
    snella_sparsity: float = 0.5


QUICK = Settings(seeds=1, shots=2, steps=4, lr_grid=(1e-3, 1e-2))


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


def prepare_peft(config_name: str, rank: int) -> Callable[[nn.Module], None]:
    """Inject peft's ``config_name`` (``"LoraConfig"``, ``"LoKrConfig"``, ...) at ``rank``."""

    def prepare(model: nn.Module) -> None:
        import peft  # imported on use: it takes seconds

        freeze_all_but_head(model)
        config = getattr(peft, config_name)(r=rank, target_modules=peft_targets(model))
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
    """One fine-tuning method: ``prepare`` makes a fresh model trainable its way, in place."""

    name: str
    prepare: Callable[[nn.Module], None] | None
    ours: bool
    unavailable: str = ""


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: ``prepare`` makes a fresh model trainable its way, in place."""

    name: str
    prepare: Callable[[nn.Module], None]
    ours: bool


def all_methods() -> dict[str, Method]:
    """Every method by case name: the baselines, then every registered adapter class."""
    methods = {
        "full": Method("full fine-tuning", prepare_full, ours=False),
        "head": Method("head only", freeze_all_but_head, ours=False),
    }
    for rank in LORA_RANKS:
        methods[f"lora{rank}"] = Method(f"peft LoRA r={rank}", prepare_peft("LoraConfig", rank), ours=False)
    for key, (name, config_name) in LYCORIS_METHODS.items():
        methods[key] = Method(name, prepare_peft(config_name, LYCORIS_RANK), ours=False)
    adapters = {name: (name, {}) for name in decomp.adapters.registered()} | ADAPTER_VARIANTS
    for key, (name, config) in adapters.items():
        label = name + "".join(f" ({option}={value!r})" for option, value in config.items())
        methods[key] = Method(label, prepare_adapter(decomp.adapters.registered()[name], **config), ours=True)
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
    quick: bool,
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
    timed; with ``measure_memory`` the first step is measured (:func:`step_peak_bytes`). ``quick``
    picks the quick pretrained network.
    """
    # Eval mode throughout: BatchNorm keeps its pretrained statistics.
    model = fine_tuning_model(quick, FINETUNE_CLASSES, seed).to(device).eval()
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
    quick: bool,
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
                quick,
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


def run_method(method: Method, settings: Settings, context: Context) -> list[tuple[Run, LrSelection]]:
    """``method`` over the seeds: the rate is chosen (:func:`select_lr`) once, on the first seed's
    shots, and reused; each seed's final run trains on all of its shots and is scored on the test
    set, the first one measuring the peak memory of a step."""
    split = load_digits_split()
    common = {"steps": settings.steps, "device": context.device, "snella_sparsity": settings.snella_sparsity}
    runs: list[tuple[Run, LrSelection]] = []
    for seed in range(settings.seeds):
        shots = few_shot(split.finetune_pool, settings.shots, seed)
        if not runs:
            selection = select_lr(
                method, context.quick, shots, grid=settings.lr_grid, folds=settings.folds, seed=seed, **common
            )
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


def measure_method(key: str, context: Context) -> Part:
    """One method's row of the accuracy and learning-rate tables; its figures in ``data``."""
    method, protocol = all_methods()[key], settings(context)
    selection_header = ("Method", *(f"val. acc. % at lr {lr:g}" for lr in protocol.lr_grid))
    part = Part(facts=[
        f"fine-tuning: {protocol.shots} shots per class, {protocol.steps} steps, seeds 0..{protocol.seeds - 1}, "
        f"lr grid {', '.join(f'{lr:g}' for lr in protocol.lr_grid)} by {protocol.folds}-fold cross-validation.",
    ])  # fmt: skip
    try:
        runs = run_method(method, protocol, context)
    except Exception as error:  # noqa: BLE001 - a broken adapter is a row; the rest go on
        status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        part.table(ACCURACY, ACCURACY_HEADER, [(method.name, status, *("-",) * 5)])
        return part
    accuracies = [run.accuracy for run, _ in runs]
    mean, spread = statistics.fmean(accuracies), statistics.stdev(accuracies) if len(runs) > 1 else 0.0
    step = Timing.from_samples([ms for run, _ in runs for ms in run.step_ms])
    first, selection = runs[0]
    part.table(ACCURACY, ACCURACY_HEADER, [(
        method.name, f"{mean:.1f} ± {spread:.1f}", ", ".join(f"{run.lr:g}" for run, _ in runs),
        f"{first.trainable:,}",
        f"{step.median_ms:.2f} ({step.iqr_ms:.2f})", f"{first.peak_bytes / 2**20:.2f}",
        f"{max(run.init_deviation for run, _ in runs):.1e}",
    )])  # fmt: skip
    if len(selection.grid) > 1:
        part.table(SELECTION, selection_header, [(method.name, *(f"{a:.1f}" for a in selection.accuracy))])
    part.data = {
        "name": method.name, "ours": method.ours, "accuracy": mean, "accuracy_std": spread,
        "trainable": first.trainable, "step": asdict(step), "peak_bytes": first.peak_bytes,
    }  # fmt: skip
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


# --------------------------------------------------------------------------- the area


def _step(data: dict) -> Timing:
    return Timing(**data["step"])


def summary(parts: dict[str, Part]) -> Part:
    """Step time against peft LoRA r=8 (a target for ours), peak memory, AtomParam's targets and
    the ratios against LoKr and LoHa (information)."""
    ran = {key: part.data for key, part in parts.items() if part.data}
    result = Part()
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
    return result


def plot(parts: dict[str, Part]) -> dict[str, Callable[[Path], None]]:
    """Accuracy against trainable parameters, for the methods that ran."""
    ran = [part.data for part in parts.values() if part.data]
    title = "Few-shot digits 5-9: accuracy vs trainable"
    return {"accuracy": functools.partial(plot_accuracy, ran, title=title)} if ran else {}


AREA = Area(
    section="adapters",
    title="Adapters: few-shot fine-tuning on digits",
    cases=(*cases(measure_method, all_methods()), Case("parameters", measure_parameters)),
    summary=summary,
    plot=plot,
)

if __name__ == "__main__":
    sys.exit(main(AREA))
