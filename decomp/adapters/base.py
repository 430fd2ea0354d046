r"""What every adapter shares: a parametrization :math:`W \mapsto W'` built from a layer's weight.

An adapter is an ``nn.Module`` used as

.. code-block:: python

    parametrize.register_parametrization(layer, "weight", XParam(...))

``register_parametrization`` calls :meth:`AdapterParam.right_inverse` with the pretrained weight,
which builds the adapter's frozen buffers and trainable ``Parameter``\ s from it (lazily, so
``XParam()`` needs no shapes), and then :meth:`AdapterParam.forward` maps the frozen weight
:math:`W` to the adapted one. A subclass declares its constructor options once, as class
attributes made by :func:`option` (name, type, default, check), from which the constructor, its
signature, the checks, :meth:`AdapterParam.config`, ``repr`` and ``trainable_count`` all follow,
and implements three small hooks:

* ``_build(weight)`` -- create buffers and Parameters from the (detached) pretrained weight;
* ``delta(weight)`` -- the update :math:`\Delta W` (zero at init for methods that define one);
* ``_count(shape)`` -- the closed-form number of trainable parameters under the options.

and may override ``compose``/``decompose`` for a non-additive update (Lie: :math:`W \odot
\exp(\Delta W)`), and declare in ``rebuilt_buffers`` the frozen buffers that ``_build`` computes
from the weight and config alone (reproducibly), which adapter files then leave out and rebuild
at load, checked against a fingerprint (:func:`buffer_fingerprint`, :func:`rebuild_tolerance`). The base class owns validation, dtype handling (the update is computed in fp32
for fp16/bf16 weights and returned in the weight's dtype), the shape check, ``from_weight`` and
``extra_repr``, and the mechanisms several methods share: the matrix view of a weight
(:func:`matrix_dims`, :func:`matrix_view`) and rank resolution (:meth:`AdapterParam._resolved_rank`,
:meth:`AdapterParam._resolved_channel_rank`).

Adapters do not stack. An unbuilt adapter registered on a weight that is already parametrized
(another adapter, ``parametrizations.weight_norm``/``spectral_norm``) is called by torch's
consistency check before ``right_inverse``, and that call raises ``RuntimeError`` saying to merge
or remove the existing parametrization; nothing is registered. With ``unsafe=True`` torch skips
that check and the same error comes at the first forward. The hook-based
``torch.nn.utils.weight_norm``/``spectral_norm`` leave no ``weight`` Parameter, and
``register_parametrization`` itself refuses those layers (``ValueError``) before any adapter code
runs. An adapter already built with :meth:`AdapterParam.from_weight` is an explicit choice and is
stacked as asked. :func:`decomp.adapters.apply` and :func:`decomp.adapters.load_adapter` refuse
all of these layers up front.

Every adapter checks what is loaded into it: :meth:`AdapterParam._state_problems` says what is
wrong with the values of a state (NaN/Inf, in the adapter's own dtype; a kept count out of range;
repeated DCT locations), and both :func:`decomp.adapters.load_adapter` (before anything changes)
and ``nn.Module.load_state_dict`` (through a load pre-hook: torch raises ``RuntimeError`` naming
the tensor) use it. An unknown constructor keyword raises ``TypeError`` naming the nearest option.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import sys
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from .._checks import _all_finite, check_int, check_tensor, compute_dtype
from .._sides import matrix_dims
from ._budget import default_budget

DEFAULT_RANK = 8
"""The default rank of the low-rank methods (LoRA's ``r=8`` in peft), clamped to what a layer allows."""


def check_weight_shape(shape: Sequence[int]) -> None:
    """A linear or conv weight shape: 2 to 5 positive sizes (what ``trainable_count`` accepts)."""
    if not isinstance(shape, (tuple, list, torch.Size)) or not 2 <= len(shape) <= 5:
        raise ValueError(f"shape must be a weight shape with 2 to 5 dims (linear or conv 1-3 D), got {shape!r}")
    for index, size in enumerate(shape):
        check_int(size, f"shape[{index}]", low=1)


def fan_in(shape: Sequence[int]) -> int:
    r"""The fan-in :math:`n = \prod_{j \ge 1} d_j` of a weight ``shape``: its matrix view's columns.

    The one-learning-rate rule of the adapters is stated in it: a layer initialised (and, in
    practice, pretrained) with entries of RMS about :math:`1/\sqrt{n}` keeps its output scale,
    so an update whose first Adam step at lr :math:`\eta` has entries of RMS about
    :math:`\eta/\sqrt{n}` moves the layer's output by about the fraction :math:`\eta`, as LoRA's
    (:math:`\alpha = r`) does; each adapter's default scale is chosen so (its docs page states
    how).

    Example:
        >>> fan_in((64, 32)), fan_in((64, 16, 3, 3))
        (32, 144)
    """
    return matrix_dims(shape)[1]


def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reshaped to its matrix view (:func:`matrix_dims`): a view where the strides allow.

    Example:
        >>> matrix_view(torch.zeros(8, 4, 3, 3)).shape
        torch.Size([8, 36])
    """
    return weight.reshape(weight.shape[0], -1)


@dataclasses.dataclass
class Option:
    """One constructor option of an adapter class, declared as a class attribute by :func:`option`.

    The attribute's name is where the checked value is kept on each adapter (a plain instance
    attribute, read as fast as any); :attr:`name` is the constructor keyword and the
    :meth:`AdapterParam.config` key, the same unless the attribute name is taken by a Parameter,
    buffer or property of the adapter. On the class the attribute is this declaration.
    """

    default: Any
    check: Callable[..., Any] | None
    check_options: dict[str, Any]
    keyword_only: bool
    keyword: str | None
    optional: bool = False
    attribute: str = ""  # the class attribute's name, set when the class is created

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    @property
    def name(self) -> str:
        return self.keyword or self.attribute

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        # Only reached while the instance holds no value yet (its __dict__ entry wins).
        raise AttributeError(f"{type(instance).__name__}.{self.attribute} is set by its constructor")

    def checked(self, value: Any) -> Any:
        """``value`` as the adapter keeps it: through ``check(value, name, **check_options)``
        (``None`` kept as it is for an ``optional`` option)."""
        if self.check is None or (self.optional and value is None):
            return value
        return self.check(value, self.name, **self.check_options)

    def parameter(self, annotation: Any = inspect.Parameter.empty) -> inspect.Parameter:
        """The constructor's parameter for this option (what ``inspect.signature`` shows)."""
        kind = inspect.Parameter.KEYWORD_ONLY if self.keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        return inspect.Parameter(self.name, kind, default=self.default, annotation=annotation)


