r"""LoCA-style DCT-location adapter: a few trainable DCT-II coefficients of the weight update.

:class:`DCTParam` trains ``n`` coefficients of the 2-D orthonormal DCT spectrum of
:math:`\Delta W` (the weight's ``(shape[0], -1)`` matrix view) at fixed frequency locations and
maps them back with :func:`decomp.idct` along both dims.
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterator, Mapping

import torch
from torch import nn

from .._checks import check_choice, check_int, check_optional_int, check_real
from .._dct import _MATMUL_MAX_N, _makhoul_plan, _OrthonormalDCT, dct, idct
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
    :math:`\partial L/\partial W'`, :math:`2 m n_\mathrm{in}` flops per token). It runs in
    chunks of tokens, gathering straight from (and scattering straight into) the rfft's half
    spectrum, so no ``(..., n)`` gathered spectrum exists at any time, and saves ``x`` (as
    LoRA's down-projection does), the coefficients and their indices for backward. Measured on
    stacks of 1024- and 4096-wide layers, 1024 tokens, one CPU thread, one AdamW step: peak
    memory 0.99x and 1.00x peft LoRA r=8's, step time 1.6x and 1.2x (the unchunked version:
    1.32x and 1.28x the memory, 2.0x and 1.4x the time).

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


# Elements one chunk of tokens may span across its per-token intermediates (see _token_chunks).
# CPU: 2**20 keeps a chunk's intermediates in cache, 256 tokens at 1024 wide and 64 at 4096 (default
# count). Measured, one thread, forward + backward of one layer: half and twice that many tokens
# were 5-50% slower at 1024 wide (per-op overhead, then cache misses), up to 10% either way at 4096.
# Elsewhere the budget only bounds the memory (16 MiB fp32); not measured on a GPU.
_CHUNK_ELEMENTS = {"cpu": 2**20}
_DEFAULT_CHUNK_ELEMENTS = 2**22


def _token_chunks(tokens: int, width: int, device: torch.device) -> Iterator[slice]:
    """Consecutive row slices covering ``range(tokens)``, each of at most ``budget // width`` rows
    (at least one), where ``width`` is the elements a token occupies across the intermediates."""
    size = max(1, _CHUNK_ELEMENTS.get(device.type, _DEFAULT_CHUNK_ELEMENTS) // max(1, width))
    for start in range(0, tokens, size):
        yield slice(start, min(start + size, tokens))


class _GatheredDCT:
    r""":math:`\operatorname{dct}(x)_{\ldots, \mathrm{index}}` of ``(tokens, n)`` chunks, set up once per call.

    Above ``decomp``'s matmul threshold it runs :func:`decomp.dct`'s own rfft algorithm and
    gathers the requested coefficients straight out of the twiddled spectrum (the composed index
    ``coefficient_order[index]``), skipping the full-length reordering pass: the same floating
    point operations as ``dct`` then ``index_select``.
    """

    def __init__(self, n: int, index: torch.Tensor, dtype: torch.dtype) -> None:
        self.index = index
        self.plan = _makhoul_plan(n, dtype, index.device) if n > _MATMUL_MAX_N else None
        if self.plan is not None:
            self.spectrum_index = self.plan.coefficient_order[index]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            return _last_dim_transform(x, inverse=False).index_select(-1, self.index)
        spectrum = torch.fft.rfft(x.index_select(-1, self.plan.reversed_v), dim=-1)
        spectrum *= self.plan.forward_twiddle
        return torch.view_as_real(spectrum).flatten(-2).index_select(-1, self.spectrum_index)


class _ScatteredIDCT:
    r""":math:`\operatorname{idct}(Z)` with :math:`Z_{\ldots, \mathrm{index}_k} \mathrel{+}= v_{\ldots, k}`
    (an index may repeat), for ``(tokens, k)`` chunks of ``v``, set up once per call.

    Above ``decomp``'s matmul threshold it runs :func:`decomp.idct`'s rfft algorithm, adding
    :math:`v` straight into the interleaved real view of its half spectrum: frequency :math:`r`
    is the real part of bin :math:`r` for :math:`r \le n/2` and the imaginary part of bin
    :math:`n - r` above (for even :math:`n`, :math:`X_{n/2}` is both), which skips the
    zero-filled length-``n`` spectrum, its mirror gather and the ``complex`` pass: the same sums,
    in the same order, as ``index_add`` then ``idct`` (whose bin-0 imaginary part, ignored by the
    irfft, is 0 here).
    """

    def __init__(self, n: int, index: torch.Tensor, dtype: torch.dtype) -> None:
        self.n, self.index = n, index
        self.plan = _makhoul_plan(n, dtype, index.device) if n > _MATMUL_MAX_N else None
        if self.plan is not None:
            # Frequency r's place in the interleaved half spectrum, as the forward reads it.
            self.spectrum_index = self.plan.coefficient_order[index]

    def __call__(self, values: torch.Tensor, out: torch.Tensor) -> None:
        """Write the result for ``values`` ``(tokens, k)`` into ``out`` ``(tokens, n)``, a contiguous view."""
        tokens = values.shape[0]
        if self.plan is None:
            spectrum = values.new_zeros(tokens, self.n).index_add_(-1, self.index, values)
            out.copy_(_last_dim_transform(spectrum, inverse=True))
            return
        bins = self.n // 2 + 1
        interleaved = values.new_zeros(tokens, 2 * bins).index_add_(-1, self.spectrum_index, values)
        if self.n % 2 == 0:
            interleaved[:, 2 * bins - 1] = interleaved[:, 2 * bins - 2]
        spectrum = torch.view_as_complex(interleaved.view(tokens, bins, 2))
        spectrum *= self.plan.inverse_twiddle
        reversed_output = torch.fft.irfft(spectrum, n=self.n, dim=-1)
        torch.index_select(reversed_output, -1, self.plan.output_order, out=out)


def _spectrum_pass(
    source: torch.Tensor,
    source_index: torch.Tensor,
    coefficients: torch.Tensor | None = None,
    target_index: torch.Tensor | None = None,
    target_size: int = 0,
    partner: torch.Tensor | None = None,
    partner_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    r"""The branch's two kernels in one pass over chunks of tokens, sharing the gathered spectrum
    :math:`S = \operatorname{dct}(\mathrm{source})_{\ldots, \mathrm{source\_index}}` (``(T, k)``):

    * with ``coefficients``: :math:`\operatorname{idct}(\operatorname{scatter}_{\mathrm{target\_index}}
      (S \odot a))`, ``(T, target_size)``;
    * with ``partner``: :math:`\sum_t S_{t, k} \operatorname{dct}(\mathrm{partner})_{t,
      \mathrm{partner\_index}_k}`, ``(k,)``;

    either ``None`` when not asked for. No ``(T, k)`` tensor is formed: each chunk of
    :func:`_token_chunks` runs to completion before the next, so the transient memory is one
    chunk's. Plain tensor ops, not recorded by autograd (the Functions below define the gradients).
    """
    tokens, count = source.shape[0], source_index.numel()
    gather = _GatheredDCT(source.shape[1], source_index, source.dtype)
    width = source.shape[1] + count
    output = cross = None
    if coefficients is not None:
        scatter = _ScatteredIDCT(target_size, target_index, source.dtype)
        output = source.new_empty(tokens, target_size)
        width += target_size
    if partner is not None:
        gather_partner = _GatheredDCT(partner.shape[1], partner_index, source.dtype)
        cross = source.new_zeros(count)
        width += partner.shape[1] + count
    for chunk in _token_chunks(tokens, width, source.device):
        spectrum = gather(source[chunk])
        if partner is not None:
            cross += torch.linalg.vecdot(spectrum, gather_partner(partner[chunk]), dim=0)
        if coefficients is not None:
            scatter(spectrum.mul_(coefficients), output[chunk])
    return output, cross


class _SparseSpectrumProduct(torch.autograd.Function):
    r""":math:`y = \operatorname{idct}(Z)`, :math:`Z_{t, r_k} \mathrel{+}= X_{t, c_k} a_k`,
    :math:`X = \operatorname{dct}(x)`: :math:`x (C^\top S D)^\top` for ``x`` ``(T, n)``, the
    coefficients ``a`` ``(k,)`` at rows ``r`` and columns ``c`` of :math:`S` (``m x n``); ``(T, m)``.

    Runs in chunks of tokens (:func:`_spectrum_pass`), so neither direction forms the ``(T, k)``
    gathered spectrum (at the default :math:`k = m + n`, twice ``x``'s size), and saves ``x`` (as
    LoRA's down-projection does), the coefficients and their indices. With
    :math:`G = \operatorname{dct}(\partial L/\partial y)_{\ldots, r}` (idct's adjoint is dct, as
    both are orthonormal; the scatter's adjoint is the gather):

    .. math::

        \frac{\partial L}{\partial x} = \operatorname{idct}
        \big(\operatorname{scatter}_c(G \odot a)\big),
        \qquad \frac{\partial L}{\partial a_k} = \sum_t G_{t, k} X_{t, c_k},

    the first this same product with rows and columns swapped, the second
    :class:`_SampledCrossSpectrum`, both in one pass (:class:`_SparseSpectrumProductBackward`)
    when both are needed. Every backward is made of these Functions, so gradients of any order
    work (``create_graph=True``, ``torch.autograd.gradgradcheck``).
    """

    @staticmethod
    def forward(
        x: torch.Tensor, coefficients: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, rows_count: int
    ) -> torch.Tensor:
        return _spectrum_pass(x, columns, coefficients, rows, rows_count)[0]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, coefficients, rows, columns, _ = inputs
        ctx.save_for_backward(x, coefficients, rows, columns)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, coefficients, rows, columns = ctx.saved_tensors
        needs_x, needs_coefficients = ctx.needs_input_grad[:2]
        grad_x = grad_coefficients = None
        if needs_x and needs_coefficients:
            grad_x, grad_coefficients = _SparseSpectrumProductBackward.apply(grad, x, coefficients, rows, columns)
        elif needs_x:
            grad_x = _SparseSpectrumProduct.apply(grad, coefficients, columns, rows, x.shape[1])
        elif needs_coefficients:
            grad_coefficients = _SampledCrossSpectrum.apply(grad, x, rows, columns)
        return grad_x, grad_coefficients, None, None, None


class _SampledCrossSpectrum(torch.autograd.Function):
    r""":math:`s_k = \sum_t \operatorname{dct}(g)_{t, r_k} \operatorname{dct}(x)_{t, c_k}` for ``g``
    ``(T, m)``, ``x`` ``(T, n)``: the entries :math:`(r_k, c_k)` of :math:`C g^\top x D^\top`
    without forming it (or any ``(T, k)`` tensor). Its gradients are sparse spectrum products:
    :math:`\partial L/\partial g = \operatorname{idct}(\operatorname{scatter}_r(\operatorname{dct}(x)_c
    \odot \bar s))`, and the same with the roles of ``g`` and ``x`` swapped."""

    @staticmethod
    def forward(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return _spectrum_pass(g, rows, partner=x, partner_index=columns)[1]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, x, rows, columns = ctx.saved_tensors
        grad_g = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_g = _SparseSpectrumProduct.apply(x, grad, rows, columns, g.shape[1])
        if ctx.needs_input_grad[1]:
            grad_x = _SparseSpectrumProduct.apply(g, grad, columns, rows, x.shape[1])
        return grad_g, grad_x, None, None


class _SparseSpectrumProductBackward(torch.autograd.Function):
    r"""Both gradients of :class:`_SparseSpectrumProduct` in one pass, sharing
    :math:`G = \operatorname{dct}(\partial L/\partial y)_{\ldots, r}`: ``(grad_x, grad_coefficients)``.

    Its own gradients (double backward), for incoming :math:`u` (on ``grad_x``) and :math:`w`
    (on ``grad_coefficients``), with :math:`P(z, v, i, j, s)` the sparse spectrum product of
    ``z`` gathered at ``j``, times ``v``, scattered to ``i`` of length ``s``:
    :math:`\partial/\partial g = P(u, a, r, c, m) + P(x, w, r, c, m)`,
    :math:`\partial/\partial x = P(g, w, c, r, n)` and :math:`\partial/\partial a` the sampled
    cross spectrum of :math:`u` at ``c`` and :math:`g` at ``r``.
    """

    @staticmethod
    def forward(
        grad: torch.Tensor, x: torch.Tensor, coefficients: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _spectrum_pass(grad, rows, coefficients, columns, x.shape[1], partner=x, partner_index=columns)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_grad_x: torch.Tensor | None, grad_grad_coefficients: torch.Tensor | None):
        grad, x, coefficients, rows, columns = ctx.saved_tensors
        needs_grad, needs_x, needs_coefficients = ctx.needs_input_grad[:3]
        rows_count, columns_count = grad.shape[1], x.shape[1]
        grad_grad = grad_x = grad_coefficients = None
        if needs_grad:
            terms = []
            if grad_grad_x is not None:
                terms.append(_SparseSpectrumProduct.apply(grad_grad_x, coefficients, rows, columns, rows_count))
            if grad_grad_coefficients is not None:
                terms.append(_SparseSpectrumProduct.apply(x, grad_grad_coefficients, rows, columns, rows_count))
            grad_grad = sum(terms[1:], terms[0]) if terms else None
        if needs_x and grad_grad_coefficients is not None:
            grad_x = _SparseSpectrumProduct.apply(grad, grad_grad_coefficients, columns, rows, columns_count)
        if needs_coefficients and grad_grad_x is not None:
            grad_coefficients = _SampledCrossSpectrum.apply(grad_grad_x, grad, columns, rows)
        return grad_grad, grad_x, grad_coefficients, None, None
