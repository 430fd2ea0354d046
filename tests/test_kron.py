"""Properties and oracles for decomp.kpsvd, KronSum and kron_shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import decomp._kron
from decomp import KronSum, kpsvd, kron_shapes
from tests.strategies import SEEDS, gaussian, generator, relative_error, tolerance

SIDES = st.integers(1, 5)


@st.composite
def kron_problems(draw, max_batch_dims: int = 0):
    """A Gaussian (..., m1*m2, n1*n2) matrix with its factor shapes."""
    b_shape, c_shape = (draw(SIDES), draw(SIDES)), (draw(SIDES), draw(SIDES))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=max_batch_dims)))
    shape = (*batch, b_shape[0] * c_shape[0], b_shape[1] * c_shape[1])
    return gaussian(shape, draw(SEEDS)), b_shape, c_shape


def numpy_rearrangement(A: np.ndarray, b_shape, c_shape) -> np.ndarray:
    """Van Loan--Pitsianis R(A), built block by block: row (i, j) is vec of block A_ij."""
    (m1, n1), (m2, n2) = b_shape, c_shape
    rows = [A[i * m2 : (i + 1) * m2, j * n2 : (j + 1) * n2].reshape(-1) for i in range(m1) for j in range(n1)]
    return np.stack(rows)


def optimal_error(A: torch.Tensor, b_shape, c_shape, rank: int) -> float:
    rearranged = numpy_rearrangement(A.double().numpy(), b_shape, c_shape)
    singular_values = np.linalg.svd(rearranged, compute_uv=False)
    return float(np.sqrt(np.sum(singular_values[rank:] ** 2)))


def frobenius(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double()))


def structured(b_shape, c_shape, terms: int, noise: float, seed: int) -> torch.Tensor:
    """A sum of ``terms`` Kronecker products with weights 0.6**k, plus Gaussian noise."""
    A = sum(
        0.6**k * torch.kron(gaussian(b_shape, seed + 2 * k), gaussian(c_shape, seed + 2 * k + 1))
        for k in range(terms)
    )
    return A + noise * gaussian(A.shape, seed - 1)


@given(st.lists(st.integers(1, 2), max_size=1), st.integers(1, 4), SIDES, SIDES, SIDES, SIDES, SEEDS)
def test_to_matrix_matches_numpy_kron(batch, rank, m1, n1, m2, n2, seed):
    S = gaussian((*batch, rank), seed).abs()
    B = gaussian((*batch, rank, m1, n1), seed + 1)
    C = gaussian((*batch, rank, m2, n2), seed + 2)
    result = KronSum(S, B, C).to_matrix()
    flat_S, flat_B, flat_C = (t.reshape(-1, *t.shape[len(batch) :]).numpy() for t in (S, B, C))
    expected = np.stack(
        [sum(s[k] * np.kron(b[k], c[k]) for k in range(rank)) for s, b, c in zip(flat_S, flat_B, flat_C)]
    )
    np.testing.assert_allclose(result.reshape(expected.shape).numpy(), expected, rtol=1e-12, atol=1e-12)


@given(kron_problems(max_batch_dims=1), st.sampled_from(["exact", "randomized", "auto"]), SEEDS)
def test_full_rank_is_exact(problem, method, seed):
    A, b_shape, c_shape = problem
    full = min(b_shape[0] * b_shape[1], c_shape[0] * c_shape[1])
    result = kpsvd(A, b_shape, c_shape, full, method=method, generator=generator(seed))
    assert relative_error(result.to_matrix(), A) <= tolerance(torch.float64)


@given(kron_problems(), st.data())
def test_exact_error_is_the_eckart_young_error_of_the_rearrangement(problem, data):
    A, b_shape, c_shape = problem
    rank = data.draw(st.integers(1, min(b_shape[0] * b_shape[1], c_shape[0] * c_shape[1])))
    error = frobenius(A - kpsvd(A, b_shape, c_shape, rank, method="exact").to_matrix())
    optimum = optimal_error(A, b_shape, c_shape, rank)
    assert math.isclose(error, optimum, rel_tol=1e-9, abs_tol=1e-12 * frobenius(A))


@given(kron_problems())
def test_error_non_increasing_in_rank(problem):
    A, b_shape, c_shape = problem
    full = min(b_shape[0] * b_shape[1], c_shape[0] * c_shape[1])
    errors = [
        frobenius(A - kpsvd(A, b_shape, c_shape, r, method="exact").to_matrix()) for r in range(1, full + 1)
    ]
    slack = 1e-12 * frobenius(A)
    assert all(later <= earlier + slack for earlier, later in zip(errors, errors[1:]))


@given(SIDES, SIDES, SIDES, SIDES, SEEDS, st.sampled_from(["exact", "randomized"]))
def test_rank_one_recovers_an_exact_kronecker_product(m1, n1, m2, n2, seed, method):
    B, C = gaussian((m1, n1), seed), gaussian((m2, n2), seed + 1)
    result = kpsvd(torch.kron(B, C), (m1, n1), (m2, n2), 1, method=method, generator=generator(seed))
    S, B1, _ = result
    assert relative_error(result.to_matrix(), torch.kron(B, C)) <= tolerance(torch.float64)
    assert math.isclose(float(S[0]), frobenius(B) * frobenius(C), rel_tol=1e-9)
    # Recovered up to the joint sign: |<B1, B / |B|>| = 1.
    assert math.isclose(abs(float((B1[0] * B).sum())) / frobenius(B), 1.0, rel_tol=1e-9)


@given(kron_problems(max_batch_dims=2), st.data())
def test_factors_have_unit_norm_and_spectrum_sorted(problem, data):
    A, b_shape, c_shape = problem
    rank = data.draw(st.integers(1, min(b_shape[0] * b_shape[1], c_shape[0] * c_shape[1])))
    S, B, C = kpsvd(A, b_shape, c_shape, rank, method=data.draw(st.sampled_from(["exact", "randomized"])))
    assert S.shape == (*A.shape[:-2], rank)
    assert B.shape == (*A.shape[:-2], rank, *b_shape)
    assert C.shape == (*A.shape[:-2], rank, *c_shape)
    for factor in (B, C):
        gram = factor.flatten(-2) @ factor.flatten(-2).mT  # vec(B_k) are orthonormal singular vectors
        torch.testing.assert_close(gram, torch.eye(rank, dtype=A.dtype).expand_as(gram), atol=1e-12, rtol=0)
    assert bool((S >= 0).all()) and bool((S[..., :-1] >= S[..., 1:]).all())


@given(kron_problems(max_batch_dims=2), st.data())
def test_batched_equals_per_matrix(problem, data):
    A, b_shape, c_shape = problem
    rank = data.draw(st.integers(1, min(b_shape[0] * b_shape[1], c_shape[0] * c_shape[1])))
    batched = kpsvd(A, b_shape, c_shape, rank, method="exact").to_matrix()
    flat = A.reshape(-1, *A.shape[-2:])
    looped = torch.stack([kpsvd(a, b_shape, c_shape, rank, method="exact").to_matrix() for a in flat])
    # Each matrix's error is the same optimum; compare errors, since a tie in R(A)'s spectrum
    # would make the rank-r term itself non-unique.
    errors_batched = torch.linalg.matrix_norm(flat - batched.reshape(flat.shape))
    errors_looped = torch.linalg.matrix_norm(flat - looped)
    torch.testing.assert_close(errors_batched, errors_looped, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_matches_exact_error_on_structured_matrix(seed):
    b_shape = c_shape = (8, 8)
    A = structured(b_shape, c_shape, terms=8, noise=1e-3, seed=10 * seed)
    exact = frobenius(A - kpsvd(A, b_shape, c_shape, 4, method="exact").to_matrix())
    sketched = kpsvd(A, b_shape, c_shape, 4, method="randomized", generator=generator(seed))
    randomized = frobenius(A - sketched.to_matrix())
    assert exact * (1 - 1e-12) <= randomized <= 1.01 * exact


@pytest.mark.parametrize(
    ("rank", "oversample", "method", "sketches"),
    [
        (6, 10, "auto", True),  # 16 <= 64 // 4
        (7, 10, "auto", False),  # 17 > 16
        (2, 0, "exact", False),
        (60, 10, "randomized", True),
    ],
)
def test_method_choice(monkeypatch, rank, oversample, method, sketches):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return decomp._rsvd.rsvd(*args, **kwargs)

    monkeypatch.setattr(decomp._kron, "rsvd", spy)
    A = structured((8, 8), (8, 8), terms=3, noise=0.1, seed=0)
    result = kpsvd(A, (8, 8), (8, 8), rank, method=method, oversample=oversample, generator=generator(0))
    assert bool(calls) == sketches
    assert result.S.shape == (rank,)


def test_generator_reproducibility():
    A = structured((6, 6), (6, 6), terms=4, noise=0.1, seed=3)
    first = kpsvd(A, (6, 6), (6, 6), 2, method="randomized", generator=generator(5))
    second = kpsvd(A, (6, 6), (6, 6), 2, method="randomized", generator=generator(5))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_dtype_round_trip(dtype, batch):
    A = structured((4, 3), (5, 2), terms=3, noise=0.0, seed=1).expand(*batch, 20, 6).to(dtype)
    result = kpsvd(A, (4, 3), (5, 2), 3)
    assert all(t.dtype == dtype for t in result)
    assert result.to_matrix().dtype == dtype
    # Three exact terms: rank 3 reconstructs to the input's own precision.
    assert relative_error(result.to_matrix(), A) <= 10 * tolerance(dtype)


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_kron_shapes_are_the_balanced_divisors(m, n):
    (m1, n1), (m2, n2) = kron_shapes(m, n)
    for size, small, large in ((m, m1, m2), (n, n1, n2)):
        assert small * large == size and small <= large
        assert all(size % d != 0 for d in range(small + 1, math.isqrt(size) + 1))


A = gaussian((6, 6), seed=0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: kpsvd(A.numpy(), (2, 3), (3, 2), 1), TypeError, "A must be a torch.Tensor"),
        (lambda: kpsvd(A.int(), (2, 3), (3, 2), 1), TypeError, "real floating dtype"),
        (lambda: kpsvd(A[0], (2, 3), (3, 2), 1), ValueError, "A must have ndim >= 2"),
        (lambda: kpsvd(A.clone().fill_(float("nan")), (2, 3), (3, 2), 1), ValueError, "NaN or Inf"),
        (lambda: kpsvd(A, (2, 3, 1), (3, 2), 1), TypeError, "b_shape must be a pair of positive ints"),
        (lambda: kpsvd(A, 6, (3, 2), 1), TypeError, "b_shape must be a pair"),
        (lambda: kpsvd(A, (2, 3), (3, 2.0), 1), TypeError, r"c_shape\[1\] must be an int"),
        (lambda: kpsvd(A, (0, 3), (3, 2), 1), ValueError, r"b_shape\[0\] must be >= 1"),
        (
            lambda: kpsvd(A, (2, 2), (3, 2), 1),
            ValueError,
            r"\(\.\.\., 6, 4\) for b_shape=\(2, 2\) and c_shape=\(3, 2\), got A of shape \(6, 6\)",
        ),
        (lambda: kpsvd(A, (2, 3), (3, 2), 0), ValueError, r"rank must be in \[1, 6\], got 0"),
        (lambda: kpsvd(A, (2, 3), (3, 2), 7), ValueError, r"rank must be in \[1, 6\], got 7"),
        (lambda: kpsvd(A, (2, 3), (3, 2), 1, method="svd"), ValueError, "method must be one of"),
        (lambda: kpsvd(A, (2, 3), (3, 2), 1, oversample=-1), ValueError, "oversample must be >= 0"),
        (lambda: kpsvd(A, (2, 3), (3, 2), 1, power_iters=-2), ValueError, "power_iters must be >= 0"),
        (lambda: kpsvd(A, (2, 3), (3, 2), 1, generator=1), TypeError, "generator must be a torch.Generator"),
        (lambda: kron_shapes(0, 4), ValueError, "m must be >= 1"),
        (lambda: kron_shapes(4, -1), ValueError, "n must be >= 1"),
        (lambda: kron_shapes(4.0, 4), TypeError, "m must be an int"),
        (lambda: kron_shapes(4, True), TypeError, "n must be an int"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
