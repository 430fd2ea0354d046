"""Few-shot fine-tuning with every adapter of ``decomp.adapters`` against peft LoRA and full fine-tuning.

The task (:mod:`benchmarks.adapters_data`): a small ResNet-style CNN pretrained on sklearn's digits
0-4 is fine-tuned on ``--shots`` examples per class of digits 5-9 (a new 5-way head) and scored on
a fixed held-out test set of 5-9. Methods, all trained the same way (AdamW at ``--lr``, full-batch,
``--steps`` steps, BatchNorm statistics frozen in eval mode; the new head is always trained):

* full fine-tuning (its pretrained weights at the lower ``--full-lr``: at the adapters' rate it
  wrecks the features on a few dozen images and would make an easy baseline); head only;
* peft LoRA r=4 and r=8 (``inject_adapter_in_model``, peft's other defaults) on every conv and
  linear layer except the head and the depthwise conv (peft requires ``r % groups == 0`` and
  cannot merge grouped convs);
* every adapter of ``decomp.adapters`` with its defaults (SNELLA once more with
  ``zero_start=True``; its ``Allocator`` is not called, so it keeps its default sparsity), through
  ``decomp.adapters.apply(model, XParam, target=<every layer but the head>, train_heads="head")``.
  An adapter (or ``apply``) that is still a placeholder is reported as "not available"; one that
  raises is reported as "failed" with the error. No row is ever filled in by other means.

Per method: accuracy mean ± std over ``--seeds`` seeds (a seed fixes the few-shot draw, the new
head and the adapter's random init), trainable parameters, median step time (forward, backward and
optimizer step, every step but each run's first), peak memory of one training step, and the
largest relative deviation of the logits at init from the pretrained model's (0 for a method that
starts at the identity).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the first training step (after a
peak reset). On CPU, the bytes of the model's parameters and buffers plus the peak of the net bytes
the CPU allocator hands out during the first training step, read from ``torch.profiler`` memory
events (``profile_memory=True``); the first step is used because it allocates the gradients and
optimizer state, so both definitions count model, gradients, optimizer state and activations.
The process RSS is not used: its high-water mark cannot be reset between methods.

Then a paper-style table: trainable parameters of every adapter (its closed-form
``trainable_count`` summed over the layers ``apply`` targets by default) and of peft LoRA r=8 on
ResNet-50, ConvNeXt-T and ViT-B/16 built from transformers' default configs on the meta device
(no weights allocated, nothing downloaded).

Targets (issue 4): AtomParam within 1 point of full fine-tuning with under 1% of its trainable
parameters; every adapter's step time <= 1.3x and peak memory <= 1.1x peft LoRA r=8's. Misses are
reported as measured; the script exits 0 (it is a report, not a test).

Usage::

    python benchmarks/adapters_bench.py --pretrain            # write the checkpoint (about 1 min)
    python benchmarks/adapters_bench.py --threads 2 --seeds 3 --shots 10 --steps 100
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):
    # Run as a file: make the repository root importable, as under ``python -m benchmarks.adapters_bench``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

import decomp.adapters
from benchmarks.adapters_data import (
    Dataset,
    DigitsSplit,
    SmallResNet,
    accuracy,
    few_shot,
    load_checkpoint,
    load_digits_split,
    pretrain,
    save_checkpoint,
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
ADAPTERS = ("AtomParam", "LDUParam", "SVDParam", "DCTParam", "TuckerParam", "KronParam", "LieParam", "SNELLA")
# Extra rows: (adapter, constructor arguments). SNELLA's default starts away from the pretrained
# weights (its kernel is non-zero at init), so its zero-start option gets a row of its own.
ADAPTER_VARIANTS: dict[str, tuple[str, dict[str, object]]] = {"SNELLA-zero": ("SNELLA", {"zero_start": True})}
LORA_RANKS = (4, 8)
ANCHOR = "peft LoRA r=8"
MAX_STEP_RATIO = 1.3
MAX_MEMORY_RATIO = 1.1
ATOM_MAX_ACCURACY_DROP = 1.0
ATOM_MAX_PARAMETER_FRACTION = 0.01
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- methods


def is_backbone_layer(name: str, module: nn.Module) -> bool:
    """``apply``'s target: every supported layer except the new head."""
    return isinstance(module, SUPPORTED_LAYERS) and name.split(".")[0] != HEAD


