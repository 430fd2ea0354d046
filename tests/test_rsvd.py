"""Properties and oracles for decomp.rsvd (fixed rank and fixed precision)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.utils.extmath import randomized_svd

from decomp import SVD, rsvd
from tests.strategies import (
    SEEDS,
    decaying,
    gaussian,
    generator,
    matrices,
    relative_error,
    tolerance,
    with_spectrum,
)

# Measured worst case at the defaults is 1.003x for decays <= 0.95 (see rsvd's docstring).
OPTIMALITY_FACTOR = 1.05


def frobenius(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(x.double())


def optimal_error(A: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart--Young: the error of the best rank-``rank`` approximation, per matrix."""
    return torch.linalg.svdvals(A.double())[..., rank:].square().sum(-1).sqrt()


def assert_orthonormal_columns(Q: torch.Tensor, atol: float) -> None:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype).expand(*Q.shape[:-2], -1, -1)
    torch.testing.assert_close(Q.mT @ Q, eye, atol=atol, rtol=0)


@st.composite
def low_rank_problems(draw, max_side: int = 24):
    m, n = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    true_rank = draw(st.integers(1, min(m, n)))
    rank = draw(st.integers(true_rank, min(m, n)))
    seed = draw(SEEDS)
    A = gaussian((m, true_rank), seed) @ gaussian((true_rank, n), seed + 1)
    return A, true_rank, rank, seed


@given(low_rank_problems())
def test_exact_when_rank_covers_the_matrix(problem):
    A, true_rank, rank, seed = problem
    U, S, Vh = rsvd(A, rank, generator=generator(seed))
    assert relative_error((U * S.unsqueeze(-2)) @ Vh, A) <= tolerance(torch.float64)
    # Oracle: numpy's singular values, the trailing ones being zero.
    expected = np.linalg.svd(A.numpy(), compute_uv=False)[:rank]
    np.testing.assert_allclose(S.numpy(), expected, rtol=0, atol=1e-10 * expected[0])


@given(matrices(max_side=20, max_batch_dims=2), st.data())
def test_factors_are_orthonormal_and_spectrum_sorted(A, data):
    m, n = A.shape[-2:]
    rank = data.draw(st.integers(1, min(m, n)))
    U, S, Vh = rsvd(A, rank, generator=generator(data.draw(SEEDS)))
    assert U.shape == (*A.shape[:-2], m, rank)
    assert S.shape == (*A.shape[:-2], rank)
    assert Vh.shape == (*A.shape[:-2], rank, n)
    atol = 1e-5 if A.dtype == torch.float32 else 1e-12
    assert_orthonormal_columns(U, atol)
    assert_orthonormal_columns(Vh.mT, atol)
    assert bool((S >= 0).all())
    assert bool((S[..., :-1] >= S[..., 1:]).all())


@given(
    st.integers(8, 48),
    st.integers(8, 48),
    st.sampled_from([0.5, 0.7, 0.9, 0.95]),
    SEEDS,
    st.data(),
)
def test_error_within_factor_of_optimum_on_decaying_spectra(m, n, decay, seed, data):
    A = decaying(m, n, seed, decay)
    rank = data.draw(st.integers(1, min(m, n) - 1))
    optimum = optimal_error(A, rank)
    # Below ~1e-12 the optimum is round-off and ratios to it are meaningless.
    floor = 1e-12 * frobenius(A)
    error = frobenius(A - rsvd(A, rank, generator=generator(seed)).to_matrix())
    assert error <= OPTIMALITY_FACTOR * optimum + floor


@given(st.integers(12, 40), st.integers(12, 40), SEEDS, st.data())
def test_no_worse_than_torch_svd_lowrank_at_equal_sketch(m, n, seed, data):
    A = decaying(m, n, seed)
    rank = data.draw(st.integers(1, min(m, n) - 1))
    torch.manual_seed(seed)
    U, S, V = torch.svd_lowrank(A, q=min(rank + 10, m, n), niter=2)
    theirs = frobenius(A - (U[:, :rank] * S[:rank]) @ V[:, :rank].T)
    ours = frobenius(A - rsvd(A, rank, generator=generator(seed)).to_matrix())
    assert ours <= 1.01 * theirs + 1e-12 * frobenius(A)


@given(st.integers(12, 40), st.integers(12, 40), SEEDS, st.data())
def test_no_worse_than_sklearn_randomized_svd(m, n, seed, data):
    A = decaying(m, n, seed)
    rank = data.draw(st.integers(1, min(m, n) - 1))
    U, S, Vt = randomized_svd(A.numpy(), rank, n_oversamples=10, n_iter=2, random_state=seed)
    theirs = frobenius(A - torch.from_numpy((U * S) @ Vt))
    ours = frobenius(A - rsvd(A, rank, generator=generator(seed)).to_matrix())
    assert ours <= 1.01 * theirs + 1e-12 * frobenius(A)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_wide_spectrum_beats_unnormalised_power_iteration(seed):
    # Six decades of singular values: sklearn's n_iter=2 path skips normalisation between power
    # steps, so in float32 the directions below ~s_1 * eps^(1/5) are rounded away (~1.9x here).
    m, n, rank = 200, 100, 30
    spectrum = torch.logspace(0, -6, n, dtype=torch.float64)
    A = with_spectrum(m, n, spectrum, seed).float()
    optimum = spectrum[rank:].square().sum().sqrt()
    U, S, Vt = randomized_svd(
        A.numpy(), rank, n_oversamples=10, n_iter=2, power_iteration_normalizer="none", random_state=seed
    )
    theirs = frobenius(A.double() - torch.from_numpy((U * S) @ Vt).double())
    ours = frobenius(A.double() - rsvd(A, rank, generator=generator(seed)).to_matrix().double())
    assert ours <= 1.01 * optimum
    assert ours * 1.5 < theirs


