"""Gradient-projection and rotated optimizers built on :mod:`decomp`.

- :class:`DCTProjectedAdam`, :class:`SVDProjectedAdam`: one projected-Adam engine
  (:class:`ProjectedAdam`) with the DCT, SVD or random projector, or any object implementing
  :class:`Projector` (:mod:`optim.projectors`).
- :class:`ARO` (adaptively rotated optimization) and :class:`RotatedAdam` (Adam in a DCT or
  SOAP-style eigenbasis), in :mod:`optim.rotated`.
- :func:`param_groups`: project the weights of the layers a ``target`` names, AdamW for the rest
  (transformers' ``optim_target_modules``); :func:`matrix_groups`: Muon's split, the hidden
  matrices to the matrix optimizer, embeddings, head and 1-D parameters to AdamW at their own lr.
- ``optimizer.consolidate()`` with ``protect=True``: continual learning in orthogonal subspaces
  (:mod:`optim.continual`); :func:`consolidate` reaches it through accelerate's and transformers'
  optimizer wrappers, :func:`unwrap_optimizer` (:mod:`optim.wrappers`).
"""

# One version for the distribution, which ships optim and decomp together.
from decomp._version import __version__

from .groups import matrix_groups, param_groups
from .projected import DCTProjectedAdam, ProjectedAdam, SVDProjectedAdam
from .projectors import (
    DCTProjector,
    Projector,
    RandomProjector,
    SVDProjector,
    dct_columns,
)
from .rotated import ARO, RotatedAdam
from .wrappers import consolidate, unwrap_optimizer

__all__ = [
    "ARO",
    "DCTProjectedAdam",
    "DCTProjector",
    "ProjectedAdam",
    "Projector",
    "RandomProjector",
    "RotatedAdam",
    "SVDProjectedAdam",
    "SVDProjector",
    "consolidate",
    "dct_columns",
    "matrix_groups",
    "param_groups",
    "unwrap_optimizer",
]
