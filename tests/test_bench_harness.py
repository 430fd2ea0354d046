"""Unit tests of the benchmark harness (benchmarks/harness.py); no real benchmark runs here."""

from __future__ import annotations

import dataclasses
import gc
import math
from pathlib import Path

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import (
    PAGE_HEADER,
    Area,
    Case,
    Check,
    Comparison,
    Part,
    Target,
    Timing,
    cpu_model,
    environment,
    load_results,
    main,
    markdown_table,
    parse_arguments,
    render,
    replace_section,
    save_results,
    set_threads,
    timeit,
    write_section,
)
from benchmarks.targets import TARGETS, target


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


# --------------------------------------------------------------------------- targets, tables


@pytest.mark.parametrize(
    ("bound", "value", "met"),
    [
        (Target.at_most(1.02, "x AdamW"), 1.02, True),
        (Target.at_most(1.02, "x AdamW"), 1.03, False),
        (Target.at_least(-1.0, " points"), -1.0, True),
        (Target.at_least(-1.0, " points"), -1.5, False),
        (Target.at_most(1.0), math.nan, False),
    ],
)
def test_checks_bound_a_measured_value(bound, value, met):
    assert Check("loss", value, bound).met is met


def test_value_targets_describe_themselves_and_bound_no_time():
    assert Target.at_most(1.1, "x GaLore's").describe() == "<= 1.1x GaLore's"
    assert Target.at_least(-1, " points").describe() == ">= -1 points"
    with pytest.raises(ValueError, match="bounds a value, not a time ratio"):
        Comparison("op", timing(1.0), "anchor", timing(1.0), Target.at_most(1.0))


def test_every_target_lives_in_one_table_with_a_clear_miss():
    assert target("decomp: kpsvd vs full SVD") is TARGETS["decomp: kpsvd vs full SVD"]
    assert all(key.split(": ")[0] in ("decomp", "optim", "adapters") for key in TARGETS)
    with pytest.raises(KeyError, match="no target 'decomp: nothing'"):
        target("decomp: nothing")


def test_tables_escape_pipes_and_refuse_ragged_rows():
    assert markdown_table(("a", "b"), [("x|y", 1)]).splitlines()[2] == "| x\\|y | 1 |"
    with pytest.raises(ValueError, match="every row must have 2 cells"):
        markdown_table(("a", "b"), [("only one",)])


def comparisons() -> list[Comparison]:
    return [
        Comparison("fast op", timing(1.0), "anchor A", timing(4.0), Target.speedup(3), 1e-6, 2e-6),
        Comparison("slow op", timing(2.0), "anchor B", timing(1.0), Target.ratio(1.5)),
        Comparison("info op", timing(1.0), "anchor C", timing(1.0)),
    ]


def demo_part(rows: list[tuple[str, str]]) -> Part:
    part = Part(comparisons(), [Check("loss", 1.05, Target.at_most(1.02, "x"), "1.05x")], facts=["rank 8"])
    part.table("Sizes", ("Method", "Bytes"), rows)
    part.env = environment("pools", command="python bench.py")
    return part


DEMO = Area("demo", "Demo", (Case("a", lambda c: demo_part([("A", "1")])), Case("b", lambda c: demo_part([("B", "2")]))))


def test_render_shows_verdicts_missed_targets_checks_and_merges_tables():
    text = render(DEMO, {"b": demo_part([("B", "2")]), "a": demo_part([("A", "1")])}, {"ratios": "img/x.png"})
    lines = text.splitlines()
    assert lines[0].startswith("Run of a, b: ") and "Command: `python bench.py`" in lines
    rows = [line for line in lines if line.startswith("| fast op") or line.startswith("| slow op")]
    assert rows[0].endswith("| speedup >= 3x | yes |") and rows[1].endswith("| ratio <= 1.5 | **no** |")
    assert "Missed targets: slow op vs anchor B; slow op vs anchor B." in text
    # one table per title, rows in case order (a before b), whatever order the parts came in
    assert text.count("#### Sizes") == 1 and text.index("| A | 1 |") < text.index("| B | 2 |")
    assert "| loss: <= 1.02x | 1.05x | **no** |" in text and "![ratios](img/x.png)" in text
    assert text.count("Run of ") == 1  # one line per distinct run
    assert "- rank 8" in text and "Quick smoke test" not in text


def test_results_round_trip_through_json(tmp_path):
    parts = {"a": demo_part([("A", "1")])}
    save_results(tmp_path / "r.json", parts)
    loaded = load_results(tmp_path / "r.json")
    assert loaded == parts and render(DEMO, loaded) == render(DEMO, parts)
    assert load_results(tmp_path / "missing.json") == {}