def lora_targets(model: nn.Module) -> list[str]:
    """Qualified names of the layers peft LoRA adapts: backbone convs and linears, no grouped conv."""
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


def prepare_lora(rank: int) -> Callable[[nn.Module], None]:
    def prepare(model: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model  # imported on use: it takes seconds

        freeze_all_but_head(model)
        inject_adapter_in_model(LoraConfig(r=rank, target_modules=lora_targets(model)), model)
        model.get_submodule(HEAD).requires_grad_(True)

    return prepare


def adapter_class(name: str) -> type[AdapterParam] | None:
    """The adapter class ``decomp.adapters.<name>``, or None while it is a placeholder."""
    candidate = getattr(decomp.adapters, name)
    return candidate if isinstance(candidate, type) and issubclass(candidate, AdapterParam) else None


def apply_is_available() -> bool:
    """Whether ``decomp.adapters.apply`` is the real function (its placeholder is a class)."""
    return inspect.isfunction(decomp.adapters.apply)


def prepare_adapter(cls: type[AdapterParam], **config: object) -> Callable[[nn.Module], None]:
    def prepare(model: nn.Module) -> None:
        decomp.adapters.apply(model, cls, target=is_backbone_layer, train_heads=HEAD, **config)
        frozen_head = [name for name, p in model.get_submodule(HEAD).named_parameters() if not p.requires_grad]
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
    full_backbone: bool = False  # trains the pretrained weights themselves: gets --full-lr


def all_methods() -> dict[str, Method]:
    """Every method, keyed by its ``--only`` name; unavailable adapters carry the reason."""
    methods = {
        "full": Method("full fine-tuning", prepare_full, ours=False, full_backbone=True),
        "head": Method("head only", freeze_all_but_head, ours=False),
    }
    for rank in LORA_RANKS:
        methods[f"lora{rank}"] = Method(f"peft LoRA r={rank}", prepare_lora(rank), ours=False)
    adapters = {name: (name, {}) for name in ADAPTERS} | ADAPTER_VARIANTS
    for key, (name, config) in adapters.items():
        label = name + "".join(f" ({option}={value!r})" for option, value in config.items())
        cls = adapter_class(name)
        if cls is None:
            methods[key] = Method(label, None, ours=True, unavailable=f"decomp.adapters.{name} is a placeholder")
        elif not apply_is_available():
            methods[key] = Method(label, None, ours=True, unavailable="decomp.adapters.apply is a placeholder")
        else:
            methods[key] = Method(label, prepare_adapter(cls, **config), ours=True)
    return methods


# --------------------------------------------------------------------------- one fine-tuning run


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    storages = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def profiled_peak_bytes(step: Callable[[], object]) -> int:
    """Peak of the net bytes the CPU allocator hands out while ``step`` runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted(
        (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    return max(itertools.accumulate((event.nbytes() for event in events), initial=0))


def step_peak_bytes(model: nn.Module, step: Callable[[], object], device: torch.device) -> int:
    """Peak memory of one training ``step`` (see the module docstring for the definition)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resident_bytes(model) + profiled_peak_bytes(step)


@torch.no_grad()
def logits(model: nn.Module, data: Dataset, device: torch.device) -> torch.Tensor:
    return model(data.images.to(device)).float().cpu()


@dataclass
class Run:
    accuracy: float
    trainable: int
    step_ms: list[float]
    init_deviation: float
    peak_bytes: int | None


def fine_tune(
    method: Method,
    pretrained: dict[str, torch.Tensor],
    width: int,
    split: DigitsSplit,
    *,
    shots: int,
    seed: int,
    steps: int,
    lr: float,
    backbone_lr: float | None,
    device: torch.device,
    measure_memory: bool,
) -> Run:
    """Fine-tune a fresh copy of the pretrained model with ``method``; score it on the test set."""
    torch.manual_seed(seed)
    model = SmallResNet(num_classes=FINETUNE_CLASSES, width=width)
    backbone = {key: value for key, value in pretrained.items() if key.split(".")[0] != HEAD}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or any(key.split(".")[0] != HEAD for key in missing):
        raise RuntimeError(f"the checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    model.to(device).eval()  # eval mode throughout: BatchNorm keeps its pretrained statistics
    reference = logits(model, split.finetune_test, device)
    method.prepare(model)
    model.to(device)
    deviation = (logits(model, split.finetune_test, device) - reference).abs().max()
    init_deviation = float(deviation / reference.abs().max())
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if backbone_lr is None:
        groups = [{"params": trainable}]
    else:
        head = set(model.get_submodule(HEAD).parameters())
        groups = [
            {"params": [p for p in trainable if p not in head], "lr": backbone_lr},
            {"params": [p for p in trainable if p in head]},
        ]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    train = few_shot(split.finetune_pool, shots, seed)
    images, labels = train.images.to(device), train.labels.to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    peak_bytes = step_peak_bytes(model, step, device) if measure_memory else None
    if not measure_memory:
        step()  # the first step allocates gradients and optimizer state: untimed, like the profiled one
    step_ms = []
    for _ in range(steps - 1):
        sync()
        start = time.perf_counter()
        step()
        sync()
        step_ms.append((time.perf_counter() - start) * 1e3)
    return Run(
        accuracy=accuracy(model, split.finetune_test),
        trainable=sum(parameter.numel() for parameter in trainable),
        step_ms=step_ms,
        init_deviation=init_deviation,
        peak_bytes=peak_bytes,
    )


@dataclass
class MethodResult:
    """A method's runs over the seeds, or why it has none (``status`` other than "ok")."""

    method: Method
    status: str
    runs: list[Run] = field(default_factory=list)

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


def run_method(
    method: Method,
    pretrained: dict[str, torch.Tensor],
    width: int,
    split: DigitsSplit,
    settings: argparse.Namespace,
) -> MethodResult:
    """``method`` over ``settings.seeds`` seeds; the first error ends it as a "failed" result."""
    if method.unavailable:
        print(f"{method.name}: not available ({method.unavailable})", flush=True)
        return MethodResult(method, f"not available: {method.unavailable}")
    result = MethodResult(method, "ok")
    for index, seed in enumerate(range(settings.seed, settings.seed + settings.seeds)):
        try:
            run = fine_tune(
                method,
                pretrained,
                width,
                split,
                shots=settings.shots,
                seed=seed,
                steps=settings.steps,
                lr=settings.lr,
                backbone_lr=settings.full_lr if method.full_backbone else None,
                device=settings.device,
                measure_memory=index == 0,
            )
        except Exception as error:  # a colleague's adapter may still be broken: report it, go on
            message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            print(f"{method.name}: failed ({message})", flush=True)
            return MethodResult(method, f"failed: {message}")
        result.runs.append(run)
        print(f"{method.name} seed {seed}: accuracy {run.accuracy:.1f}%, trainable {run.trainable}", flush=True)
    return result


# --------------------------------------------------------------------------- paper-style parameter table


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
    """The layers ``apply`` targets by default: every conv and linear layer."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SUPPORTED_LAYERS)]


def adapter_parameter_count(cls: type[AdapterParam], model: nn.Module, *, exclude: str | None = None) -> int:
    """Sum of ``cls.trainable_count(weight shape)`` (default config) over ``model``'s supported layers."""
    return sum(
        cls.trainable_count(tuple(module.weight.shape))
        for name, module in supported_layers(model)
        if exclude is None or name.split(".")[0] != exclude
    )


def lora_parameter_count(model: nn.Module, rank: int, *, exclude: str | None = None) -> int:
    """peft LoRA's trainable parameters on ``model`` (every ungrouped conv and linear), counted by peft."""
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


def parameter_table(adapter_names: Sequence[str] = ADAPTERS, lora_rank: int = 8) -> list[ParameterRow]:
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
            except Exception as error:  # report a failing closed form rather than hide the column
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
        "Trainable (% of full FT)",
        "Step ms (IQR)",
        "Peak MB",
        "Init deviation",
    )
    rows = []
    for result in results:
        if not result.ok:
            rows.append((result.method.name, result.status, "-", "-", "-", "-"))
            continue
        trainable = f"{result.trainable:,}"
        if full_trainable:
            trainable += f" ({100 * result.trainable / full_trainable:.3g}%)"
        step = result.step
        rows.append(
            (
                result.method.name,
                f"{result.accuracy_mean:.1f} ± {result.accuracy_std:.1f}",
                trainable,
                f"{step.median_ms:.2f} ({step.iqr_ms:.2f})",
                f"{result.peak_bytes / 2**20:.2f}",
                f"{result.init_deviation:.1e}",
            )
        )
    return markdown_table(header, rows)


@dataclass(frozen=True)
class TargetCheck:
    description: str
    measured: str
    met: bool | None


def target_checks(results: dict[str, MethodResult]) -> list[TargetCheck]:
    """The issue's targets, evaluated on what ran; a target whose inputs did not run is unknown (None)."""
    checks = []
    full, atom, anchor = results.get("full"), results.get("AtomParam"), results.get("lora8")
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
                f"AtomParam trainable parameters < {100 * ATOM_MAX_PARAMETER_FRACTION:g}% of full fine-tuning",
                f"{100 * fraction:.2f}%",
                fraction < ATOM_MAX_PARAMETER_FRACTION,
            )
        )
    else:
        checks.append(TargetCheck("AtomParam vs full fine-tuning", "not run", None))
    for key, result in results.items():
        if not result.method.ours:
            continue
        if not result.ok or anchor is None or not anchor.ok:
            checks.append(TargetCheck(f"{result.method.name} step and memory vs {ANCHOR}", "not run", None))
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


