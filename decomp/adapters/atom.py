r"""Filter-subspace tuning ("filter atoms"; Chen, Miao, Qiu, ICLR 2025, arXiv 2403.00269).

Every spatial filter of a conv weight is a combination of a few shared spatial atoms,
:math:`W[o, i] = \sum_j \alpha[o, i, j]\, D[j]`. Fine-tuning freezes the coefficients
:math:`\alpha` and trains a zero-initialised change of the atoms, so the layer starts exactly at
its pretrained weight and the update lives in a tiny space (``m * K`` numbers per conv).
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from .. import atoms
from .._checks import check_int, check_optional_int
from ._budget import default_budget
from .base import AdapterParam, option

_DEFAULT_NUM_ATOMS = 9
_DEFAULT_SUB_ATOMS = 3
_DEFAULT_BLOCK = 4


class _FilterLayout(NamedTuple):
    """How a weight is seen as filters, and the resolved budget."""

    c_out: int
    c_in_g: int
    kernel: tuple[int, ...]
    block: int | None  # the tile size of a linear/1x1 conv weight's block view; None otherwise
    num_atoms: int
    sub_atoms: int | None  # m1 at levels=2, None at levels=1

    @property
    def kernel_size(self) -> int:
        return math.prod(self.kernel)


class AtomParam(AdapterParam):
    r"""Filter-atom adapter: a trainable change of the atoms under frozen atom coefficients.

    A conv weight :math:`W` of shape ``(c_out, c_in_g, *kernel)`` (``c_in_g = c_in / groups``,
    :math:`K = \prod \text{kernel}`) is decomposed once by :func:`decomp.atoms` (SVD subspace)
    into coefficients :math:`\alpha` ``(c_out, c_in_g, m)``, frozen as a buffer. The update is

    .. math:: \Delta W[o, i] = \sum_{j<m} \alpha[o, i, j]\, \Delta D[j], \qquad W' = W + \Delta W,

    with :math:`\Delta D` ``(m, *kernel)`` trainable and zero-initialised: **the layer is exactly
    the pretrained one at init**. Trainable parameters: :math:`mK` (81 for ``m = 9`` on a 3x3 conv).

    ``levels=2`` is the recursive form (the paper's ``bases_l2``, clean index formula): every input
    channel ``c`` gets its own atom change built from ``m1`` sub-atoms per atom,

    .. math::
        \Delta D[c, j] = \sum_{a<m_1} \beta[c, j, a]\, D_1[j, a], \qquad
        \Delta W[o, c] = \sum_{j<m} \alpha[o, c, j]\, \Delta D[c, j],

    with :math:`D_1` ``(m, m1, *kernel)`` zero-initialised and :math:`\beta` ``(c_in_g, m, m1)``
    trainable, initialised from :func:`decomp.atoms` level 2 (the per-channel sub-atom coefficients
    of the pretrained weight; deterministic and of unit scale, rather than the official code's
    Kaiming-normal draw). Trainable parameters: :math:`m\, m_1 (K + c_{in,g})`. Identity at init.

    Linear weights ``(d_out, d_in)`` and pointwise convs (every kernel size 1: the weight is the
    matrix ``(d_out, d_in)``) use the block view: cut into ``block x block`` tiles, tile ``(o, i)`` is the filter ``W[o b:(o+1) b, i b:(i+1) b]``, so ``c_out = d_out / b``,
    ``c_in_g = d_in / b`` and the kernel is ``(b, b)``. ``block=None`` takes the largest
    ``b <= 4`` that divides both dims (``b = 1`` when they are coprime: then :math:`K = 1`,
    ``m = 1`` and :math:`\Delta W = \delta \cdot \alpha`, one trainable scalar times the sign-
    aligned weight); an explicit ``block`` must divide both dims. ``block`` only describes the
    block view: conv weights with a spatial kernel are already filters and ignore it, so one
    ``AtomParam`` config can be applied to a whole network. (A pointwise conv taken as its own
    1x1 filters would have scalar atoms, :math:`K = 1`: one trainable number per layer.)

    Defaults: ``num_atoms=None`` is ``min(9, K)`` and ``sub_atoms=None`` is ``min(3, K)``, clamped
    so that ``AtomParam()`` works on any layer, and lowered further (``m`` first, then a defaulted
    ``m1``) until the trainable count is at most the weight's size (a 4x4 linear, one 4x4 tile:
    ``m = 1``, 16 numbers, not 144); ``ValueError`` where even ``m = m1 = 1`` trains more. An
    explicit value is kept, and one above ``K`` raises.

    Differences from the official code (weichennone/convnet_finetune): the coefficients come from
    the SVD atom subspace (deterministic, least-squares optimal) instead of sparse dictionary
    learning; level 2 pairs :math:`\beta[c, j, \cdot]` with atom ``j``'s sub-atoms (the official
    ``repeat_interleave`` chain pairs channel ``c``, atom ``j`` with sub-atom row
    ``(c m + j) // c_in``); linear layers use ``block x block`` filters with ``m`` atoms
    (:math:`m b^2` parameters), not ``m b^2`` atoms, and run (the official ``DCFLinear`` calls the
    non-existent ``F.Linear``). A zero weight gives zero coefficients and hence a frozen update.

    Args:
        num_atoms: ``m`` in ``[1, K]``; default ``min(9, K)``, lowered to fit the weight (above).
        levels: 1 (shared atoms) or 2 (per-channel atoms from sub-atoms).
        sub_atoms: ``m1`` in ``[1, K]``, only with ``levels=2``; default ``min(3, K)``.
        block: the tile size ``b >= 1`` of the block view (linear and 1x1 conv weights); must divide ``d_out`` and
            ``d_in``; default: the largest ``b <= 4`` dividing both.

    Raises:
        TypeError: an argument is not an int (any ``numbers.Integral`` but ``bool``, stored as a
            Python ``int``) or ``None``.
        ValueError: ``num_atoms``, ``sub_atoms`` or ``block`` below 1; ``levels`` not in
            ``[1, 2]``; ``sub_atoms`` with ``levels=1``; on build,
            ``num_atoms`` or ``sub_atoms`` not in ``[1, K]``, or ``block`` not dividing both dims
            of a linear weight.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> from decomp.adapters import AtomParam
        >>> conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        >>> x = torch.randn(2, 8, 10, 10)
        >>> before = conv(x)
        >>> _ = parametrize.register_parametrization(conv, "weight", AtomParam(num_atoms=9))
        >>> torch.equal(conv(x), before), conv.parametrizations.weight[0].num_trainable()
        (True, 81)
        >>> AtomParam.trainable_count((16, 8, 3, 3), num_atoms=4, levels=2, sub_atoms=3)
        204
    """

    # The coefficients on the weight's top right singular directions (signs fixed by decomp.atoms).
    rebuilt_buffers: ClassVar[tuple[str, ...]] = ("coeffs",)

    num_atoms: int | None = option(None, check_optional_int, low=1)
    levels: int = option(1, check_int, low=1, high=2)
    sub_atoms: int | None = option(None, check_optional_int, low=1)
    block: int | None = option(None, check_optional_int, low=1)

    def _check_options(self) -> None:
        if self.sub_atoms is not None and self.levels != 2:
            raise ValueError(f"sub_atoms is only used with levels=2, got levels={self.levels}")

    # ------------------------------------------------------------------ layout
    def _layout(self, shape: tuple[int, ...]) -> _FilterLayout:
        num_atoms, levels, sub_atoms, block = self.num_atoms, self.levels, self.sub_atoms, self.block
        if math.prod(shape[2:]) == 1:  # a linear or pointwise (1x1) conv weight: the block view
            d_out, d_in = shape[0], shape[1]
            if block is None:
                candidates = range(1, _DEFAULT_BLOCK + 1)
                block = max(b for b in candidates if d_out % b == 0 and d_in % b == 0)
            elif d_out % block or d_in % block:
                raise ValueError(
                    "block must divide both dims of the linear (or 1x1 conv) weight "
                    f"(d_out={d_out}, d_in={d_in}), "
                    f"got block={block}"
                )
            c_out, c_in_g, kernel = d_out // block, d_in // block, (block, block)
        else:
            c_out, c_in_g, kernel, block = shape[0], shape[1], tuple(shape[2:]), None
        if num_atoms is not None:
            resolved_atoms = _atom_count(num_atoms, "num_atoms", _DEFAULT_NUM_ATOMS, kernel)
            resolved_sub = None
            if levels == 2:
                resolved_sub = _atom_count(sub_atoms, "sub_atoms", _DEFAULT_SUB_ATOMS, kernel)
        else:
            resolved_atoms, resolved_sub = self._default_atoms(shape, kernel, c_in_g, levels, sub_atoms)
        return _FilterLayout(c_out, c_in_g, kernel, block, resolved_atoms, resolved_sub)

    @classmethod
    def _default_atoms(
        cls,
        shape: tuple[int, ...],
        kernel: tuple[int, ...],
        c_in_g: int,
        levels: int,
        sub_atoms: int | None,
    ) -> tuple[int, int | None]:
        """``(m, m1)`` for ``num_atoms=None``: the largest ``m`` (then ``m1``, if it is defaulted
        too) whose count fits the weight's size."""
        kernel_size = math.prod(kernel)
        atom_counts = range(min(_DEFAULT_NUM_ATOMS, kernel_size), 0, -1)
        if levels == 1:
            return default_budget(
                cls.__name__, "num_atoms", shape, atom_counts, lambda m: m * kernel_size
            ), None
        if sub_atoms is not None:
            sub_counts: range | list[int] = [_atom_count(sub_atoms, "sub_atoms", _DEFAULT_SUB_ATOMS, kernel)]
        else:
            sub_counts = range(min(_DEFAULT_SUB_ATOMS, kernel_size), 0, -1)
        pairs = [(m, m1) for m in atom_counts for m1 in sub_counts]
        return default_budget(
            cls.__name__,
            "num_atoms",
            shape,
            pairs,
            lambda pair: pair[0] * pair[1] * (kernel_size + c_in_g),
            describe=lambda pair: f"num_atoms={pair[0]} with sub_atoms={pair[1]}",
        )

    def _count(self, shape: tuple[int, ...]) -> int:
        r""":math:`mK` at level 1, :math:`m\, m_1 (K + c_{in,g})` at level 2 (linear: block view).

        Example:
            >>> from decomp.adapters import AtomParam
            >>> AtomParam.trainable_count((64, 32, 3, 3)), AtomParam.trainable_count((12, 8))
            (81, 96)
            >>> AtomParam.trainable_count((12, 8), num_atoms=9)  # 9 atoms of 4x4: more than 12 * 8
            144
        """
        if not 2 <= len(shape) <= 5:
            raise ValueError(f"shape must have 2 (linear) to 5 (conv3d) dims, got {tuple(shape)}")
        layout = self._layout(shape)
        if layout.sub_atoms is None:
            return layout.num_atoms * layout.kernel_size
        return layout.num_atoms * layout.sub_atoms * (layout.kernel_size + layout.c_in_g)

    # ------------------------------------------------------------------ build / delta
    def _as_filters(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as filters ``(c_out, c_in_g, *kernel)`` (linear, 1x1 conv: its block view)."""
        layout = self.filter_layout
        if layout.block is None:
            return weight
        tiles = weight.reshape(layout.c_out, layout.block, layout.c_in_g, layout.block)
        return tiles.permute(0, 2, 1, 3)

    def _from_filters(self, filters: torch.Tensor) -> torch.Tensor:
        if self.filter_layout.block is None:
            return filters.reshape(self.weight_shape)
        return filters.permute(0, 2, 1, 3).reshape(self.weight_shape)

    def _build(self, weight: torch.Tensor) -> None:
        self.filter_layout = layout = self._layout(tuple(weight.shape))
        filters = self._as_filters(weight)
        decomposition = atoms(
            filters,
            layout.num_atoms,
            levels=self.levels,
            sub_atoms=layout.sub_atoms,
            check_finite=False,
        )
        self.register_buffer("coeffs", decomposition.coeffs.contiguous())
        like_weight = dict(dtype=weight.dtype, device=weight.device)
        if self.levels == 1:
            atom_delta = torch.zeros(layout.num_atoms, *layout.kernel, **like_weight)
            self.atom_delta = nn.Parameter(atom_delta)
        else:
            self.sub_atom_delta = nn.Parameter(
                torch.zeros(layout.num_atoms, layout.sub_atoms, *layout.kernel, **like_weight)
            )
            # .contiguous() keeps the transposed strides of its size-1 dims, which DDP's gradient
            # buckets flag; a row-major copy is what FSDP2 and DDP both lay out as expected.
            self.sub_coeffs = nn.Parameter(
                decomposition.sub_coeffs.clone(memory_format=torch.contiguous_format)
            )

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        coeffs = self.coeffs.to(weight.dtype)
        if self.levels == 1:
            atom_delta = self.atom_delta.to(weight.dtype).flatten(1)
            flat_update = torch.einsum("oij,jk->oik", coeffs, atom_delta)
        else:
            sub_atom_delta = self.sub_atom_delta.to(weight.dtype).flatten(2)
            sub_coeffs = self.sub_coeffs.to(weight.dtype)
            channel_atoms = torch.einsum("cja,jak->cjk", sub_coeffs, sub_atom_delta)
            flat_update = torch.einsum("ocj,cjk->ock", coeffs, channel_atoms)
        layout = self.filter_layout
        return self._from_filters(flat_update.reshape(layout.c_out, layout.c_in_g, *layout.kernel))


def _atom_count(value: int | None, name: str, default: int, kernel: tuple[int, ...]) -> int:
    kernel_size = math.prod(kernel)
    if value is None:
        return min(default, kernel_size)
    if value > kernel_size:
        raise ValueError(
            f"{name} must be in [1, K] = [1, {kernel_size}] for kernel size {kernel}, got {value}"
        )
    return value
