"""Fast checks of the adapters benchmark: data, validation set, rate choice, Allocator, peft, tables."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

import decomp.adapters
from benchmarks import adapters_bench as bench
from benchmarks.harness import Context, Part
from benchmarks.adapters_data import (
    Dataset,
    SmallResNet,
    few_shot,
    load_digits_split,
    validation_set,
)
from decomp.adapters.base import AdapterParam

# The tiny smoke configuration: 8x8 digits (no upsampling) and a width-4 network.
TINY_IMAGE, TINY_WIDTH = 8, 4


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


@pytest.fixture(scope="module")
def tiny_split():
    return load_digits_split(image_size=TINY_IMAGE)


@pytest.fixture
def tiny_model(monkeypatch):
    """A seeded random width-4 network in place of the pretrained one: the plumbing needs no
    pretraining."""

    def build(quick, num_classes, seed):
        torch.manual_seed(seed)
        return SmallResNet(num_classes=num_classes, width=TINY_WIDTH)

    monkeypatch.setattr(bench, "fine_tuning_model", build)


@pytest.fixture(scope="module")
def methods():
    return bench.all_methods()


def test_split_sizes_and_labels(split):
    from sklearn.datasets import load_digits

    digits = torch.as_tensor(load_digits().target)
    pretrain_counts = torch.bincount(digits[digits < 5], minlength=5)
    finetune_counts = torch.bincount(digits[digits >= 5] - 5, minlength=5)
    train, test = split.pretrain_train, split.pretrain_test
    pool, held_out = split.finetune_pool, split.finetune_test

    def counts(part):
        return torch.bincount(part.labels, minlength=5)

    assert torch.equal(counts(train) + counts(test), pretrain_counts)
    assert torch.equal(counts(pool) + counts(held_out), finetune_counts)
    assert torch.equal(counts(train), torch.round(0.8 * pretrain_counts).long())
    assert torch.equal(counts(pool), torch.round(0.5 * finetune_counts).long())
    for part in (train, test, pool, held_out):
        assert part.images.shape == (len(part), 1, 32, 32)
        assert part.images.dtype == torch.float32
        assert part.labels.dtype == torch.int64
        assert set(part.labels.tolist()) == {0, 1, 2, 3, 4}
    pretrain_images = torch.cat([train.images, test.images])
    assert abs(float(pretrain_images.mean())) < 1e-4
    assert abs(float(pretrain_images.std()) - 1) < 1e-3


def test_pool_and_test_are_disjoint(split):
    def rows(images):
        return {tuple(image.flatten()[::7].tolist()) for image in images}

    assert not rows(split.finetune_pool.images) & rows(split.finetune_test.images)
    assert not rows(split.pretrain_train.images) & rows(split.pretrain_test.images)


def test_model_forward_shapes_and_layers():
    model = SmallResNet(num_classes=5, width=8)
    images = torch.randn(3, 1, 32, 32)
    assert model.features(images).shape == (3, 16)
    assert model(images).shape == (3, 5)
    depthwise = model.block3.depthwise
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 16
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    assert linears == ["head"]
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        SmallResNet(width=0)


def test_few_shot_is_deterministic_per_seed(split):
    pool = split.finetune_pool
    first, again = few_shot(pool, 4, seed=3), few_shot(pool, 4, seed=3)
    other = few_shot(pool, 4, seed=4)
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)
    assert torch.equal(torch.bincount(first.labels), torch.full((5,), 4))
    pool_rows = {tuple(image.flatten().tolist()) for image in pool.images}
    assert all(tuple(image.flatten().tolist()) in pool_rows for image in first.images)
    smallest = int(torch.bincount(pool.labels).min())
    with pytest.raises(ValueError, match=rf"shots must be an int in \[1, {smallest}\]"):
        few_shot(pool, smallest + 1, seed=0)


# --------------------------------------------------------------------------- validation set


@given(shots=st.integers(1, 6), per_class=st.integers(1, 6), seed=st.integers(0, 50))
def test_validation_set_is_stratified_and_disjoint_from_the_shots(split, shots, per_class, seed):
    pool = split.finetune_pool
    drawn = few_shot(pool, shots, seed)
    validation = validation_set(pool, shots, per_class, seed)
    assert torch.equal(torch.bincount(validation.labels), torch.full((5,), per_class))
    rows = {tuple(image.flatten().tolist()) for image in drawn.images}
    assert not any(tuple(image.flatten().tolist()) in rows for image in validation.images)
    pool_rows = {tuple(image.flatten().tolist()) for image in pool.images}
    assert all(tuple(image.flatten().tolist()) in pool_rows for image in validation.images)
    assert torch.equal(validation.images, validation_set(pool, shots, per_class, seed).images)


def test_validation_set_rejects_more_than_the_pool_holds(split):
    smallest = int(torch.bincount(split.finetune_pool.labels).min())
    with pytest.raises(ValueError, match=rf"shots \+ per_class must be an int in \[1, {smallest}\]"):
        validation_set(split.finetune_pool, 10, smallest - 9, seed=0)
    with pytest.raises(ValueError, match=r"shots \+ per_class must be an int"):
        validation_set(split.finetune_pool, 10, 2.0, seed=0)


# --------------------------------------------------------------------------- learning-rate choice


def test_lr_choice_prefers_accuracy_then_lower_loss():
    by_accuracy = bench.LrSelection((1e-3, 1e-2, 1e-1), (80.0, 90.0, 85.0), (0.1, 2.0, 0.2))
    assert by_accuracy.chosen == 1e-2
    tie = bench.LrSelection((1e-3, 1e-2, 1e-1), (90.0, 90.0, 60.0), (0.7, 0.3, 0.1))
    assert tie.chosen == 1e-2
    nan_loss = bench.LrSelection((1e-3, 1e-2), (90.0, 90.0), (math.nan, 5.0))
    assert nan_loss.chosen == 1e-2
    with pytest.raises(ValueError, match="one entry per rate"):
        bench.LrSelection((1e-3, 1e-2), (90.0,), (0.1, 0.2))


@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 50.0, 100.0]),
            st.one_of(st.just(math.nan), st.sampled_from([0.1, 0.5, 2.0])),
        ),
        min_size=1,
        max_size=7,
    )
)
def test_lr_choice_matches_a_sorting_oracle(scores):
    grid = tuple(10.0**-index for index in range(len(scores)))
    accuracy, loss = zip(*scores)
    selection = bench.LrSelection(grid, accuracy, loss)

    def order(index):
        return -accuracy[index], math.inf if math.isnan(loss[index]) else loss[index], index

    assert selection.chosen == grid[min(range(len(grid)), key=order)]


def _fake_run(lr: float, accuracy: float, loss: float = 1.0) -> bench.Run:
    return bench.Run(
        lr=lr,
        accuracy=accuracy,
        loss=loss,
        trainable=10,
        step_ms=[1.0],
        init_deviation=0.0,
        peak_bytes=100,
    )


def test_select_lr_trains_on_the_shots_and_scores_on_the_validation_set(split, monkeypatch):
    shots = few_shot(split.finetune_pool, 4, seed=2)
    validation = validation_set(split.finetune_pool, 4, 3, seed=2)
    calls = []

    def recording_fine_tune(method, quick, train, evaluate, **options):
        calls.append((train, evaluate, options))
        return _fake_run(options["lr"], 100.0 * options["lr"], loss=1.0 / len(calls))

    monkeypatch.setattr(bench, "fine_tune", recording_fine_tune)
    method = bench.Method("stub", None, ours=False)
    selection = bench.select_lr(
        method, True, shots, validation, grid=(0.5, 0.25), seed=2, steps=3, head_lr=3e-2, bn_train=False,
        device=torch.device("cpu"), snella_sparsity=0.5,
    )  # fmt: skip
    assert [options["lr"] for _, _, options in calls] == [0.5, 0.25]
    for train, evaluate, options in calls:
        assert train is shots and evaluate is validation
        assert not options["measure_memory"] and options["seed"] == 2 and options["steps"] == 3
    test_rows = {tuple(image.flatten().tolist()) for image in split.finetune_test.images}
    assert not any(tuple(image.flatten().tolist()) in test_rows for image in validation.images)
    assert selection.accuracy == (50.0, 25.0) and selection.loss == (1.0, 0.5)
    assert selection.chosen == 0.5


def test_one_rate_grid_runs_nothing(split, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("a one-rate grid must not train")

    monkeypatch.setattr(bench, "fine_tune", no_run)
    selection = bench.select_lr(
        bench.Method("stub", None, ours=False),
        True,
        few_shot(split.finetune_pool, 2, seed=0),
        validation_set(split.finetune_pool, 2, 2, seed=0),
        grid=(3e-3,),
        seed=0,
        steps=2,
        head_lr=3e-2,
        bn_train=False,
        device=torch.device("cpu"),
        snella_sparsity=0.5,
    )
    assert selection.chosen == 3e-3


def test_rate_is_chosen_once_on_the_first_seed(split, monkeypatch):
    selections, finals = [], []

    def fake_select(method, quick, shots, validation, *, grid, seed, **options):
        selections.append((seed, shots, validation))
        return bench.LrSelection(tuple(grid), (0.0, 100.0, 0.0), (1.0,) * len(grid))

    def fake_fine_tune(method, quick, train, evaluate, *, lr, measure_memory, seed, **options):
        finals.append((train, evaluate, lr, measure_memory, seed))
        return _fake_run(lr, 90.0)

    monkeypatch.setattr(bench, "select_lr", fake_select)
    monkeypatch.setattr(bench, "fine_tune", fake_fine_tune)
    settings = bench.Settings(seeds=3, shots=2, steps=2, lr_grid=(3e-4, 1e-3, 1e-2))
    context = Context(quick=True, repeats=1, threads=1, device=torch.device("cpu"))
    runs = bench.run_method(bench.Method("stub", None, ours=False), settings, context, bn_train=False)
    assert len(runs) == 3 and [seed for seed, _, _ in selections] == [0]
    assert torch.equal(selections[0][1].images, few_shot(split.finetune_pool, 2, 0).images)
    assert torch.equal(selections[0][2].images, validation_set(split.finetune_pool, 2, 20, 0).images)
    assert [lr for _, _, lr, _, _ in finals] == [1e-3] * 3
    for train, evaluate, _, measure_memory, seed in finals:
        assert torch.equal(train.images, few_shot(split.finetune_pool, 2, seed).images)
        assert torch.equal(evaluate.images, split.finetune_test.images) and measure_memory == (seed == 0)


def test_head_only_trains_at_the_heads_rate_and_chooses_none(tiny_model, monkeypatch):
    monkeypatch.setattr(bench, "QUICK", bench.Settings(seeds=2, shots=2, steps=2, lr_grid=(1e-3, 1e-2)))
    part = bench.measure_method("head", Context(quick=True, repeats=1, threads=1, device=torch.device("cpu")))
    (accuracy,) = part.tables  # no rate to choose: no selection table
    (row,) = accuracy["rows"]
    assert accuracy["title"] == f"{bench.ACCURACY} (BatchNorm frozen)"
    assert row[0] == "head only" and row[3] == f"{5 * (2 * TINY_WIDTH + 1):,}" and row[6] == "0.0e+00"
    assert row[2] == "0.03, 0.03"
    assert part.data["peak_bytes"] > 0 and bench.Timing(**part.data["step"]).repeats == 2


def test_an_adapter_end_to_end_fills_the_choice_and_shared_rate_tables(tiny_model, monkeypatch):
    monkeypatch.setattr(bench, "QUICK", bench.Settings(seeds=2, shots=2, steps=2, lr_grid=(1e-4, 1e-3, 3e-3)))
    context = Context(quick=True, repeats=1, threads=1, device=torch.device("cpu"))
    part = bench.measure_method("LDUParam", context, bn_train=True)
    accuracy, selection, shared = part.tables
    mode = "(BatchNorm statistics adapting)"
    assert [table["title"] for table in part.tables] == [
        f"{bench.ACCURACY} {mode}", f"{bench.SELECTION} {mode}", f"{bench.ROBUSTNESS} {mode}"
    ]
    assert selection["header"][1:] == ["val. acc. % at lr 0.0001", "val. acc. % at lr 0.001", "val. acc. % at lr 0.003"]
    scores = [float(cell) for cell in selection["rows"][0][1:]]
    (row,) = shared["rows"]
    assert row[2:4] == selection["rows"][0][2:4] and float(row[4]) == pytest.approx(min(scores[1:]) - max(scores))
    assert part.data["bn_train"] is True and part.data["shared_rate_gap"] == pytest.approx(min(scores[1:]) - max(scores))


def test_shared_rate_gap_needs_both_shared_rates():
    assert bench.shared_rate_gap((1e-3, 1e-2), (50.0, 60.0)) is None
    assert bench.shared_rate_gap((1e-3, 3e-3, 1e-2), (58.0, 61.0, 60.0)) == -3.0
    assert bench.shared_rate_gap((1e-3, 3e-3), (58.0, 61.0)) == -3.0  # the best is a shared rate
    with pytest.raises(ValueError, match="one entry per rate"):
        bench.shared_rate_gap((1e-3, 3e-3), (58.0,))


def test_test_set_curve_trains_every_rate_on_every_seed(tiny_model, monkeypatch):
    grid = (1e-3, 2e-3, 3e-3, 1e-2)
    protocol = bench.Settings(seeds=2, shots=2, steps=2, lr_grid=(1e-3, 3e-3, 1e-2), curve_grid=grid)
    monkeypatch.setattr(bench, "QUICK", protocol)
    calls = []
    real_fine_tune = bench.fine_tune

    def recording(method, quick, train, evaluate, **options):
        calls.append((method.name, options["lr"], options["seed"], options["bn_train"], len(evaluate)))
        return real_fine_tune(method, quick, train, evaluate, **options)

    monkeypatch.setattr(bench, "fine_tune", recording)
    part = bench.measure_curve("AtomParam", Context(quick=True, repeats=1, threads=1, device=torch.device("cpu")))
    test_size = len(load_digits_split().finetune_test)
    assert calls == [("AtomParam", lr, seed, False, test_size) for lr in grid for seed in (0, 1)]
    curve, shared = part.tables
    means = part.data["curve"]["accuracy"]
    assert part.data["curve"]["lr"] == list(grid) and part.data["variants"] == []
    assert [float(cell) for cell in curve["rows"][0][1:]] == pytest.approx(means, abs=0.05)
    on_grid = [means[0], means[2], means[3]]  # the protocol grid's rates: 2e-3 is not one
    assert part.data["shared_rate_gap"] == pytest.approx(min(on_grid[:2]) - max(on_grid))
    low, high = bench.good_window(grid, means)
    assert part.data["window"] == [low, high] and shared["rows"][0][-2] == f"{low:g} to {high:g}"
    checks = bench.summary({"lr-curve:AtomParam": part}).checks
    assert [check.name for check in checks] == [
        "[BatchNorm frozen] AtomParam test accuracy at the worse of lr 1e-3 and 3e-3 - the grid's best"
    ]


def test_curve_gap_is_on_the_protocol_grid_and_the_window_on_the_finer_one(monkeypatch):
    # A peak at 2e-3, a rate only the finer grid has: the gap ignores it, the window is built around it.
    grid = (1e-3, 2e-3, 3e-3, 1e-2, 3e-2)
    accuracy = {1e-3: 80.0, 2e-3: 95.0, 3e-3: 93.5, 1e-2: 90.0, 3e-2: 20.0}
    protocol = bench.Settings(seeds=2, shots=2, steps=2, lr_grid=(1e-3, 3e-3, 1e-2, 3e-2), curve_grid=grid)
    monkeypatch.setattr(bench, "QUICK", protocol)

    def scripted(method, quick, train, evaluate, *, lr, seed, **options):
        return bench.Run(lr=lr, accuracy=accuracy[lr] + (1.0 if seed else -1.0), loss=0.0, trainable=1,
                         step_ms=[], init_deviation=0.0, peak_bytes=None)  # fmt: skip

    monkeypatch.setattr(bench, "fine_tune", scripted)
    part = bench.measure_curve("AtomParam", Context(quick=True, repeats=1, threads=1, device=torch.device("cpu")))
    assert part.data["curve"]["accuracy"] == pytest.approx([accuracy[lr] for lr in grid])  # seeds averaged
    assert part.data["shared_rate_gap"] == pytest.approx(80.0 - 93.5)  # best of 1e-3, 3e-3, 1e-2, 3e-2
    assert part.data["window"] == [2e-3, 3e-3]  # 93.5 is within 2 of 95; 80 and 90 are not
    curve, shared = part.tables
    assert shared["rows"] == [
        ["AtomParam", "93.5 (0.003)", "80.0", "93.5", "-13.5", "95.0 (0.002)", "0.002 to 0.003", "1.5"]
    ]
    assert shared["header"][1] == "Best test acc. % (lr), protocol grid" and len(shared["header"]) == 8


def test_curve_rows_show_the_window_when_the_grid_lacks_a_shared_rate(monkeypatch):
    protocol = bench.Settings(seeds=1, shots=2, steps=2, lr_grid=(1e-3, 1e-2), curve_grid=(1e-3, 1e-2))
    monkeypatch.setattr(bench, "QUICK", protocol)

    def scripted(method, quick, train, evaluate, *, lr, seed, **options):
        return bench.Run(lr=lr, accuracy=90.0 if lr == 1e-3 else 89.0, loss=0.0, trainable=1, step_ms=[],
                         init_deviation=0.0, peak_bytes=None)  # fmt: skip

    monkeypatch.setattr(bench, "fine_tune", scripted)
    part = bench.measure_curve("AtomParam", Context(quick=True, repeats=1, threads=1, device=torch.device("cpu")))
    assert part.data["shared_rate_gap"] is None
    row = ["AtomParam", "90.0 (0.001)", "90.0", "-", "-", "90.0 (0.001)", "0.001 to 0.01", "10"]
    assert part.tables[1]["rows"] == [row]
    assert bench.summary({"lr-curve:AtomParam": part}).checks == []  # no gap, no check


def test_loras_curve_also_runs_at_each_lora_alpha_multiple(tiny_model, monkeypatch):
    grid, multiples = (1e-3, 3e-3), (1, 3)
    protocol = bench.Settings(seeds=1, shots=2, steps=2, lr_grid=grid, curve_grid=grid, lora_alpha_multiples=multiples)
    monkeypatch.setattr(bench, "QUICK", protocol)
    calls, methods = [], {}
    real_fine_tune = bench.fine_tune

    def recording(method, quick, train, evaluate, **options):
        calls.append((method.name, options["lr"]))
        methods[method.name] = method
        return real_fine_tune(method, quick, train, evaluate, **options)

    monkeypatch.setattr(bench, "fine_tune", recording)
    part = bench.measure_curve("lora8", Context(quick=True, repeats=1, threads=1, device=torch.device("cpu")))
    names = ["peft LoRA r=8", "peft LoRA r=8, lora_alpha=24"]
    assert calls == [(name, lr) for name in names for lr in grid]
    for name, multiple in zip(names, multiples):
        model = bench.fine_tuning_model(True, bench.FINETUNE_CLASSES, 0)
        methods[name].prepare(model)
        scalings = [module.scaling["default"] for module in model.modules() if hasattr(module, "scaling")]
        assert scalings and all(scaling == multiple for scaling in scalings)  # lora_alpha / r
    curve, shared = part.tables
    assert [row[0] for row in curve["rows"]] == [row[0] for row in shared["rows"]] == names
    assert part.data["name"] == names[0] and [variant["name"] for variant in part.data["variants"]] == names[1:]
    assert bench.summary({"lr-curve:lora8": part}).checks == []  # the anchor's rows are information


def test_curve_grid_must_hold_the_protocol_grid_in_ascending_order():
    with pytest.raises(ValueError, match="must hold every rate"):
        bench.Settings(lr_grid=(1e-3, 3e-3), curve_grid=(1e-3, 1e-2))
    with pytest.raises(ValueError, match="ascending"):
        bench.Settings(lr_grid=(1e-3,), curve_grid=(1e-2, 1e-3))
    with pytest.raises(ValueError, match="ascending"):
        bench.Settings(lr_grid=(1e-3,), curve_grid=(1e-3, 1e-3, 1e-2))


def test_good_window_is_the_run_of_rates_around_the_best_within_two_points():
    grid = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    assert bench.good_window(grid, (90.0, 90.0, 91.5, 20.0, 91.0)) == (1e-3, 1e-2)  # 1e-1 is past a collapse
    assert bench.good_window(grid, (95.0, 90.0, 94.0, 94.5, 93.5)) == (1e-3, 1e-3)
    assert bench.good_window(grid, (20.0, 20.0, 20.0, 20.0, 20.0)) == (1e-3, 1e-1)
    with pytest.raises(ValueError, match="one entry per rate"):
        bench.good_window(grid, (1.0,))


def test_a_failing_method_is_a_row_with_its_error(monkeypatch):
    def broken(method, settings, context, *, bn_train):
        raise RuntimeError("cannot adapt\nsecond line")

    monkeypatch.setattr(bench, "run_method", broken)
    part = bench.measure_method("AtomParam", Context(quick=True, repeats=1, threads=1, device=torch.device("cpu")))
    assert part.tables[0]["rows"] == [["AtomParam", "failed: RuntimeError: cannot adapt", *("-",) * 5]]
    assert part.data == {}


# --------------------------------------------------------------------------- SNELLA's Allocator


@pytest.mark.parametrize("measure_memory", [False, True])
def test_loop_calls_the_allocator_after_every_backward_and_step(
    tiny_split, tiny_model, methods, monkeypatch, measure_memory
):
    events, allocators = [], []

    class RecordingAllocator(decomp.adapters.Allocator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            allocators.append(self)

        def step(self):
            # zero_grad(set_to_none=True) opens every step: a gradient here is this step's.
            has_grad = any(a.in_points.grad is not None for a in self.adapters)
            events.append(("allocator.step", has_grad))
            super().step()

        def update_budget(self, t):
            events.append(("update_budget", t))
            return super().update_budget(t)

    monkeypatch.setattr(decomp.adapters, "Allocator", RecordingAllocator)
    handle = register_optimizer_step_post_hook(lambda *args: events.append("optimizer.step"))
    shots = few_shot(tiny_split.finetune_pool, 2, seed=0)
    try:
        run = bench.fine_tune(
            methods["SNELLAParam"],
            True,
            shots,
            tiny_split.finetune_test,
            seed=0,
            steps=3,
            lr=1e-3,
            head_lr=3e-2,
            bn_train=False,
            device=torch.device("cpu"),
            snella_sparsity=0.4,
            measure_memory=measure_memory,
        )
    finally:
        handle.remove()
    expected = []
    for t in (1, 2, 3):
        expected += [("allocator.step", True), "optimizer.step", ("update_budget", t)]
    assert events == expected
    (allocator,) = allocators
    backbone = [
        m for n, m in SmallResNet(5, TINY_WIDTH).named_modules() if bench.is_backbone_layer(n, m)
    ]
    assert len(allocator.adapters) == len(backbone)
    assert allocator.target_sparsity == 0.4 and allocator.total_steps == 3
    assert sum(a.keep_count for a in allocator.adapters) == allocator.target_budget
    assert (run.peak_bytes is not None) == measure_memory and len(run.step_ms) == 2


def test_no_allocator_without_snella_layers(methods):
    for key in ("head", "AtomParam"):
        model = SmallResNet(5, TINY_WIDTH).eval()
        methods[key].prepare(model)
        assert bench.snella_allocator(model, steps=5, target_sparsity=0.5) is None


# --------------------------------------------------------------------------- peft baselines


@pytest.mark.parametrize("key", ["lora8", "lokr8", "loha8"])
def test_peft_baselines_start_unchanged_on_loras_layers(methods, key):
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    model = SmallResNet(5, TINY_WIDTH).eval()
    expected_layers = bench.peft_targets(model)
    assert "block3.depthwise" not in expected_layers and "head" not in expected_layers
    assert len(expected_layers) == 7
    images = torch.randn(3, 1, TINY_IMAGE, TINY_IMAGE)
    before = model(images)
    methods[key].prepare(model)
    torch.testing.assert_close(model(images), before, rtol=0, atol=0)
    adapted = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    assert adapted == expected_layers
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert {"head.weight", "head.bias"} <= set(trainable)
    assert all(name.startswith("head.") or "base_layer" not in name for name in trainable)
    assert not any(p.requires_grad for p in model.block3.depthwise.parameters())


# --------------------------------------------------------------------------- reporting


class ChannelScale(AdapterParam):
    """A test adapter with a shape-dependent count: W' = W * (1 + s), s per output channel, tap."""

    def _build(self, weight: torch.Tensor) -> None:
        shape = (weight.shape[0], *weight.shape[2:])
        self.scale = nn.Parameter(torch.zeros(shape, dtype=weight.dtype))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale.unsqueeze(1)

    @classmethod
    def trainable_count(cls, shape: tuple[int, ...]) -> int:
        count = shape[0]
        for size in shape[2:]:
            count *= size
        return count


