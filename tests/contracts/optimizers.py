"""The optimizers under the shared contract suite (``test_optimizer_contract.py``).

A new optimizer (or configuration) gets the whole suite by appending one ``OptimizerCase``:
``factory(params, lr)`` builds it with small ranks and short refresh gaps, so a few steps cross
subspace refreshes and basis updates. ``RELIABILITY_FACTORIES`` and the snapshot helpers below
serve the reliability suite (``tests/reliability/test_optim_*.py``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, NamedTuple

import torch

from optim import ARO, DCTProjectedAdam, ProjectedAdam, RotatedAdam, SVDProjectedAdam

from ..optim.test_custom_projector import CoordinateProjector


class OptimizerCase(NamedTuple):
    name: str
    factory: Callable[[Any, float], torch.optim.Optimizer]


OPTIMIZER_CASES: list[OptimizerCase] = [
    OptimizerCase("dct", lambda p, lr: DCTProjectedAdam(p, lr=lr, rank=3, update_gap=2)),
    OptimizerCase(
        "dct-l1-keep",
        lambda p, lr: DCTProjectedAdam(p, lr=lr, rank=3, update_gap=2, score_norm="l1", moments="keep"),
    ),
    OptimizerCase("svd", lambda p, lr: SVDProjectedAdam(p, lr=lr, rank=3, update_gap=2)),
    OptimizerCase(
        "svd-exact-reset",
        lambda p, lr: SVDProjectedAdam(p, lr=lr, rank=3, update_gap=2, svd="exact", moments="reset"),
    ),
    OptimizerCase("random", lambda p, lr: ProjectedAdam(p, lr=lr, rank=3, update_gap=2, projector="random")),
    OptimizerCase("dct-protect", lambda p, lr: DCTProjectedAdam(p, lr=lr, rank=3, update_gap=2, protect=True)),
    OptimizerCase("custom-coordinate", lambda p, lr: ProjectedAdam(p, lr=lr, rank=3, update_gap=2, projector=CoordinateProjector)),
    OptimizerCase("aro", lambda p, lr: ARO(p, lr=lr)),
    OptimizerCase("rotated-dct", lambda p, lr: RotatedAdam(p, lr=lr, basis="dct")),
    OptimizerCase("rotated-eigen", lambda p, lr: RotatedAdam(p, lr=lr, basis="eigen", update_gap=2)),
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
