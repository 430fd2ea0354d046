"""Fast checks of benchmarks/adapter_files_bench.py on tiny configs: rows, failures, page section."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import decomp.adapters
from benchmarks import adapter_files_bench as bench
from benchmarks.harness import load_results, main
from decomp.adapters import LDUParam, LieParam
from decomp.adapters.base import AdapterParam


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return bench.models(quick=True)[bench.TIMED_MODEL]()


def test_one_case_per_registered_class():
    assert [case.name for case in bench.AREA.cases] == list(decomp.adapters.registered())
    assert "LDUParam" in {case.name for case in bench.AREA.cases}


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
    assert bench.files_cells(row)[4].startswith("failed: RuntimeError")
    timed = bench.time_apply(tiny_vit, _Failing, repeats=2)
    assert timed.timing is None and bench.apply_cells(timed)[1].startswith("failed: RuntimeError")


def test_apply_is_timed_on_fresh_copies(tiny_vit):
    row = bench.time_apply(tiny_vit, LieParam, repeats=3)
    assert row.timing is not None and row.timing.repeats == 3 and row.timing.median_ms > 0
    assert not any(isinstance(m, nn.Module) and hasattr(m, "parametrizations") for m in tiny_vit.modules())


def test_quick_run_fills_one_table_per_measure_from_the_cases(tmp_path, capsys):
    page, results = tmp_path / "benchmarks.md", tmp_path / "files.json"
    page.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkept\n<!-- END other -->\n")
    argv = ["--quick", "--only", "LDUParam,LieParam", "--out", str(results), "--page", str(page)]
    assert main(bench.AREA, argv) == 0
    text = page.read_text()
    assert "kept" in text and f"<!-- BEGIN {bench.AREA.section} -->" in text
    assert text.count("| ConvNeXt-T | LDUParam |") == 1 and text.count("| ViT-B/16 | LieParam |") == 1
    assert text.count(f"#### {bench.APPLY}") == 1 and "Quick smoke test" in text
    assert set(load_results(results)) == {"LDUParam", "LieParam"}


def test_ratios_are_file_over_trainable():
    row = bench.FileRow("m", "X", 1, trainable_bytes=100, file_bytes=150, factors_bytes=400)
    assert (row.ratio, row.factors_ratio) == (1.5, 4.0)
    assert bench.files_cells(row) == ("m", "X", "1", "100", "150", "1.50", "400", "4.00")


def test_rebuild_spread_compares_two_thread_counts(tiny_vit):
    threads = torch.get_num_threads()
    row = bench.rebuild_spread(tiny_vit, LDUParam, threads)
    assert torch.get_num_threads() == threads  # set back
    assert row.error is None and row.buffers == 4 * 7 and row.tolerance == 1e-3
    assert row.largest <= row.tolerance and (row.largest == 0) == row.identical
    none = bench.rebuild_spread(tiny_vit, LieParam, threads)
    assert none.buffers == 0 and bench.spread_cells(none) == ("LieParam", "0", "-", "-", "-")
    failed = bench.rebuild_spread(tiny_vit, _Failing, threads)
    assert failed.error is not None and bench.spread_cells(failed)[2].startswith("failed: RuntimeError")
