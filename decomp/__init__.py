"""decomp: torch-native low-rank and tensor decompositions.

Pure functions on tensors (any device, batched where natural, fp16/bf16 computed in fp32 and
returned in the input dtype; the decompositions rescale their input by an exact power of two, so
no energy or tolerance test over- or underflows at any scale), each returning a small typed result
with an inverse:

* :func:`rsvd` -- randomized SVD, fixed rank or fixed precision.
* :func:`tucker` -- Tucker / partial Tucker by HOOI or HOSVD.
* :func:`kpsvd` -- sums of Kronecker products (Van Loan--Pitsianis), :func:`kron_shapes`.
* :func:`ldu` -- pivoted LDU factorisation, the permutation kept as row indices.
* :func:`atoms` -- filter-atom decomposition of conv kernels, optionally recursive.
* :func:`dct_matrix`, :func:`dct`, :func:`idct` -- orthonormal DCT-II bases and fast transforms.

:mod:`decomp.adapters` builds parametrizations on these.
"""

from ._atoms import Atoms, atoms
from ._dct import dct, dct_matrix, idct
from ._kron import KronSum, kpsvd, kron_shapes
from ._ldu import LDU, ldu
from ._rsvd import SVD, rsvd
from ._tucker import Tucker, tucker
from ._version import __version__

__all__ = [
    "SVD",
    "rsvd",
    "Tucker",
    "tucker",
    "KronSum",
    "kpsvd",
    "kron_shapes",
    "LDU",
    "ldu",
    "Atoms",
    "atoms",
    "dct_matrix",
    "dct",
    "idct",
]
