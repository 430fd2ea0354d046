"""The one timing-and-reporting mechanism every benchmark script shares.

A script pins the thread count (:func:`set_threads`), times our function and its anchor with
:func:`timeit`, records each pair as a :class:`Comparison` against a :class:`Target`, and hands the
list to :func:`report`. That prints a table, replaces the script's own marked section of
``docs/benchmarks.md`` (so several scripts share one page) and saves a plot of the time ratios
against their targets. Nothing here holds a figure: every number on the page is measured by the
run that wrote it, together with the date, versions, threads, CPU and command of that run.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

__all__ = [
    "Timing",
    "timeit",
    "Target",
    "Comparison",
    "Environment",
    "set_threads",
    "environment",
    "cpu_model",
    "replace_section",
    "write_section",
    "table_rows",
    "format_text_table",
    "format_markdown_table",
    "plot_ratios",
    "render_section",
    "report",
]

PAGE_HEADER = """# Benchmarks

Each section below is written by one script under `benchmarks/` and replaced in place when that
script runs again; the figures are measurements of the run stated in the section, on the machine
stated there, not guarantees. Times are medians in milliseconds; *ratio* is our time over the
anchor's (below 1 means ours is faster) and *speedup* its inverse.
"""


@dataclass(frozen=True)
class Timing:
    """Wall-clock statistics of repeated calls, in milliseconds."""

    median_ms: float
    min_ms: float
    iqr_ms: float
    repeats: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Timing:
        """Median, minimum and interquartile range of ``samples_ms`` (one sample: IQR 0).

        >>> Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0])
        Timing(median_ms=3.0, min_ms=1.0, iqr_ms=2.0, repeats=5)
        """
        if len(samples_ms) == 0:
            raise ValueError("samples_ms must hold at least one sample, got none")
        ordered = sorted(float(sample) for sample in samples_ms)
        if len(ordered) == 1:
            iqr = 0.0
        else:
            first_quartile, _, third_quartile = statistics.quantiles(ordered, n=4, method="inclusive")
            iqr = third_quartile - first_quartile
        return cls(statistics.median(ordered), ordered[0], iqr, len(ordered))


def timeit(
    fn: Callable[[], object],
    *,
    repeats: int = 9,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``sync`` runs after every call inside the timed region and once before the first, so that
    asynchronous work is counted where it was launched: pass ``torch.cuda.synchronize`` for CUDA.
    The garbage collector is paused while timing (as the standard library's ``timeit`` does) so a
    collection triggered by one call's garbage is not billed to another. ``clock`` returns seconds;
    it exists so tests can drive a fake clock.

    >>> timing = timeit(lambda: sum(range(100)), repeats=5)
    >>> timing.repeats, timing.min_ms <= timing.median_ms
    (5, True)
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    samples_ms = []
    collector_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = clock()
            fn()
            if sync is not None:
                sync()
            samples_ms.append((clock() - start) * 1e3)
    finally:
        if collector_was_enabled:
            gc.enable()
    return Timing.from_samples(samples_ms)


@dataclass(frozen=True)
class Target:
    """What *met* means for one comparison: a bound on time, optionally also one on error.

    ``kind="ratio"`` requires ours/anchor median time <= ``threshold``; ``kind="speedup"`` requires
    anchor/ours >= ``threshold`` (the same bound, kept in the form it was stated in).
    ``max_error_factor`` f additionally requires ``error_ours <= f * error_anchor``, so a speed-up
    bought with a worse answer does not count.

    >>> Target.speedup(3, error=1.01).describe()
    'speedup >= 3x, error <= 1.01x anchor'
    """

    kind: Literal["ratio", "speedup"]
    threshold: float
    max_error_factor: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("ratio", "speedup"):
            raise ValueError(f"kind must be one of ['ratio', 'speedup'], got {self.kind!r}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be a finite number > 0, got {self.threshold!r}")
        if self.max_error_factor is not None and not (
            math.isfinite(self.max_error_factor) and self.max_error_factor > 0
        ):
            raise ValueError(
                f"max_error_factor must be a finite number > 0 or None, got {self.max_error_factor!r}"
            )

    @classmethod
    def ratio(cls, max_ratio: float, *, error: float | None = None) -> Target:
        """Ours/anchor time must be ``<= max_ratio`` (and error ``<= error`` x anchor's, if given)."""
        return cls("ratio", max_ratio, error)

    @classmethod
    def speedup(cls, min_speedup: float, *, error: float | None = None) -> Target:
        """Anchor/ours time must be ``>= min_speedup`` (and error ``<= error`` x anchor's, if given)."""
        return cls("speedup", min_speedup, error)

    @property
    def max_ratio(self) -> float:
        """The bound as a ratio ours/anchor, whichever form it was stated in."""
        return self.threshold if self.kind == "ratio" else 1.0 / self.threshold

    def describe(self) -> str:
        time_bound = f"ratio <= {self.threshold:g}" if self.kind == "ratio" else f"speedup >= {self.threshold:g}x"
        if self.max_error_factor is None:
            return time_bound
        return f"{time_bound}, error <= {self.max_error_factor:g}x anchor"


@dataclass(frozen=True)
class Comparison:
    """One row of a benchmark: our timing against an anchor's, with errors and a target.

    ``target=None`` makes an information row: it is reported but is neither met nor missed.
    Errors are whatever the benchmark measures for both sides (e.g. relative Frobenius error of a
    reconstruction, or max abs difference from a reference); a target with an error bound needs
    both.

    >>> fast, slow = Timing(1.0, 1.0, 0.0, 9), Timing(4.0, 4.0, 0.0, 9)
    >>> Comparison("op", fast, "anchor", slow, Target.speedup(3)).met
    True
    """

    name: str
    ours: Timing
    anchor_name: str
    anchor: Timing
    target: Target | None = None
    error_ours: float | None = None
    error_anchor: float | None = None

    def __post_init__(self) -> None:
        needs_errors = self.target is not None and self.target.max_error_factor is not None
        if needs_errors and (self.error_ours is None or self.error_anchor is None):
            raise ValueError(
                f"comparison {self.name!r}: target {self.target.describe()!r} bounds the error, "
                "so error_ours and error_anchor must both be given"
            )

    @property
    def ratio(self) -> float:
        """Ours / anchor median time (below 1: ours is faster)."""
        return self.ours.median_ms / self.anchor.median_ms

    @property
    def speedup(self) -> float:
        """Anchor / ours median time (above 1: ours is faster)."""
        return self.anchor.median_ms / self.ours.median_ms

    @property
    def met(self) -> bool | None:
        """Whether the target holds; ``None`` for an information row. A NaN error never meets it."""
        if self.target is None:
            return None
        if not self.ratio <= self.target.max_ratio:
            return False
        if self.target.max_error_factor is None:
            return True
        return bool(self.error_ours <= self.target.max_error_factor * self.error_anchor)


# --------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class Environment:
    """What a reader needs to judge (or reproduce) a run's figures."""

    date: str
    torch_version: str
    threads: int
    library_threads: str
    cpu: str
    python: str
    command: str

    def describe(self) -> str:
        return (
            f"{self.date}; torch {self.torch_version}; {self.threads} threads "
            f"({self.library_threads}); CPU: {self.cpu}; Python {self.python}"
        )


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def set_threads(threads: int) -> str:
    """Give torch and every loaded numpy/scipy thread pool (BLAS, OpenMP) the same ``threads``.

    Uses ``threadpoolctl`` (installed with scikit-learn) for the native pools; it can only reach
    libraries already loaded, so call this after importing everything a benchmark uses. The
    ``*_NUM_THREADS`` variables are set too, for pools loaded later. Returns a one-line summary of
    the pools and their thread counts, for the report. ``scipy.fft`` takes its ``workers``
    argument instead; pass it the same number.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    for variable in _THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    try:
        import threadpoolctl
    except ImportError:
        return "threadpoolctl not installed: numpy/scipy native pools not limited"
    threadpoolctl.threadpool_limits(limits=threads)
    pools = sorted({f"{pool['internal_api']} {pool['num_threads']}" for pool in threadpoolctl.threadpool_info()})
    return "native pools: " + (", ".join(pools) if pools else "none found")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` where present, else what ``platform`` reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _current_command() -> str:
    executable = Path(sys.executable)
    try:
        executable = executable.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(executable), *sys.argv])


def environment(library_threads: str = "", *, command: str | None = None) -> Environment:
    """The current run's environment; ``command`` defaults to this process's command line."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return Environment(
        date=now.strftime("%Y-%m-%d %H:%M UTC"),
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        library_threads=library_threads or "native pools not set",
        cpu=cpu_model(),
        python=platform.python_version(),
        command=command if command is not None else _current_command(),
    )


