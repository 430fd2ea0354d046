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
    shape=TINY_SHAPE,
    batch_size=2,
    tokens=2 * 16 * 4,
    update_gap=2,
    val_fraction=0.1,
    max_val_windows=4,
    tail_steps=2,
)
TINY_MICRO = bench.MicroSettings(size=32, rank=4, repeats=1, svd_repeats=1)
TINY_CNN = bench.CNNSettings(shots=2, steps=3, seeds=2, update_gap=2)


def tiny_corpus() -> Corpus:
    text = b"def f(x):\n    return x + 1\n" * 40
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return Corpus(tokens, 1, hashlib.sha256(text).hexdigest(), "synthetic")


def record(part: dict) -> dict:
    """A part as main() stores it: run details plus the part's own results."""
    return bench.run_record(torch.device("cpu"), "native pools: test", quick=True) | part


@pytest.fixture(scope="module")
def micro():
    return record(bench.run_micro(TINY_MICRO, torch.device("cpu")))


@pytest.fixture(scope="module")
def lm():
    return record(bench.run_lm(TINY_LM, torch.device("cpu"), corpus=tiny_corpus()))


@pytest.fixture(scope="module")
def cnn():
    # The plumbing does not need a pretrained network: a seeded random one stands in for it.
    torch.manual_seed(0)
    model = SmallResNet(num_classes=5, width=4)
    pretraining = {"epochs": 0, "test_accuracy": math.nan}
    split = load_digits_split()
    return record(
        bench.run_cnn(TINY_CNN, model.state_dict(), 4, split, torch.device("cpu"), pretraining)
    )


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
    # moments (32, 4) fp32, 4 int64 indices, two int64 step counters
    expected = 2 * 32 * 4 * 4 + 4 * 8 + 2 * 8
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


# --------------------------------------------------------------------------- the three parts


def test_micro_runs_every_row_and_checks_the_targets(micro):
    rows = micro["rows"]
    assert set(rows) == set(bench.MICRO_ROWS)
    assert all(row["status"] == "ok" for row in rows.values()), rows
    comparisons = bench.micro_comparisons(micro)
    assert len(comparisons) == len(bench.MICRO_COMPARISONS)
    assert [c.target is not None for c in comparisons] == [True, True] + [False] * 5
    checks = bench.micro_checks(micro)
    assert len(checks) == 3 and all(check.met is not None for check in checks)
    # rank 4 of 32: DCT keeps moments + indices, GaLore moments + a (4, 32) basis
    dct, galore = rows["DCTProjectedAdam steady"], rows["GaLoreAdamW steady"]
    assert dct["state_bytes"] == 2 * 32 * 4 * 4 + 4 * 8 + 2 * 8
    assert galore["state_bytes"] == 2 * 32 * 4 * 4 + 4 * 32 * 4
    assert rows["AdamW (fused)"]["state_bytes"] == rows["AdamW (foreach)"]["state_bytes"]


def test_micro_row_failure_is_reported_not_raised(monkeypatch):
    def broken(param, settings):
        raise RuntimeError("boom")

    def missing(param, settings):
        raise ImportError("no module named galore_torch")

    monkeypatch.setattr(bench, "MICRO_ROWS", {"broken": broken, "GaLoreAdamW refresh": missing})
    rows = bench.run_micro(TINY_MICRO, torch.device("cpu"))["rows"]
    assert rows["broken"] == {"status": "failed: RuntimeError: boom"}
    assert rows["GaLoreAdamW refresh"]["status"].startswith("not available: no module")
    checks = bench.micro_checks({"rows": rows})
    assert [check.met for check in checks] == [None, None, None]


def test_lm_methods_share_init_and_data_and_report_everything(lm):
    methods = lm["methods"]
    assert list(methods) == list(TINY_LM.methods)
    assert all(result["status"] == "ok" for result in methods.values()), methods
    first_losses = {result["curve"]["loss"][0] for result in methods.values()}
    assert len(first_losses) == 1  # same weights, same first batch: same first loss
    for result in methods.values():
        assert math.isfinite(result["train_loss"]) and math.isfinite(result["val_loss"])
        assert result["steps"] == TINY_LM.steps and result["state_bytes"] > 0
        assert result["tokens_per_s"] > 0 and result["peak_memory_bytes"] is None
    # AdamW keeps two full moments of every parameter; the projected methods keep less
    assert methods["dct"]["state_bytes"] < methods["adamw"]["state_bytes"]
    assert lm["parameters"] > lm["hidden_parameters"] > 0