@st.composite
def tolerance_problems(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    m, n = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    seed = draw(SEEDS)
    if draw(st.booleans()):
        A = decaying(m, n, seed, draw(st.sampled_from([0.5, 0.8, 0.95])))
        A = A.expand(*batch, m, n) + 1e-3 * gaussian((*batch, m, n), seed + 2)
    else:
        A = gaussian((*batch, m, n), seed)
    # 1e-8 is below the fp64 subtraction threshold, exercising the explicit-residual path.
    tol = draw(st.sampled_from([0.5, 0.2, 0.05, 1e-2, 1e-8]))
    return A, tol, seed


@given(tolerance_problems())
def test_tolerance_mode_meets_tol_with_minimal_rank(problem):
    A, tol, seed = problem
    result = rsvd(A, tol=tol, generator=generator(seed))
    rank = result.S.shape[-1]
    assert 1 <= rank <= min(A.shape[-2:])
    norm = frobenius(A)
    relative = frobenius(A - result.to_matrix()) / norm
    assert bool((relative <= tol * (1 + 1e-9) + 1e-13).all())
    assert_orthonormal_columns(result.U, 1e-12)
    if rank > 1:
        # One component fewer of the returned factors must miss tol for some matrix of the batch.
        fewer = SVD(result.U[..., :-1], result.S[..., :-1], result.Vh[..., :-1, :]).to_matrix()
        assert bool((frobenius(A - fewer) / norm > tol).any())


@pytest.mark.parametrize("tol", [0.3, 0.05])
def test_tolerance_mode_batch_keeps_the_largest_rank_needed(tol):
    # A rank-2 matrix next to a Gaussian one: the batch must keep growing until the Gaussian one
    # meets tol, and then use its (larger) rank for both.
    easy = gaussian((40, 2), seed=0) @ gaussian((2, 36), seed=1)
    hard = gaussian((40, 36), seed=2)
    result = rsvd(torch.stack((easy, hard)), tol=tol, generator=generator(0))
    alone = rsvd(hard, tol=tol, generator=generator(0))
    errors = frobenius(torch.stack((easy, hard)) - result.to_matrix()) / frobenius(torch.stack((easy, hard)))
    assert bool((errors <= tol).all())
    assert abs(result.S.shape[-1] - alone.S.shape[-1]) <= 1


@given(
    st.integers(40, 70),
    st.integers(34, 60),
    st.integers(17, 24),
    st.sampled_from([1e-2, 1e-12]),
    st.sampled_from([torch.float32, torch.float64]),
    SEEDS,
)
def test_tolerance_mode_basis_stays_orthonormal_past_the_numerical_rank(m, n, true_rank, tol, dtype, seed):
    # The rank lies inside the second block (16 + 16 columns), so that block's QR must invent
    # directions from round-off; without re-orthogonalising them against the first block, U loses
    # orthogonality by 1e3 to 1e4 eps.
    A = (gaussian((m, true_rank), seed) @ gaussian((true_rank, n), seed + 1)).to(dtype)
    U = rsvd(A, tol=tol, generator=generator(seed)).U
    assert_orthonormal_columns(U.double(), 50 * torch.finfo(dtype).eps)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-2), (torch.float32, 1e-3), (torch.float64, 1e-9)]
)
def test_tolerance_mode_stops_early_on_decaying_spectrum(dtype, tol):
    # 1e-3 in fp32 and 1e-9 in fp64 are below the subtraction threshold: explicit residuals.
    A = decaying(120, 100, seed=3, decay=0.6).to(dtype)
    result = rsvd(A, tol=tol, generator=generator(0))
    spectrum = torch.linalg.svdvals(A.double())
    tails = spectrum.square().flip(0).cumsum(0).flip(0).sqrt() / spectrum.square().sum().sqrt()
    smallest_rank = int((tails > tol).sum())  # tails[k] is the optimal error of rank k
    assert relative_error(result.to_matrix(), A) <= tol * 1.001
    # The returned rank is within a couple of the Eckart--Young minimum and far below full.
    assert smallest_rank <= result.S.shape[-1] <= smallest_rank + 2


def test_tolerance_mode_reaches_full_rank_when_tol_is_unattainable_by_truncation():
    A = gaussian((30, 20), seed=5)
    result = rsvd(A, tol=1e-13, generator=generator(0))
    assert result.S.shape == (20,)
    assert relative_error(result.to_matrix(), A) <= tolerance(torch.float64)


