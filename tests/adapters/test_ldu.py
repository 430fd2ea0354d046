"""LDUParam (LoLDU): identity at init, closed forms against scipy's LU, training, the linear branch, errors."""

from __future__ import annotations

import copy

import pytest
import scipy.linalg
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import LDUParam, apply, load_adapter, save_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.adapters.strategies import BATCH_SHAPES, adapter_of, assert_branch_is_the_weight_path, default_fits, layers, perturbed, seeded
from tests.strategies import SEEDS
from tests.contracts.first_step import median_first_step_over_loras


@given(layers(), st.booleans())
def test_identity_at_init_and_count(layer_and_input, full_rank):
    layer, x = layer_and_input
    pretrained_weight, before = layer.weight.detach().clone(), layer(x)
    rank = None if full_rank else 1
    assume(default_fits(LDUParam(rank=rank), layer))
    parametrize.register_parametrization(layer, "weight", LDUParam(rank=rank))
    assert torch.equal(layer.weight, pretrained_weight)
    assert torch.equal(layer(x), before)
    adapter = adapter_of(layer)
    matrix_view = pretrained_weight.reshape(pretrained_weight.shape[0], -1)
    assert adapter.num_trainable() == LDUParam.trainable_count(tuple(layer.weight.shape), **adapter.config())
    assert adapter.num_trainable() == (min(matrix_view.shape) if full_rank else 1) + 1


@given(layers(), st.floats(0.1, 10.0))
def test_closed_form_against_scipy_lu(layer_and_input, scale):
    """Scale 2 s0 at full rank adds s0 P L diag(D) U = s0 W; pivots z0 + e add s0 P L_r diag(e) U_r."""
    layer, _ = layer_and_input
    W = layer.weight.detach().clone()
    matrix = W.reshape(W.shape[0], -1)
    k = min(matrix.shape)
    assume(default_fits(LDUParam(scale=scale), layer))
    parametrize.register_parametrization(layer, "weight", LDUParam(scale=scale))
    adapter = adapter_of(layer)
    s0 = scale / k
    with torch.no_grad():
        adapter.relative_scale.fill_(1)  # s = 2 s0
    torch.testing.assert_close(layer.weight, (1 + s0) * W, rtol=1e-8, atol=1e-8)

    P, L, U = (torch.from_numpy(f) for f in scipy.linalg.lu(matrix.numpy()))
    step = torch.linspace(-1, 1, k, dtype=W.dtype)
    with torch.no_grad():
        adapter.relative_scale.zero_()
        adapter.pivots.add_(step)
    unit_upper = U / U.diagonal()[:, None]
    expected = W + (s0 * P @ (L * step) @ unit_upper).reshape(W.shape)
    torch.testing.assert_close(layer.weight, expected, rtol=1e-8, atol=1e-8)


@given(st.integers(1, 10), st.integers(1, 10), st.data(), SEEDS)
def test_branch_is_exactly_zero_at_init_and_the_weight_path_after(rows, columns, data, seed):
    weight = torch.randn(rows, columns, generator=seeded(seed), dtype=torch.float64)
    rank = data.draw(st.one_of(st.none(), st.integers(1, min(rows, columns))))
    scale = data.draw(st.one_of(st.none(), st.floats(0.1, 10.0)))
    assume(default_fits(LDUParam(rank=rank), weight))
    adapter = LDUParam.from_weight(weight, rank=rank, scale=scale)
    x = torch.randn(*data.draw(BATCH_SHAPES), columns, generator=seeded(seed + 1), dtype=torch.float64)
    assert torch.equal(adapter.branch(x), torch.zeros(*x.shape[:-1], rows, dtype=x.dtype))
    assert_branch_is_the_weight_path(perturbed(adapter, seed), weight, x)


