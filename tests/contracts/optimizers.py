"""The optimizers under the shared contract suite (``test_optimizer_contract.py``).

A new optimizer (or configuration) gets the whole suite by appending one ``OptimizerCase``:
``factory(params, lr)`` builds it with small ranks and short refresh gaps, so a few steps cross
subspace refreshes and basis updates.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from optim import ARO, DCTProjectedAdam, ProjectedAdam, RotatedAdam, SVDProjectedAdam


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
        lambda p, lr: SVDProjectedAdam(p, lr=lr, rank=3, update_gap=2, svd_method="exact", moments="reset"),
    ),
    OptimizerCase("random", lambda p, lr: ProjectedAdam(p, lr=lr, rank=3, update_gap=2, projector="random")),
    OptimizerCase("dct-protect", lambda p, lr: DCTProjectedAdam(p, lr=lr, rank=3, update_gap=2, protect=True)),
    OptimizerCase("aro", lambda p, lr: ARO(p, lr=lr)),
    OptimizerCase("rotated-dct", lambda p, lr: RotatedAdam(p, lr=lr, basis="dct")),
    OptimizerCase("rotated-eigen", lambda p, lr: RotatedAdam(p, lr=lr, basis="eigen", update_gap=2)),
]
