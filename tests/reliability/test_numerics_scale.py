"""Mechanism 6: every decomposition keeps its promise at every scale of its input.

Each entry point is called on ``x`` and on ``x * c`` for a drawn factor ``c`` (a power of two
``2**k`` or a non-power like ``1.37 * 2**k``), with ``k`` spanning the dtype's whole exponent
range (up to entries near its largest number, down to subnormal ones), so squared norms overflow
or underflow the dtype for most draws. The promise: the result is finite and in the input dtype;
its reconstruction error, measured against the input actually stored, is the unscaled one's (plus
what the input itself lost to subnormal rounding), within ``tol`` in fixed-precision mode; when
the scaled input holds ``x`` exactly, every scale-free output (singular vectors, factors, atoms,
permutations, ranks) is bit for bit the unscaled one and every scale-carrying output (singular
values, core, pivots, coefficients) is the unscaled one times ``c``. A result whose exact value
exceeds the dtype's largest number raises ``ValueError`` ("overflow") instead of returning inf.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from decomp import LDU, SVD, Atoms, KronSum, Tucker, atoms, dct, idct, kpsvd, ldu, rsvd, tucker
from tests.strategies import SEEDS, gaussian, relative_error, tolerance


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def times_power_of_two(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """``t * 2**exponent`` in float64, in two exact steps (a single factor may not be a float)."""
    half = exponent // 2
    return t.double() * 2.0**half * 2.0 ** (exponent - half)


def float64(result: object) -> object:
    """Every floating tensor of ``result`` in float64 (index tensors, ints and None kept)."""
    if isinstance(result, torch.Tensor):
        return result.double() if result.is_floating_point() else result
    if isinstance(result, tuple) and hasattr(result, "_fields"):
        return type(result)(*(float64(field) for field in result))
    if isinstance(result, tuple):
        return tuple(float64(item) for item in result)
    return result


def tensors(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, tuple):
        return [t for item in result for t in tensors(item)]
    return []


class Entry(NamedTuple):
    """A public entry point with one fixed configuration and what scales with its input.

    ``carrying`` names the result field proportional to the input (``None``: the whole result is);
    every other tensor is scale-free. ``reconstruct`` rebuilds the input from a float64 result.
    ``tol`` is the fixed-precision bound, if the entry has one.
    """

    name: str
    shape: tuple[int, ...]
    call: Callable[[torch.Tensor], object]
    carrying: str | None
    reconstruct: Callable[[object], torch.Tensor]
    tol: float | None = None


def _svd(result: SVD) -> torch.Tensor:
    return result.to_matrix()


def rsvd_tol(tol: float) -> Callable[[torch.Tensor], SVD]:
    return lambda x: rsvd(x, tol=tol, generator=seeded())


_TUCKER, _KRON, _ATOMS = Tucker.to_tensor, KronSum.to_matrix, Atoms.to_weight

ENTRIES = [
    Entry("rsvd rank", (12, 9), lambda x: rsvd(x, 3, generator=seeded()), "S", _svd),
    Entry("rsvd tol", (12, 9), rsvd_tol(0.3), "S", _svd, 0.3),
    Entry("rsvd tol batched wide", (2, 7, 10), rsvd_tol(0.05), "S", _svd, 0.05),
    Entry("tucker hooi", (5, 6, 4), lambda x: tucker(x, (2, 3, 2)), "core", _TUCKER),
    Entry("tucker energy", (5, 6, 4), lambda x: tucker(x, 0.8, method="hosvd"), "core", _TUCKER),
    Entry(
        "tucker gram", (4, 9, 3), lambda x: tucker(x, (3, 4), modes=(0, 1), svd="gram"), "core", _TUCKER
    ),
    Entry("tucker completion", (9, 2), lambda x: tucker(x, (4, 1)), "core", _TUCKER),
    Entry("kpsvd exact", (6, 6), lambda x: kpsvd(x, (2, 3), (3, 2), 2, method="exact"), "S", _KRON),
    Entry(
        "kpsvd randomized",
        (2, 12, 20),
        lambda x: kpsvd(x, (3, 4), (4, 5), 2, method="randomized", generator=seeded()),
        "S",
        _KRON,
    ),
    Entry("ldu", (7, 5), ldu, "D", LDU.to_matrix),
    Entry("ldu batched wide", (2, 4, 6), ldu, "D", LDU.to_matrix),
    Entry("atoms svd", (6, 3, 3, 3), lambda x: atoms(x, 4), "coeffs", _ATOMS),
    Entry("atoms level 2", (6, 3, 3, 3), lambda x: atoms(x, 4, levels=2, sub_atoms=3), "coeffs", _ATOMS),
    Entry("atoms dct", (5, 2, 3, 3), lambda x: atoms(x, 5, method="dct"), "coeffs", _ATOMS),
    Entry("dct", (12, 5), lambda x: dct(x, dim=0), None, lambda X: idct(X, dim=0)),
    Entry("idct", (5, 12), lambda x: idct(x, dim=1), None, lambda X: dct(X, dim=1)),
]
BY_NAME = {entry.name: entry for entry in ENTRIES}

# Exponents k with entries of 2**k * gaussian finite and not all flushed to zero.
EXPONENTS = {
    torch.float64: (-1070, 1020),
    torch.float32: (-140, 124),
    torch.bfloat16: (-125, 124),
    torch.float16: (-18, 13),
}
# Factor c = mantissa * 2**k: mantissa 1 keeps the input exact; 1.37 rounds it.
MANTISSAS = (1.0, 1.37)


def carrying_part(entry: Entry, result: object) -> torch.Tensor:
    return result if entry.carrying is None else getattr(result, entry.carrying)


def unscaled(entry: Entry, result: object, mantissa: float, k: int) -> object:
    """``result`` in float64 with its scale-carrying part divided by ``c`` again."""
    result = float64(result)
    back = times_power_of_two(carrying_part(entry, result), -k) / mantissa
    return back if entry.carrying is None else result._replace(**{entry.carrying: back})


def exact_normal(t: torch.Tensor) -> bool:
    """Every entry is zero or a normal number of its dtype."""
    magnitude = t.abs()
    return bool(((magnitude == 0) | (magnitude >= torch.finfo(t.dtype).tiny)).all())


def log2_magnitude(t: torch.Tensor) -> float:
    largest = float(t.double().abs().max())
    return math.log2(largest) if largest > 0 else -math.inf


@given(
    entry=st.sampled_from(ENTRIES),
    dtype=st.sampled_from(list(EXPONENTS)),
    data=st.data(),
    mantissa=st.sampled_from(MANTISSAS),
    seed=SEEDS,
)
def test_promise_holds_at_every_scale(entry, dtype, data, mantissa, seed):
    low, high = EXPONENTS[dtype]
    check_promise(entry, dtype, data.draw(st.integers(low, high), label="k"), mantissa, seed)


@pytest.mark.parametrize(
    ("dtype", "k"),
    [(torch.float32, k) for k in (-140, -126, -60, 60, 100, 124)]
    + [(torch.float64, k) for k in (-1070, -600, 600, 1020)]
    + [(torch.bfloat16, k) for k in (-120, 120)],
)
@pytest.mark.parametrize("entry", ENTRIES, ids=[entry.name for entry in ENTRIES])
def test_promise_holds_at_the_extremes(entry, dtype, k):
    check_promise(entry, dtype, k, 1.0, seed=0)


def check_promise(entry: Entry, dtype: torch.dtype, k: int, mantissa: float, seed: int) -> None:
    x = gaussian(entry.shape, seed, dtype)
    x = (x.double() / x.double().abs().max() * 3).to(dtype)  # largest entry 3: 3 * 2**124 < fp32 max
    scaled = (times_power_of_two(x, k) * mantissa).to(dtype)
    stored = times_power_of_two(scaled, -k) / mantissa  # what the scaled input holds, scale removed
    exact = mantissa == 1.0 and torch.equal(stored, x.double())

    reference = entry.call(x)
    finfo = torch.finfo(dtype)
    peak = log2_magnitude(carrying_part(entry, reference)) + k + math.log2(mantissa)
    if entry.carrying is None:
        # dct/idct are linear maps with no squares: they do not rescale, so outputs beyond the
        # dtype's largest number, and subnormal inputs and outputs with their few digits, are not
        # cases they promise anything for (docs/dct.md, "Range").
        if peak > math.log2(finfo.max) - 4 or not exact_normal(scaled):
            return
    elif peak > math.log2(finfo.max) + 1:
        with pytest.raises(ValueError, match="overflow"):
            entry.call(scaled)
        return
    elif peak > math.log2(finfo.max) - 1:
        return  # at the boundary either answer is right

    result = entry.call(scaled)
    for t in tensors(result):
        assert bool(torch.isfinite(t).all()) if t.is_floating_point() else True
        if t.is_floating_point():
            assert t.dtype == dtype

    # The promise, measured against what the scaled input actually holds.
    input_loss = relative_error(stored, x)
    error = relative_error(entry.reconstruct(unscaled(entry, result, mantissa, k)), stored)
    reference_error = relative_error(entry.reconstruct(float64(reference)), x)
    slack = tolerance(dtype) + 2 * input_loss
    assert error <= reference_error * (1 + 1e-3) + slack
    if entry.tol is not None and dtype in (torch.float32, torch.float64):
        assert error <= entry.tol + slack

    if exact:
        # Same internal computation: scale-free outputs identical, scale-carrying ones times c.
        carrying_k = carrying_part(entry, result)
        carrying_0 = carrying_part(entry, reference)
        assert carrying_k.shape == carrying_0.shape  # same ranks
        subnormal_step = times_power_of_two(torch.tensor(finfo.tiny), -k).item()
        torch.testing.assert_close(
            times_power_of_two(carrying_k, -k), carrying_0.double(), rtol=0, atol=2 * subnormal_step
        )
        if entry.carrying is not None:
            free_k = [t for name, t in zip(result._fields, result) if name != entry.carrying]
            free_0 = [t for name, t in zip(reference._fields, reference) if name != entry.carrying]
            for a, b in zip(tensors(tuple(free_k)), tensors(tuple(free_0))):
                assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Regression tests for the examples of the issue


def test_rsvd_tol_at_1e18_keeps_the_rank_and_the_bound():
    """Was: rank 1 with relative error 0.95 (the squared norm overflowed fp32)."""
    A = torch.randn(50, 40, generator=seeded(0))
    reference = rsvd(A, tol=0.01, generator=seeded(1))
    for factor in (1e18, 1e-30, 2.0**100, 2.0**-120):
        result = rsvd(A * factor, tol=0.01, generator=seeded(1))
        assert result.S.shape == reference.S.shape
        assert relative_error(result.to_matrix(), A * factor) <= 0.01


def test_tucker_at_1e19_does_not_crash_and_keeps_its_ranks():
    """Was: ``torch.linalg.eigh`` failed on the overflowed fp32 Gram."""
    T = torch.randn(5, 6, 7, generator=seeded(2))
    for ranks in (0.9, (3, 3, 3)):
        reference = tucker(T, ranks)
        for factor in (1e19, 1e-25, 1e30):
            result = tucker(T * factor, ranks)
            assert result.core.shape == reference.core.shape
            error = relative_error(result.to_tensor(), T * factor)
            assert error == pytest.approx(relative_error(reference.to_tensor(), T), rel=1e-4)


def wilkinson(n: int) -> torch.Tensor:
    """Partial pivoting's worst case: its last pivot is 2**(n-1) times its largest entry."""
    matrix = torch.eye(n) - torch.ones(n, n).tril(-1)
    matrix[:, -1] = 1
    return matrix


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda A: rsvd(A, 2), "the singular values of A overflow torch.float32"),
        (lambda A: kpsvd(A, (2, 2), (2, 2), 1), "the Kronecker singular values of A overflow"),
        (lambda A: tucker(A, 2), "the core entries of T's Tucker decomposition overflow"),
        (lambda A: atoms(A.reshape(1, 1, 4, 4), 2), "the atom coefficients of W overflow"),
    ],
)
def test_unrepresentable_results_raise_instead_of_inf(call, what):
    A = torch.full((4, 4), 1.5 * 2.0**126)  # finite, but its norm 6 * 2**126 is not in float32
    with pytest.raises(ValueError, match=what):
        call(A)
    call(A / 8)  # 0.75 * 2**127 is: no error


