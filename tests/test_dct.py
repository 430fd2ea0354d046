"""Properties, oracles, cache behaviour and input errors of :func:`decomp.dct` / ``idct`` /
``dct_matrix``."""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given
from hypothesis import strategies as st

from decomp import dct, dct_matrix, idct
from decomp import _dct
from tests.strategies import FLOAT_DTYPES, SEEDS, gaussian, relative_error, tolerance


ALGORITHMS = ("matmul", "rfft")


def forced(algorithm: str) -> contextlib.AbstractContextManager:
    """Make every length take ``algorithm``: the cached-matrix product or the rfft path."""
    threshold = 10**9 if algorithm == "matmul" else 0
    return mock.patch.object(_dct, "_MATMUL_MAX_N", threshold)


@st.composite
def signals(draw, dtypes=FLOAT_DTYPES, max_side: int = 40, max_length: int | None = None):
    """A Gaussian tensor of 1-3 dims, a dim to transform and the algorithm to force.

    Sometimes a non-contiguous view. With ``max_length``, the transformed dim is up to that long
    and the others up to ``max_side``.
    """
    shape = draw(st.lists(st.integers(1, max_side), min_size=1, max_size=3))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    if max_length is not None:
        shape[dim] = draw(st.integers(1, max_length))
    x = gaussian(tuple(shape), draw(SEEDS), draw(st.sampled_from(dtypes)))
    if x.ndim > 1 and draw(st.booleans()):
        x = x.transpose(0, -1)
    return x, dim, draw(st.sampled_from(ALGORITHMS))


@pytest.fixture(params=ALGORITHMS)
def algorithm(request):
    with forced(request.param):
        yield request.param


def scipy_dct(x: torch.Tensor, dim: int, inverse: bool = False) -> torch.Tensor:
    transform = scipy.fft.idct if inverse else scipy.fft.dct
    return torch.from_numpy(transform(x.numpy(), axis=dim, norm="ortho"))


