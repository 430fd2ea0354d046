"""What every optimizer of :mod:`optim` shares: option checks, state layouts, a validated step and load.

Each optimizer keeps its per-parameter state as tensors only (moments, bases, integer indices,
seeds), so ``torch.load(path, weights_only=True)`` reads a saved ``state_dict``. Floating state of
fp16/bf16 parameters lives in fp32 (:func:`state_dtype`); :meth:`TensorStateOptimizer.load_state_dict`
keeps that choice and keeps integer tensors integer, where ``torch.optim.Optimizer`` would cast every
tensor to the parameter's dtype.

Three guarantees hold for every optimizer built on :class:`TensorStateOptimizer`:

- **Options are values, checked once.** Every option of every param group (the constructor's, one
  added later, one loaded from a ``state_dict``) goes through the optimizer's table of checks,
  which names the option in its error and normalises numpy scalars to Python numbers; a key that
  is no option raises ``ValueError`` and suggests the nearest one. A renamed option
  (:attr:`TensorStateOptimizer.renamed_options`) is read under its old name for one release,
  with a ``DeprecationWarning``, so a group saved before the rename still loads.
- **State fits its parameter.** Each optimizer knows the layout of a parameter's state (key ->
  integer or floating, shape) from the parameter and its group's options; a load checks every
  entry against it, and so does every step before it touches anything (skipping a state whose
  entries and options are the very objects it last found fitting, on a parameter of the same
  shape, dtype and device).
- **Steps and loads are atomic.** A step checks every gradient and state first, then computes what
  can fail (decompositions), and only then writes; a load validates the whole ``state_dict`` (after
  the user's ``load_state_dict`` pre-hooks) before anything is replaced. On any error the
  parameters, state and param groups are exactly as before.
"""

from __future__ import annotations

import difflib
import math
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from decomp._checks import _all_finite, check_int, check_real, compute_dtype
from decomp._deprecation import renamed_keywords

from ._adam import adamw_steps

__all__ = [
    "COMMON_OPTIONS",
    "OptionCheck",
    "StateSpec",
    "TensorStateOptimizer",
    "as_matrix",
    "check_param",
    "choice",
    "flag",
    "floating",
    "integer",
    "first_nonfinite",
    "local",
    "optional",
    "options_of",
    "real",
    "state_dtype",
    "whole",
]

OptionCheck = Callable[[Any, str], Any]
"""``check(value, name) -> normalised value``; raises ``TypeError``/``ValueError`` naming ``name``."""


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype of floating optimizer state for ``param``: fp32 for fp16/bf16, else its own."""
    return compute_dtype(param.dtype)


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D view an optimizer works on: ``(shape[0], -1)`` for N-D tensors (conv kernels)."""
    return tensor if tensor.ndim == 2 else tensor.reshape(tensor.shape[0], -1)


_NOT_OPTIONS = ("self", "params", "__class__")


def options_of(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A constructor's options from its ``locals()``, in signature order.

    Every argument but ``self`` and ``params`` (and the ``__class__`` cell that ``super()``
    adds), so each optimizer declares its options once, in its signature; call it first thing,
    before the constructor binds any other name.

    Example:
        >>> def construct(params, lr=1e-3, *, eps=1e-8):
        ...     return options_of(locals())
        >>> construct([], lr=0.1)
        {'lr': 0.1, 'eps': 1e-08}
    """
    return {key: value for key, value in arguments.items() if key not in _NOT_OPTIONS}


def check_param(param: torch.Tensor) -> None:
    """Reject parameters no optimizer here supports (complex or non-floating), with a TypeError."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"params must be tensors, got {type(param).__name__}")
    if param.is_complex() or not param.is_floating_point():
        raise TypeError(
            f"parameters must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {param.dtype}"
        )


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor is its own)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# ---------------------------------------------------------------------------------------- options


def real(
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
) -> OptionCheck:
    """A finite real number (numpy ones included) in the interval, returned as ``float``."""

    def check(value: Any, name: str) -> float:
        return check_real(
            value,
            name,
            low=low,
            high=high,
            low_inclusive=low_inclusive,
            high_inclusive=high_inclusive,
        )

    return check


_nonnegative = real(0.0, low_inclusive=True)