def test_pivots_and_relative_scale_are_the_trainable_tensors_and_both_get_a_gradient():
    """(Gradients reaching only adapter tensors, a training step and merge are the adapter
    contract's.)"""
    layer = nn.Conv2d(4, 6, 3, groups=2)
    parametrize.register_parametrization(layer, "weight", LDUParam())
    adapter = adapter_of(layer)
    assert dict(adapter.named_parameters()).keys() == {"pivots", "relative_scale"}
    assert not any(buffer.requires_grad for buffer in adapter.buffers())
    layer(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    assert adapter.relative_scale.grad.abs() > 0 and adapter.pivots.grad.abs().sum() > 0


def test_zero_pivot_raises_and_leaves_layer_untouched():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[:, 0] = 0  # a zero first column gives a zero first pivot
    W = layer.weight.detach().clone()
    message = r"LDUParam cannot factor the weight's \(3, 4\) matrix view: .*zero pivot"
    with pytest.raises(ValueError, match=message):
        parametrize.register_parametrization(layer, "weight", LDUParam())
    assert not parametrize.is_parametrized(layer) and torch.equal(layer.weight, W)


def test_rank_above_the_matrix_view_raises():
    with pytest.raises(ValueError, match=r"rank must be in \[1, 3\], got 4"):
        LDUParam.from_weight(torch.randn(3, 1, 2, 2), rank=4)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 3\], got 4"):
        LDUParam.trainable_count((3, 5), rank=4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"rank must be >= 1, got 0"),
        ({"rank": "full"}, TypeError, r"rank must be an int"),
        ({"scale": -1.0}, ValueError, r"scale must be a float > 0, got -1.0"),
        ({"scale": float("inf")}, ValueError, r"scale must be a float > 0, got inf"),
        ({"scale": "1"}, TypeError, r"scale must be a float > 0, got str"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LDUParam(**kwargs)


def test_one_adam_step_moves_the_scale_by_a_fraction_lr_of_itself():
    # issue 12: trained as s itself, one Adam step at lr 0.1 took s from 1/32 to 0.131 and
    # ||dW|| / ||W|| to 0.43 (one seed in three diverged). In s = s0 (1 + t) it moves s by lr * s0.
    torch.manual_seed(0)
    weight = torch.randn(32, 288, dtype=torch.float64) * 0.036
    adapter = LDUParam.from_weight(weight, scale=1.0)  # the official s0 = 1 / r
    optimizer = torch.optim.Adam([adapter.relative_scale], lr=0.1)
    adapter(weight).square().sum().backward()
    optimizer.step()
    s0 = 1 / 32
    torch.testing.assert_close(adapter.scale.detach(), torch.tensor([s0 * 0.9], dtype=torch.float64))
    relative_change = (adapter(weight).detach() - weight).norm() / weight.norm()
    assert float(relative_change) == pytest.approx(0.1 * s0, rel=1e-6)  # s0 * 0.1 * ||M|| / ||M||


def legacy_state(adapter: LDUParam, s: float) -> dict[str, torch.Tensor]:
    """A state dict as LDUParam wrote it when it trained s itself (key ``scale``)."""
    state = {key: value.clone() for key, value in adapter.state_dict().items() if key != "relative_scale"}
    state["scale"] = torch.tensor([s], dtype=adapter.initial_scale.dtype)
    return state


def test_a_state_dict_with_the_old_scale_loads_as_the_same_function():
    torch.manual_seed(0)
    weight = torch.randn(6, 5, dtype=torch.float64)
    old_style = LDUParam.from_weight(weight, rank=3, scale=2.0)
    with torch.no_grad():
        old_style.pivots.add_(0.5)
    s = 1.7  # the trained s, s0 = 2 / 3
    adapter = LDUParam.from_weight(weight, rank=3, scale=2.0)
    adapter.load_state_dict(legacy_state(old_style, s))
    torch.testing.assert_close(adapter.scale.detach(), torch.tensor([s], dtype=torch.float64))
    coefficients = s * old_style.pivots.detach() - (2 / 3) * old_style.initial_pivots
    expected = weight + (old_style.left * coefficients) @ old_style.right
    torch.testing.assert_close(adapter(weight).detach(), expected, rtol=1e-12, atol=1e-12)


def test_an_adapter_file_with_the_old_scale_loads(tmp_path):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 4))
    model = apply(copy.deepcopy(plain), LDUParam, target=r"0")
    with torch.no_grad():
        adapter_of(model[0]).relative_scale.fill_(0.25)
    path = tmp_path / "ldu.safetensors"
    save_adapter(model, path)
    # rewrite it as the older writer did: s itself under the key "scale"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    key = next(k for k in tensors if k.endswith("relative_scale"))
    s0 = adapter_of(model[0]).initial_scale
    tensors[key.removesuffix("relative_scale") + "scale"] = (s0 * 1.25).reshape(())  # 0-d, as older still
    del tensors[key]
    save_file(tensors, str(path), metadata=metadata)
    fresh = load_adapter(copy.deepcopy(plain), path)
    x = torch.randn(3, 5)
    torch.testing.assert_close(fresh(x), model(x))


