"""Fast checks of the optimizer benchmark's pieces on tiny sizes: data, schedule, state bytes,
each part's run, the targets and the rendered page. No real benchmark runs here."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from benchmarks import optim_bench as bench
from benchmarks.harness import Context, Part, main, save_results
from benchmarks.adapters_data import SmallResNet, load_digits_split
from benchmarks.optim_data import (
    Corpus,
    LlamaShape,
    batch_starts,
    build_llama,
    gather_windows,
    load_corpus,
    split_tail,
    stdlib_sources,
    validation_windows,
)
from optim import DCTProjectedAdam

TINY_SHAPE = LlamaShape(hidden=16, layers=1, heads=2, intermediate=32, seq_len=16)
TINY_LM = bench.LMSettings(
    shape=TINY_SHAPE, batch_size=2, tokens=2 * 16 * 4, update_gap=2, val_fraction=0.1, max_val_windows=4, tail_steps=2,
    seeds=2,
)  # fmt: skip
TINY_MICRO = bench.MicroSettings(size=32, rank=4, svd_repeats=1)
TINY_CNN = bench.CNNSettings(shots=2, steps=3, seeds=2, update_gap=2)
QUICK = Context(quick=True, repeats=1, threads=1, device=torch.device("cpu"))


def tiny_corpus() -> Corpus:
    text = b"def f(x):\n    return x + 1\n" * 40
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return Corpus(tokens, 1, hashlib.sha256(text).hexdigest(), "synthetic")


@pytest.fixture(scope="module")
def tiny():
    """The quick settings shrunk further, and a synthetic corpus in place of the standard library."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "LM_QUICK", TINY_LM)
        patch.setattr(bench, "MICRO_QUICK", TINY_MICRO)
        patch.setattr(bench, "CNN_QUICK", TINY_CNN)
        patch.setattr(bench, "load_corpus", tiny_corpus)
        bench.lm_data.cache_clear()
        yield
    bench.lm_data.cache_clear()


@pytest.fixture(scope="module")
def parts(tiny):
    names = ["micro", "lm:adamw", "lm:galore", "lm:dct", "cnn:adamw", "cnn:dct", "cnn:head"]
    cases = {case.name: case for case in bench.AREA.cases}
    return {name: cases[name].measure(QUICK) for name in names}


# --------------------------------------------------------------------------- data


def test_stdlib_sources_sorted_and_without_third_party(tmp_path):
    for relative in ("b.py", "a/z.py", "a/b.py", "site-packages/pkg/x.py", "a/notes.txt"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(relative.encode() + b"\n")
    sources = stdlib_sources(tmp_path)
    assert [path.relative_to(tmp_path).as_posix() for path in sources] == [
        "a/b.py",
        "a/z.py",
        "b.py",
    ]
    corpus = load_corpus(tmp_path)
    expected = b"a/b.py\na/z.py\nb.py\n"
    assert bytes(corpus.tokens.tolist()) == expected
    assert corpus.files == 3 and corpus.sha256 == hashlib.sha256(expected).hexdigest()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no \*\.py files"):
        load_corpus(empty)
    with pytest.raises(ValueError, match="must be a directory"):
        stdlib_sources(tmp_path / "missing")


def test_the_real_corpus_is_the_standard_library():
    sources = stdlib_sources()
    names = {path.name for path in sources}
    assert {"argparse.py", "typing.py"} <= names
    assert not any("site-packages" in path.parts for path in sources)


@given(st.integers(2, 500), st.floats(0.01, 0.99))
def test_split_tail_holds_out_the_tail(n, fraction):
    tokens = torch.arange(n)
    held_out = round(fraction * n)
    if held_out < 1 or held_out >= n:
        with pytest.raises(ValueError, match="empty split"):
            split_tail(tokens, fraction)
        return
    train, val = split_tail(tokens, fraction)
    assert val.numel() == held_out and torch.equal(torch.cat([train, val]), tokens)


@given(st.integers(1, 50), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31))
def test_batches_are_seeded_windows_inside_the_split(seq_len, batch, steps, seed):
    length = seq_len + 20
    tokens = torch.arange(length)
    starts = batch_starts(length, seq_len, batch, steps, seed)
    assert torch.equal(starts, batch_starts(length, seq_len, batch, steps, seed))
    assert starts.shape == (steps, batch)
    assert int(starts.min()) >= 0 and int(starts.max()) <= length - seq_len
    windows = gather_windows(tokens, starts[0], seq_len)
    for row, start in zip(windows, starts[0].tolist()):
        assert torch.equal(row, tokens[start : start + seq_len])


