"""Tests for :func:`decomp.tucker`: properties, tensorly oracle, bad input.

Factors are compared through reconstructions and errors, never entry by entry (sign and basis
ambiguity).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from tensorly.decomposition import partial_tucker as tl_partial_tucker
from tensorly.decomposition import tucker as tl_tucker

from decomp import Tucker, tucker
from tests.strategies import SEEDS, gaussian, orthonormal, relative_error, tolerance

METHODS = ("hooi", "hosvd")


def explicit_svd(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """A user-supplied subspace solver, as the ``svd`` callable contract describes."""
    return torch.linalg.svd(matrix, full_matrices=False).U[:, :k]


SOLVERS = ("auto", "full", "gram", explicit_svd)


@st.composite
def tensors_and_ranks(draw, min_ndim: int = 2, max_ndim: int = 4, max_side: int = 6):
    """A Gaussian fp64 tensor and one rank in [1, size] per mode."""
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=min_ndim, max_size=max_ndim)))
    ranks = tuple(draw(st.integers(1, side)) for side in shape)
    return gaussian(shape, draw(SEEDS)), ranks


def admissible(shape: tuple[int, ...], ranks_by_mode: dict[int, int]) -> bool:
    """Every rank is at most the product of the other modes' ranks (full size if not decomposed).

    Otherwise HOOI completes a factor with arbitrary directions (tensorly's are random), and the
    two libraries may legitimately settle in different local optima.
    """
    full = [ranks_by_mode.get(mode, side) for mode, side in enumerate(shape)]
    return all(rank <= math.prod(full[:mode] + full[mode + 1 :]) for mode, rank in enumerate(full))


def error(T: torch.Tensor, result: Tucker) -> float:
    return relative_error(result.to_tensor(), T)


def with_multilinear_rank(shape: tuple[int, ...], ranks: tuple[int, ...], seed: int) -> torch.Tensor:
    """G x_0 U_0 x_1 U_1 ... with a Gaussian core of shape ``ranks`` and orthonormal U_i (fp64)."""
    T = gaussian(ranks, seed)
    for mode, (side, rank) in enumerate(zip(shape, ranks)):
        factor = orthonormal(side, rank, seed + mode + 1)
        T = torch.movedim(torch.tensordot(T, factor, dims=([mode], [1])), -1, mode)
    return T


def unfolding_energy(T: torch.Tensor, mode: int) -> np.ndarray:
    """Cumulative squared singular values of the mode unfolding (numpy oracle)."""
    unfolding = np.moveaxis(T.numpy(), mode, 0).reshape(T.shape[mode], -1)
    return np.cumsum(np.linalg.svd(unfolding, compute_uv=False) ** 2)


# ---------------------------------------------------------------------------------------------
# properties


@given(tensors_and_ranks(), st.sampled_from(METHODS))
def test_full_rank_is_exact_with_identity_factors(case, method):
    T, _ = case
    result = tucker(T, tuple(T.shape), method=method)
    assert relative_error(result.to_tensor(), T) < tolerance(torch.float64)
    for factor, side in zip(result.factors, T.shape):
        assert torch.equal(factor, torch.eye(side, dtype=T.dtype))


@given(st.lists(st.integers(1, 5), min_size=2, max_size=4), st.data(), SEEDS,
       st.sampled_from(METHODS), st.sampled_from(SOLVERS))
def test_exact_at_multilinear_rank(shape, data, seed, method, svd):
    # the core's own multilinear rank may be lower than `ranks`; asking for more is still exact
    ranks = tuple(data.draw(st.integers(1, side)) for side in shape)
    T = with_multilinear_rank(tuple(shape), ranks, seed)
    result = tucker(T, ranks, method=method, svd=svd)
    # gram squares the condition number: in fp64 its subspace is good to ~sqrt(eps)
    assert error(T, result) < (1e-6 if svd == "gram" else 1e-9)


@given(tensors_and_ranks(), st.sampled_from(METHODS), st.sampled_from(SOLVERS))
def test_factors_are_orthonormal_with_documented_shapes(case, method, svd):
    T, ranks = case
    result = tucker(T, ranks, method=method, svd=svd)
    assert result.core.shape == ranks
    assert result.modes == tuple(range(T.ndim))
    for factor, side, rank in zip(result.factors, T.shape, ranks):
        assert factor.shape == (side, rank)
        torch.testing.assert_close(factor.T @ factor, torch.eye(rank, dtype=T.dtype), atol=1e-10, rtol=0)
    assert result.to_tensor().shape == T.shape


@given(tensors_and_ranks(), st.data())
def test_hosvd_error_non_increasing_in_rank_and_hooi_no_worse(case, data):
    T, ranks = case
    larger = tuple(data.draw(st.integers(rank, side)) for rank, side in zip(ranks, T.shape))
    hosvd_error = error(T, tucker(T, ranks, method="hosvd"))
    hosvd_error_larger = error(T, tucker(T, larger, method="hosvd"))
    hooi_error = error(T, tucker(T, ranks, method="hooi"))
    hooi_error_larger = error(T, tucker(T, larger, method="hooi"))
    slack = 1e-10
    # nested projectors: the top-r subspaces grow with r, so HOSVD's captured energy does too
    assert hosvd_error_larger <= hosvd_error + slack
    # HOOI starts from HOSVD and each update can only raise the core norm
    assert hooi_error <= hosvd_error + slack
    assert hooi_error_larger <= hosvd_error_larger + slack


@given(tensors_and_ranks(min_ndim=3, max_ndim=3), st.integers(1, 4))
def test_hooi_error_non_increasing_in_sweeps(case, sweeps):
    T, ranks = case
    fewer = error(T, tucker(T, ranks, n_iter=sweeps, tol=0.0))
    more = error(T, tucker(T, ranks, n_iter=sweeps + 1, tol=0.0))
    assert more <= fewer + 1e-10


@given(tensors_and_ranks(min_ndim=3, max_ndim=4), st.data(), st.sampled_from(METHODS))
def test_partial_tucker_shapes_and_negative_modes(case, data, method):
    T, ranks = case
    ndim = T.ndim
    chosen = data.draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    modes = [mode - ndim if data.draw(st.booleans()) else mode for mode in chosen]
    mode_ranks = [ranks[mode] for mode in chosen]
    result = tucker(T, mode_ranks, modes=modes, method=method)

    assert result.modes == tuple(chosen)
    expected_core = list(T.shape)
    for mode, rank in zip(chosen, mode_ranks):
        expected_core[mode] = rank
    assert result.core.shape == tuple(expected_core)
    assert [f.shape for f in result.factors] == [(T.shape[m], r) for m, r in zip(chosen, mode_ranks)]
    assert result.to_tensor().shape == T.shape
    # negative and non-negative spellings of the same modes are the same decomposition
    assert torch.equal(result.core, tucker(T, mode_ranks, modes=chosen, method=method).core)
    # leaving modes uncompressed can only help: partial HOOI <= partial HOSVD <= full HOSVD, whose
    # projectors on the chosen modes are the partial ones (same unfoldings of T)
    assert error(T, result) <= error(T, tucker(T, ranks, method="hosvd")) + 1e-10


@given(tensors_and_ranks(min_ndim=2, max_ndim=3), st.floats(0.05, 1.0), st.sampled_from(METHODS))
def test_fraction_keeps_the_smallest_rank_reaching_that_energy_per_mode(case, fraction, method):
    T, _ = case
    result = tucker(T, fraction, method=method)
    for mode in range(T.ndim):
        cumulative = unfolding_energy(T, mode)
        target = fraction * cumulative[-1]
        rank = result.core.shape[mode]
        # the definition, with a rounding margin for the boundary
        assert cumulative[rank - 1] >= target * (1 - 1e-9)
        assert rank == 1 or cumulative[rank - 2] < target * (1 + 1e-9)


@given(tensors_and_ranks(min_ndim=3, max_ndim=3), st.floats(0.1, 1.0))
def test_fraction_and_int_can_be_mixed_per_mode(case, fraction):
    T, ranks = case
    result = tucker(T, [ranks[0], fraction, ranks[2]])
    fraction_rank = tucker(T, [fraction], modes=[1], method="hosvd").core.shape[1]
    assert result.core.shape == (ranks[0], fraction_rank, ranks[2])


def test_fraction_one_is_exact_even_when_an_unfolding_has_low_rank():
    # mode 0 unfolds to 12 x 4, so rank 4 < 12 already keeps all the energy
    T = gaussian((12, 2, 2), seed=3)
    result = tucker(T, 1.0)
    assert result.core.shape == (4, 2, 2)
    assert relative_error(result.to_tensor(), T) < 1e-12


@given(tensors_and_ranks(min_ndim=2, max_ndim=4), st.sampled_from([torch.float16, torch.bfloat16]),
       st.sampled_from(METHODS))
def test_half_precision_round_trip(case, dtype, method):
    T64, ranks = case
    T = T64.to(dtype)
    result = tucker(T, ranks, method=method)
    assert result.core.dtype == dtype and all(f.dtype == dtype for f in result.factors)
    reference = tucker(T.float(), ranks, method=method)
    assert relative_error(result.to_tensor(), reference.to_tensor()) < tolerance(dtype)
    assert result.to_tensor().dtype == dtype
    exact = tucker(T, tuple(T.shape), method=method)
    assert relative_error(exact.to_tensor(), T) < tolerance(dtype)


@given(tensors_and_ranks(min_ndim=3, max_ndim=3), st.sampled_from(SOLVERS[1:]))
def test_every_solver_finds_the_same_decomposition(case, svd):
    T, ranks = case
    reference = error(T, tucker(T, ranks, method="hosvd", svd="full"))
    ours = error(T, tucker(T, ranks, method="hosvd", svd=svd))
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-7)


def test_gram_in_fp32_is_as_accurate_as_a_full_svd():
    # s_i / s_1 reaches 1e-5: a Gram matrix formed in fp32 would lose everything below ~3e-4
    spectrum = torch.logspace(0, -5, 40, dtype=torch.float64)
    T = (orthonormal(40, 40, 0) * spectrum @ orthonormal(200, 40, 1).T).reshape(40, 20, 10).float()
    ranks = (30, 20, 10)
    full = error(T, tucker(T, ranks, svd="full", method="hosvd"))
    gram = error(T, tucker(T, ranks, svd="gram", method="hosvd"))
    assert gram <= 1.01 * full


def test_gram_uses_a_float32_eigh_only_where_it_cannot_matter(monkeypatch):
    dtypes = []
    eigh = torch.linalg.eigh

    def recording_eigh(matrix, *args, **kwargs):
        dtypes.append(matrix.dtype)
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", recording_eigh)
    tucker(gaussian((20, 20, 3), seed=0).float(), (5, 5, 3), svd="gram")
    assert dtypes and set(dtypes) == {torch.float32}  # a large error: the fast path is safe
    dtypes.clear()
    near_exact = with_multilinear_rank((20, 20, 3), (5, 5, 3), seed=0) + 1e-6 * gaussian((20, 20, 3), seed=1)
    tucker(near_exact.float(), (5, 5, 3), svd="gram")
    assert torch.float64 in dtypes


def test_randomized_solver_on_a_decaying_spectrum():
    T = with_multilinear_rank((30, 30, 20), (8, 8, 8), seed=5)
    T = T + 1e-6 * gaussian(T.shape, seed=6)
    result = tucker(T, (8, 8, 8), svd="randomized", generator=torch.Generator().manual_seed(0))
    assert error(T, result) < 1e-4
    again = tucker(T, (8, 8, 8), svd="randomized", generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.core, again.core)


def test_solver_is_used_in_every_hooi_sweep():
    calls = []

    def counting_svd(matrix: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(matrix.shape)
        return explicit_svd(matrix, k)

    T = gaussian((6, 7, 8), seed=0)
    tucker(T, (2, 3, 4), svd=counting_svd, n_iter=3, tol=0.0)
    # HOSVD start for modes 1 and 2 (mode 0's is never used), then 3 sweeps over 3 modes
    assert len(calls) == 2 + 3 * 3
    assert calls[-1] == (8, 2 * 3)


def test_conv_kernel_spatial_modes_are_left_alone():
    W = gaussian((16, 8, 3, 3), seed=1)
    result = tucker(W, (4, 2, 3, 3))
    assert torch.equal(result.factors[2], torch.eye(3, dtype=W.dtype))
    assert torch.equal(result.factors[3], torch.eye(3, dtype=W.dtype))
    tucker2 = tucker(W, (4, 2), modes=(0, 1))
    assert error(W, result) == pytest.approx(error(W, tucker2), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# oracle: tensorly

# tensorly warns whenever a rank exceeds an unfolding's smaller side, which these shapes allow
tensorly_rank_warning = pytest.mark.filterwarnings("ignore:Trying to compute SVD with n_eigenvecs")


@tensorly_rank_warning
@given(tensors_and_ranks(min_ndim=2, max_ndim=4, max_side=7), st.sampled_from((torch.float32, torch.float64)))
def test_error_matches_tensorly_tucker(case, dtype):
    T64, ranks = case
    assume(admissible(T64.shape, dict(enumerate(ranks))))
    T = T64.to(dtype)
    ours = tucker(T, ranks)
    with tl.backend_context("pytorch"):
        core, factors = tl_tucker(T, rank=list(ranks))
        theirs = relative_error(tl.tucker_to_tensor((core, factors)), T)
        # tensorly's reconstruction from our parts is our reconstruction
        torch.testing.assert_close(
            tl.tucker_to_tensor((ours.core, list(ours.factors))), ours.to_tensor(), rtol=1e-5, atol=1e-6
        )
    assert error(T, ours) <= 1.01 * theirs + 10 * tolerance(dtype)


@tensorly_rank_warning
@given(tensors_and_ranks(min_ndim=3, max_ndim=4, max_side=7), st.data())
def test_error_matches_tensorly_partial_tucker(case, data):
    T, ranks = case
    modes = data.draw(st.lists(st.integers(0, T.ndim - 1), min_size=1, max_size=T.ndim, unique=True))
    assume(admissible(T.shape, {mode: ranks[mode] for mode in modes}))
    ours = tucker(T, [ranks[mode] for mode in modes], modes=modes)
    # tensorly's partial_tucker needs sorted modes: multi_mode_dot applies `skip` after sorting
    order = sorted(range(len(modes)), key=lambda index: modes[index])
    sorted_modes = [modes[index] for index in order]
    with tl.backend_context("pytorch"):
        sorted_ranks = [ranks[mode] for mode in sorted_modes]
        (core, factors), _ = tl_partial_tucker(T, rank=sorted_ranks, modes=sorted_modes)
        theirs = relative_error(tl.tenalg.multi_mode_dot(core, factors, modes=sorted_modes), T)
        ours_by_tensorly = tl.tenalg.multi_mode_dot(
            ours.core, [ours.factors[index] for index in order], modes=sorted_modes
        )
    torch.testing.assert_close(ours_by_tensorly, ours.to_tensor(), rtol=1e-12, atol=1e-12)
    assert error(T, ours) <= 1.01 * theirs + 1e-9


# ---------------------------------------------------------------------------------------------
# bad input

T3 = gaussian((4, 5, 3), seed=0)


@pytest.mark.parametrize(
    ("kwargs", "exception", "message"),
    [
        ({"ranks": 5}, ValueError, r"ranks for mode 0 \(size 4\) must be in \[1, 4\], got 5"),
        ({"ranks": (4, 6, 3)}, ValueError, r"ranks for mode 1 \(size 5\) must be in \[1, 5\], got 6"),
        ({"ranks": (2, 2, 0)}, ValueError, r"ranks for mode 2 .* must be in \[1, 3\], got 0"),
        ({"ranks": (2, 2)}, ValueError, r"ranks must have one entry per decomposed mode \(3"),
        ({"ranks": (2,), "modes": (0, 1)}, ValueError, r"one entry per decomposed mode \(2"),
        ({"ranks": 0.0}, ValueError, r"ranks for mode 0 .* must be a float in \(0, 1\], got 0.0"),
        ({"ranks": 1.5}, ValueError, r"must be a float in \(0, 1\], got 1.5"),
        ({"ranks": (2, -0.5, 2)}, ValueError, r"ranks for mode 1 .* must be a float in \(0, 1\], got -0.5"),
        ({"ranks": "2"}, TypeError, r"ranks must be an int, a float or a sequence"),
        ({"ranks": (2, True, 2)}, TypeError, r"ranks for mode 1 .* must be an int or a float"),
        ({"ranks": 2, "modes": (0, 0)}, ValueError, r"modes must be distinct"),
        ({"ranks": 2, "modes": (0, -3)}, ValueError, r"modes must be distinct"),
        ({"ranks": 2, "modes": (0, 3)}, ValueError, r"modes\[1\] must be in \[-3, 2\], got 3"),
        ({"ranks": 2, "modes": (-4,)}, ValueError, r"modes\[0\] must be in \[-3, 2\], got -4"),
        ({"ranks": 2, "modes": ()}, ValueError, r"modes must name at least one mode"),
        ({"ranks": 2, "modes": 0}, TypeError, r"modes must be a sequence of ints"),
        ({"ranks": 2, "modes": (0.0,)}, TypeError, r"modes\[0\] must be an int"),
        ({"ranks": 2, "method": "als"}, ValueError, r"method must be one of \['hooi', 'hosvd'\]"),
        ({"ranks": 2, "svd": "qr"}, ValueError, r"svd must be one of \['auto', 'full', 'gram', 'randomized'\]"),
        ({"ranks": 2, "n_iter": 0}, ValueError, r"n_iter must be >= 1, got 0"),
        ({"ranks": 2, "tol": -1e-3}, ValueError, r"tol must be a float >= 0"),
        ({"ranks": 2, "tol": "small"}, TypeError, r"tol must be a float"),
        ({"ranks": 2, "generator": 0}, TypeError, r"generator must be a torch.Generator"),
    ],
)
def test_bad_arguments(kwargs, exception, message):
    with pytest.raises(exception, match=message):
        tucker(T3, **kwargs)


@pytest.mark.parametrize(
    ("T", "exception", "message"),
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "T contains NaN or Inf"),
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "T must have a real floating dtype"),
        (torch.ones(3, 3, dtype=torch.complex64), TypeError, "T must have a real floating dtype"),
        (torch.ones(0, 3), ValueError, "T must not be empty"),
        (torch.ones(3), ValueError, r"T must have ndim >= 2"),
        ([[1.0, 2.0], [3.0, 4.0]], TypeError, "T must be a torch.Tensor"),
    ],
)
def test_bad_tensor(T, exception, message):
    with pytest.raises(exception, match=message):
        tucker(T, 1)


def test_check_finite_false_skips_the_nan_check():
    T = T3.clone()
    T[0, 0, 0] = float("nan")
    result = tucker(T, T.shape, check_finite=False)  # full rank: no factorisation runs
    assert torch.isnan(result.core).any()


@pytest.mark.parametrize(
    ("solver", "exception", "message"),
    [
        (lambda matrix, k: matrix[:, :k].tolist(), TypeError, "must return a torch.Tensor"),
        (lambda matrix, k: matrix[:, : k + 1], ValueError, r"must return shape \(rows, k\) = \(5, 2\)"),
    ],
)
def test_bad_svd_callable_output(solver, exception, message):
    with pytest.raises(exception, match=message):
        tucker(T3, 2, svd=solver)


@given(tensors_and_ranks(min_ndim=3, max_ndim=4, max_side=6), st.permutations(range(4)))
def test_result_does_not_depend_on_the_order_modes_are_listed(case, permutation):
    T, ranks = case
    modes = [mode for mode in permutation if mode < T.ndim]
    listed = tucker(T, [ranks[mode] for mode in modes], modes=modes)
    in_order = tucker(T, list(ranks), modes=sorted(modes))
    torch.testing.assert_close(listed.to_tensor(), in_order.to_tensor(), rtol=1e-10, atol=1e-10)
