r"""The QR factorisation with a fixed sign: :math:`\operatorname{diag}(R) \ge 0`."""

from __future__ import annotations

import torch

__all__ = ["signed_qr"]


def signed_qr(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Reduced :math:`A = QR` with :math:`\operatorname{diag}(R) \ge 0`.

    Householder QR leaves each column's sign to the implementation; flipping column :math:`j` of
    :math:`Q` and row :math:`j` of :math:`R` where :math:`R_{jj} < 0` keeps :math:`QR = A` and
    makes :math:`Q` a function of :math:`A` alone for full column rank. It also keeps :math:`Q`
    continuous where :math:`A \approx Q_0 \Lambda` with :math:`\Lambda \ge 0` diagonal (a
    power-iteration step returns :math:`Q_0`, not a sign-flipped copy).

    Args:
        matrix: :math:`(\ldots, m, n)`, real floating (``torch.linalg.qr``'s dtypes).

    Returns:
        ``(Q, R)``: :math:`(\ldots, m, k)` with orthonormal columns and :math:`(\ldots, k, n)` upper
        triangular with a non-negative diagonal, :math:`k = \min(m, n)`; ``matrix``'s dtype.

    Example:
        >>> q, r = signed_qr(torch.tensor([[-2.0, 1.0], [0.0, 3.0]]))
        >>> q
        tensor([[-1.,  0.],
                [ 0.,  1.]])
        >>> r
        tensor([[ 2., -1.],
                [ 0.,  3.]])
    """
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"signed_qr takes a tensor, got {type(matrix).__name__}")
    if matrix.ndim < 2:
        raise ValueError(f"signed_qr takes a (..., m, n) tensor, got shape {tuple(matrix.shape)}")
    q, r = torch.linalg.qr(matrix)
    # A sign of exactly +-1 in Q's dtype: multiplying by it is exact, so Q is the Householder
    # factor bit for bit up to the flipped columns.
    signs = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs[..., None, :], r * signs[..., :, None]
