r"""LieRA: a multiplicative update :math:`W' = W \odot \exp(\Delta W)` on the Hadamard Lie group.

Tensors with non-zero entries form an abelian group under the elementwise product; its Lie
algebra is all tensors and its exponential is the elementwise :math:`\exp` (Si et al., ICCV 2025,
arXiv 2504.00851). A low-rank :math:`\Delta W` then gives a (generally) full-rank update that
keeps :math:`W`'s structure: every entry is rescaled, none is created.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .. import Tucker
from .._checks import check_optional_int, check_real
from .base import AdapterParam, fan_in, option

# below this |1 + dW| the first-order update has (nearly) zeroed an entry, which no weight inverts
_FIRST_ORDER_PIVOT = 1e-6


def _check_order(order: object, name: str) -> int | None:
    # A choice between two values, not a range: anything else, a bool or the float 1.0 included,
    # is an unknown choice (ValueError); a numpy 1 is stored as the Python int.
    if order is None:
        return None
    if isinstance(order, numbers.Integral) and not isinstance(order, bool) and order == 1:
        return 1
    raise ValueError(f"{name} must be None (exact exp) or 1 (first order), got {order!r}")


class LieParam(AdapterParam):
    r"""LieRA: :math:`W' = W \odot \exp(\Delta W)` (exact) or :math:`W + W \odot \Delta W` (``order=1``).

    The update :math:`\Delta W` (same shape as :math:`W`) is

    * **linear** :math:`(d_{out}, d_{in})`: LoRA's :math:`\Delta W = s\, B A`,
      :math:`B \in \mathbb{R}^{d_{out} \times r}` zero-initialised,
      :math:`A \in \mathbb{R}^{r \times d_{in}}` kaiming-uniform (:math:`a = \sqrt 5`), as in the
      official code;
    * **conv** :math:`(c_{out}, c_{in}/g, k_1, \dots, k_n)`: natively on the kernel, a Tucker-2
      over the channel modes with a full spatial core,
      :math:`\Delta W = s\, G \times_0 U_{out} \times_1 U_{in}`, :math:`G \in \mathbb{R}^{r \times r
      \times k_1 \times \cdots \times k_n}`, :math:`U_{out} \in \mathbb{R}^{c_{out} \times r}`
      zero-initialised (LoRA's :math:`B`), :math:`U_{in} \in \mathbb{R}^{c_{in}/g \times r}`
      kaiming-uniform as LoRA's :math:`A` on :math:`c_{in}/g` inputs, each column then rescaled
      to its expected norm :math:`1/\sqrt 3` (on a 1-channel input, :math:`r = 1`, one draw
      would otherwise set the layer's whole step), and :math:`G` uniform of
      variance :math:`1/(r \prod_j k_j)`, so that :math:`G \times_1 U_{in}` has LoRA's
      :math:`A` variance :math:`1/(3n)` on the conv's fan-in :math:`n`. No reshape to a
      matrix: every kernel tap gets its own :math:`r \times r` channel mixing.

    ``order=None`` (default) is the exact group exponential :math:`W \odot \exp(\Delta W)`;
    ``order=1`` is the official code's first-order truncation :math:`W \odot (1 + \Delta W) = W +
    W \odot \Delta W`. Both keep zero weights at zero (LieRA cannot adapt an entry that is exactly
    zero). The exact form can never flip a weight's sign (:math:`\exp > 0`); the first-order one
    can, where :math:`\Delta W < -1`.

    **Init:** :math:`U_{out} = 0` (:math:`B = 0`) gives :math:`\Delta W = 0`, so
    :math:`W' = W` exactly: the layer's output at init is the pretrained output.

    **Inverse** (:meth:`decompose`, run when a weight is assigned to the parametrized layer):
    :math:`W = W' \odot \exp(-\Delta W)` (exact: :math:`\exp` never vanishes) or
    :math:`W = W' / (1 + \Delta W)` (``order=1``), which raises ``ValueError`` where
    :math:`|1 + \Delta W| < 10^{-6}` (such an entry of :math:`W'` is zero whatever :math:`W` is).

    Trainable parameters (closed form, :meth:`trainable_count`): linear :math:`r(d_{out} + d_{in})`,
    the same as LoRA at rank :math:`r` (the authors' "+0"); conv
    :math:`r(c_{out} + c_{in}/g) + r^2 \prod_j k_j`.

    Args:
        rank: :math:`r`, an int in :math:`[1, \min(d_0, d_1)]`; ``None`` (default) is
            :math:`\min(8, d_0, d_1)`, lowered until the count is at most the weight's size
            (``ValueError`` where even :math:`r = 1` trains more, e.g. a ``(1, n)`` weight); an
            explicit ``rank`` is kept.
        scale: :math:`s`, a finite real > 0, or ``None`` (default): :math:`s = \sqrt{3n}`,
            :math:`n` the fan-in (:func:`~decomp.adapters.base.fan_in`), the inverse standard
            deviation of the Kaiming-uniform factor :math:`A` (:math:`1/\sqrt{3n}`). The
            exponent's first Adam step (:math:`B` moved by :math:`\pm\eta`) then has entries of
            RMS about :math:`\eta \sqrt{r}`, so every entry of :math:`W` moves by about that
            fraction of itself, the relative step LoRA's :math:`\alpha = r` takes (issue 12:
            with the official :math:`s = \alpha / r = 1` the steps were about
            :math:`\sqrt{3n}` times, 50x on the adapters benchmark's convs, smaller). An
            explicit number is used as it is (1.0: the official code's ``lora_alpha / r``). The
            value in use is the attribute ``applied_scale`` of the built adapter.
        order: ``None`` (exact exponential, default) or ``1`` (first-order).

    Raises:
        TypeError: ``rank`` is not an int or ``None``, or ``scale`` not a real number (numpy
            numbers are accepted and stored as Python ones).
        ValueError: ``rank`` below 1 or above :math:`\min(d_0, d_1)` (checked when built on a
            weight), ``scale`` not finite or :math:`\le 0` (zero would freeze the update at zero),
            ``order`` not ``None`` or the int ``1`` (``True`` and
            ``1.0`` included).

    Differences from the official code: it runs the first-order form as a parallel branch
    ``x @ (W * sBA).T``; here both forms are a weight parametrization (so merging is exact), the
    exact exponential is the default, and conv kernels (no official code; the paper reshapes
    to a matrix, which one is unstated) get the native Tucker-2 form.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(12, 6)
        >>> x = torch.randn(3, 12)
        >>> before = layer(x)
        >>> _ = parametrize.register_parametrization(layer, "weight", LieParam(rank=2))
        >>> torch.equal(layer(x), before)                 # B = 0: identity at init
        True
        >>> layer.parametrizations.weight[0].num_trainable()   # 2 * (6 + 12), LoRA's count
        36
    """

    rank: int | None = option(None, check_optional_int, low=1)
    # None: sqrt(fan_in), the one-learning-rate rule, resolved per layer in _build
    scale: float | None = option(None, check_real, keyword_only=True, optional=True, low=0.0)
    order: int | None = option(None, _check_order, keyword_only=True)

    def _count(self, shape: tuple[int, ...]) -> int:
        """Closed form: :math:`r(d_0 + d_1)`, plus :math:`r^2 \\prod_j k_j` for a conv kernel
        (``scale`` and ``order`` do not change it).

        >>> LieParam.trainable_count((64, 32), rank=4), LieParam.trainable_count((64, 32, 3, 3), rank=4)
        (384, 528)
        """
        return self._count_at_rank(shape, self._rank(shape))

    @staticmethod
    def _count_at_rank(shape: tuple[int, ...], r: int) -> int:
        count = r * (shape[0] + shape[1])
        if len(shape) > 2:
            count += r * r * math.prod(shape[2:])
        return count

    def _rank(self, shape: tuple[int, ...]) -> int:
        return self._resolved_channel_rank(shape, self.rank, lambda r: self._count_at_rank(shape, r))

    def _build(self, weight: torch.Tensor) -> None:
        r = self._rank(tuple(weight.shape))
        # 1 / std of the kaiming_uniform(a=sqrt(5)) factor, 1 / sqrt(3 n): the exponent's entries
        # then move by about lr * sqrt(r) per first Adam step (see the scale argument)
        self.applied_scale = math.sqrt(3 * fan_in(weight.shape)) if self.scale is None else self.scale
        like = {"dtype": weight.dtype, "device": weight.device}
        self.out_factor = nn.Parameter(torch.zeros(weight.shape[0], r, **like))
        if weight.ndim == 2:
            self.in_factor = nn.Parameter(_kaiming_uniform((r, weight.shape[1]), **like))
        else:
            # U_in drawn as (r, c_in): variance 1 / (3 c_in), LoRA's A on c_in inputs; the core at
            # variance 1 / (r prod(kernel)), so the r-term product (core x U_in) has variance
            # 1 / (3 n), LoRA's A on this conv's fan-in, which the scale rule assumes (with the
            # core Kaiming-uniform too it had 1 / (9 n): first steps sqrt(3) smaller than on a
            # linear layer). A row-major copy even where a size-1 dim lets .contiguous() keep the
            # transposed strides. Each of U_in's r columns is rescaled to its expected norm
            # 1/sqrt(3): on a 1-channel input (a stem, a depthwise conv: r = 1) U_in is a single
            # draw from U(-1, 1), which set the layer's whole step (below 1/3 of the rule's one
            # time in five).
            draw = _kaiming_uniform((r, weight.shape[1]), **like)
            expected_norm = 1 / math.sqrt(3)
            in_factor = (draw * (expected_norm / draw.norm(dim=1, keepdim=True).clamp_min(1e-30))).T
            self.in_factor = nn.Parameter(in_factor.clone(memory_format=torch.contiguous_format))
            self.core = nn.Parameter(_kaiming_uniform((r, r, *weight.shape[2:]), gain_slope=1.0, **like))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        out_factor = self.out_factor.to(weight.dtype)
        if weight.ndim == 2:
            return self.applied_scale * (out_factor @ self.in_factor.to(weight.dtype))
        factors = (out_factor, self.in_factor.to(weight.dtype))
        return self.applied_scale * Tucker(self.core.to(weight.dtype), factors, (0, 1)).to_tensor()

    def compose(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.order == 1:
            return weight + weight * delta
        return weight * torch.exp(delta)

    def decompose(self, value: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.order == 1:
            multiplier = 1 + delta
            if bool((multiplier.abs() < _FIRST_ORDER_PIVOT).any()):
                raise ValueError(
                    "LieParam(order=1) cannot invert the assigned weight: 1 + delta is within "
                    f"{_FIRST_ORDER_PIVOT} of zero at some entry, where every weight maps to 0"
                )
            return value / multiplier
        return value * torch.exp(-delta)


def _kaiming_uniform(
    shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device, gain_slope: float = math.sqrt(5)
) -> torch.Tensor:
    # kaiming_uniform_ with a = gain_slope: variance 2 / ((1 + a^2) fan_in); the default sqrt(5) is
    # nn.Linear's init (1 / (3 fan_in)), as the official code's lora_A, and a = 1 gives 1 / fan_in.
    # Drawn in fp32 so half-precision weights get the same distribution.
    tensor = torch.empty(shape, dtype=torch.float32, device=device)
    nn.init.kaiming_uniform_(tensor, a=gain_slope)
    return tensor.to(dtype)
