"""The one benchmark harness: timing, targets, tables, JSON results, the page, the command line.

An area script is a list of :class:`Case` objects and a measure function per case. :func:`main`
parses the one command line every area shares, runs the selected cases, stores what each measured
as a :class:`Part` in the area's JSON results file (``docs/results/<area>.json``) and renders the
area's marked section of ``docs/benchmarks.md`` from that file alone. A section can therefore be
re-rendered without measuring (``--render``) and parts measured elsewhere (a lent GPU) merged in
(``--merge``). Every figure on the page is measured by the run recorded beside it (date, versions,
threads, CPU, device and command); the prose that explains a section lives on the page, outside
its markers. Targets come from :mod:`benchmarks.targets`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import functools
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAGE = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS = REPO_ROOT / "docs" / "results"

PAGE_HEADER = """# Benchmarks

Each section below is rendered from one results file under `docs/results/`, written by the
command the section names; the figures are measurements of that run, not guarantees.
"""


# --------------------------------------------------------------------------- timing


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
        iqr = 0.0
        if len(ordered) > 1:
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


# --------------------------------------------------------------------------- targets


TargetKind = Literal["ratio", "speedup", "at_most", "at_least"]


@dataclass(frozen=True)
class Target:
    """What *met* means: a bound on a time ratio (optionally also on error), or on any measure.

    ``ratio``: ours/anchor time ``<= threshold``; ``speedup``: anchor/ours ``>= threshold`` (the
    same bound, kept in the form it was stated in); ``at_most``/``at_least``: a measured value
    (a loss ratio, an accuracy gap) against ``threshold``, described with ``unit``.
    ``max_error_factor`` f additionally requires ``error_ours <= f * error_anchor``, so a speed-up
    bought with a worse answer does not count.

    >>> Target.speedup(3, error=1.01).describe()
    'speedup >= 3x, error <= 1.01x anchor'
    >>> Target.at_most(1.02, "x AdamW").holds(1.0065)
    True
    """

    kind: TargetKind
    threshold: float
    max_error_factor: float | None = None
    unit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("ratio", "speedup", "at_most", "at_least"):
            raise ValueError(f"kind must be one of ['ratio', 'speedup', 'at_most', 'at_least'], got {self.kind!r}")
        if not math.isfinite(self.threshold) or (self.kind in ("ratio", "speedup") and self.threshold <= 0):
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

    @classmethod
    def at_most(cls, bound: float, unit: str = "") -> Target:
        """A measured value must be ``<= bound`` (``unit`` is only for the description)."""
        return cls("at_most", bound, None, unit)

    @classmethod
    def at_least(cls, bound: float, unit: str = "") -> Target:
        """A measured value must be ``>= bound`` (``unit`` is only for the description)."""
        return cls("at_least", bound, None, unit)

    @property
    def max_ratio(self) -> float:
        """A time bound as a ratio ours/anchor, whichever form it was stated in."""
        if self.kind not in ("ratio", "speedup"):
            raise ValueError(f"a {self.kind!r} target bounds a value, not a time ratio")
        return self.threshold if self.kind == "ratio" else 1.0 / self.threshold

    def holds(self, value: float) -> bool:
        """Whether ``value`` (a ratio for time targets) meets the bound; NaN never does."""
        if self.kind in ("ratio", "speedup"):
            return bool(value <= self.max_ratio)
        return bool(value <= self.threshold if self.kind == "at_most" else value >= self.threshold)

    def describe(self) -> str:
        if self.kind in ("at_most", "at_least"):
            return f"{'<=' if self.kind == 'at_most' else '>='} {self.threshold:g}{self.unit}"
        time_bound = f"ratio <= {self.threshold:g}" if self.kind == "ratio" else f"speedup >= {self.threshold:g}x"
        if self.max_error_factor is None:
            return time_bound
        return f"{time_bound}, error <= {self.max_error_factor:g}x anchor"


@dataclass(frozen=True)
class Comparison:
    """One row of a benchmark: our timing against an anchor's, with errors and a target.

    ``target=None`` makes an information row: it is reported but is neither met nor missed.
    Errors are whatever the benchmark measures for both sides (e.g. relative Frobenius error of a
    reconstruction); a target with an error bound needs both.

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
        if self.target is not None:
            self.target.max_ratio  # noqa: B018 - raises for a target that bounds no time ratio
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
        if not self.target.holds(self.ratio):
            return False
        if self.target.max_error_factor is None:
            return True
        return bool(self.error_ours <= self.target.max_error_factor * self.error_anchor)


