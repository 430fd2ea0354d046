r"""Filter-subspace tuning ("filter atoms"; Chen, Miao, Qiu, ICLR 2025, arXiv 2403.00269).

Every spatial filter of a conv weight is a combination of a few shared spatial atoms,
:math:`W[o, i] = \sum_j \alpha[o, i, j]\, D[j]`. Fine-tuning freezes the coefficients
:math:`\alpha` and trains a zero-initialised change of the atoms, so the layer starts exactly at
its pretrained weight and the update lives in a tiny space (``m * K`` numbers per conv).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .. import atoms
from .._checks import check_int, check_optional_int, check_real
from ._budget import default_budget
from .base import AdapterParam, option

_DEFAULT_NUM_ATOMS = 9
_DEFAULT_SUB_ATOMS = 3
_DEFAULT_BLOCK = 4


class _FilterLayout(NamedTuple):
    """How a weight is seen as filters, and the resolved budget."""

    c_out: int  # filter rows: output channels, or output channel blocks (tiles)
    c_in_g: int  # filter columns: input channels per group, or their blocks
    kernel: tuple[int, ...]  # one filter's shape: (s_out, s_in, *spatial) for tiles, else spatial
    tile: tuple[int, int] | None  # (s_out, s_in) channels per filter; None: one channel pair
    num_atoms: int  # the total number of atoms M
    sub_atoms: int | None  # m1 at levels=2, None at levels=1

    @property
    def kernel_size(self) -> int:
        return math.prod(self.kernel)

    @property
    def num_filters(self) -> int:
        return self.c_out * self.c_in_g


class AtomParam(AdapterParam):
    r"""Filter-atom adapter: a trainable change of the atoms under frozen atom coefficients.

    A conv weight :math:`W` of shape ``(c_out, c_in_g, *kernel)`` (``c_in_g = c_in / groups``,
    :math:`K = \prod \text{kernel}`) is decomposed once by :func:`decomp.atoms` (SVD subspace)
    into coefficients :math:`\alpha` ``(c_out, c_in_g, m)``, frozen as a buffer. The update is

    .. math:: \Delta W[o, i] = \sum_{j<m} \alpha[o, i, j]\, \Delta D[j], \qquad W' = W + \Delta W,

    with :math:`\Delta D` ``(m, *kernel)`` trainable and zero-initialised: **the layer is exactly
    the pretrained one at init**. Trainable parameters: :math:`mK` (81 for ``m = 9`` on a 3x3
    conv). This is the official ``bases_l1`` mode.

    **Overcomplete** (``m > K``, as the official sparse dictionary is on 1x1 convs, so one
    ``num_atoms`` works on a whole network): the filters :math:`n = (o, i)`, in row-major order,
    are cut into :math:`g = \lceil m / K \rceil` contiguous, near-equal groups
    (:math:`n \mapsto \lfloor n g / N \rfloor`, :math:`N = c_{out} c_{in,g}`), and group
    :math:`q` gets its own atoms :math:`j \in [qK, \min((q+1)K, m))`, with the SVD coefficients
    of its filters on the top :math:`m_q` singular directions (:math:`m_q` its atom count) and
    zero coefficients on every other group's atoms. A linear coefficient map
    :math:`\alpha = M C` gives nothing beyond :math:`m = K` (its column space stays that of the
    filter matrix :math:`M`); the official code's sparse codes get more by letting different
    filters use different atoms, which the groups do deterministically. ``ValueError`` where a
    group would be empty (:math:`g > N`).

    ``levels=2`` is the recursive form (the official ``bases_l2``, clean index formula): every
    input channel ``c`` gets its own atom change built from ``m1`` sub-atoms per atom,

    .. math::
        \Delta D[c, j] = \sum_{a<m_1} \beta[c, j, a]\, D_1[j, a], \qquad
        \Delta W[o, c] = \sum_{j<m} \alpha[o, c, j]\, \Delta D[c, j],

    with :math:`D_1` ``(m, m1, *kernel)`` zero-initialised and :math:`\beta` ``(c_in_g, m, m1)``
    trainable, drawn as the official ``coeff_of_bases``: ``kaiming_normal_(a=sqrt(5))`` over its
    :math:`c_{in,g}\, m\, m_1` entries, i.e. :math:`\mathcal N(0, 1 / (3\, c_{in,g}\, m\, m_1))`
    (global torch RNG, as ``nn.Module`` inits), and the level-2 change is multiplied by
    :math:`\rho = 1 / (\sqrt{m_1}\, \mathrm{std}(\beta)) = \sqrt{3\, c_{in,g}\, m}`
    (``scale=None``; the value in use is ``applied_scale``): a first Adam step of :math:`D_1`
    (:math:`\pm\eta` per entry) then
    changes each per-channel atom by about :math:`\eta`, as level 1's step changes the shared
    atoms, so one learning rate suits both levels (without :math:`\rho`, the official code's
    level-2 steps are about 30 times smaller on a 32-channel conv). Trainable parameters:
    :math:`m\, m_1 (K + c_{in,g})`. Identity at init.

    **One learning rate.** Level 1 needs no scale: a first Adam step changes every filter by
    about :math:`\eta \sqrt{K}` of its norm (its coefficients are its projections), about the
    relative step of LoRA (:math:`\alpha = r`; measured 3e-3 vs LoRA r=8's 2.3e-3 to 4.5e-3 at
    lr 1e-3 on the adapters benchmark's CNN).

    **Channel blocks** (``channel_block=kc > 1``, the official ``kc`` of the ``coeff_l1`` and
    ``coeff_bases_l1`` modes; conv weights with a spatial kernel): a ``kc x kc`` block of
    (output, input) channels is one filter of shape ``(kc, kc, *kernel)``, so
    :math:`K = kc^2 \prod \text{kernel}`, the filters are ``(c_out / kc, c_in_g / kc)``, and the
    dictionary has ``num_atoms * kc**2`` atoms (the official ``m * kc^2``). As in the official
    code, a side whose channel count ``kc`` does not divide uses 1 on that side (so a block is
    ``(s_out, s_in)`` channels and the dictionary ``num_atoms * s_out * s_in`` atoms).
    ``levels=1`` is ``coeff_l1``; ``levels=2`` is ``coeff_bases_l1`` with the clean formula
    above on the blocks (per input-channel block atoms). Not reproduced: the official re-view of
    the block coefficients as per-filter ones in ``bases_l1``/``bases_l2`` with ``kc > 1`` (the
    spec's "semantic mismatch"; here ``channel_block=1`` is those modes) and
    ``coeff_bases_l1``'s ``bases_of_coeff``, allocated, Kaiming-initialised and never used by its
    forward.

    Linear weights ``(d_out, d_in)`` and pointwise convs (every kernel size 1: the weight is the
    matrix ``(d_out, d_in)``) use the block view: cut into ``block x block`` tiles, tile
    ``(o, i)`` is the filter ``W[o b:(o+1) b, i b:(i+1) b]``, so ``c_out = d_out / b``,
    ``c_in_g = d_in / b`` and the kernel is ``(b, b)``; here ``num_atoms`` is the number of atoms
    itself. ``block=None`` takes the largest ``b <= 4`` that divides both dims (``b = 1`` when
    they are coprime: then :math:`K = 1` and ``m = 1`` is :math:`\Delta W = \delta \cdot \alpha`,
    one trainable scalar times the sign-aligned weight, and a larger ``m`` gives one scalar per
    group of weights); an explicit ``block`` must divide both dims. ``block`` only describes the
    block view and ``channel_block`` only spatial convs, so one ``AtomParam`` config can be
    applied to a whole network.

    Defaults: ``num_atoms=None`` is ``min(9, K)`` (channel blocks: ``min(9 s_out s_in, K)``
    atoms) and ``sub_atoms=None`` is ``min(3, K)``, lowered further (``m`` first, then a
    defaulted ``m1``) until the trainable count is at most the weight's size (a 4x4 linear, one
    4x4 tile: ``m = 1``, 16 numbers, not 144); ``ValueError`` where even ``m = m1 = 1`` trains
    more. An explicit value is kept; ``sub_atoms`` above ``K`` raises.

    Differences from the official code (weichennone/convnet_finetune): the coefficients come from
    the SVD atom subspace (deterministic, least-squares optimal) instead of sparse dictionary
    learning, and overcomplete atoms from the filter groups above; level 2 pairs
    :math:`\beta[c, j, \cdot]` with atom ``j``'s sub-atoms (the official ``repeat_interleave``
    chain pairs channel ``c``, atom ``j`` with sub-atom row ``(c m + j) // c_in``); linear layers
    use ``block x block`` filters with ``m`` atoms (:math:`m b^2` parameters), not ``m b^2``
    atoms, and run (the official ``DCFLinear`` calls the non-existent ``F.Linear``). A zero
    weight gives zero coefficients and hence a frozen update.

    Args:
        num_atoms: ``m >= 1`` (above ``K``: overcomplete); default ``min(9, K)``, lowered to fit
            the weight (above).
        levels: 1 (shared atoms) or 2 (per-channel atoms from sub-atoms).
        sub_atoms: ``m1`` in ``[1, K]``, only with ``levels=2``; default ``min(3, K)``.
        block: the tile size ``b >= 1`` of the block view (linear and 1x1 conv weights); must
            divide ``d_out`` and ``d_in``; default: the largest ``b <= 4`` dividing both.
        channel_block: ``kc >= 1`` channels per side of a filter of a spatial conv (default 1:
            one channel pair per filter).
        scale: :math:`\rho`, a finite real > 0 multiplying the update, or ``None`` (default):
            the one-learning-rate rule, 1 at level 1 and :math:`\sqrt{3\, c_{in,g}\, m}` at
            level 2 (above). ``scale=1.0`` is the official code's unscaled update, and what adapter
            files and peft configs written before this option existed trained (they load with
            it). The value in use is the attribute ``applied_scale`` of the built adapter.

    Raises:
        TypeError: an argument is not an int (any ``numbers.Integral`` but ``bool``, stored as a
            Python ``int``) or ``None``; ``scale`` not a real number or ``None``.
        ValueError: ``num_atoms``, ``sub_atoms``, ``block`` or ``channel_block`` below 1;
            ``scale`` not finite or :math:`\le 0`;
            ``levels`` not in ``[1, 2]``; ``sub_atoms`` with ``levels=1``; on build,
            ``sub_atoms`` not in ``[1, K]``, more atom groups than filters, or ``block`` not
            dividing both dims of a linear weight.

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
        >>> AtomParam.trainable_count((16, 8, 1, 1), num_atoms=20)  # 20 atoms of 4x4 tiles
        320
        >>> AtomParam.trainable_count((16, 8, 3, 3), num_atoms=9, channel_block=4)  # coeff_l1
        20736
    """

    # The coefficients on the weight's top right singular directions (signs fixed by decomp.atoms).
    rebuilt_buffers: ClassVar[tuple[str, ...]] = ("coeffs",)
    # files written before `scale` existed trained the unscaled update
    saved_defaults: ClassVar[Mapping[str, Any]] = {"scale": 1.0}

    num_atoms: int | None = option(None, check_optional_int, low=1)
    levels: int = option(1, check_int, low=1, high=2)
    sub_atoms: int | None = option(None, check_optional_int, low=1)
    block: int | None = option(None, check_optional_int, low=1)
    channel_block: int = option(1, check_int, low=1)
    # None: the one-learning-rate rule, resolved per layer in _build
    scale: float | None = option(None, check_real, keyword_only=True, optional=True, low=0.0)

    def _check_options(self) -> None:
        if self.sub_atoms is not None and self.levels != 2:
            raise ValueError(f"sub_atoms is only used with levels=2, got levels={self.levels}")

    # ------------------------------------------------------------------ layout
    def _layout(self, shape: tuple[int, ...]) -> _FilterLayout:
        levels, sub_atoms = self.levels, self.sub_atoms
        atoms_per_filter = 1  # the dictionary has num_atoms * s_out * s_in atoms (channel blocks)
        if math.prod(shape[2:]) == 1:  # a linear or pointwise (1x1) conv weight: the block view
            block = self._linear_block(shape[0], shape[1])
            c_out, c_in_g, kernel = shape[0] // block, shape[1] // block, (block, block)
            tile = (block, block) if block > 1 else None
        else:
            c_out, c_in_g, spatial = shape[0], shape[1], tuple(shape[2:])
            # As the official code: a side kc does not divide keeps one channel per block.
            s_out = self.channel_block if c_out % self.channel_block == 0 else 1
            s_in = self.channel_block if c_in_g % self.channel_block == 0 else 1
            tile = None if s_out == s_in == 1 else (s_out, s_in)
            kernel = spatial if tile is None else (s_out, s_in, *spatial)
            c_out, c_in_g, atoms_per_filter = c_out // s_out, c_in_g // s_in, s_out * s_in
        kernel_size = math.prod(kernel)
        if self.num_atoms is not None:
            resolved_atoms = self.num_atoms * atoms_per_filter
            resolved_sub = None
            if levels == 2:
                resolved_sub = _atom_count(sub_atoms, "sub_atoms", _DEFAULT_SUB_ATOMS, kernel)
        else:
            resolved_atoms, resolved_sub = self._default_atoms(
                shape, kernel, c_in_g, levels, sub_atoms, _DEFAULT_NUM_ATOMS * atoms_per_filter
            )
        groups = -(-resolved_atoms // kernel_size)
        if groups > c_out * c_in_g:
            raise ValueError(
                f"num_atoms={self.num_atoms} makes {resolved_atoms} atoms of {kernel_size} entries: "
                f"{groups} groups of filters, more than the {c_out * c_in_g} filters of a weight "
                f"of shape {tuple(shape)}"
            )
        return _FilterLayout(c_out, c_in_g, kernel, tile, resolved_atoms, resolved_sub)

    def _linear_block(self, d_out: int, d_in: int) -> int:
        if self.block is None:
            return max(b for b in range(1, _DEFAULT_BLOCK + 1) if d_out % b == 0 and d_in % b == 0)
        if d_out % self.block or d_in % self.block:
            raise ValueError(
                "block must divide both dims of the linear (or 1x1 conv) weight "
                f"(d_out={d_out}, d_in={d_in}), got block={self.block}"
            )
        return self.block

    @classmethod
    def _default_atoms(
        cls,
        shape: tuple[int, ...],
        kernel: tuple[int, ...],
        c_in_g: int,
        levels: int,
        sub_atoms: int | None,
        largest: int,
    ) -> tuple[int, int | None]:
        """``(m, m1)`` for ``num_atoms=None``: the largest ``m <= min(largest, K)`` (then ``m1``,
        if it is defaulted too) whose count fits the weight's size."""
        kernel_size = math.prod(kernel)
        atom_counts = range(min(largest, kernel_size), 0, -1)
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
        r""":math:`mK` at level 1, :math:`m\, m_1 (K + c_{in,g})` at level 2 (linear: block view;
        channel blocks: :math:`m` the dictionary's atom count, :math:`K` and :math:`c_{in,g}` the
        block's).

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
        """The weight as filters ``(c_out, c_in_g, *kernel)`` (tiles: the block view)."""
        layout = self.filter_layout
        if layout.tile is None:
            return weight.reshape(layout.c_out, layout.c_in_g, *layout.kernel)
        s_out, s_in = layout.tile
        spatial = layout.kernel[2:]
        tiles = weight.reshape(layout.c_out, s_out, layout.c_in_g, s_in, *spatial)
        return tiles.transpose(1, 2)

    def _from_filters(self, filters: torch.Tensor) -> torch.Tensor:
        if self.filter_layout.tile is None:
            return filters.reshape(self.weight_shape)
        return filters.transpose(1, 2).reshape(self.weight_shape)

    def _build(self, weight: torch.Tensor) -> None:
        self.filter_layout = layout = self._layout(tuple(weight.shape))
        # The atoms are flat vectors: atoms() sees each filter as a 1-D kernel of K entries (the
        # same matrix (N, K) and Gram as with its own shape, which may have up to 7 dims).
        filters = self._as_filters(weight).reshape(layout.c_out, layout.c_in_g, layout.kernel_size)
        self.register_buffer("coeffs", _coefficients(filters, layout.num_atoms).contiguous())
        like_weight = dict(dtype=weight.dtype, device=weight.device)
        self.applied_scale = self._rule_scale(layout) if self.scale is None else self.scale
        if self.levels == 1:
            atom_delta = torch.zeros(layout.num_atoms, *layout.kernel, **like_weight)
            self.atom_delta = nn.Parameter(atom_delta)
            return
        self.sub_atom_delta = nn.Parameter(
            torch.zeros(layout.num_atoms, layout.sub_atoms, *layout.kernel, **like_weight)
        )
        # The official coeff_of_bases: kaiming_normal_(a=sqrt(5)) on a (1, n, 1, 1) tensor of its
        # n entries, i.e. N(0, 1 / (3 n)); drawn in float32 so every dtype gets the same values.
        sub_coeffs = torch.empty(1, layout.c_in_g * layout.num_atoms * layout.sub_atoms, 1, 1)
        nn.init.kaiming_normal_(sub_coeffs, a=math.sqrt(5))
        self.sub_coeffs = nn.Parameter(
            sub_coeffs.reshape(layout.c_in_g, layout.num_atoms, layout.sub_atoms).to(**like_weight)
        )
    def _rule_scale(self, layout: _FilterLayout) -> float:
        """The one-learning-rate rule: 1 at level 1; at level 2 ``1 / (sqrt(m1) std(beta))``, so
        that a first Adam step of D1 (+-lr on every entry) changes each per-channel atom by about
        lr, as level 1's step changes the shared atoms."""
        return 1.0 if self.levels == 1 else math.sqrt(3 * layout.c_in_g * layout.num_atoms)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        coeffs = self.coeffs.to(weight.dtype)
        if self.levels == 1:  # shared atoms (m, K)
            atom_delta = self.atom_delta.to(weight.dtype).flatten(1)
            combine = "oij,jk->oik"
        else:  # per input channel atoms (c_in_g, m, K)
            sub_atom_delta = self.sub_atom_delta.to(weight.dtype).flatten(2)
            sub_coeffs = self.sub_coeffs.to(weight.dtype)
            atom_delta = torch.einsum("cja,jak->cjk", sub_coeffs, sub_atom_delta)
            combine = "ocj,cjk->ock"
        if self.applied_scale != 1.0:
            atom_delta = atom_delta * self.applied_scale
        flat_update = torch.einsum(combine, coeffs, atom_delta)
        layout = self.filter_layout
        return self._from_filters(flat_update.reshape(layout.c_out, layout.c_in_g, *layout.kernel))


def _coefficients(filters: torch.Tensor, num_atoms: int) -> torch.Tensor:
    r"""The frozen coefficients ``(c_out, c_in_g, m)`` of ``filters`` ``(c_out, c_in_g, K)``.

    ``m <= K``: :func:`decomp.atoms`'s, on the top ``m`` right singular directions. ``m > K``
    (overcomplete): the :math:`N = c_{out} c_{in,g}` filters in row-major order are cut into
    :math:`g = \lceil m / K \rceil` groups (:math:`n \mapsto \lfloor n g / N \rfloor`); atom
    :math:`j` belongs to group :math:`\lfloor j / K \rfloor` and carries, for that group's filters
    only, their coefficient on singular direction :math:`j \bmod K`.
    """
    c_out, c_in_g, kernel_size = filters.shape
    if num_atoms <= kernel_size:
        return atoms(filters, num_atoms, check_finite=False).coeffs
    complete = atoms(filters, kernel_size, check_finite=False).coeffs.reshape(-1, kernel_size)
    groups = -(-num_atoms // kernel_size)
    filter_group = torch.arange(complete.shape[0], device=filters.device) * groups // complete.shape[0]
    atom = torch.arange(num_atoms, device=filters.device)
    in_group = filter_group[:, None] == (atom // kernel_size)[None, :]
    grouped = complete[:, atom % kernel_size] * in_group
    return grouped.reshape(c_out, c_in_g, num_atoms)


def _atom_count(value: int | None, name: str, default: int, kernel: tuple[int, ...]) -> int:
    kernel_size = math.prod(kernel)
    if value is None:
        return min(default, kernel_size)
    if value > kernel_size:
        raise ValueError(
            f"{name} must be in [1, K] = [1, {kernel_size}] for kernel size {kernel}, got {value}"
        )
    return value
