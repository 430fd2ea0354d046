r"""Orthonormal DCT-II bases and fast transforms.

The orthonormal DCT-II of length :math:`n` is the matrix

.. math::

    D_{kj} = \sqrt{2/n}\; c_k \cos\frac{\pi k (2j + 1)}{2n}, \qquad
    c_0 = 1/\sqrt{2},\; c_k = 1 \ (k \ge 1),

so :math:`D D^\top = I`, :math:`\operatorname{dct}(x) = D x` and :math:`\operatorname{idct}(X) =
D^\top X` (the orthonormal DCT-III). This matches ``scipy.fft.dct(x, norm="ortho")`` and
``scipy.fft.idct(X, norm="ortho")``.

Algorithms. For :math:`n > 224` the transforms use one real FFT of length :math:`n` per fibre
(Makhoul, "A fast cosine transform in one and two dimensions", 1980): :math:`O(n \log n)`. For
:math:`n \le 224` a product with the cached :func:`dct_matrix`, :math:`O(n^2)`, is as fast or
faster on the CPU (measured: the FFT path's fixed per-op costs dominate short transforms), so
those lengths use it; the math is the same and the results agree to rounding. On the CPU the
FFT path runs in cache-sized blocks of fibres with reused buffers (measured on 4096 x 4096 fp32:
2.4x faster than whole-array passes along dim 0, 1.7x along dim 1); other devices run it as a
single block.

Differences from the anchors: ``scipy.fft.dct`` is CPU-only and returns an ndarray; the
``torch-dct`` package transforms only the last dim, through a full complex FFT and whole-array
intermediates. Here any dim of tensors on any device is transformed, results keep the input's
dtype (fp16/bf16 computed in fp32), and autograd works (each transform's backward is the other,
since both are orthogonal), as does ``torch.func.vmap`` with the default finiteness check (which
then reads the whole batch underneath the vmap, so a NaN in any sample raises).

The transforms read the private cache of :func:`dct_matrix`; the public function hands out
copies, so no caller can change what any other call computes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ._checks import (
    _all_finite,
    _unwrapped,
    check_bool,
    check_int,
    check_result_finite,
    check_tensor,
    to_compute,
)

# lru_cache bounds: one entry per (n, dtype, device); a few hundred sizes covers every model.
_CACHE_SIZE = 256
# Up to this length a matmul with the cached basis is at least as fast as the rfft path: on a
# 2-core AVX-512 CPU, fp32, the two tie at n = 200-240 on 16 MB arrays, and the matmul wins by
# 1.5-3x on small arrays at every n <= 256.
_MATMUL_MAX_N = 224
# CPU block size for the fast transforms: small enough that a block's intermediates stay in cache.
_CPU_BLOCK_BYTES = 2**20


def _normalized_device(device: torch.device | str | None) -> torch.device:
    """A device with an explicit index, so "cuda" and "cuda:0" share one cache entry."""
    if device is None:
        device = torch.get_default_device()
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device
    return device


def _dct_rows(
    n: int, frequencies: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Rows ``frequencies`` (int64, on the CPU) of the ``n x n`` DCT-II matrix, ``(len, n)``.

    Built in float64 and cast, entry for entry the values of :func:`dct_matrix`, in memory
    proportional to the rows asked for.
    """
    j = torch.arange(n, dtype=torch.int64)
    # The angle pi*k*(2j+1)/(2n) is reduced modulo 2*pi in exact integer arithmetic first, so
    # large n loses no accuracy to huge cosine arguments.
    phase = (frequencies[:, None] * (2 * j[None, :] + 1)) % (4 * n)
    rows = torch.cos(phase.to(torch.float64) * (math.pi / (2 * n))) * math.sqrt(2.0 / n)
    rows = torch.where(frequencies[:, None] == 0, rows * math.sqrt(0.5), rows)
    # Cast on the CPU first: some devices (MPS) have no float64.
    return rows.to(dtype).to(device)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # inference_mode(False): a matrix first built under torch.inference_mode must still be usable
    # (saved for backward) by later autograd code that shares the cache.
    with torch.inference_mode(False):
        return _dct_rows(n, torch.arange(n, dtype=torch.int64), dtype, device)