@dataclass(frozen=True)
class Check:
    """A target on one measured value that is not a time ratio (a loss, an accuracy, bytes).

    >>> Check("state bytes vs GaLore", 0.667, Target.at_most(1.1, "x"), "0.667x").met
    True
    """

    name: str
    value: float
    target: Target
    shown: str = ""

    @property
    def met(self) -> bool:
        return self.target.holds(self.value)


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
    device: str = "cpu"
    # The code that ran: the commit and what was uncommitted (see :func:`revision`); results
    # stored before it was recorded have "".
    revision: str = ""

    def describe(self) -> str:
        device = "" if self.device == "cpu" else f"; device: {self.device}"
        code = f"; code: {self.revision}" if self.revision else ""
        return (
            f"{self.date}; torch {self.torch_version}; {self.threads} threads "
            f"({self.library_threads}); CPU: {self.cpu}; Python {self.python}{device}{code}"
        )


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def set_threads(threads: int) -> str:
    """Give torch and every loaded numpy/scipy thread pool (BLAS, OpenMP) the same ``threads``.

    Uses ``threadpoolctl`` (installed with scikit-learn) for the native pools; it can only reach
    libraries already loaded, so call this after importing everything a benchmark uses. The
    ``*_NUM_THREADS`` variables are set too, for pools loaded later. Returns a one-line summary of
    the pools and their thread counts, for the report.
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


def describe_device(device: torch.device) -> str:
    """``cpu``, or a CUDA device with its name (``cuda (NVIDIA H100 80GB HBM3)``)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def revision(root: Path = REPO_ROOT) -> str:
    """The commit ``root`` is checked out at and whether its tracked files differ from it.

    ``"ed65e8b"`` for a clean tree, ``"ed65e8b + uncommitted changes in benchmarks, optim"`` (the
    top-level folders of the changed tracked files) for a dirty one, ``"unknown (no git)"`` outside
    a git checkout. Only reads the repository.
    """

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *arguments], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    try:
        commit = git("log", "-1", "--format=%h").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not changed:
        return commit
    folders = sorted({path.split(" -> ")[-1].split("/")[0] for path in changed})
    return f"{commit} + uncommitted changes in {', '.join(folders)}"


def _current_command() -> str:
    executable = Path(sys.executable)
    try:
        executable = executable.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(executable), *sys.argv])


def environment(
    library_threads: str = "", *, command: str | None = None, device: str = "cpu", code: str | None = None
) -> Environment:
    """The current run's environment; ``command`` defaults to this process's command line and
    ``code`` (the revision) to the checkout's :func:`revision` now."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return Environment(
        date=now.strftime("%Y-%m-%d %H:%M UTC"),
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        library_threads=library_threads or "native pools not set",
        cpu=cpu_model(),
        python=platform.python_version(),
        command=command if command is not None else _current_command(),
        device=device,
        revision=revision() if code is None else code,
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


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


def write_section(path: str | os.PathLike[str], section: str, body: str) -> None:
    """Replace (or add) ``section`` of the Markdown page at ``path``, creating the page if missing."""
    path = Path(path)
    text = path.read_text() if path.exists() else PAGE_HEADER
    _write_atomically(path, replace_section(text, section, body))


# --------------------------------------------------------------------------- tables and plot


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` inside a cell is escaped).

    >>> print(markdown_table(("a", "b"), [(1, "x|y")]))
    | a | b |
    |---|---|
    | 1 | x\\|y |
    """
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row must have {len(header)} cells, as the header has")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


