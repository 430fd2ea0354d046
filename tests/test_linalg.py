"""Properties of decomp's private linear-algebra helpers that the optimizers build on: the fixed-sign
QR (:mod:`decomp._qr`), Frequent Directions and basis extension (:mod:`decomp._sketch`), and DCT
columns (:func:`decomp._dct.dct_columns`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from decomp import dct_matrix
from decomp._dct import dct_columns
from decomp._qr import signed_qr
from decomp._sketch import extend_basis, frequent_directions
from tests.strategies import FLOAT_DTYPES, SEEDS, gaussian, orthonormal


def atol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-12


# ----------------------------------------------------------------------------------------------
# signed_qr


@st.composite
def matrices(draw, max_side: int = 10):
    """``(A, dtype)``: a Gaussian ``(batch..., m, n)`` matrix, tall or wide, in fp32 or fp64."""
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    return gaussian((*batch, rows, cols), draw(SEEDS), dtype), dtype


@given(matrices())
def test_signed_qr_factors_with_orthonormal_q_and_non_negative_diagonal(case):
    A, dtype = case
    q, r = signed_qr(A)
    k = min(A.shape[-2:])
    assert q.shape == (*A.shape[:-1], k) and r.shape == (*A.shape[:-2], k, A.shape[-1])
    assert q.dtype == r.dtype == dtype
    assert bool((r.diagonal(dim1=-2, dim2=-1) >= 0).all())
    assert torch.equal(r, r.triu())
    torch.testing.assert_close(q @ r, A, atol=10 * atol(dtype), rtol=0)
    eye = torch.eye(k, dtype=dtype).expand(*A.shape[:-2], k, k)
    torch.testing.assert_close(q.mT @ q, eye, atol=10 * atol(dtype), rtol=0)


@given(matrices())
def test_signed_qr_only_flips_columns_of_the_householder_factor(case):
    """Bit for bit: the optimizers' bases did not change when the three copies became one."""
    A, _ = case
    q, r = signed_qr(A)
    householder_q, householder_r = torch.linalg.qr(A)
    assert torch.equal(q.abs(), householder_q.abs()) and torch.equal(r.abs(), householder_r.abs())


@given(rows=st.integers(1, 10), seed=SEEDS, data=st.data())
def test_signed_qr_is_the_unique_positive_qr(rows, seed, data):
    """For full column rank :math:`A = QR` with :math:`R_{ii} > 0` is unique; the Cholesky route
    :math:`R = \\operatorname{chol}(A^\\top A)^\\top`, :math:`Q = A R^{-1}` gives it independently,
    so a column sign that depended on the implementation would show."""
    cols = data.draw(st.integers(1, rows))
    A = gaussian((rows, cols), seed) + 3 * torch.eye(rows, cols, dtype=torch.float64)
    cholesky_r = torch.linalg.cholesky(A.mT @ A).mT
    cholesky_q = torch.linalg.solve_triangular(cholesky_r, A, upper=True, left=False)
    q, r = signed_qr(A)
    torch.testing.assert_close(q, cholesky_q, atol=1e-9, rtol=0)
    torch.testing.assert_close(r, cholesky_r, atol=1e-9, rtol=0)


@given(matrices(), st.data())
def test_signed_qr_follows_column_sign_flips(case, data):
    r""":math:`A S = (Q S)(S R S)` for a diagonal sign matrix :math:`S`, and :math:`S R S` keeps
    :math:`R`'s diagonal, so the fixed-sign factor of :math:`A S` is :math:`Q S`."""
    A, dtype = case
    k = min(A.shape[-2:])
    flips = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=k, max_size=k)))
    q, _ = signed_qr(A)
    flipped_q, _ = signed_qr(A[..., :k] * flips.to(dtype))
    # Only the first k columns of A enter Q, so Q of A[..., :k] is Q of A.
    torch.testing.assert_close(flipped_q, q * flips.to(dtype), atol=10 * atol(dtype), rtol=0)