def test_validation_windows_are_consecutive_and_capped():
    tokens = torch.arange(23)
    windows = validation_windows(tokens, 5, max_windows=10)
    assert torch.equal(windows.flatten(), torch.arange(20))
    assert validation_windows(tokens, 5, max_windows=2).shape == (2, 5)
    with pytest.raises(ValueError, match="shorter than seq_len"):
        validation_windows(tokens, 30, max_windows=2)


def test_hidden_matrices_are_attention_and_mlp_weights():
    model = build_llama(LlamaShape(hidden=8, layers=2, heads=2, intermediate=16, seq_len=8), 0)
    hidden, rest = bench.hidden_and_rest(model)
    assert len(hidden) == 2 * 7 and all(param.ndim == 2 for param in hidden)
    named = dict(model.named_parameters())
    rest_names = {name for name, param in named.items() if any(param is r for r in rest)}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= rest_names
    assert len(hidden) + len(rest) == len(named)


# --------------------------------------------------------------------------- schedule and curve


@given(st.integers(2, 300), st.integers(1, 50), st.floats(0.0, 1.0))
def test_lr_factor_warms_up_then_decays_to_final(steps, warmup, final):
    warmup = min(warmup, steps)
    factors = [bench.lr_factor(step, steps, warmup, final) for step in range(steps + 1)]
    assert factors[warmup - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(factors[:warmup]))
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(factors[warmup - 1 :]))
    assert factors[steps] == pytest.approx(final) or warmup == steps
    assert all(final - 1e-12 <= factor <= 1.0 + 1e-12 for factor in factors[warmup - 1 :])


@given(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=700), st.integers(1, 1000))
def test_loss_curve_keeps_the_mean_and_the_token_count(losses, tokens_per_step):
    curve = bench.loss_curve(losses, tokens_per_step)
    assert len(curve["loss"]) <= bench.MAX_CURVE_POINTS
    assert curve["tokens"][-1] == len(losses) * tokens_per_step
    assert all(a < b for a, b in zip(curve["tokens"], curve["tokens"][1:]))
    sizes = [b - a for a, b in zip([0, *curve["tokens"]], curve["tokens"])]
    weighted = sum(size * mean for size, mean in zip(sizes, curve["loss"])) / curve["tokens"][-1]
    assert weighted == pytest.approx(sum(losses) / len(losses))


# --------------------------------------------------------------------------- state bytes


def stepped(optimizer_factory, rows=32, cols=24):
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(rows, cols))
    param.grad = torch.randn(rows, cols)
    optimizer = optimizer_factory(param)
    optimizer.step()
    return optimizer


def test_state_bytes_of_adamw_and_dct_match_their_shapes():
    adamw = stepped(lambda p: torch.optim.AdamW([p]))
    assert bench.state_bytes([adamw]) == (2 * 32 * 24 * 4 + 4, 2 * 32 * 24 * 4 + 4)
    dct = stepped(lambda p: DCTProjectedAdam([p], rank=4))
    # moments (32, 4) fp32, 4 int64 indices, two int64 step counters and the int64 compressed side
    expected = 2 * 32 * 4 * 4 + 4 * 8 + 3 * 8
    assert bench.state_bytes([dct]) == (expected, expected)
    assert bench.state_bytes([adamw, dct])[0] == 2 * 32 * 24 * 4 + 4 + expected


