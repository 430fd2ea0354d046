"""LDUParam (LoLDU): identity at init, closed forms against scipy's LU, training, errors."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import LDUParam

from tests.adapters.strategies import adapter_of, default_fits, layers


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
        adapter.scale.mul_(2)
    torch.testing.assert_close(layer.weight, (1 + s0) * W, rtol=1e-8, atol=1e-8)

    P, L, U = (torch.from_numpy(f) for f in scipy.linalg.lu(matrix.numpy()))
    step = torch.linspace(-1, 1, k, dtype=W.dtype)
    with torch.no_grad():
        adapter.scale.copy_(adapter.initial_scale)
        adapter.pivots.add_(step)
    unit_upper = U / U.diagonal()[:, None]
    expected = W + (s0 * P @ (L * step) @ unit_upper).reshape(W.shape)
    torch.testing.assert_close(layer.weight, expected, rtol=1e-8, atol=1e-8)


def test_pivots_and_scale_are_the_trainable_tensors_and_both_get_a_gradient():
    """(Gradients reaching only adapter tensors, a training step and merge are the adapter
    contract's.)"""
    layer = nn.Conv2d(4, 6, 3, groups=2)
    parametrize.register_parametrization(layer, "weight", LDUParam())
    adapter = adapter_of(layer)
    assert dict(adapter.named_parameters()).keys() == {"pivots", "scale"}
    assert not any(buffer.requires_grad for buffer in adapter.buffers())
    layer(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    assert adapter.scale.grad.abs() > 0 and adapter.pivots.grad.abs().sum() > 0


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
        ({"scale": None}, TypeError, r"scale must be a float > 0, got NoneType"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LDUParam(**kwargs)