@pytest.mark.parametrize("transform, what", [(dct, r"dct\(x\)"), (idct, r"idct\(x\)")])
@pytest.mark.parametrize("dtype, value", [(torch.float16, 20000.0), (torch.bfloat16, 2.0**127)])
def test_transforms_of_half_input_raise_instead_of_inf(transform, what, dtype, value):
    """Regression: dct of a float16 image row of 16 values of 20000 returned inf silently (its
    DC coefficient, 80000, is past 65504). With check_finite the result is checked too; an input
    that fits keeps its one host sync."""
    x = torch.full((3, 16), value, dtype=dtype)
    with pytest.raises(ValueError, match=rf"the entries of {what} overflow {dtype}"):
        transform(x)
    assert not torch.isfinite(transform(x, check_finite=False)).all()  # the documented opt-out
    fits = (x / 8).float()
    torch.testing.assert_close(transform(x / 8).float(), transform(fits), rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        transform(torch.tensor([[1.0, float("inf")]], dtype=dtype))


def test_unrepresentable_pivots_raise_instead_of_inf():
    A = wilkinson(4) * 2.0**126  # finite; the last pivot is 8 * 2**126
    with pytest.raises(ValueError, match="the pivots of A overflow torch.float32"):
        ldu(A)
    torch.testing.assert_close(ldu(A / 8).to_matrix(), A / 8)


def test_half_input_with_large_values_keeps_its_promise():
    A = torch.randn(30, 20, generator=seeded(3))
    reference = rsvd(A, tol=0.1, generator=seeded(4))
    big = (A * 2.0**100).to(torch.bfloat16)  # fp32 squared norms would overflow
    result = rsvd(big, tol=0.1, generator=seeded(4))
    assert result.S.dtype == torch.bfloat16 and bool(torch.isfinite(result.S).all())
    assert result.S.shape == reference.S.shape
    assert relative_error(result.to_matrix(), big) <= 0.1 + 2e-2