def dct_matrix(
    n: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""The :math:`n \times n` orthonormal DCT-II matrix :math:`D`.

    .. math::

        D_{kj} = \sqrt{2/n}\; c_k \cos\frac{\pi k (2j + 1)}{2n}, \qquad
        c_0 = 1/\sqrt{2},\; c_k = 1 \ (k \ge 1),

    so that :math:`D D^\top = I` and ``D @ x == dct(x)`` for a vector ``x`` (row :math:`k` is the
    :math:`k`-th cosine atom, lowest frequency first). Equal to
    ``scipy.fft.dct(np.eye(n), norm="ortho", axis=0)``.

    Built once in float64 (the angle reduced exactly in integers), cast to ``dtype``, and cached
    per ``(n, dtype, device)``: :math:`O(n^2)` the first time. Every call returns a fresh copy of
    the cached matrix (an :math:`O(n^2)` copy, the cost of one matrix-vector product with it), so
    training it as a parameter or modifying it in place cannot change any later
    :func:`dct_matrix`, :func:`dct`, :func:`idct` or adapter, which read the cache directly.

    Args:
        n: size, ``>= 1``.
        dtype: a floating dtype; ``None`` means ``torch.get_default_dtype()``.
        device: ``None`` means ``torch.get_default_device()``.

    Returns:
        ``(n, n)`` tensor of ``dtype`` on ``device``.

    Raises:
        TypeError: ``n`` is not an int, or ``dtype`` is not a real floating dtype.
        ValueError: ``n < 1``.

    Example:
        >>> D = dct_matrix(8, dtype=torch.float64)
        >>> D.shape
        torch.Size([8, 8])
        >>> torch.allclose(D @ D.T, torch.eye(8, dtype=torch.float64))
        True
        >>> _ = D.zero_()  # a private copy: no later call sees this
        >>> dct_matrix(8, dtype=torch.float64)[0, :3]  # row 0 is constant, 1 / sqrt(8)
        tensor([0.3536, 0.3536, 0.3536], dtype=torch.float64)
    """
    n = check_int(n, "n", low=1)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a real floating torch.dtype (float16, bfloat16, float32, float64), "
            f"got {dtype!r}"
        )
    return _cached_dct_matrix(n, dtype, _normalized_device(device)).clone()


def _check_dim(dim: object, ndim: int) -> int:
    return check_int(dim, "dim", low=-ndim, high=ndim - 1) % ndim


class _MakhoulPlan(NamedTuple):
    """Index and twiddle tensors of the length-``n`` fast DCT, for one (dtype, device)."""

    reversed_v: torch.Tensor  # x -> v time-reversed, v = [x0, x2, x4, ..., x5, x3, x1]
    forward_twiddle: torch.Tensor  # complex, one per rfft bin
    coefficient_order: torch.Tensor  # [Re 0, Im 0, Re 1, ...] -> X: Re 0..n//2, Im (n-1)//2..1
    mirror: torch.Tensor  # for the inverse: 0, n-1, n-2, ..., n - n//2
    inverse_twiddle: torch.Tensor  # complex, one per rfft bin
    output_order: torch.Tensor  # the inverse's irfft output w -> x: x = w[output_order]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _makhoul_plan(n: int, dtype: torch.dtype, device: torch.device) -> _MakhoulPlan:
    half = n // 2 + 1  # number of rfft bins
    with torch.inference_mode(False):
        even_odd = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)])
        bins = torch.arange(half, dtype=torch.float64)
        scale = torch.full_like(bins, math.sqrt(2.0 / n))
        scale[0] = math.sqrt(1.0 / n)
        forward_twiddle = torch.polar(scale, math.pi * bins / (2 * n))
        mirror = torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(n - 1, n - half, -1)])
        inverse_twiddle = torch.polar(1.0 / scale, -math.pi * bins / (2 * n))
        reversed_v = even_odd[(n - torch.arange(n)) % n]
        real_parts = torch.arange(0, 2 * half, 2)
        mirrored_imaginary_parts = 2 * torch.arange(n - half, 0, -1) + 1
        coefficient_order = torch.cat([real_parts, mirrored_imaginary_parts])
        # x_{2j+1} = w_{j+1} and x_{2j} = w_{(n-j) % n}, w the irfft's time-reversed v.
        position = torch.arange(n)
        output_order = torch.where(position % 2 == 1, position // 2 + 1, (n - position // 2) % n)
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return _MakhoulPlan(
            reversed_v.to(device),
            forward_twiddle.to(complex_dtype).to(device),
            coefficient_order.to(device),
            mirror.to(device),
            inverse_twiddle.to(complex_dtype).to(device),
            output_order.to(device),
        )


def _blocks(x3: torch.Tensor, out: torch.Tensor, block_elements: int | None):
    """Views ``(x_block, out_block, dim)`` covering ``x3`` and ``out``, both ``(batch, n, inner)``.

    Each block holds whole length-``n`` fibres along its ``dim``. On the CPU the transform runs
    block by block so that a block's intermediates stay in cache: one pass over a 4096 x 4096
    fp32 array in memory costs about half as much as the whole FFT. Blocks are 2-D where the
    layout allows, since ``index_select`` on a 2-D view is about twice as fast as on a 3-D one.
    """
    batch, n, inner = x3.shape
    if block_elements is None:
        yield x3, out, 1
        return
    transforms = max(1, block_elements // n)
    if inner == 1:
        x2, out2 = x3.squeeze(2), out.squeeze(2)
        for r in range(0, batch, transforms):
            yield x2[r : r + transforms], out2[r : r + transforms], 1
    elif inner >= transforms:
        for b in range(batch):
            for j in range(0, inner, transforms):
                yield x3[b, :, j : j + transforms], out[b, :, j : j + transforms], 0
    else:
        rows = transforms // inner
        for r in range(0, batch, rows):
            yield x3[r : r + rows], out[r : r + rows], 1


class _Scratch:
    """Per-call block buffers, allocated once per shape and dtype and reused by every block.

    Reuse keeps the allocator out of the block loop: a fresh megabyte buffer can be mapped from
    the OS and page-faulted on every block (measured: idct of 4096 x 4096 fp32 along dim 0 went
    from about 95 to 65 ms).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, shape: torch.Size, dtype: torch.dtype, name: str) -> torch.Tensor:
        key = (name, tuple(shape), dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return self.buffers[key]


def _with_size(shape: torch.Size, dim: int, size: int) -> torch.Size:
    return shape[:dim] + (size,) + shape[dim + 1 :]


def _along(vector: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """``vector`` shaped to broadcast along ``dim`` of an ``ndim``-dim tensor."""
    return vector.view(-1, *([1] * (ndim - dim - 1)))


def _makhoul_setup(
    x3: torch.Tensor,
) -> tuple[int, int, _MakhoulPlan, torch.Tensor, _Scratch]:
    """What both directions of the fast transform of ``(batch, n, inner)`` ``x3`` start from:
    ``n``, the number of rfft bins ``n // 2 + 1``, the cached plan, an empty contiguous output
    and the call's scratch buffers."""
    n = x3.shape[1]
    out = torch.empty_like(x3, memory_format=torch.contiguous_format)
    return n, n // 2 + 1, _makhoul_plan(n, x3.dtype, x3.device), out, _Scratch(x3.device)


def _fast_dct(x3: torch.Tensor, block_elements: int | None) -> torch.Tensor:
    r"""DCT-II along dim 1 of a ``(batch, n, inner)`` tensor by Makhoul's rfft algorithm.

    With :math:`v = (x_0, x_2, x_4, \ldots, x_5, x_3, x_1)`, :math:`V = \operatorname{rfft}(v)`
    and :math:`W_k = e^{-i\pi k / 2n}`: :math:`X_k = s_k \operatorname{Re}(W_k V_k)` for
    :math:`k \le n/2`, and the mirrored :math:`X_{n-k} = -s \operatorname{Im}(W_k V_k)` for
    :math:`0 < k < n/2`, so one rfft of length :math:`n` gives all :math:`n` coefficients.
    The rfft runs on :math:`v` time-reversed, whose spectrum is :math:`\bar V`: with the twiddle
    conjugated too, the product is :math:`\overline{s_k W_k V_k}`, whose imaginary part is the
    mirrored coefficient itself, with no negation pass.
    """
    n, half, plan, out, scratch = _makhoul_setup(x3)
    for block, out_block, dim in _blocks(x3, out, block_elements):
        v_reversed = scratch(block.shape, x3.dtype, "v")
        torch.index_select(block, dim, plan.reversed_v, out=v_reversed)
        spectrum = scratch(_with_size(block.shape, dim, half), plan.forward_twiddle.dtype, "V")
        torch.fft.rfft(v_reversed, dim=dim, out=spectrum)
        spectrum *= _along(plan.forward_twiddle, dim, spectrum.ndim)
        if dim == spectrum.ndim - 1:
            # Along the innermost dim, one gather from the interleaved real view writes the
            # whole block (about 1.8x faster than the two copies below).
            interleaved = torch.view_as_real(spectrum).flatten(-2)
            torch.index_select(interleaved, dim, plan.coefficient_order, out=out_block)
        else:
            out_block.narrow(dim, 0, half).copy_(spectrum.real)
            # flip + copy beats an index_select of the strided imaginary view by 2-3x.
            mirrored = spectrum.imag.narrow(dim, 1, n - half).flip(dim)
            out_block.narrow(dim, half, n - half).copy_(mirrored)
    return out


def _fast_idct(x3: torch.Tensor, block_elements: int | None) -> torch.Tensor:
    r"""DCT-III (inverse of :func:`_fast_dct`) along dim 1 of a ``(batch, n, inner)`` tensor.

    Runs :func:`_fast_dct` backwards: :math:`V_k = \bar W_k (X_k - i X_{n-k}) / s_k`, then
    :math:`v = \operatorname{irfft}(V)` and :math:`x_{2j} = v_j`, :math:`x_{2j+1} = v_{n-1-j}`.
    It forms :math:`\bar V_k = W_k (X_k + i X_{n-k}) / s_k` instead, which needs no negation:
    the irfft of :math:`\bar V` is :math:`v` time-reversed, undone by the final even/odd copies.
    Bin 0 is fed :math:`X_0` as its imaginary part by the mirror gather; irfft ignores it, as
    documented.
    """
    n, half, plan, out, scratch = _makhoul_setup(x3)
    for block, out_block, dim in _blocks(x3, out, block_elements):
        half_shape = _with_size(block.shape, dim, half)
        mirrored = scratch(half_shape, x3.dtype, "mirrored")
        torch.index_select(block, dim, plan.mirror, out=mirrored)
        spectrum = scratch(half_shape, plan.inverse_twiddle.dtype, "V")
        torch.complex(block.narrow(dim, 0, half), mirrored, out=spectrum)
        spectrum *= _along(plan.inverse_twiddle, dim, spectrum.ndim)
        v_reversed = scratch(block.shape, x3.dtype, "v")
        torch.fft.irfft(spectrum, n=n, dim=dim, out=v_reversed)
        # x_{2j+1} = v_{n-1-j} = w_{j+1} and x_{2j} = v_j = w_{(n-j) % n} for w = v time-reversed:
        # three strided copies, about 1.5x faster than one index_select into the strided block.
        evens = (n + 1) // 2
        leading = (slice(None),) * dim
        out_block[leading + (slice(1, None, 2),)] = v_reversed.narrow(dim, 1, n // 2)
        out_block.narrow(dim, 0, 1).copy_(v_reversed.narrow(dim, 0, 1))
        tail = v_reversed.narrow(dim, n - evens + 1, evens - 1).flip(dim)
        out_block[leading + (slice(2, None, 2),)] = tail
    return out


def _transform(x: torch.Tensor, dim: int, inverse: bool) -> torch.Tensor:
    """DCT-II (or, with ``inverse``, DCT-III) of ``x`` along ``dim``; ``x`` in its compute dtype."""
    n = x.shape[dim]
    batch = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1 :])
    x3 = x.reshape(batch, n, inner)
    if n <= _MATMUL_MAX_N:
        basis = _cached_dct_matrix(n, x.dtype, x.device)
        basis = basis.T if inverse else basis
        if inner == 1:
            out = x3.view(batch, n) @ basis.T
        else:
            out = torch.matmul(basis, x3)
    else:
        block_elements = _CPU_BLOCK_BYTES // x.element_size() if x.device.type == "cpu" else None
        out = (_fast_idct if inverse else _fast_dct)(x3, block_elements)
    return out.view(x.shape)


class _OrthonormalDCT(torch.autograd.Function):
    """Both transforms are orthogonal, so each one's backward is the other one."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int, inverse: bool) -> torch.Tensor:
        return _transform(x, dim, inverse)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, ctx.dim, ctx.inverse = inputs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _OrthonormalDCT.apply(grad, ctx.dim, not ctx.inverse), None, None

    @staticmethod
    def vmap(info, in_dims, x: torch.Tensor, dim: int, inverse: bool):
        # A vmapped transform is one more batch dim: move it to the front and shift ``dim``
        # (already non-negative), so the forward only ever sees plain tensors.
        return _OrthonormalDCT.apply(x.movedim(in_dims[0], 0), dim + 1, inverse), 0


def dct(x: torch.Tensor, dim: int = -1, *, check_finite: bool = True) -> torch.Tensor:
    r"""Orthonormal DCT-II of ``x`` along ``dim``.

    .. math::

        X_k = \sqrt{2/n}\; c_k \sum_{j=0}^{n-1} x_j \cos\frac{\pi k (2j + 1)}{2n}

    (see :func:`dct_matrix`), batched over every other dimension. Equal to
    ``scipy.fft.dct(x, axis=dim, norm="ortho")``.

    Cost per length-``n`` fibre: :math:`O(n \log n)` by one real FFT (Makhoul), or a product with
    the cached :func:`dct_matrix` for :math:`n \le 224`, where that is faster. fp16/bf16 input is
    computed in fp32 and returned in its own dtype. Differentiable: the backward is :func:`idct`.

    Args:
        x: real floating tensor, any shape with ``x.shape[dim] = n >= 1``.
        dim: the transformed dimension, in ``[-x.ndim, x.ndim - 1]``.
        check_finite: check ``x`` for NaN/Inf and the result for overflow of ``x``'s dtype
            (one device sync; under ``torch.func.vmap`` the whole batch is checked); pass
            ``False`` in hot loops.

    Returns:
        Tensor of ``x``'s shape, dtype and device.

    Raises:
        TypeError: ``x`` is not a real floating tensor, or ``dim`` is not an int.
        ValueError: ``x`` is 0-dim, empty or (with ``check_finite``) has NaN/Inf or a result
            beyond its dtype's range, or ``dim`` is out of range.

    Example:
        >>> x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> X = dct(x, dim=0)
        >>> torch.allclose(X, dct_matrix(5, dtype=torch.float64) @ x)
        True
    """
    return _checked_transform(x, dim, check_finite, inverse=False)


def idct(x: torch.Tensor, dim: int = -1, *, check_finite: bool = True) -> torch.Tensor:
    r"""Orthonormal inverse DCT-II (the DCT-III) of ``x`` along ``dim``: ``idct(dct(x)) == x``.

    .. math::

        x_j = \sqrt{2/n} \sum_{k=0}^{n-1} c_k X_k \cos\frac{\pi k (2j + 1)}{2n}

    i.e. :math:`D^\top X`, batched over every other dimension. Equal to
    ``scipy.fft.idct(X, axis=dim, norm="ortho")``. Cost, precision and autograd as for
    :func:`dct` (the backward is :func:`dct`); so are the arguments ``x``, ``dim`` and
    ``check_finite``, the result (``x``'s shape, dtype and device) and what it raises.

    Example:
        >>> x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> torch.allclose(idct(dct(x)), x)
        True
    """
    return _checked_transform(x, dim, check_finite, inverse=True)


def _checked_transform(
    x: object, dim: object, check_finite: bool, *, inverse: bool
) -> torch.Tensor:
    """:func:`dct` or :func:`idct` with their checks, reading one bool back for ``check_finite``.

    A NaN/Inf in ``x`` reaches the result, so checking the result alone finds it (and then ``x``
    is checked to say so); a finite ``x`` whose result is not finite overflowed the dtype (an
    fp16 fibre with a norm over 65504), which raises instead of returning ``inf``.
    """
    check_bool(check_finite, "check_finite")
    x = check_tensor(x, "x", check_finite=False)
    dim = _check_dim(dim, x.ndim)
    result = _OrthonormalDCT.apply(to_compute(x), dim, inverse).to(x.dtype)
    if check_finite and not _all_finite(_unwrapped(result)):
        check_tensor(x, "x")
        what = "the entries of idct(x)" if inverse else "the entries of dct(x)"
        check_result_finite(_unwrapped(result), what, "x")
    return result


def dct_columns(n: int, index: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    r"""Columns ``index`` of :math:`D^\top`, the transposed orthonormal DCT-II matrix, built directly.

    .. math::

        P_{jc} = D_{i_c j} = \sqrt{2/n}\; s_{i_c} \cos\frac{\pi\, i_c (2j + 1)}{2n},
        \qquad s_0 = 1/\sqrt{2},\; s_i = 1,

    an :math:`n \times r` matrix with orthonormal columns, without the :math:`n \times n` matrix:
    the phase :math:`i_c (2j+1) \bmod 4n` is exact in int64 and indexes a cached table of the
    :math:`4n` values :math:`\sqrt{2/n}\cos(\pi a / 2n)` (computed in float64), so every dtype
    gets correctly rounded entries for any :math:`n`, in four small kernels per call.

    Args:
        n: length of the transform, :math:`n \ge 1`.
        index: :math:`(r,)` integer frequencies in :math:`[0, n)`; the result lives on its device.
        dtype: floating dtype of the result.

    Returns:
        :math:`(n, r)`, equal to ``dct_matrix(n)[index].T`` up to rounding.

    Example:
        >>> from decomp import dct_matrix
        >>> P = dct_columns(8, torch.tensor([0, 3]), dtype=torch.float64)
        >>> torch.allclose(P, dct_matrix(8, dtype=torch.float64)[[0, 3]].T)
        True
    """
    table, odd = _cosine_table(n, dtype, index.device)
    columns = table[(index[None, :] * odd) % (4 * n)]
    scale = torch.ones(index.shape, dtype=dtype, device=index.device)
    return columns * scale.masked_fill_(index == 0, math.sqrt(0.5))


@functools.lru_cache(maxsize=256)
def _cosine_table(
    n: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(4 * n, dtype=torch.float64) * (math.pi / (2 * n))
    table = (torch.cos(angles) * math.sqrt(2 / n)).to(dtype=dtype, device=device)
    odd = (2 * torch.arange(n, dtype=torch.int64) + 1).to(device)[:, None]
    return table, odd