def option(
    default: Any = None,
    check: Callable[..., Any] | None = None,
    /,
    *,
    keyword_only: bool = False,
    keyword: str | None = None,
    optional: bool = False,
    **check_options: Any,
) -> Any:
    """Declare a constructor option of an :class:`AdapterParam` subclass (a class attribute).

    Options are the constructor's parameters in declaration order (base classes' first), the
    first one the trainable budget (:attr:`AdapterParam.budget_option`); ``keyword_only`` ones
    come after the others. The constructor passes each value, the ``default`` included, through
    ``check(value, name, **check_options)`` (``check=None``: kept as given; ``optional=True``: a
    ``None`` value is kept as ``None``, whatever ``check`` is), stores the result under the
    attribute's name and then runs the class's cross-option rules
    (:meth:`AdapterParam._check_options`). ``keyword`` names the constructor keyword and config
    key where the attribute's own name is taken (LDU's ``scale`` is its trainable Parameter, so
    the option is the attribute ``scale_argument`` with ``keyword="scale"``). Returns ``Any``, as
    :func:`dataclasses.field` does, so ``rank: int | None = option(...)`` type-checks.

    Example:
        >>> from decomp._checks import check_optional_int
        >>> class RowScaleParam(AdapterParam):
        ...     rows: int | None = option(None, check_optional_int, low=1)
        >>> RowScaleParam(4).config(), RowScaleParam.budget_option
        ({'rows': 4}, 'rows')
    """
    return Option(default, check, check_options, keyword_only, keyword, optional)


def _refuse_unknown_keywords(owner: str, keywords: Sequence[str], options: Sequence[str]) -> None:
    """``TypeError`` for the first of ``keywords`` not in ``options``, naming the nearest option.

    Python's own error says only "unexpected keyword argument"; a typo (``num_atom=4``) deserves
    "did you mean 'num_atoms'?", as the optimizers' param-group keys get.
    """
    for key in keywords:
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(options) or "none"
            raise TypeError(
                f"{owner}.__init__() got an unexpected keyword argument {key!r}{hint} (options: {listed})"
            )


def _unknown_keywords_named(init: Callable[..., None]) -> Callable[..., None]:
    """A hand-written ``__init__`` that refuses an unknown keyword naming the nearest option."""
    parameters = inspect.signature(init).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return init  # passes unknown keywords on: the class that finally takes them checks
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    options = [p.name for p in parameters if p.kind in keyword_kinds and p.name != "self"]

    @functools.wraps(init)
    def checked(self: AdapterParam, *args: Any, **kwargs: Any) -> None:
        _refuse_unknown_keywords(type(self).__name__, list(kwargs), options)
        init(self, *args, **kwargs)

    return checked


def _config_value(value: Any) -> Any:
    """An option's value as configs hold it: a tuple as the list JSON gives back, else as it is."""
    return [_config_value(item) for item in value] if isinstance(value, (tuple, list)) else value