COMPARISON_HEADER = (
    "Benchmark", "Anchor", "Ours ms (IQR)", "Anchor ms (IQR)", "Runs", "Ratio", "Speedup",
    "Error ours", "Error anchor", "Target", "Met",
)  # fmt: skip


def milliseconds(value: float) -> str:
    """Three significant figures at most, never scientific notation above 0.1 ms.

    >>> [milliseconds(value) for value in (1234.5, 12.345, 0.5, 0.01234)]
    ['1234', '12.3', '0.50', '0.0123']
    """
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def verdict(met: bool | None) -> str:
    """``yes``, a bold ``no`` or ``info`` (no target).

    >>> [verdict(met) for met in (True, False, None)]
    ['yes', '**no**', 'info']
    """
    return {None: "info", True: "yes", False: "**no**"}[met]


def comparison_rows(comparisons: Sequence[Comparison]) -> list[tuple[str, ...]]:
    """One row of cells per comparison, in the order of :data:`COMPARISON_HEADER`."""

    def timing_cell(timing: Timing) -> str:
        return f"{milliseconds(timing.median_ms)} ({milliseconds(timing.iqr_ms)})"

    def error_cell(error: float | None) -> str:
        return "-" if error is None else f"{error:.3e}"

    return [
        (
            c.name, c.anchor_name, timing_cell(c.ours), timing_cell(c.anchor),
            f"{c.ours.repeats}/{c.anchor.repeats}", f"{c.ratio:.3g}", f"{c.speedup:.3g}x",
            error_cell(c.error_ours), error_cell(c.error_anchor),
            "-" if c.target is None else c.target.describe(), verdict(c.met),
        )  # fmt: skip
        for c in comparisons
    ]


_COLOURS = {True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}