def transform_along(matrix: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``matrix`` applied to every fibre of ``x`` along ``dim``."""
    return torch.tensordot(matrix, x, dims=([1], [dim])).movedim(0, dim)


# ----------------------------------------------------------------------------------------------
# Properties (each example forces one of the two algorithms)


@given(case=signals())
def test_idct_inverts_dct(case):
    x, dim, algorithm = case
    with forced(algorithm):
        assert relative_error(idct(dct(x, dim), dim), x) <= tolerance(x.dtype)
        assert relative_error(dct(idct(x, dim), dim), x) <= tolerance(x.dtype)


@given(case=signals())
def test_dct_preserves_the_norm_of_every_fibre(case):
    x, dim, algorithm = case
    fibre_norms = torch.linalg.vector_norm(x.double(), dim=dim)
    with forced(algorithm):
        for transform in (dct, idct):
            norms = torch.linalg.vector_norm(transform(x, dim).double(), dim=dim)
            torch.testing.assert_close(norms, fibre_norms, rtol=tolerance(x.dtype), atol=0)


@given(case=signals())
def test_dct_is_the_dct_matrix_applied_along_dim(case):
    x, dim, algorithm = case
    basis = dct_matrix(x.shape[dim], dtype=torch.float64)
    expected_dct = transform_along(basis, x.double(), dim)
    expected_idct = transform_along(basis.T, x.double(), dim)
    with forced(algorithm):
        assert relative_error(dct(x, dim), expected_dct) <= tolerance(x.dtype)
        assert relative_error(idct(x, dim), expected_idct) <= tolerance(x.dtype)


@given(case=signals(dtypes=(torch.float64,)), a=st.floats(-3, 3), b=st.floats(-3, 3), seed=SEEDS)
def test_dct_is_linear(case, a, b, seed):
    x, dim, algorithm = case
    y = gaussian(x.shape, seed)
    with forced(algorithm):
        expected = a * dct(x, dim) + b * dct(y, dim)
        torch.testing.assert_close(dct(a * x + b * y, dim), expected, rtol=1e-12, atol=1e-12)


@given(case=signals())
def test_any_dim_equals_the_last_dim_of_the_moved_tensor(case):
    x, dim, algorithm = case
    moved = x.movedim(dim, -1)
    with forced(algorithm):
        for transform in (dct, idct):
            expected = transform(moved, -1).movedim(-1, dim)
            assert relative_error(transform(x, dim), expected) <= tolerance(x.dtype)


@given(n=st.integers(1, 80))
def test_dct_matrix_is_orthonormal(n):
    basis = dct_matrix(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(basis @ basis.T, eye, rtol=0, atol=1e-13)
    torch.testing.assert_close(basis.T @ basis, eye, rtol=0, atol=1e-13)


@given(case=signals(dtypes=(torch.float16, torch.bfloat16), max_side=20))
def test_half_precision_round_trip(case):
    x, dim, algorithm = case
    with forced(algorithm):
        for transform in (dct, idct):
            out = transform(x, dim)
            assert out.dtype == x.dtype and out.shape == x.shape
            # Computed in fp32, so the result is the fp32 transform rounded to the half dtype.
            torch.testing.assert_close(out, transform(x.float(), dim).to(x.dtype), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Oracle: scipy.fft.dct / idct with norm="ortho"


@pytest.mark.parametrize("n", range(1, 71))
def test_matches_scipy_for_every_small_length(n, algorithm):
    x = gaussian((3, n, 2), seed=n)
    for dim in (1, -1, 0):
        for inverse, transform in ((False, dct), (True, idct)):
            expected = scipy_dct(x, dim, inverse)
            torch.testing.assert_close(transform(x, dim), expected, rtol=1e-12, atol=1e-13)


SWITCH = _dct._MATMUL_MAX_N


@pytest.mark.parametrize("n", [SWITCH - 1, SWITCH, SWITCH + 1, SWITCH + 2, 509, 512, 1000])
def test_matches_scipy_around_the_algorithm_switch(n):
    x = gaussian((2, n, 3), seed=n)
    for inverse, transform in ((False, dct), (True, idct)):
        expected = scipy_dct(x, 1, inverse)
        torch.testing.assert_close(transform(x, 1), expected, rtol=1e-12, atol=1e-13)


@given(case=signals(max_side=8, max_length=300))
def test_matches_scipy_on_random_shapes(case):
    x, dim, algorithm = case
    expected_dct = scipy_dct(x.double(), dim)
    expected_idct = scipy_dct(x.double(), dim, inverse=True)
    with forced(algorithm):
        assert relative_error(dct(x, dim), expected_dct) <= tolerance(x.dtype)
        assert relative_error(idct(x, dim), expected_idct) <= tolerance(x.dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("shape", "dim"), [((50, 40), -1), ((40, 50), 0), ((16, 40, 3), 1)])
def test_cpu_blocks_match_scipy(shape, dim, dtype, monkeypatch):
    # With 2 KiB blocks each shape spans several blocks, one shape per branch of the block layout.
    monkeypatch.setattr(_dct, "_CPU_BLOCK_BYTES", 2048)
    x = gaussian(shape, seed=7, dtype=dtype)
    assert x.numel() * x.element_size() > 3 * _dct._CPU_BLOCK_BYTES
    with forced("rfft"):
        for inverse, transform in ((False, dct), (True, idct)):
            expected = scipy_dct(x.double(), dim, inverse)
            assert relative_error(transform(x, dim), expected) <= tolerance(dtype)


@pytest.mark.parametrize("block_elements", [None, 1, 50, 1000])
@pytest.mark.parametrize("shape", [(4, 33, 5), (1, 64, 7), (9, 17, 1)])
def test_block_size_does_not_change_the_result(shape, block_elements):
    # block_elements=None is the single-block layout other devices use.
    x3 = gaussian(shape, seed=3)
    dim = 1
    assert relative_error(_dct._fast_dct(x3, block_elements), scipy_dct(x3, dim)) <= 1e-13
    assert relative_error(_dct._fast_idct(x3, block_elements), scipy_dct(x3, dim, True)) <= 1e-13


def test_dct_matrix_matches_scipy_basis():
    for n in (1, 2, 3, 8, 31):
        expected = torch.from_numpy(scipy.fft.dct(np.eye(n), norm="ortho", axis=0))
        torch.testing.assert_close(dct_matrix(n, dtype=torch.float64), expected, rtol=0, atol=1e-14)


def test_dct_matrix_large_n_stays_accurate():
    # The angle is reduced in integers, so a large basis is as accurate as a small one.
    n = 2048
    basis = dct_matrix(n, dtype=torch.float64)
    x = gaussian((n,), seed=0)
    torch.testing.assert_close(basis @ x, scipy_dct(x, 0), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Autograd


def test_gradients_are_the_transposed_transform(algorithm):
    x = gaussian((2, 20, 2), seed=1).requires_grad_()
    for transform in (dct, idct):
        assert torch.autograd.gradcheck(lambda t: transform(t, 1), (x,))
        assert torch.autograd.gradgradcheck(lambda t: transform(t, 1), (x,))


def test_vmap_matches_the_batched_call(algorithm):
    x = gaussian((6, 20, 3), seed=5)
    for transform in (dct, idct):

        def along_1(t, transform=transform):
            return transform(t, 1, check_finite=False)

        mapped = torch.func.vmap(along_1, in_dims=2, out_dims=2)
        torch.testing.assert_close(mapped(x), transform(x, 1), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("transform", [dct, idct])
def test_vmap_works_with_the_default_finiteness_check(algorithm, transform):
    """Regression: the default check_finite=True used to fail under vmap (data-dependent bool)."""
    x = gaussian((6, 20, 3), seed=6)
    mapped = torch.func.vmap(lambda t: transform(t, 1), in_dims=2, out_dims=2)
    torch.testing.assert_close(mapped(x), transform(x, 1), rtol=1e-12, atol=1e-13)
    nested = torch.func.vmap(torch.func.vmap(lambda t: transform(t, 0)), in_dims=2, out_dims=2)
    torch.testing.assert_close(nested(x), transform(x, 1), rtol=1e-12, atol=1e-13)
    gradient = torch.func.vmap(torch.func.grad(lambda t: transform(t, 0).square().sum()))
    torch.testing.assert_close(gradient(x.mT.reshape(-1, 20)), 2 * x.mT.reshape(-1, 20))
    # The check reads the whole batch under vmap: one bad sample raises, as the batched call does.
    x[4, 7, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        mapped(x)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        nested(x)


def test_half_input_gets_a_half_gradient():
    x = gaussian((4, 20), seed=2, dtype=torch.bfloat16).requires_grad_()
    dct(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    expected = idct(torch.ones(4, 20, dtype=torch.float64))
    torch.testing.assert_close(x.grad.double(), expected, rtol=0, atol=2e-2)


# ----------------------------------------------------------------------------------------------
# Cache


def test_dct_matrix_is_cached_per_key_and_returned_as_a_copy():
    a = dct_matrix(12, dtype=torch.float32)
    again = dct_matrix(12, dtype=torch.float32, device="cpu")
    assert torch.equal(again, a) and again.data_ptr() != a.data_ptr()
    cached = _dct._cached_dct_matrix(12, torch.float32, torch.device("cpu"))
    assert _dct._cached_dct_matrix(12, torch.float32, torch.device("cpu")) is cached
    assert torch.equal(a, cached) and a.data_ptr() != cached.data_ptr()
    b = dct_matrix(12, dtype=torch.float64)
    assert b.dtype == torch.float64 and a.dtype == torch.float32
    half = dct_matrix(12, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), a, rtol=0, atol=1e-2)


def test_dct_matrix_default_dtype():
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert dct_matrix(6).dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)
    assert dct_matrix(6).dtype == previous


def test_matrix_first_built_in_inference_mode_works_with_autograd():
    n = 23
    _dct._cached_dct_matrix.cache_clear()  # so this test builds the matrix, not an earlier one
    with torch.inference_mode():
        built = dct_matrix(n, dtype=torch.float64)
    weight = gaussian((n, 3), seed=4).requires_grad_()
    (dct_matrix(n, dtype=torch.float64) @ weight).sum().backward()
    with mock.patch.object(_dct, "_MATMUL_MAX_N", 10**9):  # the transforms read the cache itself
        (dct(weight, dim=0, check_finite=False)).sum().backward()
    assert _dct._cached_dct_matrix.cache_info().currsize >= 1
    torch.testing.assert_close(weight.grad, 2 * built.sum(0)[:, None].expand(n, 3))


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("transform", [dct, idct])
@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        ([1.0, 2.0], {}, TypeError, "x must be a torch.Tensor, got list"),
        (torch.ones(3, dtype=torch.int64), {}, TypeError, "x must have a real floating dtype"),
        (torch.ones(3, dtype=torch.complex64), {}, TypeError, "x must have a real floating dtype"),
        (torch.tensor(1.0), {}, ValueError, r"x must have ndim >= 1, got shape \(\)"),
        (torch.ones(2, 0), {}, ValueError, "x must not be empty"),
        (torch.tensor([1.0, float("nan")]), {}, ValueError, "x contains NaN or Inf"),
        (torch.tensor([1.0, float("inf")]), {}, ValueError, "x contains NaN or Inf"),
        (torch.ones(2, 3), {"dim": 2}, ValueError, r"dim must be in \[-2, 1\], got 2"),
        (torch.ones(2, 3), {"dim": -3}, ValueError, r"dim must be in \[-2, 1\], got -3"),
        (torch.ones(2, 3), {"dim": 1.0}, TypeError, "dim must be an int, got float"),
        (torch.ones(2, 3), {"dim": True}, TypeError, "dim must be an int, got bool"),
    ],
)
def test_transforms_reject_bad_input(transform, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        transform(x, **kwargs)


@pytest.mark.parametrize("transform", [dct, idct])
def test_check_finite_false_skips_the_check(transform):
    out = transform(torch.tensor([1.0, float("nan"), 2.0]), check_finite=False)
    assert out.isnan().any()


@pytest.mark.parametrize(
    ("n", "kwargs", "error", "match"),
    [
        (0, {}, ValueError, "n must be >= 1, got 0"),
        (-3, {}, ValueError, "n must be >= 1, got -3"),
        (4.0, {}, TypeError, "n must be an int, got float"),
        (True, {}, TypeError, "n must be an int, got bool"),
        (4, {"dtype": torch.int32}, TypeError, "dtype must be a real floating torch.dtype"),
        (4, {"dtype": torch.complex64}, TypeError, "dtype must be a real floating torch.dtype"),
        (4, {"dtype": "float32"}, TypeError, "dtype must be a real floating torch.dtype"),
    ],
)
def test_dct_matrix_rejects_bad_input(n, kwargs, error, match):
    with pytest.raises(error, match=match):
        dct_matrix(n, **kwargs)
