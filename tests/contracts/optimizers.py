"""The optimizers under the shared contract suite (``test_optimizer_contract.py``).

A new optimizer (or configuration) gets the whole suite by appending one ``OptimizerCase``:
``factory(params, lr, **options)`` builds it with small ranks and short refresh gaps, so a few
steps cross subspace refreshes and basis updates. As torch's ``OptimizerInfo``, a case also lists
bad option values (``error_inputs``, listed on one case per family: its variants share the
validation) and whether it has a ``foreach`` option. ``RELIABILITY_FACTORIES`` and the snapshot
helpers below serve the reliability suite (``tests/reliability/test_optim_*.py``).
"""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

import torch

from optim import ARO, DCTProjectedAdam, ProjectedAdam, RotatedAdam, SVDProjectedAdam

from ..optim.test_custom_projector import CoordinateProjector


class ErrorInput(NamedTuple):
    """A bad value for one option, the exception it raises and a fragment of its message;
    ``group_error`` is the exception ``add_param_group`` raises where that differs."""

    value: Any
    error: type[Exception]
    match: str
    group_error: type[Exception] | None = None


class OptimizerCase(NamedTuple):
    """``factory(params, lr, **options)`` builds the optimizer, ``options`` overriding the case's
    own; ``error_inputs`` maps an option to a bad value for it; ``foreach`` says whether the
    optimizer takes a ``foreach`` option (``True``/``False`` must then step bitwise alike)."""

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    error_inputs: Mapping[str, ErrorInput] = MappingProxyType({})
    foreach: bool = False


def _factory(
    cls: type[torch.optim.Optimizer], **defaults: Any
) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Any, lr: float, **options: Any) -> torch.optim.Optimizer:
        return cls(params, **{**defaults, "lr": lr, **options})

    return build


# the torch.optim options every optimizer here validates alike (optim._base.COMMON_OPTIONS)
COMMON_ERROR_INPUTS = {
    "betas": ErrorInput((0.9, 1.0), ValueError, r"betas\[1\] must be a float in \[0, 1\)"),
    "eps": ErrorInput(-1.0, ValueError, "eps must be a float >= 0"),
    "weight_decay": ErrorInput(-1.0, ValueError, "weight_decay must be a float >= 0"),
    "maximize": ErrorInput(1, TypeError, "maximize must be True or False"),
    "fused": ErrorInput(True, ValueError, "fused=True is not supported"),
    "capturable": ErrorInput(True, ValueError, "capturable=True is not supported"),
    "check_finite": ErrorInput("yes", TypeError, "check_finite must be True or False"),
}
PROJECTED_ERROR_INPUTS = {
    **COMMON_ERROR_INPUTS,
    "rank": ErrorInput(0, ValueError, "rank must be >= 1"),
    "update_gap": ErrorInput(0, ValueError, "update_gap must be >= 1"),
    "moments": ErrorInput("zero", ValueError, r"moments must be one of \['keep', 'rotate'"),
    "score_norm": ErrorInput("l3", ValueError, "score_norm must be one of"),
    "foreach": ErrorInput(1, TypeError, "foreach must be True or False"),
    "protect_energy": ErrorInput(1.5, ValueError, r"protect_energy must be a float in \(0, 1\]"),
    "svd": ErrorInput("qr", ValueError, "svd must be one of"),
    "dct_method": ErrorInput("dft", ValueError, "dct_method must be one of"),
    "seed": ErrorInput(-1, ValueError, "seed must be in"),
    "projector": ErrorInput("pca", ValueError, "a Projector object or a factory of one"),
    "error_feedback": ErrorInput("yes", TypeError, "error_feedback must be True or False"),
    "matrix": ErrorInput(None, TypeError, "matrix must be True or False"),
}
# DCTProjectedAdam and SVDProjectedAdam fix their projector: the constructor refuses the keyword
# (TypeError), a param group the value (ValueError)
WRAPPER_ERROR_INPUTS = {
    **PROJECTED_ERROR_INPUTS,
    "projector": ErrorInput(
        "random", TypeError, r"use ProjectedAdam\(projector=\.\.\.\)", group_error=ValueError
    ),
}
ARO_ERROR_INPUTS = {
    **COMMON_ERROR_INPUTS,
    "momentum": ErrorInput(1.0, ValueError, r"momentum must be a float in \[0, 1\)"),
    "base": ErrorInput("svd", ValueError, "base must be one of"),
    "sinkhorn_iters": ErrorInput(0, ValueError, "sinkhorn_iters must be >= 1"),
    "adjust_lr": ErrorInput("max", ValueError, "adjust_lr must be one of"),
    "rotate": ErrorInput("cols", ValueError, r"rotate must be one of \['rows', 'smaller'\]"),
    "matrix": ErrorInput(1, TypeError, "matrix must be True or False"),
    "foreach": ErrorInput(True, TypeError, "unexpected keyword argument 'foreach'"),
}
ROTATED_ERROR_INPUTS = {
    **COMMON_ERROR_INPUTS,
    "basis": ErrorInput("svd", ValueError, r"basis must be one of \['dct', 'eigen'\]"),
    "update_gap": ErrorInput(0, ValueError, "update_gap must be >= 1"),
    "shampoo_beta": ErrorInput(1.5, ValueError, r"shampoo_beta must be a float in \[0, 1\)"),
    "max_dim": ErrorInput(0, ValueError, "max_dim must be >= 1"),
    "matrix": ErrorInput("no", TypeError, "matrix must be True or False"),
    "foreach": ErrorInput(True, TypeError, "unexpected keyword argument 'foreach'"),
}

