r"""Projectors: pick an :math:`r`-dimensional subspace from a gradient, project down, project up.

A projector works on a gradient matrix :math:`X \in \mathbb{R}^{k \times d}` oriented so that the
dimension to compress is the last one (the optimizer transposes a gradient whose smaller side is
its rows). It holds no tensors itself: everything it needs between steps is a small dict of
tensors that lives in the optimizer state, so checkpoints stay ``weights_only``-loadable.

The protocol (:class:`Projector`) is the extension point of :class:`~optim.ProjectedAdam`: a param
group's ``projector`` option takes a built-in name, any object implementing it, or a zero-argument
factory of one (checked by :func:`as_projector`). It has ``name`` (what a ``state_dict`` records in
place of the object), the state ``keys`` it owns, and five methods:

- ``init_state(dim, rank, like, seed)`` — the state of a fresh subspace of ``rank`` columns out of
  ``dim`` (before the first :meth:`select`).
- ``select(X, state, rank, reduce)`` — choose the subspace for gradient ``X`` and return
  ``(X P, new_state)`` without touching ``state`` (so a failing check leaves it intact). ``reduce``
  (optional) sums a tensor over the ranks that hold row shards of ``X`` (``reduce(t, op="max")``
  takes the maximum); ``transposed`` says that ``X`` is the parameter's gradient transposed (only
  the SVD projector uses it).
- ``basis(state, dim, rank, like)`` — the orthonormal :math:`P \in \mathbb{R}^{d \times r}`. Down is
  :math:`X P`, up is :math:`L P^\top`; :math:`P P^\top` is an orthogonal projection.
- ``layout(dim, rank)`` — the kind and shape of each of its state tensors, which the optimizer
  checks a loaded (or edited) state against; ``state_problem(state, dim)`` — what is wrong with
  the values of a state of that layout (``None`` if nothing), read on load only.

``DCTProjector`` stores ``r`` integer column indices into the fixed orthonormal DCT-II basis,
``SVDProjector`` the :math:`d \times r` basis itself (GaLore), ``RandomProjector`` one seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from decomp import dct, rsvd
from decomp._checks import power_of_two_scales
from decomp._dct import _cached_dct_matrix
from decomp._dct import dct_columns
from decomp._qr import signed_qr

# re-exported: a projector's layout is written with them
from ._base import StateSpec, floating, integer

__all__ = [
    "DCTProjector",
    "Projector",
    "RandomProjector",
    "SVDProjector",
    "StateSpec",
    "as_projector",
    "column_norms",
    "dct_columns",
    "floating",
    "integer",
]

ProjectorState = dict[str, torch.Tensor]
Reduce = Callable[..., torch.Tensor]  # reduce(tensor, op="sum" | "max") over the row-shard ranks


def column_norms(
    matrix: torch.Tensor, norm: str = "l2", reduce: Reduce | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Scale-free column norms of ``matrix`` (:math:`k \times d`): ``(norms / s, s)``.

    ``norm="l2"`` gives :math:`\lVert X_{:,j} \rVert_2`, ``"l1"`` gives
    :math:`\lVert X_{:,j} \rVert_1`, each divided by the power of two :math:`s` that brings the
    largest magnitude of ``matrix`` into :math:`[1/2, 1)`. The squares and sums run on
    :math:`X / s`, so they neither overflow (a gradient of 1e20, whose squares exceed float32)
    nor underflow (one of 1e-25, whose squares are zero in float32): the relative sizes of the
    columns, and so any choice made from them, are those of :math:`X` at every scale. Under row
    sharding ``reduce`` makes :math:`s` the same on every rank (a max) and sums the columns.
    Compare columns through ``norms``; ``norms * s`` is the true value when it fits the dtype.

    Example:
        >>> norms, scale = column_norms(torch.tensor([[3e20, 0.0], [4e20, 1e20]]))
        >>> (norms * scale / 1e20).tolist()
        [5.0, 1.0]
    """
    largest = torch.maximum(matrix.amax(), -matrix.amin())
    if reduce is not None:
        largest = reduce(largest.reshape(1), op="max")[0]
    scale, inverse = power_of_two_scales(largest)
    scaled = matrix * inverse
    sums = (scaled.square_() if norm == "l2" else scaled.abs_()).sum(0)
    if reduce is not None:
        sums = reduce(sums)
    return (sums.sqrt() if norm == "l2" else sums), scale