def test_lm_run_is_deterministic():
    settings = dataclasses.replace(TINY_LM, methods=("dct",))
    first, second = (
        bench.run_lm(settings, torch.device("cpu"), corpus=tiny_corpus())["methods"]["dct"]
        for _ in range(2)
    )
    assert first["curve"] == second["curve"] and first["val_loss"] == second["val_loss"]


def test_cnn_projects_conv_kernels_and_trains_the_same_parameters(cnn):
    methods = cnn["methods"]
    assert all(result["status"] == "ok" for result in methods.values()), methods
    assert (
        methods["adamw"]["trainable"] == methods["dct"]["trainable"] == methods["svd"]["trainable"]
    )
    assert methods["head"]["trainable"] == 5 * (2 * 4) + 5
    assert methods["dct"]["state_bytes"] < methods["adamw"]["state_bytes"]
    for result in methods.values():
        assert len(result["accuracies"]) == TINY_CNN.seeds
        assert all(0 <= accuracy <= 100 for accuracy in result["accuracies"])
        assert bench.Timing(**result["step"]).repeats == TINY_CNN.seeds * (TINY_CNN.steps - 1)


# --------------------------------------------------------------------------- targets and page


def lm_with_losses(**val_losses: float) -> dict:
    return {
        "methods": {key: {"status": "ok", "val_loss": loss} for key, loss in val_losses.items()}
    }


def test_lm_checks_apply_the_issue_targets():
    met = bench.lm_checks(lm_with_losses(adamw=2.0, galore=2.05, dct=2.04))
    assert [check.met for check in met] == [True, True]
    missed = bench.lm_checks(lm_with_losses(adamw=2.0, galore=2.0, dct=2.05))
    assert [check.met for check in missed] == [False, False]
    assert missed[0].measured == "1.0250x"
    assert [check.met for check in bench.lm_checks(lm_with_losses(dct=1.0))] == [None, None]
    assert [check.met for check in bench.lm_checks(None)] == [None, None]


def test_render_writes_every_part_plots_and_targets(micro, lm, cnn, tmp_path):
    page = tmp_path / "docs" / "benchmarks.md"
    body = bench.render({"micro": micro, "lm": lm, "cnn": cnn}, page)
    headings = [line for line in body.splitlines() if line.startswith("## ")]
    assert sum(heading.endswith("(quick smoke test)") for heading in headings) == 3
    assert "### Optimizer state" in body and "## Optimizers: targets" in body
    assert "](img/optim_micro.png)" in body and "](img/optim_lm_loss.png)" in body
    assert (tmp_path / "docs" / "img" / "optim_micro.png").stat().st_size > 0
    assert (tmp_path / "docs" / "img" / "optim_lm_loss.png").stat().st_size > 0
    assert "| DCTProjectedAdam validation loss <= 1.02x AdamW's |" in body
    for result in cnn["methods"].values():
        assert result["label"] in body
    only_lm = bench.render({"lm": lm}, None)
    assert "not run" in only_lm and "img/" not in only_lm


def test_main_merges_stored_parts_and_renders_the_page(micro, lm, tmp_path):
    stored, elsewhere = tmp_path / "results.json", tmp_path / "gpu.json"
    bench.save_results(stored, {"micro": micro})
    bench.save_results(elsewhere, {"lm": lm})
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\n<!-- BEGIN optim -->\nold\n<!-- END optim -->\n")
    argv = ["--render", "--out", str(stored), "--merge", str(elsewhere), "--page", str(page)]
    assert bench.main(argv) == 0
    assert set(json.loads(stored.read_text())) == {"micro", "lm"}
    text = page.read_text()
    assert "old" not in text and text.count("<!-- BEGIN optim -->") == 1
    assert "byte-level LLaMA pretraining" in text and "one step on a 32x32 parameter" in text


def test_results_file_with_an_unknown_part_is_rejected(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"bogus": {}}))
    with pytest.raises(ValueError, match="unknown parts"):
        bench.load_results(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["--only", "micro,bogus"],
        ["--lm-methods", "adamw,sgd"],
        ["--tokens", "0"],
        ["--cnn-steps", "1"],
    ],
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        bench.parse_arguments(argv)


def test_quick_arguments_write_nothing_by_default():
    arguments = bench.parse_arguments(["--quick", "--only", "lm", "--lm-methods", "dct,aro"])
    assert arguments.out is None and arguments.page is None
    assert arguments.parts == ("lm",) and arguments.lm.methods == ("dct", "aro")
    assert arguments.lm.shape == bench.LM_QUICK.shape and not arguments.lm.autocast
    full = bench.parse_arguments(["--tokens", "4096", "--lr-projected", "0.02"])
    assert full.out == bench.DEFAULT_JSON and full.page == bench.DEFAULT_PAGE
    assert full.lm.tokens == 4096 and full.lm.projected_lr == 0.02
