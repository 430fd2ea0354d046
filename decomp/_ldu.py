r"""Pivoted LDU factorisation: :math:`A = P L \operatorname{diag}(D) U`.

Partial-pivoting LU (:func:`torch.linalg.lu`, LAPACK ``getrf``) gives :math:`A = P L U_{LU}`; the
pivots :math:`D = \operatorname{diag}(U_{LU})` are pulled out of the rows of :math:`U_{LU}` so
that both triangular factors have a unit diagonal. This is the form used by LDU adapters, which
train the pivots and the two triangular factors separately.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_tensor, to_compute


class LDU(NamedTuple):
    r"""Factors of :math:`A = P L \operatorname{diag}(D) U` for ``A`` of shape ``(..., m, n)``.

    With :math:`k = \min(m, n)`:

    * ``P`` -- ``(..., m, m)`` permutation matrix (row pivots of partial-pivoting LU);
    * ``L`` -- ``(..., m, k)`` unit lower-triangular (diagonal exactly 1, ``|L_ij| <= 1``);
    * ``D`` -- ``(..., k)`` pivots, all nonzero;
    * ``U`` -- ``(..., k, n)`` unit upper-triangular (diagonal exactly 1).
    """

    P: torch.Tensor
    L: torch.Tensor
    D: torch.Tensor
    U: torch.Tensor

    def to_matrix(self) -> torch.Tensor:
        r"""Reconstruct :math:`A = P L \operatorname{diag}(D) U`, shape ``(..., m, n)``.

        Computed in fp32 for fp16/bf16 factors and returned in ``D``'s dtype. Costs two matrix
        products: :math:`O(m k n + m^2 n)`.

        Example:
            >>> generator = torch.Generator().manual_seed(0)
            >>> A = torch.randn(4, 6, generator=generator, dtype=torch.float64)
            >>> torch.allclose(ldu(A).to_matrix(), A)
            True
        """
        P, L, D, U = (to_compute(t) for t in self)
        return (P @ ((L * D.unsqueeze(-2)) @ U)).to(self.D.dtype)


def _zero_pivot_message(D: torch.Tensor) -> str:
    first = tuple(int(i) for i in (D == 0).nonzero()[0])
    batch, pivot = first[:-1], first[-1]
    where = f"pivot {pivot}" if not batch else f"batch index {batch}, pivot {pivot}"
    return (
        f"A is singular: zero pivot at {where} of partial-pivoting LU; ldu needs all min(m, n) "
        f"pivots nonzero (the leading min(m, n) columns of A linearly independent), because a row "
        f"of U cannot in general be scaled to a unit diagonal by a zero pivot"
    )


def ldu(A: torch.Tensor, *, check_finite: bool = True) -> LDU:
    r"""Pivoted LDU factorisation :math:`A = P L \operatorname{diag}(D) U`.

    From partial-pivoting LU :math:`A = P L U_{LU}` (:func:`torch.linalg.lu`):

    .. math::

        D = \operatorname{diag}(U_{LU}), \qquad U = \operatorname{diag}(D)^{-1} U_{LU},

    with ``U``'s diagonal set to exactly 1. ``P`` and ``L`` are LU's own, so they equal
    ``scipy.linalg.lu``'s, and ``scipy``'s ``U`` is ``diag(D) @ U``.

    Shapes: ``A`` is ``(..., m, n)``, square or rectangular (wide or tall), batched over the
    leading dims; with :math:`k = \min(m, n)`, ``P`` is ``(..., m, m)``, ``L`` ``(..., m, k)``,
    ``D`` ``(..., k)`` and ``U`` ``(..., k, n)``. Cost: the LU, :math:`O(m n k)`, plus one pass over
    :math:`U_{LU}`.

    **Singular input.** If a pivot is exactly zero, the row of :math:`U_{LU}` it heads can still
    be nonzero right of the diagonal, so in general no unit upper-triangular ``U`` reproduces
    ``A`` (scipy's plain ``U / D[:, None]`` gives inf/NaN there). ``ldu`` raises ``ValueError``
    naming the batch index and pivot of the first zero pivot rather than return a wrong product.
    It raises even when that row happens to be zero (e.g. the last pivot of a square matrix, where
    ``D_i = 0`` with a unit row would do), so that ``D`` is always invertible. In exact arithmetic
    the first zero pivot is at ``j`` exactly when the leading ``j + 1`` columns of ``A`` are
    linearly dependent and the leading ``j`` are not (e.g. a zero column). In floating point a
    rank-deficient ``A`` usually gets a tiny rounding-level pivot instead, and is factored as a
    near-singular one.

    **Near-singular input** (tiny but nonzero pivots) factors fine, but ``U``'s off-diagonal
    entries scale like :math:`1 / |D_i|` and can be huge; the product still reproduces ``A`` to
    LU's backward error.

    fp16/bf16 inputs are factored in fp32 and every factor (``P`` too) is returned in the input
    dtype; the zero-pivot check runs in fp32, so a near-singular half input can still return
    pivots that round to 0 or a ``U`` that overflows.

    Args:
        A: real floating tensor ``(..., m, n)`` with ``m, n >= 1``.
        check_finite: check ``A`` for NaN/Inf (one device sync); pass ``False`` in hot loops.

    Returns:
        :class:`LDU` ``(P, L, D, U)``; :meth:`LDU.to_matrix` reconstructs ``A``.

    Raises:
        TypeError: ``A`` is not a real floating tensor.
        ValueError: ``A`` has ndim < 2, is empty, contains NaN/Inf, or is singular (zero pivot).

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> A = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
        >>> P, L, D, U = ldu(A)
        >>> P.shape, L.shape, D.shape, U.shape
        (torch.Size([2, 5, 5]), torch.Size([2, 5, 3]), torch.Size([2, 3]), torch.Size([2, 3, 3]))
        >>> torch.allclose(P @ L @ torch.diag_embed(D) @ U, A)
        True
        >>> bool((U.diagonal(dim1=-2, dim2=-1) == 1).all())
        True
    """
    A = check_tensor(A, "A", min_ndim=2, check_finite=check_finite)
    P, L, U_lu = torch.linalg.lu(to_compute(A))
    D = U_lu.diagonal(dim1=-2, dim2=-1).clone()
    # One reduction and one device sync; the message's index search runs only on failure.
    if bool((D == 0).any()):
        raise ValueError(_zero_pivot_message(D))
    U = U_lu / D.unsqueeze(-1)
    # x / x is exactly 1 under IEEE division, but not under every backend's fast division.
    U.diagonal(dim1=-2, dim2=-1).fill_(1)
    factors = LDU(P, L, D, U)
    return factors if U.dtype == A.dtype else LDU(*(t.to(A.dtype) for t in factors))
