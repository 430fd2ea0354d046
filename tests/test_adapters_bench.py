"""Fast checks of the adapters benchmark's pieces: data splits, model, sampler, counts, memory, targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from benchmarks import adapters_bench as bench
from benchmarks.adapters_data import SmallResNet, few_shot, load_digits_split
from decomp.adapters.base import AdapterParam


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


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
        assert part.images.shape == (len(part), 1, 32, 32) and part.images.dtype == torch.float32
        assert part.labels.dtype == torch.int64 and set(part.labels.tolist()) == {0, 1, 2, 3, 4}
    pretrain_images = torch.cat([train.images, test.images])
    assert abs(float(pretrain_images.mean())) < 1e-4 and abs(float(pretrain_images.std()) - 1) < 1e-3


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
    first, again, other = few_shot(pool, 4, seed=3), few_shot(pool, 4, seed=3), few_shot(pool, 4, seed=4)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)
    assert torch.equal(torch.bincount(first.labels), torch.full((5,), 4))
    pool_rows = {tuple(image.flatten().tolist()) for image in pool.images}
    assert all(tuple(image.flatten().tolist()) in pool_rows for image in first.images)
    smallest = int(torch.bincount(pool.labels).min())
    with pytest.raises(ValueError, match=rf"shots must be an int in \[1, {smallest}\]"):
        few_shot(pool, smallest + 1, seed=0)


class ChannelScale(AdapterParam):
    """A test adapter with a shape-dependent count: W' = W * (1 + s) with s per output channel and tap."""

    def _build(self, weight: torch.Tensor) -> None:
        self.scale = nn.Parameter(torch.zeros(weight.shape[0], *weight.shape[2:], dtype=weight.dtype))

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


def _result(name: str, ours: bool, accuracy: float, trainable: int, step_ms: float, peak: int):
    run = bench.Run(accuracy=accuracy, trainable=trainable, step_ms=[step_ms], init_deviation=0.0, peak_bytes=peak)
    return bench.MethodResult(bench.Method(name, None, ours=ours), "ok", [run])


def test_targets_report_misses_as_measured():
    results = {
        "full": _result("full fine-tuning", False, 90.0, 10_000, 1.0, 100),
        "lora8": _result("peft LoRA r=8", False, 85.0, 1_000, 1.0, 100),
        "AtomParam": _result("AtomParam", True, 88.5, 50, 1.2, 111),
    }
    checks = {check.description: check for check in bench.target_checks(results)}
    assert checks["AtomParam accuracy within 1 point of full fine-tuning"].met is False
    assert checks["AtomParam trainable parameters < 1% of full fine-tuning"].met is True
    assert checks["AtomParam step time <= 1.3x peft LoRA r=8"].met is True
    assert checks["AtomParam peak memory <= 1.1x peft LoRA r=8"].met is False
    table = bench.targets_table(list(checks.values()))
    assert "-1.5 points" in table and "**no**" in table


def test_unavailable_adapter_is_reported_not_run():
    placeholder = bench.Method("Placeholder", None, ours=True, unavailable="decomp.adapters.X is a placeholder")
    result = bench.run_method(placeholder, {}, 8, None, None)
    assert result.status == "not available: decomp.adapters.X is a placeholder" and not result.runs