def test_parameter_count_from_shapes_matches_registered_count():
    meta_model = bench.build_on_meta(lambda: SmallResNet(num_classes=5, width=8))
    from_shapes = bench.adapter_parameter_count(ChannelScale, meta_model, exclude=bench.HEAD)
    model = SmallResNet(num_classes=5, width=8)
    for name, module in model.named_modules():
        if bench.is_backbone_layer(name, module):
            parametrize.register_parametrization(module, "weight", ChannelScale())
    registered = sum(
        adapter.num_trainable() for adapter in model.modules() if isinstance(adapter, ChannelScale)
    )
    assert from_shapes == registered == 8 * 9 + 8 * 9 * 2 + 16 * 9 * 2 + 16 + 16 * 9 + 16


def test_profiled_peak_counts_a_known_allocation():
    elements = 1 << 20

    def step() -> None:
        block = torch.ones(elements)
        del block

    assert bench.profiled_peak_bytes(step) >= 4 * elements


def _data(name: str, ours: bool, accuracy: float, trainable: int, step_ms: float, peak: int) -> Part:
    step = {"median_ms": step_ms, "min_ms": step_ms, "iqr_ms": 0.0, "repeats": 1}
    return Part(data={"name": name, "ours": ours, "accuracy": accuracy, "accuracy_std": 0.0,
                      "trainable": trainable, "step": step, "peak_bytes": peak})  # fmt: skip