class Projector(Protocol):
    """What the projected-Adam engine calls (see the module docstring).

    ``name`` is what ``ProjectedAdam.state_dict()`` saves for a group holding the object (so the
    checkpoint stays ``weights_only``-loadable); loading it back needs a group whose projector
    has the same name. ``keys`` are the state entries the projector owns.
    """

    name: str
    keys: tuple[str, ...]

    def init_state(self, dim: int, rank: int, like: torch.Tensor, seed: int) -> ProjectorState: ...

    def select(
        self,
        grad: torch.Tensor,
        state: ProjectorState,
        rank: int,
        reduce: Reduce | None = None,
        *,
        transposed: bool = False,
    ) -> tuple[torch.Tensor, ProjectorState]: ...

    def basis(
        self, state: ProjectorState, dim: int, rank: int, like: torch.Tensor
    ) -> torch.Tensor: ...

    def layout(self, dim: int, rank: int) -> dict[str, StateSpec]: ...

    def state_problem(self, state: ProjectorState, dim: int) -> str | None: ...


_PROTOCOL_METHODS = ("init_state", "select", "basis", "layout", "state_problem")


def _missing_members(candidate: Any) -> list[str]:
    keys = getattr(candidate, "keys", None)
    missing = [
        "name (a str)" if not isinstance(getattr(candidate, "name", None), str) else "",
        "keys (a tuple of str)"
        if not (isinstance(keys, tuple) and all(isinstance(key, str) for key in keys))
        else "",
    ]
    missing += [m for m in _PROTOCOL_METHODS if not callable(getattr(candidate, m, None))]
    return [member for member in missing if member]


def as_projector(value: Any, name: str = "projector") -> Projector:
    """``value`` if it implements :class:`Projector`, else the projector its factory returns.

    A class or a callable that is no projector itself is a zero-argument factory: it is called
    once, here. Anything else (or a factory returning something else) raises ``TypeError``
    naming the members it lacks.

    Example:
        >>> as_projector(RandomProjector).name
        'random'
        >>> as_projector(object())
        Traceback (most recent call last):
        ...
        TypeError: projector must implement optim.projectors.Projector: object lacks name (a str), ...
    """
    made_by = None
    if isinstance(value, type) or (callable(value) and _missing_members(value)):
        made_by, value = value, value()
    missing = _missing_members(value)
    if missing:
        source = f" (returned by the factory {made_by!r})" if made_by is not None else ""
        raise TypeError(
            f"{name} must implement optim.projectors.Projector: {type(value).__name__}"
            f"{source} lacks {', '.join(missing)}"
        )
    return value