def whole(low: int, high: int | None = None) -> OptionCheck:
    """An integer (numpy ones included, ``bool`` not) in ``[low, high]``, returned as ``int``."""

    def check(value: Any, name: str) -> int:
        return check_int(value, name, low=low, high=high)

    return check


def choice(*choices: str) -> OptionCheck:
    """One of ``choices``, returned as the canonical Python string."""

    def check(value: Any, name: str) -> str:
        if isinstance(value, str):
            for option in choices:
                if value == option:
                    return option
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")

    return check


def flag(value: Any, name: str) -> bool:
    """A ``bool`` (or numpy bool), returned as ``bool``; other truthy values raise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def optional(check: OptionCheck) -> OptionCheck:
    """``None`` or what ``check`` accepts."""

    def check_or_none(value: Any, name: str) -> Any:
        return None if value is None else check(value, name)

    return check_or_none


def _learning_rate(value: Any, name: str) -> float | torch.Tensor:
    """A real ``lr >= 0``, or a 1-element real tensor (0-d or not) holding one, as torch.optim.

    A tensor stays the same tensor, so LR schedulers that ``fill_`` it keep working; the step reads
    it as a Python number (free for a CPU tensor, one device sync per step for another device).
    """
    if not isinstance(value, torch.Tensor):
        return _nonnegative(value, name)
    if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(
            f"a tensor {name} must hold one real number (0-d or 1-element), "
            f"got shape {tuple(value.shape)} and dtype {value.dtype}"
        )
    if value.requires_grad:
        raise ValueError(f"a tensor {name} must not require grad (differentiable=True is refused)")
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be a float >= 0, got {number}")
    return value


def _adam_betas(value: Any, name: str) -> tuple[float, float]:
    r"""A pair :math:`(\beta_1, \beta_2)` in :math:`[0, 1)`, returned as a tuple of floats."""
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a pair of floats, got {type(value).__name__}")
    pair = tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be a pair of floats, got {value!r}")
    return tuple(  # type: ignore[return-value]
        check_real(beta, f"{name}[{index}]", low=0.0, high=1.0, low_inclusive=True)
        for index, beta in enumerate(pair)
    )


def _refused(reason: str, allowed: tuple[Any, ...] = (False,)) -> OptionCheck:
    """A torch.optim flag these optimizers do not implement: only ``allowed`` values pass."""

    def check(value: Any, name: str) -> Any:
        if value is None and None in allowed:
            return None
        if flag(value, name) not in allowed:
            raise ValueError(f"{name}={value!r} is not supported: {reason}")
        return bool(value)

    return check


COMMON_OPTIONS: dict[str, OptionCheck] = {
    "lr": _learning_rate,
    "betas": _adam_betas,
    "eps": _nonnegative,
    "weight_decay": _nonnegative,
    "maximize": flag,
    "fused": _refused(
        "there is no fused kernel for this optimizer's step (use foreach where offered)",
        allowed=(None, False),
    ),
    "capturable": _refused(
        "the step reads its counters on the host (refresh schedule, bias correction), so it "
        "cannot be captured in a CUDA graph"
    ),
    "differentiable": _refused(
        "the step runs under torch.no_grad() and updates parameters and state in place"
    ),
}
"""Options every optimizer here has: AdamW's (its fallback reads them) and torch.optim's flags."""

_GROUP_KEYS = ("params", "param_names")  # torch.optim's own keys of a param group, not options


# ------------------------------------------------------------------------------------ state layout


class StateSpec(NamedTuple):
    """What one state tensor must be: floating or integer, and its shape.

    A ``range`` in ``shape`` allows any size in it (a basis that grows, say).
    """

    floating: bool
    shape: tuple[int | range, ...]


def floating(*shape: int | range) -> StateSpec:
    """A floating state tensor of ``shape`` (cast to the state dtype on load)."""
    return StateSpec(True, shape)


def integer(*shape: int | range) -> StateSpec:
    """An integer state tensor of ``shape`` (counters, seeds, indices)."""
    return StateSpec(False, shape)


def _adamw_layout(param: torch.Tensor) -> dict[str, StateSpec]:
    shape = tuple(local(param).shape)
    return {"step": integer(), "exp_avg": floating(*shape), "exp_avg_sq": floating(*shape)}


def _shape_text(shape: tuple[int | range, ...]) -> str:
    sizes = [
        f"{size.start}..{size.stop - 1}" if isinstance(size, range) else str(size) for size in shape
    ]
    return f"({', '.join(sizes)}{',' if len(sizes) == 1 else ''})"


def _fits(shape: torch.Size, expected: tuple[int | range, ...]) -> bool:
    return len(shape) == len(expected) and all(
        size in allowed if isinstance(allowed, range) else size == allowed
        for size, allowed in zip(shape, expected)
    )


_RELOAD_HINT = (
    "the parameter changed since its state was made; load the state again "
    "(opt.load_state_dict(opt.state_dict())) to cast and move it"
)


def _layout_problem(
    state: Mapping[str, Any], layout: Mapping[str, StateSpec], param: torch.Tensor | None = None
) -> str | None:
    """What is wrong with ``state`` for ``layout`` (``None``: it fits).

    With ``param`` (a state about to be stepped, not one being loaded, which is cast to it) the
    floating entries must also be in its :func:`state_dtype` and every entry but the 0-d host
    counters on its device: a parameter converted or moved after its state was made
    (``model.double()``, ``model.to(device)``) would otherwise be rounded to the state's dtype on
    every step or fail inside a kernel after part of the step was written.
    """
    missing = sorted(set(layout) - set(state))
    unexpected = sorted(str(key) for key in set(state) - set(layout))
    if missing or unexpected:
        return (
            f"has keys {sorted(map(str, state))}, expected {sorted(layout)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {unexpected})" if unexpected else "")
        )
    for key, spec in layout.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"holds a {type(value).__name__} under {key!r}, expected a tensor"
        integral = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        if not (value.is_floating_point() if spec.floating else integral):
            kind = "floating" if spec.floating else "integer"
            return f"has {key!r} of dtype {value.dtype}, expected {kind}"
        if not _fits(value.shape, spec.shape):
            return (
                f"has {key!r} of shape {tuple(value.shape)}, expected {_shape_text(spec.shape)}"
            )
        if param is None:
            continue
        if spec.floating and value.dtype != state_dtype(param):
            return f"has {key!r} of dtype {value.dtype}, expected {state_dtype(param)}: {_RELOAD_HINT}"
        if (value.ndim > 0 or value.is_floating_point()) and value.device != param.device:
            return f"has {key!r} on {value.device}, expected {param.device}: {_RELOAD_HINT}"
    return None


class _Options(NamedTuple):
    """The group's options a state layout may depend on: all but ``params`` and ``lr`` (which a
    scheduler sets every step and no layout reads)."""

    names: tuple[str, ...]
    values: tuple[Any, ...]


class _Fit(NamedTuple):
    """A state found to fit its parameter, and what that finding rests on (cheap to compare)."""

    param_shape: torch.Size
    param_dtype: torch.dtype
    param_device: torch.device
    options: _Options
    entries: tuple[tuple[str, weakref.ref, torch.Size, torch.dtype], ...]


def _layout_options(group: Mapping[str, Any]) -> _Options:
    names = tuple(name for name in group if name not in ("params", "lr"))
    return _Options(names, tuple(group[name] for name in names))


def _fit(param: torch.Tensor, options: _Options, state: Mapping[str, Any]) -> _Fit:
    entries = tuple(
        (key, weakref.ref(value), value.shape, value.dtype) for key, value in state.items()
    )
    return _Fit(param.shape, param.dtype, param.device, options, entries)


def _still_fits(fit: _Fit, param: torch.Tensor, options: _Options, state: Mapping[str, Any]) -> bool:
    """Whether nothing a layout check reads changed since ``fit``: the parameter's shape, dtype
    and device, each option (the same object), and each state entry (the same tensor, with its
    shape and dtype).

    Identity, not equality: a replaced tensor or option is checked again even when equal, and a
    weak reference cannot be fooled by a new tensor at a freed one's address.
    """
    if (
        param.shape != fit.param_shape
        or param.dtype != fit.param_dtype
        or param.device != fit.param_device
        or len(state) != len(fit.entries)
    ):
        return False
    if options.names != fit.options.names or not all(
        map(operator.is_, options.values, fit.options.values)
    ):
        return False
    for key, ref, shape, dtype in fit.entries:
        value = state.get(key)
        if value is None or ref() is not value or value.shape != shape or value.dtype != dtype:
            return False
    return True


_MISMATCH_HINT = (
    "a state saved for other parameters, another parameter order or other options "
    "(rank, projector, basis, max_dim, protect)?"
)


# ------------------------------------------------------------------------------------ optimizer


class TensorStateOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` with checked options, tensor-only state, atomic steps and loads.

    Subclasses declare their options (:attr:`options`: name -> check), the state layout of a
    parameter they step as a matrix (:meth:`_matrix_layout`), and the matrix step in two phases:
    :meth:`_prepare` computes everything that can fail without writing anything, then
    :meth:`_step_matrices` writes. Parameters that :meth:`_takes_adamw` take AdamW's step here.
    """

    options: ClassVar[Mapping[str, OptionCheck]] = COMMON_OPTIONS
    fixed_options: ClassVar[Mapping[str, Any]] = {}
    """Options a subclass pins (``DCTProjectedAdam``'s projector): no group may set another value."""
    renamed_options: ClassVar[Mapping[str, str]] = {}
    """Old option name -> current name. A param group (given, added or loaded) may still use the
    old name for one release: it is read as the current one with a ``DeprecationWarning``, and a
    group holding both raises ``TypeError``."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
    ) -> None:
        super().__init__(params, self._checked_options(defaults))

    # ------------------------------------------------------------------------------ options

    @classmethod
    def _checked_options(
        cls, group: Mapping[str, Any], known: Iterable[str] = ()
    ) -> dict[str, Any]:
        """The options of ``group``, checked and normalised; keys outside ``known`` raise."""
        allowed = set(cls.options) | set(known) | set(_GROUP_KEYS)
        if "params" in group:  # a param group (given, added or loaded), not the defaults
            group = cls._resolved_options(group)
        for key in group:
            if key not in allowed:
                # a misspelt old name still points to the current one
                names = sorted(cls.options) + sorted(cls.renamed_options)
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {cls.renamed_options.get(close[0], close[0])!r}?" if close else ""
                raise ValueError(
                    f"unknown option {key!r} for {cls.__name__}{hint} "
                    f"(options: {', '.join(sorted(cls.options))})"
                )
        checked = {
            key: check(group[key], key) for key, check in cls.options.items() if key in group
        }
        for key, value in cls.fixed_options.items():
            if key in checked and checked[key] != value:
                raise ValueError(
                    f"{cls.__name__} fixes {key}={value!r}, got {key}={checked[key]!r} (a param "
                    f"group or a state_dict of another optimizer?); use "
                    f"{cls.__mro__[1].__name__}({key}=...) for another"
                )
        return {**group, **checked}

    @classmethod
    def _resolved_options(cls, group: Mapping[str, Any]) -> Mapping[str, Any]:
        """``group`` with the options left to ``None`` that depend on its other options filled in
        (default: as is); :class:`~optim.RotatedAdam` resolves its per-basis defaults here."""
        return group

    @classmethod
    def _current_names(cls, group: Mapping[str, Any], stacklevel: int = 5) -> dict[str, Any]:
        """``group`` with every old name of :attr:`renamed_options` replaced by its current one."""
        return renamed_keywords(group, cls.renamed_options, cls.__name__, stacklevel=stacklevel)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        count = len(self.param_groups)
        if isinstance(param_group, Mapping):
            # before torch fills in the defaults, which would put the current name next to the old
            param_group = self._current_names(param_group)
        try:
            super().add_param_group(param_group)
            group = self.param_groups[-1]
            for param in group["params"]:
                check_param(param)
            group.update(self._checked_options(group))
            for param in group["params"]:
                self._state_layout(param, group)  # raises for a parameter the options cannot serve
        except (TypeError, ValueError):
            del self.param_groups[count:]  # a rejected group leaves the optimizer as it was
            raise

    # ------------------------------------------------------------------------------ state layout

    def _takes_adamw(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``param`` takes the plain AdamW step (default: tensors with fewer than 2 dims,
        and empty ones, which have no basis to compute and no entry to move)."""
        return param.ndim < 2 or param.numel() == 0

    def _matrix_layout(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, StateSpec]:
        """The state layout of a parameter stepped as a matrix; raise ``ValueError`` if the
        group's options cannot serve it."""
        raise NotImplementedError

    def _state_layout(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, StateSpec]:
        """Key -> :class:`StateSpec` of the started state of ``param`` under ``group``'s options."""
        if self._takes_adamw(param, group):
            return _adamw_layout(param)
        return self._matrix_layout(param, group)

    def _upgraded_state(
        self, param: torch.Tensor, group: dict[str, Any], state: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """A loaded state of ``param`` saved by an earlier release, with what this one adds filled
        in so that it continues as that release would have (default: as is); checked against the
        layout after this."""
        return state

    def _recorded_dims_problem(
        self, param: torch.Tensor, group: dict[str, Any], state: Mapping[str, torch.Tensor]
    ) -> str | None:
        """What is wrong with the sizes a state that fits its layout records in values, not
        shapes (0-d host integers: reading them costs no device sync), for ``param`` as it is now
        (default: nothing recorded). Run at every full check: on load, and at a step whose
        parameter or state changed since it last fitted (:meth:`_check_state`)."""
        return None

    def _state_value_problem(
        self, param: torch.Tensor, group: dict[str, Any], state: Mapping[str, torch.Tensor]
    ) -> str | None:
        """What is wrong with the values of a loaded state that fits its layout (host reads, so
        only on load): negative counters here; subclasses add index ranges."""
        for key, value in state.items():
            if key.endswith("step") and value.ndim == 0 and int(value) < 0:
                return f"has {key!r} = {int(value)}, expected >= 0"
        return None

    def _describe(self, param: torch.Tensor) -> str:
        """``parameter 'name' (shape ...)`` or ``param_groups[g]['params'][i] (shape ...)``."""
        for group_index, group in enumerate(self.param_groups):
            for position, candidate in enumerate(group["params"]):
                if candidate is param:
                    names = group.get("param_names")
                    where = (
                        repr(names[position])
                        if names
                        else f"param_groups[{group_index}]['params'][{position}]"
                    )
                    return f"parameter {where} (shape {tuple(param.shape)})"
        return f"a parameter of shape {tuple(param.shape)}"

    def _check_state(
        self,
        param: torch.Tensor,
        group: dict[str, Any],
        options: _Options | None = None,
    ) -> None:
        """Raise ``ValueError`` if ``param``'s state does not fit it (an empty state always does).

        A state that fitted at the last check and whose entries and options are the very same
        objects since, on a parameter of the same shape, dtype and device (:func:`_still_fits`),
        is not checked again: the steady steps
        of many small matrices spent a tenth of their time here. ``options`` is
        :func:`_layout_options` of ``group`` (computed here if not given).
        """
        if options is None:
            options = _layout_options(group)
        state = self.state.get(param)
        known = self._fitting.get(param)
        if state and known is not None and _still_fits(known, param, options, state):
            return
        layout = self._state_layout(param, group)  # raises for a parameter the options cannot serve
        if not state:
            return
        problem = _layout_problem(state, layout, param)
        if problem is None:
            problem = self._recorded_dims_problem(param, group, state)
        if problem is not None:
            raise ValueError(
                f"the optimizer state of {self._describe(param)} {problem}; {_MISMATCH_HINT}"
            )
        self._fitting[param] = _fit(param, options, state)

    @property
    def _fitting(self) -> dict[torch.Tensor, _Fit]:
        """Parameter -> the last state found to fit it (:meth:`_check_state`); outside
        :meth:`state_dict`, pickles and deep copies, as ``torch.optim.Optimizer.__getstate__``
        keeps only the defaults, state and groups."""
        return self.__dict__.setdefault("_fitting_states", {})

    # ------------------------------------------------------------------------------ step

    def _check_gradients(
        self, work: list[tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]]
    ) -> None:
        """Raise before anything changes if a matrix gradient cannot be stepped (default: none).

        ``work`` holds each group (lr resolved) with its ``(param, grad)`` matrix pairs.
        """

    def _prepare(
        self, group: dict[str, Any], params: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> Any:
        """Everything of this step that can fail, computed without writing (default: nothing)."""
        return None

    def _step_matrices(
        self, group: dict[str, Any], params: list[tuple[torch.Tensor, torch.Tensor]], plan: Any
    ) -> None:
        """Step the ``(param, grad)`` pairs of ``group`` that do not take AdamW."""
        raise NotImplementedError

    def _gather(
        self,
    ) -> list[
        tuple[
            dict[str, Any],
            list[tuple[torch.Tensor, torch.Tensor]],
            list[tuple[torch.Tensor, torch.Tensor]],
        ]
    ]:
        """Each group's options (a tensor lr read as a number) with its AdamW and matrix pairs.

        Raises before anything changes on a sparse gradient or a state that does not fit its
        parameter; the gradients are negated for ``maximize``.
        """
        work = []
        for group in self.param_groups:
            lr = group["lr"]
            options = {**group, "lr": float(lr)} if isinstance(lr, torch.Tensor) else group
            layout_options = _layout_options(group)
            fallback, matrices = [], []
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        f"sparse gradients are not supported ({self._describe(param)}); "
                        f"use torch.optim.SparseAdam"
                    )
                self._check_state(param, group, layout_options)
                pair = (param, -grad if group["maximize"] else grad)
                (fallback if self._takes_adamw(param, group) else matrices).append(pair)
            work.append((options, fallback, matrices))
        return work

    # Eager even inside torch.compile: the step reads host counters and checks (graph breaks,
    # so nothing to gain), and inductor miscompiles it silently (torch 2.13 on the CPU:
    # `W.add_(A @ B, alpha=-lr)` loses its alpha, `zeros.lerp_(A @ B, w)` its weight).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter with a gradient; returns ``closure()`` if given.

        Parameters that :meth:`_takes_adamw` step with ``torch.optim.AdamW``'s arithmetic and the
        group's ``lr``, ``betas``, ``eps`` and ``weight_decay``; the others of each group go to
        :meth:`_step_matrices` together. Every check and every computation that can fail runs for
        all parameters before the first one changes. Under ``torch.compile`` the step runs
        eagerly (a graph break), with the same result as without.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather()
        self._check_gradients([(options, matrices) for options, _, matrices in work])
        plans = [
            self._prepare(options, matrices) if matrices else None
            for options, _, matrices in work
        ]
        for (options, fallback, matrices), plan in zip(work, plans):
            adamw_steps(
                [local(param) for param, _ in fallback],
                [local(grad) for _, grad in fallback],
                [self.state[param] for param, _ in fallback],
                lr=options["lr"],
                betas=options["betas"],
                eps=options["eps"],
                weight_decay=options["weight_decay"],
                foreach=options.get("foreach") is not False,
            )
            if matrices:
                self._step_matrices(options, matrices, plan)
        return loss

    # ------------------------------------------------------------------------------ load

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, atomically: all of it is validated, then all of it replaces.

        ``load_state_dict`` pre-hooks run first and their edits count; the state is then checked
        against the parameters it lands on (the groups' sizes, each entry's keys, kinds and shapes
        for its parameter under the loaded options, counters and indices in range) and its
        options go through the same checks as the constructor's. Options a saved group lacks take
        the optimizer's defaults. Floating state is cast to :func:`state_dtype` of its parameter
        and integer state stays integer. Any mismatch raises ``ValueError`` naming the parameter
        and leaves the optimizer as it was; post-hooks then see the loaded state.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        loaded: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

        def validate(optimizer: torch.optim.Optimizer, hooked: dict[str, Any]) -> dict[str, Any]:
            state, groups = self._validated_load(hooked)
            loaded.update(state)
            # torch.optim would cast every state tensor to its parameter's dtype (integer indices
            # and fp32 moments of bf16 weights included); the state goes in through `install`.
            return {**hooked, "state": {}, "param_groups": groups}

        def install(optimizer: torch.optim.Optimizer) -> None:
            self.state.update(loaded)

        # Registered now, so validation runs after every user pre-hook and the state is in place
        # before every user post-hook.
        pre_hook = self.register_load_state_dict_pre_hook(validate)
        post_hook = self.register_load_state_dict_post_hook(install, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre_hook.remove()
            post_hook.remove()

    def _loaded_options(
        self, index: int, saved: dict[str, Any], group: dict[str, Any]
    ) -> dict[str, Any]:
        """The options of saved group ``index`` (defaults filled in) as they will be checked,
        given the ``group`` they land on (default: as saved); a subclass restores here a value
        that :meth:`state_dict` saved as a name."""
        return saved

    def _validated_load(
        self, state_dict: Mapping[str, Any]
    ) -> tuple[dict[torch.Tensor, dict[str, torch.Tensor]], list[dict[str, Any]]]:
        """The cast state (by parameter) and the checked groups of ``state_dict``; raises first."""
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_state, Mapping) or not isinstance(saved_groups, (list, tuple)):
            raise ValueError("state_dict['state'] must be a dict and ['param_groups'] a list")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state_dict has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        groups = []
        owners: dict[Any, tuple[torch.Tensor, dict[str, Any]]] = {}
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise ValueError(f"param group {index} of the state_dict has no 'params'")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {index} of the state_dict has {len(saved['params'])} "
                    f"parameters, this optimizer's has {len(group['params'])}"
                )
            _check_same_order(index, saved.get("param_names"), group.get("param_names"))
            # Options a saved group lacks (say, one added since it was saved) take the defaults;
            # keys that are no option (a scheduler's initial_lr) are kept, as torch.optim does.
            merged = self._loaded_options(
                index, {**self.defaults, **self._current_names(saved)}, group
            )
            checked = self._checked_options(merged, known=merged)
            groups.append(checked)
            for param_id, param in zip(saved["params"], group["params"]):
                if param_id in owners:
                    raise ValueError(f"the state_dict lists parameter id {param_id!r} twice")
                owners[param_id] = (param, checked)
                self._state_layout(param, checked)
        state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for param_id, values in saved_state.items():
            if param_id not in owners:
                raise ValueError(
                    f"the state_dict holds state for parameter id {param_id!r}, which none of "
                    f"its param groups lists"
                )
            param, group = owners[param_id]
            if not isinstance(values, Mapping):
                raise ValueError(
                    f"the state of {self._describe(param)} must be a dict of tensors, "
                    f"got {type(values).__name__}"
                )
            if not values:
                continue
            values = self._upgraded_state(param, group, values)
            problem = _layout_problem(values, self._state_layout(param, group))
            if problem is None:
                problem = self._recorded_dims_problem(param, group, values)
            if problem is None:
                problem = self._state_value_problem(param, group, values)
            if problem is not None:
                raise ValueError(
                    f"the loaded state of {self._describe(param)} {problem}; {_MISMATCH_HINT}"
                )
            state[param] = {key: _cast(param, key, value) for key, value in values.items()}
        return state, groups


