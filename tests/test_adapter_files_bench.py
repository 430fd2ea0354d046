"""Fast checks of benchmarks/adapter_files_bench.py on tiny configs: rows, failures, page section."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from benchmarks import adapter_files_bench as bench
from decomp.adapters import LDUParam, LieParam
from decomp.adapters.base import AdapterParam


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return bench.models(quick=True)[bench.TIMED_MODEL]()


def test_every_class_once_aliases_dropped():
    names = [cls.__name__ for cls in bench.adapter_classes()]
    assert len(names) == len(set(names)) >= 9
    assert "LDUParam" in names and "AdapterParam" not in names


def test_file_row_measures_both_files(tiny_vit, tmp_path):
    row = bench.measure_files("tiny", tiny_vit, LDUParam, tmp_path)
    # the patch-embedding conv, q, k, v, the attention output, the MLP in and out
    assert row.error is None and row.layers == 7
    # LDU's factors dominate a file that stores them; the default file leaves them out.
    assert 0 < row.trainable_bytes < row.file_bytes < row.factors_bytes
    assert row.factors_ratio > 5 * row.ratio
    assert list(tmp_path.iterdir()) == []  # the files are removed once measured
    lie = bench.measure_files("tiny", tiny_vit, LieParam, tmp_path)
    assert lie.file_bytes == lie.factors_bytes  # nothing to rebuild


class _Failing(AdapterParam):
    def _build(self, weight: torch.Tensor) -> None:
        raise RuntimeError("cannot build\nsecond line")


def test_a_failing_class_is_a_row_with_its_error(tiny_vit, tmp_path):
    row = bench.measure_files("tiny", tiny_vit, _Failing, tmp_path)
    assert row.error is not None and row.error.startswith("RuntimeError: cannot build")
    assert "second line" not in row.error
    assert "failed: RuntimeError" in bench.files_table([row])
    timed = bench.time_apply(tiny_vit, _Failing, repeats=2)
    assert timed.timing is None and "failed: RuntimeError" in bench.apply_table([timed])


def test_apply_is_timed_on_fresh_copies(tiny_vit):
    row = bench.time_apply(tiny_vit, LieParam, repeats=3)
    assert row.timing is not None and row.timing.repeats == 3 and row.timing.median_ms > 0
    assert not any(isinstance(m, nn.Module) and hasattr(m, "parametrizations") for m in tiny_vit.modules())


def test_quick_run_writes_only_its_section(tmp_path, capsys):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkept\n<!-- END other -->\n")
    assert bench.main(["--quick", "--only", "LDUParam,LieParam", "--out", str(page)]) == 0
    text = page.read_text()
    assert "kept" in text and f"<!-- BEGIN {bench.SECTION} -->" in text
    assert text.count("| ConvNeXt-T | LDUParam |") == 1 and text.count("| ViT-B/16 | LieParam |") == 1
    assert "apply median s" in text and "(quick smoke test)" in text
    assert "wrote section" in capsys.readouterr().out


def test_quick_run_writes_nothing_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DEFAULT_OUT", tmp_path / "never.md")
    arguments = bench.parse_arguments(["--quick"])
    assert arguments.out is None and arguments.repeats == 1
    assert bench.parse_arguments([]).out == tmp_path / "never.md"


@pytest.mark.parametrize(
    "argv, message",
    [(["--only", "NoSuchParam"], "unknown classes"), (["--repeats", "0"], "must be >= 1")],
)
def test_command_line_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_arguments(argv)
    assert message in capsys.readouterr().err


def test_ratios_are_file_over_trainable():
    row = bench.FileRow("m", "X", 1, trainable_bytes=100, file_bytes=150, factors_bytes=400)
    assert (row.ratio, row.factors_ratio) == (1.5, 4.0)
    assert "| m | X | 1 | 100 | 150 | 1.50 | 400 | 4.00 |" in bench.files_table([row])
    assert os.path.basename(bench.DEFAULT_OUT) == "benchmarks.md"


def test_rebuild_spread_compares_two_thread_counts(tiny_vit):
    threads = torch.get_num_threads()
    row = bench.rebuild_spread(tiny_vit, LDUParam, threads)
    assert torch.get_num_threads() == threads  # set back
    assert row.error is None and row.buffers == 4 * 7 and row.tolerance == 1e-3
    assert row.largest <= row.tolerance and (row.largest == 0) == row.identical
    none = bench.rebuild_spread(tiny_vit, LieParam, threads)
    assert none.buffers == 0 and "| LieParam | 0 | - | - | - |" in bench.spread_table([none])
    failed = bench.rebuild_spread(tiny_vit, _Failing, threads)
    assert failed.error is not None and "failed: RuntimeError" in bench.spread_table([failed])
