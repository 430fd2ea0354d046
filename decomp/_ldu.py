r"""Pivoted LDU factorisation: :math:`A = P L \operatorname{diag}(D) U`, ``P`` kept as row indices.

Partial-pivoting LU (:func:`torch.linalg.lu_factor`, LAPACK ``getrf``) gives :math:`A = P L U_{LU}`;
the pivots :math:`D = \operatorname{diag}(U_{LU})` are pulled out of the rows of :math:`U_{LU}` so
that both triangular factors have a unit diagonal. This is the form used by LDU adapters, which
train the pivots and the two triangular factors separately. The permutation is returned as the
index vector ``perm`` (``A = (L diag(D) U)[perm]``), never as a dense :math:`m \times m` matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_result_finite, check_tensor, to_compute, unit_scaled


class LDU(NamedTuple):
    r"""Factors of :math:`A = P L \operatorname{diag}(D) U` for ``A`` of shape ``(..., m, n)``.

    With :math:`k = \min(m, n)`:

    * ``perm`` -- ``(..., m)`` int64 row indices of the permutation: row ``i`` of ``A`` is row
      ``perm[i]`` of :math:`L \operatorname{diag}(D) U`, i.e. ``A = (L diag(D) U)[perm]`` and
      :math:`P_{i, \mathrm{perm}_i} = 1`. It equals ``scipy.linalg.lu(A, p_indices=True)``'s
      ``p``; ``perm.argsort(-1)`` lists ``A``'s rows in elimination order,
      ``A[perm.argsort()] = L diag(D) U``;
    * ``L`` -- ``(..., m, k)`` unit lower-triangular (diagonal exactly 1, ``|L_ij| <= 1``);
    * ``D`` -- ``(..., k)`` pivots, all nonzero;
    * ``U`` -- ``(..., k, n)`` unit upper-triangular (diagonal exactly 1).
    """

    perm: torch.Tensor
    L: torch.Tensor
    D: torch.Tensor
    U: torch.Tensor

    def to_matrix(self) -> torch.Tensor:
        r"""Reconstruct :math:`A = P L \operatorname{diag}(D) U`, shape ``(..., m, n)``.

        The permutation is a row gather, ``(L diag(D) U)[perm]``, not a product with ``P``.
        Computed in fp32 for fp16/bf16 factors and returned in ``D``'s dtype. Costs one matrix
        product, :math:`O(m k n)`, and :math:`O(m n)` memory.

        Example:
            >>> generator = torch.Generator().manual_seed(0)
            >>> A = torch.randn(4, 6, generator=generator, dtype=torch.float64)
            >>> torch.allclose(ldu(A).to_matrix(), A)
            True
        """
        L, D, U = (to_compute(t) for t in (self.L, self.D, self.U))
        eliminated = (L * D.unsqueeze(-2)) @ U
        return torch.take_along_dim(eliminated, self.perm.unsqueeze(-1), dim=-2).to(self.D.dtype)

    def permutation_matrix(self) -> torch.Tensor:
        r"""The dense permutation matrix :math:`P`, ``(..., m, m)`` in ``D``'s dtype.

        :math:`P_{i, \mathrm{perm}_i} = 1`, so ``P @ L @ diag(D) @ U`` is ``A``. It costs
        :math:`O(m^2)` memory (40 GB for :math:`m = 10^5` in fp32): for small matrices and
        checks only; :meth:`to_matrix` and ``perm`` never need it.

        Example:
            >>> A = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
            >>> factors = ldu(A)
            >>> factors.perm, factors.permutation_matrix()
            (tensor([1, 0]), tensor([[0., 1.],
                    [1., 0.]], dtype=torch.float64))
            >>> P = factors.permutation_matrix()
            >>> torch.equal(P @ factors.L @ torch.diag(factors.D) @ factors.U, A)
            True
        """
        m = self.perm.shape[-1]
        dense = torch.zeros(*self.perm.shape, m, dtype=self.D.dtype, device=self.D.device)
        return dense.scatter_(-1, self.perm.unsqueeze(-1), 1)


def _zero_pivot_message(D: torch.Tensor) -> str:
    first = tuple(int(i) for i in (D == 0).nonzero()[0])
    batch, pivot = first[:-1], first[-1]
    where = f"pivot {pivot}" if not batch else f"batch index {batch}, pivot {pivot}"
    return (
        f"A is singular: zero pivot at {where} of partial-pivoting LU; ldu needs all min(m, n) "
        f"pivots nonzero (the leading min(m, n) columns of A linearly independent), because a row "
        f"of U cannot in general be scaled to a unit diagonal by a zero pivot"
    )


def _permutation(pivots: torch.Tensor, m: int) -> torch.Tensor:
    """``perm`` (..., m) with ``A = (LU)[perm]`` from LAPACK's 1-based row swaps (..., k).

    LAPACK swaps row ``i`` with row ``pivots[i] - 1`` for ``i = 0, 1, ...`` in turn, so
    ``(P^T A)[j] = A[order[j]]`` for the swapped ``order`` of ``0..m-1``, and ``perm`` is its
    inverse. The swaps are replayed on the host on the at most ``2k`` rows they touch (one read
    of ``k`` ints per matrix); the device only writes ``perm``, so there is neither an
    :math:`m \\times m` matrix nor :math:`O(m)` host work.
    """
    *batch, k = pivots.shape
    targets: list[int] = []  # flat indices into perm (matrix * m + original row)
    positions: list[int] = []  # the position that row ends up at
    for matrix, swaps in enumerate((pivots.reshape(-1, k) - 1).tolist()):
        row_at: dict[int, int] = {}  # position -> original row, for the positions a swap moved
        for i, j in enumerate(swaps):
            if i != j:
                row_at[i], row_at[j] = row_at.get(j, j), row_at.get(i, i)
        targets += (matrix * m + row for row in row_at.values())
        positions += row_at.keys()
    perm = torch.arange(m, device=pivots.device).repeat(pivots.numel() // k)
    if positions:
        moved = torch.tensor(targets, device=pivots.device)
        perm[moved] = torch.tensor(positions, device=pivots.device)
    return perm.reshape(*batch, m)


def ldu(A: torch.Tensor, *, check_finite: bool = True) -> LDU:
    r"""Pivoted LDU factorisation :math:`A = P L \operatorname{diag}(D) U`, ``P`` as row indices.

    From partial-pivoting LU :math:`A = P L U_{LU}` (:func:`torch.linalg.lu_factor`):

    .. math::

        D = \operatorname{diag}(U_{LU}), \qquad U = \operatorname{diag}(D)^{-1} U_{LU},

    with ``U``'s diagonal set to exactly 1. The permutation is returned as the index vector
    ``perm``: :math:`A = (L \operatorname{diag}(D) U)[\mathrm{perm}]`, i.e. row ``i`` of ``A``
    is row ``perm[i]`` of the product and :math:`P_{i, \mathrm{perm}_i} = 1`
    (:meth:`LDU.permutation_matrix` builds the dense :math:`P` on request). ``perm``, ``L`` are
    LU's own, so they equal ``scipy.linalg.lu(A, p_indices=True)``'s ``p`` and ``l``, and
    ``scipy``'s ``u`` is ``diag(D) @ U``.

    Shapes: ``A`` is ``(..., m, n)``, square or rectangular (wide or tall), batched over the
    leading dims; with :math:`k = \min(m, n)`, ``perm`` is ``(..., m)`` (int64), ``L``
    ``(..., m, k)``, ``D`` ``(..., k)`` and ``U`` ``(..., k, n)``. Cost: the LU, :math:`O(m n k)`,
    plus one pass over :math:`U_{LU}`; memory :math:`O(mn)`, the size of ``A`` and of its factors
    (no :math:`m \times m` matrix: ``ldu`` of a :math:`10^5 \times 1` column needs about a
    megabyte). Besides the zero-pivot check, the row swaps are read back to the host (``k`` ints
    per matrix).

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

    **Scale.** Each matrix is first divided by a power of two that brings its largest magnitude
    into :math:`[1/2, 1)`, and ``D`` multiplied back (``L``, ``U`` and ``perm`` do not depend on
    the scale). Both steps are exact and partial pivoting is scale-equivariant, so on ordinary
    input the factors are unchanged, and the elimination cannot overflow or lose subnormal digits
    at any scale. Pivots beyond the largest number of ``A``'s dtype raise ``ValueError`` (with
    ``check_finite``).

    fp16/bf16 inputs are factored in fp32 and ``L``, ``D``, ``U`` returned in the input dtype;
    the zero-pivot check runs in fp32, so a near-singular half input can still return pivots
    that round to 0 or a ``U`` that overflows.

    Args:
        A: real floating tensor ``(..., m, n)`` with ``m, n >= 1``.
        check_finite: check ``A`` for NaN/Inf and ``D`` for overflow of ``A``'s dtype (one device
            sync each); pass ``False`` in hot loops.

    Returns:
        :class:`LDU` ``(perm, L, D, U)``; :meth:`LDU.to_matrix` reconstructs ``A``.

    Raises:
        TypeError: ``A`` is not a real floating tensor.
        ValueError: ``A`` has ndim < 2, is empty, contains NaN/Inf, or is singular (zero pivot);
            the pivots overflow ``A``'s dtype.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> A = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
        >>> perm, L, D, U = ldu(A)
        >>> perm.shape, L.shape, D.shape, U.shape
        (torch.Size([2, 5]), torch.Size([2, 5, 3]), torch.Size([2, 3]), torch.Size([2, 3, 3]))
        >>> eliminated = L @ torch.diag_embed(D) @ U
        >>> torch.allclose(torch.take_along_dim(eliminated, perm.unsqueeze(-1), dim=-2), A)
        True
        >>> torch.allclose(eliminated[0], A[0].index_select(0, perm[0].argsort()))
        True
        >>> bool((U.diagonal(dim1=-2, dim2=-1) == 1).all())
        True
    """
    A = check_tensor(A, "A", min_ndim=2, check_finite=check_finite)
    m, n = A.shape[-2:]
    k = min(m, n)
    X, scale = unit_scaled(A, (-2, -1))
    LU, pivots, _ = torch.linalg.lu_factor_ex(X)
    # LAPACK leaves LU column-major; tril/triu are about 2x faster on a row-major copy, and the
    # factors come out row-major, as torch.linalg.lu returns them.
    LU = LU.contiguous()
    L = LU[..., :k].tril(-1)
    L.diagonal(dim1=-2, dim2=-1).fill_(1)
    U_lu = LU[..., :k, :].triu()
    D = U_lu.diagonal(dim1=-2, dim2=-1).clone()
    # One reduction and one device sync; the message's index search runs only on failure.
    if bool((D == 0).any()):
        raise ValueError(_zero_pivot_message(D))
    U = U_lu / D.unsqueeze(-1)
    # x / x is exactly 1 under IEEE division, but not under every backend's fast division.
    U.diagonal(dim1=-2, dim2=-1).fill_(1)
    D = (D * scale[..., 0]).to(A.dtype)
    if check_finite:
        check_result_finite(D, "the pivots of A", "A")
    return LDU(_permutation(pivots, m), L.to(A.dtype), D, U.to(A.dtype))
