"""DCTParam (LoCA-style): identity at init, the update against scipy's idctn, location rules, the linear
branch (its autograd Function and what it saves), errors."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from decomp import dct, dct_matrix, idct
from decomp.adapters import DCTParam
from decomp.adapters import dct as dct_module
from decomp.adapters.dct import _SparseSpectrumProduct

from tests.adapters.strategies import BATCH_SHAPES, adapter_of, assert_branch_is_the_weight_path, layers, perturbed, seeded
from tests.strategies import SEEDS

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


@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from(RULES), st.data(), SEEDS)
def test_branch_is_exactly_zero_at_init_and_the_weight_path_after(rows, columns, rule, data, seed):
    weight = torch.randn(rows, columns, generator=seeded(seed), dtype=torch.float64)
    count = data.draw(st.one_of(st.none(), st.integers(1, rows * columns)))
    scale = data.draw(st.floats(0.1, 10.0))
    adapter = DCTParam.from_weight(weight, num_coefficients=count, locations=rule, scale=scale, seed=seed)
    x = torch.randn(*data.draw(BATCH_SHAPES), columns, generator=seeded(seed + 1), dtype=torch.float64)
    assert torch.equal(adapter.branch(x), torch.zeros(*x.shape[:-1], rows, dtype=x.dtype))
    assert_branch_is_the_weight_path(perturbed(adapter, seed), weight, x)


@pytest.mark.parametrize("shape", [(300, 8), (8, 300), (257, 230)])
def test_branch_on_long_dims_takes_the_fft_path_and_is_the_weight_path(shape):
    """Above 224 the transforms run by FFT instead of the cached basis: both dims are covered."""
    weight = torch.randn(shape, generator=seeded(0), dtype=torch.float64)
    adapter = perturbed(DCTParam.from_weight(weight, locations="random"), 1)
    x = torch.randn(2, 3, shape[1], generator=seeded(2), dtype=torch.float64)
    assert_branch_is_the_weight_path(adapter, weight, x)


def test_branch_of_an_empty_batch_is_empty():
    """nn.Linear takes a batch of zero rows; the DCT's own empty-input check must not refuse it."""
    adapter = DCTParam.from_weight(torch.randn(6, 300))
    assert adapter.branch(torch.zeros(0, 300)).shape == (0, 6)


def spectrum_product_inputs(tokens: int, rows: int, columns: int, count: int) -> tuple:
    """Float64 inputs of the branch's Function: x (tokens, columns), coefficients, distinct locations."""
    locations = torch.randperm(rows * columns, generator=seeded(0))[:count].sort().values
    x = torch.randn(tokens, columns, generator=seeded(1), dtype=torch.float64, requires_grad=True)
    coefficients = torch.randn(count, generator=seeded(2), dtype=torch.float64, requires_grad=True)
    return x, coefficients, locations // columns, locations % columns, rows


@pytest.fixture
def chunks_of_three_tokens():
    """A CPU budget of 3 elements a chunk, and each token counted as 1 element wide: chunks of 3
    tokens whatever the widths (the token counts below are not multiples of 3)."""
    token_chunks = dct_module._token_chunks

    def three_tokens_each(tokens: int, width: int, device: torch.device):
        return token_chunks(tokens, 1, device)

    with mock.patch.dict(dct_module._CHUNK_ELEMENTS, {"cpu": 3}), \
            mock.patch.object(dct_module, "_token_chunks", three_tokens_each):  # fmt: skip
        yield


SPECTRUM_SHAPES = [(5, 7, 9), (4, 230, 20), (230, 3, 12), (231, 6, 40)]


@pytest.mark.parametrize(("rows", "columns", "count"), SPECTRUM_SHAPES)
def test_the_branch_function_passes_gradcheck_and_gradgradcheck(rows, columns, count):
    """The hand-written backward (and, as its docstring says, double backward) against finite
    differences; (4, 230), (230, 3) and (231, 6) put each side of the transform on its FFT path,
    at both parities."""
    inputs = spectrum_product_inputs(2, rows, columns, count)
    assert torch.autograd.gradcheck(_SparseSpectrumProduct.apply, inputs)
    assert torch.autograd.gradgradcheck(_SparseSpectrumProduct.apply, inputs)