def test_state_bytes_count_galores_basis_and_the_svd_it_keeps_alive():
    galore_adamw = pytest.importorskip("galore_torch").GaLoreAdamW
    galore = stepped(
        lambda p: galore_adamw(
            [{"params": [p], "rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}],
            no_deprecation_warning=True,
        )
    )
    (state,) = galore.state.values()
    assert not isinstance(state["projector"], torch.Tensor)  # a Python object in the state
    moments = 2 * 32 * 4 * 4
    # basis Vh[:4] is (4, 24) but a view of the full (24, 24) Vh
    assert bench.state_bytes([galore]) == (moments + 4 * 24 * 4, moments + 24 * 24 * 4)


# --------------------------------------------------------------------------- the cases


def test_cases_are_the_method_tables():
    names = [case.name for case in bench.AREA.cases]
    assert names == [
        "micro", *(f"lm:{key}" for key in bench.LM_METHODS), "energy", *(f"cnn:{key}" for key in bench.CNN_METHODS)
    ]


def test_micro_times_every_row_and_carries_the_targets(parts):
    micro = parts["micro"]
    assert len(micro.comparisons) == len(bench.MICRO_COMPARISONS)
    assert [c.target is not None for c in micro.comparisons] == [True, True, True] + [False] * 8
    lm_size = [c for c in micro.comparisons if c.name.endswith(bench.LM_SIZE)]
    anchors = ["GaLoreAdamW steady" + bench.LM_SIZE] * 2 + ["torch.optim.Muon" + bench.LM_SIZE] * 2
    assert [c.anchor_name for c in lm_size] == anchors
    (state,) = micro.tables
    rows = {row[0]: row for row in state["rows"]}
    # rank 4 of 32: DCT keeps moments + indices, GaLore moments + a (4, 32) basis
    dct, galore = 2 * 32 * 4 * 4 + 4 * 8 + 3 * 8, 2 * 32 * 4 * 4 + 4 * 32 * 4
    assert rows["DCTProjectedAdam"][1] == bench.mib(dct) and rows["GaLoreAdamW"][1] == bench.mib(galore)
    (check,) = micro.checks
    assert check.value == pytest.approx(dct / galore) and check.met


def test_micro_row_failure_is_reported_not_raised(tiny, monkeypatch):
    def broken(params, rank, scale):
        raise RuntimeError("boom")

    def missing(params, rank, scale):
        raise ImportError("no module named galore_torch")

    dct = bench.MICRO_ROWS["DCTProjectedAdam steady"]
    rows = {"AdamW (foreach)": broken, "GaLoreAdamW steady": missing, "DCTProjectedAdam steady": dct}
    monkeypatch.setattr(bench, "MICRO_ROWS", rows)
    monkeypatch.setattr(bench, "LM_SIZE_ROWS", {})
    part = bench.measure_micro(QUICK)
    cells = {row[0]: row[1] for row in part.tables[0]["rows"]}
    assert cells["AdamW (foreach)"] == "failed: RuntimeError: boom"
    assert cells["GaLoreAdamW"].startswith("not available: no module")
    assert part.comparisons == [] and part.checks == []


@given(rows=st.integers(1, 12), cols=st.integers(1, 12), rank=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_subspace_energy_orders_svd_over_dct_columns_over_random(rows, cols, rank, seed):
    """Eckart-Young: no rank-r subspace keeps more than the top singular vectors; the r DCT
    columns of most energy keep at least their share r/d of it."""
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    svd, columns, random = bench.subspace_energy([matrix], rank)
    assert 1 + 1e-12 >= svd >= columns - 1e-12 and columns >= random - 1e-12
    if rank >= min(rows, cols):
        assert svd == pytest.approx(1.0) and columns == pytest.approx(1.0) and random == 1.0


def test_energy_case_reports_every_refresh_step(tiny):
    part = bench.measure_energy(QUICK)
    (table,) = part.tables
    assert [int(row[0]) for row in table["rows"]] == list(range(0, bench.LM_QUICK.steps, bench.LM_QUICK.update_gap))
    for _, svd, columns, random in table["rows"]:
        assert 1.0 + 1e-9 >= float(svd) >= float(columns) >= float(random) > 0


def test_lm_methods_share_init_and_data(parts):
    lm = {name: part for name, part in parts.items() if name.startswith("lm:")}
    first_losses = {part.data["curve"]["loss"][0] for part in lm.values()}
    assert len(first_losses) == 1  # same weights, same first batch: same first loss
    for part in lm.values():
        (row,) = part.tables[0]["rows"]
        assert row[-1] == "ok" and math.isfinite(part.data["val_loss"]) and row[7] == "-"  # no GPU peak
        assert len(part.data["val_losses"]) == TINY_LM.seeds
    state = {name: float(part.tables[0]["rows"][0][6]) for name, part in lm.items()}
    assert state["lm:dct"] < state["lm:adamw"]  # AdamW keeps two moments of every parameter


def _fake_train(calls, tune_loss):
    def fake_train(method, lr, settings, train, held_out, device):
        calls.append((lr, settings.seed))
        return {"status": "ok", "train_loss": 1.0, "tune_loss": tune_loss(lr), "val_loss": 2.0 + settings.seed,
                "tokens_per_s": 1.0, "optimizer_step": bench.Timing(1.0, 1.0, 0.0, 1), "state_bytes": 8,
                "peak_memory_bytes": None, "curve": {"tokens": [1], "loss": [1.0]}}  # fmt: skip

    return fake_train


def test_lm_sweeps_the_grid_then_its_refinement_on_the_first_seed_then_reruns_the_best_on_every_seed(
    tiny, monkeypatch
):
    calls = []
    grid = bench.LM_METHODS["muon"].grid
    # the tuning loss is lowest at the grid's second rate; validation loss differs per seed
    monkeypatch.setattr(bench, "train_lm", _fake_train(calls, lambda lr: abs(math.log(lr / grid[1])) + 1.0))
    part = bench.measure_lm("muon", QUICK)
    refined = bench.refinement(grid, grid[1])
    assert len(refined) == 2 and grid[0] < refined[0] < grid[1] < refined[1] < grid[2]
    assert calls == [(lr, 0) for lr in grid + refined] + [(grid[1], 1)]
    assert part.data["lr"] == grid[1] and part.data["val_losses"] == [2.0, 3.0]
    assert part.data["sweep"]["lr"] == sorted(grid + refined)
    lm_row = part.tables[0]["rows"][0]
    assert lm_row[1] == f"{grid[1]:g}" and lm_row[2] == "2.5000 ± 0.7071"
    (sweep_row,) = part.tables[1]["rows"]
    assert f"**{grid[1]:g}: 1.0000**" in sweep_row[1] and sweep_row[3] == "no"
    shown = [float(cell.strip("*").split(":")[0]) for cell in sweep_row[1].split(", ")]
    assert shown == sorted(grid + refined)


def test_lm_reruns_a_refined_rate_when_it_beats_the_coarse_grid(tiny, monkeypatch):
    calls = []
    grid = bench.LM_METHODS["aro"].grid
    between = bench.refinement(grid, grid[2])[1]  # between the grid's third and fourth rates
    monkeypatch.setattr(bench, "train_lm", _fake_train(calls, lambda lr: abs(math.log(lr / between)) + 1.0))
    part = bench.measure_lm("aro", QUICK)
    assert part.data["lr"] == between and calls[-1] == (between, 1)


@pytest.mark.parametrize(
    ("grid", "best", "expected"),
    [
        ((1e-4, 3e-4, 1e-3), 3e-4, (1.7e-4, 5.5e-4)),
        ((1e-4, 3e-4, 1e-3), 1e-3, (5.5e-4, 1.8e-3, 3.3e-3)),  # an edge: one coarse step beyond
        ((3e-3, 1e-3), 3e-3, (1.7e-3, 5.2e-3, 9e-3)),  # any order
        ((1e-3,), 1e-3, ()),
    ],
)
def test_refinement_adds_midpoints_around_the_best_and_a_step_beyond_an_edge(grid, best, expected):
    assert bench.refinement(grid, best) == expected


@given(st.lists(st.one_of(st.floats(0.5, 5.0), st.just(math.nan)), min_size=1, max_size=8))
def test_choose_lr_takes_the_lowest_finite_loss_first(losses):
    grid = tuple(10.0 ** -index for index in range(len(losses)))
    chosen = bench.choose_lr(grid, losses)
    finite = [loss for loss in losses if not math.isnan(loss)]
    if finite:
        assert losses[grid.index(chosen)] == min(finite)
        assert grid.index(chosen) == losses.index(min(finite))  # ties: the first
    else:
        assert chosen == grid[0]


@pytest.mark.parametrize("key", list(bench.LM_METHODS))
def test_every_lm_method_builds_and_steps_on_the_split_it_names(key):
    model = build_llama(TINY_SHAPE, 0)
    hidden, rest = bench.hidden_and_rest(model)
    method = bench.LM_METHODS[key]
    try:
        optimizers = method.build(hidden, rest, TINY_LM, method.grid[0])
    except ImportError as error:  # galore-torch missing
        pytest.skip(str(error))
    stepped = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in model.parameters()}  # every parameter, once
    windows = torch.randint(0, 256, (2, TINY_SHAPE.seq_len))
    before = [p.detach().clone() for p in hidden]
    for _ in range(2):  # SOAP's first step only sets up its basis, as the official code's
        bench.next_byte_loss(model, windows).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert all(not torch.equal(b, p) for b, p in zip(before, hidden))
    if key in ("muon", "aro", "aro-smaller", "aro-rms-norm", "soap"):  # the Muon-style split: AdamW on the rest
        assert isinstance(optimizers[1], torch.optim.AdamW)
        assert {id(p) for group in optimizers[1].param_groups for p in group["params"]} == {id(p) for p in rest}


def test_lm_run_is_deterministic(tiny):
    first, second = (bench.measure_lm("dct", QUICK).data for _ in range(2))
    assert first == second


def test_cnn_projects_conv_kernels_and_trains_the_same_parameters(parts):
    rows = {name: part.tables[0]["rows"][0] for name, part in parts.items() if name.startswith("cnn:")}
    assert all(row[-1] == "ok" for row in rows.values()), rows
    assert rows["cnn:adamw"][2] == rows["cnn:dct"][2] != rows["cnn:head"][2]
    assert float(rows["cnn:dct"][3]) < float(rows["cnn:adamw"][3])


# --------------------------------------------------------------------------- targets and page


def with_losses(**losses: float) -> dict[str, Part]:
    return {
        f"lm:{key}": Part(data={"label": key, "val_loss": loss, "state_bytes": 100 if key == "galore" else 90})
        for key, loss in losses.items()
    }


def test_summary_applies_the_loss_and_state_targets_where_both_sides_ran():
    met = bench.summary(with_losses(adamw=2.0, galore=2.05, dct=2.04)).checks
    assert [(check.name, check.met) for check in met] == [
        ("dct vs adamw: validation loss", True), ("dct vs galore: validation loss", True),
        ("dct vs galore: state bytes", True),
    ]  # fmt: skip
    missed = bench.summary(with_losses(adamw=2.0, galore=2.0, dct=2.05)).checks
    assert [check.met for check in missed] == [False, False, True]
    assert missed[0].shown == "2.0500 / 2.0000 = 1.0250x"
    assert bench.summary(with_losses(dct=1.0)).checks == []


def test_summary_holds_aro_to_muon_and_adamw_and_soap_to_adamw():
    checks = bench.summary(with_losses(adamw=2.0, muon=1.9, aro=1.85, soap=2.01)).checks
    assert [(check.name, check.met) for check in checks] == [
        ("aro vs muon: validation loss", True), ("aro vs adamw: validation loss", True),
        ("soap vs adamw: validation loss", False),
    ]  # fmt: skip
    assert [check.target.threshold for check in checks] == [1.0, 0.93, 1.0]


def test_page_from_parts_measured_in_two_runs(parts, tmp_path):
    here, elsewhere, page = tmp_path / "cpu.json", tmp_path / "gpu.json", tmp_path / "docs" / "benchmarks.md"
    save_results(here, {name: part for name, part in parts.items() if not name.startswith("lm:")})
    save_results(elsewhere, {name: part for name, part in parts.items() if name.startswith("lm:")})
    page.parent.mkdir()
    page.write_text("# Benchmarks\n\n<!-- BEGIN optim -->\nold\n<!-- END optim -->\n")
    argv = ["--render", "--out", str(here), "--merge", str(elsewhere), "--page", str(page), "--threads", "1"]
    assert main(bench.AREA, argv) == 0
    text = page.read_text()
    assert "\nold\n" not in text and f"#### {bench.LM_TABLE}" in text and f"#### {bench.CNN_TABLE}" in text
    assert "| DCTProjectedAdam vs AdamW: validation loss: <= 1.02x AdamW's |" in text
    assert (page.parent / "img" / "optim_ratios.png").stat().st_size > 0
    assert "](img/optim_lm_loss.png)" in text and "](img/optim_lm_lr.png)" in text


def test_interleaved_rows_take_their_samples_in_rotating_turns():
    """The LM-size rows are timed round by round (one sample of each row, the order rotated each
    round), so a drift of the machine's speed reaches every row alike; a failing row is reported
    without stopping the others."""
    order = []

    def recording(name):
        class Recorder(torch.optim.SGD):
            def step(self, closure=None):
                order.append(name)
                return super().step(closure)

        return lambda params, rank, scale: Recorder(params, lr=0.1)

    def broken(params, rank, scale):
        raise RuntimeError("no")

    context = bench.Context(quick=True, repeats=3, threads=1, device=torch.device("cpu"))
    builds = {"a": recording("a"), "b": broken, "c": recording("c")}
    rows = bench.time_micro_rows_interleaved(builds, [(torch.zeros(2, 2), torch.ones(2, 2))], 1, 1.0, 3, context, 2)
    assert rows["b"] == "failed: RuntimeError: no"
    assert rows["a"][0].repeats == rows["c"][0].repeats == 3
    # one untimed step each, then rounds of two steps per sample: a c | c a | a c
    assert order == ["a", "c"] + ["a", "a", "c", "c"] + ["c", "c", "a", "a"] + ["a", "a", "c", "c"]
