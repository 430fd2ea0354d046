"""Properties and oracles for the projectors of :mod:`optim.projectors` and ``resolve_rank``.

A projector picks an orthonormal :math:`P \\in \\mathbb{R}^{d \\times r}` from a gradient
:math:`X \\in \\mathbb{R}^{k \\times d}`; down is :math:`X P`, up is :math:`L P^\\top`. The oracles
are numpy's SVD, the float64 ``decomp.dct_matrix`` and a brute force over column subsets.
"""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decomp import _dct, dct_matrix
from optim.projected import resolve_rank
from optim.projectors import DCTProjector, RandomProjector, SVDProjector
from tests.strategies import FLOAT_DTYPES, SEEDS, gaussian, with_spectrum

PROJECTORS = {
    "dct-l2": lambda: DCTProjector("l2"),
    "dct-l1": lambda: DCTProjector("l1"),
    "dct-matmul": lambda: DCTProjector("l2", method="matmul"),
    "svd-rsvd": lambda: SVDProjector("rsvd"),
    "svd-exact": lambda: SVDProjector("exact"),
    "random": lambda: RandomProjector(),
}


def atol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-12


@st.composite
def gradients(draw, max_side: int = 12, dtypes=FLOAT_DTYPES):
    """``(X, rank, seed)``: a k x d gradient with k >= d (the engine's orientation), 1 <= rank <= d."""
    dim = draw(st.integers(1, max_side))
    rows = draw(st.integers(dim, max_side + 4))
    rank = draw(st.integers(1, dim))
    seed = draw(SEEDS)
    return gaussian((rows, dim), seed, draw(st.sampled_from(dtypes))), rank, seed


def fresh_state(projector, X: torch.Tensor, rank: int, seed: int) -> dict[str, torch.Tensor]:
    return projector.init_state(X.shape[-1], rank, X, seed)


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in state.items()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.dtype == b[key].dtype, key
        assert torch.equal(value, b[key]), key


# ----------------------------------------------------------------------------------------------
# Every projector: an orthonormal basis, an orthogonal projection, a free down-projection


@pytest.mark.parametrize("name", PROJECTORS)
@given(problem=gradients())
def test_select_gives_an_orthonormal_basis_and_its_projection(name, problem):
    X, rank, seed = problem
    projector = PROJECTORS[name]()
    state = fresh_state(projector, X, rank, seed)
    before = clone_state(state)
    low, new_state = projector.select(X, state, rank)
    # select never writes into the state it was given (a failing check must leave it intact).
    assert_states_equal(state, before)
    assert set(new_state) == set(projector.keys)
    P = projector.basis(new_state, X.shape[-1], rank, X)
    assert P.shape == (X.shape[-1], rank) and P.dtype == X.dtype
    torch.testing.assert_close(P.mT @ P, torch.eye(rank, dtype=X.dtype), atol=atol(X.dtype), rtol=0)
    # The projection it returns for free is the down-projection on the basis it stored.
    assert low.shape == (X.shape[0], rank)
    torch.testing.assert_close(low, X @ P, atol=10 * atol(X.dtype), rtol=0)
    # down then up is an orthogonal projection: idempotent, residual orthogonal to the range.
    projected = low @ P.mT
    torch.testing.assert_close((projected @ P) @ P.mT, projected, atol=10 * atol(X.dtype), rtol=0)
    torch.testing.assert_close(
        (X - projected) @ P, torch.zeros_like(low), atol=10 * atol(X.dtype), rtol=0
    )