SMALL_PROJECTION = {"rank": 3, "update_gap": 2}  # a few steps cross subspace refreshes
OPTIMIZER_CASES: list[OptimizerCase] = [
    OptimizerCase("dct", _factory(DCTProjectedAdam, **SMALL_PROJECTION), WRAPPER_ERROR_INPUTS, foreach=True),
    OptimizerCase(
        "dct-l1-keep",
        _factory(DCTProjectedAdam, **SMALL_PROJECTION, score_norm="l1", moments="keep"),
        foreach=True,
    ),
    OptimizerCase("svd", _factory(SVDProjectedAdam, **SMALL_PROJECTION), WRAPPER_ERROR_INPUTS, foreach=True),
    OptimizerCase(
        "svd-exact-reset",
        _factory(SVDProjectedAdam, **SMALL_PROJECTION, svd="exact", moments="reset"),
        foreach=True,
    ),
    OptimizerCase(
        "random",
        _factory(ProjectedAdam, **SMALL_PROJECTION, projector="random"),
        PROJECTED_ERROR_INPUTS,
        foreach=True,
    ),
    OptimizerCase("dct-protect", _factory(DCTProjectedAdam, **SMALL_PROJECTION, protect=True), foreach=True),
    OptimizerCase(
        "dct-error-feedback",
        _factory(DCTProjectedAdam, **SMALL_PROJECTION, error_feedback=True),
        foreach=True,
    ),
    OptimizerCase(
        "custom-coordinate",
        _factory(ProjectedAdam, **SMALL_PROJECTION, projector=CoordinateProjector),
        foreach=True,
    ),
    OptimizerCase("aro", _factory(ARO), ARO_ERROR_INPUTS),
    OptimizerCase("aro-row-spectral", _factory(ARO, base="row_norm", adjust_lr="spectral_norm")),
    OptimizerCase("aro-sign", _factory(ARO, base="sign")),
    OptimizerCase("aro-smaller", _factory(ARO, rotate="smaller")),
    OptimizerCase("rotated-dct", _factory(RotatedAdam, basis="dct"), ROTATED_ERROR_INPUTS),
    OptimizerCase(
        "rotated-eigen", _factory(RotatedAdam, basis="eigen", update_gap=2), ROTATED_ERROR_INPUTS
    ),
]


# ----------------------------------------------------------------------------------------------
# The reliability suite (tests/reliability/test_optim_*.py): every optimizer and configuration,
# built as factory(params, **options) so a test can override any option.

RELIABILITY_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "projected-dct": lambda p, **o: ProjectedAdam(
        p, **{"lr": 1e-2, "rank": 2, "update_gap": 2, "projector": "dct", **o}
    ),
    "projected-svd": lambda p, **o: ProjectedAdam(
        p, **{"lr": 1e-2, "rank": 2, "update_gap": 2, "projector": "svd", **o}
    ),
    "projected-random": lambda p, **o: ProjectedAdam(
        p, **{"lr": 1e-2, "rank": 2, "update_gap": 2, "projector": "random", **o}
    ),
    "dct": lambda p, **o: DCTProjectedAdam(p, **{"lr": 1e-2, "rank": 2, "update_gap": 2, **o}),
    "svd": lambda p, **o: SVDProjectedAdam(p, **{"lr": 1e-2, "rank": 2, "update_gap": 2, **o}),
    "aro": lambda p, **o: ARO(p, **{"lr": 1e-2, **o}),
    "rotated-dct": lambda p, **o: RotatedAdam(p, **{"lr": 1e-2, "basis": "dct", **o}),
    "rotated-eigen": lambda p, **o: RotatedAdam(
        p, **{"lr": 1e-2, "basis": "eigen", "update_gap": 2, **o}
    ),
}
PROJECTED = ("projected-dct", "projected-svd", "projected-random", "dct", "svd")


def raises_on_nonfinite(name: str, steps_taken: int, matrix: bool) -> bool:
    """The documented ``check_finite`` rule: a NaN/Inf gradient raises when it reaches a basis
    computation (projected: a refresh every 2 steps; ARO: every step; eigen: the first step and
    every 2nd Adam step); 1-D parameters (AdamW) and the DCT rotation let it propagate."""
    if not matrix or name == "rotated-dct":
        return False
    if name == "aro":
        return True
    return steps_taken % 2 == 0


def snapshot(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of everything a failed call must leave alone: parameters, state, groups."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return {
        "params": [param.detach().clone() for param in params],
        "state": [
            {key: value.clone() for key, value in optimizer.state.get(param, {}).items()}
            for param in params
        ],
        "entries": sum(1 for values in optimizer.state.values() if values),
        "groups": [
            {
                key: [id(param) for param in value] if key == "params" else _copied(value)
                for key, value in group.items()
            }
            for group in optimizer.param_groups
        ],
    }


def _copied(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def assert_same(before: Any, after: Any) -> None:
    """Equal down to every tensor's bits, dtype and device (of :func:`snapshot`s, say)."""
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor)
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    elif isinstance(before, dict):
        assert isinstance(after, dict) and before.keys() == after.keys()
        for key in before:
            assert_same(before[key], after[key])
    elif isinstance(before, (list, tuple)):
        assert type(before) is type(after) and len(before) == len(after)
        for a, b in zip(before, after):
            assert_same(a, b)
    else:
        assert before == after or (before != before and after != after)  # NaN == NaN here