def test_signed_qr_rejects_what_is_not_a_matrix():
    with pytest.raises(TypeError, match="takes a tensor"):
        signed_qr([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        signed_qr(torch.ones(3))


# ----------------------------------------------------------------------------------------------
# Frequent Directions


@st.composite
def streams(draw):
    """``(A, size, batch)``: rows with a decaying spectrum, fed ``batch`` rows at a time."""
    dim = draw(st.integers(1, 10))
    count = draw(st.integers(1, 30))
    size = draw(st.integers(1, 8))
    decay = draw(st.sampled_from([0.3, 0.7, 1.0]))
    A = gaussian((count, dim), draw(SEEDS)) * decay ** torch.arange(dim, dtype=torch.float64)
    return A, size, draw(st.integers(1, 5))


def sketch_of(A: torch.Tensor, size: int, batch: int) -> torch.Tensor:
    sketch = torch.zeros(size, A.shape[1], dtype=A.dtype)
    for start in range(0, A.shape[0], batch):
        sketch = frequent_directions(sketch, A[start : start + batch])
        assert sketch.shape == (size, A.shape[1])
    return sketch


@given(streams())
def test_frequent_directions_covariance_error_bound(stream):
    r"""Liberty 2013 / Ghashami et al. 2016 for the shrink-per-batch variant: :math:`0 \preceq
    A^\top A - S^\top S` and, for every :math:`k < \ell`, :math:`\lVert A^\top A - S^\top S
    \rVert_2 \le \lVert A - A_k \rVert_F^2 / (\ell - k)` (:math:`k = 0`: :math:`\lVert A
    \rVert_F^2 / \ell`)."""
    A, size, batch = stream
    sketch = sketch_of(A, size, batch)
    error = A.T @ A - sketch.T @ sketch
    eigenvalues = torch.linalg.eigvalsh(error)
    scale = float(A.square().sum())
    assert float(eigenvalues[0]) >= -1e-10 * scale
    tail = torch.linalg.svdvals(A).square().flip(0).cumsum(0).flip(0)  # ||A - A_k||_F^2 at k
    for k in range(min(size, tail.shape[0])):
        assert float(eigenvalues[-1]) <= float(tail[k]) / (size - k) + 1e-10 * scale


@given(dim=st.integers(1, 8), seed=SEEDS, data=st.data())
def test_frequent_directions_is_exact_while_the_stream_fits(dim, seed, data):
    size = data.draw(st.integers(1, 8))
    A = gaussian((data.draw(st.integers(1, size)), dim), seed)
    sketch = frequent_directions(torch.zeros(size, dim, dtype=A.dtype), A)
    torch.testing.assert_close(sketch.T @ sketch, A.T @ A, atol=1e-10, rtol=0)


@given(streams(), st.sampled_from([-100, 100]))
def test_frequent_directions_commutes_with_power_of_two_scales(stream, exponent):
    """Rows near fp32's limits (2**100 squares to inf) give the scaled sketch.

    Not asserted bit for bit: inside the full suite the two runs differed in their last bits
    (the LAPACK path is not fixed there), and rows' signs are free. Without the rescaling the
    sketch of the scaled rows is inf or NaN, far outside this tolerance.
    """
    A, size, batch = stream
    A = A.float()
    scale = 2.0**exponent
    # Compared as Gram matrices (in float64, where scale**2 is finite): rows' signs are free.
    sketch, scaled = sketch_of(A, size, batch).double(), sketch_of(A * scale, size, batch).double()
    assert torch.isfinite(scaled).all()
    gram = sketch.T @ sketch
    torch.testing.assert_close(scaled.T @ scaled / scale**2, gram, rtol=1e-5, atol=1e-6 * float(gram.abs().max()))


# ----------------------------------------------------------------------------------------------
# extend_basis


@given(dim=st.integers(2, 12), seed=SEEDS, data=st.data())
def test_extend_basis_keeps_the_old_basis_and_stays_orthonormal_within_energy_and_room(
    dim, seed, data
):
    existing = data.draw(st.integers(0, dim - 1))
    basis = (
        orthonormal(dim, existing, seed) if existing else torch.zeros(dim, 0, dtype=torch.float64)
    )
    max_columns = data.draw(st.integers(existing, dim))
    energy = data.draw(st.floats(0.05, 1.0))
    sketch = gaussian((data.draw(st.integers(1, 8)), dim), seed + 1) * 0.5 ** torch.arange(
        dim, dtype=torch.float64
    )
    extended = extend_basis(basis, sketch, energy, max_columns)
    count = extended.shape[1]
    assert existing <= count <= max_columns
    assert torch.equal(extended[:, :existing], basis)
    torch.testing.assert_close(
        extended.mT @ extended, torch.eye(count, dtype=torch.float64), atol=1e-10, rtol=0
    )
    power = torch.linalg.svdvals(sketch).square()
    needed = int((power.cumsum(0) / power.sum() < energy - 1e-12).sum()) + 1
    if existing == 0:
        # The fewest leading directions holding ``energy`` of the sketch, unless out of room.
        assert count == min(needed, max_columns)
        if count == needed:
            captured = float((sketch @ extended).square().sum() / sketch.square().sum())
            assert captured >= energy - 1e-9
    elif needed <= max_columns - existing:
        # Room for them: everything of the leading directions outside the old basis was added.
        leading = torch.linalg.svd(sketch, full_matrices=False).Vh[:needed]
        leftover = leading.mT - extended @ (extended.mT @ leading.mT)
        assert float(leftover.abs().max()) <= 1e-9


def test_extend_basis_adds_nothing_already_in_the_basis_from_an_empty_sketch_or_without_room():
    basis = orthonormal(6, 2, 0)
    inside = gaussian((3, 2), 1) @ basis.mT  # rows in span(basis)
    assert torch.equal(extend_basis(basis, inside, 0.99, 6), basis)
    assert torch.equal(extend_basis(basis, torch.zeros(4, 6, dtype=torch.float64), 0.99, 6), basis)
    assert torch.equal(extend_basis(basis, gaussian((3, 6), 2), 0.99, 2), basis)


# ----------------------------------------------------------------------------------------------
# dct_columns


@given(n=st.integers(1, 64), seed=SEEDS, data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_dct_columns_are_rows_of_the_dct_matrix(n, seed, data, dtype):
    count = data.draw(st.integers(1, n))
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    columns = dct_columns(n, index, dtype=dtype)
    assert columns.shape == (n, count) and columns.dtype == dtype
    expected = dct_matrix(n, dtype=torch.float64)[index].T
    torch.testing.assert_close(columns.double(), expected, atol=atol(dtype), rtol=0)
    torch.testing.assert_close(
        columns.mT @ columns, torch.eye(count, dtype=dtype), atol=10 * atol(dtype), rtol=0
    )


def test_dct_columns_keep_fp32_accuracy_for_long_bases():
    """The angle is reduced in integers, so fp32 columns of a 20000-point basis stay accurate."""
    n = 20000
    index = torch.tensor([0, 1, 7, 9999, 19998, 19999])
    positions = torch.arange(n, dtype=torch.float64)[:, None]
    expected = torch.cos(torch.pi * index.double() * (2 * positions + 1) / (2 * n)) * (2 / n) ** 0.5
    expected[:, 0] /= 2**0.5
    columns = dct_columns(n, index, dtype=torch.float32)
    assert float((columns.double() - expected).abs().max()) <= 1e-6 * (2 / n) ** 0.5
