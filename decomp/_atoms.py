"""Filter-atom decomposition of convolution kernels (filter subspace tuning).

Chen, Miao, Qiu, "Large Convolutional Model Tuning via Filter Subspace", ICLR 2025
(arXiv 2403.00269): every spatial filter of a conv weight is a combination of a few shared
spatial *atoms*, and fine-tuning trains only the atoms while the per-filter coefficients stay
frozen.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, NamedTuple

import torch

from ._checks import (
    check_choice,
    check_int,
    check_rank,
    check_result_finite,
    check_tensor,
    unit_scaled,
)
from ._dct import _dct_rows
from ._rsvd import row_signs

# The K x K Gram of a reshaped kernel is tiny (K = 9 for 3x3), so forming it in float64 costs
# nothing, and it avoids squaring the condition number in fp32: an fp32 Gram resolves only the
# singular directions above ~sqrt(eps32) = 3e-4 of the largest one.
_GRAM_DTYPE = torch.float64


class Atoms(NamedTuple):
    r"""Filter atoms of a conv weight ``W`` of shape ``(c_out, c_in_g, *kernel)``.

    Level 1 (``sub_coeffs`` and ``sub_atoms`` are ``None``):

    .. math:: W[o, i] = \sum_{j<m} \mathrm{coeffs}[o, i, j]\, \mathrm{atoms}[j].

    Level 2 (recursive): every input channel ``i`` has its own atoms, built from per-atom
    sub-atoms,

    .. math::
        A_i[j] = \sum_{a<m_1} \mathrm{sub\_coeffs}[i, j, a]\, \mathrm{sub\_atoms}[j, a], \qquad
        W[o, i] = \sum_{j<m} \mathrm{coeffs}[o, i, j]\, A_i[j].

    Fields:
        coeffs: ``(c_out, c_in_g, m)`` atom coefficients (frozen in filter subspace tuning).
        atoms: ``(m, *kernel)`` shared atoms with orthonormal flattened rows. At level 2 these are
            the level-1 atoms the coefficients were fitted with; :meth:`to_weight` ignores them.
        sub_coeffs: ``(c_in_g, m, m1)`` per-channel sub-atom coefficients, ``None`` at level 1.
        sub_atoms: ``(m, m1, *kernel)`` sub-atoms, orthonormal within each atom ``j``; ``None`` at
            level 1.
    """

    coeffs: torch.Tensor
    atoms: torch.Tensor
    sub_coeffs: torch.Tensor | None = None
    sub_atoms: torch.Tensor | None = None

    def to_weight(self) -> torch.Tensor:
        r"""Rebuild the conv weight ``(c_out, c_in_g, *kernel)`` from the atoms.

        Cost: :math:`O(c_{out} c_{in,g} m K)` at level 1, plus :math:`O(c_{in,g} m m_1 K)` to form
        the per-channel atoms at level 2 (``K = prod(kernel)``).

        Example:
            >>> from decomp import atoms
            >>> W = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
            >>> result = atoms(W, 9, levels=2)
            >>> torch.allclose(result.to_weight(), W, atol=1e-5)
            True
        """
        c_out, c_in_g, _ = self.coeffs.shape
        if self.sub_atoms is None or self.sub_coeffs is None:
            flat_atoms = self.atoms.flatten(1)
            kernel = self.atoms.shape[1:]
            flat_weight = torch.einsum("oij,jk->oik", self.coeffs, flat_atoms)
        else:
            kernel = self.sub_atoms.shape[2:]
            # Build the c_in_g * m per-channel atoms once, then mix: cheaper than contracting all
            # three factors per output filter.
            channel_atoms = torch.einsum("ija,jak->ijk", self.sub_coeffs, self.sub_atoms.flatten(2))
            flat_weight = torch.einsum("oij,ijk->oik", self.coeffs, channel_atoms)
        return flat_weight.reshape(c_out, c_in_g, *kernel)

    @property
    def num_parameters(self) -> int:
        """Number of stored elements needed by :meth:`to_weight` (``atoms`` excluded at level 2).

        Example:
            >>> from decomp import atoms
            >>> W = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
            >>> atoms(W, 3).num_parameters  # 8*4*3 coefficients + 3*9 atom entries
            123
        """
        if self.sub_atoms is None or self.sub_coeffs is None:
            return self.coeffs.numel() + self.atoms.numel()
        return self.coeffs.numel() + self.sub_coeffs.numel() + self.sub_atoms.numel()


def atoms(
    W: torch.Tensor,
    num_atoms: int,
    *,
    levels: int = 1,
    sub_atoms: int | None = None,
    method: Literal["svd", "dct"] = "svd",
    check_finite: bool = True,
) -> Atoms:
    r"""Decompose a conv weight into filter atoms (filter subspace tuning, Chen et al., ICLR 2025).

    ``W`` has shape ``(c_out, c_in_g, *kernel)`` with one to three spatial dims
    (``c_in_g = c_in / groups``); ``K = prod(kernel)`` and ``m = num_atoms``. With the matrix view
    :math:`M = W.\mathrm{reshape}(c_{out} c_{in,g}, K)`, level 1 finds :math:`M \approx C A` with
    :math:`A \in \mathbb{R}^{m \times K}` having orthonormal rows and :math:`C = M A^\top`:

    * ``method="svd"``: :math:`A` = the top-``m`` right singular vectors of :math:`M` (top
      eigenvectors of the Gram :math:`M^\top M`, formed in float64). By Eckart--Young this is the
      least-squares optimal ``m``-dimensional atom subspace,
      :math:`\|M - CA\|_F = (\sum_{r \ge m} \sigma_r(M)^2)^{1/2}`, and it is exact for ``m = K``
      (also when :math:`c_{out} c_{in,g} < K`: the eigenbasis of the Gram is still complete).
      Atoms are ordered by decreasing singular value.
    * ``method="dct"``: :math:`A` = the ``m`` lowest-frequency separable DCT-II kernels,
      :math:`A_f = D_{k_1}[f_1] \otimes \cdots \otimes D_{k_d}[f_d]` with ``D_k`` =
      :func:`decomp.dct_matrix` ``(k)``. They are sorted by total frequency
      :math:`f_1 + \dots + f_d`, ties broken lexicographically in :math:`(f_1, \dots, f_d)` (so
      along the last spatial axis first: ``(0,0), (0,1), (1,0), (0,2), (1,1), ...``).
      Data-independent, orthonormal, exact for ``m = K``.

    Level 2 (``levels=2``, the recursive ``bases_l2`` form of the paper, with the clean index
    formula rather than the official code's channel/atom pairing) keeps the level-1 coefficients
    :math:`C` and gives every input channel its own least-squares atoms
    :math:`A_i = C_{:,i,:}^{+} W_{:,i}` (``m x K``, batched ``pinv`` over ``i``). Then, for each
    atom ``j``, the stack :math:`\{A_i[j]\}_i` (``c_in_g x K``) is compressed to its top-``m1``
    right singular subspace: ``sub_atoms[j]`` spans it and ``sub_coeffs[:, j]`` are the
    projections. ``m1 = sub_atoms`` defaults to ``K``, which keeps the per-channel atoms
    exactly, so level 2 is then never worse than level 1 (the shared atoms are a feasible point of
    the per-channel least squares) and exact for ``m = K``. A smaller ``m1`` trades accuracy for
    fewer parameters (the official Stable Diffusion config uses ``m = 9``, ``m1 = 3``).

    Precision: every singular subspace here (``svd`` atoms, level-2 sub-atoms) comes from a
    ``K x K`` Gram formed in float64 whatever the input dtype. It is tiny, and an fp32 Gram would
    square the condition number and blur directions below ``~3e-4`` of the top singular value.
    So those paths need a device with float64 (not MPS); level-1 ``dct`` runs in the compute dtype.

    Scale: ``W`` is first divided by a power of two that brings its largest magnitude into
    :math:`[1/2, 1)`, and ``coeffs`` multiplied back (the atoms, sub-atoms and sub-coefficients do
    not depend on the scale). Both steps are exact, so on ordinary input nothing changes (the
    kernels are scale-equivariant up to rounding), and no Gram can overflow or underflow:
    the atoms stay optimal for ``W * 1e200`` in float64 or ``W * 1e-30`` in float32. Coefficients
    beyond the largest number of ``W``'s dtype raise ``ValueError`` (with ``check_finite``).

    Differences from the anchors: the official code initialises the atoms by sparse dictionary
    learning, keeps only the sparse codes and discards the dictionary (its atoms are a
    zero-initialised trainable delta). Here the coefficients come from the SVD or DCT subspace,
    which is deterministic and reconstruction-optimal (``svd``) or data-independent (``dct``).

    Args:
        W: conv weight ``(c_out, c_in_g, *kernel)``, real floating, ``3 <= W.ndim <= 5``.
        num_atoms: ``m``, in ``[1, K]``.
        levels: 1 (shared atoms) or 2 (per-channel atoms from sub-atoms).
        sub_atoms: ``m1`` in ``[1, K]``, only with ``levels=2``; default ``K``.
        method: ``"svd"`` or ``"dct"``: how the level-1 atoms are chosen.
        check_finite: check ``W`` for NaN/Inf and ``coeffs`` for overflow of ``W``'s dtype (one
            device sync each); ``False`` skips both.

    Returns:
        :class:`Atoms` ``(coeffs, atoms, sub_coeffs, sub_atoms)`` in ``W``'s dtype and device
        (fp16/bf16 are computed in fp32). Shapes: ``coeffs (c_out, c_in_g, m)``,
        ``atoms (m, *kernel)``, ``sub_coeffs (c_in_g, m, m1)``, ``sub_atoms (m, m1, *kernel)``.

    Complexity: with :math:`N = c_{out} c_{in,g}`, level 1 costs :math:`O(N K^2 + K^3)` for
    ``svd`` (Gram and eigh) or :math:`O(m K)` for ``dct``, plus :math:`O(N K m)` for the
    coefficients. Level 2 adds :math:`O(c_{in,g} c_{out} m (m + K))` for the per-channel
    least squares and :math:`O(m (c_{in,g} K^2 + K^3))` for the sub-atoms.

    Raises:
        TypeError: ``W`` is not a real floating tensor; ``num_atoms``, ``levels`` or
            ``sub_atoms`` is not an int.
        ValueError: ``W.ndim`` not in ``[3, 5]``, ``W`` empty or non-finite; ``num_atoms`` or
            ``sub_atoms`` not in ``[1, K]``; ``levels`` not in ``[1, 2]``; ``sub_atoms`` given
            with ``levels=1``; ``method`` not ``"svd"`` or ``"dct"``; ``coeffs`` overflow
            ``W``'s dtype.

    Example:
        >>> from decomp import atoms
        >>> W = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
        >>> coeffs, shared, _, _ = atoms(W, 4)
        >>> coeffs.shape, shared.shape
        (torch.Size([16, 8, 4]), torch.Size([4, 3, 3]))
        >>> torch.allclose(atoms(W, 9, method="dct").to_weight(), W, atol=1e-5)
        True
        >>> two_level = atoms(W, 4, levels=2, sub_atoms=3)
        >>> two_level.sub_coeffs.shape, two_level.sub_atoms.shape
        (torch.Size([8, 4, 3]), torch.Size([4, 3, 3, 3]))
    """
    check_tensor(W, "W", min_ndim=3, max_ndim=5, check_finite=check_finite)
    kernel = tuple(W.shape[2:])
    kernel_size = math.prod(kernel)
    num_atoms = _check_atom_count(num_atoms, "num_atoms", kernel)
    levels = check_int(levels, "levels", low=1, high=2)
    if sub_atoms is not None:
        if levels != 2:
            raise ValueError(f"sub_atoms is only used with levels=2, got levels={levels}")
        num_sub_atoms = _check_atom_count(sub_atoms, "sub_atoms", kernel)
    else:
        num_sub_atoms = kernel_size
    check_choice(method, "method", ("svd", "dct"))

    weight, scale = unit_scaled(W, range(W.ndim))
    c_out, c_in_g = weight.shape[:2]
    flat = weight.reshape(c_out * c_in_g, kernel_size)
    if method == "svd":
        shared_atoms = _top_right_singular_rows(flat, num_atoms)
    else:
        shared_atoms = _dct_atoms(kernel, num_atoms, dtype=weight.dtype, device=weight.device)
    coeffs = (flat @ shared_atoms.mT).reshape(c_out, c_in_g, num_atoms)

    coeffs_out = (coeffs * scale.reshape(())).to(W.dtype)
    if check_finite:
        check_result_finite(coeffs_out, "the atom coefficients of W", "W")
    shared_atoms_out = shared_atoms.reshape(num_atoms, *kernel).to(W.dtype)
    if levels == 1:
        return Atoms(coeffs_out, shared_atoms_out)

    # Per input channel i: least-squares atoms for the frozen coefficients C[:, i, :]. pinv (SVD
    # based) rather than lstsq: it gives the minimum-norm solution when c_out < m or C[:, i, :] is
    # rank deficient on every device (CUDA lstsq only has the full-rank QR driver).
    per_channel_coeffs = coeffs.permute(1, 0, 2)  # (c_in_g, c_out, m)
    per_channel_weight = weight.reshape(c_out, c_in_g, kernel_size).permute(1, 0, 2)
    channel_atoms = torch.linalg.pinv(per_channel_coeffs) @ per_channel_weight  # (c_in_g, m, K)
    atom_stacks = channel_atoms.permute(1, 0, 2)  # (m, c_in_g, K): atom j across channels
    sub_basis = _top_right_singular_rows(atom_stacks, num_sub_atoms)  # (m, m1, K)
    sub_coeffs = (atom_stacks @ sub_basis.mT).permute(1, 0, 2)  # (c_in_g, m, m1)
    return Atoms(
        coeffs_out,
        shared_atoms_out,
        sub_coeffs.to(W.dtype),
        sub_basis.reshape(num_atoms, num_sub_atoms, *kernel).to(W.dtype),
    )


def _check_atom_count(value: object, name: str, kernel: tuple[int, ...]) -> int:
    kernel_size = math.prod(kernel)
    try:
        return check_rank(value, name, kernel_size)
    except ValueError:
        raise ValueError(
            f"{name} must be in [1, K] = [1, {kernel_size}] for kernel size {kernel}, got {value}"
        ) from None


def _top_right_singular_rows(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` right singular vectors of ``matrix`` (..., n, K) as orthonormal rows (..., k, K).

    Computed as eigenvectors of the float64 Gram; ``eigh`` returns a complete orthonormal basis
    even when ``n < K``, so ``k = K`` always spans the whole space. Each row's largest-magnitude
    entry is positive (:func:`decomp._rsvd.row_signs`).
    """
    matrix64 = matrix.to(_GRAM_DTYPE)
    _, eigenvectors = torch.linalg.eigh(matrix64.mT @ matrix64)  # ascending eigenvalues
    top = eigenvectors[..., -k:].flip(-1).mT
    # The sign LAPACK gives an eigenvector differs between libraries and devices; the
    # coefficients (which adapters keep frozen) follow it, so fix it.
    return (top * row_signs(top)[..., None]).to(matrix.dtype)


def _dct_atoms(
    kernel: tuple[int, ...], num_atoms: int, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The ``num_atoms`` lowest-frequency separable DCT-II kernels, flattened: (num_atoms, K).

    Atom ``f`` is row ``f`` (row-major over the axes) of ``kron(D_1, ..., D_d)``, i.e. the outer
    product of rows ``f_1, ..., f_d`` of the per-axis DCT matrices; only those rows are built, so
    memory is that of the atoms, not the ``K x K`` Kronecker basis (nor a cached matrix per axis).
    """
    frequencies = sorted(
        itertools.product(*(range(size) for size in kernel)), key=lambda f: (sum(f), f)
    )[:num_atoms]
    separable = _dct_rows(kernel[0], torch.tensor([f[0] for f in frequencies]), dtype, device)
    for axis, size in enumerate(kernel[1:], start=1):
        rows = _dct_rows(size, torch.tensor([f[axis] for f in frequencies]), dtype, device)
        # kron's entry order (earlier axes vary slowest) and the same products as torch.kron.
        separable = (separable[:, :, None] * rows[:, None, :]).flatten(1)
    return separable