# --------------------------------------------------------------------------- the shared page


def _markers(section: str) -> tuple[str, str]:
    if not section or section != section.strip() or "--" in section or "\n" in section:
        raise ValueError(
            f"section must be a non-empty single-line name without surrounding spaces or '--', got {section!r}"
        )
    return f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"


def replace_section(text: str, section: str, body: str) -> str:
    """``text`` with the block between ``section``'s markers set to ``body``, other text untouched.

    A section not yet in ``text`` is appended at the end.

    >>> page = "# Page\\n<!-- BEGIN a -->\\nold\\n<!-- END a -->\\ntail\\n"
    >>> print(replace_section(page, "a", "new"), end="")
    # Page
    <!-- BEGIN a -->
    new
    <!-- END a -->
    tail
    """
    begin, end = _markers(section)
    block = f"{begin}\n{body.strip()}\n{end}"
    begin_count, end_count = text.count(begin), text.count(end)
    if begin_count == 0 and end_count == 0:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    if begin_count != 1 or end_count != 1:
        raise ValueError(
            f"section {section!r} must have exactly one BEGIN and one END marker, "
            f"found {begin_count} and {end_count}"
        )
    start, stop = text.index(begin), text.index(end)
    if stop < start:
        raise ValueError(f"section {section!r}: the END marker comes before the BEGIN marker")
    return text[:start] + block + text[stop + len(end) :]


