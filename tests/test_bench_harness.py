"""Unit tests of the benchmark harness (benchmarks/harness.py); no real benchmark runs here."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import pytest
import torch

from benchmarks.harness import (
    PAGE_HEADER,
    Comparison,
    Target,
    Timing,
    cpu_model,
    environment,
    format_markdown_table,
    format_text_table,
    replace_section,
    report,
    set_threads,
    timeit,
    write_section,
)


def timing(median_ms: float) -> Timing:
    return Timing(median_ms=median_ms, min_ms=median_ms, iqr_ms=0.0, repeats=9)


class FakeClock:
    """A clock that advances only when the timed function runs, by a scripted duration."""

    def __init__(self, durations_ms):
        self.now = 100.0
        self.durations_ms = list(durations_ms)
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def work(self) -> None:
        self.calls += 1
        self.now += self.durations_ms.pop(0) / 1e3


# --------------------------------------------------------------------------- Timing / timeit


def test_timing_statistics_of_known_samples():
    assert Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0]) == Timing(3.0, 1.0, 2.0, 5)
    assert Timing.from_samples([7.0]) == Timing(7.0, 7.0, 0.0, 1)
    even = Timing.from_samples([1.0, 2.0, 3.0, 10.0])
    assert (even.median_ms, even.min_ms) == (2.5, 1.0)
    assert even.iqr_ms == pytest.approx(4.75 - 1.75)


def test_timing_rejects_no_samples():
    with pytest.raises(ValueError, match="samples_ms must hold at least one sample"):
        Timing.from_samples([])


def test_timeit_times_only_the_repeats_with_a_fake_clock():
    # Two warm-up calls of 1000 ms must not count; the timed ones take 5, 1, 3 ms.
    clock = FakeClock([1000.0, 1000.0, 5.0, 1.0, 3.0])
    result = timeit(clock.work, repeats=3, warmup=2, clock=clock)
    assert clock.calls == 5
    assert result.repeats == 3
    assert result.median_ms == pytest.approx(3.0)
    assert result.min_ms == pytest.approx(1.0)
    assert result.iqr_ms == pytest.approx(2.0)


def test_timeit_syncs_before_timing_and_inside_each_timed_call():
    events = []
    clock = FakeClock([2.0, 2.0, 2.0])

    def work():
        events.append("call")
        clock.work()

    def sync():
        events.append("sync")
        clock.now += 0.010  # a device still busy when the call returned: 10 ms billed to it

    result = timeit(work, repeats=2, warmup=1, sync=sync, clock=clock)
    assert events == ["call", "sync", "call", "sync", "call", "sync"]
    assert result.median_ms == pytest.approx(12.0)


def test_timeit_on_a_real_function_gives_ordered_positive_statistics():
    result = timeit(lambda: sum(range(1000)), repeats=7)
    assert result.repeats == 7
    assert 0.0 < result.min_ms <= result.median_ms < 1e3
    assert result.iqr_ms >= 0.0


def test_timeit_restores_the_garbage_collector_even_when_fn_raises():
    assert gc.isenabled()

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        timeit(failing, repeats=2, warmup=0)
    assert gc.isenabled()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 0}, "repeats must be an int >= 1"),
        ({"repeats": 2.0}, "repeats must be an int >= 1"),
        ({"repeats": True}, "repeats must be an int >= 1"),
        ({"warmup": -1}, "warmup must be an int >= 0"),
    ],
)
def test_timeit_rejects_bad_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timeit(lambda: None, **kwargs)


# --------------------------------------------------------------------------- Target / Comparison


def test_target_descriptions_and_ratio_bounds():
    assert Target.ratio(1.5).describe() == "ratio <= 1.5"
    assert Target.speedup(3, error=1.01).describe() == "speedup >= 3x, error <= 1.01x anchor"
    assert Target.ratio(1.2).max_ratio == 1.2
    assert Target.speedup(50).max_ratio == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("faster", 1.0), "kind must be one of"),
        (("ratio", 0.0), "threshold must be a finite number > 0"),
        (("speedup", math.inf), "threshold must be a finite number > 0"),
        (("ratio", 1.0, -1.0), "max_error_factor must be a finite number > 0"),
    ],
)
def test_target_rejects_bad_bounds(arguments, message):
    with pytest.raises(ValueError, match=message):
        Target(*arguments)


@pytest.mark.parametrize(
    ("ours_ms", "anchor_ms", "target", "met"),
    [
        (1.0, 1.0, Target.ratio(1.0), True),  # the bound itself is met
        (1.01, 1.0, Target.ratio(1.0), False),
        (14.0, 10.0, Target.ratio(1.5), True),
        (16.0, 10.0, Target.ratio(1.5), False),
        (1.0, 3.0, Target.speedup(3), True),
        (1.0, 2.9, Target.speedup(3), False),
        (2.0, 1.0, None, None),  # information row: neither met nor missed
    ],
)
def test_comparison_met_follows_the_time_bound(ours_ms, anchor_ms, target, met):
    comparison = Comparison("op", timing(ours_ms), "anchor", timing(anchor_ms), target)
    assert comparison.ratio == pytest.approx(ours_ms / anchor_ms)
    assert comparison.speedup == pytest.approx(anchor_ms / ours_ms)
    assert comparison.met is met


@pytest.mark.parametrize(
    ("error_ours", "error_anchor", "met"),
    [
        (1.00, 1.00, True),
        (1.01, 1.00, True),
        (1.02, 1.00, False),  # 10x faster, but a worse answer than the bound allows
        (0.50, 1.00, True),
        (0.0, 0.0, True),
        (math.nan, 1.00, False),
    ],
)
def test_comparison_met_also_needs_the_error_bound(error_ours, error_anchor, met):
    target = Target.speedup(3, error=1.01)
    comparison = Comparison("op", timing(1.0), "anchor", timing(10.0), target, error_ours, error_anchor)
    assert comparison.met is met


def test_comparison_error_bound_does_not_rescue_a_slow_run():
    comparison = Comparison("op", timing(1.0), "anchor", timing(2.0), Target.speedup(3, error=1.01), 0.1, 1.0)
    assert comparison.met is False


def test_comparison_with_an_error_bound_requires_both_errors():
    with pytest.raises(ValueError, match="error_ours and error_anchor must both be given"):
        Comparison("op", timing(1.0), "anchor", timing(2.0), Target.ratio(1.0, error=1.0), error_ours=0.1)


# --------------------------------------------------------------------------- the shared page


PAGE = (
    "# Page\n\nintro\n\n"
    "<!-- BEGIN decomp -->\nold decomp\n<!-- END decomp -->\n\n"
    "between\n\n"
    "<!-- BEGIN optim -->\noptim body\nline 2\n<!-- END optim -->\n\ntail\n"
)


def test_replace_section_changes_only_its_own_block():
    updated = replace_section(PAGE, "decomp", "new decomp\n")
    assert updated == PAGE.replace("old decomp", "new decomp")
    assert replace_section(updated, "decomp", "new decomp") == updated


def test_replace_section_appends_a_new_section_after_the_others():
    updated = replace_section(PAGE, "adapters", "adapter body")
    assert updated.startswith(PAGE.rstrip("\n"))
    assert updated.endswith("\n\n<!-- BEGIN adapters -->\nadapter body\n<!-- END adapters -->\n")


def test_replace_section_does_not_confuse_names_sharing_a_prefix():
    page = replace_section(PAGE, "decomp2", "other")
    updated = replace_section(page, "decomp", "new")
    assert "<!-- BEGIN decomp2 -->\nother\n<!-- END decomp2 -->" in updated
    assert "<!-- BEGIN decomp -->\nnew\n<!-- END decomp -->" in updated


@pytest.mark.parametrize(
    ("page", "message"),
    [
        (PAGE + "<!-- BEGIN decomp -->\nx\n<!-- END decomp -->\n", "exactly one BEGIN and one END marker"),
        ("<!-- BEGIN decomp -->\nno end\n", "exactly one BEGIN and one END marker"),
        ("<!-- END decomp -->\n<!-- BEGIN decomp -->\n", "END marker comes before the BEGIN marker"),
    ],
)
def test_replace_section_rejects_broken_markers(page, message):
    with pytest.raises(ValueError, match=message):
        replace_section(page, "decomp", "body")


@pytest.mark.parametrize("section", ["", " decomp", "a--b", "two\nlines"])
def test_replace_section_rejects_bad_section_names(section):
    with pytest.raises(ValueError, match="section must be a non-empty single-line name"):
        replace_section(PAGE, section, "body")


def test_write_section_creates_the_page_and_keeps_other_scripts_sections(tmp_path):
    page = tmp_path / "docs" / "benchmarks.md"
    write_section(page, "decomp", "first decomp")
    assert page.read_text().startswith(PAGE_HEADER)
    write_section(page, "optim", "optim body")
    write_section(page, "decomp", "second decomp")
    text = page.read_text()
    assert "first decomp" not in text
    assert "<!-- BEGIN decomp -->\nsecond decomp\n<!-- END decomp -->" in text
    assert "<!-- BEGIN optim -->\noptim body\n<!-- END optim -->" in text
    assert text.index("BEGIN decomp") < text.index("BEGIN optim")
    assert sorted(path.name for path in page.parent.iterdir()) == ["benchmarks.md"]


# --------------------------------------------------------------------------- tables, report


def comparisons() -> list[Comparison]:
    return [
        Comparison("fast op", timing(1.0), "anchor A", timing(4.0), Target.speedup(3), 1e-6, 2e-6),
        Comparison("slow op", timing(2.0), "anchor B", timing(1.0), Target.ratio(1.5)),
        Comparison("info op", timing(1.0), "anchor C", timing(1.0)),
    ]


def test_tables_show_every_row_with_its_verdict():
    markdown = format_markdown_table(comparisons()).splitlines()
    assert len(markdown) == 2 + 3
    assert markdown[2].endswith("| speedup >= 3x | yes |")
    assert markdown[3].endswith("| ratio <= 1.5 | **no** |")
    assert markdown[4].endswith("| - | info |")
    text = format_text_table(comparisons())
    assert "**" not in text
    assert [line.split()[-1] for line in text.splitlines()[2:]] == ["yes", "no", "info"]


def test_report_writes_the_section_plot_and_missed_targets(tmp_path, capsys):
    page, plot = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "img" / "bench.png"
    env = environment("native pools: test", command="python bench.py --quick")
    body = report(comparisons(), section="demo", title="Demo", env=env, notes=["a note"], out=page, plot=plot)
    text = page.read_text()
    assert f"<!-- BEGIN demo -->\n{body}\n<!-- END demo -->" in text
    assert "Command: `python bench.py --quick`" in text
    assert "Missed targets: slow op vs anchor B." in text
    assert "](img/bench.png)" in text
    assert "- a note" in text
    assert plot.read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "Missed targets: slow op vs anchor B" in printed


def test_report_without_out_writes_nothing(tmp_path, capsys):
    env = environment(command="python bench.py")
    body = report(comparisons(), section="demo", title="Demo", env=env)
    assert "## Demo" in body
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="plot needs out"):
        report(comparisons(), section="demo", title="Demo", env=env, plot=tmp_path / "x.png")


# --------------------------------------------------------------------------- environment


@pytest.fixture
def restore_threads(monkeypatch):
    """Undo set_threads: torch's pool, the native pools and the *_NUM_THREADS variables."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    original_torch_threads = torch.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=None):
        yield
    torch.set_num_threads(original_torch_threads)


def test_set_threads_sets_torch_and_reports_the_native_pools(restore_threads):
    summary = set_threads(1)
    assert torch.get_num_threads() == 1
    assert summary.startswith("native pools:")
    assert environment(summary).threads == 1


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_set_threads_rejects_non_positive_counts(threads):
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        set_threads(threads)


def test_environment_records_versions_cpu_and_command():
    env = environment("pools", command="python x.py --flag")
    assert env.torch_version == torch.__version__
    assert env.cpu == cpu_model() and env.cpu
    assert env.command == "python x.py --flag"
    assert "UTC" in env.date
    assert env.describe().startswith(env.date)
    default_command = environment().command
    assert Path(default_command.split()[0]).name.startswith("python")
