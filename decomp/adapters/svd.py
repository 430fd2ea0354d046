r"""SVD-initialised adapters: PiSSA, SVFit and LoRA-XS as modes of one class, :class:`SVDParam`.

All three start from the truncated SVD :math:`M \approx U_r \operatorname{diag}(\sigma_r) V_r^\top`
of the weight's matrix view :math:`M = W.\mathrm{reshape}(c_\mathrm{out}, -1)` and differ in which
factors they train.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch
from torch import nn

from .._checks import check_choice, check_int, check_optional_int, check_real
from .._rsvd import row_signs, rsvd
from .base import AdapterParam, fan_in, matrix_dims, matrix_view, option

_MODES = ("pissa", "svfit", "lora_xs")
_SVD_METHODS = ("exact", "randomized")
_INITS = ("zero", "normal")
# LoRA-XS's released code draws R from N(0, sigma^2) with sigma = 1e-5 (init_module_weights).
_LORA_XS_INIT_STD = 1e-5


class SVDParam(AdapterParam):
    r"""PiSSA, SVFit or LoRA-XS on the top-``r`` singular triplets of the weight.

    With :math:`M = U \operatorname{diag}(\sigma) V^\top` the SVD of the weight's ``(shape[0], -1)``
    matrix view, of shape :math:`m \times n` (``(d_out, d_in)`` for a linear layer,
    ``(c_out, c_in/groups * prod(kernel))`` for a conv), and :math:`c` = ``scale``:

    * ``mode="pissa"`` (PiSSA): trainable :math:`B = U_r \operatorname{diag}(\sqrt{\sigma_r / c})`
      ``(m, r)`` and :math:`A = \operatorname{diag}(\sqrt{\sigma_r / c}) V_r^\top` ``(r, n)``,
      with frozen copies :math:`B_0, A_0`:

      .. math:: \Delta W = c\,(B A - B_0 A_0) = c\,\big((B - B_0) A + B_0 (A - A_0)\big).

      The right-hand form is computed: it is exactly zero at init (both differences are exactly
      zero), where :math:`BA - B_0A_0` would rely on two products rounding identically. It equals
      peft's residual form :math:`W_\mathrm{res} + c B A` with :math:`W_\mathrm{res} = W - c B_0
      A_0`, without overwriting the pretrained weight. **Trainable:** :math:`r (m + n)`.
    * ``mode="svfit"`` (SVFit): trainable singular values :math:`\tau \in \mathbb{R}^r`, initialised
      to :math:`\tau_0 = \sigma_r / c`; :math:`U_r, V_r` frozen:

      .. math:: \Delta W = U_r \operatorname{diag}\big(c (\tau - \tau_0)\big) V_r^\top.

      **Trainable:** :math:`r`.
    * ``mode="lora_xs"`` (LoRA-XS): frozen :math:`B = U_r` and :math:`A = \operatorname{diag}
      (\sigma_r) V_r^\top`, trainable :math:`R` ``(r, r)``:

      .. math:: \Delta W = c\, B R A.

      **Trainable:** :math:`r^2`. ``init="zero"`` (default) starts at :math:`R = 0`, so the
      layer reproduces its pretrained output (the gradient :math:`B^\top G A^\top` of
      :math:`R` is nonzero, so it trains). ``init="normal"`` is the released code's
      :math:`R \sim \mathcal{N}(0, 10^{-10})` (std :math:`10^{-5}`), which is **not** identity at
      init (:math:`\Delta W \neq 0`, tiny).

    **Branch** (:meth:`branch`, a linear layer under :func:`decomp.adapters.apply`): per token
    :math:`4 r (m + n)` flops for PiSSA, :math:`2 r (m + n)` for SVFit and :math:`2 r (m + n) + 2 r^2`
    for LoRA-XS, saving ``(..., 2r)`` (PiSSA) or ``(..., r)`` numbers beside ``x``; the weight
    path forms the :math:`m \times n` update and :math:`\partial L/\partial W'` every step.

    For ``pissa`` and ``svfit`` the update is exactly zero at init, so the adapted layer's output
    equals the pretrained output exactly. ``scale`` multiplies the update as peft's
    ``lora_alpha / r`` does (the factors are divided so the initial product is unchanged); it
    changes the training dynamics only.

    Args:
        rank: number of singular triplets :math:`r`, an int in :math:`[1, \min(m, n)]`. ``None``
            (default) means :math:`\min(8, m, n)`, lowered until the count is at most the
            weight's size (``ValueError`` where even :math:`r = 1` trains more: PiSSA on a
            ``(1, n)`` weight, :math:`1 + n` numbers for :math:`n`); an explicit ``rank`` is
            kept.
        mode: ``"pissa"`` (default), ``"svfit"`` or ``"lora_xs"``.
        svd: ``"exact"`` (default, :func:`torch.linalg.svd`) or ``"randomized"``
            (:func:`decomp.rsvd` with 2 power iterations, for large layers; seeded by ``seed``).
        scale: :math:`c`, a finite real > 0, or ``None`` (default): the one-learning-rate rule,
            :math:`c = 1/\sqrt{n}` for ``pissa`` (:math:`n` the fan-in,
            :func:`~decomp.adapters.base.fan_in`) and 1 for ``svfit`` and ``lora_xs``
            (:meth:`_rule_scale`). peft's PiSSA is ``lora_alpha / r`` (1 at its defaults). The
            value in use is the attribute ``applied_scale`` of the built adapter.
        init: ``"zero"`` (default) or ``"normal"``; ``"normal"`` only with ``mode="lora_xs"``.
        seed: seeds the randomized SVD's sketch and the ``"normal"`` init (int >= 0, default 0).

    Raises:
        TypeError: ``rank``/``seed`` not an int (``rank`` may be ``None``), ``scale`` not a real
            number, ``mode``/``svd``/``init`` not a str. Numpy numbers are accepted and stored
            (and reported by :meth:`config`) as Python ones.
        ValueError: an option is not one of its choices, ``rank < 1``, ``scale <= 0``,
            ``init="normal"`` with another mode than ``"lora_xs"``; on build, ``rank > min(m, n)``.

    Differences from the official code: peft's PiSSA is Linear-only (its conv path raises) and
    overwrites the base weight with the residual; here any conv goes through the matrix view
    and the base weight stays pretrained (the update form is the same function). LoRA-XS's
    released code runs the SVD on :math:`W^\top`, which gives the same :math:`B, A` up to the
    signs of singular-vector pairs; its ``retain_part="bottom"`` option is not offered. SVFit's
    "choose r to cover 99% of the information" is not automatic: pass ``rank``.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(12, 10)
        >>> x = torch.randn(3, 12)
        >>> before = layer(x)
        >>> _ = parametrize.register_parametrization(layer, "weight", SVDParam(rank=4))
        >>> torch.equal(layer(x), before)
        True
        >>> tuple(SVDParam.trainable_count((10, 12), rank=4, mode=mode) for mode in ("pissa", "svfit", "lora_xs"))
        (88, 4, 16)
    """

    # The frozen SVD factors of each mode (PiSSA's left/right are Parameters, so not these);
    # signs fixed in _build, the randomized SVD seeded.
    rebuilt_buffers: ClassVar[tuple[str, ...]] = (
        "initial_left", "initial_right", "left", "right", "initial_singular_values"
    )

    rank: int | None = option(None, check_optional_int, low=1)
    mode: str = option("pissa", check_choice, choices=_MODES)
    svd: str = option("exact", check_choice, choices=_SVD_METHODS)
    # None: the one-learning-rate rule (pissa: 1 / sqrt(fan_in); svfit, lora_xs: 1), per layer
    scale: float | None = option(None, check_real, optional=True, low=0.0)
    init: str = option("zero", check_choice, choices=_INITS)
    seed: int = option(0, check_int, low=0)

    def _check_options(self) -> None:
        if self.init == "normal" and self.mode != "lora_xs":
            raise ValueError(f"init='normal' is only defined for mode='lora_xs', got mode={self.mode!r}")

    def _rank(self, shape: tuple[int, ...]) -> int:
        return self._resolved_rank(
            shape, self.rank, high=min(matrix_dims(shape)), count=lambda r: _count_at_rank(shape, r, self.mode)
        )

    def _count(self, shape: tuple[int, ...]) -> int:
        """``r (m + n)`` for PiSSA, ``r`` for SVFit, ``r^2`` for LoRA-XS.

        Example:
            >>> SVDParam.trainable_count((64, 32, 3, 3)), SVDParam.trainable_count((64, 32), mode="lora_xs")
            (2816, 64)
        """
        return _count_at_rank(shape, self._rank(shape), self.mode)

    def _truncated_svd(
        self, matrix: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.svd == "randomized":
            generator = torch.Generator().manual_seed(self.seed)
            return rsvd(matrix, rank, generator=generator, check_finite=False)
        work = matrix.to(torch.float32) if matrix.dtype in (torch.float16, torch.bfloat16) else matrix
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        return U[:, :rank].to(matrix.dtype), S[:rank].to(matrix.dtype), Vh[:rank].to(matrix.dtype)

    def _rule_scale(self, shape: Sequence[int]) -> float:
        r"""``scale=None``: :math:`c = 1/\sqrt{n}` for PiSSA (:math:`n` the fan-in), 1 otherwise.

        A PiSSA step moves the factors :math:`B, A` (entries of order :math:`\sqrt{\sigma/c}`)
        by :math:`\pm\eta`, so it changes :math:`W` by about :math:`\eta \sqrt{c\,\sigma}`
        per singular direction: :math:`c = 1/\sqrt{n}` brings it to the relative step of LoRA
        (:math:`\alpha = r`) on a weight of RMS :math:`1/\sqrt{n}`; :math:`c = 1` stepped 2 to 5
        times more (issue 12).
        """
        return 1 / math.sqrt(fan_in(shape)) if self.mode == "pissa" else 1.0

    def _build(self, weight: torch.Tensor) -> None:
        matrix = matrix_view(weight)
        rank = self._rank(tuple(weight.shape))
        # LAPACK hands back column-major factors: row-major copies are what FSDP2 can shard.
        U, S, Vh = (
            factor.clone(memory_format=torch.contiguous_format)
            for factor in self._truncated_svd(matrix, rank)
        )
        # LAPACK's signs differ between libraries and devices; fixed ones let load_adapter
        # rebuild these factors from the weight instead of reading them from the file.
        signs = row_signs(U.mT)
        U, Vh = U * signs, Vh * signs[:, None]
        self.applied_scale = self._rule_scale(weight.shape) if self.scale is None else self.scale
        if self.mode == "pissa":
            root = (S / self.applied_scale).sqrt()
            self.register_buffer("initial_left", U * root)
            self.register_buffer("initial_right", root[:, None] * Vh)
            self.left = nn.Parameter(self.initial_left.clone())
            self.right = nn.Parameter(self.initial_right.clone())
        elif self.mode == "svfit":
            self.register_buffer("left", U)
            self.register_buffer("right", Vh)
            self.register_buffer("initial_singular_values", S / self.applied_scale)
            self.singular_values = nn.Parameter(self.initial_singular_values.clone())
        else:
            self.register_buffer("left", U)
            self.register_buffer("right", S[:, None] * Vh)
            core = torch.zeros(rank, rank, dtype=weight.dtype, device=weight.device)
            if self.init == "normal":
                generator = torch.Generator().manual_seed(self.seed)
                sample = torch.randn(rank, rank, generator=generator, dtype=torch.float64)
                core = (_LORA_XS_INIT_STD * sample).to(weight.dtype).to(weight.device)
            self.core = nn.Parameter(core)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        dtype = weight.dtype
        if self.mode == "pissa":
            left, right = self.left.to(dtype), self.right.to(dtype)
            initial_left = self.initial_left.to(dtype)
            update = (left - initial_left) @ right + initial_left @ (right - self.initial_right.to(dtype))
        elif self.mode == "svfit":
            change = self.singular_values.to(dtype) - self.initial_singular_values.to(dtype)
            update = (self.left.to(dtype) * change) @ self.right.to(dtype)
        else:
            update = (self.left.to(dtype) @ self.core.to(dtype)) @ self.right.to(dtype)
        return (self.applied_scale * update).reshape(weight.shape)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`x \Delta W^\top` as two thin products, in the algebra of :meth:`delta` (so it is
        exactly zero where :meth:`delta` is): PiSSA :math:`c\,[x A^\top,\ x (A - A_0)^\top]
        [B - B_0,\ B_0]^\top`, SVFit :math:`((x V_r) \odot c(\tau - \tau_0)) U_r^\top`, LoRA-XS
        :math:`c\,((x A^\top) R^\top) B^\top`."""
        dtype = x.dtype
        if self.mode == "pissa":
            left, right = self.left.to(dtype), self.right.to(dtype)
            initial_left = self.initial_left.to(dtype)
            # One (2r, n) and one (m, 2r) product instead of four thin ones and a sum.
            stacked_right = torch.cat([right, right - self.initial_right.to(dtype)])
            stacked_left = torch.cat([left - initial_left, initial_left], dim=1)
            return (self.applied_scale * (x @ stacked_right.T)) @ stacked_left.T
        if self.mode == "svfit":
            change = self.singular_values.to(dtype) - self.initial_singular_values.to(dtype)
            return ((x @ self.right.to(dtype).T) * (self.applied_scale * change)) @ self.left.to(dtype).T
        core = self.applied_scale * self.core.to(dtype)
        return ((x @ self.right.to(dtype).T) @ core.T) @ self.left.to(dtype).T


def _count_at_rank(shape: tuple[int, ...], rank: int, mode: str) -> int:
    if mode == "pissa":
        return rank * sum(matrix_dims(shape))
    if mode == "svfit":
        return rank
    return rank * rank