def test_targets_report_misses_as_measured():
    parts = {
        "full": _data("full fine-tuning", False, 90.0, 10_000, 1.0, 100),
        "lora8": _data("peft LoRA r=8", False, 85.0, 1_000, 1.0, 100),
        "AtomParam": _data("AtomParam", True, 88.5, 50, 1.2, 111),
        "head": Part(),  # failed: no data, no rows in the summary
    }
    result = bench.summary(parts)
    assert [(c.name, c.target is not None, c.met) for c in result.comparisons] == [
        ("full fine-tuning step", False, None), ("AtomParam step", True, True)
    ]
    checks = {check.name: check for check in result.checks}
    assert checks["AtomParam peak memory"].met is False and checks["AtomParam peak memory"].shown == "1.11x"
    assert checks["AtomParam accuracy - full fine-tuning's"].met is False
    assert checks["AtomParam accuracy - full fine-tuning's"].shown == "-1.5 points"
    assert checks["AtomParam trainable share of full fine-tuning"].met is True


def test_lycoris_ratios_are_information_against_lokr_and_loha():
    parts = {
        "lora8": _data("peft LoRA r=8", False, 85.0, 1_000, 1.0, 100),
        "lokr8": _data("peft LoKr r=8", False, 85.0, 300, 2.0, 200),
        "loha8": _data("peft LoHa r=8", False, 85.0, 3_000, 4.0, 400),
        "AtomParam": _data("AtomParam", True, 88.5, 50, 1.0, 100),
    }
    (table,) = bench.summary(parts).tables
    assert table["header"] == [
        "Method", "step / peft LoKr r=8", "peak memory / peft LoKr r=8",
        "step / peft LoHa r=8", "peak memory / peft LoHa r=8",
    ]  # fmt: skip
    assert table["rows"] == [["AtomParam", "0.50x", "0.50x", "0.25x", "0.25x"]]
    assert not any("LoKr" in check.name or "LoHa" in check.name for check in bench.summary(parts).checks)
    assert bench.summary({"AtomParam": parts["AtomParam"]}).tables == []