def test_the_default_start_scale_is_the_factor_rule():
    # issue 12 (one learning rate): the official s0 = 1 / r stepped 3 to 15 times less than LoRA;
    # s0 = 1 / sqrt(n) assumed unit-size factors (4.7 times LoRA's step on an 11 x 91 layer);
    # the default now reads the factors' norms.
    weight = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    adapter = LDUParam.from_weight(weight)
    assert adapter.config()["scale"] is None and adapter.config()["scale_rule"] == "factors"
    left, right = adapter.left, adapter.right
    expected = (8 * 8 / 3) ** 0.5 / float((left.pow(2).sum(0) * right.pow(2).sum(1)).sum().sqrt())
    torch.testing.assert_close(adapter.scale.detach(), torch.tensor([expected], dtype=torch.float64))
    fan_in = LDUParam.from_weight(weight, scale_rule="fan_in")
    torch.testing.assert_close(fan_in.scale.detach(), torch.tensor([1 / 6], dtype=torch.float64))
    explicit = LDUParam.from_weight(weight, scale=2.0)
    torch.testing.assert_close(explicit.scale.detach(), torch.tensor([2 / 8], dtype=torch.float64))


@pytest.mark.parametrize("shape, fan_in_step", [((11, 91), 4.65), ((70, 11), 0.35), ((64, 32, 1, 1), 0.47)])
def test_the_factor_rule_steps_like_lora_where_fan_in_did_not(shape, fan_in_step):
    """Regression: under s0 = 1 / sqrt(n) the first step was 4.65, 0.35 and 0.47 times LoRA
    r=8's on these layers; the factor rule gives 0.96 to 1.06."""
    assert 0.8 <= median_first_step_over_loras(lambda: LDUParam(), shape) <= 1.25
    fan_in = median_first_step_over_loras(lambda: LDUParam(scale_rule="fan_in"), shape)
    assert fan_in == pytest.approx(fan_in_step, abs=0.01)


def test_an_old_state_loads_into_an_adapter_built_with_another_start_scale():
    """Regression (review after issue 12): ``upgrade_state`` turned the saved s into t with the
    receiving adapter's s0 while the same state then overwrote s0 with the saved one, so an old
    checkpoint (s0 = 1/r) loaded by ``load_state_dict`` into a default-built adapter
    (s0 = 1/sqrt(n)) computed s0_saved * s / s0_receiving instead of s."""
    torch.manual_seed(0)
    weight = torch.randn(16, 36, dtype=torch.float64)
    old_style = LDUParam.from_weight(weight, scale=1.0)  # s0 = 1/16, the old default
    with torch.no_grad():
        old_style.pivots.mul_(1.5)
    s = 0.125
    receiving = LDUParam.from_weight(weight)  # s0 = 1/6
    assert float(receiving.initial_scale) != float(old_style.initial_scale)
    receiving.load_state_dict(legacy_state(old_style, s))
    torch.testing.assert_close(receiving.scale.detach(), torch.tensor([s], dtype=torch.float64))
    coefficients = s * old_style.pivots.detach() - old_style.initial_scale * old_style.initial_pivots
    expected = weight + (old_style.left * coefficients) @ old_style.right
    torch.testing.assert_close(receiving(weight).detach(), expected, rtol=1e-12, atol=1e-12)


def test_the_factor_rule_refuses_factors_whose_norms_overflow():
    """Review: a pivot below about 1e-155 overflowed the float64 sum to inf and s0 came out as
    exactly 0, a dead adapter; now a clear error (the other rules still build)."""
    weight = torch.randn(6, 6, generator=seeded(0), dtype=torch.float64)
    weight[:, 2] = 1e-160
    with pytest.raises(ValueError, match="factors' norms overflow float64"):
        LDUParam.from_weight(weight)
    assert float(LDUParam.from_weight(weight, scale_rule="fan_in").initial_scale) > 0
