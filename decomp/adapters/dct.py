r"""LoCA-style DCT-location adapter: a few trainable DCT-II coefficients of the weight update.

:class:`DCTParam` trains ``n`` coefficients of the 2-D orthonormal DCT spectrum of
:math:`\Delta W` (the weight's ``(shape[0], -1)`` matrix view) at fixed frequency locations and
maps them back with :func:`decomp.idct` along both dims.
"""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

import torch
from torch import nn

from .._checks import check_choice, check_int, check_optional_int, check_real
from .._dct import _OrthonormalDCT, dct, idct
from .._deprecation import renamed_arguments
from .base import AdapterParam, matrix_dims, matrix_view, option

_LOCATION_RULES = ("magnitude", "low", "random")


@renamed_arguments(alpha="scale")
class DCTParam(AdapterParam):
    r"""LoCA-style: :math:`W' = W + c\, C^\top S D`, ``n`` trainable DCT coefficients in :math:`S`.

    With the weight's ``(shape[0], -1)`` matrix view of shape :math:`m \times n_\mathrm{in}`
    (``(d_out, d_in)`` for a linear layer, ``(c_out, c_in/groups * prod(kernel))`` for a conv),
    :math:`C` (:math:`m \times m`) and :math:`D` (:math:`n_\mathrm{in} \times n_\mathrm{in}`) the
    orthonormal DCT-II matrices (:func:`decomp.dct_matrix`) and :math:`S` zero except the
    trainable coefficients :math:`a \in \mathbb{R}^n` at the frozen flat locations :math:`\ell`:

    .. math::

        \Delta W = c\, C^\top S D
        = c\, \operatorname{idct}_1\!\big(\operatorname{idct}_0(S)\big),
        \qquad S_{\ell_j} = a_j,

    computed with :func:`decomp.idct` along dim 0 then dim 1 (an FFT for long dims, a cached
    basis product for short ones), reshaped back to the weight's shape. As :math:`C, D` are
    orthonormal, :math:`\|\Delta W\|_F = c \|a\|_2`, so :math:`c = 1` (default) keeps the
    coefficients on the weights' scale (FourierFT's large scale compensates an unnormalised FFT).

    **Trainable parameters:** :math:`n` (``num_coefficients``). **Init:** :math:`a = 0`, so
    :math:`\Delta W = 0` and the layer reproduces its pretrained output exactly.

    **Branch** (:meth:`branch`, a linear layer under :func:`decomp.adapters.apply`): a DCT of
    each token, a gather, a scatter and an inverse DCT, :math:`O(m \log m + n_\mathrm{in} \log
    n_\mathrm{in} + n)` flops per token, five such transforms forward and backward (the weight
    path: an :math:`m \times n_\mathrm{in}` inverse 2-D DCT per step and
    :math:`\partial L/\partial W'`, :math:`2 m n_\mathrm{in}` flops per token); it saves ``x``
    (as LoRA's down-projection does), the coefficients and their indices for backward, not the
    ``(..., n)`` gathered spectrum (which plain autograd keeps twice).

    Locations (chosen once, at build, deterministically; stored as the ``locations`` buffer of
    flat indices into :math:`S`, sorted):

    * ``"magnitude"`` (default): the ``n`` largest-magnitude coefficients of the weight's own 2-D
      DCT, :math:`|C M D^\top|` -- the frequencies the pretrained weight already uses. For a conv
      the column axis mixes channels and kernel taps, so "low frequency" has no spatial meaning
      there, while the weight's spectrum is meaningful for any layout.
    * ``"low"``: the lowest frequencies, ordered by :math:`k_\mathrm{row} + k_\mathrm{col}`, then
      :math:`k_\mathrm{row}`.
    * ``"random"``: uniform without replacement, seeded by ``seed`` (FourierFT's and LoCA's
      starting point).

    Args:
        num_coefficients: :math:`n`, an int in :math:`[1, m n_\mathrm{in}]`. ``None`` (default)
            means :math:`\min(m + n_\mathrm{in}, m n_\mathrm{in})`, the budget of a rank-1 LoRA
            and never more than the weight's size.
        locations: ``"magnitude"`` (default), ``"low"`` or ``"random"``.
        scale: :math:`c`, a finite real > 0 (default 1.0), a plain multiplier on the update.
            ``alpha=`` is its deprecated name (same meaning; ``DeprecationWarning``).
        seed: seeds ``"random"`` locations (int >= 0, default 0).

    Raises:
        TypeError: ``num_coefficients``/``seed`` not an int (``num_coefficients`` may be
            ``None``), ``scale`` not a real number, ``locations`` not a str; both ``scale`` and
            its deprecated name ``alpha`` given. Numpy numbers are accepted and stored as Python
            ones.
        ValueError: ``locations`` is not one of its choices, ``seed < 0``, ``num_coefficients < 1``,
            ``scale <= 0``; on build, ``num_coefficients > m * n_in``.

    Differences from LoCA: LoCA moves the locations during training by finite-difference
    gradient estimates, alternating with coefficient updates; **that location search is not
    implemented** -- the locations here stay where the rule above puts them. Unlike peft's
    FourierFT (Linear-only, ``randn`` init so :math:`\Delta W \neq 0`, complex ``ifft2``), this is
    real, orthonormal, zero at init and works on convs through the matrix view.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular")
        >>> x = torch.randn(2, 4, 10)
        >>> before = layer(x)
        >>> _ = parametrize.register_parametrization(layer, "weight", DCTParam(num_coefficients=10))
        >>> torch.equal(layer(x), before)
        True
        >>> layer.parametrizations.weight[0].num_trainable(), DCTParam.trainable_count((6, 4, 3))
        (10, 18)
    """

    # Chosen by magnitude, by rule or by the seeded generator: a function of weight and config.
    rebuilt_buffers: ClassVar[tuple[str, ...]] = ("locations",)

    num_coefficients: int | None = option(None, check_optional_int, low=1)
    # the rule's keyword is "locations"; the attribute of that name is the chosen-locations buffer
    locations_rule: str = option("magnitude", check_choice, keyword="locations", choices=_LOCATION_RULES)
    scale: float = option(1.0, check_real, low=0.0)
    seed: int = option(0, check_int, low=0)

    def _count(self, shape: tuple[int, ...]) -> int:
        """``n``: ``num_coefficients``, default ``min(m + n_in, m * n_in)``.

        Example:
            >>> DCTParam.trainable_count((64, 32, 3, 3))
            352
            >>> DCTParam.trainable_count((64, 32), num_coefficients=100)
            100
        """
        rows, columns = matrix_dims(shape)
        if self.num_coefficients is None:
            return min(rows + columns, rows * columns)
        return check_int(self.num_coefficients, "num_coefficients", low=1, high=rows * columns)

    def _choose_locations(self, matrix: torch.Tensor, count: int) -> torch.Tensor:
        rows, columns = matrix.shape
        if self.locations_rule == "magnitude":
            spectrum = dct(dct(matrix, dim=0, check_finite=False), dim=1, check_finite=False)
            chosen = spectrum.abs().flatten().topk(count).indices
        elif self.locations_rule == "low":
            row = torch.arange(rows, device=matrix.device)[:, None]
            column = torch.arange(columns, device=matrix.device)[None, :]
            # Unique keys: total frequency first, then the row frequency breaks ties.
            order_key = (row + column) * rows + row
            chosen = order_key.flatten().topk(count, largest=False).indices
        else:
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(rows * columns, generator=generator)[:count].to(matrix.device)
        return chosen.sort().values

    def _build(self, weight: torch.Tensor) -> None:
        matrix = matrix_view(weight)
        count = self._count(tuple(weight.shape))
        self.register_buffer("locations", self._choose_locations(matrix, count))
        self.coefficients = nn.Parameter(torch.zeros(count, dtype=weight.dtype, device=weight.device))

    def _state_problems(self, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
        problems = super()._state_problems(state)
        locations = state.get("locations")
        if locations is not None:
            size = math.prod(self.weight_shape)
            # delta scatters the coefficients: a repeated location would keep one of them only.
            low, high = int(locations.min()), int(locations.max())
            values, counts = locations.unique(return_counts=True)
            if low < 0 or high >= size:
                problems["locations"] = f"must be flat indices in [0, {size}), got {low} to {high}"
            elif bool((counts > 1).any()):
                repeated = values[counts > 1][:8].tolist()
                problems["locations"] = f"must be distinct, got {repeated} more than once"
        return problems

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.shape[0]
        columns = weight.numel() // rows
        flat_spectrum = torch.zeros(rows * columns, dtype=weight.dtype, device=weight.device)
        coefficients = self.coefficients.to(weight.dtype)
        spectrum = flat_spectrum.scatter(0, self.locations, coefficients).view(rows, columns)
        update = idct(idct(spectrum, dim=0, check_finite=False), dim=1, check_finite=False)
        return (self.scale * update).reshape(weight.shape)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`x \Delta W^\top = c \operatorname{idct}\big(\operatorname{scatter}_\mathrm{rows}
        (\operatorname{dct}(x)_{\mathrm{cols}} \odot a)\big)`, by :class:`_SparseSpectrumProduct`."""
        columns_count = self.weight_shape[1]
        rows, columns = self.locations.div(columns_count, rounding_mode="floor"), self.locations % columns_count
        coefficients = self.scale * self.coefficients.to(x.dtype)
        # Gathers along the last dim of a 2-D view run about 7x faster than of a 3-D one (CPU).
        tokens = x.reshape(-1, columns_count)
        product = _SparseSpectrumProduct.apply(tokens, coefficients, rows, columns, self.weight_shape[0])
        return product.view(*x.shape[:-1], self.weight_shape[0])


def _last_dim_transform(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """:func:`decomp.dct` (or ``idct``) along the last dim, differentiably, without its checks:
    ``x`` is already in its compute dtype, and an empty batch (which the public functions refuse)
    is a valid input to a linear layer."""
    return _OrthonormalDCT.apply(x, x.ndim - 1, inverse)


class _SparseSpectrumProduct(torch.autograd.Function):
    r""":math:`y = \operatorname{idct}(Z)`, :math:`Z_{\ldots, r_k} \mathrel{+}= X_{\ldots, c_k} a_k`,
    :math:`X = \operatorname{dct}(x)`: :math:`x (C^\top S D)^\top` for ``x`` ``(..., n)``, the
    coefficients ``a`` ``(k,)`` at rows ``r`` and columns ``c`` of :math:`S` (``m x n``).

    Plain autograd saves the gathered :math:`X_{\ldots, c}` (``(..., k)``; at the default
    :math:`k = m + n` twice ``x``'s size) twice, for :math:`\partial L/\partial a` and the
    scatter's shape. This saves ``x`` (as LoRA's down-projection does) and recomputes
    :math:`X_{\ldots, c}` in backward, one more DCT and gather per token (measured at 4096 wide,
    1024 tokens, one CPU thread: 250 ms per step instead of 215 ms, 0.2 MiB saved beyond ``x``
    instead of 64 MiB). With :math:`G = \operatorname{dct}(\partial L/\partial y)_{\ldots, r}`
    (idct's adjoint is dct, as both are orthonormal; the scatter's adjoint is the gather):

    .. math::

        \frac{\partial L}{\partial a_k} = \sum_{\ldots} G_{\ldots, k} X_{\ldots, c_k},
        \qquad \frac{\partial L}{\partial x} = \operatorname{idct}
        \big(\operatorname{scatter}_c(G \odot a)\big).

    The backward is made of differentiable ops, so double backward works (``create_graph=True``,
    ``torch.autograd.gradgradcheck``).
    """

    @staticmethod
    def forward(
        x: torch.Tensor, coefficients: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, rows_count: int
    ) -> torch.Tensor:
        products = _last_dim_transform(x, inverse=False).index_select(-1, columns).mul_(coefficients)
        spectrum = products.new_zeros(*x.shape[:-1], rows_count).index_add_(-1, rows, products)
        return _last_dim_transform(spectrum, inverse=True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, coefficients, rows, columns, _ = inputs
        ctx.save_for_backward(x, coefficients, rows, columns)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, coefficients, rows, columns = ctx.saved_tensors
        grad_products = _last_dim_transform(grad, inverse=False).index_select(-1, rows)
        grad_x = grad_coefficients = None
        if ctx.needs_input_grad[1]:
            gathered = _last_dim_transform(x, inverse=False).index_select(-1, columns)
            grad_coefficients = (grad_products * gathered).reshape(-1, columns.numel()).sum(0)
        if ctx.needs_input_grad[0]:
            spectrum = grad_products.new_zeros(x.shape).index_add(-1, columns, grad_products * coefficients)
            grad_x = _last_dim_transform(spectrum, inverse=True)
        return grad_x, grad_coefficients, None, None, None