def test_cases_are_the_baselines_every_adapter_in_both_batchnorm_modes_and_at_width():
    names = [case.name for case in bench.AREA.cases]
    adapters = list(decomp.adapters.registered())
    assert names[:6] == ["full", "head", "lora4", "lora8", "lokr8", "loha8"] and names[6 : 6 + len(adapters)] == adapters
    bn_train = [name.removeprefix("bn-train:") for name in names if name.startswith("bn-train:")]
    scale = [name.removeprefix("scale:") for name in names if name.startswith("scale:")]
    curves = [name.removeprefix("lr-curve:") for name in names if name.startswith("lr-curve:")]
    assert bn_train == ["head", "lora8", *adapters] and scale == curves == ["lora8", *adapters]
    assert "parameters" in names and len(names) == len(set(names))


# --------------------------------------------------------------------------- head rate, BatchNorm mode


@pytest.mark.parametrize("bn_train", [False, True])
def test_head_gets_its_own_rate_and_batchnorm_adapts_only_in_train_mode(tiny_split, methods, monkeypatch, bn_train):
    built, groups = [], []

    def build(quick, num_classes, seed):
        torch.manual_seed(seed)
        built.append(SmallResNet(num_classes=num_classes, width=TINY_WIDTH))
        return built[-1]

    monkeypatch.setattr(bench, "fine_tuning_model", build)
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: groups.append(optimizer.param_groups))
    try:
        bench.fine_tune(
            methods["lora8"], True, few_shot(tiny_split.finetune_pool, 2, seed=0), tiny_split.finetune_test,
            seed=0, steps=2, lr=1e-3, head_lr=3e-2, bn_train=bn_train, device=torch.device("cpu"),
            snella_sparsity=0.5, measure_memory=False,
        )  # fmt: skip
    finally:
        handle.remove()
    (model,) = built
    backbone_group, head_group = groups[0]
    assert backbone_group["lr"] == 1e-3 and head_group["lr"] == 3e-2
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.head.parameters()}
    assert backbone_group["params"] and all(p.requires_grad for p in backbone_group["params"])
    assert not model.training  # scored in eval mode either way
    statistics_moved = not torch.equal(model.stem[1].running_mean, torch.zeros_like(model.stem[1].running_mean))
    assert statistics_moved == bn_train