class DCTProjector:
    r"""The top-:math:`r` columns of the fixed orthonormal DCT-II basis, by alignment with the gradient.

    With :math:`S = X D^\top` (the DCT of every row of :math:`X`, one FFT per row) the score of
    basis column :math:`j` is :math:`\lVert S_{:,j} \rVert_2^2` (``norm="l2"``, the default) or
    :math:`\lVert S_{:,j} \rVert_1` (``norm="l1"``, the paper's default). The ``l2`` choice is the
    optimal subset: :math:`\lVert X - X P P^\top \rVert_F^2 = \lVert X \rVert_F^2 -
    \sum_{j \in \text{selected}} \lVert S_{:,j}\rVert_2^2` for orthonormal columns of one basis. The
    projected gradient is :math:`S_{:, \text{idx}}`, free once :math:`S` is known; the state is the
    ``r`` sorted int64 indices. ``method="fft"`` computes :math:`S` with :func:`decomp.dct`
    (:math:`O(k\,d \log d)`), ``"matmul"`` with the cached :func:`decomp.dct_matrix`.

    Under row sharding (FSDP) every rank scores its own rows; ``reduce`` sums the :math:`d`
    scores (``l2``: squared norms, ``l1``: absolute sums) so every rank picks the same columns.
    Differences from the official DCT-AdamW code: the scores are L2 by default and the basis
    columns are computed from their indices, so no :math:`d \times d` matrix is kept per size.
    """

    name = "dct"
    keys = ("index",)

    def __init__(self, norm: str = "l2", method: str = "fft") -> None:
        if norm not in ("l1", "l2"):
            raise ValueError(f"score norm must be 'l1' or 'l2', got {norm!r}")
        if method not in ("fft", "matmul"):
            raise ValueError(f"DCT method must be 'fft' or 'matmul', got {method!r}")
        self.norm = norm
        self.method = method

    def init_state(self, dim: int, rank: int, like: torch.Tensor, seed: int) -> ProjectorState:
        return {"index": torch.arange(rank, dtype=torch.int64, device=like.device)}

    def select(
        self,
        grad: torch.Tensor,
        state: ProjectorState,
        rank: int,
        reduce: Reduce | None = None,
        *,
        transposed: bool = False,
    ) -> tuple[torch.Tensor, ProjectorState]:
        if self.method == "fft":
            aligned = dct(grad, dim=-1, check_finite=False)
        else:
            # The private cache, read only: dct_matrix would copy d x d at every refresh.
            aligned = grad @ _cached_dct_matrix(grad.shape[-1], grad.dtype, grad.device).T
        # Scale-free scores: squares of a 1e20 gradient would all be inf, of a 1e-25 one all
        # zero, and top-k would then pick arbitrary columns.
        scores, _ = column_norms(aligned, self.norm, reduce)
        index = torch.topk(scores, rank, sorted=False).indices.sort().values
        return aligned[:, index], {"index": index}

    def basis(
        self, state: ProjectorState, dim: int, rank: int, like: torch.Tensor
    ) -> torch.Tensor:
        return dct_columns(dim, state["index"], dtype=like.dtype)

    def layout(self, dim: int, rank: int) -> dict[str, StateSpec]:
        return {"index": integer(rank)}

    def state_problem(self, state: ProjectorState, dim: int) -> str | None:
        """Indices must be strictly increasing columns of the ``dim``-point DCT basis."""
        index = state["index"]
        if index.numel() and not (
            0 <= int(index.min()) and int(index.max()) < dim and bool((index.diff() > 0).all())
        ):
            return f"has 'index' {index.tolist()}, expected strictly increasing columns in [0, {dim})"
        return None