def plot_ratios(comparisons: Sequence[Comparison], path: str | os.PathLike[str], *, title: str) -> None:
    """Save a log-scale bar chart of each time ratio (ours/anchor) with its target bound.

    Bars grow from parity (ratio 1) to the measured ratio, so a bar pointing left means ours is
    faster; a black tick marks each row's target bound. Green: met, red: missed, grey: information.
    Drawn on the Agg canvas directly, leaving pyplot's global state alone.
    """
    if not comparisons:
        raise ValueError("comparisons must not be empty")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 1.6 + 0.55 * len(comparisons)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rows = range(len(comparisons))
    ratios = [comparison.ratio for comparison in comparisons]
    colours = [_COLOURS[comparison.met] for comparison in comparisons]
    axes.barh(rows, [ratio - 1.0 for ratio in ratios], left=1.0, height=0.6, color=colours)
    bounds = [(row, c.target.max_ratio) for row, c in zip(rows, comparisons) if c.target is not None]
    for row, bound in bounds:
        axes.vlines(bound, row - 0.4, row + 0.4, colors="black", linewidth=2.5)
    for row, ratio in zip(rows, ratios):
        right = ratio >= 1
        axes.annotate(
            f"{ratio:.3g}", (ratio, row), xytext=(4 if right else -4, 0), textcoords="offset points",
            ha="left" if right else "right", va="center", fontsize=8,
        )  # fmt: skip
    axes.axvline(1.0, color="#616161", linestyle="--", linewidth=1)
    axes.set_xscale("log")
    extremes = ratios + [bound for _, bound in bounds] + [1.0]
    axes.set_xlim(min(extremes) / 2.5, max(extremes) * 2.5)
    axes.set_yticks(list(rows), [f"{c.name}\nvs {c.anchor_name}" for c in comparisons], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("time ratio ours / anchor (log scale; left of the dashed line: ours faster; tick: target)")
    axes.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# --------------------------------------------------------------------------- results


@dataclass
class Part:
    """What one case measured: time comparisons, checks on other measures, tables and facts.

    ``facts`` are short lines that carry a measured or configured figure (the prose that explains
    a case lives on the page). ``data`` holds JSON values that are not shown but that plots and
    an area's ``summary`` read (a loss curve, a validation loss). ``env`` is filled in by
    :func:`main` with the run that measured it.
    """

    comparisons: list[Comparison] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    env: Environment | None = None
    quick: bool = False

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """Add a table (cells are kept as text, as they will be shown)."""
        markdown_table(header, rows)  # validates the shape now, not at render time
        self.tables.append({"title": title, "header": list(header), "rows": [[str(c) for c in r] for r in rows]})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Part:
        def target(value: dict[str, Any] | None) -> Target | None:
            return None if value is None else Target(**value)

        comparisons = [
            Comparison(
                **{**c, "ours": Timing(**c["ours"]), "anchor": Timing(**c["anchor"]), "target": target(c["target"])}
            )
            for c in data["comparisons"]
        ]
        checks = [Check(**{**c, "target": target(c["target"])}) for c in data["checks"]]
        env = None if data["env"] is None else Environment(**data["env"])
        return cls(comparisons, checks, data["tables"], data["facts"], data["data"], env, data["quick"])


def load_results(path: Path) -> dict[str, Part]:
    """The parts stored at ``path`` by case name (as :func:`save_results` wrote them); none if
    there is no file.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "area.json"
    >>> save_results(path, {"a": Part(facts=["rank 8"])})
    >>> load_results(path)["a"].facts
    ['rank 8']
    """
    if not path.exists():
        return {}
    return {name: Part.from_json(part) for name, part in json.loads(path.read_text()).items()}


def save_results(path: Path, parts: dict[str, Part]) -> None:
    """Write ``parts`` (by case name) as JSON, atomically."""
    _write_atomically(path, json.dumps({name: part.to_json() for name, part in parts.items()}, indent=1) + "\n")


# --------------------------------------------------------------------------- areas and cases


@dataclass(frozen=True)
class Context:
    """What a measure function is given: the parsed options every area shares."""

    quick: bool
    repeats: int
    threads: int
    device: torch.device

    @property
    def sync(self) -> Callable[[], None] | None:
        """``torch.cuda.synchronize`` on a CUDA device, else nothing to wait for."""
        return torch.cuda.synchronize if self.device.type == "cuda" else None


@dataclass(frozen=True)
class Case:
    """One named thing an area measures; ``--only`` selects cases by name pattern."""

    name: str
    measure: Callable[[Context], Part]


def cases(measure: Callable[[str, Context], Part], keys: Iterable[str], prefix: str = "") -> tuple[Case, ...]:
    """One case per method key of a method table, named ``prefix + key``, measured by ``measure(key, context)``.

    >>> [case.name for case in cases(lambda key, context: Part(), ["adamw", "dct"], "lm:")]
    ['lm:adamw', 'lm:dct']
    """
    return tuple(Case(prefix + key, functools.partial(measure, key)) for key in keys)


@dataclass(frozen=True)
class Area:
    """A benchmark area: its page section, its cases in page order and its default options."""

    section: str
    title: str
    cases: tuple[Case, ...]
    threads: int = 2
    repeats: int = 9
    # What only several cases together show (a loss relative to another method's): derived from
    # the stored parts at render time and rendered after them.
    summary: Callable[[dict[str, Part]], Part] | None = None
    # Figures beside the time ratios (which every area with comparisons gets), by name, each a
    # function drawing it to a path (see :func:`main`).
    plot: Callable[[dict[str, Part]], dict[str, Callable[[Path], None]]] | None = None

    @property
    def results(self) -> Path:
        return RESULTS / f"{self.section.replace(' ', '_')}.json"


def _runs(parts: Sequence[tuple[str, Part]]) -> list[str]:
    """One *Run* line per distinct run, naming its cases; runs that differ only in the minute a
    case started are one."""
    runs: dict[Environment, tuple[list[str], list[str]]] = {}
    for name, part in parts:
        if part.env is not None:
            names, dates = runs.setdefault(dataclasses.replace(part.env, date=""), ([], []))
            names.append(name)
            dates.append(part.env.date)
    lines = []
    for env, (names, dates) in runs.items():
        span = dates[0] if min(dates) == max(dates) else f"{min(dates)} to {max(dates)}"
        described = dataclasses.replace(env, date=span).describe()
        lines += [f"Run of {', '.join(names)}: {described}.", "", f"Command: `{env.command}`", ""]
    return lines


def _ordered(area: Area, parts: dict[str, Part]) -> list[tuple[str, Part]]:
    """The stored parts in case order, then the area's summary of them."""
    ordered = [(case.name, parts[case.name]) for case in area.cases if case.name in parts]
    if area.summary is not None and ordered:
        ordered.append(("summary", area.summary(dict(ordered))))
    return ordered


def render(area: Area, parts: dict[str, Part], images: dict[str, str] | None = None) -> str:
    """The Markdown of ``area``'s section from its stored ``parts``, in case order.

    Tables of the same title are merged, rows in case order: a case per method fills one table.
    ``images`` maps a figure's name to its page-relative path; they are linked after the tables.

    >>> area = Area("demo", "Demo", (Case("a", lambda context: Part()), Case("b", lambda context: Part())))
    >>> parts = {name: Part() for name in "ba"}
    >>> for name, part in parts.items():
    ...     part.table("Sizes", ("Method", "Bytes"), [(name, len(name))])
    >>> print(render(area, parts))
    #### Sizes
    <BLANKLINE>
    | Method | Bytes |
    |---|---|
    | a | 1 |
    | b | 1 |
    """
    images = images or {}
    ordered = _ordered(area, parts)
    lines = []
    if any(part.quick for _, part in ordered):
        lines += ["**Quick smoke test: tiny sizes, not the benchmark's figures.**", ""]
    lines += _runs(ordered)
    comparisons = [c for _, part in ordered for c in part.comparisons]
    if comparisons:
        lines += [markdown_table(COMPARISON_HEADER, comparison_rows(comparisons)), ""]
        missed = [f"{c.name} vs {c.anchor_name}" for c in comparisons if c.met is False]
        lines += ["Missed targets: " + ("; ".join(missed) if missed else "none") + ".", ""]
    merged: dict[str, dict[str, Any]] = {}
    for _, part in ordered:
        for table in part.tables:
            into = merged.setdefault(table["title"], {"header": table["header"], "rows": []})
            if into["header"] != table["header"]:
                raise ValueError(f"tables titled {table['title']!r} must share one header to be merged")
            into["rows"] += table["rows"]
    for title, table in merged.items():
        lines += [f"#### {title}", "", markdown_table(table["header"], table["rows"]), ""]
    lines += [line for name, image in images.items() for line in (f"![{name}]({image})", "")]
    checks = [check for _, part in ordered for check in part.checks]
    if checks:
        rows = [(c.name + ": " + c.target.describe(), c.shown or f"{c.value:.4g}", verdict(c.met)) for c in checks]
        lines += ["#### Targets", "", markdown_table(("Target", "Measured", "Met"), rows), ""]
    facts = list(dict.fromkeys(fact for _, part in ordered for fact in part.facts))  # each once
    if facts:
        lines += ["Facts of this run:", "", *(f"- {fact}" for fact in facts)]
    return "\n".join(lines).strip()


def _parser(area: Area) -> argparse.ArgumentParser:
    names = ", ".join(case.name for case in area.cases)
    parser = argparse.ArgumentParser(description=f"{area.title}. Cases: {names}.")
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny sizes for a smoke test; writes nothing unless --out")
    add("--threads", type=int, default=area.threads, help=f"threads for every library (default {area.threads})")
    add("--repeats", type=int, default=area.repeats, help=f"timed calls per measurement (default {area.repeats})")
    add("--only", default="*", help="comma-separated case name patterns (fnmatch; default: every case)")
    add("--device", default="cpu", help="torch device for the cases that use one (default cpu)")
    add("--out", type=Path, default=None, help=f"results JSON (default {area.results.relative_to(REPO_ROOT)})")
    add("--no-page", action="store_true", help="write the results JSON only, not the page section")
    add("--render", action="store_true", help="measure nothing: render the page from the results JSON")
    add("--merge", type=Path, action="append", default=[], help="results JSON whose parts to merge in")
    add("--page", type=Path, default=DEFAULT_PAGE, help="the page (default docs/benchmarks.md)")
    return parser


def parse_arguments(area: Area, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared command line; ``--only`` is resolved to the selected cases' names."""
    parser = _parser(area)
    arguments = parser.parse_args(argv)
    for option in ("threads", "repeats"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option} must be >= 1, got {getattr(arguments, option)}")
    patterns = [pattern.strip() for pattern in arguments.only.split(",") if pattern.strip()]
    arguments.cases = [c for c in area.cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not arguments.cases and not arguments.render:
        parser.error(f"--only {arguments.only!r} selects no case of {[c.name for c in area.cases]}")
    if arguments.quick:
        arguments.repeats = min(arguments.repeats, 2)
    elif arguments.out is None:
        arguments.out = area.results
    return arguments


def main(area: Area, argv: Sequence[str] | None = None) -> int:
    """Run ``area`` as its command line asks: measure, store, merge, render. Always returns 0.

    A case that raises ``NotImplementedError`` is reported as not run. The figures (the time
    ratios of every comparison against its target, and the area's own) go to ``img/`` beside the
    page as ``<section>_<name>.png`` and are linked from the section.
    """
    arguments = parse_arguments(area, argv)
    library_threads = set_threads(arguments.threads)
    device = torch.device(arguments.device)
    parts = load_results(arguments.out) if arguments.out is not None else {}
    for path in arguments.merge:
        parts.update(load_results(path))
    context = Context(arguments.quick, arguments.repeats, arguments.threads, device)
    # The code this process runs is what it imported at its start, whatever a later commit or edit
    # of the checkout says by the time a case starts.
    loaded = revision()
    for case in [] if arguments.render else arguments.cases:
        print(f"running {area.section}: {case.name} ...", flush=True)
        env = environment(library_threads, device=describe_device(device), code=loaded)  # dated when it starts
        try:
            part = case.measure(context)
        except NotImplementedError as error:
            print(f"{case.name}: not run ({error})", flush=True)
            continue
        part.env, part.quick = env, arguments.quick
        parts[case.name] = part
        if arguments.out is not None:  # an interrupted run keeps the cases it finished
            save_results(arguments.out, parts)
    unknown = sorted(set(parts) - {case.name for case in area.cases})
    if unknown:
        print(f"dropping stored parts of cases {area.section} no longer has: {unknown}")
    parts = {name: part for name, part in parts.items() if name not in unknown}
    page = None if arguments.no_page or arguments.out is None else arguments.page
    images = {}
    comparisons = [comparison for _, part in _ordered(area, parts) for comparison in part.comparisons]
    figures: dict[str, Callable[[Path], None]] = {}
    if comparisons:
        figures["ratios"] = functools.partial(plot_ratios, comparisons, title=f"{area.title}: time ratios")
    if area.plot is not None:
        figures.update(area.plot(parts))
    for name, draw in figures.items() if page is not None else ():
        path = page.parent / "img" / f"{area.section.replace(' ', '_')}_{name}.png"
        draw(path)
        images[name] = os.path.relpath(path.resolve(), page.resolve().parent)
    body = render(area, parts, images)
    print("\n" + body.replace("**", "") if parts else f"nothing measured or stored for {area.section}")
    if arguments.out is not None:
        save_results(arguments.out, parts)
        print(f"\nwrote {arguments.out}")
    if page is not None and parts:
        write_section(page, area.section, body)
        print(f"wrote section {area.section!r} of {page}")
    return 0
