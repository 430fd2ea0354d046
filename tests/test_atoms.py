"""Properties, oracles and input errors of :func:`decomp.atoms` (filter-atom decomposition)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given
from hypothesis import strategies as st

from decomp import Atoms, atoms
from tests.strategies import SEEDS, gaussian, relative_error, tolerance, with_spectrum

METHODS = ("svd", "dct")


@st.composite
def conv_weights(draw, dtypes=(torch.float64,), max_c_in: int = 5):
    """Gaussian conv weights (c_out, c_in_g, *kernel) with 1-3 small spatial dims."""
    spatial_dims = draw(st.integers(1, 3))
    max_side = {1: 6, 2: 4, 3: 3}[spatial_dims]
    sides = st.lists(st.integers(1, max_side), min_size=spatial_dims, max_size=spatial_dims)
    kernel = tuple(draw(sides))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, max_c_in)), *kernel)
    return gaussian(shape, draw(SEEDS), draw(st.sampled_from(dtypes)))


def kernel_size(W: torch.Tensor) -> int:
    return math.prod(W.shape[2:])


def error_norm(result: Atoms, W: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(result.to_weight().double() - W.double()))


def weight_norm(W: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(W.double()))


def eckart_young_error(W: torch.Tensor, rank: int) -> float:
    matrix = W.double().reshape(W.shape[0] * W.shape[1], -1).numpy()
    singular_values = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sqrt(np.sum(singular_values[rank:] ** 2)))


# ----------------------------------------------------------------------------------------------
# Exactness, optimality, monotonicity


@given(W=conv_weights(), method=st.sampled_from(METHODS), levels=st.sampled_from((1, 2)))
def test_exact_when_num_atoms_is_kernel_size(W, method, levels):
    result = atoms(W, kernel_size(W), levels=levels, method=method)
    assert relative_error(result.to_weight(), W) <= tolerance(torch.float64)


@given(
    W=conv_weights(dtypes=(torch.float32, torch.float64)),
    fraction=st.floats(0.0, 1.0),
)
def test_svd_error_is_eckart_young_optimum(W, fraction):
    num_atoms = max(1, round(fraction * kernel_size(W)))
    error = error_norm(atoms(W, num_atoms), W)
    optimum = eckart_young_error(W, num_atoms)
    assert error == pytest.approx(optimum, abs=tolerance(W.dtype) * weight_norm(W))


@pytest.mark.parametrize("num_atoms", [6, 7])
def test_svd_float32_stays_optimal_on_a_steep_spectrum(num_atoms):
    # Singular values 1 .. 1e-6: an fp32 Gram cannot separate directions below ~3e-4 and would
    # miss the optimum by 4-20x here; the float64 Gram stays within fp32 rounding of it.
    matrix = with_spectrum(64, 9, torch.logspace(0, -6, 9, dtype=torch.float64), seed=11)
    W = matrix.float().reshape(64, 1, 3, 3)
    error = error_norm(atoms(W, num_atoms), W)
    assert error <= 1.01 * eckart_young_error(W, num_atoms)


@given(W=conv_weights())
def test_svd_error_non_increasing_in_num_atoms(W):
    errors = [error_norm(atoms(W, m), W) for m in range(1, kernel_size(W) + 1)]
    slack = 1e-12 * weight_norm(W)
    assert all(later <= earlier + slack for earlier, later in itertools.pairwise(errors))


@given(W=conv_weights(), fraction=st.floats(0.0, 1.0))
def test_svd_error_at_most_dct_error(W, fraction):
    num_atoms = max(1, round(fraction * kernel_size(W)))
    svd_error = error_norm(atoms(W, num_atoms, method="svd"), W)
    dct_error = error_norm(atoms(W, num_atoms, method="dct"), W)
    assert svd_error <= dct_error + 1e-12 * weight_norm(W)


@given(
    W=conv_weights(dtypes=(torch.float32, torch.float64)),
    method=st.sampled_from(METHODS),
    fraction=st.floats(0.0, 1.0),
)
def test_level_one_atoms_are_orthonormal(W, method, fraction):
    num_atoms = max(1, round(fraction * kernel_size(W)))
    flat = atoms(W, num_atoms, method=method).atoms.flatten(1).double()
    identity = torch.eye(num_atoms, dtype=torch.float64)
    assert torch.allclose(flat @ flat.T, identity, atol=tolerance(W.dtype))


@given(W=conv_weights(), fraction=st.floats(0.0, 1.0), sub_fraction=st.floats(0.0, 1.0))
def test_sub_atoms_are_orthonormal_per_atom(W, fraction, sub_fraction):
    num_atoms = max(1, round(fraction * kernel_size(W)))
    num_sub_atoms = max(1, round(sub_fraction * kernel_size(W)))
    result = atoms(W, num_atoms, levels=2, sub_atoms=num_sub_atoms)
    flat = result.sub_atoms.flatten(2)
    identity = torch.eye(num_sub_atoms, dtype=torch.float64).expand(num_atoms, -1, -1)
    assert torch.allclose(flat @ flat.mT, identity, atol=1e-12)


@given(W=conv_weights(), method=st.sampled_from(METHODS), fraction=st.floats(0.0, 1.0))
def test_level_two_no_worse_than_level_one_at_full_sub_atoms(W, method, fraction):
    num_atoms = max(1, round(fraction * kernel_size(W)))
    level_one = error_norm(atoms(W, num_atoms, method=method), W)
    level_two_result = atoms(W, num_atoms, levels=2, sub_atoms=kernel_size(W), method=method)
    level_two = error_norm(level_two_result, W)
    assert level_two <= level_one + 1e-10 * weight_norm(W)


def test_level_two_strictly_improves_a_generic_weight():
    # Guards against a level 2 that silently reproduces level 1: per-channel atoms must help.
    W = gaussian((8, 4, 3, 3), seed=3)
    level_one = error_norm(atoms(W, 3), W)
    level_two = error_norm(atoms(W, 3, levels=2), W)
    assert level_two < 0.95 * level_one


@given(
    W=conv_weights(),
    method=st.sampled_from(METHODS),
    fraction=st.floats(0.0, 1.0),
    sub_fraction=st.floats(0.0, 1.0),
)
def test_level_two_matches_numpy_reference(W, method, fraction, sub_fraction):
    """Level 2 rebuilds what a per-channel numpy lstsq + per-atom SVD loop rebuilds."""
    K = kernel_size(W)
    num_atoms = max(1, round(fraction * K))
    num_sub_atoms = max(1, round(sub_fraction * K))
    result = atoms(W, num_atoms, levels=2, sub_atoms=num_sub_atoms, method=method)

    weight = W.reshape(W.shape[0], W.shape[1], K).numpy()
    coeffs = result.coeffs.numpy()
    channel_atoms = np.stack(
        [np.linalg.lstsq(coeffs[:, i], weight[:, i], rcond=None)[0] for i in range(W.shape[1])]
    )  # (c_in_g, m, K)
    projected = np.empty_like(channel_atoms)
    for j in range(num_atoms):
        _, _, vh = np.linalg.svd(channel_atoms[:, j, :])
        # Rows beyond the stack's rank are arbitrary, but the stack has no component along them.
        basis = vh[:num_sub_atoms] if num_sub_atoms <= vh.shape[0] else vh
        projected[:, j, :] = channel_atoms[:, j, :] @ basis.T @ basis
    reference = np.einsum("oij,ijk->oik", coeffs, projected).reshape(W.shape)
    assert relative_error(result.to_weight(), torch.from_numpy(reference)) <= 1e-7


@given(W=conv_weights(max_c_in=1), method=st.sampled_from(METHODS), fraction=st.floats(0.0, 1.0))
def test_depthwise_weights(W, method, fraction):
    K = kernel_size(W)
    num_atoms = max(1, round(fraction * K))
    level_one = atoms(W, num_atoms, method=method)
    level_two = atoms(W, num_atoms, levels=2, method=method)
    assert level_two.sub_coeffs.shape == (1, num_atoms, K)
    assert error_norm(level_two, W) <= error_norm(level_one, W) + 1e-10 * weight_norm(W)
    for levels in (1, 2):
        assert relative_error(atoms(W, K, levels=levels, method=method).to_weight(), W) <= 1e-9


# ----------------------------------------------------------------------------------------------
# DCT atoms


def scipy_dct_rows(size: int) -> np.ndarray:
    """Orthonormal DCT-II rows (anchors.md A3: dct(eye(N), norm='ortho', axis=0))."""
    return scipy.fft.dct(np.eye(size), norm="ortho", axis=0)


@pytest.mark.parametrize("kernel", [(5,), (3, 3), (2, 4), (3, 2, 2)])
def test_dct_atoms_are_separable_scipy_bases_in_documented_order(kernel):
    W = gaussian((2, 2, *kernel), seed=0)
    K = math.prod(kernel)
    frequencies = sorted(
        itertools.product(*(range(size) for size in kernel)), key=lambda f: (sum(f), f)
    )
    # np.ix_ makes open meshes whose broadcast product is the separable outer-product kernel.
    expected = np.stack(
        [
            math.prod(np.ix_(*[scipy_dct_rows(size)[f] for size, f in zip(kernel, freq)])).ravel()
            for freq in frequencies
        ]
    )
    result = atoms(W, K, method="dct").atoms.reshape(K, K).numpy()
    np.testing.assert_allclose(result, expected, atol=1e-12)


def test_dct_atom_order_for_three_by_three():
    W = gaussian((2, 2, 3, 3), seed=1)
    result = atoms(W, 3, method="dct").atoms
    rows = [torch.from_numpy(scipy_dct_rows(3)[f]) for f in range(3)]
    assert torch.allclose(result[0], torch.outer(rows[0], rows[0]))  # DC
    assert torch.allclose(result[1], torch.outer(rows[0], rows[1]))  # last axis rises first
    assert torch.allclose(result[2], torch.outer(rows[1], rows[0]))


def test_dct_atoms_do_not_depend_on_the_weight():
    first = atoms(gaussian((3, 2, 3, 3), seed=0), 4, method="dct").atoms
    second = atoms(gaussian((5, 1, 3, 3), seed=1), 4, method="dct").atoms
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, devices, parameter count


@given(W=conv_weights(), fraction=st.floats(0.0, 1.0), sub_fraction=st.floats(0.0, 1.0))
def test_shapes(W, fraction, sub_fraction):
    c_out, c_in_g, *kernel = W.shape
    K = kernel_size(W)
    m = max(1, round(fraction * K))
    m1 = max(1, round(sub_fraction * K))
    level_one = atoms(W, m)
    assert level_one.coeffs.shape == (c_out, c_in_g, m)
    assert level_one.atoms.shape == (m, *kernel)
    assert level_one.sub_coeffs is None and level_one.sub_atoms is None
    assert level_one.to_weight().shape == W.shape
    assert level_one.num_parameters == c_out * c_in_g * m + m * K
    level_two = atoms(W, m, levels=2, sub_atoms=m1)
    assert level_two.coeffs.shape == (c_out, c_in_g, m)
    assert level_two.atoms.shape == (m, *kernel)
    assert level_two.sub_coeffs.shape == (c_in_g, m, m1)
    assert level_two.sub_atoms.shape == (m, m1, *kernel)
    assert level_two.to_weight().shape == W.shape
    assert level_two.num_parameters == c_out * c_in_g * m + c_in_g * m * m1 + m * m1 * K
    assert atoms(W, m, levels=2).sub_atoms.shape == (m, K, *kernel)  # m1 defaults to K


def test_level_two_keeps_level_one_shared_atoms():
    W = gaussian((6, 4, 3, 3), seed=2)
    level_one = atoms(W, 5)
    level_two = atoms(W, 5, levels=2, sub_atoms=2)
    assert torch.equal(level_two.coeffs, level_one.coeffs)
    assert torch.equal(level_two.atoms, level_one.atoms)


def test_result_unpacks_as_tuple():
    coeffs, shared_atoms, sub_coeffs, sub_atoms = atoms(gaussian((2, 3, 3), seed=0), 2)
    assert coeffs.shape == (2, 3, 2) and shared_atoms.shape == (2, 3)
    assert sub_coeffs is None and sub_atoms is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_dtype_round_trip(dtype, levels, method):
    W = gaussian((6, 4, 3, 3), seed=5, dtype=dtype)
    result = atoms(W, 9, levels=levels, method=method)
    assert all(field.dtype == dtype for field in result if field is not None)
    assert result.to_weight().dtype == dtype
    assert relative_error(result.to_weight(), W) <= tolerance(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_float32_computation(dtype):
    W = gaussian((6, 4, 3, 3), seed=6, dtype=dtype)
    half_result = atoms(W, 4, levels=2, sub_atoms=3)
    float_result = atoms(W.float(), 4, levels=2, sub_atoms=3)
    assert relative_error(half_result.to_weight(), float_result.to_weight()) <= tolerance(dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    W = gaussian((16, 8, 3, 3), seed=7, dtype=torch.float32)
    cpu_result = atoms(W, 4, levels=2, sub_atoms=3, method=method)
    cuda_result = atoms(W.cuda(), 4, levels=2, sub_atoms=3, method=method)
    assert all(field.device.type == "cuda" for field in cuda_result)
    assert relative_error(cuda_result.to_weight().cpu(), cpu_result.to_weight()) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Bad input


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        atoms(np.zeros((2, 2, 3, 3)), 2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_rejects_non_real_floating_dtype(dtype):
    with pytest.raises(TypeError, match="W must have a real floating dtype"):
        atoms(torch.zeros(2, 2, 3, 3, dtype=dtype), 2)


@pytest.mark.parametrize("shape", [(4, 9), (2, 2, 2, 3, 3, 3)])
def test_rejects_wrong_ndim(shape):
    with pytest.raises(ValueError, match=r"W must have ndim in \[3, 5\]"):
        atoms(torch.zeros(shape), 1)


def test_rejects_empty():
    with pytest.raises(ValueError, match="W must not be empty"):
        atoms(torch.zeros(0, 2, 3, 3), 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite(bad):
    W = torch.ones(2, 2, 3, 3)
    W[1, 0, 2, 1] = bad
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        atoms(W, 2)


def test_check_finite_false_skips_the_check():
    W = torch.ones(2, 2, 3, 3)
    W[0, 0, 0, 0] = float("nan")
    # The data-independent DCT path propagates the NaN instead of failing in eigh.
    result = atoms(W, 2, method="dct", check_finite=False)
    assert torch.isnan(result.coeffs[0, 0]).all() and torch.isfinite(result.coeffs[1:]).all()


@pytest.mark.parametrize("num_atoms", [0, -1, 10])
def test_rejects_num_atoms_out_of_range(num_atoms):
    expected = r"num_atoms must be in \[1, K\] = \[1, 9\] for kernel size \(3, 3\)"
    with pytest.raises(ValueError, match=expected):
        atoms(torch.ones(2, 2, 3, 3), num_atoms)


@pytest.mark.parametrize("num_atoms", [2.0, "2", True, None])
def test_rejects_non_int_num_atoms(num_atoms):
    with pytest.raises(TypeError, match="num_atoms must be an int"):
        atoms(torch.ones(2, 2, 3, 3), num_atoms)


@pytest.mark.parametrize("levels", [0, 3])
def test_rejects_levels_out_of_range(levels):
    with pytest.raises(ValueError, match=r"levels must be in \[1, 2\]"):
        atoms(torch.ones(2, 2, 3, 3), 2, levels=levels)


def test_rejects_non_int_levels():
    with pytest.raises(TypeError, match="levels must be an int"):
        atoms(torch.ones(2, 2, 3, 3), 2, levels=2.0)


def test_rejects_sub_atoms_at_level_one():
    with pytest.raises(ValueError, match="sub_atoms is only used with levels=2"):
        atoms(torch.ones(2, 2, 3, 3), 2, sub_atoms=2)


@pytest.mark.parametrize("sub_atoms", [0, 28])
def test_rejects_sub_atoms_out_of_range(sub_atoms):
    expected = r"sub_atoms must be in \[1, K\] = \[1, 27\] for kernel size \(3, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        atoms(torch.ones(2, 2, 3, 3, 3), 2, levels=2, sub_atoms=sub_atoms)


def test_rejects_non_int_sub_atoms():
    with pytest.raises(TypeError, match="sub_atoms must be an int"):
        atoms(torch.ones(2, 2, 3, 3), 2, levels=2, sub_atoms=1.5)


def test_rejects_unknown_method():
    with pytest.raises(ValueError, match=r"method must be one of \['svd', 'dct'\], got 'pca'"):
        atoms(torch.ones(2, 2, 3, 3), 2, method="pca")