def _check_loaded_state(
    adapter: AdapterParam,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``nn.Module.load_state_dict`` pre-hook: refuse the adapter's bad values as load errors.

    Only tensors that torch would copy as they are (same shape, same kind of dtype) are judged;
    torch reports the others itself. A refused entry is replaced, in torch's private copy of the
    state dict, by the adapter's own tensor, so the adapter keeps its value; torch raises
    ``RuntimeError`` listing ``error_msgs`` once the whole model was visited.
    """
    if not adapter.is_built:
        return
    own = adapter.state_dict(keep_vars=True)
    own_keys = {prefix + key: value for key, value in own.items()}
    adapter.upgrade_state(state_dict, prefix)
    state_dict.update(legacy_scalars_reshaped(state_dict, own_keys))
    incoming = {}
    for key, current in own.items():
        value = state_dict.get(prefix + key)
        if isinstance(value, torch.Tensor) and same_kind_and_shape(value, current):
            incoming[key] = value.detach().to(current.dtype)
    for key, problem in adapter._state_problems(incoming).items():
        error_msgs.append(f"{prefix}{key}: {problem}")
        state_dict[prefix + key] = own[key]  # torch's own copy of the caller's dict


def legacy_scalars_reshaped(
    saved: Mapping[str, Any], current: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The 0-d tensors of ``saved`` whose namesake in ``current`` has shape ``(1,)``, reshaped to it.

    Adapters hold their scalars (LDU's scale, SNELLA's alpha/gamma/beta) with shape ``(1,)``, as
    FSDP2 shards no 0-d parameter; files and state dicts written when they were 0-d load through
    this (same values, same keys). Other entries are left to the caller's shape check.

    Example:
        >>> legacy_scalars_reshaped({"scale": torch.tensor(2.0)}, {"scale": torch.ones(1)})
        {'scale': tensor([2.])}
    """
    return {
        key: value.reshape(1)
        for key, value in saved.items()
        if isinstance(value, torch.Tensor)
        and value.ndim == 0
        and key in current
        and tuple(current[key].shape) == (1,)
    }


def _dtensor_class() -> type | None:
    # Only loaded once torch.distributed.tensor is imported (which any DTensor needs): no import
    # cost, and no failure on builds without torch.distributed.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor (a parameter sharded by FSDP2) gathered, a plain tensor as it is.

    Gathering is a collective: every rank of the tensor's device mesh must make the call.

    Example:
        >>> whole_tensor(torch.ones(2))
        tensor([1., 1.])
    """
    dtensor = _dtensor_class()
    return tensor.full_tensor() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def copy_whole_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` for the whole ``value``; a DTensor ``target`` takes its own shard.

    Every rank holds the whole ``value`` (read from the same file), so each keeps its part without
    communicating.

    Example:
        >>> target = torch.zeros(2)
        >>> copy_whole_into(target, torch.ones(2))
        >>> target
        tensor([1., 1.])
    """
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(target, dtensor):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(
            value.to(device=target.device, dtype=target.dtype),
            target.device_mesh,
            target.placements,
            src_data_rank=None,
        )
    target.copy_(value)


def _row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides ``torch.empty(shape)`` has (an empty dim counts as size 1)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def dtype_kind(dtype: torch.dtype) -> str:
    """``"floating"``, ``"complex"``, ``"integer"`` or ``"bool"``: what a cast may not change."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def same_kind_and_shape(value: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether ``value`` can be loaded into ``current`` by a plain cast."""
    return value.shape == current.shape and dtype_kind(value.dtype) == dtype_kind(current.dtype)


# A fingerprint holds the norm and this many fixed pseudo-random projections of a tensor.
FINGERPRINT_PROJECTIONS = 8
# How far a rebuilt floating buffer may be from the saved one, relative to its norm (see
# rebuild_tolerance for why).
REBUILD_RTOL = 1e-3
# Integer buffers (chosen locations) must be rebuilt exactly; this only absorbs the rounding of
# the float64 sums that form their fingerprint.
_INTEGER_RTOL = 1e-12
_HASH_MULTIPLIER = 0x45D9F3B
_FINGERPRINT_BLOCK = 1024
_LOW_32_BITS = 0xFFFFFFFF


def _hashed_weights(rows: int, salt: int) -> torch.Tensor:
    """``(rows, FINGERPRINT_PROJECTIONS)`` float64 weights in ``[-1, 1)``, hashed from their position.

    Computed with int64 arithmetic that never overflows (32-bit values times a 27-bit
    multiplier), so they are the same on every machine and torch version, unlike a seeded
    sampler's. ``salt`` (0 or 1) gives a second, unrelated table.
    """
    index = torch.arange(rows * FINGERPRINT_PROJECTIONS, dtype=torch.int64)
    hashed = (index * 2 + salt) & _LOW_32_BITS
    for _ in range(2):
        hashed = (((hashed >> 16) ^ hashed) * _HASH_MULTIPLIER) & _LOW_32_BITS
    hashed = (hashed >> 16) ^ hashed
    return (hashed.to(torch.float64) / 2.0**31 - 1.0).reshape(rows, FINGERPRINT_PROJECTIONS)


def buffer_fingerprint(tensor: torch.Tensor) -> list[float]:
    r"""A small summary of ``tensor`` that tells a rebuilt copy of it from a different one.

    :math:`[\lVert x \rVert_2, \; w_1^T x, \dots, w_k^T x]` for the flattened ``x`` in float64
    and ``k = FINGERPRINT_PROJECTIONS`` fixed weight vectors, identical on every machine: entry
    :math:`i = qB + p` of :math:`w_j` is :math:`a_{pj} b_{qj}` for hashed tables :math:`a`
    (``B = _FINGERPRINT_BLOCK`` rows) and :math:`b` (one row per block) with entries in
    :math:`[-1, 1)`, so the projections are one ``(n/B, B) @ (B, k)`` product, not ``k`` passes
    over ``x``. For a difference :math:`d` between two tensors each :math:`w_j^T d` has mean 0
    and variance :math:`\lVert d \rVert^2 / 9`, so :func:`fingerprint_difference` estimates
    :math:`\lVert d \rVert / \lVert x \rVert` from ``k + 1`` numbers instead of the tensor.
    Computed on the CPU (a device-to-host copy: for save and load, not for a training step); a
    sharded (FSDP2) tensor is gathered first.

    Example:
        >>> buffer_fingerprint(torch.zeros(3))
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    values = whole_tensor(tensor).detach().to(device="cpu", dtype=torch.float64).flatten()
    blocks = -(-values.numel() // _FINGERPRINT_BLOCK)
    padded = torch.nn.functional.pad(values, (0, blocks * _FINGERPRINT_BLOCK - values.numel()))
    per_block = padded.reshape(blocks, _FINGERPRINT_BLOCK) @ _hashed_weights(_FINGERPRINT_BLOCK, 0)
    sums = (per_block * _hashed_weights(blocks, 1)).sum(0)
    return [float(torch.linalg.vector_norm(values)), *sums.tolist()]


def fingerprint_difference(saved: Sequence[float], rebuilt: Sequence[float]) -> float:
    r"""The relative distance of two tensors, estimated from their fingerprints.

    Estimates :math:`\lVert x_{rebuilt} - x_{saved} \rVert / \max(\lVert x_{saved} \rVert,
    \lVert x_{rebuilt} \rVert)`: the larger of the norms' gap and the projections' gap scaled by
    :math:`3/\sqrt{k}` (see :func:`buffer_fingerprint`), over the larger norm; 0 for two zero
    tensors.

    Example:
        >>> x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
        >>> fingerprint_difference(buffer_fingerprint(x), buffer_fingerprint(x))
        0.0
        >>> # ||x - (-x)|| / ||x|| = 2, estimated from 9 numbers each:
        >>> round(fingerprint_difference(buffer_fingerprint(x), buffer_fingerprint(-x)), 2)
        2.72
    """
    if len(saved) != len(rebuilt):
        raise ValueError(f"fingerprints of different lengths: {len(saved)} and {len(rebuilt)}")
    norm = max(abs(saved[0]), abs(rebuilt[0]))
    projections = torch.tensor(saved[1:], dtype=torch.float64) - torch.tensor(
        rebuilt[1:], dtype=torch.float64
    )
    gap = max(abs(saved[0] - rebuilt[0]), float(projections.norm()) * (9 / (len(saved) - 1)) ** 0.5)
    return gap / norm if gap > 0 else 0.0


def rebuild_tolerance(*dtypes: torch.dtype) -> float:
    r"""The largest :func:`fingerprint_difference` accepted between a saved and a rebuilt buffer.

    Integer buffers (locations) must be equal: :math:`10^{-12}`, the float64 rounding of the
    fingerprint's sums. Floating buffers: :math:`\max(10^{-3}, 2\varepsilon)` over the dtypes
    given (the saved one and the model's; :math:`\varepsilon` = the dtype's machine epsilon).
    Why: the frozen factors enter the adapted weight linearly (:math:`L\,\mathrm{diag}(\cdot)\,U`,
    :math:`C\,\Delta A`, the Kronecker or PiSSA start subtracted from the trained one), so a
    relative change :math:`\rho` in a factor moves the adapted weight by about
    :math:`\rho\lVert W\rVert` at most. A rebuild of the same weight by another LAPACK, thread
    count or device differs by rounding, amplified for singular vectors by small gaps in the
    spectrum (``benchmarks/adapter_files_bench.py`` measures 1 against 2 threads on ViT-B; see
    the "Adapter files" section of the benchmarks page), and by one ulp (:math:`\le
    \varepsilon`) after a cast to a 16-bit dtype. A different pretrained weight (another
    checkpoint, a fine-tuned one) or an SVD/eigenvector sign flip differs by far more: one
    flipped factor of rank :math:`r \le 4096` alone is :math:`2/\sqrt{r} \ge 3\%`.
    :math:`10^{-3}` sits between the two; a weight within about :math:`10^{-3}` (relative) of
    the original may pass, and then moves :math:`W'` by no more than that.

    Example:
        >>> rebuild_tolerance(torch.float32), rebuild_tolerance(torch.float32, torch.bfloat16)
        (0.001, 0.015625)
    """
    if not any(dtype.is_floating_point or dtype.is_complex for dtype in dtypes):
        return _INTEGER_RTOL
    epsilons = [
        torch.finfo(dtype).eps for dtype in dtypes if dtype.is_floating_point or dtype.is_complex
    ]
    return max(REBUILD_RTOL, 2 * max(epsilons))


def rebuild_mismatch(
    saved_fingerprint: Sequence[float], rebuilt: torch.Tensor, saved_dtype: torch.dtype | None = None
) -> str | None:
    r"""Why a rebuilt buffer is not the one a file fingerprinted, or ``None`` when it is.

    The :func:`fingerprint_difference` of ``rebuilt`` from ``saved_fingerprint`` against the
    :func:`rebuild_tolerance` of ``rebuilt``'s dtype (and ``saved_dtype``, the dtype it was saved
    in, where known).

    Example:
        >>> x = torch.linspace(-1, 1, 64)
        >>> rebuild_mismatch(buffer_fingerprint(x), x) is None
        True
        >>> rebuild_mismatch(buffer_fingerprint(x), -x)
        'relative difference 2.09 > 0.001'
    """
    dtypes = (rebuilt.dtype,) if saved_dtype is None else (saved_dtype, rebuilt.dtype)
    difference = fingerprint_difference(saved_fingerprint, buffer_fingerprint(rebuilt))
    tolerance = rebuild_tolerance(*dtypes)
    if difference <= tolerance:
        return None
    return f"relative difference {difference:.3g} > {tolerance:.3g}"


class AdapterParam(nn.Module):
    r"""Base class of every adapter: :math:`W' = \mathrm{compose}(W, \Delta W)`, default :math:`W + \Delta W`.

    Subclasses declare their options with :func:`option`, may set ``min_ndim``/``max_ndim``
    (2 = linear, 3..5 = conv 1-3 D) and implement ``_build``, ``delta`` and ``_count``. A
    subclass that writes its own ``__init__`` (calling ``super().__init__()``) and ``config``
    instead still gets the unknown-keyword check.
    """

    min_ndim: ClassVar[int] = 2
    max_ndim: ClassVar[int] = 5
    #: The declared options, in constructor order (collected from the class body and its bases).
    _options: ClassVar[tuple[Option, ...]] = ()
    #: The constructor keyword that sets the trainable budget: the first declared option.
    budget_option: ClassVar[str | None] = None
    #: Names of the persistent buffers that ``_build`` computes from the pretrained weight and the
    #: config alone, reproducibly (frozen factors, chosen locations), and that training never
    #: changes: :func:`~decomp.adapters.save_adapter` leaves them out of the file and
    #: :func:`~decomp.adapters.load_adapter` rebuilds them from the model's weight, checked against
    #: their :func:`buffer_fingerprint`. A name that is a Parameter (or absent) in some mode of
    #: the adapter is ignored there.
    rebuilt_buffers: ClassVar[tuple[str, ...]] = ()
    #: Options added after adapter files of the class were first written, with the value an
    #: adapter file's config that lacks one means: the behaviour from before the option existed
    #: (KronParam's ``scale``: 1.0). :func:`~decomp.adapters.load_adapter` and a peft
    #: ``DecompConfig`` read from ``adapter_config.json`` read a file's config over these; a config
    #: built in code takes the option's current default.
    saved_defaults: ClassVar[Mapping[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared: dict[str, Option] = {}
        for klass in reversed(cls.__mro__):  # a redeclared option keeps its base's place
            declared.update((o.attribute, o) for o in vars(klass).values() if isinstance(o, Option))
        cls._options = tuple(declared.values())
        if "__init__" in vars(cls):
            cls.__init__ = _unknown_keywords_named(vars(cls)["__init__"])
            cls.__signature__ = None  # inspect reads the hand-written __init__
            return
        annotations: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            annotations.update(vars(klass).get("__annotations__", {}))
        cls.__signature__ = inspect.Signature(
            [o.parameter(annotations.get(o.attribute, inspect.Parameter.empty)) for o in cls._options]
        )
        if cls._options and "budget_option" not in vars(cls):
            cls.budget_option = cls._options[0].name

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Take the declared options (positional in declaration order, or by keyword) and check them."""
        super().__init__()
        self.weight_shape: torch.Size | None = None
        self.register_load_state_dict_pre_hook(_check_loaded_state)
        owner = type(self).__name__
        options = type(self)._options
        _refuse_unknown_keywords(owner, list(kwargs), [o.name for o in options])
        positional = [o.name for o in options if not o.keyword_only]
        if len(args) > len(positional):
            raise TypeError(
                f"{owner}.__init__() takes {len(positional)} positional arguments "
                f"({', '.join(positional) or 'none'}) but {len(args)} were given"
            )
        given = dict(zip(positional, args))
        repeated = [key for key in given if key in kwargs]
        if repeated:
            raise TypeError(f"{owner}.__init__() got multiple values for argument {repeated[0]!r}")
        given.update(kwargs)
        for declared in options:
            setattr(self, declared.attribute, declared.checked(given.get(declared.name, declared.default)))
        self._check_options()

    def _check_options(self) -> None:
        """The rules between options, run once each holds its checked value (none here).

        A subclass raises ``ValueError`` for a combination its method does not define, and may
        resolve one option from another (SNELL's default sparsity).
        """

    # ------------------------------------------------------------------ subclass hooks
    def _build(self, weight: torch.Tensor) -> None:
        """Create buffers and trainable Parameters from the detached pretrained ``weight``."""
        raise NotImplementedError

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        r"""The update :math:`\Delta W`, shape of ``weight``, in the compute dtype."""
        raise NotImplementedError

    @classmethod
    def trainable_count(cls, shape: tuple[int, ...], **config: Any) -> int:
        """Closed-form number of trainable parameters for a weight of ``shape`` and ``config``.

        ``config`` takes the constructor's keyword arguments and is validated by the constructor
        (no weight is needed); each method's formula is its ``_count``.

        Example:
            >>> from decomp.adapters import LDUParam
            >>> LDUParam.trainable_count((16, 8), rank=4)
            5
        """
        return cls(**config)._count(tuple(shape))

    def _count(self, shape: tuple[int, ...]) -> int:
        """The closed form for a weight of ``shape``, from this (unbuilt) adapter's checked options."""
        raise NotImplementedError

    @classmethod
    def _resolved_rank(
        cls,
        shape: Sequence[int],
        rank: int | None,
        *,
        high: int,
        count: Callable[[int], int],
        default: int | None = DEFAULT_RANK,
        step: int = 1,
        name: str = "rank",
    ) -> int:
        r"""An explicit ``rank`` checked in :math:`[\mathrm{step}, \mathrm{high}]`, or the default budget.

        ``None`` resolves to the largest of :math:`\min(\mathrm{default}, \mathrm{high})`,
        stepping down by ``step`` (``default=None``: from ``high``), whose trainable ``count``
        fits the weight (:func:`~decomp.adapters._budget.default_budget`); ``name`` words the
        explicit rank in a range error.

        Example:
            >>> AdapterParam._resolved_rank((13, 7), None, high=7, count=lambda r: r * (13 + 7))
            4
            >>> AdapterParam._resolved_rank((13, 7), 6, high=7, count=lambda r: r * (13 + 7))
            6
        """
        if rank is not None:
            return check_int(rank, name, low=step, high=high)
        largest = high if default is None else min(default, high)
        return default_budget(cls.__name__, "rank", shape, range(largest, 0, -step), count)

    @classmethod
    def _resolved_channel_rank(
        cls, shape: Sequence[int], rank: int | None, count: Callable[[int], int]
    ) -> int:
        """The rank shared by both channel modes (output and input), at most ``min(shape[0], shape[1])``.

        Checks ``shape`` first (:func:`check_weight_shape`); ``None`` is the default budget of
        :meth:`_resolved_rank` under :data:`DEFAULT_RANK`.

        Example:
            >>> AdapterParam._resolved_channel_rank((64, 4, 3, 3), None, lambda r: r * 68)
            4
        """
        check_weight_shape(shape)
        return cls._resolved_rank(
            shape,
            rank,
            high=min(shape[0], shape[1]),
            count=count,
            name=f"rank (weight shape {tuple(shape)})",
        )

    def _state_problems(self, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """What is wrong with the values of ``state``, tensors about to be loaded into this adapter.

        ``state`` holds some or all of this built adapter's ``state_dict()`` keys, each tensor
        already of its target's shape and dtype (so an overflow of the cast shows as Inf). Returns
        key -> what is wrong (empty: nothing). Here: NaN or Inf in a floating tensor -- a
        diverged or corrupted checkpoint, which would make the layer's output NaN. Subclasses add
        their own invariants and include these.
        """
        return {
            key: f"contains NaN or Inf (as {value.dtype})"
            for key, value in state.items()
            if value.is_floating_point() and not _all_finite(value)
        }

    def upgrade_state(self, state: dict[str, Any], prefix: str = "") -> None:
        """Rewrite, in place, the entries of ``state`` (keys ``prefix + name``) that an older
        version of this class saved under another layout; nothing here.

        Both ``nn.Module.load_state_dict`` (through the load pre-hook) and
        :func:`~decomp.adapters.load_adapter` call it on the built adapter before checking the
        keys, so a renamed or reparametrized tensor still loads (LDU's ``scale`` became
        ``relative_scale``).

        Example:
            >>> from decomp.adapters import AtomParam
            >>> state = {"atom_delta": torch.zeros(4, 3, 3)}
            >>> AtomParam.from_weight(torch.randn(8, 2, 3, 3), num_atoms=4).upgrade_state(state)
            >>> sorted(state)
            ['atom_delta']
        """

    def compose(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        r""":math:`W'` from the frozen :math:`W` and :math:`\Delta W` (both in the compute dtype)."""
        return weight + delta

    def decompose(self, value: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        r"""The frozen :math:`W` with ``compose(W, delta) == value``: the inverse of :meth:`compose`."""
        return value - delta

    def config(self) -> dict[str, Any]:
        """The constructor arguments (shown by ``repr`` and used to rebuild the adapter).

        The declared options by keyword, as checked (a tuple as a list, what JSON gives back), so
        ``type(adapter)(**adapter.config())`` is the same adapter.

        Example:
            >>> from decomp.adapters import KronParam
            >>> KronParam(2, b_shape=(4, 6), c_shape=(5, 8)).config()
            {'rank': 2, 'b_shape': [4, 6], 'c_shape': [5, 8], 'scale': None}
        """
        return {o.name: _config_value(getattr(self, o.attribute)) for o in type(self)._options}

    # ------------------------------------------------------------------ shared behaviour
    @property
    def is_built(self) -> bool:
        return self.weight_shape is not None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, **config: Any) -> AdapterParam:
        """An adapter of this class built from ``weight`` (what ``register_parametrization`` does).

        Example:
            >>> from decomp.adapters import AtomParam
            >>> adapter = AtomParam.from_weight(torch.randn(8, 4, 3, 3), num_atoms=4)
            >>> adapter.is_built
            True
        """
        adapter = cls(**config)
        adapter.right_inverse(weight)
        return adapter

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Build from ``value`` on first use; later, the frozen weight that ``forward`` maps to ``value``.

        On registration ``value`` is the pretrained weight and, as every update starts at zero
        (or is documented otherwise), it is stored unchanged. Assigning ``layer.weight = X``
        afterwards stores the weight that reproduces ``X`` under the current update.
        """
        if not self.is_built:
            check_tensor(value, "weight", min_ndim=self.min_ndim, max_ndim=self.max_ndim)
            self._build(value.detach())
            self._check_parameters_shardable()
            self.weight_shape = value.shape
            return value
        self._check_shape(value)
        work = value.to(compute_dtype(value.dtype))
        return self.decompose(work, self.delta(work)).to(value.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self._check_shape(weight)
        work = weight.to(compute_dtype(weight.dtype))
        return self.compose(work, self.delta(work)).to(weight.dtype)

    @property
    def has_branch(self) -> bool:
        """Whether this class computes :meth:`branch` without forming :math:`\\Delta W`: an additive
        update (``compose`` is the base class's) whose class defines ``_branch``."""
        cls = type(self)
        return cls._branch is not AdapterParam._branch and cls.compose is AdapterParam.compose

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        r"""A linear layer's update applied to its input: :math:`x \Delta W^\top`, ``(..., n) -> (..., m)``.

        What :func:`decomp.adapters.apply` runs on an adapted ``nn.Linear`` (its ``branch=True``
        default): :math:`y = x W^\top + b + x \Delta W^\top`, the layer's output with
        :math:`W' = W + \Delta W`, without forming :math:`\Delta W` or :math:`W'` (nor
        :math:`\partial L / \partial W'` in the backward pass) -- LoRA's side branch, for every
        method with a factored or otherwise structured update. Computed in fp32 for fp16/bf16
        ``x`` (as :meth:`forward` computes :math:`\Delta W`) and returned in ``x``'s dtype.
        Equal to ``F.linear(x, adapter.delta(W))`` up to rounding.

        Raises:
            TypeError: the class has no branch form (:attr:`has_branch` is False: Lie's
                multiplicative update, SNELL's kernel, Atom's filter atoms, Kron) -- those layers keep
                the weight path.
            ValueError: the adapter is not built on a 2-D (linear) weight, or ``x``'s last dim is
                not the weight's input size.

        Example:
            >>> from decomp.adapters import SVDParam
            >>> weight = torch.randn(6, 4)
            >>> adapter = SVDParam.from_weight(weight, rank=2)
            >>> with torch.no_grad():
            ...     _ = adapter.left.add_(0.1)
            >>> x = torch.randn(3, 4)
            >>> torch.allclose(adapter.branch(x), x @ adapter.delta(weight).T, atol=1e-6)
            True
        """
        if not self.has_branch:
            raise TypeError(f"{type(self).__name__} has no branch form; its layers keep the weight path")
        if not self.is_built or len(self.weight_shape) != 2:
            shape = None if self.weight_shape is None else tuple(self.weight_shape)
            raise ValueError(f"branch needs an adapter built on a linear (2-D) weight, got weight shape {shape}")
        if x.shape[-1:] != self.weight_shape[1:]:
            raise ValueError(f"branch: x's last dim must be {self.weight_shape[1]}, got shape {tuple(x.shape)}")
        return self._branch(x.to(compute_dtype(x.dtype))).to(x.dtype)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`x \Delta W^\top` for ``x`` of shape ``(..., n)`` in the compute dtype (the hook a
        structured method overrides; the base class has none)."""
        raise NotImplementedError

    def rebuilt_state(self) -> dict[str, torch.Tensor]:
        """The built adapter's buffers named in :attr:`rebuilt_buffers`, by ``state_dict`` key.

        Example:
            >>> from decomp.adapters import LDUParam
            >>> sorted(LDUParam.from_weight(torch.randn(4, 3)).rebuilt_state())
            ['initial_pivots', 'initial_scale', 'left', 'right']
        """
        buffers = dict(self.named_buffers(recurse=False))
        return {
            name: buffers[name]
            for name in self.rebuilt_buffers
            if name in buffers and name not in self._non_persistent_buffers_set
        }

    def num_trainable(self) -> int:
        """Number of trainable elements this adapter holds."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _check_parameters_shardable(self) -> None:
        """Every Parameter ``_build`` made is row-major contiguous and at least 1-D, or ``RuntimeError``.

        FSDP2's ``fully_shard`` refuses both a non-contiguous parameter (a factor kept as a
        transposed view) and a 0-d one, and DDP's gradient buckets expect row-major strides even
        on size-1 dims (which ``.contiguous()`` leaves as they are), so an adapter that built
        either could not be sharded or bucketed as laid out: this catches it in every adapter, on
        every weight, at build time.
        """
        for key, parameter in self.named_parameters():
            expected = _row_major_strides(parameter.shape)
            if parameter.ndim == 0 or parameter.stride() != expected:
                problem = "0-d (hold a scalar with shape (1,))" if parameter.ndim == 0 else (
                    f"not contiguous in row-major order (strides {parameter.stride()}, expected "
                    f"{expected}; create it with .clone(memory_format=torch.contiguous_format))"
                )
                raise RuntimeError(
                    f"{type(self).__name__}._build created Parameter {key!r} of shape "
                    f"{tuple(parameter.shape)} that is {problem}: FSDP2 (fully_shard) refuses 0-d "
                    "and non-contiguous parameters, and DDP lays out gradients row-major"
                )

    def _check_shape(self, weight: torch.Tensor) -> None:
        if not self.is_built:
            # register_parametrization builds an adapter through right_inverse only when it is
            # the first parametrization of the tensor; stacked on another one (an adapter,
            # weight_norm, spectral_norm) it calls forward first, which lands here.
            name = type(self).__name__
            raise RuntimeError(
                f"{name} is not built yet: it builds from a plain weight when it is the first "
                "parametrization registered on it (parametrize.register_parametrization), or "
                f"with {name}.from_weight(weight). If the layer's weight is already parametrized "
                "(an adapter, weight_norm, spectral_norm), adapters do not stack on it: bake or "
                "remove that parametrization first (decomp.adapters.merge(model), or "
                'parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True))'
            )
        if weight.shape != self.weight_shape:
            raise ValueError(
                f"{type(self).__name__} was built for a weight of shape {tuple(self.weight_shape)}, "
                f"got {tuple(weight.shape)}"
            )

    def extra_repr(self) -> str:
        parts = [f"{key}={value!r}" for key, value in self.config().items()]
        if self.is_built:
            parts.append(f"weight_shape={tuple(self.weight_shape)}")
            parts.append(f"trainable={self.num_trainable()}")
        return ", ".join(parts)
