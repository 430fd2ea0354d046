r"""One projected-Adam engine; :class:`DCTProjectedAdam` and :class:`SVDProjectedAdam` configure it.

For a matrix parameter :math:`W \in \mathbb{R}^{m \times n}` (N-D weights viewed as
``(shape[0], -1)``) with gradient :math:`G`, orient :math:`X = G` if :math:`m \ge n` else
:math:`X = G^\top`, so the compressed dimension :math:`d = \min(m, n)` is last. Every
``update_gap`` steps (at steps :math:`0, T, 2T, \dots`) the projector picks an orthonormal
:math:`P \in \mathbb{R}^{d \times r}` from :math:`X`; every step

.. math::

    L = X P, \quad m \leftarrow \beta_1 m + (1-\beta_1) L, \quad
    v \leftarrow \beta_2 v + (1-\beta_2) L^2, \quad
    N = \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon},

    W \leftarrow W (1 - \eta\lambda) - \eta\, \alpha\, (N P^\top)\ \text{(transposed back)},

with the moments :math:`m, v \in \mathbb{R}^{k \times r}` (:math:`k = \max(m, n)`). On a refresh the
moments follow ``moments``: ``"keep"`` leaves them as they are (GaLore), ``"reset"`` zeroes them
and restarts the bias correction, ``"rotate"`` maps them to the new basis with
:math:`R = P_{old}^\top P_{new}`: :math:`m \leftarrow m R`, :math:`v \leftarrow v (R \odot R)`
(the diagonal of the rotated second moment; the DCT-AdamW code uses :math:`|v R|` instead). For
DCT bases :math:`R` is a partial permutation: kept columns keep their moments, new ones start at 0.

Parameters with fewer than two dimensions, with a side of ``max_dim`` or more (embeddings), or in a
group with ``rank=None`` take plain AdamW in the same optimizer. The state is tensors only.

Distributed. Under DDP every rank holds the same averaged gradient and runs the same
deterministic refresh (the randomized SVD's generator is seeded per refresh), so the optimizer
communicates nothing and the parameters stay identical. Under FSDP2 (``fully_shard``) the
parameters are DTensors sharded by rows (``Shard(0)``; HSDP adds replicated mesh dimensions) and
each rank steps only its own rows, never gathering a parameter: the compressed side is always the
columns, which every rank holds whole (for a wide weight, :math:`m < n`, that is the larger side,
unlike a single-process run), each rank projects its rows onto the shared basis, and the DCT
column choice needs one all-reduce of the :math:`n` column scores per refresh (a rank without rows
joins it with zeros). ``check_finite`` adds an all-reduce of one count per refresh, so that every
rank raises together. The SVD projector needs the whole gradient and raises ``ValueError`` on row
shards; the random one needs no scores. 1-D parameters take AdamW on their local shards.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from decomp._checks import _all_finite

from . import continual
from ._adam import adam_directions, apply_update
from ._base import (
    TensorStateOptimizer,
    as_matrix,
    check_adam_options,
    local,
    state_dtype,
)
from .projectors import DCTProjector, Projector, RandomProjector, SVDProjector

__all__ = ["DCTProjectedAdam", "ProjectedAdam", "SVDProjectedAdam"]

_PROJECTORS = ("dct", "svd", "random")
_MOMENT_POLICIES = ("keep", "rotate", "reset")


def _check_options(group: dict[str, Any]) -> None:
    check_adam_options(group)
    rank = group["rank"]
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise TypeError(f"rank must be an int, a float in (0, 1] or None, got {rank!r}")
        if isinstance(rank, int) and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if isinstance(rank, float) and not 0 < rank <= 1:
            raise ValueError(f"a float rank is a fraction of the dimension in (0, 1], got {rank}")
    gap = group["update_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"update_gap must be an int >= 1, got {gap!r}")
    if not math.isfinite(group["scale"]):
        raise ValueError(f"scale must be finite, got {group['scale']!r}")
    for key, choices in (("projector", _PROJECTORS), ("moments", _MOMENT_POLICIES)):
        if group[key] not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {group[key]!r}")
    if group["score_norm"] not in ("l1", "l2"):
        raise ValueError(f"score_norm must be 'l1' or 'l2', got {group['score_norm']!r}")
    if not 0 < group["protect_energy"] <= 1:
        raise ValueError(f"protect_energy must be in (0, 1], got {group['protect_energy']!r}")


def resolve_rank(rank: int | float, dim: int) -> int:
    """The number of columns for ``rank`` (an int, or a fraction of ``dim``), clamped to ``dim``."""
    if isinstance(rank, float):
        return max(1, min(dim, int(rank * dim)))
    return min(rank, dim)


def _projector(group: dict[str, Any]) -> Projector:
    if group["projector"] == "dct":
        return DCTProjector(group["score_norm"], group["dct_method"])
    if group["projector"] == "svd":
        return SVDProjector(group["svd_method"])
    return RandomProjector()


def _row_shard_reduce(param: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The score all-reduce for a DTensor sharded by rows; ``None`` for a whole tensor.

    The sum runs over the one mesh dimension that splits the rows (FSDP's ``Shard(0)``); replicated
    mesh dimensions (HSDP) hold the same rows with the same gradient, so they need nothing.
    """
    placements = getattr(param, "placements", None)
    if placements is None or all(placement.is_replicate() for placement in placements):
        return None
    row_dims = [dim for dim, placement in enumerate(placements) if placement.is_shard(0)]
    if len(row_dims) != 1 or not all(
        placement.is_replicate() for dim, placement in enumerate(placements) if dim != row_dims[0]
    ):
        raise ValueError(
            f"projected optimizers support DTensor parameters sharded by rows (Shard(0), other "
            f"mesh dimensions Replicate) only, got placements {placements}"
        )
    group = param.device_mesh.get_group(row_dims[0])

    def reduce(scores: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(scores, group=group)
        return scores

    return reduce


def _finite_on_every_rank(
    tensor: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None
) -> bool:
    """Whether ``tensor`` is finite on every rank that holds a row shard of it (``reduce``).

    Every rank must agree, or one would raise while the others wait in the next collective.
    """
    if reduce is None:
        return _all_finite(tensor)
    nonfinite = (~torch.isfinite(tensor)).sum(dtype=torch.float32).reshape(1)
    return bool(reduce(nonfinite) == 0)


class ProjectedAdam(TensorStateOptimizer):
    r"""Adam on gradients projected to an :math:`r`-dimensional subspace, one engine for every projector.

    Args:
        params: parameters or param groups (each group may override any option below).
        lr: learning rate :math:`\eta`.
        rank: columns :math:`r` kept: an int, or a float in (0, 1] as a fraction of the compressed
            dimension; clamped to it. ``None`` in a group: plain AdamW for that group.
        projector: ``"dct"`` (:class:`~optim.projectors.DCTProjector`), ``"svd"``
            (:class:`~optim.projectors.SVDProjector`) or ``"random"``.
        update_gap: steps between subspace refreshes :math:`T`.
        scale: the factor :math:`\alpha` on the projected update (GaLore's ``scale``).
        moments: on a refresh: ``"keep"``, ``"rotate"`` or ``"reset"`` (module docstring).
        score_norm: DCT column scores, ``"l2"`` (optimal subset) or ``"l1"`` (the paper's).
        betas: Adam's :math:`(\beta_1, \beta_2)`.
        eps: Adam's :math:`\epsilon`, added to the bias-corrected root as in ``torch.optim.AdamW``.
        weight_decay: decoupled weight decay :math:`\lambda`, applied before the update.
        max_dim: matrices with a side of this size or more take AdamW (embeddings and LM heads
            of 32k-token vocabularies; the DCT-AdamW code's ``max_shape``).
        foreach: batch the moment arithmetic of a group with multi-tensor kernels
            (``None``: when every parameter is on CUDA).
        protect: keep a sketch for :meth:`consolidate` (:mod:`optim.continual`).
        protect_energy: the energy fraction of the sketch that :meth:`consolidate` protects.
        seed: base seed of the random projector and the randomized SVD (parameter ``i`` of the
            optimizer uses ``seed + i``).
        svd_method: ``"rsvd"`` or ``"exact"`` for the SVD projector.
        dct_method: ``"fft"`` or ``"matmul"`` for the DCT projector's scores.
        check_finite: when a parameter is due for a refresh, raise ``ValueError`` before any
            state changes (of any parameter) if its gradient has NaN/Inf; between refreshes
            non-finite gradients propagate as in ``torch.optim.Adam``. One host sync per refresh.

    Example:
        >>> model = torch.nn.Linear(16, 8)
        >>> opt = ProjectedAdam(model.parameters(), lr=1e-2, rank=4, projector="dct")
        >>> model(torch.randn(2, 16)).square().sum().backward()
        >>> opt.step()
        >>> state = opt.state[model.weight]
        >>> tuple(state["exp_avg"].shape), state["index"].dtype
        ((16, 4), torch.int64)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        rank: int | float | None = 128,
        *,
        projector: str = "dct",
        update_gap: int = 200,
        scale: float = 1.0,
        moments: str = "keep",
        score_norm: str = "l2",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_dim: int = 32000,
        foreach: bool | None = None,
        protect: bool = False,
        protect_energy: float = 0.98,
        seed: int = 0,
        svd_method: str = "rsvd",
        dct_method: str = "fft",
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            rank=rank,
            projector=projector,
            update_gap=update_gap,
            scale=scale,
            moments=moments,
            score_norm=score_norm,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            max_dim=max_dim,
            foreach=foreach,
            protect=protect,
            protect_energy=protect_energy,
            seed=seed,
            svd_method=svd_method,
            dct_method=dct_method,
            check_finite=check_finite,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_options(group)

    def _takes_adamw(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        return (
            group["rank"] is None
            or param.ndim < 2
            or max(as_matrix(param).shape) >= group["max_dim"]
        )

    def _param_index(self, param: torch.Tensor) -> int:
        index = 0
        for group in self.param_groups:
            for candidate in group["params"]:
                if candidate is param:
                    return index
                index += 1
        raise KeyError("parameter not in this optimizer")

    def _check_gradients(self) -> None:
        """Raise before any state changes if a gradient due for a refresh has NaN/Inf.

        Checked up front (not parameter by parameter) so that a bad gradient in one parameter
        leaves every other parameter's state untouched too, and before the SVD, which would
        fail with a LAPACK error instead.
        """
        for group in self.param_groups:
            if not group["check_finite"]:
                continue
            for param in group["params"]:
                if param.grad is None or self._takes_adamw(param, group):
                    continue
                state = self.state[param]
                if "step" in state and int(state["step"]) % group["update_gap"]:
                    continue
                if not _finite_on_every_rank(local(param.grad), _row_shard_reduce(param)):
                    raise ValueError(
                        f"the gradient of a parameter of shape {tuple(param.shape)} contains "
                        f"NaN or Inf at a subspace refresh; the optimizer state was left unchanged"
                    )

    def _step_matrices(
        self, group: dict[str, Any], params: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        projector = _projector(group)
        prepared = [self._project(group, projector, param, grad) for param, grad in params]
        foreach = group["foreach"]
        if foreach is None:
            foreach = all(param.device.type == "cuda" for param, _ in params)
        states = [self.state[param] for param, _ in params]
        directions = adam_directions(
            [low for low, _, _ in prepared],
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [int(state["moment_step"]) for state in states],
            group["betas"],
            group["eps"],
            foreach=foreach,
        )
        for (param, _), state, (_, basis, transposed), direction in zip(
            params, states, prepared, directions
        ):
            update = continual.project_off(
                direction.mul_(group["scale"]) @ basis.mT, state.get("protected")
            )
            apply_update(
                local(param),
                update.mT if transposed else update,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
            )

    def _project(
        self,
        group: dict[str, Any],
        projector: Projector,
        param: torch.Tensor,
        grad: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Refresh the subspace if due and return ``(X P, P, transposed)``; advances the counters."""
        state = self.state[param]
        reduce = _row_shard_reduce(param)
        if reduce is not None and grad.placements != param.placements:
            raise ValueError(
                f"the gradient's placements {grad.placements} differ from the parameter's "
                f"{param.placements}; the optimizer steps each rank's own rows"
            )
        # From the shape, not as_matrix(param): a reshape of an N-D DTensor is a dispatched op.
        rows, cols = param.shape[0], math.prod(param.shape[1:])
        # Row shards must compress the (whole) columns so each rank projects its own rows.
        transposed = rows < cols and reduce is None
        # (-1, cols), not as_matrix: an FSDP rank may hold no rows of a short weight.
        matrix = local(grad).reshape(-1, cols).to(state_dtype(param))
        oriented = matrix.mT if transposed else matrix
        dim = oriented.shape[-1]
        rank = resolve_rank(group["rank"], dim)
        if "step" not in state:
            self._init_state(group, projector, param, oriented, rank)
        oriented = continual.project_off(oriented, state.get("protected"))
        step = int(state["step"])
        if step % group["update_gap"] == 0:
            # A rank without rows still joins the score all-reduce: a zero row adds no score.
            scored = oriented if oriented.shape[0] else oriented.new_zeros(1, dim)
            low, basis = self._refresh(group, projector, param, scored, rank, reduce, transposed)
            low = low[: oriented.shape[0]]
        else:
            basis = projector.basis(state, dim, rank, oriented)
            low = oriented @ basis
        state["step"] += 1
        state["moment_step"] += 1
        return low, basis, transposed

    def _init_state(
        self,
        group: dict[str, Any],
        projector: Projector,
        param: torch.Tensor,
        oriented: torch.Tensor,
        rank: int,
    ) -> None:
        state = self.state[param]
        dim = oriented.shape[-1]
        state["step"] = torch.tensor(0, dtype=torch.int64)
        state["moment_step"] = torch.tensor(0, dtype=torch.int64)
        seed = group["seed"] + self._param_index(param)
        state.update(projector.init_state(dim, rank, oriented, seed))
        state["exp_avg"] = oriented.new_zeros(oriented.shape[0], rank)
        state["exp_avg_sq"] = oriented.new_zeros(oriented.shape[0], rank)
        if group["protect"]:
            state["sketch"] = oriented.new_zeros(2 * rank, dim)
            state["protected"] = oriented.new_zeros(dim, 0)

    def _refresh(
        self,
        group: dict[str, Any],
        projector: Projector,
        param: torch.Tensor,
        oriented: torch.Tensor,
        rank: int,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None,
        transposed: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick the new subspace, move the moments as ``group["moments"]`` says; ``(X P, P)``."""
        state = self.state[param]
        dim = oriented.shape[-1]
        low, new_projection = projector.select(
            oriented,
            {key: state[key] for key in projector.keys},
            rank,
            reduce,
            transposed=transposed,
        )
        basis = projector.basis(new_projection, dim, rank, oriented)
        policy = group["moments"]
        if policy == "reset":
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["moment_step"].zero_()
        elif policy == "rotate" and int(state["step"]) > 0:
            rotation = projector.basis(state, dim, rank, oriented).mT @ basis
            state["exp_avg"] = state["exp_avg"] @ rotation
            state["exp_avg_sq"] = state["exp_avg_sq"] @ rotation.square()
        state.update(new_projection)
        if group["protect"]:
            energy = low.square().sum(0)
            if reduce is not None:
                energy = reduce(energy)
            rows = energy.sqrt()[:, None] * basis.mT
            state["sketch"] = continual.frequent_directions(state["sketch"], rows)
        return low, basis

    @torch.no_grad()
    def consolidate(self) -> dict[str, int]:
        """End a task: protect its dominant update directions in every ``protect=True`` group.

        Returns the number of protected directions per parameter shape (for logging). Later
        updates are orthogonal to everything protected so far (:mod:`optim.continual`).
        """
        counts: dict[str, int] = {}
        for group in self.param_groups:
            if not group["protect"]:
                continue
            for param in group["params"]:
                state = self.state.get(param, {})
                if "sketch" not in state:
                    continue
                sketch = state["sketch"]
                dim = sketch.shape[1]
                rank = state["exp_avg"].shape[1]
                state["protected"] = continual.extend_basis(
                    state["protected"], sketch, group["protect_energy"], max(dim - rank, 0)
                )
                state["sketch"] = torch.zeros_like(sketch)
                # The subspace in use is the one just protected: updates in it would be zero
                # until the next refresh, so the next step refreshes.
                gap = group["update_gap"]
                state["step"] = -(-state["step"] // gap) * gap
                counts[str(tuple(param.shape))] = int(state["protected"].shape[1])
        return counts


class DCTProjectedAdam(ProjectedAdam):
    r"""DCT-AdamW: projected Adam on the top-:math:`r` DCT columns (SVD-free; arXiv 2505.17967).

    :class:`ProjectedAdam` with ``projector="dct"``: a refresh costs one FFT-based DCT of the
    gradient's rows and a top-:math:`k` (no SVD); the state is the moments plus :math:`r` int64
    indices per matrix. Defaults differ from the official code deliberately: L2 scores (optimal),
    a refresh every 200 steps with ``moments="rotate"`` (exact for DCT bases: kept columns keep
    their moments) instead of every step.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> opt = DCTProjectedAdam(model.parameters(), lr=1e-3, rank=8)
        >>> model(torch.randn(4, 32)).sum().backward()
        >>> opt.step()
        >>> state = opt.state[model[0].weight]
        >>> state["exp_avg"].shape
        torch.Size([32, 8])
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        rank: int | float | None = 128,
        *,
        moments: str = "rotate",
        **options: Any,
    ) -> None:
        super().__init__(params, lr, rank, projector="dct", moments=moments, **options)


class SVDProjectedAdam(ProjectedAdam):
    r"""GaLore: projected Adam on the top-:math:`r` singular vectors of the gradient.

    :class:`ProjectedAdam` with ``projector="svd"`` and GaLore's ``moments="keep"``.
    ``svd_method="exact"`` with ``rank``, ``update_gap`` and ``scale`` as in galore-torch follows
    ``GaLoreAdamW``'s trajectory; the default randomized SVD (:func:`decomp.rsvd`) avoids the full
    SVD per refresh. Differences from galore-torch: weight decay is applied before the update
    (torch's AdamW order; galore-torch applies it after), ``eps`` sits outside the bias-corrected
    root as in ``torch.optim.AdamW``, the side is decided once from the parameter's shape, and
    N-D weights are projected as ``(shape[0], -1)`` matrices.

    Example:
        >>> model = torch.nn.Linear(32, 16)
        >>> opt = SVDProjectedAdam(model.parameters(), lr=1e-3, rank=4)
        >>> model(torch.randn(4, 32)).sum().backward()
        >>> opt.step()
        >>> state = opt.state[model.weight]
        >>> state["basis"].shape
        torch.Size([16, 4])
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        rank: int | float | None = 128,
        **options: Any,
    ) -> None:
        super().__init__(params, lr, rank, projector="svd", **options)