@pytest.mark.parametrize("tol", [None, 0.3])
def test_zero_matrix(tol):
    rank = None if tol else 2
    U, S, Vh = rsvd(torch.zeros(7, 5, dtype=torch.float64), rank, tol=tol, generator=generator(0))
    assert bool((S == 0).all())
    assert_orthonormal_columns(U, 1e-12)


@given(st.lists(st.integers(1, 3), min_size=1, max_size=2), st.integers(6, 20), st.integers(6, 20), SEEDS)
def test_batched_equals_per_matrix(batch, m, n, seed):
    # A wide spectral gap after the target rank makes the rank-k result unique up to round-off, so a
    # batched call and a per-matrix loop must agree although their sketches differ.
    rank = min(m, n) // 2
    spectrum = torch.cat((torch.linspace(2, 1, rank), 1e-9 * torch.ones(min(m, n) - rank))).double()
    A = torch.stack([with_spectrum(m, n, spectrum, seed + i) for i in range(int(np.prod(batch)))])
    A = A.reshape(*batch, m, n)
    batched = rsvd(A, rank, generator=generator(seed)).to_matrix()
    flat = A.reshape(-1, m, n)
    looped = torch.stack([rsvd(item, rank, generator=generator(seed)).to_matrix() for item in flat])
    torch.testing.assert_close(batched, looped.reshape(batched.shape), atol=1e-7, rtol=0)


def test_generator_reproducibility_and_isolation():
    A = gaussian((40, 30), seed=0)
    global_state = torch.random.get_rng_state()
    first = rsvd(A, 5, generator=generator(7))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    second = rsvd(A, 5, generator=generator(7))
    other = rsvd(A, 5, generator=generator(8))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first.U, other.U)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (2, 16, 24)])
def test_half_precision_round_trip(dtype, shape):
    A = decaying(*shape[-2:], seed=1).expand(*shape).to(dtype)
    result = rsvd(A, 4, generator=generator(0))
    assert all(t.dtype == dtype for t in result)
    reference = rsvd(A.float(), 4, generator=generator(0))
    assert relative_error(result.to_matrix(), reference.to_matrix()) <= tolerance(dtype)
    assert tuple(rsvd(A, tol=0.1, generator=generator(0)).U.shape[:-1]) == shape[:-1]


@given(matrices(max_side=16, dtypes=(torch.float32,)), SEEDS)
def test_float32_full_rank_reconstructs(A, seed):
    result = rsvd(A, min(A.shape), generator=generator(seed))
    assert result.U.dtype == torch.float32
    assert relative_error(result.to_matrix(), A) <= 10 * tolerance(torch.float32)


def test_check_finite_false_skips_the_check():
    A = gaussian((6, 5), seed=0)
    A[0, 0] = float("nan")
    try:
        rsvd(A, 2, generator=generator(0), check_finite=False)
    except ValueError as error:
        assert "NaN or Inf" not in str(error)
    except RuntimeError:
        pass  # LAPACK may refuse NaN; the point is that our validation did not run


A = gaussian((6, 5), seed=0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: rsvd(A.tolist(), 2), TypeError, "A must be a torch.Tensor"),
        (lambda: rsvd(A.long(), 2), TypeError, "A must have a real floating dtype"),
        (lambda: rsvd(A.to(torch.complex64), 2), TypeError, "real floating dtype"),
        (lambda: rsvd(A[0], 2), ValueError, r"A must have ndim >= 2"),
        (lambda: rsvd(A[:0], 2), ValueError, "A must not be empty"),
        (lambda: rsvd(A.clone().fill_(float("inf")), 2), ValueError, "A contains NaN or Inf"),
        (lambda: rsvd(A), ValueError, "exactly one of rank and tol"),
        (lambda: rsvd(A, 2, tol=0.1), ValueError, "exactly one of rank and tol"),
        (lambda: rsvd(A, 0), ValueError, r"rank must be in \[1, 5\], got 0"),
        (lambda: rsvd(A, 6), ValueError, r"rank must be in \[1, 5\], got 6"),
        (lambda: rsvd(A, 2.0), TypeError, "rank must be an int"),
        (lambda: rsvd(A, tol=0.0), ValueError, r"tol must be a float in \(0, 1\), got 0.0"),
        (lambda: rsvd(A, tol=1.0), ValueError, r"tol must be a float in \(0, 1\), got 1.0"),
        (lambda: rsvd(A, tol="0.1"), TypeError, "tol must be a float"),
        (lambda: rsvd(A, tol=True), TypeError, "tol must be a float"),
        (lambda: rsvd(A, 2, oversample=-1), ValueError, "oversample must be >= 0"),
        (lambda: rsvd(A, 2, power_iters=-1), ValueError, "power_iters must be >= 0"),
        (lambda: rsvd(A, 2, power_iters=1.5), TypeError, "power_iters must be an int"),
        (lambda: rsvd(A, 2, generator=0), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
