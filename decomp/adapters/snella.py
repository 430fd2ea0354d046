r"""SNELL and SNELLA: kernelized sparse updates, and SNELLA's bi-level budget :class:`Allocator`.

SNELL (NeurIPS 2024, arXiv 2411.01800) and SNELLA (arXiv 2510.24037), official code
``ssfgunner/SNELL``. The update is a dense kernel matrix built from two small point sets, one point
per output and per input row/column, then sparsified inside the layer (the largest
:math:`|\Delta W|` survive). SNELLA adds a mixture kernel with three trainable scalars and an
allocator that moves the non-zero budget between layers during training.

Conv weights ``(c_out, c_in/groups, *kernel)`` are used through their
``(c_out, c_in/groups * prod(kernel))`` matrix view, so groups, dilation, stride and every padding
mode need nothing special.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import nn

from .._checks import check_bool, check_choice, check_int, check_optional_int, check_real
from .._deprecation import deprecated_attributes
from .base import AdapterParam, matrix_dims, option

__all__ = ["SNELLParam", "SNELLAParam", "Allocator", "capped_allocation", "keep_largest_mask"]

_DEFAULT_RANK = 32
_MASK_MODES = ("binary", "magnitude")
# How the update starts: the frozen initial update subtracted (the layer starts exactly at W), the
# kernel's change from its init sparsified, or the paper's dense kernel added to W.
_STARTS = ("residual", "zero", "kernel")
# How scale=None resolves: lambda = 1/sqrt(n), or normalised by the kernel's own step (SNELLParam)
_SCALE_RULES = ("fan_in", "kernel_scale")
# Calibrated, not derived: with lambda = 1/sqrt(n) and the official two kernels (c = 0.1) a first
# Adam step was 0.38 to 0.46 times LoRA r=8's on the contract grid (tests/contracts/first_step.py),
# flat in the sparsity (0 to 0.9) and the point dimension, so kappa / |c| = 2.5 brings it to ~1.
_KERNEL_RULE_CONSTANT = 0.25


def keep_largest_mask(magnitude: torch.Tensor, keep: int) -> torch.Tensor:
    r"""Boolean mask of the ``keep`` largest entries of ``magnitude`` (ties at the threshold kept).

    The threshold :math:`\tau` is the ``keep``-th largest value, found with ``torch.kthvalue``
    (linear time, no size limit: ``torch.quantile`` refuses inputs above :math:`2^{24}` elements,
    which a 4096x4096 layer exceeds); the mask is :math:`|x| \ge \tau`. With distinct values it
    has exactly ``keep`` ones. Entries tied with :math:`\tau` are all kept, so an all-zero input
    (a zero-start kernel update at init) keeps every entry and the first gradient reaches them all.

    Args:
        magnitude: non-negative tensor of any shape.
        keep: number of entries to keep, in ``[0, magnitude.numel()]``.

    Returns:
        A ``bool`` tensor of ``magnitude``'s shape.

    Example:
        >>> keep_largest_mask(torch.tensor([0.5, 3.0, 1.0, 2.0]), 2)
        tensor([False,  True, False,  True])
    """
    total = magnitude.numel()
    keep = check_int(keep, "keep", low=0, high=total)
    if keep == total:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if keep == 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = magnitude.flatten().kthvalue(total - keep + 1).values
    return magnitude >= threshold


def _max_rank(shape: tuple[int, ...], num_kernels: int) -> int:
    # The rank is split evenly over the kernels, and like LoRA's it should not exceed the
    # smaller matrix dimension; one point dimension per kernel is always allowed.
    return num_kernels * max(1, min(matrix_dims(shape)) // num_kernels)


def _check_kernel_scale(kernel_scale: object, name: str) -> float:
    # check_real's checks, worded "positive" as the SNELL/SNELLA docs are
    if isinstance(kernel_scale, bool) or not isinstance(kernel_scale, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(kernel_scale).__name__}")
    if not 0.0 < float(kernel_scale) < math.inf:
        raise ValueError(f"{name} must be a positive finite float, got {kernel_scale}")
    return float(kernel_scale)


class _KernelAdapter(AdapterParam):
    r"""Shared machinery of :class:`SNELLParam` and :class:`SNELLAParam` (points, kernel, sparsification)."""

    default_sparsity: ClassVar[float] = 0.5
    num_scalars: ClassVar[int] = 0

    # rank's range depends on num_kernels: checked in _check_options, after num_kernels
    rank: int | None = option(None)
    num_kernels: int = option(2, check_int, keyword_only=True, low=1)
    kernel_scale: float = option(0.1, _check_kernel_scale, keyword_only=True)
    # None: the one-learning-rate rule scale_rule, resolved per layer in _build
    scale: float | None = option(None, check_real, keyword_only=True, optional=True, low=0.0)
    # how scale=None resolves; the class declares its default (SNELL "kernel_scale", SNELLA "fan_in")
    scale_rule: str = option("fan_in", check_choice, keyword_only=True, choices=_SCALE_RULES)
    # None is the class's default_sparsity, resolved in _check_options; the attribute ``sparsity``
    # is the current fraction (a property)
    _initial_sparsity: float | None = option(None, keyword="sparsity", keyword_only=True)
    mask: str = option("binary", check_choice, keyword_only=True, choices=_MASK_MODES)
    # None is resolved in _check_options: from zero_start, else "residual"
    start: str | None = option(None, check_choice, keyword_only=True, optional=True, choices=_STARTS)
    # the older spelling of the start: True is start="zero", False the paper's start="kernel"
    zero_start: bool | None = option(None, check_bool, keyword_only=True, optional=True)

    def _check_options(self) -> None:
        self.rank = check_optional_int(self.rank, "rank", low=self.num_kernels)
        if self.rank is not None and self.rank % self.num_kernels:
            raise ValueError(f"rank must be a multiple of num_kernels={self.num_kernels}, got {self.rank}")
        self._initial_sparsity = check_real(
            self.default_sparsity if self._initial_sparsity is None else self._initial_sparsity,
            "sparsity",
            low=0.0,
            high=1.0,
            low_inclusive=True,
        )
        self.start = self._resolved_start()
        if self.start == "zero" and self.mask == "magnitude":
            # The weighting |D| is zero at a zero start, so every gradient would be zero forever.
            raise ValueError(
                "start='zero' (zero_start=True) needs mask='binary': with mask='magnitude' the "
                "update D * |D| has zero gradient at D = 0 and would never train"
            )

    def _resolved_scale(self, d_in: int) -> float:
        r"""``scale``, or for ``None`` the ``scale_rule`` (:math:`1/\sqrt{n}` or
        :math:`\kappa / (|c| \sqrt{n})`, see :class:`SNELLParam`'s ``scale``); 1 (the update
        as it was) where the older spelling ``zero_start`` is given, so configs and adapter files
        written before ``start`` and ``scale`` existed (they always name ``zero_start``) keep
        their update."""
        if self.scale is not None:
            return self.scale
        if self.zero_start is not None:
            return 1.0
        if self.scale_rule == "fan_in":
            return 1 / math.sqrt(d_in)
        return _KERNEL_RULE_CONSTANT / (self.kernel_scale * math.sqrt(d_in))

    def _resolved_start(self) -> str:
        """``start`` checked, or implied by ``zero_start`` (``ValueError`` where they disagree)."""
        implied = {None: None, True: "zero", False: "kernel"}[self.zero_start]
        if self.start is None:
            return implied or "residual"
        start = self.start
        if implied is not None and start != implied:
            raise ValueError(
                f"zero_start={self.zero_start} means start={implied!r}, but start={start!r} "
                "was given: pass only start"
            )
        return start

    def _rank(self, shape: tuple[int, ...]) -> int:
        return self._resolved_rank(
            shape,
            self.rank,
            high=_max_rank(shape, self.num_kernels),
            count=lambda q: self._count_at_rank(shape, q),
            default=self.num_kernels * max(1, _DEFAULT_RANK // self.num_kernels),
            step=self.num_kernels,
        )

    # ------------------------------------------------------------------ build
    def _build(self, weight: torch.Tensor) -> None:
        d_out, d_in = matrix_dims(weight.shape)
        rank = self._rank(tuple(weight.shape))
        self.applied_scale = self._resolved_scale(d_in)
        point_dim = rank // self.num_kernels
        # The official kaiming_uniform_(a=sqrt(5)) on the 3-D (H, d, q/H) tensors: U(-b, b) with
        # b = 1/sqrt(d * q/H).
        self.in_points = nn.Parameter(self._uniform_points(d_in, point_dim, weight))
        self.out_points = nn.Parameter(self._uniform_points(d_out, point_dim, weight))
        coefficients = [self.kernel_scale * (-1.0) ** h for h in range(self.num_kernels)]
        self.register_buffer("kernel_coefficients", torch.tensor(coefficients, dtype=torch.float64).to(weight))
        self._build_scalars(weight)
        if self.start != "kernel":
            # Random, so saved with the adapter (not rebuilt): q (d_in + d_out) numbers.
            for name, value in list(self.named_parameters()):
                self.register_buffer(f"initial_{name}", value.detach().clone())
        # A persistent buffer, so the count the Allocator set travels with the adapter's
        # state_dict (decomp.adapters.save_adapter/load_adapter) and survives deepcopy.
        keep = d_out * d_in - round(self._initial_sparsity * d_out * d_in)
        self.register_buffer("kept_entries", torch.tensor(keep, device=weight.device))
        if self.start == "residual":
            # The count the initial update was sparsified with: the Allocator moves kept_entries,
            # never the frozen start.
            self.register_buffer("initial_kept_entries", self.kept_entries.clone())

    def _uniform_points(self, rows: int, point_dim: int, weight: torch.Tensor) -> torch.Tensor:
        bound = 1.0 / math.sqrt(rows * point_dim)
        points = torch.empty(self.num_kernels, rows, point_dim, dtype=torch.float32)
        return points.uniform_(-bound, bound).to(weight)

    def _build_scalars(self, weight: torch.Tensor) -> None:
        """SNELLA's trainable scalars; SNELL has none."""

    # ------------------------------------------------------------------ the update
    def distance_kernel(self, in_points: torch.Tensor, out_points: torch.Tensor) -> torch.Tensor:
        r"""The distance kernel, shape ``(d_out, d_in)``.

        :math:`K_{oi} = \sum_h c_h \lVert \mathrm{Out}_{h,o} - \mathrm{In}_{h,i} \rVert_2`.
        """
        distances = torch.cdist(out_points, in_points)
        coefficients = self.kernel_coefficients.to(distances.dtype)
        return torch.einsum("h,hoi->oi", coefficients, distances)

    def kernel(self, dtype: torch.dtype, initial: bool = False) -> torch.Tensor:
        """The dense kernel update (before sparsification) from the current or the initial parameters."""
        raise NotImplementedError

    def dense_delta(self, dtype: torch.dtype) -> torch.Tensor:
        r"""The dense matrix :math:`D` that is sparsified: the kernel, minus its initial value
        with ``start="zero"``."""
        dense = self.kernel(dtype)
        if self.start != "zero":
            return dense
        with torch.no_grad():
            initial = self.kernel(dtype, initial=True)
        return dense - initial

    def _sparsified(self, dense: torch.Tensor, keep: int) -> torch.Tensor:
        """``scale`` times ``dense`` with all but its ``keep`` largest entries zeroed (times
        ``|dense|`` in magnitude mode)."""
        magnitude = dense.detach().abs()
        # The mask is a constant (straight-through): the gradient reaches the kept entries only.
        kept = keep_largest_mask(magnitude, keep)
        if self.mask == "magnitude":
            return dense * (magnitude * kept) * self.applied_scale
        return dense * kept * self.applied_scale

    def initial_update(self, dtype: torch.dtype) -> torch.Tensor:
        r"""The frozen start :math:`S_{k_0}(K(\theta_0))` that ``start="residual"`` subtracts,
        ``(d_out, d_in)``, without gradient (one no-grad kernel evaluation)."""
        with torch.no_grad():
            return self._sparsified(self.kernel(dtype, initial=True), int(self.initial_kept_entries))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        update = self._sparsified(self.dense_delta(weight.dtype), self.keep_count)
        if self.start == "residual":
            # The same computation on the same values as the update at init: exactly zero there.
            update = update - self.initial_update(weight.dtype)
        return update.reshape(weight.shape)

    # ------------------------------------------------------------------ sparsity
    @property
    def num_entries(self) -> int:
        """Entries of the (d_out, d_in) update matrix: the most that can be kept."""
        if self.weight_shape is None:
            raise RuntimeError(f"{type(self).__name__} is not built yet")
        return math.prod(self.weight_shape)

    @property
    def keep_count(self) -> int:
        """How many of the update's entries are kept.

        ``kthvalue`` needs it on the host, so this is the one scalar read in ``forward`` (free on
        the CPU, one tiny device sync per layer on an accelerator).
        """
        if not self.is_built:
            raise RuntimeError(f"{type(self).__name__} is not built yet")
        return int(self.kept_entries)

    @property
    def sparsity(self) -> float:
        """Fraction of the update's entries currently set to zero (the initial value until built)."""
        if not self.is_built:
            return self._initial_sparsity
        return 1.0 - self.keep_count / self.num_entries

    def _state_problems(self, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
        problems = super()._state_problems(state)
        for key in ("kept_entries", "initial_kept_entries"):
            kept = state.get(key)
            if kept is not None and not 0 <= int(kept) <= self.num_entries:
                problems[key] = f"must be in [0, {self.num_entries}], got {int(kept)}"
        return problems

    def set_keep_count(self, keep: int) -> None:
        """Keep the ``keep`` largest :math:`|\\Delta W|` entries (what the :class:`Allocator` sets)."""
        self.kept_entries.fill_(check_int(keep, "keep", low=0, high=self.num_entries))

    # ------------------------------------------------------------------ contract
    def _count(self, shape: tuple[int, ...]) -> int:
        r""":math:`q\,(d_{in} + d_{out})`, plus SNELLA's trainable scalars."""
        return self._count_at_rank(shape, self._rank(shape))

    @classmethod
    def _count_at_rank(cls, shape: tuple[int, ...], rank: int) -> int:
        d_out, d_in = matrix_dims(shape)
        return rank * (d_in + d_out) + cls.num_scalars


class SNELLParam(_KernelAdapter):
    r"""SNELL: a sparse update from a difference of Euclidean distance kernels.

    Trainable points :math:`\mathrm{In} \in \mathbb R^{H \times d_{in} \times q/H}` and
    :math:`\mathrm{Out} \in \mathbb R^{H \times d_{out} \times q/H}` give the kernel

    .. math::

        K_{oi} = \sum_{h<H} c_h \,\lVert \mathrm{Out}_{h,o} - \mathrm{In}_{h,i} \rVert_2,
        \qquad c_h = 0.1\,(-1)^h,

    and, with :math:`S_k(D) = D \odot \mathbb 1[|D| \ge \tau]` keeping the entries of :math:`D`
    at least :math:`\tau`, the ``k``-th largest :math:`|D_{oi}|` (the mask a constant, so the
    gradient flows to the kept entries: straight-through), the update is, by ``start``:

    * ``"residual"`` (default): :math:`\Delta W = S_k(K(\theta)) - S_{k_0}(K(\theta_0))` with a
      frozen copy :math:`\theta_0` of the initial points and :math:`k_0` the initial kept count.
      This is the residual split of PiSSA/LoLDU, :math:`W' = W_\mathrm{res} + S_k(K(\theta))`
      with :math:`W_\mathrm{res} = W - S_{k_0}(K(\theta_0))`, written as an update of the
      untouched :math:`W`: the kernel starts non-zero and trains as in the paper, and **the layer
      is exactly the pretrained one at init** (:math:`\Delta W = 0` bit for bit, on every layer
      size and in both mask modes).
    * ``"zero"`` (``zero_start=True``): :math:`\Delta W = S_k(K(\theta) - K(\theta_0))`, also the
      identity at init; the sparsity then acts on the change of the kernel.
    * ``"kernel"`` (``zero_start=False``, the paper's and the official code's start):
      :math:`\Delta W = S_k(K(\theta))`, dense and non-zero at init, so the layer's output moves
      on registration (measured :math:`\lVert \Delta W \rVert / \lVert W \rVert`, binary mask:
      SNELL 0.036 and SNELLA 0.53 on a 32-channel 3x3 conv, SNELLA 0.78 on a 10 x 64 linear,
      its softmax term adding :math:`\alpha/d_{out}` per entry; the magnitude mask's up to 0.08
      is still above 1e-2 on small layers).

    ``W`` of shape ``(c_out, c_in/groups, *kernel)`` is updated through its
    ``(c_out, c_in/groups * prod(kernel))`` view.

    Trainable parameters: :math:`q\,(d_{in} + d_{out})`, LoRA's at rank :math:`q`. The whole
    update is multiplied by ``scale`` (default: the rule ``scale_rule``, below).

    The official code's quirks not reproduced by default: it weights the survivors by their
    detached magnitude (``mask="magnitude"`` keeps that) and thresholds with ``torch.quantile``,
    which fails above :math:`2^{24}` entries; it starts at ``"kernel"``.

    Args:
        rank: total point dimension :math:`q` (LoRA-equivalent rank), a multiple of
            ``num_kernels`` in ``[num_kernels, num_kernels * max(1, min(d_out, d_in) // num_kernels)]``.
            Default: 32, clamped to that range, then lowered (in steps of ``num_kernels``) until
            the count is at most the weight's size; ``ValueError`` where even
            ``rank=num_kernels`` trains more (a ``(1, n)`` weight). An explicit ``rank`` is kept.
        num_kernels: number of distance kernels :math:`H \ge 1` (official: 2); kernel
            :math:`h` has the frozen coefficient :math:`c_h = \mathrm{kernel\_scale}\,(-1)^h`.
        kernel_scale: :math:`|c_h| > 0` (official ``SCALE_FACTOR_fc`` = 0.1).
        scale: :math:`\lambda > 0`, a factor on the whole update, :math:`\Delta W = \lambda
            S_k(\cdot) - \dots`; ``None`` (default) is the one-learning-rate rule ``scale_rule``.
            The kernel's entries are absolute (distances between points of order 1, SNELLA's
            softmax :math:`\alpha/d_{out}` and :math:`\beta`), not relative to :math:`W`, whose
            entries are of order :math:`1/\sqrt{n}`: unscaled (``scale=1.0``, the official code),
            a first Adam step moved the weights 10 to 70 times more than LoRA r=8's at the same lr
            on the adapters benchmark's convs (issue 12). The value in use is the attribute
            ``applied_scale`` of the built adapter.
        scale_rule: how ``scale=None`` resolves, :math:`n` the fan-in (the matrix view's
            columns):

            * ``"kernel_scale"`` (SNELLParam's default): :math:`\lambda = \kappa / (|c|\sqrt{n})`,
              :math:`\kappa = 1/4`. With the binary mask the update is exactly proportional to
              :math:`\lambda |c|` (scaling the kernel does not change which entries the mask
              keeps), so the rule removes ``kernel_scale``; :math:`\kappa` is calibrated, not
              derived: with :math:`\lambda = 1/\sqrt n` and the official two kernels the first
              Adam step was 0.38 to 0.46 times LoRA r=8's on the contract suite's shape grid
              (``tests/contracts/first_step.py``), flat in the sparsity (0 to 0.9) and in the
              point dimension; under the rule it is 0.9 to 1.2 times (0.5 to 1.7 at
              sparsities 0 to 0.99). The calibration is for ``num_kernels=2``: measured under
              :math:`1/\sqrt n`, one kernel stepped 2.5 to 5 times more (growing with the point
              dimension), four 1.6 and eight 2.8 times more; pass ``scale`` there. With
              ``mask="magnitude"`` the survivors are also weighted by :math:`|D|`, about
              :math:`0.03|c|` at init, so that first step is about 30 times smaller: pass
              ``scale`` for the official mask.
            * ``"fan_in"`` (SNELLAParam's default): :math:`\lambda = 1/\sqrt{n}`. SNELLA's step
              is dominated by its trainable :math:`\beta`, which moves every kernel entry by
              :math:`\eta`: 0.6 to 1.7 times LoRA r=8's first step on that grid.

            Adapter files and peft configs saved before ``scale_rule`` existed load with
            ``"fan_in"``, the rule they were trained with.
        sparsity: fraction :math:`s \in [0, 1)` of the update's entries zeroed; the layer keeps
            :math:`n - \mathrm{round}(s\,n)` of its :math:`n = d_{out} d_{in}` entries.
        mask: ``"binary"`` (default, the clean :math:`D \odot \mathbb 1[|D| \ge \tau]`) or
            ``"magnitude"`` (the official code's :math:`D \odot |D|_{\text{detached}} \odot
            \mathbb 1[|D| \ge \tau]`, i.e. :math:`\mathrm{sign}(D) D^2` on the survivors).
        start: ``"residual"``, ``"zero"`` or ``"kernel"`` (above); ``None`` (default) is
            ``"residual"``, or what ``zero_start`` says. ``"residual"`` and ``"zero"`` keep the
            frozen copies ``initial_*`` (buffers, saved with the adapter: :math:`q (d_{in} +
            d_{out})` numbers) and cost one extra no-grad kernel evaluation per forward
            (``"residual"``: and one ``kthvalue``). ``"zero"`` needs ``mask="binary"``: the
            magnitude weighting has zero gradient at :math:`D = 0`.
        zero_start: the older spelling of ``start``: ``True`` is ``"zero"``, ``False`` is
            ``"kernel"`` (the default before ``start`` existed); ``None`` (default) defers to
            ``start``. Given, it also keeps the older unscaled update (``scale=None`` is then
            1.0), so code and adapter files written before ``start`` and ``scale`` existed (files
            always name ``zero_start``) compute what they did.

    Raises:
        TypeError: ``rank``/``num_kernels`` not an int (``rank`` may be ``None``),
            ``kernel_scale``/``sparsity`` not a real number, ``mask``/``start``/``scale_rule``
            not a str,
            ``zero_start`` not a bool (or ``None``). Numpy numbers are accepted and stored as
            Python ones.
        ValueError: an option out of its range above, ``rank`` not a multiple of
            ``num_kernels``, ``start="zero"`` with ``mask="magnitude"``, ``zero_start`` and
            ``start`` disagreeing; on build, ``rank`` above its upper end for the layer.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(16, 8)
        >>> _ = parametrize.register_parametrization(layer, "weight", SNELLParam(rank=4, sparsity=0.75))
        >>> adapter = layer.parametrizations.weight[0]
        >>> adapter.num_trainable(), SNELLParam.trainable_count((8, 16), rank=4)
        (96, 96)
        >>> torch.equal(layer.weight, layer.parametrizations.weight.original)  # residual start
        True
        >>> int((SNELLParam.from_weight(layer.weight, rank=4, sparsity=0.75, start="kernel").delta(layer.weight) != 0).sum())
        32
    """

    default_sparsity = 0.5
    # the kernel_scale rule (one-learning-rate, issue 12): with 1/sqrt(n) the first step was 0.38 to 0.46
    # times LoRA's; files saved before the option existed load with the rule they were trained on
    scale_rule: str = option("kernel_scale", check_choice, keyword_only=True, choices=_SCALE_RULES)
    saved_defaults: ClassVar[Mapping[str, Any]] = {"scale_rule": "fan_in"}

    def kernel(self, dtype: torch.dtype, initial: bool = False) -> torch.Tensor:
        prefix = "initial_" if initial else ""
        in_points = getattr(self, f"{prefix}in_points").to(dtype)
        out_points = getattr(self, f"{prefix}out_points").to(dtype)
        return self.distance_kernel(in_points, out_points)


class SNELLAParam(_KernelAdapter):
    r"""SNELLA: SNELL's kernel mixed with a softmax kernel through three trainable scalars.

    With SNELL's distance kernel :math:`K` (shape ``(d_out, d_in)``):

    .. math::

        K' = K + \alpha\,\mathrm{softmax}_{o}(K / \gamma) + \beta,
        \qquad \alpha = 1,\ \gamma = 1,\ \beta = 0 \text{ at init},

    the softmax running over the output axis :math:`o` (the official ``dim=-1`` of its
    ``(d_in, d_out)`` layout). The update is sparsified as in :class:`SNELLParam`; an
    :class:`Allocator` can move the non-zero budget between layers during training.

    Trainable parameters: :math:`q\,(d_{in} + d_{out}) + 3` (the scalars ``alpha``, ``gamma``,
    ``beta`` each of shape ``(1,)``, as FSDP2 shards no 0-d parameter).

    **Identity at init** by default (``start="residual"``, as for :class:`SNELLParam`): the
    frozen initial update is subtracted, so the softmax term's :math:`\alpha / d_{out}` per entry
    (:math:`\lVert \Delta W \rVert / \lVert W \rVert` 0.53 on a 32-channel 3x3 conv with the
    paper's start, ``start="kernel"``) does not move the pretrained layer. The default sparsity
    0.01 is the official scripts' ``init_thres``; the allocator then lowers the budget.

    Args: as :class:`SNELLParam` (same names, ranges and meaning; default ``sparsity`` 0.01,
        default ``scale_rule`` ``"fan_in"``).
    Example:
        >>> layer = torch.nn.Conv2d(4, 6, 3, groups=2)
        >>> adapter = SNELLAParam.from_weight(layer.weight.detach(), rank=4)
        >>> adapter.num_trainable(), SNELLAParam.trainable_count((6, 2, 3, 3), rank=4)
        (99, 99)
        >>> bool((adapter(layer.weight) == layer.weight).all())
        True
    """

    default_sparsity = 0.01
    num_scalars = 3

    def _build_scalars(self, weight: torch.Tensor) -> None:
        # Shape (1,), not 0-d scalars: FSDP2 (fully_shard) refuses 0-d parameters.
        self.alpha = nn.Parameter(torch.ones(1, dtype=weight.dtype, device=weight.device))
        self.gamma = nn.Parameter(torch.ones(1, dtype=weight.dtype, device=weight.device))
        self.beta = nn.Parameter(torch.zeros(1, dtype=weight.dtype, device=weight.device))

    def kernel(self, dtype: torch.dtype, initial: bool = False) -> torch.Tensor:
        prefix = "initial_" if initial else ""
        in_points, out_points, alpha, gamma, beta = (
            getattr(self, f"{prefix}{name}").to(dtype)
            for name in ("in_points", "out_points", "alpha", "gamma", "beta")
        )
        distance = self.distance_kernel(in_points, out_points)
        return distance + alpha * torch.softmax(distance / gamma, dim=0) + beta


# SNELL and SNELLA were the class names before every adapter was named *Param: kept one release.
_DEPRECATED_NAMES = {"SNELL": "SNELLParam", "SNELLA": "SNELLAParam"}
__getattr__ = deprecated_attributes(__name__, _DEPRECATED_NAMES, globals())


# ---------------------------------------------------------------------------------------------
# Bi-level allocation


def _kernel_adapters(model_or_adapters: nn.Module | Iterable[nn.Module]) -> list[_KernelAdapter]:
    if isinstance(model_or_adapters, nn.Module):
        candidates = list(model_or_adapters.modules())
    else:
        try:
            candidates = list(model_or_adapters)
        except TypeError:
            raise TypeError(
                "model_or_adapters must be an nn.Module or an iterable of SNELL/SNELLA adapters, "
                f"got {type(model_or_adapters).__name__}"
            ) from None
        for item in candidates:
            if not isinstance(item, _KernelAdapter):
                raise TypeError(
                    "model_or_adapters must hold only SNELL/SNELLA adapters, "
                    f"got {type(item).__name__}"
                )
    adapters = [module for module in candidates if isinstance(module, _KernelAdapter)]
    if not adapters:
        raise ValueError("model_or_adapters holds no SNELL/SNELLA adapter")
    unbuilt = [type(a).__name__ for a in adapters if not a.is_built]
    if unbuilt:
        raise ValueError(
            f"every adapter must be built (registered on a layer) before the Allocator sees it; "
            f"{len(unbuilt)} are not"
        )
    return adapters


def capped_allocation(scores: torch.Tensor, budget: int, caps: torch.Tensor) -> torch.Tensor:
    r"""Split an integer ``budget`` over layers in proportion to ``scores``, each capped.

    Water-filling: the real allocation is :math:`a_l = \min(c_l, \lambda s_l)` with :math:`\lambda`
    chosen so that :math:`\sum_l a_l = B` (what the official loop of "allocate, cap, redistribute
    the remainder proportionally" converges to). It is then rounded to integers that sum to exactly
    :math:`B` (largest remainders first), never above a cap. Layers with score 0 get nothing unless
    the positive-score layers are all full; then the rest goes by capacity.

    Args:
        scores: non-negative ``(L,)`` scores.
        budget: total count :math:`B`, in ``[0, sum(caps)]``.
        caps: positive integer ``(L,)`` capacities.

    Returns:
        ``int64`` tensor ``(L,)`` summing to ``budget``.

    Example:
        >>> capped_allocation(torch.tensor([0.7, 0.2, 0.1]), 100, torch.tensor([50, 100, 100]))
        tensor([50, 33, 17])
    """
    caps = caps.to(torch.float64)
    budget = check_int(budget, "budget", low=0, high=int(caps.sum()))
    allocation = torch.zeros_like(caps)
    # Second pass by capacity: only reached when every positive-score layer is full.
    for weights in (scores.to(torch.float64).clamp_min(0), caps):
        open_layers = (weights > 0) & (allocation < caps)
        remaining = budget - float(allocation.sum())
        # Each round either places the whole remainder or fills at least one more layer, so it
        # ends within L rounds; the last unit is placed by the integer rounding below.
        while remaining >= 1 and bool(open_layers.any()):
            share = remaining * weights * open_layers / float(weights[open_layers].sum())
            allocation = torch.minimum(allocation + share, caps)
            open_layers &= allocation < caps
            remaining = budget - float(allocation.sum())
    counts = allocation.floor()
    shortfall = budget - int(counts.sum())
    if shortfall > 0:
        room = (caps - counts) > 0
        remainder = torch.where(room, allocation - counts, torch.full_like(counts, -1.0))
        order = torch.argsort(remainder, descending=True, stable=True)[:shortfall]
        counts[order] += 1
    return counts.to(torch.int64)


class Allocator:
    r"""SNELLA's bi-level budget: importance-weighted, cubic-scheduled non-zero counts per layer.

    The training loop calls :meth:`step` after every ``backward()`` and :meth:`update_budget`
    whenever the budget should move (the official code: once per epoch, ``total_steps`` = epochs).

    **Importance** (AdaLoRA-style sensitivity times uncertainty), for each adapter's point tensors
    :math:`p \in \{\mathrm{In}, \mathrm{Out}\}`, with :math:`I = |p \odot \nabla p|` (NaN as 0):

    .. math::

        \bar I \leftarrow \beta_1 \bar I + (1 - \beta_1) I, \qquad
        \bar U \leftarrow \beta_2 \bar U + (1 - \beta_2) |I - \bar I|, \qquad
        \mathrm{score}_l = \overline{\bar I \bar U}_{\mathrm{In}} + \overline{\bar I \bar U}_{\mathrm{Out}},

    normalised to sum 1 over layers (uniform when all are zero).

    **Budget** (total kept entries), with :math:`n_l = d_{out} d_{in}` of layer :math:`l`,
    :math:`B_0 = \sum_l \mathrm{keep}_l` at construction and :math:`B_T = \sum_l n_l -
    \mathrm{round}(s_T n_l)` for the target sparsity :math:`s_T`:

    .. math::

        B(t) = \begin{cases} B_0 & t \le t_0 \\ B_T & t > T - t_1 \\
        \lfloor B_T + (B_0 - B_T)\,\big(1 - \tfrac{t - t_0}{T - t_1 - t_0}\big)^3 \rfloor
        & \text{otherwise} \end{cases}

    with :math:`t_0` = ``init_warmup`` and :math:`t_1` = ``final_warmup``. After the initial warmup,
    :meth:`update_budget` splits :math:`B(t)` over layers in proportion to their scores, capped at
    :math:`n_l` with the remainder redistributed (:func:`capped_allocation`), and sets each
    layer's kept count; within a layer the largest :math:`|\Delta W|` win.

    State is tensors only (:meth:`state_dict`), so a checkpoint loads with ``weights_only=True``.

    Args:
        model_or_adapters: a model holding built :class:`SNELLParam`/:class:`SNELLAParam` adapters (found
            through ``modules()``), or an iterable of them.
        target_sparsity: :math:`s_T \in [0, 1)`, the final fraction of zeroed entries.
        total_steps: :math:`T > t_0 + t_1`, the number of budget updates.
        init_warmup: :math:`t_0 \ge 0` updates at the initial budget.
        final_warmup: :math:`t_1 \ge 0` final updates at the target budget.
        beta1: EMA factor of the sensitivity, in (0, 1).
        beta2: EMA factor of the uncertainty, in (0, 1).

    Example:
        >>> from decomp.adapters import SNELLAParam, Allocator
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        >>> for layer in model:
        ...     _ = torch.nn.utils.parametrize.register_parametrization(layer, "weight", SNELLAParam(rank=2))
        >>> allocator = Allocator(model, target_sparsity=0.5, total_steps=3)
        >>> model(torch.randn(5, 8)).square().sum().backward()
        >>> allocator.step()
        >>> int(allocator.budget(3)), int(allocator.update_budget(3).sum())
        (48, 48)
    """

    def __init__(
        self,
        model_or_adapters: nn.Module | Iterable[nn.Module],
        target_sparsity: float,
        total_steps: int,
        init_warmup: int = 0,
        final_warmup: int = 0,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ) -> None:
        self.adapters = _kernel_adapters(model_or_adapters)
        self.target_sparsity = check_real(target_sparsity, "target_sparsity", low=0.0, high=1.0, low_inclusive=True)
        self.init_warmup = check_int(init_warmup, "init_warmup", low=0)
        self.final_warmup = check_int(final_warmup, "final_warmup", low=0)
        self.total_steps = check_int(
            total_steps, "total_steps", low=self.init_warmup + self.final_warmup + 1
        )
        self.beta1 = check_real(beta1, "beta1", low=0.0, high=1.0)
        self.beta2 = check_real(beta2, "beta2", low=0.0, high=1.0)
        self.caps = torch.tensor([a.num_entries for a in self.adapters], dtype=torch.int64)
        self.initial_budget = sum(a.keep_count for a in self.adapters)
        self.target_budget = sum(
            n - round(self.target_sparsity * n) for n in self.caps.tolist()
        )
        self.exp_avg_importance = [self._zeros_like_points(a) for a in self.adapters]
        self.exp_avg_uncertainty = [self._zeros_like_points(a) for a in self.adapters]

    @staticmethod
    def _zeros_like_points(adapter: _KernelAdapter) -> list[torch.Tensor]:
        return [torch.zeros_like(adapter.in_points), torch.zeros_like(adapter.out_points)]

    @torch.no_grad()
    def step(self) -> None:
        """Fold the current gradients into the importance EMAs (call after ``backward()``)."""
        for adapter, importances, uncertainties in zip(
            self.adapters, self.exp_avg_importance, self.exp_avg_uncertainty
        ):
            for points, importance, uncertainty in zip(
                (adapter.in_points, adapter.out_points), importances, uncertainties
            ):
                if points.grad is None:  # the layer kept no entry, or was not in the graph
                    sensitivity = torch.zeros_like(points)
                else:
                    sensitivity = torch.nan_to_num((points * points.grad).abs(), nan=0.0)
                importance.mul_(self.beta1).add_(sensitivity, alpha=1 - self.beta1)
                uncertainty.mul_(self.beta2).add_((sensitivity - importance).abs(), alpha=1 - self.beta2)

    def scores(self) -> torch.Tensor:
        """Per-layer importance scores, ``float64`` on the CPU, summing to 1."""
        raw = torch.stack(
            [
                sum((i * u).mean().to(device="cpu", dtype=torch.float64) for i, u in zip(imp, unc))
                for imp, unc in zip(self.exp_avg_importance, self.exp_avg_uncertainty)
            ]
        )
        total = raw.sum()
        if total <= 0:
            return torch.full_like(raw, 1.0 / len(raw))
        return raw / total

    def budget(self, t: int) -> int:
        """The scheduled total of kept entries at update ``t`` (cubic decay between the warmups)."""
        t = check_int(t, "t", low=0)
        if t <= self.init_warmup:
            return self.initial_budget
        if t > self.total_steps - self.final_warmup:
            return self.target_budget
        decay_length = self.total_steps - self.final_warmup - self.init_warmup
        remaining = 1.0 - (t - self.init_warmup) / decay_length
        return math.floor(
            self.target_budget + (self.initial_budget - self.target_budget) * remaining**3
        )

    def update_budget(self, t: int) -> torch.Tensor:
        """Set each layer's kept count from the budget at ``t`` and the scores; return the counts.

        During the initial warmup (``t <= init_warmup``) the layers keep their own counts.
        """
        total = self.budget(t)
        if t <= self.init_warmup:
            return torch.tensor([a.keep_count for a in self.adapters], dtype=torch.int64)
        counts = capped_allocation(self.scores(), total, self.caps)
        for adapter, keep in zip(self.adapters, counts.tolist()):
            adapter.set_keep_count(keep)
        return counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMAs and the layers' kept counts, tensors only."""
        state = {"keep_counts": torch.tensor([a.keep_count for a in self.adapters])}
        for index, (imp, unc) in enumerate(zip(self.exp_avg_importance, self.exp_avg_uncertainty)):
            for part, i, u in zip(("in", "out"), imp, unc):
                state[f"{index}.{part}.importance"] = i.clone()
                state[f"{index}.{part}.uncertainty"] = u.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (for the same adapters), atomically.

        All of ``state`` is checked before anything changes: its keys (none missing, none
        unexpected), ``keep_counts`` (an integer vector with one count in :math:`[0, n_l]` per
        adapter) and every EMA (a finite, non-negative floating tensor of its point tensor's
        shape). A mismatch raises ``ValueError`` and leaves the Allocator and its adapters' kept
        counts as they were.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
        keep_counts = state.get("keep_counts")
        adapters = len(self.adapters)
        if not isinstance(keep_counts, torch.Tensor) or keep_counts.shape != (adapters,):
            found = keep_counts.numel() if isinstance(keep_counts, torch.Tensor) else "no"
            raise ValueError(f"state is for {found} adapters, this Allocator has {adapters}")
        if keep_counts.is_floating_point() or keep_counts.is_complex() or keep_counts.dtype == torch.bool:
            raise ValueError(f"keep_counts must be an integer tensor, got {keep_counts.dtype}")
        emas = {
            f"{index}.{part}.{kind}": target
            for index, (imp, unc) in enumerate(
                zip(self.exp_avg_importance, self.exp_avg_uncertainty)
            )
            for part, i, u in zip(("in", "out"), imp, unc)
            for kind, target in (("importance", i), ("uncertainty", u))
        }
        missing = sorted(emas.keys() - state.keys())
        unexpected = sorted(map(str, state.keys() - emas.keys() - {"keep_counts"}))
        if missing or unexpected:
            raise ValueError(
                f"state does not fit this Allocator: missing {missing}, unexpected {unexpected}"
            )
        counts = keep_counts.tolist()
        for index, (count, cap) in enumerate(zip(counts, self.caps.tolist())):
            if not 0 <= count <= cap:
                raise ValueError(f"keep_counts[{index}] must be in [0, {cap}], got {count}")
        for key, target in emas.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"state[{key!r}] must be a floating tensor")
            if value.shape != target.shape:
                raise ValueError(
                    f"state[{key!r}] has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                )
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise ValueError(f"state[{key!r}] must be finite and non-negative (an EMA of |p g|)")
        for adapter, count in zip(self.adapters, counts):
            adapter.set_keep_count(count)
        for key, target in emas.items():
            target.copy_(state[key])
