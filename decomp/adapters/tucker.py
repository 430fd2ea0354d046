r"""FLoRA: an N-D Tucker update :math:`\Delta W = s\, G \times_0 U_0 \times_1 U_1 \cdots`.

FLoRA (Si et al., ICLR 2025, arXiv 2405.14739) replaces LoRA's :math:`B A` by a Tucker product
whose core :math:`G` is zero at init, so the adapted layer starts exactly at the pretrained one.
On a linear weight this is the official 2-D code's :math:`s\, B E A`; on a conv kernel the core
keeps the kernel's own modes instead of flattening them into a matrix.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .. import Tucker, tucker
from .._checks import check_choice, check_optional_int, check_real
from .base import AdapterParam, option

_INITS = ("tucker", "random")
# the official code draws both factors from N(0, 0.02) (Subspace-Tuning loralib layers_flora.py)
OFFICIAL_FACTOR_STD = 0.02


def _check_std(value: object, name: str) -> float:
    std = check_real(value, name)
    if std <= 0:
        raise ValueError(f"{name} must be > 0, got {std}")
    return std


class TuckerParam(AdapterParam):
    r"""FLoRA: :math:`W' = W + s\, G \times_0 U_0 \times_1 U_1 \times_2 U_2 \cdots` (N-D Tucker).

    For a weight of shape :math:`(d_0, d_1, k_1, \dots, k_n)` (linear: :math:`(d_{out}, d_{in})`;
    conv: :math:`(c_{out}, c_{in}/g, *\mathrm{kernel})`) the update is

    .. math::

        \Delta W = s\, G \times_0 U_0 \times_1 U_1 \times_2 U_2 \cdots \times_{n+1} U_{n+1},
        \qquad U_0 \in \mathbb{R}^{d_0 \times r},\ U_1 \in \mathbb{R}^{d_1 \times r},\
        U_{j+1} \in \mathbb{R}^{k_j \times r_s},

    with core :math:`G \in \mathbb{R}^{r \times r \times r_s \times \cdots}`. On a linear weight
    this is :math:`s\, B E A` with :math:`B = U_0`, :math:`E = G`, :math:`A = U_1^\top`.

    * **Spatial modes** (conv only): ``spatial_rank=None`` (default) keeps them full: no spatial
      factor, the core is :math:`(r, r, k_1, \dots, k_n)` -- a Tucker-2 over the channels with a
      full spatial core, as LyCORIS' ``use_tucker``. A kernel is at most a few taps per mode,
      so compressing it saves little and loses the kernel's spatial structure. An int
      ``spatial_rank`` gives every spatial mode a factor :math:`U_{j+1}` (the paper's full N-D
      Tucker) with rank :math:`\min(r_s, k_j)` (a default-free choice: a 1x1 mode has rank 1).
    * **Init.** The core :math:`G` is zero, so :math:`\Delta W = 0` and the layer's output at
      init is the pretrained output, exactly. The factors are trainable and start at either
      ``init="tucker"`` (default): the orthonormal factors of a truncated HOSVD of :math:`W`
      (:func:`decomp.tucker`), so the update starts in :math:`W`'s dominant subspaces and a core
      step of size :math:`\eta` moves :math:`W` by :math:`O(s\eta)`; or ``init="random"``: the
      official code's :math:`\mathcal{N}(0, 0.02^2)` entries. With the official init the factors
      get no gradient until :math:`G \ne 0` and a core step moves :math:`W` by only
      :math:`O(0.02^2 s \eta)`, which is why the official code pairs it with a large scale.
    * **Scale** :math:`s` = ``scale``; the official code uses :math:`s = \alpha / r` (pass
      ``scale=alpha / rank`` to reproduce it). ``scale=None`` (default) is the one-learning-rate
      rule

      .. math::

          s = \frac{1}{\prod_j c_j} \sqrt{\frac{d_0}{3\, r \prod_j \rho_j}},

      :math:`\rho_j` the core's spatial sizes and :math:`c_j` the factors' column norms
      (1 for ``"tucker"``, :math:`\mathrm{std}\sqrt{d_j}` expected for ``"random"``): the first
      Adam step moves every core entry by :math:`\pm\eta`, so it changes :math:`W` by
      :math:`s\,\eta\, r \sqrt{\prod_j \rho_j} \prod_j c_j` in norm, and LoRA's
      (:math:`\alpha = r`, Kaiming-uniform :math:`A`, :math:`B = 0`) changes it by
      :math:`\eta\sqrt{d_0 r / 3}`. With the fixed :math:`s = 1` of before (issue 12) the first
      step was 0.2 to 2.6 times LoRA's, by layer shape. The value in use is the attribute
      ``applied_scale`` of the built adapter.

    Trainable parameters (closed form, :meth:`trainable_count`):

    .. math::

        r^2 \prod_j \rho_j + r (d_0 + d_1) + \sum_{j \text{ factored}} k_j \rho_j,
        \qquad \rho_j = \begin{cases} k_j & \texttt{spatial\_rank=None} \\
        \min(r_s, k_j) & \text{otherwise} \end{cases}

    i.e. :math:`r^2 + r(d_{out} + d_{in})` on a linear layer (LoRA's count plus :math:`r^2`).

    **Branch** (:meth:`branch`, a linear layer under :func:`decomp.adapters.apply`): LoRA's
    :math:`2 r (d_{out} + d_{in})` flops per token plus :math:`2 r^2`, saving two ``(..., r)``
    intermediates beside ``x``; the weight path forms the update and :math:`\partial L/\partial W'`.

    Args:
        rank: :math:`r`, the rank of both channel modes, an int in :math:`[1, \min(d_0, d_1)]`;
            ``None`` (default) is :math:`\min(8, d_0, d_1)`, lowered until the count is at most
            the weight's size (``ValueError`` where even :math:`r = 1` trains more, e.g. a
            ``(1, n)`` weight); an explicit ``rank`` is kept.
        spatial_rank: ``None`` (default, full spatial core) or an int :math:`\ge 1`.
        scale: :math:`s`, a finite real > 0 (the core starts at zero, so a zero scale would
            never train it), or ``None`` (default) for the rule above. Files saved when the
            default was 1.0 recorded it, so they load as they were trained.
        init: ``"tucker"`` (default) or ``"random"``, the factors' start (the core is zero
            either way).
        std: standard deviation of the ``"random"`` factors, > 0 (default 0.02, the official
            code's); unused by ``"tucker"``.

    Raises:
        TypeError: ``rank``/``spatial_rank`` not an int or ``None``, ``scale``/``std`` not a real
            number, ``init`` not a str. Numpy numbers are accepted and stored as Python ones.
        ValueError: ``rank < 1`` or above :math:`\min(d_0, d_1)` (checked when built on a weight),
            ``spatial_rank < 1``, ``scale`` not finite or :math:`\le 0`, an unknown ``init``,
            ``std <= 0``.

    Differences from the official code: the conv path (the official code has linear layers
    only, and the paper's conv init is unstated) and the ``"tucker"`` init are ours; the
    ``"random"`` init with ``scale=alpha/r`` is the official one.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> conv = torch.nn.Conv2d(16, 8, 3)
        >>> x = torch.randn(2, 16, 10, 10)
        >>> before = conv(x)
        >>> _ = parametrize.register_parametrization(conv, "weight", TuckerParam(rank=4))
        >>> torch.equal(conv(x), before)                  # zero core: identity at init
        True
        >>> adapter = conv.parametrizations.weight[0]
        >>> adapter.core.shape, adapter.num_trainable() == TuckerParam.trainable_count((8, 16, 3, 3), rank=4)
        (torch.Size([4, 4, 3, 3]), True)
    """

    rank: int | None = option(None, check_optional_int, low=1)
    spatial_rank: int | None = option(None, check_optional_int, keyword_only=True, low=1)
    # None: the one-learning-rate rule, resolved per layer in _build (files before it record 1.0)
    scale: float | None = option(None, check_real, keyword_only=True, optional=True, low=0.0)
    init: str = option("tucker", check_choice, keyword_only=True, choices=_INITS)
    std: float = option(OFFICIAL_FACTOR_STD, _check_std, keyword_only=True)

    def _mode_ranks(self, shape: Sequence[int]) -> list[int | None]:
        """The rank of each mode, ``None`` for a spatial mode kept full (no factor)."""
        spatial = [None if self.spatial_rank is None else min(self.spatial_rank, size) for size in shape[2:]]
        channel_rank = self._resolved_channel_rank(shape, self.rank, lambda r: _tucker_count(shape, [r, r, *spatial]))
        return [channel_rank, channel_rank, *spatial]

    def _count(self, shape: tuple[int, ...]) -> int:
        """Closed form: core size plus factor sizes (see the class docstring); ``scale``, ``init``
        and ``std`` do not change it.

        >>> TuckerParam.trainable_count((64, 32), rank=4)          # 4*4 + 4*(64 + 32)
        400
        """
        return _tucker_count(shape, self._mode_ranks(shape))

    def _build(self, weight: torch.Tensor) -> None:
        ranks = self._mode_ranks(weight.shape)
        factored = [mode for mode, r in enumerate(ranks) if r is not None]
        if self.init == "tucker":
            start = tucker(weight, [ranks[mode] for mode in factored], modes=factored, method="hosvd").factors
        else:
            start = [
                torch.randn(weight.shape[mode], ranks[mode], dtype=weight.dtype, device=weight.device) * self.std
                for mode in factored
            ]
        # clone() alone keeps an HOSVD factor's transposed strides, which FSDP2 refuses to shard.
        self.factors = nn.ParameterList(
            nn.Parameter(factor.clone(memory_format=torch.contiguous_format)) for factor in start
        )
        self.factored_modes = tuple(factored)
        core_shape = [size if r is None else r for size, r in zip(weight.shape, ranks)]
        self.applied_scale = self._rule_scale(weight.shape, core_shape) if self.scale is None else self.scale
        self.core = nn.Parameter(torch.zeros(core_shape, dtype=weight.dtype, device=weight.device))

    def _rule_scale(self, shape: Sequence[int], core_shape: Sequence[int]) -> float:
        r"""The rule :math:`s = \sqrt{d_0 / (3 r \prod_j \rho_j)} / \prod_j c_j` (class docstring).

        >>> TuckerParam(rank=8)._rule_scale((512, 512), (8, 8))   # sqrt(512 / 24)
        4.618802153517006
        """
        rank, spatial = core_shape[0], math.prod(core_shape[2:])
        column_norms = 1.0
        if self.init == "random":
            column_norms = math.prod(self.std * math.sqrt(shape[mode]) for mode in self.factored_modes)
        return math.sqrt(shape[0] / (3 * rank * spatial)) / column_norms

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        factors = tuple(factor.to(weight.dtype) for factor in self.factors)
        return self.applied_scale * Tucker(self.core.to(weight.dtype), factors, self.factored_modes).to_tensor()

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`x \Delta W^\top = s\, x U_1 G^\top U_0^\top` on a linear weight, a mode's factor left
        out where it is not factored (the core is full on that mode)."""
        factors = dict(zip(self.factored_modes, (factor.to(x.dtype) for factor in self.factors)))
        if 1 in factors:
            x = x @ factors[1]
        x = x @ (self.applied_scale * self.core.to(x.dtype)).T
        return x @ factors[0].T if 0 in factors else x


def _tucker_count(shape: Sequence[int], ranks: Sequence[int | None]) -> int:
    """The core's size plus the factors' sizes, for the per-mode ``ranks`` (``None``: kept full)."""
    core = math.prod(size if r is None else r for size, r in zip(shape, ranks))
    return core + sum(size * r for size, r in zip(shape, ranks) if r is not None)