def _check_same_order(index: int, saved: Any, current: Any) -> None:
    """Raise if both lists name the same parameters in another order (a permuted state)."""
    if not saved or not current or list(saved) == list(current):
        return
    if sorted(map(str, saved)) == sorted(map(str, current)):
        position = next(i for i, (a, b) in enumerate(zip(saved, current)) if a != b)
        raise ValueError(
            f"param group {index} of the state_dict lists its parameters in another order: "
            f"position {position} is {saved[position]!r} there and {current[position]!r} here; "
            f"reorder the state in a load_state_dict pre-hook"
        )


def _cast(param: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:
    """A loaded state tensor on ``param``'s device: floating ones in :func:`state_dtype`.

    Counters and seeds (0-d integers) stay where they are (host tensors, as torch.optim keeps its
    step), so schedules read them without a device sync.
    """
    if value.ndim == 0 and not value.is_floating_point():
        return value
    if value.is_floating_point():
        return value.to(dtype=state_dtype(param), device=param.device)
    return value.to(device=param.device)


def first_nonfinite(tensors: list[torch.Tensor]) -> int | None:
    """The index of the first tensor with NaN/Inf, or ``None``; one host sync for all of them."""
    if not tensors:
        return None
    device = tensors[0].device
    sums = [tensor.sum(dtype=compute_dtype(tensor.dtype)).float().to(device) for tensor in tensors]
    if bool(torch.isfinite(torch.stack(sums)).all()):
        return None
    # A non-finite sum may be an overflow of finite entries: settle each one exactly.
    return next((index for index, tensor in enumerate(tensors) if not _all_finite(tensor)), None)