@pytest.mark.parametrize("name", PROJECTORS)
@given(problem=gradients(dtypes=(torch.float64,)), data=st.data())
def test_full_rank_down_then_up_is_the_identity_and_linear(name, problem, data):
    """At rank d every projector's P is square orthogonal: up(down(M)) = M, and both maps are
    linear, which is what makes full-rank projected SGD-momentum equal the unprojected one."""
    X, _, seed = problem
    dim = X.shape[-1]
    projector = PROJECTORS[name]()
    _, new_state = projector.select(X, fresh_state(projector, X, dim, seed), dim)
    P = projector.basis(new_state, dim, dim, X)
    M, Y = gaussian(X.shape, seed + 1), gaussian(X.shape, seed + 2)
    a, b = data.draw(st.floats(-3, 3)), data.draw(st.floats(-3, 3))
    torch.testing.assert_close((M @ P) @ P.mT, M, atol=1e-12, rtol=0)
    torch.testing.assert_close((a * M + b * Y) @ P, a * (M @ P) + b * (Y @ P), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", PROJECTORS)
@settings(max_examples=20)
@given(
    shape=st.tuples(st.integers(1, 8), st.integers(1, 8)).map(lambda s: (max(s), min(s))),
    seed=SEEDS,
    beta=st.floats(0.0, 0.99),
    gap=st.integers(1, 3),
)
def test_full_rank_projected_momentum_equals_unprojected_momentum(name, shape, seed, beta, gap):
    """SGD-momentum in the projected coordinates, refreshed every ``gap`` steps with the moment
    carried over by R = P_old^T P_new, is plain SGD-momentum when the rank is the dimension."""
    projector = PROJECTORS[name]()
    dim = shape[1]
    state = fresh_state(projector, gaussian(shape, seed), dim, seed)
    momentum_low = torch.zeros(shape[0], dim, dtype=torch.float64)
    momentum = torch.zeros(shape, dtype=torch.float64)
    for step in range(7):
        X = gaussian(shape, seed + step + 1)
        if step % gap == 0:
            low, new_state = projector.select(X, state, dim)
            if step:
                rotation = projector.basis(state, dim, dim, X).mT @ projector.basis(
                    new_state, dim, dim, X
                )
                momentum_low = momentum_low @ rotation
            state = new_state
        else:
            low = X @ projector.basis(state, dim, dim, X)
        momentum_low = beta * momentum_low + low
        momentum = beta * momentum + X
        update = momentum_low @ projector.basis(state, dim, dim, X).mT
        torch.testing.assert_close(update, momentum, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------
# DCT: optimal subset, columns, the two score paths


@given(
    rows=st.integers(1, 6),
    dim=st.integers(1, 7),
    seed=SEEDS,
    data=st.data(),
)
def test_dct_l2_selection_is_the_optimal_subset(rows, dim, seed, data):
    """Brute force over every r-subset of the DCT columns: L2 scores pick the one closest to X."""
    rank = data.draw(st.integers(1, dim))
    # DCT coefficients with decaying scales, in a random column order.
    order = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
    decay = torch.diag(0.6 ** torch.arange(dim, dtype=torch.float64))
    X = gaussian((rows, dim), seed) @ decay @ dct_matrix(dim, dtype=torch.float64)[order]
    low, state = DCTProjector("l2").select(X, DCTProjector().init_state(dim, rank, X, 0), rank)
    index = state["index"]
    assert index.dtype == torch.int64
    assert torch.equal(index, index.unique())  # sorted and distinct
    D = dct_matrix(dim, dtype=torch.float64)

    def error(subset) -> float:
        P = D[list(subset)].T
        return float(torch.linalg.matrix_norm(X - X @ P @ P.T))

    best = min(error(subset) for subset in itertools.combinations(range(dim), rank))
    chosen = error(index.tolist())
    assert chosen <= best + 1e-12
    # The identity behind it: ||X - X P P^T||_F^2 = ||X||_F^2 - ||X P||_F^2.
    np.testing.assert_allclose(
        chosen**2, float(X.square().sum() - low.square().sum()), rtol=0, atol=1e-10
    )


def test_dct_l1_selection_differs_from_l2_where_it_should():
    """The paper's L1 scores are a heuristic: a spread-out column loses to a spiky one."""
    D = dct_matrix(4, dtype=torch.float64)
    # DCT coefficients: column 0 spread over 4 rows (L1 4, L2^2 4), column 1 one spike of 3
    # (L1 3, L2^2 9).
    coefficients = torch.zeros(4, 4, dtype=torch.float64)
    coefficients[:, 0] = 1.0
    coefficients[0, 1] = 3.0
    X = coefficients @ D
    state = DCTProjector().init_state(4, 1, X, 0)
    assert DCTProjector("l2").select(X, state, 1)[1]["index"].tolist() == [1]
    assert DCTProjector("l1").select(X, state, 1)[1]["index"].tolist() == [0]


@pytest.mark.parametrize("norm", ["l1", "l2"])
@settings(max_examples=25)
@given(rows=st.integers(1, 5), dim=st.integers(1, 40), seed=SEEDS, data=st.data())
def test_fft_and_matmul_scores_pick_the_same_columns(norm, rows, dim, seed, data):
    rank = data.draw(st.integers(1, dim))
    X = gaussian((rows, dim), seed)
    state = DCTProjector().init_state(dim, rank, X, 0)
    # Force decomp.dct onto its FFT path at every length (it uses the matrix up to 224).
    with mock.patch.object(_dct, "_MATMUL_MAX_N", 0):
        low_fft, fft_state = DCTProjector(norm, method="fft").select(X, state, rank)
    low_matmul, matmul_state = DCTProjector(norm, method="matmul").select(X, state, rank)
    assert torch.equal(fft_state["index"], matmul_state["index"])
    torch.testing.assert_close(low_fft, low_matmul, atol=1e-12, rtol=0)


def test_dct_projector_rejects_unknown_options():
    with pytest.raises(ValueError, match="norm"):
        DCTProjector("l3")
    with pytest.raises(ValueError, match="method"):
        DCTProjector("l2", method="fast")


# ----------------------------------------------------------------------------------------------
# SVD: the top-r right singular space (numpy oracle), seeded randomized path


@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12)).map(lambda s: (max(s), min(s))),
    seed=SEEDS,
    data=st.data(),
)
def test_svd_exact_basis_spans_the_top_right_singular_space(shape, seed, data):
    rows, dim = shape
    rank = data.draw(st.integers(1, dim))
    # Well-separated singular values make the top-r space unique.
    X = with_spectrum(rows, dim, 2.0 ** -torch.arange(dim, dtype=torch.float64), seed)
    projector = SVDProjector("exact")
    _, state = projector.select(X, projector.init_state(dim, rank, X, seed), rank)
    P = projector.basis(state, dim, rank, X)
    V = np.linalg.svd(X.numpy())[2][:rank].T
    np.testing.assert_allclose((P @ P.mT).numpy(), V @ V.T, rtol=0, atol=1e-10)


