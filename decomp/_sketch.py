r"""Frequent-Directions sketches of a row stream, and orthonormal bases grown from them."""

from __future__ import annotations

import torch

from ._checks import unit_scaled
from ._qr import signed_qr

__all__ = ["extend_basis", "frequent_directions"]


def frequent_directions(sketch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    r"""Add ``rows`` (:math:`b \times d`) to a Frequent-Directions sketch (:math:`\ell \times d`).

    Stack, take the SVD :math:`[S; R] = U \Sigma V^\top`, keep
    :math:`\sqrt{\max(\sigma_i^2 - \sigma_{\ell+1}^2, 0)}\, v_i^\top` for :math:`i \le \ell`
    (Liberty 2013, the shrink by the :math:`(\ell+1)`-th value of each batch): over everything
    added so far, :math:`A`, :math:`0 \preceq A^\top A - S^\top S` and
    :math:`\lVert A^\top A - S^\top S \rVert_2 \le \lVert A - A_k \rVert_F^2 / (\ell - k)` for
    every :math:`k < \ell` (:math:`A_k` the best rank-:math:`k` approximation). The SVD and the
    squares run on the stack divided by a power of two (:func:`decomp._checks.unit_scaled`), so
    rows of any size that fits the dtype neither overflow nor underflow.

    Args:
        sketch: :math:`(\ell, d)`, the current sketch (zeros to start).
        rows: :math:`(b, d)`, same dtype and device.

    Returns:
        The new sketch, :math:`(\ell, d)`; exactly :math:`S^\top S + R^\top R` while
        :math:`\ell + b` rows have rank at most :math:`\ell`.

    Example:
        >>> sketch = frequent_directions(torch.zeros(4, 6), torch.eye(6)[:2])
        >>> sketch.shape, torch.allclose(sketch.T @ sketch, torch.diag(torch.tensor([1.0, 1, 0, 0, 0, 0])))
        (torch.Size([4, 6]), True)
    """
    size = sketch.shape[0]
    stacked, scale = unit_scaled(torch.cat([sketch, rows]), (-2, -1))
    _, singular, vh = torch.linalg.svd(stacked, full_matrices=False)
    if singular.shape[0] > size:
        shrunk = (singular[:size].square() - singular[size].square()).clamp_min(0).sqrt()
    else:
        shrunk = singular
    kept = (shrunk[:, None] * vh[: shrunk.shape[0]]) * scale
    if kept.shape[0] < size:
        kept = torch.cat([kept, kept.new_zeros(size - kept.shape[0], kept.shape[1])])
    return kept


def extend_basis(
    basis: torch.Tensor, sketch: torch.Tensor, energy: float, max_columns: int
) -> torch.Tensor:
    r"""Append the sketch's dominant directions, orthonormalised against ``basis`` (:math:`d \times k`).

    Takes the fewest leading right singular vectors :math:`v_1, \dots, v_j` of ``sketch``
    (:math:`\ell \times d`) whose squared singular values hold ``energy`` of the total,
    :math:`\sum_{i \le j} \sigma_i^2 \ge \text{energy} \sum_i \sigma_i^2`, removes their component
    along ``basis``, :math:`C = (I - B B^\top) V_j`, and keeps the columns of
    :math:`Q` in :math:`C = QR` (:func:`decomp._qr.signed_qr`) whose :math:`R_{ii}` exceeds
    :math:`10^{-6} \max(1, \max_i R_{ii})`, i.e. those not already (numerically) in ``basis``;
    at most ``max_columns`` columns in all. ``basis`` is returned unchanged as the first
    :math:`k` columns, so the result has orthonormal columns when ``basis`` has. Reads a handful
    of numbers back to the host (it runs once per task).

    Args:
        basis: :math:`(d, k)` with orthonormal columns (:math:`k = 0` to start).
        sketch: :math:`(\ell, d)`, same dtype and device.
        energy: fraction in :math:`(0, 1]` of the sketch's squared Frobenius norm to cover.
        max_columns: most columns the result may have.

    Returns:
        :math:`(d, k')` with :math:`k \le k' \le \max(k, \text{max\_columns})`.

    Example:
        >>> sketch = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
        >>> basis = extend_basis(torch.zeros(3, 0), sketch, energy=0.8, max_columns=3)
        >>> basis.shape, torch.allclose(basis.abs(), torch.tensor([[1.0], [0.0], [0.0]]))
        (torch.Size([3, 1]), True)
    """
    # The fractions are scale-free; squares of the raw sketch could overflow or underflow.
    _, singular, vh = torch.linalg.svd(unit_scaled(sketch, (-2, -1))[0], full_matrices=False)
    power = singular.square()
    total = power.sum()
    if total <= 0:
        return basis
    needed = int(torch.searchsorted(power.cumsum(0) / total, torch.tensor(energy)).item()) + 1
    room = max_columns - basis.shape[1]
    candidates = vh[: min(needed, room, vh.shape[0])].mT
    if candidates.shape[1] == 0:
        return basis
    candidates = candidates - basis @ (basis.mT @ candidates)
    q, r = signed_qr(candidates)
    pivots = r.diagonal()
    fresh = pivots > 1e-6 * max(1.0, float(pivots.max()))
    return torch.cat([basis, q[:, fresh]], dim=1)
