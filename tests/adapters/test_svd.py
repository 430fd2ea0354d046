"""SVDParam (PiSSA, SVFit, LoRA-XS): identity at init, closed forms against numpy's SVD, peft's PiSSA,
the linear branch against the weight path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import AdapterParam, SVDParam
from tests.adapters.strategies import BATCH_SHAPES, adapter_of, assert_branch_is_the_weight_path, default_fits, layers, perturbed, seeded
from tests.strategies import SEEDS

MODES = ("pissa", "svfit", "lora_xs")


def truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation by numpy's SVD (independent of the code under test)."""
    u, s, vh = np.linalg.svd(matrix.detach().numpy(), full_matrices=False)
    return torch.from_numpy((u[:, :rank] * s[:rank]) @ vh[:rank])


@given(layers(), st.sampled_from(MODES), st.sampled_from(("exact", "randomized")))
def test_identity_at_init_and_count(layer_and_input, mode, svd):
    layer, x = layer_and_input
    pretrained_weight, before = layer.weight.detach().clone(), layer(x)
    assume(default_fits(SVDParam(mode=mode, svd=svd), layer))
    parametrize.register_parametrization(layer, "weight", SVDParam(mode=mode, svd=svd))
    assert torch.equal(layer.weight, pretrained_weight)
    assert torch.equal(layer(x), before)
    adapter = adapter_of(layer)
    assert adapter.num_trainable() == SVDParam.trainable_count(tuple(layer.weight.shape), **adapter.config())


@given(layers(), st.sampled_from(MODES), st.floats(0.25, 4.0))
def test_closed_forms_against_numpy_svd(layer_and_input, mode, scale):
    layer, x = layer_and_input
    W = layer.weight.detach().clone()
    matrix = W.reshape(W.shape[0], -1)
    assume(default_fits(SVDParam(mode=mode, scale=scale), layer))
    # the default: the largest rank up to min(8, m, n) that trains at most the weight's numbers
    counts = {"pissa": lambda r: r * sum(matrix.shape), "svfit": lambda r: r, "lora_xs": lambda r: r * r}
    rank = max(r for r in range(1, min(8, *matrix.shape) + 1) if counts[mode](r) <= W.numel())
    parametrize.register_parametrization(layer, "weight", SVDParam(mode=mode, scale=scale))
    adapter = adapter_of(layer)
    best = truncation(matrix, rank).reshape(W.shape)
    with torch.no_grad():
        if mode == "pissa":  # B = 0 removes the whole principal part
            adapter.left.zero_()
            expected = W - best
        elif mode == "svfit":  # zero singular values remove it too
            adapter.singular_values.zero_()
            expected = W - best
        else:  # R = I adds scale times the principal part
            adapter.core.copy_(torch.eye(rank, dtype=W.dtype))
            expected = W + scale * best
    torch.testing.assert_close(layer.weight, expected, rtol=1e-9, atol=1e-9)


@given(st.integers(1, 10), st.integers(1, 10), st.sampled_from(MODES), st.data(), SEEDS)
def test_branch_is_exactly_zero_at_init_and_the_weight_path_after(rows, columns, mode, data, seed):
    weight = torch.randn(rows, columns, generator=seeded(seed), dtype=torch.float64)
    assume(default_fits(SVDParam(mode=mode), weight))
    scale = data.draw(st.one_of(st.none(), st.floats(0.25, 4.0)))
    adapter = SVDParam.from_weight(weight, mode=mode, scale=scale)
    x = torch.randn(*data.draw(BATCH_SHAPES), columns, generator=seeded(seed + 1), dtype=torch.float64)
    assert torch.equal(adapter.branch(x), torch.zeros(*x.shape[:-1], rows, dtype=x.dtype))
    assert_branch_is_the_weight_path(perturbed(adapter, seed), weight, x)


def test_lora_xs_normal_init_branch_is_the_nonzero_update():
    weight = torch.randn(9, 7, generator=seeded(0), dtype=torch.float64)
    adapter = SVDParam.from_weight(weight, rank=3, mode="lora_xs", init="normal", scale=2.0)
    x = torch.randn(4, 7, generator=seeded(1), dtype=torch.float64)
    assert adapter.branch(x).abs().max() > 0
    assert_branch_is_the_weight_path(adapter, weight, x)


