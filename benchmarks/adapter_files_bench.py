r"""Adapter file bytes against trainable bytes, and ``apply`` wall time, for every adapter class.

For every adapter class of :mod:`decomp.adapters` with its default options, on transformers'
``ConvNextForImageClassification(ConvNextConfig())`` (ConvNeXt-T) and
``ViTForImageClassification(ViTConfig())`` (ViT-B/16), randomly initialised (nothing is
downloaded), adapted with ``decomp.adapters.apply(model, cls)`` (the default target: every linear
and conv layer but the classifier):

* *trainable bytes*: the bytes of ``trainable_parameters(model)``;
* *file bytes*: the size of ``save_adapter(model, path)`` (frozen factors left out, rebuilt at
  load) and of ``save_adapter(model, path, factors=True)`` (every factor stored), each with its
  ratio to the trainable bytes;
* on ViT-B only, the wall time of ``apply`` (building every adapter from its weight): the median
  of ``--repeats`` calls, each on a fresh copy of the pretrained model (the copy is not timed),
  with ``--threads`` threads for torch and the native pools;
* on ViT-B only, how reproducible the rebuild is: the largest relative difference
  :math:`\lVert a - b \rVert / \lVert a \rVert` (float64) between the rebuilt buffers of two
  ``apply`` calls, one with 1 thread and one with 2 (LAPACK and BLAS split their work differently,
  as another machine would), against the tolerance ``load_adapter`` allows.

A class that raises is reported as failed with its error; no row is filled in by other means.
The figures are written to the ``adapter files`` section of ``docs/benchmarks.md``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/adapter_files_bench.py --threads 1
    python benchmarks/adapter_files_bench.py --quick          # tiny configs, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: make the repository root importable, as under ``python -m benchmarks...``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import decomp.adapters
from benchmarks.harness import Timing, environment, set_threads, write_section
from decomp.adapters import apply, save_adapter, trainable_parameters
from decomp.adapters.base import AdapterParam, rebuild_tolerance
from decomp.adapters.model import adapted_layers

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "adapter files"
TITLE = "Adapter files: bytes on disk against trainable bytes, and apply time"
TIMED_MODEL = "ViT-B/16"


def adapter_classes() -> list[type[AdapterParam]]:
    """Every adapter class :mod:`decomp.adapters` exports, once each (aliases dropped), by name."""
    classes = {
        value
        for value in vars(decomp.adapters).values()
        if isinstance(value, type) and issubclass(value, AdapterParam) and value is not AdapterParam
    }
    return sorted(classes, key=lambda cls: cls.__name__)


def models(quick: bool = False) -> dict[str, Callable[[], nn.Module]]:
    """Builders of the randomly initialised models; ``quick``: tiny configs of the same classes."""
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def files_table(rows: Sequence[FileRow]) -> str:
    header = (
        "Model", "Method", "Layers", "Trainable bytes", "File bytes", "File / trainable",
        "File bytes, factors=True", "factors=True / trainable",
    )  # fmt: skip
    cells = []
    for row in rows:
        if row.error is not None:
            cells.append((row.model, row.method, "-", "-", f"failed: {row.error}", "-", "-", "-"))
            continue
        cells.append(
            (
                row.model, row.method, str(row.layers), f"{row.trainable_bytes:,}",
                f"{row.file_bytes:,}", f"{row.ratio:.2f}", f"{row.factors_bytes:,}",
                f"{row.factors_ratio:.2f}",
            )  # fmt: skip
        )
    return markdown_table(header, cells)


def apply_table(rows: Sequence[ApplyRow]) -> str:
    cells = [
        (row.method, f"failed: {row.error}", "-", "-")
        if row.timing is None
        else (
            row.method,
            f"{row.timing.median_ms / 1e3:.2f}",
            f"{row.timing.iqr_ms / 1e3:.2f}",
            str(row.timing.repeats),
        )
        for row in rows
    ]
    return markdown_table(("Method", "apply median s", "IQR s", "Runs"), cells)


def spread_table(rows: Sequence[SpreadRow]) -> str:
    header = (
        "Method", "Rebuilt buffers", "Largest relative difference, 1 vs 2 threads",
        "Bit-identical", "Tolerance of load_adapter",
    )  # fmt: skip
    cells = [
        (row.method, "-", f"failed: {row.error}", "-", "-")
        if row.error is not None
        else (row.method, "0", "-", "-", "-")
        if row.buffers == 0
        else (
            row.method, str(row.buffers), f"{row.largest:.2e}", "yes" if row.identical else "no",
            f"{row.tolerance:.0e}",
        )  # fmt: skip
        for row in rows
    ]
    return markdown_table(header, cells)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for every library (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed apply calls per class (default 3)")
    parser.add_argument(
        "--only", default=None, help="comma-separated class names to run (default: every class)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny configs, 1 repeat; writes nothing unless --out"
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"page to write to (default {DEFAULT_OUT}; none with --quick)",
    )  # fmt: skip
    arguments = parser.parse_args(argv)
    if arguments.threads < 1 or arguments.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    known = {cls.__name__: cls for cls in adapter_classes()}
    names = list(known) if arguments.only is None else arguments.only.split(",")
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"--only names unknown classes {unknown} (known: {sorted(known)})")
    arguments.classes = [known[name] for name in names]
    if arguments.quick:
        arguments.repeats = 1
    elif arguments.out is None:
        arguments.out = DEFAULT_OUT
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    library_threads = set_threads(arguments.threads)
    file_rows: list[FileRow] = []
    apply_rows: list[ApplyRow] = []
    spread_rows: list[SpreadRow] = []
    with tempfile.TemporaryDirectory() as scratch:
        for model_name, builder in models(arguments.quick).items():
            torch.manual_seed(0)
            pretrained = builder()
            for cls in arguments.classes:
                file_rows.append(measure_files(model_name, pretrained, cls, Path(scratch)))
                print(files_table(file_rows[-1:]).splitlines()[-1], flush=True)
                if model_name == TIMED_MODEL:
                    apply_rows.append(time_apply(pretrained, cls, arguments.repeats))
                    print(apply_table(apply_rows[-1:]).splitlines()[-1], flush=True)
                    spread_rows.append(rebuild_spread(pretrained, cls, arguments.threads))
                    print(spread_table(spread_rows[-1:]).splitlines()[-1], flush=True)
            del pretrained
    env = environment(library_threads)
    title = f"{TITLE} (quick smoke test)" if arguments.quick else TITLE
    body = "\n".join(
        [
            f"## {title}",
            "",
            f"Run: {env.describe()}.",
            "",
            f"Command: `{env.command}`",
            "",
            "Every adapter class with its default options and `apply`'s default target (every "
            "linear and conv layer but the classifier), on randomly initialised transformers "
            "`ConvNextForImageClassification(ConvNextConfig())` and "
            "`ViTForImageClassification(ViTConfig())`. *File bytes*: `save_adapter(model, path)`, "
            "which leaves out the frozen factors an adapter rebuilds from the weight at load; "
            "*factors=True*: every factor stored. Both include the safetensors header (the JSON "
            "metadata of every layer).",
            "",
            files_table(file_rows),
            "",
            f"`apply(model, cls)` wall time on {TIMED_MODEL}, in seconds: the median of the runs, "
            "each on a fresh copy of the pretrained model (the copy is not timed).",
            "",
            apply_table(apply_rows),
            "",
            f"How reproducible the rebuild is, on {TIMED_MODEL}: the rebuilt buffers of `apply` "
            "with 1 thread against those with 2 (another split of the LAPACK/BLAS work, as on "
            "another machine), the largest relative difference over the buffers in float64; "
            "`load_adapter` accepts a rebuild within the tolerance.",
            "",
            spread_table(spread_rows),
        ]
    )
    print(f"\n{body}")
    if arguments.out is not None:
        write_section(arguments.out, SECTION, body)
        print(f"\nwrote section {SECTION!r} of {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
