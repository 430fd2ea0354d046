"""TuckerParam (FLoRA): identity at init, the Tucker formula, merge, gradients, counts, the linear branch, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import TuckerParam
from tests.strategies import SEEDS, relative_error
from tests.adapters.strategies import BATCH_SHAPES, assert_branch_is_the_weight_path, default_fits, layers, seeded



def configs():
    return st.fixed_dictionaries(
        {},
        optional={
            "spatial_rank": st.integers(1, 3),
            "init": st.sampled_from(["tucker", "random"]),
            "scale": st.floats(0.1, 4.0),
        },
    )


def perturb(adapter: nn.Module, seed: int, size: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(size * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def dense_tucker(core: torch.Tensor, factors: dict[int, torch.Tensor]) -> torch.Tensor:
    """The Tucker product by a single einsum over named modes: an oracle independent of the code."""
    letters = "abcde"
    upper = "ABCDE"
    inputs, operands = [letters[: core.ndim]], [core]
    output = list(letters[: core.ndim])
    for mode, factor in factors.items():
        inputs.append(upper[mode] + letters[mode])
        operands.append(factor)
        output[mode] = upper[mode]
    return torch.einsum(",".join(inputs) + "->" + "".join(output), *operands)


@given(layers(), configs())
def test_identity_at_init(case, config):
    layer, x = case
    before = layer(x)
    assume(default_fits(TuckerParam(**config), layer))
    parametrize.register_parametrization(layer, "weight", TuckerParam(**config))
    assert torch.equal(layer(x), before)


@given(layers(), configs(), SEEDS)
def test_delta_is_the_tucker_product_and_merge_matches(case, config, seed):
    layer, x = case
    adapter = TuckerParam(**config)
    assume(default_fits(adapter, layer))
    parametrize.register_parametrization(layer, "weight", adapter)
    perturb(adapter, seed)
    weight = layer.parametrizations.weight.original
    factors = dict(zip(adapter.factored_modes, adapter.factors))
    expected = weight + adapter.applied_scale * dense_tucker(adapter.core, factors)
    assert relative_error(layer.weight.detach(), expected.detach()) < 1e-10
    unmerged = layer(x)
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert relative_error(layer(x).detach(), unmerged.detach()) < 1e-10


@given(st.integers(1, 10), st.integers(1, 10), configs(), BATCH_SHAPES, SEEDS)
def test_branch_is_exactly_zero_at_init_and_the_weight_path_after(rows, columns, config, batch, seed):
    weight = torch.randn(rows, columns, generator=seeded(seed), dtype=torch.float64)
    assume(default_fits(TuckerParam(**config), weight))
    torch.manual_seed(seed)  # the "random" init draws from the global generator
    adapter = TuckerParam.from_weight(weight, **config)
    x = torch.randn(*batch, columns, generator=seeded(seed + 1), dtype=torch.float64)
    assert torch.equal(adapter.branch(x), torch.zeros(*batch, rows, dtype=x.dtype))
    perturb(adapter, seed)
    assert_branch_is_the_weight_path(adapter, weight, x)


def test_branch_keeps_the_core_full_on_a_mode_without_factor():
    """No built adapter leaves a linear mode unfactored today; the branch still follows
    ``factored_modes`` (the Tucker product with the core full on the other mode)."""
    weight = torch.randn(6, 5, generator=seeded(0), dtype=torch.float64)
    x = torch.randn(3, 5, generator=seeded(1), dtype=torch.float64)
    for mode, core_shape in ((0, (2, 5)), (1, (6, 2))):
        adapter = TuckerParam.from_weight(weight, rank=2, scale=1.5)
        adapter.factored_modes = (mode,)
        adapter.factors = nn.ParameterList([adapter.factors[mode]])
        adapter.core = nn.Parameter(torch.randn(core_shape, generator=seeded(2), dtype=torch.float64))
        assert_branch_is_the_weight_path(adapter, weight, x)


@given(layers(dtype=torch.float32), configs())
def test_trainable_count_is_the_closed_form(case, config):
    layer, _ = case
    assume(default_fits(TuckerParam(**config), layer))
    adapter = TuckerParam.from_weight(layer.weight.detach(), **config)
    shape = tuple(layer.weight.shape)
    assert adapter.num_trainable() == TuckerParam.trainable_count(shape, **config)
    spatial = [size if "spatial_rank" not in config else min(config["spatial_rank"], size) for size in shape[2:]]

    def count(r: int) -> int:
        factor_sizes = r * (shape[0] + shape[1]) + (
            sum(size * rho for size, rho in zip(shape[2:], spatial)) if "spatial_rank" in config else 0
        )
        return r * r * math.prod(spatial) + factor_sizes

    # the default: the largest rank up to min(8, d0, d1) that trains at most the weight's numbers
    r = max(r for r in range(1, min(8, shape[0], shape[1]) + 1) if count(r) <= math.prod(shape))
    assert adapter.num_trainable() == count(r)


def test_linear_count_is_lora_plus_core():
    assert TuckerParam.trainable_count((64, 32), rank=4) == 4 * (64 + 32) + 4 * 4


@pytest.mark.parametrize("init", ["tucker", "random"])
def test_the_zero_core_gets_the_first_gradient_and_a_step_moves_the_update(init):
    """(Gradients reaching only adapter tensors and a step changing the output are the adapter
    contract's, with the default init.) The official N(0, 0.02) factors move W by only
    ~0.02**2 * lr per core step, so the update is checked in float64."""
    layer = nn.Conv2d(3, 4, 2)
    adapter = TuckerParam(init=init)
    parametrize.register_parametrization(layer, "weight", adapter)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    layer(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    assert bool(adapter.core.grad.abs().sum() > 0)
    optimizer.step()
    weight = layer.parametrizations.weight.original.detach().double()
    with torch.no_grad():
        assert bool(adapter.delta(weight).abs().sum() > 0)


def test_tucker_init_factors_are_orthonormal_and_span_the_weights_subspace():
    weight = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    adapter = TuckerParam.from_weight(weight, rank=12)
    out_factor, in_factor = adapter.factors
    assert torch.allclose(out_factor.T @ out_factor, torch.eye(12, dtype=torch.float64), atol=1e-10)
    # full input rank: the input factor spans everything, so projecting W on it loses nothing
    unfolded = weight.movedim(1, 0).reshape(12, -1)
    assert torch.allclose(in_factor @ (in_factor.T @ unfolded), unfolded, atol=1e-10)


def test_random_init_uses_the_official_std():
    torch.manual_seed(0)
    adapter = TuckerParam.from_weight(torch.randn(512, 256), rank=8, init="random")
    assert abs(float(adapter.factors[0].detach().std()) - 0.02) < 2e-3
    assert torch.count_nonzero(adapter.core) == 0


def test_assigning_a_weight_is_inverted_under_the_current_update():
    layer = nn.Linear(10, 6, dtype=torch.float64)
    adapter = TuckerParam(rank=3)
    parametrize.register_parametrization(layer, "weight", adapter)
    perturb(adapter, 1)
    target = torch.randn(6, 10, dtype=torch.float64)
    layer.weight = target
    assert torch.allclose(layer.weight, target, atol=1e-12)


def test_explicit_rank_above_the_layer_raises_and_the_default_clamps():
    with pytest.raises(ValueError, match=r"rank .*must be in \[1, 3\]"):
        TuckerParam.from_weight(torch.randn(3, 20), rank=4)
    # min(d0, d1) = 3 would train 3*3 + 3*23 = 78 > 60 numbers: the default is rank 2
    assert TuckerParam.from_weight(torch.randn(3, 20)).core.shape == (2, 2)
    assert TuckerParam.from_weight(torch.randn(3, 20), rank=3).core.shape == (3, 3)
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    assert TuckerParam.from_weight(depthwise.weight.detach()).core.shape == (1, 1, 3, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"rank must be >= 1"),
        ({"rank": 2.5}, TypeError, "rank must be an int"),
        ({"spatial_rank": 0}, ValueError, "spatial_rank must be >= 1"),
        ({"init": "svd"}, ValueError, r"init must be one of \['tucker', 'random'\]"),
        ({"scale": float("nan")}, ValueError, "scale must be a float > 0, got nan"),
        ({"scale": "1"}, TypeError, "scale must be a float > 0, got str"),
        # the core starts at zero: with a zero scale it would never get a gradient
        ({"scale": 0.0}, ValueError, "scale must be a float > 0, got 0"),
        ({"std": 0.0}, ValueError, "std must be > 0"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        TuckerParam(**kwargs)


def test_trainable_count_rejects_a_non_weight_shape():
    with pytest.raises(ValueError, match="shape must be a weight shape with 2 to 5 dims"):
        TuckerParam.trainable_count((5,))
    with pytest.raises(ValueError, match=r"shape\[1\] must be >= 1"):
        TuckerParam.trainable_count((5, 0))


def test_unsupported_weights_raise():
    with pytest.raises(ValueError, match=r"weight must have ndim in \[2, 5\]"):
        TuckerParam.from_weight(torch.randn(5))
    with pytest.raises(TypeError, match="real floating dtype"):
        TuckerParam.from_weight(torch.ones(4, 4, dtype=torch.int64))


@pytest.mark.parametrize(
    "shape, config, expected",
    [
        ((512, 512), {}, math.sqrt(512 / (3 * 8))),
        ((64, 32, 3, 3), {}, math.sqrt(64 / (3 * 8 * 9))),
        ((64, 32, 3, 3), {"spatial_rank": 2}, math.sqrt(64 / (3 * 8 * 4))),
        ((64, 32), {"init": "random", "std": 0.5}, math.sqrt(64 / 24) / (0.5 * 8 * 0.5 * math.sqrt(32))),
        ((64, 32), {"scale": 1.0}, 1.0),
    ],
)
def test_the_default_scale_is_the_one_learning_rate_rule(shape, config, expected):
    # issue 12: with the fixed scale 1 the first step was 0.2 (512 x 512) to 2.6 (32-channel 3x3)
    # times LoRA r=8's; the rule makes it LoRA's (tests/contracts: within a factor 3 everywhere)
    adapter = TuckerParam.from_weight(torch.randn(shape, dtype=torch.float64), **config)
    assert adapter.applied_scale == pytest.approx(expected)
    assert adapter.config()["scale"] == config.get("scale")


def test_files_saved_under_the_fixed_scale_load_with_it(tmp_path):
    """Before the rule the default was scale=1.0, and config() always wrote it: such a file
    (config {"scale": 1.0}) loads with scale 1, not the rule."""
    from decomp.adapters import apply, load_adapter, save_adapter

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(48, 20))
    saved = apply(copy.deepcopy(plain), TuckerParam, target=["0"], scale=1.0)
    with torch.no_grad():
        saved[0].parametrizations.weight[0].core.normal_()
    save_adapter(saved, tmp_path / "tucker.safetensors")
    loaded = load_adapter(copy.deepcopy(plain), tmp_path / "tucker.safetensors")
    x = torch.randn(3, 48)
    assert loaded[0].parametrizations.weight[0].applied_scale == 1.0
    torch.testing.assert_close(loaded(x), saved(x))
