r"""Adapter files and ``apply``: one case per registered adapter class, at its default options.

Each case adapts randomly initialised transformers ConvNeXt-T and ViT-B/16 with
``decomp.adapters.apply(model, cls)`` and measures the trainable bytes against the bytes of
``save_adapter`` (frozen factors left out, and ``factors=True``); on ViT-B it also times ``apply``
(median of ``--repeats`` calls, each on a fresh copy) and compares the buffers rebuilt with 1 and
with 2 threads (:math:`\lVert a - b \rVert / \lVert a \rVert` in float64) against the tolerance
``load_adapter`` allows. A class that raises is a row with its error.

Usage::

    python benchmarks/adapter_files_bench.py [--threads 1] [--repeats 3] [--only 'LDU*'] [--quick]
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: make the repository root importable, as under ``python -m benchmarks...``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import decomp.adapters
from benchmarks.harness import Area, Context, Part, Timing, cases, main, set_threads
from decomp.adapters import apply, save_adapter, trainable_parameters
from decomp.adapters.base import AdapterParam, rebuild_tolerance
from decomp.adapters.model import adapted_layers

TIMED_MODEL = "ViT-B/16"
FILES = "bytes on disk against trainable bytes"
FILES_HEADER = (
    "Model", "Method", "Layers", "Trainable bytes", "File bytes", "File / trainable",
    "File bytes, factors=True", "factors=True / trainable",
)  # fmt: skip
APPLY = f"apply(model, cls) wall time on {TIMED_MODEL}, seconds"
APPLY_HEADER = ("Method", "apply median s", "IQR s", "Runs")
SPREAD = f"rebuilt buffers with 1 against 2 threads, on {TIMED_MODEL}"
SPREAD_HEADER = (
    "Method", "Rebuilt buffers", "Largest relative difference, 1 vs 2 threads",
    "Bit-identical", "Tolerance of load_adapter",
)  # fmt: skip


def models(quick: bool = False) -> dict[str, Callable[[], nn.Module]]:
    """Builders of the randomly initialised models; ``quick``: tiny configs of the same classes."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

    if quick:
        convnext = ConvNextConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=3)
        vit = ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=16, num_labels=3,
        )
    else:
        convnext, vit = ConvNextConfig(), ViTConfig()
    return {
        "ConvNeXt-T": lambda: ConvNextForImageClassification(convnext).eval(),
        TIMED_MODEL: lambda: ViTForImageClassification(vit).eval(),
    }


@dataclass(frozen=True)
class FileRow:
    """One adapter class on one model: trainable bytes and the two file sizes (or the error)."""

    model: str
    method: str
    layers: int = 0
    trainable_bytes: int = 0
    file_bytes: int = 0
    factors_bytes: int = 0
    error: str | None = None

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.trainable_bytes

    @property
    def factors_ratio(self) -> float:
        return self.factors_bytes / self.trainable_bytes


@dataclass(frozen=True)
class ApplyRow:
    """``apply`` wall time of one adapter class on the timed model (or the error)."""

    method: str
    timing: Timing | None = None
    error: str | None = None


@dataclass(frozen=True)
class SpreadRow:
    """The rebuilt buffers of one class built with 1 and with 2 threads: how far apart."""

    method: str
    buffers: int = 0
    largest: float = 0.0
    identical: bool = True
    tolerance: float = 0.0
    error: str | None = None


