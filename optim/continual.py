r"""The protected-subspace option for continual learning (CoSO/OSFT-style).

With ``protect=True`` a projected optimizer keeps, per parameter, a Frequent-Directions sketch
:math:`S \in \mathbb{R}^{\ell \times d}` of the directions it updated during the current task (at
every subspace refresh it adds the rows :math:`\lVert X p_j \rVert\, p_j^\top` for the selected
basis columns :math:`p_j`). ``optimizer.consolidate()`` at the end of a task takes the dominant
right singular vectors of the sketch, enough to hold a fraction ``protect_energy`` of its energy,
and appends them (orthonormalised) to a protected basis :math:`B \in \mathbb{R}^{d \times k}`.
Later gradients are projected off it, :math:`X \leftarrow X - X B B^\top`, and so are the
updates, so every later update satisfies :math:`\Delta W\, B = 0` (or :math:`B^\top \Delta W = 0`
when the compressed side is the rows): inputs (outputs) in the span of :math:`B` keep their
response. Decoupled weight decay still shrinks the whole weight; use ``weight_decay=0`` for strict
protection.

What :math:`B` spans is what the optimizer updated. With the SVD projector that is the top of the
gradients' row space, which lies in the span of the inputs the task used, so the task's outputs
are kept (up to the energy ``protect_energy`` leaves out and the room of :math:`d - r` columns).
The DCT and random projectors update along fixed basis columns that need not contain the task's
inputs: the earlier updates are protected, the earlier outputs need not be. A projected matrix
with :math:`r \ge d` has no room at all; the optimizer refuses ``protect=True`` for it.

Differences from CoSO: the sketch is fed the optimizer's selected directions weighted by the
gradient energy along them (no extra SVD per step), and the basis lives on the compressed side.
"""

from __future__ import annotations

import torch

from decomp._checks import unit_scaled

__all__ = ["extend_basis", "frequent_directions", "project_off"]


def project_off(matrix: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    r""":math:`X - X B B^\top`: the rows of ``matrix`` (:math:`k \times d`) with their component
    in the span of the orthonormal ``basis`` (:math:`d \times p`) removed.

    ``matrix`` itself (no copy) when there is no basis or it has no columns.

    Example:
        >>> project_off(torch.ones(2, 3), torch.eye(3)[:, :1])
        tensor([[0., 1., 1.],
                [0., 1., 1.]])
    """
    if basis is None or basis.shape[1] == 0:
        return matrix
    return matrix - (matrix @ basis) @ basis.mT


def frequent_directions(sketch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    r"""Add ``rows`` (:math:`b \times d`) to a Frequent-Directions sketch (:math:`\ell \times d`).

    Stack, take the SVD :math:`[S; R] = U \Sigma V^\top`, keep
    :math:`\sqrt{\max(\sigma_i^2 - \sigma_{\ell+1}^2, 0)}\, v_i^\top` for :math:`i \le \ell`
    (Liberty 2013): :math:`0 \preceq A^\top A - S^\top S \preceq (\lVert A\rVert_F^2 /
    (\ell - \text{rank}))\, I` over everything added so far. The SVD and the squares run on the
    stack divided by a power of two (:func:`decomp._checks.unit_scaled`), so rows of any size
    that fits the dtype neither overflow nor underflow.

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

    Takes the fewest leading right singular vectors of ``sketch`` whose squared singular values
    hold ``energy`` of the total, removes their component along ``basis``, orthonormalises them and
    keeps those that are not already (numerically) in ``basis``; at most ``max_columns`` columns
    in all. Reads a handful of numbers back to the host (it runs once per task).

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
    q, r = torch.linalg.qr(candidates)
    fresh = r.diagonal().abs() > 1e-6 * max(1.0, float(r.diagonal().abs().max()))
    new_columns = q[:, fresh] * torch.where(r.diagonal()[fresh] < 0, -1.0, 1.0)
    return torch.cat([basis, new_columns], dim=1)