def _accuracy(name: str, ours: bool, accuracy: float, std: float = 0.0, trainable: int = 1_000,
              gap: float | None = None) -> Part:  # fmt: skip
    step = {"median_ms": 1.0, "min_ms": 1.0, "iqr_ms": 0.0, "repeats": 1}
    return Part(data={"name": name, "ours": ours, "accuracy": accuracy, "accuracy_std": std, "trainable": trainable,
                      "step": step, "peak_bytes": 100, "shared_rate_gap": gap})  # fmt: skip


def test_accuracy_targets_in_both_batchnorm_modes():
    frozen = {
        "head": _accuracy("head only", False, 70.0, trainable=100),
        "lora8": _accuracy("peft LoRA r=8", False, 90.0, trainable=10_100),
        "SNELLAParam": _accuracy("SNELLAParam", True, 87.5, gap=-1.0),
        "AtomParam": _accuracy("AtomParam", True, 72.0, trainable=1_100, gap=-2.5),
        "LDUParam": _accuracy("LDUParam", True, 85.0, std=3.5),
    }
    adapting = {"bn-train:head": _accuracy("head only", False, 70.0), "bn-train:AtomParam": _accuracy("AtomParam", True, 74.0)}
    checks = {check.name: check for check in bench.summary(frozen | adapting).checks}
    frozen_met = {name.removeprefix("[BatchNorm frozen] "): c.met for name, c in checks.items() if "frozen" in name}
    assert frozen_met == {
        "SNELLAParam accuracy - head only's": True, "AtomParam accuracy - head only's": False,
        "LDUParam accuracy - head only's": True,
        "SNELLAParam val. accuracy at the worse of lr 0.001 and 0.003 - the grid's best": True,
        "AtomParam val. accuracy at the worse of lr 0.001 and 0.003 - the grid's best": False,
        "SNELLAParam accuracy - peft LoRA r=8's": False, "AtomParam accuracy - peft LoRA r=8's": False,
        "AtomParam trainable / peft LoRA r=8's (head excluded)": True, "LDUParam accuracy std over seeds": False,
    }  # fmt: skip
    adapting_checks = [name for name in checks if name.startswith("[BatchNorm statistics adapting]")]
    assert adapting_checks == ["[BatchNorm statistics adapting] AtomParam accuracy - head only's"]
    assert checks[adapting_checks[0]].met is True and checks[adapting_checks[0]].shown == "+4.0 points"
    atom_share = checks["[BatchNorm frozen] AtomParam trainable / peft LoRA r=8's (head excluded)"]
    assert atom_share.value == pytest.approx(1_000 / 10_000) and atom_share.met