def _failure(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


def measure_files(model_name: str, pretrained: nn.Module, cls: type[AdapterParam], folder: Path) -> FileRow:
    """Adapt a copy of ``pretrained`` with ``cls`` and save it both ways into ``folder``."""
    try:
        model = apply(copy.deepcopy(pretrained), cls, progress=False)
        trainable = sum(p.numel() * p.element_size() for p in trainable_parameters(model))
        layers = len(adapted_layers(model))
        sizes = []
        for factors in (False, True):
            path = folder / f"{cls.__name__}-{factors}.safetensors"
            save_adapter(model, path, factors=factors)
            sizes.append(os.path.getsize(path))
            path.unlink()
    except Exception as error:  # noqa: BLE001 - a failing class is a row of the report
        return FileRow(model_name, cls.__name__, error=_failure(error))
    return FileRow(model_name, cls.__name__, layers, trainable, sizes[0], sizes[1])


def time_apply(pretrained: nn.Module, cls: type[AdapterParam], repeats: int) -> ApplyRow:
    """Median wall time of ``apply(copy, cls)`` over ``repeats`` fresh copies of ``pretrained``."""
    samples_ms = []
    try:
        for _ in range(repeats):
            model = copy.deepcopy(pretrained)
            start = time.perf_counter()
            apply(model, cls, progress=False)
            samples_ms.append((time.perf_counter() - start) * 1e3)
            del model
    except Exception as error:  # noqa: BLE001 - a failing class is a row of the report
        return ApplyRow(cls.__name__, error=_failure(error))
    return ApplyRow(cls.__name__, Timing.from_samples(samples_ms))


def _rebuilt(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        layer.prefix + name: buffer
        for layer in adapted_layers(model)
        for name, buffer in layer.adapter.rebuilt_state().items()
    }


def rebuild_spread(pretrained: nn.Module, cls: type[AdapterParam], threads: int) -> SpreadRow:
    """Build ``cls`` on copies of ``pretrained`` with 1 and with 2 threads; compare the rebuilt
    buffers. The thread count is set back to ``threads`` afterwards."""
    try:
        builds = []
        for count in (1, 2):
            set_threads(count)
            builds.append(_rebuilt(apply(copy.deepcopy(pretrained), cls, progress=False)))
    except Exception as error:  # noqa: BLE001 - a failing class is a row of the report
        return SpreadRow(cls.__name__, error=_failure(error))
    finally:
        set_threads(threads)
    first, second = builds
    largest, tolerance = 0.0, 0.0
    for key, value in first.items():
        a, b = value.double(), second[key].double()
        if a.norm() > 0 or b.norm() > 0:
            largest = max(largest, float((a - b).norm() / max(a.norm(), b.norm())))
        tolerance = max(tolerance, rebuild_tolerance(value.dtype))
    identical = all(torch.equal(value, second[key]) for key, value in first.items())
    return SpreadRow(cls.__name__, len(first), largest, identical, tolerance)


@functools.cache
def pretrained(model_name: str, quick: bool) -> nn.Module:
    """The randomly initialised model (seed 0), built once per run."""
    torch.manual_seed(0)
    return models(quick)[model_name]()


def files_cells(row: FileRow) -> tuple[str, ...]:
    if row.error is not None:
        return (row.model, row.method, "-", "-", f"failed: {row.error}", "-", "-", "-")
    return (
        row.model, row.method, str(row.layers), f"{row.trainable_bytes:,}", f"{row.file_bytes:,}",
        f"{row.ratio:.2f}", f"{row.factors_bytes:,}", f"{row.factors_ratio:.2f}",
    )  # fmt: skip


def apply_cells(row: ApplyRow) -> tuple[str, ...]:
    if row.timing is None:
        return (row.method, f"failed: {row.error}", "-", "-")
    timing = row.timing
    return (row.method, f"{timing.median_ms / 1e3:.2f}", f"{timing.iqr_ms / 1e3:.2f}", str(timing.repeats))


def spread_cells(row: SpreadRow) -> tuple[str, ...]:
    if row.error is not None:
        return (row.method, "-", f"failed: {row.error}", "-", "-")
    if row.buffers == 0:
        return (row.method, "0", "-", "-", "-")
    identical = "yes" if row.identical else "no"
    return (row.method, str(row.buffers), f"{row.largest:.2e}", identical, f"{row.tolerance:.0e}")


def measure(class_name: str, context: Context) -> Part:
    """The registered adapter class ``class_name``: its files on every model; ``apply`` time and
    rebuild spread on the timed one."""
    cls = decomp.adapters.registered()[class_name]
    part = Part()
    with tempfile.TemporaryDirectory() as scratch:
        rows = [
            measure_files(model, pretrained(model, context.quick), cls, Path(scratch))
            for model in models(context.quick)
        ]
    part.table(FILES, FILES_HEADER, [files_cells(row) for row in rows])
    timed = pretrained(TIMED_MODEL, context.quick)
    part.table(APPLY, APPLY_HEADER, [apply_cells(time_apply(timed, cls, context.repeats))])
    part.table(SPREAD, SPREAD_HEADER, [spread_cells(rebuild_spread(timed, cls, context.threads))])
    return part


AREA = Area(
    section="adapter files",
    title="Adapter files: bytes on disk against trainable bytes, and apply time",
    cases=cases(measure, decomp.adapters.registered()),
    threads=1,
    repeats=3,
)

if __name__ == "__main__":
    sys.exit(main(AREA))
