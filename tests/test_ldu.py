"""Properties, the scipy oracle, singular inputs and input errors of :func:`decomp.ldu`."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given

from decomp import LDU, ldu
from tests.strategies import SEEDS, gaussian, matrices, relative_error, tolerance


def assert_unit_triangular(T: torch.Tensor, lower: bool) -> None:
    strict = torch.triu(T, 1) if lower else torch.tril(T, -1)
    assert bool((strict == 0).all()), "entries on the wrong side of the diagonal"
    assert bool((T.diagonal(dim1=-2, dim2=-1) == 1).all()), "diagonal is not exactly 1"


def assert_permutation(perm: torch.Tensor) -> None:
    assert perm.dtype == torch.int64
    identity = torch.arange(perm.shape[-1]).expand_as(perm)
    assert torch.equal(perm.sort(-1).values, identity)


def dense_product(factors: LDU) -> torch.Tensor:
    """``P @ L @ diag(D) @ U`` with the dense permutation matrix, the textbook form."""
    P, L, D, U = factors.permutation_matrix(), factors.L, factors.D, factors.U
    return P @ L @ torch.diag_embed(D) @ U


# ----------------------------------------------------------------------------------------------
# Properties


@given(A=matrices(max_side=24, max_batch_dims=2))
def test_factors_reconstruct_A(A):
    factors = ldu(A)
    assert relative_error(dense_product(factors), A) <= tolerance(A.dtype)
    assert relative_error(factors.to_matrix(), A) <= tolerance(A.dtype)
    # A = (L diag(D) U)[perm], and A[perm.argsort()] = L diag(D) U: the gather is exact.
    eliminated = factors.L @ torch.diag_embed(factors.D) @ factors.U
    inverse = factors.perm.argsort(-1).unsqueeze(-1)
    gathered = torch.take_along_dim(eliminated, factors.perm.unsqueeze(-1), -2)
    assert torch.equal(factors.to_matrix(), gathered)
    assert relative_error(eliminated, torch.take_along_dim(A, inverse, -2)) <= tolerance(A.dtype)


@given(A=matrices(max_side=24, max_batch_dims=2))
def test_factor_structure_and_shapes(A):
    m, n = A.shape[-2:]
    k = min(m, n)
    batch = A.shape[:-2]
    perm, L, D, U = ldu(A)
    assert perm.shape == (*batch, m) and L.shape == (*batch, m, k)
    assert D.shape == (*batch, k) and U.shape == (*batch, k, n)
    assert all(t.dtype == A.dtype for t in (L, D, U))
    assert_permutation(perm)
    assert_unit_triangular(L, lower=True)
    assert_unit_triangular(U, lower=False)
    assert bool((L.abs() <= 1).all()), "partial pivoting bounds |L| by 1"
    assert bool((D != 0).all())


@given(A=matrices(max_side=12, max_batch_dims=1, dtypes=(torch.float16, torch.bfloat16)))
def test_half_precision_round_trip(A):
    result = ldu(A)
    assert all(t.dtype == A.dtype for t in (result.L, result.D, result.U))
    assert result.to_matrix().dtype == A.dtype
    assert result.permutation_matrix().dtype == A.dtype
    assert_permutation(result.perm)
    assert_unit_triangular(result.L, lower=True)
    assert_unit_triangular(result.U, lower=False)
    # Factored in fp32; only the rounding of the factors to the half dtype is lost.
    full = ldu(A.float())
    assert torch.equal(result.perm, full.perm)
    assert relative_error(result.to_matrix(), A) <= tolerance(A.dtype)


@given(A=matrices(max_side=16), seed=SEEDS)
def test_batch_members_factor_independently(A, seed):
    batch = torch.stack([A, gaussian(A.shape, seed, A.dtype)])
    batched = ldu(batch)
    for i in range(2):
        single = ldu(batch[i])
        for got, expected in zip(batched, single):
            tol = tolerance(A.dtype)
            torch.testing.assert_close(got[i], expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# Oracle: scipy.linalg.lu


@given(A=matrices(max_side=24, max_batch_dims=1, dtypes=(torch.float64,)))
def test_matches_scipy_lu(A):
    p, l, u = scipy.linalg.lu(A.numpy())
    p_indices = scipy.linalg.lu(A.numpy(), p_indices=True)[0]
    factors = ldu(A)
    perm, L, D, U = factors
    np.testing.assert_array_equal(perm.numpy(), p_indices)
    np.testing.assert_array_equal(factors.permutation_matrix().numpy(), p)
    np.testing.assert_allclose(L.numpy(), l, rtol=0, atol=1e-12)
    scale = max(1.0, float(np.abs(u).max()))
    np.testing.assert_allclose((torch.diag_embed(D) @ U).numpy(), u, rtol=0, atol=1e-12 * scale)


# ----------------------------------------------------------------------------------------------
# Singular and near-singular input


def test_zero_column_raises_naming_the_pivot():
    A = gaussian((5, 5), seed=0)
    A[:, 2] = 0
    expected = r"A is singular: zero pivot at pivot 2 of partial-pivoting LU"
    with pytest.raises(ValueError, match=expected):
        ldu(A)


def test_rank_deficient_exact_zero_pivot_raises():
    # Column 2 equals column 1 and every multiplier is a power of two, so LU hits an exact zero
    # pivot in any order of operations, on any LAPACK.
    A = torch.tensor([[4.0, 2.0, 2.0], [2.0, 3.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert int(torch.linalg.matrix_rank(A)) == 2
    with pytest.raises(ValueError, match="zero pivot at pivot 2"):
        ldu(A)


def test_wide_matrix_with_zero_leading_column_raises():
    A = gaussian((3, 6), seed=1)
    A[:, 0] = 0
    with pytest.raises(ValueError, match="zero pivot at pivot 0"):
        ldu(A)


def test_batched_singular_member_is_named():
    A = gaussian((2, 3, 4, 4), seed=2)
    A[1, 2, :, 1] = 0
    with pytest.raises(ValueError, match=r"zero pivot at batch index \(1, 2\), pivot 1"):
        ldu(A)


def test_near_singular_input_factors_with_a_large_U():
    eps = 1e-12
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, eps, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    A = A @ gaussian((3, 3), seed=3).triu().fill_diagonal_(1.0)  # keep the tiny pivot, mix columns
    factors = ldu(A)
    assert float(factors.D.abs().min()) < 1e-10
    assert float(factors.U.abs().max()) > 1e10
    torch.testing.assert_close(dense_product(factors), A, rtol=0, atol=1e-12)
    torch.testing.assert_close(factors.to_matrix(), A, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Result type and autograd


def test_result_is_a_named_tuple():
    A = gaussian((3, 4), seed=4)
    result = ldu(A)
    assert isinstance(result, LDU)
    perm, L, D, U = result
    assert perm is result.perm and L is result.L and D is result.D and U is result.U


def test_gradient_flows_through_the_reconstruction():
    A = gaussian((4, 4), seed=5).requires_grad_()
    ldu(A).to_matrix().sum().backward()
    ones = torch.ones(4, 4, dtype=torch.float64)
    torch.testing.assert_close(A.grad, ones, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("A", "error", "match"),
    [
        ([[1.0, 2.0], [3.0, 4.0]], TypeError, "A must be a torch.Tensor, got list"),
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "A must have a real floating dtype"),
        (torch.ones(3, 3, dtype=torch.complex64), TypeError, "A must have a real floating dtype"),
        (torch.ones(3), ValueError, r"A must have ndim >= 2, got shape \(3,\)"),
        (torch.ones(0, 3), ValueError, "A must not be empty"),
        (torch.ones(2, 0, 3), ValueError, "A must not be empty"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "A contains NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "A contains NaN or Inf"),
    ],
)
def test_rejects_bad_input(A, error, match):
    with pytest.raises(error, match=match):
        ldu(A)


def test_check_finite_false_skips_the_check():
    A = torch.tensor([[2.0, float("nan")], [1.0, 1.0]])
    perm, L, D, U = ldu(A, check_finite=False)
    assert U.isnan().any()