def test_command_line_is_shared_and_validated(capsys):
    arguments = parse_arguments(DEMO, ["--only", "b", "--threads", "1"])
    assert [case.name for case in arguments.cases] == ["b"] and arguments.out == DEMO.results
    quick = parse_arguments(DEMO, ["--quick", "--repeats", "9"])
    assert quick.out is None and quick.repeats == 2 and len(quick.cases) == 2
    for argv, message in ((["--only", "zzz"], "selects no case"), (["--repeats", "0"], "must be >= 1")):
        with pytest.raises(SystemExit):
            parse_arguments(DEMO, argv)
        assert message in capsys.readouterr().err


def test_main_measures_stores_renders_and_re_renders(tmp_path, capsys):
    page, results = tmp_path / "docs" / "benchmarks.md", tmp_path / "demo.json"
    page.parent.mkdir()
    page.write_text("# B\n\nprose kept\n\n<!-- BEGIN demo -->\nold\n<!-- END demo -->\n")
    common = ["--out", str(results), "--page", str(page), "--threads", "1"]

    def plot(parts):  # an area's own figure, beside the time ratios every area gets
        return {"sizes": lambda path: harness.plot_ratios(parts["a"].comparisons[:1], path, title="t")}

    assert main(dataclasses.replace(DEMO, plot=plot), [*common, "--only", "a"]) == 0
    text = page.read_text()
    assert "prose kept" in text and "old" not in text and "| A | 1 |" in text and "| B | 2 |" not in text
    for figure in ("ratios", "sizes"):
        assert (page.parent / "img" / f"demo_{figure}.png").read_bytes().startswith(b"\x89PNG")
        assert f"](img/demo_{figure}.png)" in text
    main(DEMO, [*common, "--only", "b"])  # a's stored part is kept beside b's new one
    assert set(load_results(results)) == {"a", "b"}
    page.write_text(page.read_text().replace("| A | 1 |", "| edited |"))
    capsys.readouterr()
    main(DEMO, [*common, "--render"])  # nothing measured: the page comes from the JSON alone
    assert "| A | 1 |" in page.read_text() and "running" not in capsys.readouterr().out


def test_main_merges_parts_measured_elsewhere_and_quick_writes_nothing(tmp_path, monkeypatch):
    elsewhere, local, page = tmp_path / "gpu.json", tmp_path / "local.json", tmp_path / "page.md"
    main(DEMO, ["--only", "b", "--out", str(elsewhere), "--no-page", "--threads", "1"])
    assert not page.exists() and set(load_results(elsewhere)) == {"b"}
    main(DEMO, ["--only", "a", "--out", str(local), "--merge", str(elsewhere), "--page", str(page), "--threads", "1"])
    assert set(load_results(local)) == {"a", "b"} and "| B | 2 |" in page.read_text()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "DEFAULT_PAGE", tmp_path / "never.md")
    before = sorted(tmp_path.rglob("*"))
    main(DEMO, ["--quick", "--threads", "1"])
    assert sorted(tmp_path.rglob("*")) == before


def test_main_records_the_revision_the_process_started_from(tmp_path, monkeypatch):
    """Regression: each case read the checkout's revision when it started, so a commit made
    while a long run went on was credited with results of the code the process had imported."""
    revisions = iter(["abc1234", "def5678", "0000000"])
    monkeypatch.setattr(harness, "revision", lambda root=harness.REPO_ROOT: next(revisions))
    results = tmp_path / "demo.json"
    main(DEMO, ["--out", str(results), "--no-page", "--threads", "1"])
    assert {part.env.revision for part in load_results(results).values()} == {"abc1234"}


def test_main_stores_each_case_as_it_finishes(tmp_path):
    results = tmp_path / "demo.json"

    def interrupted(context):
        raise KeyboardInterrupt  # a run stopped by hand during its second case

    area = dataclasses.replace(DEMO, cases=(DEMO.cases[0], Case("b", interrupted)))
    with pytest.raises(KeyboardInterrupt):
        main(area, ["--out", str(results), "--no-page", "--threads", "1"])
    assert set(load_results(results)) == {"a"}


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


def test_revision_names_the_commit_and_whether_tracked_files_changed(tmp_path):
    import subprocess

    def git(*arguments: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *arguments], capture_output=True, text=True, check=True).stdout

    assert harness.revision(tmp_path) == "unknown (no git)"
    git("init", "-q")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    git("add", "pkg/a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    commit = git("log", "-1", "--format=%h").strip()
    (tmp_path / "untracked.txt").write_text("not part of the code\n")
    assert harness.revision(tmp_path) == commit
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert harness.revision(tmp_path) == f"{commit} + uncommitted changes in pkg"


def test_environment_records_the_revision_and_old_results_load_without_one(tmp_path):
    env = environment("pools", command="python x.py")
    assert env.revision == harness.revision() and f"code: {env.revision}" in env.describe()
    part = Part(facts=["rank 8"], env=env)
    stored = part.to_json()
    del stored["env"]["revision"]  # a results file written before the revision was recorded
    old = Part.from_json(stored)
    assert old.env.revision == "" and "code:" not in old.env.describe()