# --------------------------------------------------------------------------- transformer width


def test_steady_peak_counts_parameters_and_optimizer_state():
    layer = nn.Linear(64, 64, bias=False)
    optimizer = torch.optim.AdamW(layer.parameters())
    inputs = torch.randn(8, 64)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        layer(inputs).square().mean().backward()
        optimizer.step()

    step()
    weight_bytes = 64 * 64 * 4
    # weight + two moments resident, plus at least the gradient the step allocates
    assert bench.steady_peak_bytes(layer, optimizer, step, torch.device("cpu")) >= 4 * weight_bytes


@pytest.fixture(scope="module")
def width_parts():
    context = Context(quick=True, repeats=1, threads=1, device=torch.device("cpu"))
    return {f"scale:{key}": bench.measure_scale(key, context) for key in ("lora8", "DCTParam", "LieParam")}


def test_width_case_measures_every_mode_at_every_width(width_parts):
    lora, dct, lie = (width_parts[f"scale:{key}"].data for key in ("lora8", "DCTParam", "LieParam"))
    widths = [str(width) for width, _, _ in bench.SCALE_QUICK.widths]
    assert list(lora["widths"]) == list(dct["widths"]) == list(lie["widths"]) == widths
    for width, layers, repeats in bench.SCALE_QUICK.widths:
        measured = lora["widths"][str(width)]
        assert measured["trainable"] == layers * 2 * 8 * width  # peft LoRA r=8: A and B per layer
        for data in (lora, dct, lie):
            for mode in bench.SCALE_MODES:
                entry = data["widths"][str(width)][mode]
                assert entry["peak_bytes"] > 0 and entry["step"]["repeats"] == repeats
        # DCT takes the branch and is measured on the weight path apart; Lie has no branch form.
        assert dct["widths"][str(width)]["branch"] and not lie["widths"][str(width)]["branch"]
        assert dct["widths"][str(width)]["weight"] != dct["widths"][str(width)]["plain"]
        assert lie["widths"][str(width)]["weight"] == lie["widths"][str(width)]["plain"]
    (table,) = width_parts["scale:DCTParam"].tables
    assert table["title"] == bench.SCALE and [row[1] for row in table["rows"]] == ["32 x 2", "64 x 1"]
    assert [row[3] for row in table["rows"]] == ["branch", "branch"]