class SVDProjector:
    r"""The top-:math:`r` right singular vectors of the gradient (GaLore), stored as the basis.

    :math:`X = U \Sigma V^\top`, :math:`P = V_{:, :r}`, so :math:`X P = U_{:, :r} \Sigma_{:r}`.
    ``method="rsvd"`` (default) uses :func:`decomp.rsvd` (``power_iters`` products, an
    ``oversample``-column sketch, a generator seeded per refresh so runs repeat);
    ``method="exact"`` a full ``torch.linalg.svd`` in the state dtype and the parameter's own
    orientation, as galore-torch does.
    Needs the whole gradient, so it cannot run on row shards (``reduce`` raises).
    """

    name = "svd"
    keys = ("basis", "seed")

    def __init__(self, method: str = "rsvd", oversample: int = 10, power_iters: int = 2) -> None:
        if method not in ("rsvd", "exact"):
            raise ValueError(f"SVD method must be 'rsvd' or 'exact', got {method!r}")
        self.method = method
        self.oversample = oversample
        self.power_iters = power_iters

    def init_state(self, dim: int, rank: int, like: torch.Tensor, seed: int) -> ProjectorState:
        return {
            "basis": torch.zeros(dim, rank, dtype=like.dtype, device=like.device),
            "seed": torch.tensor(seed, dtype=torch.int64),
        }

    def select(
        self,
        grad: torch.Tensor,
        state: ProjectorState,
        rank: int,
        reduce: Reduce | None = None,
        *,
        transposed: bool = False,
    ) -> tuple[torch.Tensor, ProjectorState]:
        if reduce is not None:
            raise ValueError(
                "the SVD projector needs the whole gradient and cannot run on row shards (FSDP); "
                "use DCTProjectedAdam or the random projector there"
            )
        seed = state["seed"] + 1
        if self.method == "exact":
            # In the parameter's own orientation, as galore-torch computes it: the singular
            # vectors' signs, which stale moments depend on, then match.
            if transposed:
                basis = torch.linalg.svd(grad.mT, full_matrices=False)[0][:, :rank]
            else:
                basis = torch.linalg.svd(grad, full_matrices=False)[2][:rank].mT
        else:
            generator = torch.Generator(grad.device).manual_seed(int(seed))
            vh = rsvd(
                grad,
                rank,
                oversample=self.oversample,
                power_iters=self.power_iters,
                generator=generator,
                check_finite=False,
            ).Vh
            basis = vh.mT
        basis = basis.contiguous()
        return grad @ basis, {"basis": basis, "seed": seed}

    def basis(
        self, state: ProjectorState, dim: int, rank: int, like: torch.Tensor
    ) -> torch.Tensor:
        return state["basis"]

    def layout(self, dim: int, rank: int) -> dict[str, StateSpec]:
        return {"basis": floating(dim, rank), "seed": integer()}

    def state_problem(self, state: ProjectorState, dim: int) -> str | None:
        return None  # any basis and seed of the layout's shapes


class RandomProjector:
    r"""A seeded random orthonormal basis (APOLLO/Flora-style), redrawn at every refresh.

    :math:`P = \operatorname{qr}(\Omega)_Q` for a Gaussian :math:`\Omega \in \mathbb{R}^{d \times r}`
    drawn from a generator seeded with the stored seed (advanced by one per refresh), so the state
    is a single int64 and the basis is rebuilt on demand (:math:`O(d r^2)` per step). The
    gradient does not influence the choice. The stream depends on the device's generator: a
    CPU and a CUDA run draw different bases.
    """

    name = "random"
    keys = ("seed",)

    def init_state(self, dim: int, rank: int, like: torch.Tensor, seed: int) -> ProjectorState:
        return {"seed": torch.tensor(seed, dtype=torch.int64)}

    def select(
        self,
        grad: torch.Tensor,
        state: ProjectorState,
        rank: int,
        reduce: Reduce | None = None,
        *,
        transposed: bool = False,
    ) -> tuple[torch.Tensor, ProjectorState]:
        new_state = {"seed": state["seed"] + 1}
        return grad @ self.basis(new_state, grad.shape[-1], rank, grad), new_state

    def basis(
        self, state: ProjectorState, dim: int, rank: int, like: torch.Tensor
    ) -> torch.Tensor:
        generator = torch.Generator(like.device).manual_seed(int(state["seed"]))
        # Drawn in fp32 whatever the state dtype, so a checkpoint cast to another dtype keeps
        # its subspace.
        gaussian = torch.randn(
            dim, rank, generator=generator, dtype=torch.float32, device=like.device
        ).to(like.dtype)
        # The fixed QR sign makes the basis a function of the seed alone.
        return signed_qr(gaussian)[0]

    def layout(self, dim: int, rank: int) -> dict[str, StateSpec]:
        return {"seed": integer()}

    def state_problem(self, state: ProjectorState, dim: int) -> str | None:
        return None  # any seed
