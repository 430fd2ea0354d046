"""DCTParam (LoCA-style): identity at init, the update against scipy's idctn, location rules, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp import dct_matrix
from decomp.adapters import DCTParam

from tests.adapters.strategies import adapter_of, layers

RULES = ("magnitude", "low", "random")


@given(layers(), st.sampled_from(RULES), st.data())
def test_identity_at_init_and_count(layer_and_input, rule, data):
    layer, x = layer_and_input
    pretrained_weight, before = layer.weight.detach().clone(), layer(x)
    size = pretrained_weight.numel()
    count = data.draw(st.one_of(st.none(), st.integers(1, size)))
    parametrize.register_parametrization(layer, "weight", DCTParam(num_coefficients=count, locations=rule))
    assert torch.equal(layer.weight, pretrained_weight)
    assert torch.equal(layer(x), before)
    adapter = adapter_of(layer)
    rows = pretrained_weight.shape[0]
    expected_count = min(rows + size // rows, size) if count is None else count
    assert adapter.num_trainable() == DCTParam.trainable_count(tuple(layer.weight.shape), **adapter.config())
    assert adapter.num_trainable() == expected_count == adapter.locations.unique().numel()


@given(layers(), st.sampled_from(RULES), st.floats(0.1, 10.0), st.integers(0, 2**16))
def test_update_against_scipy_idctn(layer_and_input, rule, scale, seed):
    layer, _ = layer_and_input
    W = layer.weight.detach().clone()
    rows, columns = W.shape[0], W.numel() // W.shape[0]
    parametrize.register_parametrization(layer, "weight", DCTParam(locations=rule, scale=scale))
    adapter = adapter_of(layer)
    generator = torch.Generator().manual_seed(seed)
    coefficients = torch.randn(adapter.coefficients.shape, generator=generator, dtype=W.dtype)
    with torch.no_grad():
        adapter.coefficients.copy_(coefficients)
    spectrum = np.zeros(rows * columns)
    spectrum[adapter.locations.numpy()] = coefficients.numpy()
    update = scipy.fft.idctn(spectrum.reshape(rows, columns), norm="ortho")
    expected = W + scale * torch.from_numpy(update).reshape(W.shape)
    torch.testing.assert_close(layer.weight, expected, rtol=1e-9, atol=1e-9)


def test_the_coefficients_are_the_only_trainable_tensor_and_locations_are_int64():
    """(Gradients, a training step and merge are the adapter contract's, for every adapter.)"""
    layer = nn.Conv2d(4, 6, 3)
    parametrize.register_parametrization(layer, "weight", DCTParam())
    adapter = adapter_of(layer)
    assert dict(adapter.named_parameters()).keys() == {"coefficients"}
    assert adapter.locations.dtype == torch.int64 and not adapter.locations.requires_grad


def test_magnitude_rule_picks_the_largest_coefficients_of_the_weight_spectrum():
    W = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    adapter = DCTParam.from_weight(W, num_coefficients=7)
    spectrum = np.abs(scipy.fft.dctn(W.reshape(6, 15).numpy(), norm="ortho")).ravel()
    assert adapter.locations.tolist() == sorted(np.argsort(spectrum)[-7:].tolist())


def test_low_rule_orders_by_total_then_row_frequency():
    adapter = DCTParam.from_weight(torch.randn(4, 5), num_coefficients=6, locations="low")
    pairs = [divmod(int(index), 5) for index in adapter.locations]
    assert sorted(pairs) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]


def test_random_rule_is_seeded():
    W = torch.randn(16, 16)
    first, again, other = (DCTParam.from_weight(W, locations="random", seed=s).locations for s in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_fast_path_on_a_long_dim_matches_the_dense_formula():
    """A 300-wide view takes idct's FFT path; compare with C^T S D from the dense bases."""
    W = torch.randn(8, 300, dtype=torch.float64)
    adapter = DCTParam.from_weight(W, num_coefficients=50, locations="random")
    with torch.no_grad():
        adapter.coefficients.normal_()
    spectrum = torch.zeros(8 * 300, dtype=torch.float64)
    spectrum[adapter.locations] = adapter.coefficients.detach()
    rows_basis, columns_basis = dct_matrix(8, dtype=torch.float64), dct_matrix(300, dtype=torch.float64)
    dense = rows_basis.T @ spectrum.view(8, 300) @ columns_basis
    torch.testing.assert_close(adapter.delta(W), dense, rtol=1e-10, atol=1e-12)


def test_count_above_the_matrix_view_raises_and_leaves_layer_untouched():
    layer = nn.Linear(3, 2)
    W = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"num_coefficients must be in \[1, 6\], got 7"):
        parametrize.register_parametrization(layer, "weight", DCTParam(num_coefficients=7))
    assert not parametrize.is_parametrized(layer) and torch.equal(layer.weight, W)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_coefficients": 0}, ValueError, r"num_coefficients must be >= 1, got 0"),
        ({"num_coefficients": 1.5}, TypeError, r"num_coefficients must be an int"),
        ({"locations": "high"}, ValueError, r"locations must be one of \['magnitude', 'low', 'random'\]"),
        ({"scale": 0}, ValueError, r"scale must be a float > 0, got 0.0"),
        ({"seed": True}, TypeError, r"seed must be an int"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DCTParam(**kwargs)
