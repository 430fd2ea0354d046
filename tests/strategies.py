"""Hypothesis strategies shared by the decomposition tests.

Tensors are built by torch from a drawn seed rather than element by element: shrinking then works
on the shape and the seed, and large examples stay cheap to generate.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
FLOAT_DTYPES = (torch.float32, torch.float64)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(shape, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64).to(dtype)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    """An n x k matrix with orthonormal columns (float64)."""
    q, _ = torch.linalg.qr(gaussian((n, k), seed))
    return q


def with_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U, V and the given singular values (float64)."""
    k = singular_values.numel()
    return orthonormal(m, k, seed) @ torch.diag(singular_values.double()) @ orthonormal(n, k, seed + 1).T


def decaying(m: int, n: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """A matrix whose singular values decay geometrically: s_i = decay**i."""
    k = min(m, n)
    return with_spectrum(m, n, decay ** torch.arange(k, dtype=torch.float64), seed)


@st.composite
def matrix_shapes(draw, min_side: int = 1, max_side: int = 24, max_batch_dims: int = 0):
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=max_batch_dims)))
    return batch + (draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side)))


@st.composite
def matrices(draw, min_side: int = 1, max_side: int = 24, max_batch_dims: int = 0, dtypes=FLOAT_DTYPES):
    """Gaussian matrices (optionally batched) with entries of unit scale."""
    shape = draw(matrix_shapes(min_side, max_side, max_batch_dims))
    return gaussian(shape, draw(SEEDS), draw(st.sampled_from(dtypes)))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(approx.double() - exact.double()) / torch.linalg.vector_norm(exact.double()))


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for a reconstruction computed in ``dtype``."""
    return {torch.float64: 1e-9, torch.float32: 2e-5}.get(dtype, 2e-2)