@given(
    shape=st.tuples(st.integers(1, 16), st.integers(1, 16)).map(lambda s: (max(s), min(s))),
    seed=SEEDS,
    data=st.data(),
)
def test_svd_rsvd_basis_is_exact_on_rank_r_gradients(shape, seed, data):
    rows, dim = shape
    rank = data.draw(st.integers(1, dim))
    X = gaussian((rows, rank), seed) @ gaussian((rank, dim), seed + 1)
    projector = SVDProjector("rsvd")
    state = projector.init_state(dim, rank, X, seed)
    _, new_state = projector.select(X, state, rank)
    P = projector.basis(new_state, dim, rank, X)
    V = np.linalg.svd(X.numpy())[2][:rank].T
    np.testing.assert_allclose((P @ P.mT).numpy(), V @ V.T, rtol=0, atol=1e-8)
    # The sketch is seeded from the state: the same state selects the same basis, bit for bit,
    # and the seed advances by one per refresh.
    _, again = projector.select(X, state, rank)
    assert torch.equal(again["basis"], new_state["basis"])
    assert int(new_state["seed"]) == seed + 1


def test_svd_projector_refuses_row_shards_and_unknown_methods():
    X = gaussian((6, 4), 0)
    projector = SVDProjector()
    with pytest.raises(ValueError, match="whole gradient"):
        projector.select(X, projector.init_state(4, 2, X, 0), 2, reduce=lambda scores: scores)
    with pytest.raises(ValueError, match="method"):
        SVDProjector("lanczos")


# ----------------------------------------------------------------------------------------------
# Random: a function of the seed alone


@given(dim=st.integers(2, 20), seed=SEEDS, data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_random_basis_is_a_function_of_the_seed(dim, seed, data, dtype):
    rank = data.draw(st.integers(1, dim - 1))
    projector = RandomProjector()
    like = torch.zeros(1, dtype=dtype)
    state = projector.init_state(dim, rank, like, seed)
    P = projector.basis(state, dim, rank, like)
    assert torch.equal(P, projector.basis(clone_state(state), dim, rank, like))
    # A refresh advances the seed by one and draws another basis, whatever the gradient.
    X, Y = gaussian((3, dim), seed, dtype), gaussian((3, dim), seed + 1, dtype)
    low, new_state = projector.select(X, state, rank)
    assert int(new_state["seed"]) == seed + 1
    assert torch.equal(projector.select(Y, state, rank)[1]["seed"], new_state["seed"])
    Q = projector.basis(new_state, dim, rank, like)
    assert not torch.allclose(P @ P.mT, Q @ Q.mT, atol=1e-3)
    torch.testing.assert_close(low, X @ Q, atol=10 * atol(dtype), rtol=0)


# ----------------------------------------------------------------------------------------------
# resolve_rank


@given(rank=st.integers(1, 10**6), dim=st.integers(1, 10**4))
def test_int_rank_is_clamped_to_the_dimension(rank, dim):
    assert resolve_rank(rank, dim) == min(rank, dim)


@given(fraction=st.floats(1e-6, 1.0), dim=st.integers(1, 10**4))
def test_float_rank_is_a_fraction_of_the_dimension(fraction, dim):
    resolved = resolve_rank(fraction, dim)
    assert 1 <= resolved <= dim
    assert resolved == max(1, int(fraction * dim))
    assert resolve_rank(1.0, dim) == dim
