"""Sums of Kronecker products via the Van Loan--Pitsianis rearrangement.

Reference: C. F. Van Loan, N. Pitsianis, "Approximation with Kronecker products", in Linear
Algebra for Large Scale and Real-Time Applications, Kluwer, 1993, pp. 293--314.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from ._checks import (
    as_sequence,
    check_choice,
    check_generator,
    check_int,
    check_rank,
    check_result_finite,
    check_tensor,
    unit_scaled,
)
from ._rsvd import rsvd

_METHODS = ("auto", "exact", "randomized")

# "auto" sketches when the sketch is at most this fraction of the rearranged matrix's short side:
# there the randomized SVD costs O(mn(k+p)) against the full SVD's O(mn min(m, n)).
_RANDOMIZED_MAX_FRACTION = 4


class KronSum(NamedTuple):
    r"""A sum of Kronecker products :math:`A \approx \sum_k S_k\, B_k \otimes C_k`.

    ``S`` is (..., r), non-negative and descending; ``B`` (..., r, m1, n1) and ``C``
    (..., r, m2, n2) have factors of unit Frobenius norm. Each pair is defined up to a joint sign
    (:math:`B_k \otimes C_k = (-B_k) \otimes (-C_k)`), so compare :meth:`to_matrix`, not factors.
    """

    S: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor

    def to_matrix(self) -> torch.Tensor:
        r"""The matrix :math:`\sum_k S_k\, B_k \otimes C_k`, shape (..., m1*m2, n1*n2).

        One contraction over :math:`k` (a batched matmul of cost :math:`O(r\, m_1 n_1 m_2 n_2)`)
        instead of materialising each :math:`B_k \otimes C_k`; entry
        :math:`(i m_2 + p,\ j n_2 + q)` is :math:`\sum_k S_k B_k[i, j] C_k[p, q]`, as in
        :func:`torch.kron`.

        >>> g = torch.Generator().manual_seed(0)
        >>> B, C = torch.randn(2, 3, generator=g), torch.randn(4, 5, generator=g)
        >>> single = KronSum(torch.ones(1), B[None], C[None])
        >>> torch.allclose(single.to_matrix(), torch.kron(B, C))
        True
        """
        *batch, _, m1, n1 = self.B.shape
        m2, n2 = self.C.shape[-2:]
        blocks = torch.einsum("...k,...kij,...kpq->...ipjq", self.S, self.B, self.C)
        return blocks.reshape(*batch, m1 * m2, n1 * n2)


def kpsvd(
    A: torch.Tensor,
    b_shape: Sequence[int],
    c_shape: Sequence[int],
    rank: int,
    *,
    method: str = "auto",
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    check_finite: bool = True,
) -> KronSum:
    r"""Best Frobenius approximation by a sum of ``rank`` Kronecker products (KPSVD).

    For :math:`A \in \mathbb{R}^{m_1 m_2 \times n_1 n_2}` with ``b_shape`` :math:`= (m_1, n_1)` and
    ``c_shape`` :math:`= (m_2, n_2)`, the rearrangement

    .. math::

        \mathcal{R}(A) = A\texttt{.reshape}(m_1, m_2, n_1, n_2)\texttt{.permute}(0, 2, 1, 3)
        \texttt{.reshape}(m_1 n_1, m_2 n_2)

    maps :math:`B \otimes C` to the rank-one :math:`\operatorname{vec}(B)\operatorname{vec}(C)^T`
    (row-major vec) and only permutes entries, so :math:`\|A - \sum_k S_k B_k \otimes C_k\|_F =
    \|\mathcal{R}(A) - \sum_k S_k \operatorname{vec}(B_k)\operatorname{vec}(C_k)^T\|_F`. By
    Eckart--Young the truncated SVD :math:`\mathcal{R}(A) \approx \sum_{k \le r} \sigma_k u_k v_k^T`
    is therefore optimal, with :math:`S_k = \sigma_k`, :math:`B_k = u_k`, :math:`C_k = v_k`
    reshaped, and error :math:`(\sum_{k > r} \sigma_k^2)^{1/2}` (Van Loan & Pitsianis 1993).
    ``rank=1`` gives the nearest Kronecker product.

    **Scale.** Each matrix is first divided by a power of two that brings its largest magnitude
    into :math:`[1/2, 1)`, and ``S`` multiplied back: exact, so on ordinary input nothing changes
    (the kernels are scale-equivariant up to rounding), and the result stays optimal for
    ``A * 1e30`` or ``A * 1e-30`` too. ``S`` beyond the largest number of ``A``'s dtype raises
    ``ValueError`` (with ``check_finite``).

    ``method`` picks the SVD of :math:`\mathcal{R}(A)`: ``"exact"`` is :func:`torch.linalg.svd`;
    ``"randomized"`` is :func:`decomp.rsvd` with ``oversample``, ``power_iters`` and
    ``generator``; ``"auto"`` (default) is randomized when
    ``rank + oversample <= min(m1*n1, m2*n2) // 4`` and exact otherwise, i.e. when the sketch is
    small next to the full SVD it replaces. The randomized result is near-optimal rather than
    optimal (see :func:`decomp.rsvd`); ``"exact"`` attains the bound above.

    Args:
        A: (..., m1*m2, n1*n2) real floating tensor; leading dimensions are a batch. fp16/bf16
            are computed in fp32 and returned in the input dtype.
        b_shape: :math:`(m_1, n_1)`, a pair of positive ints.
        c_shape: :math:`(m_2, n_2)`, a pair of positive ints.
        rank: number of terms, an int in :math:`[1, \min(m_1 n_1, m_2 n_2)]`.
        method: ``"auto"``, ``"exact"`` or ``"randomized"``.
        oversample: extra sketch columns, passed to :func:`decomp.rsvd` when it is used.
        power_iters: subspace iterations, passed to :func:`decomp.rsvd` when it is used.
        generator: source of the Gaussian sketch, passed to :func:`decomp.rsvd` when it is used.
        check_finite: check ``A`` for NaN/Inf and ``S`` for overflow of ``A``'s dtype (one host
            sync each).

    Returns:
        :class:`KronSum` ``(S, B, C)`` with S (..., rank), B (..., rank, m1, n1),
        C (..., rank, m2, n2), on ``A``'s device.

    Raises:
        TypeError: ``A`` is not a real floating tensor; ``b_shape``/``c_shape`` is not a pair of
            ints; ``rank``, ``oversample`` or ``power_iters`` is not an int; ``generator`` is not
            a ``torch.Generator``.
        ValueError: ``A`` has ndim < 2, is empty or has NaN/Inf; a shape entry is < 1; ``A``'s
            last two dimensions are not ``(m1*m2, n1*n2)``; ``rank`` is outside
            :math:`[1, \min(m_1 n_1, m_2 n_2)]`; ``method`` is unknown; ``oversample`` or
            ``power_iters`` is negative; ``S`` overflows ``A``'s dtype.

    Complexity:
        One :math:`O(mn)` copy for the rearrangement, then :math:`O(mn \min(m_1 n_1, m_2 n_2))`
        for ``"exact"`` or :math:`O((2q + 2)\, mn (r + p))` for ``"randomized"``
        (:math:`m n = m_1 m_2 n_1 n_2`).

    Differences from anchors:
        tensorly has only ``tl.kron``, no KPSVD. LyCORIS/peft LoKr build :math:`w_1 \otimes w_2`
        from a zero-initialised factor rather than from a data-driven KPSVD; :func:`kron_shapes`
        gives their balanced shapes.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> B, C = torch.randn(2, 3, generator=g), torch.randn(4, 5, generator=g)
        >>> A = torch.kron(B, C)
        >>> S, B1, C1 = kpsvd(A, (2, 3), (4, 5), rank=1)
        >>> S.shape, B1.shape, C1.shape
        (torch.Size([1]), torch.Size([1, 2, 3]), torch.Size([1, 4, 5]))
        >>> torch.allclose(kpsvd(A, (2, 3), (4, 5), 1).to_matrix(), A, atol=1e-5)
        True
    """
    check_tensor(A, "A", min_ndim=2, check_finite=check_finite)
    m1, n1 = _check_pair(b_shape, "b_shape")
    m2, n2 = _check_pair(c_shape, "c_shape")
    if tuple(A.shape[-2:]) != (m1 * m2, n1 * n2):
        raise ValueError(
            f"A must have shape (..., b_shape[0] * c_shape[0], b_shape[1] * c_shape[1]) = "
            f"(..., {m1 * m2}, {n1 * n2}) for b_shape={tuple(b_shape)} and "
            f"c_shape={tuple(c_shape)}, got A of shape {tuple(A.shape)}"
        )
    max_rank = min(m1 * n1, m2 * n2)
    rank = check_rank(rank, "rank", max_rank)
    method = check_choice(method, "method", _METHODS)
    oversample = check_int(oversample, "oversample", low=0)
    power_iters = check_int(power_iters, "power_iters", low=0)
    generator = check_generator(generator)

    X, scale = unit_scaled(A, (-2, -1))
    *batch, _, _ = X.shape
    rearranged = X.reshape(*batch, m1, m2, n1, n2).transpose(-3, -2).reshape(*batch, m1 * n1, m2 * n2)
    if method == "randomized" or (
        method == "auto" and rank + oversample <= max_rank // _RANDOMIZED_MAX_FRACTION
    ):
        U, S, Vh = rsvd(
            rearranged,
            rank,
            oversample=oversample,
            power_iters=power_iters,
            generator=generator,
            check_finite=False,
        )
    else:
        U, S, Vh = torch.linalg.svd(rearranged, full_matrices=False)
        U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    B = U.mT.reshape(*batch, rank, m1, n1)
    C = Vh.reshape(*batch, rank, m2, n2)
    S = (S * scale[..., 0]).to(A.dtype)
    if check_finite:
        check_result_finite(S, "the Kronecker singular values of A", "A")
    return KronSum(S, B.to(A.dtype), C.to(A.dtype))


def kron_shapes(m: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    r"""Balanced Kronecker factor shapes for an :math:`m \times n` matrix.

    Returns ``((m1, n1), (m2, n2))`` with :math:`m_1` the largest divisor of :math:`m` that is
    :math:`\le \sqrt{m}` and :math:`m_2 = m / m_1` (so :math:`m_1 \le m_2`), and likewise for
    :math:`n`. Balanced factors maximise the attainable KPSVD rank
    :math:`\min(m_1 n_1, m_2 n_2)` for a given shape. A prime size gets the trivial split
    :math:`(1, m)`. Costs :math:`O(\sqrt{m} + \sqrt{n})`.

    Args:
        m: number of rows, an int >= 1.
        n: number of columns, an int >= 1.

    Returns:
        ``(b_shape, c_shape)`` to pass to :func:`kpsvd`.

    Raises:
        TypeError: ``m`` or ``n`` is not an int.
        ValueError: ``m`` or ``n`` is < 1.

    Differences from anchors:
        LyCORIS/peft LoKr ``factorization(dim, factor=-1)`` ends at the same split (it walks the
        divisors while :math:`m_1 + m_2` decreases) and also puts the smaller factor first; its
        ``factor`` cap on the first size has no counterpart here.

    Example:
        >>> kron_shapes(4096, 768)
        ((64, 24), (64, 32))
        >>> kron_shapes(7, 12)
        ((1, 3), (7, 4))
    """
    m = check_int(m, "m", low=1)
    n = check_int(n, "n", low=1)
    m1, n1 = _largest_divisor_up_to_sqrt(m), _largest_divisor_up_to_sqrt(n)
    return (m1, n1), (m // m1, n // n1)


def _largest_divisor_up_to_sqrt(size: int) -> int:
    return max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)


def _check_pair(value: object, name: str) -> tuple[int, int]:
    pair = as_sequence(value, name)
    if pair is None or len(pair) != 2:
        raise TypeError(f"{name} must be a pair of positive ints (rows, cols), got {value!r}")
    return check_int(pair[0], f"{name}[0]", low=1), check_int(pair[1], f"{name}[1]", low=1)