def parameters_markdown(rows: Sequence[ParameterRow]) -> str:
    methods = list(rows[0].counts)
    header = ("Architecture", "Parameters", *methods)
    cells = [
        (row.architecture, f"{row.total:,}", *(_count(row.counts[method], row.total) for method in methods))
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
            result.trainable, result.accuracy_mean, yerr=result.accuracy_std, fmt="o", color=colour, capsize=3
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
            Line2D([], [], color=BASELINE_COLOUR, marker="o", linestyle="", label="full, head only, peft LoRA"),
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


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    methods = all_methods()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain", action="store_true", help="pretrain on digits 0-4, save the checkpoint, exit")
    parser.add_argument(
        "--quick", action="store_true", help="tiny run (1 seed, 2 shots, 4 steps); writes nothing unless --out"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--shots", type=int, default=None, help="examples per class (default 10; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="full-batch steps (default 100; 4 with --quick)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument(
        "--full-lr",
        type=float,
        default=3e-4,
        help="learning rate of the pretrained weights under full fine-tuning (default 3e-4; its head gets --lr)",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for every library (default 2)")
    parser.add_argument("--device", default="cpu", help="torch device to fine-tune on (default cpu)")
    parser.add_argument(
        "--pretrain-epochs", type=int, default=None, help="pretraining epochs (default 10; 1 with --quick)"
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help=f"checkpoint path (default {CHECKPOINT})")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"page to write to (default {DEFAULT_OUT}; none with --quick)"
    )
    parser.add_argument("--only", default=",".join(methods), help=f"comma-separated subset of {','.join(methods)}")
    parser.add_argument("--no-parameter-table", action="store_true", help="skip the ResNet-50/ConvNeXt/ViT table")
    arguments = parser.parse_args(argv)
    quick = arguments.quick
    defaults = (("seeds", 3, 1), ("shots", 10, 2), ("steps", 100, 4), ("pretrain_epochs", 10, 1))
    for option, full_default, quick_default in defaults:
        if getattr(arguments, option) is None:
            setattr(arguments, option, quick_default if quick else full_default)
        if getattr(arguments, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(arguments, option)}")
    if arguments.steps < 2:
        parser.error("--steps must be >= 2: the first step is untimed")
    if arguments.threads < 1:
        parser.error(f"--threads must be >= 1, got {arguments.threads}")
    for option in ("lr", "full_lr"):
        value = getattr(arguments, option)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{option.replace('_', '-')} must be a finite number > 0, got {value}")
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
        model, test_accuracy = pretrain(split, seed=arguments.seed, epochs=arguments.pretrain_epochs)
        metadata = {"test_accuracy": test_accuracy, "epochs": arguments.pretrain_epochs, "seed": arguments.seed}
        save_checkpoint(model, arguments.checkpoint, **metadata)
        print(
            f"pretrained in {time.perf_counter() - start:.0f} s: test accuracy {test_accuracy:.1f}% "
            f"on digits 0-4; wrote {arguments.checkpoint}",
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
    from peft import LoraConfig

    lora_defaults = LoraConfig()
    last_seed = arguments.seed + arguments.seeds - 1
    pretrain_accuracy = float(metadata.get("test_accuracy", float("nan")))
    if arguments.device.type == "cuda":
        memory = "torch.cuda.max_memory_allocated over the first step."
    else:
        memory = "parameters + buffers + the peak net bytes allocated during the first step (torch.profiler)."
    notes = ["QUICK MODE: a smoke test; these are not the benchmark's figures."] if arguments.quick else []
    notes += [
        f"Task: {arguments.shots} examples per class of digits 5-9 ({5 * arguments.shots} images, full batch), "
        f"{arguments.steps} AdamW steps at lr {arguments.lr:g} (full fine-tuning: {arguments.full_lr:g} on the "
        f"pretrained weights), weight decay 0, seeds {arguments.seed}..{last_seed}; test set "
        f"{len(split.finetune_test)} images. Pretraining: {metadata.get('epochs')} epochs, "
        f"{pretrain_accuracy:.1f}% on held-out digits 0-4.",
        f"Every method trains the new 5-way head ({FINETUNE_CLASSES * (2 * width + 1)} parameters, included in "
        "its trainable count); BatchNorm runs in eval mode (pretrained statistics) and its affine parameters "
        "train only under full fine-tuning.",
        f"peft LoRA: peft defaults except r (lora_alpha={lora_defaults.lora_alpha}, "
        f"lora_dropout={lora_defaults.lora_dropout}) on every conv and linear but the head and the depthwise conv "
        "(peft requires r % groups == 0); our adapters also adapt the depthwise conv.",
        f"Step time: median over every step but each run's first, all seeds pooled. Peak memory: {memory}",
        "Init deviation: max |logits at init - pretrained logits| / max |pretrained logits| on the test set "
        "(0 for methods that start at the identity; SNELLA's default does not). SNELLA keeps its default "
        "per-layer sparsity: its Allocator (the bi-level budget schedule) is not called by this loop.",
    ]
    if with_parameter_table:
        notes.append(
            "Parameter table: transformers' ResNetConfig(), ConvNextConfig() and ViTConfig() defaults built on "
            "the meta device (ViT without the pooler); each adapter's closed-form trainable_count at its "
            "defaults, summed over every conv and linear layer; peft LoRA r=8 counted by peft on every ungrouped "
            "conv and linear layer."
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
    checks = target_checks(results)
    anchor = results.get("lora8")
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
            if result.ok and key != "lora8"
        ]
    parameter_rows = [] if arguments.no_parameter_table else parameter_table()

    notes = run_notes(arguments, split, metadata, model.width, with_parameter_table=bool(parameter_rows))

    title = f"{TITLE} (quick smoke test)" if arguments.quick else TITLE
    env = environment(library_threads)
    print(f"\n{title}\n{env.describe()}\n{env.command}\n")
    print(accuracy_markdown, "\n")
    print(targets_table(checks), "\n")
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
        plot_ratios(comparisons, time_plot, title="Adapters: step time against peft LoRA r=8")
    time_image = relative_image(time_plot, out) if comparisons else None
    body = [render_section(comparisons, title=title, env=env, image=time_image)]
    body += ["", "### Accuracy, parameters, time and memory", "", accuracy_markdown]
    if ran:
        plot_accuracy(ran, accuracy_plot, title="Few-shot digits 5-9: accuracy vs trainable parameters")
        body += ["", f"![accuracy against trainable parameters]({relative_image(accuracy_plot, out)})"]
    body += ["", "### Targets (issue 4)", "", targets_table(checks)]
    if parameter_rows:
        body += ["", "### Trainable parameters on standard architectures", "", parameters_markdown(parameter_rows)]
    body += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    write_section(out, SECTION, "\n".join(body))
    print(f"\nwrote section {SECTION!r} of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
