"""Gradient-projection and rotated optimizers built on :mod:`decomp`.

- :class:`DCTProjectedAdam`, :class:`SVDProjectedAdam`: one projected-Adam engine
  (:class:`ProjectedAdam`) with the DCT, SVD or random projector (:mod:`optim.projectors`).
- ``optimizer.consolidate()`` with ``protect=True``: continual learning in orthogonal subspaces
  (:mod:`optim.continual`).
"""

from .projected import DCTProjectedAdam, ProjectedAdam, SVDProjectedAdam
from .projectors import (
    DCTProjector,
    Projector,
    RandomProjector,
    SVDProjector,
    dct_columns,
)

__all__ = [
    "DCTProjectedAdam",
    "DCTProjector",
    "ProjectedAdam",
    "Projector",
    "RandomProjector",
    "SVDProjectedAdam",
    "SVDProjector",
    "dct_columns",
]
