"""Input validation shared by every public function of :mod:`decomp`.

One place decides what a valid input is and how a bad one is reported, so the errors read the
same everywhere (see ``docs/errors.md``): ``TypeError`` for a wrong type or dtype, ``ValueError``
for a wrong shape, an empty or non-finite tensor, or an out-of-range rank, each naming the argument
and the allowed range.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: fp32 for fp16/bf16 (LAPACK-style kernels need it), else ``dtype``."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def check_tensor(
    x: object,
    name: str,
    *,
    min_ndim: int = 1,
    max_ndim: int | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Validate a real floating tensor and return it unchanged.

    Raises ``TypeError`` if ``check_finite`` is not a ``bool`` (``0`` or ``"no"`` would silently
    mean something), if ``x`` is not a tensor or not real floating point, and ``ValueError``
    if it has the wrong number of dimensions, no elements, or (with ``check_finite``) NaN/Inf.
    The finiteness check reads one boolean back from the device; pass ``check_finite=False`` to
    the public function to skip it in a hot loop.
    """
    check_bool(check_finite, "check_finite")  # every public function's flag passes through here
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )
    if x.ndim < min_ndim or (max_ndim is not None and x.ndim > max_ndim):
        allowed = f">= {min_ndim}" if max_ndim is None else f"in [{min_ndim}, {max_ndim}]"
        raise ValueError(f"{name} must have ndim {allowed}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if check_finite and not _all_finite(_unwrapped(x)):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _unwrapped(x: torch.Tensor) -> torch.Tensor:
    """``x`` without its ``torch.func`` wrappers (vmap, grad), so a data check can read it.

    Under ``torch.func.vmap`` a function sees one sample of a batched tensor and cannot turn data
    into a Python bool; the tensor underneath holds the whole batch, and checking it checks every
    sample (one NaN anywhere in the batch raises).
    """
    while torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x


def _all_finite(x: torch.Tensor) -> bool:
    # NaN and Inf survive a sum, and a finite sum proves finite entries: one reduction instead of
    # materialising isfinite(x) (about 30x cheaper on CPU). Only a sum that overflowed (or
    # cancelled inf - inf) needs the elementwise check to tell.
    if bool(torch.isfinite(x.sum(dtype=compute_dtype(x.dtype)))):
        return True
    return bool(torch.isfinite(x).all())


def to_compute(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its compute dtype (fp32 for half inputs); no copy when it already is."""
    return x.to(compute_dtype(x.dtype))


# (integer dtype of the same width, mantissa bits, exponent bias) of each compute dtype, to read
# exponents and build powers of two bit by bit: exact on every device, unlike pow/exp2 kernels,
# and with no frexp (which not every backend has).
_FLOAT_LAYOUT = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def unit_scaled(x: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``x`` in its compute dtype divided by a power of two per slice, and that power of two.

    Returns ``(x / s, s)`` with :math:`s = 2^e` of shape ``x.shape`` with size 1 along ``dims``,
    and :math:`e` the exponent of the slice's largest magnitude, so that the scaled slice's largest
    magnitude lies in :math:`[1/2, 1)` (:math:`e` is clamped to :math:`\pm 126` in fp32,
    :math:`\pm 1022` in fp64, so that :math:`s` and :math:`1/s` are normal numbers; only an input
    whose largest entry is subnormal or within 2x of the dtype's maximum lands just outside the
    interval; an all-zero slice gets :math:`s = 2^{-126}` and stays zero). However large or small
    ``x`` is, sums of squares of the scaled slice cannot overflow, and only entries below
    :math:`2^{-63}` of the largest lose their squares to underflow (far below any energy
    tolerance), so energy and tolerance tests hold at every scale.

    Multiplying by a power of two is exact (for results in the normal range), and the kernels
    used here are scale-equivariant up to rounding (most of them bit for bit), so a decomposition
    of ``x / s`` with its scale-carrying outputs multiplied back by ``s`` is the one of ``x``
    wherever ``x`` itself computes without overflow or underflow. The scale is a tensor (no host
    sync) and carries no gradient: the decompositions are homogeneous in ``x``, so treating it as a
    constant keeps their derivatives exact. Costs two reductions (max and min) and one multiply
    (fused with the cast of half inputs).

    Example:
        >>> scaled, scale = unit_scaled(torch.tensor([[3e30, -1e30], [0.0, 2e29]]), (-2, -1))
        >>> scale.shape, float(scaled.abs().max()), bool(torch.equal(scaled * scale, torch.tensor(
        ...     [[3e30, -1e30], [0.0, 2e29]])))
        (torch.Size([1, 1]), 0.5916..., True)
    """
    with torch.no_grad():
        # amax and amin: two plain reductions, several times cheaper than an inf-norm or abs().
        dims = tuple(dims)
        largest = torch.maximum(x.amax(dims, keepdim=True), -x.amin(dims, keepdim=True))
        scale, inverse = power_of_two_scales(largest.to(compute_dtype(x.dtype)))
    # A dimensioned fp32 factor promotes a half x to fp32 in this one multiply.
    return x * inverse, scale


def power_of_two_scales(largest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(s, 1/s)`` with :math:`s = 2^e` such that ``largest / s`` lies in :math:`[1/2, 1)`.

    ``largest`` holds non-negative magnitudes in float32 or float64 (any shape; the result has
    the same). The exponent is clamped as in :func:`unit_scaled`, which calls this on the
    largest magnitude of each slice; call it directly when the magnitude is agreed elsewhere (the
    maximum over the ranks of a sharded tensor, say), so that every part is scaled alike.

    Example:
        >>> scale, inverse = power_of_two_scales(torch.tensor([3e30, 0.75]))
        >>> scale.tolist() == [2.0**102, 1.0], (scale * inverse).tolist()
        (True, [1.0, 1.0])
    """
    integer, mantissa_bits, bias = _FLOAT_LAYOUT[largest.dtype]
    # largest = 1.f * 2^(b - bias) for its biased exponent field b, so e = b - bias + 1 puts
    # largest / 2^e in [1/2, 1). Zero and subnormals have b = 0, inf and NaN the top value;
    # the clamp maps them to the extreme scales, under which 0, inf and NaN stay what they are.
    biased = (largest.view(integer) >> mantissa_bits) & (2 * bias + 1)
    exponent = (biased - (bias - 1)).clamp(1 - bias, bias - 1)
    scale = ((exponent + bias) << mantissa_bits).view(largest.dtype)
    inverse = ((bias - exponent) << mantissa_bits).view(largest.dtype)
    return scale, inverse


def check_result_finite(result: torch.Tensor, what: str, name: str) -> None:
    """Raise ``ValueError`` if ``result``, computed from finite ``name``, is not finite.

    After :func:`unit_scaled` the computation itself cannot overflow, so an inf in the result
    means ``what`` (e.g. the singular values) lies beyond the largest number of the returned
    dtype: no answer in that dtype is right, and returning inf would be a silent wrong one. A NaN
    (e.g. from a user's ``svd`` callable) is reported as such. Reads one bool back from the device.
    """
    if bool(torch.isfinite(result).all()):
        return
    if bool(torch.isnan(result).any()):  # not an overflow: say so rather than blame the scale
        raise ValueError(f"{what} contain NaN although {name} is finite")
    raise ValueError(
        f"{what} overflow {result.dtype}: {name} is too large for its result to be represented "
        f"in {result.dtype}; scale {name} down or pass it in a wider dtype"
    )


def check_int(value: object, name: str, *, low: int, high: int | None = None) -> int:
    """Validate an integer in ``[low, high]`` (``high=None``: unbounded) and return it as ``int``.

    Any ``numbers.Integral`` but ``bool`` is accepted (``numpy.int64(4)`` gives ``4``), so a
    stored option is a plain Python int.
    """
    return _checked_int(value, name, low, high, "an int")


def check_optional_int(value: object, name: str, *, low: int, high: int | None = None) -> int | None:
    """``None`` (an option's "use the default"), or :func:`check_int`'s plain ``int``.

    Example:
        >>> check_optional_int(None, "rank", low=1), check_optional_int(4, "rank", low=1)
        (None, 4)
    """
    if value is None:
        return None
    return _checked_int(value, name, low, high, "an int or None")


def _checked_int(value: object, name: str, low: int, high: int | None, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def as_sequence(value: object, name: str) -> tuple | None:
    """``value`` (the argument ``name``) as a tuple if it is a sequence, else ``None``.

    Lists, tuples, ``torch.Size`` and other ``Sequence`` types count, and so do 1-D numpy arrays
    (``np.array([4, 2])``), whose entries come back as Python numbers; strings do not. A numpy
    array of another number of dimensions raises ``TypeError`` naming ``name`` and its shape.

    Example:
        >>> as_sequence(np.array([4, 2]), "ranks"), as_sequence((1, 2.5), "ranks")
        ((4, 2), (1, 2.5))
        >>> as_sequence("ab", "modes"), as_sequence(3, "modes")
        (None, None)
    """
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise TypeError(
                f"{name} must be a 1-D sequence, got a numpy array of shape {value.shape}"
            )
        return tuple(value.tolist())
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    return tuple(value)


def check_rank(rank: object, name: str, high: int) -> int:
    """Validate a rank: an int in ``[1, high]``."""
    return check_int(rank, name, low=1, high=high)


def check_real(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
) -> float:
    """Validate a finite real number, optionally in an interval, and return it as ``float``.

    ``check_real(alpha, "alpha", low=0)`` accepts ``alpha > 0``;
    ``check_real(s, "sparsity", low=0, high=1, low_inclusive=True)`` accepts ``[0, 1)``.
    """
    if low is not None and high is not None:
        allowed = f"a float in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    elif low is not None:
        allowed = f"a float {'>=' if low_inclusive else '>'} {low:g}"
    elif high is not None:
        allowed = f"a float {'<=' if high_inclusive else '<'} {high:g}"
    else:
        allowed = "a finite float"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__}")
    value = float(value)
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_fraction(value: object, name: str) -> float:
    """Validate an energy fraction: a float in ``(0, 1]``."""
    return check_real(value, name, low=0.0, high=1.0, high_inclusive=True)


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Validate a string option against its allowed values and return it as a plain ``str``.

    A value that is not a string at all raises ``TypeError``; an unknown string ``ValueError``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)} (a str), got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_bool(value: object, name: str) -> bool:
    """Validate a flag: a real ``bool`` (``0``/``1`` and other ints are refused, not truth-tested)."""
    if not isinstance(value, bool):
        kind = type(value)
        # numpy's bool is also called "bool": qualify names from outside the builtins.
        shown = kind.__name__
        if kind.__module__ != "builtins":
            shown = f"{kind.__module__}.{shown}"
        raise TypeError(f"{name} must be a bool, got {shown}")
    return value


def check_generator(generator: object) -> torch.Generator | None:
    """Validate an optional ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def randn(
    shape: Sequence[int],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Standard normal samples on ``device``, drawn from ``generator`` on the generator's own device.

    Drawing on the generator's device (then moving) makes a CPU generator reproducible for CUDA
    inputs too, instead of failing on a device mismatch.
    """
    if generator is None:
        return torch.randn(*shape, dtype=dtype, device=device)
    sample = torch.randn(*shape, dtype=dtype, device=generator.device, generator=generator)
    return sample.to(device)