def test_width_targets_bound_the_default_step_and_inform_on_the_weight_path(width_parts):
    result = bench.summary(width_parts)
    names = [(c.name, c.target is not None) for c in result.comparisons]
    assert names == [
        ("DCTParam step, width 32", True), ("DCTParam step, width 32, weight path", False),
        ("DCTParam step, width 32, weight path in cached()", False),
        ("DCTParam step, width 64", True), ("DCTParam step, width 64, weight path", False),
        ("DCTParam step, width 64, weight path in cached()", False),
        ("LieParam step, width 32", True), ("LieParam step, width 32, cached()", False),
        ("LieParam step, width 64", True), ("LieParam step, width 64, cached()", False),
    ]  # fmt: skip
    assert [check.name for check in result.checks] == [
        f"{name} peak memory, width {width}" for name in ("DCTParam", "LieParam") for width in (32, 64)
    ]
    assert all(check.target.threshold == 1.15 for check in result.checks)


def test_a_failing_adapter_at_width_is_a_row(monkeypatch):
    def broken(key, model, branch=True):
        raise RuntimeError("no such layer")

    monkeypatch.setattr(bench, "prepare_scale", broken)
    part = bench.measure_scale("AtomParam", Context(quick=True, repeats=1, threads=1, device=torch.device("cpu")))
    assert part.data == {} and all(row[2] == "failed: RuntimeError: no such layer" for row in part.tables[0]["rows"])