def write_section(path: str | os.PathLike[str], section: str, body: str) -> None:
    """Replace (or add) ``section`` of the Markdown page at ``path``, creating the page if missing.

    The page is rewritten through a temporary file and an atomic rename, so a reader (or another
    script) never sees it half written.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else PAGE_HEADER
    updated = replace_section(text, section, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(updated)
    os.replace(scratch, path)


# --------------------------------------------------------------------------- tables and plot

TABLE_HEADER = (
    "Benchmark",
    "Anchor",
    "Ours ms (IQR)",
    "Anchor ms (IQR)",
    "Runs",
    "Ratio",
    "Speedup",
    "Error ours",
    "Error anchor",
    "Target",
    "Met",
)


def _milliseconds(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _timing_cell(timing: Timing) -> str:
    return f"{_milliseconds(timing.median_ms)} ({_milliseconds(timing.iqr_ms)})"


def _error_cell(error: float | None) -> str:
    return "-" if error is None else f"{error:.3e}"


def _met_cell(met: bool | None) -> str:
    return {None: "info", True: "yes", False: "**no**"}[met]


def table_rows(comparisons: Sequence[Comparison]) -> list[tuple[str, ...]]:
    """One row of cells per comparison, in the order of :data:`TABLE_HEADER`."""
    return [
        (
            comparison.name,
            comparison.anchor_name,
            _timing_cell(comparison.ours),
            _timing_cell(comparison.anchor),
            f"{comparison.ours.repeats}/{comparison.anchor.repeats}",
            f"{comparison.ratio:.3g}",
            f"{comparison.speedup:.3g}x",
            _error_cell(comparison.error_ours),
            _error_cell(comparison.error_anchor),
            "-" if comparison.target is None else comparison.target.describe(),
            _met_cell(comparison.met),
        )
        for comparison in comparisons
    ]


def format_text_table(comparisons: Sequence[Comparison]) -> str:
    """A fixed-width table for the terminal."""
    rows = [TABLE_HEADER, *(tuple(cell.replace("**", "") for cell in row) for row in table_rows(comparisons))]
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown_table(comparisons: Sequence[Comparison]) -> str:
    """A GitHub-flavoured Markdown table; missed targets are shown in bold."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for row in table_rows(comparisons):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


_COLOURS = {True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}


