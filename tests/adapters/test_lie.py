"""LieParam (LieRA): W * exp(dW) and W + W * dW, native conv Tucker-2, inverse, counts, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import LieParam
from tests.adapters.strategies import default_fits, layers
from tests.adapters.test_tucker_param import perturb
from tests.strategies import SEEDS, relative_error

ORDERS = st.sampled_from([None, 1])


def lora_style_delta(adapter: LieParam, weight: torch.Tensor) -> torch.Tensor:
    """dW written out with einsum: s B A for matrices, s G x0 U_out x1 U_in for kernels."""
    if weight.ndim == 2:
        return adapter.applied_scale * torch.einsum("or,ri->oi", adapter.out_factor, adapter.in_factor)
    return adapter.applied_scale * torch.einsum("ab...,oa,ib->oi...", adapter.core, adapter.out_factor, adapter.in_factor)


@given(layers(), ORDERS)
def test_identity_at_init(case, order):
    layer, x = case
    before = layer(x)
    assume(default_fits(LieParam(order=order), layer))
    parametrize.register_parametrization(layer, "weight", LieParam(order=order))
    assert torch.equal(layer(x), before)


@given(layers(), ORDERS, SEEDS)
def test_forward_is_the_multiplicative_update_and_merge_matches(case, order, seed):
    layer, x = case
    adapter = LieParam(order=order, scale=0.5)
    assume(default_fits(adapter, layer))
    parametrize.register_parametrization(layer, "weight", adapter)
    perturb(adapter, seed)
    weight = layer.parametrizations.weight.original.detach()
    delta = lora_style_delta(adapter, weight).detach()
    expected = weight * torch.exp(delta) if order is None else weight * (1 + delta)
    assert relative_error(layer.weight.detach(), expected) < 1e-10
    unmerged = layer(x).detach()
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert relative_error(layer(x).detach(), unmerged) < 1e-10


@given(layers(), ORDERS, SEEDS)
def test_assigning_a_weight_inverts_the_update(case, order, seed):
    layer, _ = case
    adapter = LieParam(order=order)
    assume(default_fits(adapter, layer))
    parametrize.register_parametrization(layer, "weight", adapter)
    perturb(adapter, seed, size=0.05)  # keeps 1 + dW away from 0 for the first-order inverse
    target = torch.randn(layer.weight.shape, dtype=layer.weight.dtype)
    layer.weight = target
    assert relative_error(layer.weight.detach(), target) < 1e-10


def test_first_order_inverse_refuses_a_vanishing_multiplier():
    adapter = LieParam.from_weight(torch.ones(2, 2, dtype=torch.float64), rank=1, order=1, scale=1.0)
    with torch.no_grad():
        adapter.out_factor.copy_(torch.tensor([[1.0], [0.0]]))
        adapter.in_factor.copy_(torch.tensor([[-1.0, 0.5]]))  # dW[0, 0] = -1
    with pytest.raises(ValueError, match="order=1.*1 \\+ delta is within"):
        adapter.right_inverse(torch.ones(2, 2, dtype=torch.float64))


def test_zero_weights_stay_zero_and_exact_exp_keeps_signs():
    weight = torch.tensor([[0.0, -2.0], [3.0, 0.0]], dtype=torch.float64)
    adapter = LieParam.from_weight(weight, rank=1)
    perturb(adapter, 0, size=3.0)
    adapted = adapter(weight)
    assert torch.equal(adapted == 0, weight == 0)
    assert torch.equal(torch.sign(adapted), torch.sign(weight))


@given(layers(dtype=torch.float32), st.one_of(st.none(), st.integers(1, 3)))
def test_trainable_count_is_the_closed_form(case, rank):
    layer, _ = case
    shape = tuple(layer.weight.shape)
    if rank is not None and rank > min(shape[0], shape[1]):
        with pytest.raises(ValueError, match="rank"):
            LieParam.from_weight(layer.weight.detach(), rank=rank)
        return
    assume(default_fits(LieParam(rank=rank), layer))
    adapter = LieParam.from_weight(layer.weight.detach(), rank=rank)

    def count(r: int) -> int:
        lora = r * (shape[0] + shape[1])
        return lora if len(shape) == 2 else lora + r * r * math.prod(shape[2:])

    # the default: the largest rank up to min(8, d0, d1) that trains at most the weight's numbers
    fitting = [r for r in range(1, min(8, shape[0], shape[1]) + 1) if count(r) <= math.prod(shape)]
    expected = count(max(fitting) if rank is None else rank)
    assert adapter.num_trainable() == LieParam.trainable_count(shape, rank=rank) == expected


def test_conv_kernels_get_a_native_core_not_a_reshape():
    adapter = LieParam.from_weight(torch.randn(16, 8, 3, 5), rank=4)
    assert adapter.core.shape == (4, 4, 3, 5)
    assert adapter.out_factor.shape == (16, 4) and adapter.in_factor.shape == (8, 4)
    assert torch.count_nonzero(adapter.out_factor) == 0


def test_linear_init_matches_the_official_code():
    torch.manual_seed(0)
    adapter = LieParam.from_weight(torch.randn(64, 300), rank=8)
    assert torch.count_nonzero(adapter.out_factor) == 0
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=sqrt(5)) on (r, d_in)
    in_factor = adapter.in_factor.detach()
    assert float(in_factor.abs().max()) <= bound and float(in_factor.abs().max()) > 0.9 * bound


@pytest.mark.parametrize("order", [None, 1])
def test_the_zero_out_factor_gets_the_first_gradient(order):
    """B = 0 at init is what moves first. (Gradients reaching only adapter tensors and a step
    changing the output are the adapter contract's.)"""
    layer = nn.Linear(6, 4)
    adapter = LieParam(rank=2, order=order)
    parametrize.register_parametrization(layer, "weight", adapter)
    layer(torch.randn(3, 6, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    assert bool(adapter.out_factor.grad.abs().sum() > 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": "4"}, TypeError, "rank must be an int"),
        ({"order": 2}, ValueError, r"order must be None \(exact exp\) or 1"),
        ({"order": True}, ValueError, "order must be None"),
        ({"scale": float("inf")}, ValueError, "scale must be a float > 0, got inf"),
        ({"scale": "1"}, TypeError, "scale must be a float > 0, got str"),
        # a zero scale would freeze the update at zero for good (B's gradient is zero too)
        ({"scale": 0.0}, ValueError, "scale must be a float > 0, got 0"),
        ({"scale": -1.0}, ValueError, "scale must be a float > 0, got -1"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        LieParam(**kwargs)


def test_explicit_rank_above_the_layer_raises_and_the_default_clamps():
    with pytest.raises(ValueError, match=r"rank .*must be in \[1, 2\]"):
        LieParam.from_weight(torch.randn(5, 2, 3, 3), rank=3)
    assert LieParam.from_weight(torch.randn(5, 2, 3, 3)).core.shape == (2, 2, 3, 3)


@pytest.mark.parametrize(("shape", "n"), [((6, 12), 12), ((8, 4, 3, 3), 36)])
def test_the_default_scale_is_the_inverse_std_of_the_input_factor(shape, n):
    # issue 12 (one learning rate): the official s = 1 stepped sqrt(3 n) times less than LoRA.
    torch.manual_seed(0)
    adapter = LieParam.from_weight(torch.randn(shape, dtype=torch.float64))
    assert adapter.applied_scale == pytest.approx((3 * n) ** 0.5)
    assert LieParam.from_weight(torch.randn(shape, dtype=torch.float64), scale=0.5).applied_scale == 0.5


def first_step_change(weight: torch.Tensor, lr: float = 1e-3) -> float:
    """||W' - W|| / ||W|| after one AdamW step of the default LieParam on a random linear loss."""
    adapter = LieParam.from_weight(weight)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1), dtype=weight.dtype)
    (adapter(weight) * direction).sum().backward()
    optimizer.step()
    with torch.no_grad():
        return float((adapter(weight) - weight).norm() / weight.norm())


@pytest.mark.parametrize(
    ("conv_shape", "linear_shape"),
    [((64, 64, 3, 3), (64, 576)), ((48, 16, 5, 5), (48, 400)), ((32, 8, 3, 3, 3), (32, 216)), ((40, 20, 7), (40, 140))],
)
def test_a_conv_takes_the_first_step_of_a_linear_layer_of_its_fan_in(conv_shape, linear_shape):
    """Regression (review after issue 12): the conv's core was Kaiming-uniform with a = sqrt(5),
    so core x U_in had variance 1 / (9 n), not LoRA's 1 / (3 n) that the default scale assumes,
    and a conv's first step was sqrt(3) smaller than a linear layer's of the same fan-in."""
    torch.manual_seed(0)
    n = math.prod(conv_shape[1:])
    conv = LieParam.from_weight(torch.randn(conv_shape, dtype=torch.float64) / n**0.5)
    effective_input = torch.einsum("abk,cb->ack", conv.core.flatten(2), conv.in_factor)  # (r, c_in, K)
    assert float(effective_input.std()) * conv.applied_scale == pytest.approx(1.0, rel=0.1)
    torch.manual_seed(0)
    conv_step = first_step_change(torch.randn(conv_shape, dtype=torch.float64) / n**0.5)
    linear_step = first_step_change(torch.randn(linear_shape, dtype=torch.float64) / n**0.5)
    assert conv_step / linear_step == pytest.approx(1.0, rel=0.2)


def test_a_one_channel_conv_steps_by_the_rule_whatever_the_draw():
    """Regression: on a 1-channel input (a stem, a depthwise conv) the rank is 1 and U_in was one
    draw from U(-1, 1), so the layer's first step was that draw's size: under 1/3 of the rule's
    one time in five (0.01 times LoRA's on seed 0). Each column of U_in now has its expected norm."""
    weight = torch.randn(32, 1, 3, 3, dtype=torch.float64) / 3
    effective = []
    for seed in range(20):
        torch.manual_seed(seed)
        adapter = LieParam.from_weight(weight)
        assert adapter.in_factor.shape == (1, 1)
        effective.append(float(adapter.in_factor.abs()))
    assert effective == pytest.approx([3**-0.5] * 20)