@pytest.mark.parametrize(("rows", "columns", "count"), SPECTRUM_SHAPES)
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_each_backward_function_passes_gradcheck_in_chunks(rows, columns, count, needs, chunks_of_three_tokens):
    """3-token chunks (5 tokens: a boundary inside the batch), for each set of inputs that needs a
    gradient (each takes its own Function: the fused backward, the transposed product, the
    sampled cross spectrum), to second order; gradcheck's fast mode (random projections)."""
    x, coefficients, *rest = spectrum_product_inputs(5, rows, columns, count)
    inputs = (x.requires_grad_(needs[0]), coefficients.requires_grad_(needs[1]), *rest)
    assert torch.autograd.gradcheck(_SparseSpectrumProduct.apply, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(_SparseSpectrumProduct.apply, inputs, fast_mode=True)


@pytest.mark.parametrize(("rows", "columns", "count"), SPECTRUM_SHAPES)
def test_chunked_branch_is_the_whole_batch_computation(rows, columns, count, chunks_of_three_tokens):
    """3-token chunks against one (T, k) pass written with the public transforms, to rounding (a
    matmul's blocking, and so its rounding, depends on the number of rows)."""
    tokens = 5
    x, coefficients, rows_index, columns_index, _ = spectrum_product_inputs(tokens, rows, columns, count)
    output = _SparseSpectrumProduct.apply(x, coefficients, rows_index, columns_index, rows)
    gathered = dct(x, dim=-1)[..., columns_index] * coefficients
    expected = idct(gathered.new_zeros(tokens, rows).index_add(-1, rows_index, gathered), dim=-1)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    direction = torch.randn(output.shape, generator=seeded(3), dtype=output.dtype)
    mine = torch.autograd.grad(output, (x, coefficients), direction)
    reference = torch.autograd.grad(expected, (x, coefficients), direction)
    for gradient, expected_gradient in zip(mine, reference):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("rows", "columns"), [(300, 8), (8, 301), (226, 227)])
def test_fft_path_with_every_frequency_is_the_weight_path(rows, columns):
    """Every location of the spectrum (so the Nyquist frequency of the even length too) through the
    gather from and the scatter into the rfft's half spectrum, against x @ delta(W).T."""
    weight = torch.randn(rows, columns, generator=seeded(0), dtype=torch.float64)
    adapter = perturbed(DCTParam.from_weight(weight, num_coefficients=rows * columns), 1)
    x = torch.randn(5, columns, generator=seeded(2), dtype=torch.float64)
    assert_branch_is_the_weight_path(adapter, weight, x)


def saved_numels(function, *inputs) -> list[tuple[int, bool]]:
    """(numel, whether it is ``inputs[0]``'s storage) of every tensor autograd saves while
    ``function(*inputs)`` runs."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.numel(), tensor.untyped_storage().data_ptr() == inputs[0].untyped_storage().data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*inputs)
    return saved


def test_branch_saves_x_and_no_gathered_spectrum():
    """The Function saves x (already held as the layer's input), the coefficients and the
    locations: nothing of the (..., count) gathered spectrum that plain autograd keeps, at the
    default count m + n twice x's size. The plain composition is measured too, so the test
    would see the difference."""
    rows, columns = 12, 10
    adapter = perturbed(DCTParam.from_weight(torch.randn(rows, columns, dtype=torch.float64)), 0)
    count = adapter.coefficients.numel()
    x = torch.randn(4, 5, columns, dtype=torch.float64, requires_grad=True)
    saved = saved_numels(adapter.branch, x)
    assert all(is_x or numel <= count for numel, is_x in saved)
    assert any(is_x for _, is_x in saved)

    def plain(x: torch.Tensor) -> torch.Tensor:
        gathered = dct(x, dim=-1)[..., adapter.locations % columns] * adapter.coefficients
        spectrum = gathered.new_zeros(*x.shape[:-1], rows).index_add(-1, adapter.locations // columns, gathered)
        return idct(spectrum, dim=-1)

    assert any(numel == 4 * 5 * count for numel, _ in saved_numels(plain, x))


class LargestResult(TorchDispatchMode):
    """The largest numel of any tensor an aten op returns while the mode is on (backward included)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return result


def largest_tensor_of_a_branch_step(rows: int, columns: int, tokens: int) -> tuple[int, int]:
    """(largest tensor formed by the branch's forward and backward, coefficient count)."""
    adapter = perturbed(DCTParam.from_weight(torch.randn(rows, columns, dtype=torch.float64)), 0)
    x = torch.randn(tokens, columns, dtype=torch.float64, requires_grad=True)
    with LargestResult() as mode:
        adapter.branch(x).sum().backward()
    return mode.largest, adapter.coefficients.numel()


@pytest.mark.parametrize(("rows", "columns"), [(12, 10), (300, 260)])
def test_branch_in_chunks_forms_no_tensor_of_the_gathered_spectrum_size(rows, columns, chunks_of_three_tokens):
    """Forward and backward in 3-token chunks: nothing larger than the input, the output or the
    gradients (T x width); the (T, m + n) gathered spectrum never is (the next test shows the
    measurement sees it when the batch is one chunk)."""
    largest, count = largest_tensor_of_a_branch_step(rows, columns, tokens=20)
    assert largest <= 20 * max(rows, columns) < 20 * count


def test_a_batch_within_one_chunk_is_one_gathered_spectrum():
    largest, count = largest_tensor_of_a_branch_step(12, 10, tokens=20)
    assert largest == 20 * count


@given(st.integers(0, 50), st.integers(1, 40), st.sampled_from([1, 7, 64, 2**20]))
def test_token_chunks_cover_the_batch_in_order_within_the_budget(tokens, width, budget):
    with mock.patch.dict(dct_module._CHUNK_ELEMENTS, {"meta": budget}):
        chunks = list(dct_module._token_chunks(tokens, width, torch.device("meta")))
    assert [index for chunk in chunks for index in range(chunk.start, chunk.stop)] == list(range(tokens))
    assert all(0 < chunk.stop - chunk.start <= max(1, budget // width) for chunk in chunks)
    assert len(chunks) == -(-tokens // max(1, budget // width))


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