@pytest.mark.parametrize("mode", MODES)
def test_every_trainable_tensor_of_each_mode_gets_a_gradient(mode):
    """(Gradients reaching only adapter tensors, a training step and merge are the adapter
    contract's; here every tensor of the mode moves, not only some.)"""
    layer = nn.Conv2d(4, 6, 3, groups=2)
    parametrize.register_parametrization(layer, "weight", SVDParam(mode=mode))
    adapter = adapter_of(layer)
    layer(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_lora_xs_normal_init_is_documented_non_identity():
    torch.manual_seed(0)
    layer = nn.Linear(10, 8, dtype=torch.float64)
    W = layer.weight.detach().clone()
    adapter = SVDParam(rank=4, mode="lora_xs", init="normal", seed=3)
    parametrize.register_parametrization(layer, "weight", adapter)
    core = adapter_of(layer).core.detach()
    assert 0 < core.std() < 1e-4
    assert not torch.equal(layer.weight, W)
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=1e-3)


def test_randomized_svd_matches_exact_on_a_low_rank_weight():
    torch.manual_seed(0)
    W = torch.randn(40, 5, dtype=torch.float64) @ torch.randn(5, 30, dtype=torch.float64)
    exact = SVDParam.from_weight(W, rank=5, mode="pissa")
    randomized = SVDParam.from_weight(W, rank=5, mode="pissa", svd="randomized")
    torch.testing.assert_close(randomized.left @ randomized.right, exact.left @ exact.right)
    torch.testing.assert_close(exact.applied_scale * exact.left @ exact.right, W)


@pytest.mark.parametrize("lora_alpha", [4, 8])
def test_pissa_matches_peft(lora_alpha):
    """peft's LoRA with init_lora_weights="pissa": same product, residual, count and one SGD step."""
    peft = pytest.importorskip("peft")
    rank = 4
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10))
    ours = copy.deepcopy(base)
    config = peft.LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=["0"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    scale = lora_alpha / rank
    parametrize.register_parametrization(ours[0], "weight", SVDParam(rank=rank, scale=scale))
    ours[0].parametrizations.weight.original.requires_grad_(False)
    ours[0].bias.requires_grad_(False)
    adapter = adapter_of(ours[0])
    lora_layer = theirs.base_model.model[0]
    lora_A, lora_B = lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight
    torch.testing.assert_close(adapter.left @ adapter.right, lora_B @ lora_A)
    residual = base[0].weight - scale * adapter.initial_left @ adapter.initial_right
    torch.testing.assert_close(lora_layer.base_layer.weight, residual)
    peft_count = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert adapter.num_trainable() == peft_count == SVDParam.trainable_count((10, 12), rank=rank)

    x, target = torch.randn(16, 12), torch.randn(16, 10)
    for model in (ours, theirs):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_failed_registration_leaves_layer_untouched():
    layer = nn.Conv2d(2, 3, 1)
    W = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"rank must be in \[1, 2\], got 3"):
        parametrize.register_parametrization(layer, "weight", SVDParam(rank=3))
    assert not parametrize.is_parametrized(layer) and torch.equal(layer.weight, W)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"rank must be >= 1, got 0"),
        ({"rank": 2.0}, TypeError, r"rank must be an int"),
        ({"mode": "lora"}, ValueError, r"mode must be one of \['pissa', 'svfit', 'lora_xs'\]"),
        ({"svd": "fast"}, ValueError, r"svd must be one of \['exact', 'randomized'\]"),
        ({"scale": 0.0}, ValueError, r"scale must be a float > 0, got 0.0"),
        ({"scale": "1"}, TypeError, r"scale must be a float > 0, got str"),
        ({"init": "normal"}, ValueError, r"init='normal' is only defined for mode='lora_xs'"),
        ({"seed": -1}, ValueError, r"seed must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SVDParam(**kwargs)


def test_explicit_rank_above_the_matrix_view_raises_in_count_too():
    # the default rank clamps to min(m, n) = 2, then to 1: rank 2 would train 10 > 6 numbers
    assert SVDParam.trainable_count((3, 2, 1, 1)) == 1 * 5
    assert SVDParam.trainable_count((3, 2, 1, 1), rank=2) == 2 * 5  # an explicit rank is kept
    with pytest.raises(ValueError, match=r"rank must be in \[1, 18\], got 19"):
        SVDParam.trainable_count((64, 2, 3, 3), rank=19)
    assert SVDParam.trainable_count((64, 2, 3, 3), rank=18, mode="lora_xs") == 18 * 18


@pytest.mark.parametrize(("mode", "expected"), [("pissa", 1 / 36**0.5), ("svfit", 1.0), ("lora_xs", 1.0)])
def test_the_default_scale_is_the_one_learning_rate_rule(mode, expected):
    # issue 12: PiSSA at c = 1 stepped 2 to 5 times more than LoRA r=8 at the same lr.
    adapter = SVDParam.from_weight(torch.randn(8, 4, 3, 3, dtype=torch.float64), mode=mode)
    assert adapter.applied_scale == pytest.approx(expected)
    assert adapter.config()["scale"] is None
    assert SVDParam.from_weight(torch.randn(8, 4, dtype=torch.float64), scale=2.0).applied_scale == 2.0