def plot_ratios(comparisons: Sequence[Comparison], path: str | os.PathLike[str], *, title: str) -> None:
    """Save a log-scale bar chart of each time ratio (ours/anchor) with its target bound.

    Bars grow from parity (ratio 1) to the measured ratio, so a bar pointing left means ours is
    faster; a black tick marks each row's target bound (as a ratio). Green: met, red: missed,
    grey: information row. Drawn with the Agg canvas directly, leaving pyplot's global state alone.
    """
    if not comparisons:
        raise ValueError("comparisons must not be empty")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure = Figure(figsize=(9.0, 1.6 + 0.55 * len(comparisons)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rows = range(len(comparisons))
    ratios = [comparison.ratio for comparison in comparisons]
    axes.barh(
        rows,
        [ratio - 1.0 for ratio in ratios],
        left=1.0,
        height=0.6,
        color=[_COLOURS[comparison.met] for comparison in comparisons],
    )
    bounds = [(row, c.target.max_ratio) for row, c in zip(rows, comparisons) if c.target is not None]
    for row, bound in bounds:
        axes.vlines(bound, row - 0.4, row + 0.4, colors="black", linewidth=2.5)
    for row, ratio in zip(rows, ratios):
        axes.annotate(
            f"{ratio:.3g}",
            (ratio, row),
            xytext=(4 if ratio >= 1 else -4, 0),
            textcoords="offset points",
            ha="left" if ratio >= 1 else "right",
            va="center",
            fontsize=8,
        )
    axes.axvline(1.0, color="#616161", linestyle="--", linewidth=1)
    axes.set_xscale("log")
    extremes = ratios + [bound for _, bound in bounds] + [1.0]
    axes.set_xlim(min(extremes) / 2.5, max(extremes) * 2.5)
    axes.set_yticks(list(rows), [f"{c.name}\nvs {c.anchor_name}" for c in comparisons], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("time ratio ours / anchor (log scale; left of the dashed line: ours faster)")
    axes.set_title(title)
    axes.legend(
        handles=[
            Patch(color=_COLOURS[True], label="target met"),
            Patch(color=_COLOURS[False], label="target missed"),
            Patch(color=_COLOURS[None], label="information"),
            Line2D([], [], color="black", linewidth=2.5, label="target bound"),
        ],
        fontsize=8,
        loc="best",
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# --------------------------------------------------------------------------- the report


def render_section(
    comparisons: Sequence[Comparison],
    *,
    title: str,
    env: Environment,
    notes: Sequence[str] = (),
    image: str | None = None,
) -> str:
    """The Markdown of one benchmark section: run details, table, missed targets, plot, notes."""
    missed = [f"{c.name} vs {c.anchor_name}" for c in comparisons if c.met is False]
    lines = [
        f"## {title}",
        "",
        f"Run: {env.describe()}.",
        "",
        f"Command: `{env.command}`",
        "",
        "Times in ms: median over *Runs* timed calls (ours/anchor) after an untimed warm-up call, "
        "interquartile range in parentheses. *Met* requires the time bound and, where the target "
        "states one, the error bound.",
        "",
        format_markdown_table(comparisons),
        "",
        "Missed targets: " + ("; ".join(missed) if missed else "none") + ".",
    ]
    if image is not None:
        lines += ["", f"![{title}: time ratios against targets]({image})"]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def report(
    comparisons: Sequence[Comparison],
    *,
    section: str,
    title: str,
    env: Environment,
    notes: Sequence[str] = (),
    out: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
) -> str:
    """Print the comparisons, and with ``out`` write them as ``section`` of that page.

    ``plot`` (only with ``out``) saves :func:`plot_ratios` there and links it from the section by
    a path relative to the page. Returns the section's Markdown.
    """
    if plot is not None and out is None:
        raise ValueError("plot needs out: the plot is linked from the page's section")
    _markers(section)
    print(f"\n{title}\n{env.describe()}\n{env.command}\n")
    print(format_text_table(comparisons))
    missed = [f"{c.name} vs {c.anchor_name}" for c in comparisons if c.met is False]
    print("\nMissed targets: " + ("; ".join(missed) if missed else "none"))
    for note in notes:
        print(f"- {note}")
    image = None
    if out is not None and plot is not None and comparisons:
        plot_ratios(comparisons, plot, title=title)
        image = os.path.relpath(Path(plot).resolve(), Path(out).resolve().parent)
    body = render_section(comparisons, title=title, env=env, notes=notes, image=image)
    if out is not None:
        write_section(out, section, body)
        print(f"\nwrote section {section!r} of {out}" + (f" and {plot}" if image is not None else ""))
    return body
