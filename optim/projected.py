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
:math:`R = P_{old}^\top P_{new}`:

.. math::

    m \leftarrow m R, \qquad
    v \leftarrow v (R \odot R) + \bar v\, \big(\mathbf{1} - \mathbf{1}^\top (R \odot R)\big),
    \qquad \bar v_i = \tfrac{1}{r} \textstyle\sum_c v_{ic},

the diagonal of the rotated second moment for the part of each new column inside the old
subspace, and the row's mean second moment :math:`\bar v` for the part outside it (the
DCT-AdamW code uses :math:`|v R|` and leaves that part at 0). For DCT bases :math:`R` is a
partial permutation: kept columns keep their moments, an entering column starts with
:math:`m = 0` and :math:`v = \bar v`. Why not :math:`v = 0`: the bias correction uses the global
step :math:`t`, so a zero second moment gives the entering column
:math:`\hat v = (1-\beta_2) g^2 / (1-\beta_2^t)` and a step of
:math:`(1-\beta_1)/\sqrt{(1-\beta_2)/(1-\beta_2^t)}` per entry, up to :math:`\sqrt{10}` at
large :math:`t` (default betas) against about 0.23 for a steady step on noisy gradients: 3.8x the
update RMS across a refresh at :math:`t = 100`, 9.4x at :math:`t = 1000` (measured, 64 x 256,
rank 16, Gaussian gradients). Per-column step counts would only bring it down to Adam's own first
step (:math:`\operatorname{sign}(g)`, RMS 1, still about 4x the steady step) at the price of a
state tensor; a warm :math:`v` with a cold :math:`m` makes the entering column's first step
:math:`(1-\beta_1) g / \sqrt{\bar v}`, below the steady one, ramping up as :math:`m`
accumulates (measured: 0.55 to 0.8 of the steady RMS at both :math:`t`).

Error feedback (``error_feedback=True``, DCT-AdamW's ``use_ef``): the part of the gradient the
subspace leaves out is kept in a full-size state tensor :math:`E` (:math:`k \times d`, one per
matrix, in the state dtype: as much memory as the parameter in fp32) and added to the next
gradient before it is projected:

.. math::

    A = X + E, \quad L = A P, \quad E \leftarrow A - L P^\top = A - A P P^\top.

The steady step builds no basis: the basis of each matrix (a :math:`d \times r` tensor, as
GaLore's state basis) is cached on the optimizer, outside :meth:`ProjectedAdam.state_dict`, keyed
by the identity of the projector's state tensors, so a refresh, a load or a hand edit that
replaces them rebuilds it; the state stays :math:`r` indices for DCT.

Parameters with fewer than two dimensions, with a side of ``max_dim`` or more (embeddings), or in a
group with ``rank=None`` or ``matrix=False`` take plain AdamW in the same optimizer. The state is
tensors only.

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

import difflib
import numbers
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from decomp._checks import check_int, check_real
from decomp._deprecation import renamed_arguments, renamed_value
from decomp._sides import matrix_dims, transposes

from . import continual
from ._adam import adam_denominators, adam_ratio, apply_update, first_bias_correction
from ._base import (
    COMMON_OPTIONS,
    OptionCheck,
    StateSpec,
    TensorStateOptimizer,
    choice,
    first_nonfinite,
    flag,
    floating,
    integer,
    local,
    optional,
    options_of,
    real,
    state_dtype,
    whole,
)
from .projectors import (
    DCTProjector,
    Projector,
    RandomProjector,
    SVDProjector,
    as_projector,
    column_norms,
)

__all__ = ["DCTProjectedAdam", "ProjectedAdam", "SVDProjectedAdam"]

_BUILTIN_PROJECTORS = {"dct": DCTProjector, "svd": SVDProjector, "random": RandomProjector}
_PROJECTORS = tuple(_BUILTIN_PROJECTORS)
_MOMENT_POLICIES = ("keep", "rotate", "reset")


def _rank_option(value: Any, name: str) -> int | float | None:
    """``None``, an int ``>= 1`` or a float fraction in (0, 1] (numpy scalars normalised)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be an int >= 1, a float in (0, 1] or None, got {type(value).__name__}"
        )
    if isinstance(value, numbers.Integral):
        return check_int(value, name, low=1)
    return check_real(value, name, low=0.0, high=1.0, high_inclusive=True)


_SVD_CHOICES = ("randomized", "exact")
# the option's words are the library's ("randomized"/"exact", as SVDParam and decomp.tucker);
# the projector keeps its own
_SVD_PROJECTOR_METHODS = {"randomized": "rsvd", "exact": "exact"}
_RENAMED_OPTIONS = {"svd_method": "svd"}


def _svd_choice(value: Any, name: str) -> str:
    """``"randomized"`` or ``"exact"``; the deprecated ``"rsvd"`` is read as ``"randomized"``."""
    return choice(*_SVD_CHOICES)(renamed_value(value, {"rsvd": "randomized"}, name, "optim"), name)


def _projector_option(value: Any, name: str) -> str | Projector:
    """A built-in projector's name, or a :class:`~optim.projectors.Projector` (a factory is
    called once, here)."""
    if isinstance(value, str):
        if value in _PROJECTORS:
            return choice(*_PROJECTORS)(value, name)
        raise ValueError(
            f"{name} must be one of {list(_PROJECTORS)}, a Projector object or a factory of one, "
            f"got {value!r}"
        )
    projector = as_projector(value, name)
    builtin = _BUILTIN_PROJECTORS.get(projector.name)
    if builtin is not None and not isinstance(projector, builtin):
        # a checkpoint records the name: loaded into a group holding the string, it would
        # silently become the built-in
        raise ValueError(
            f"{name} {type(projector).__name__} is named {projector.name!r}, the name of the "
            f"built-in {builtin.__name__}; give it another name"
        )
    return projector


_OPTIONS: dict[str, OptionCheck] = {
    **COMMON_OPTIONS,
    "rank": _rank_option,
    "projector": _projector_option,
    "update_gap": whole(1),
    "scale": real(),
    "moments": choice(*_MOMENT_POLICIES),
    "score_norm": choice("l2", "l1"),
    "max_dim": whole(1),
    "foreach": optional(flag),
    "protect": flag,
    "protect_energy": real(0.0, 1.0, high_inclusive=True),
    "seed": whole(0, 2**62),
    "svd": _svd_choice,
    "dct_method": choice("fft", "matmul"),
    "check_finite": flag,
    "error_feedback": flag,
    "matrix": flag,
}


def resolve_rank(rank: int | float, dim: int) -> int:
    """The number of columns for ``rank`` (an int, or a fraction of ``dim``), clamped to ``dim``."""
    if isinstance(rank, float):
        return max(1, min(dim, int(rank * dim)))
    return min(rank, dim)


def _projector(group: dict[str, Any]) -> Projector:
    if not isinstance(group["projector"], str):
        return group["projector"]
    if group["projector"] == "dct":
        return DCTProjector(group["score_norm"], group["dct_method"])
    if group["projector"] == "svd":
        return SVDProjector(_SVD_PROJECTOR_METHODS[group["svd"]])
    return RandomProjector()


def _row_shard_reduce(param: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The score all-reduce for a DTensor sharded by rows; ``None`` for a whole tensor.

    The sum (``op="max"``: the maximum) runs over the one mesh dimension that splits the rows
    (FSDP's ``Shard(0)``); replicated mesh dimensions (HSDP) hold the same rows with the same
    gradient, so they need nothing.
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

    def reduce(scores: torch.Tensor, op: str = "sum") -> torch.Tensor:
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        dist.all_reduce(scores, op=reduce_op, group=group)
        return scores

    return reduce


class _Orientation(NamedTuple):
    """How a parameter is stepped: its gradient as a ``(k, dim)`` matrix, compressing ``dim``."""

    rows: int  # k, this rank's rows of the oriented gradient
    dim: int  # the compressed side d
    cols: int  # the parameter's columns (``prod(shape[1:])``)
    transposed: bool


def _orientation(param: torch.Tensor, reduce: Callable | None) -> _Orientation:
    """The library's side rule (compress the smaller side, :func:`decomp._sides.transposes`),
    except on row shards (``reduce`` given), which always compress the columns."""
    rows, cols = matrix_dims(param.shape)
    # Row shards must compress the (whole) columns so each rank projects its own rows.
    transposed = transposes(rows, cols) and reduce is None
    if transposed:
        return _Orientation(cols, rows, cols, True)
    return _Orientation(local(param).shape[0], cols, cols, False)


def _compressed_side(param: torch.Tensor) -> int:
    """The side :math:`d` a projected ``param``'s gradient is compressed along (:func:`_orientation`)."""
    return _orientation(param, _row_shard_reduce(param)).dim


def _finite_on_every_rank(
    tensor: torch.Tensor, reduce: Callable[..., torch.Tensor]
) -> bool:
    """Whether ``tensor`` is finite on every rank that holds a row shard of it (``reduce``).

    Every rank must agree, or one would raise while the others wait in the next collective.
    """
    nonfinite = (~torch.isfinite(tensor)).sum(dtype=torch.float32).reshape(1)
    return bool(reduce(nonfinite) == 0)


def _sketch_with(
    sketch: torch.Tensor,
    energy: torch.Tensor,
    basis: torch.Tensor,
    reduce: Callable[..., torch.Tensor] | None,
) -> torch.Tensor:
    r"""``sketch`` after the rows :math:`e_j p_j^\top` of the subspace's columns :math:`p_j`.

    :math:`e_j = (\sum_t \lVert X_t p_j \rVert^2)^{1/2}` over the steps since the basis was
    chosen (``energy`` holds this rank's part; ``reduce`` sums the squares over the row shards).
    The Gram of these :math:`r` rows is the Gram of every step's rows
    :math:`\lVert X_t p_j \rVert\, p_j^\top`, so one Frequent Directions update per refresh
    sketches every step. Scale-free (:func:`~optim.projectors.column_norms`).
    """
    norms, scale = column_norms(energy[None, :], "l2", reduce)
    return continual.frequent_directions(sketch, (norms[:, None] * basis.mT) * scale)


def _back(
    direction: torch.Tensor,
    basis: torch.Tensor,
    protected: torch.Tensor | None,
    transposed: bool,
) -> torch.Tensor:
    r"""The update :math:`N P^\top` (minus its protected part) in the parameter's orientation.

    A transposed parameter gets :math:`P N^\top` from one product, contiguous: adding the
    transpose of :math:`N P^\top` to it was a strided add that made the steady step of a
    1024 x 4096 weight take 48 ms instead of 11 ms (CPU, rank 32, measured).
    """
    if not transposed:
        return continual.project_off(direction @ basis.mT, protected)
    return continual.project_off(basis @ direction.mT, protected, columns=True)


def _refresh(
    group: dict[str, Any],
    projector: Projector,
    state: dict[str, torch.Tensor],
    oriented: torch.Tensor,
    rank: int,
    reduce: Callable[..., torch.Tensor] | None,
    transposed: bool,
    old_basis: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    r"""A refresh of the subspace of ``oriented`` (:math:`k \times d`); writes nothing.

    Returns the projected gradient :math:`X P_{new}` (:math:`k \times r`), :math:`P_{new}`
    (:math:`d \times r`), the projector's new state (under ``protect``: the Frequent Directions
    sketch with the steps of the old subspace, :func:`_sketch_with`, and a zero energy) and, for
    ``moments="rotate"``, :math:`P_{old}^\top P_{new}`. ``old_basis`` is :math:`P_{old}`,
    ``None`` at the first step.
    """
    dim = oriented.shape[-1]
    # A rank without rows still joins the score all-reduce: a zero row adds no score.
    scored = oriented if oriented.shape[0] else oriented.new_zeros(1, dim)
    low, refreshed = projector.select(
        scored,
        {key: state[key] for key in projector.keys},
        rank,
        reduce,
        transposed=transposed,
    )
    basis = projector.basis(refreshed, dim, rank, oriented)
    rotation = None
    if group["moments"] == "rotate" and old_basis is not None:
        rotation = old_basis.mT @ basis
    if group["protect"]:
        sketch = state["sketch"]
        if old_basis is not None:
            sketch = _sketch_with(sketch, state["update_energy"], old_basis, reduce)
        energy = torch.zeros_like(state["update_energy"])
        refreshed = {**refreshed, "sketch": sketch, "update_energy": energy}
    return low[: oriented.shape[0]], basis, refreshed, rotation


def _rotated_second_moment(exp_avg_sq: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    r""":math:`v (R \odot R) + \bar v\,(\mathbf{1} - \mathbf{1}^\top (R \odot R))`: the second
    moment in the new basis (module docstring); :math:`\bar v` is the mean of each row of
    :math:`v` (:math:`k \times r`), :math:`R = P_{old}^\top P_{new}` (:math:`r \times r`).

    Example:
        >>> v = torch.tensor([[1.0, 3.0]])
        >>> _rotated_second_moment(v, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # keeps column 1
        tensor([[3., 2.]])
    """
    weights = rotation.square()
    # the part of each new column outside the old subspace (clamped: rounding can exceed 1)
    outside = (1 - weights.sum(0)).clamp_(min=0)
    return torch.addmm(exp_avg_sq @ weights, exp_avg_sq.mean(1, keepdim=True), outside[None, :])


class _Plan(NamedTuple):
    """One parameter's step, computed before anything is written (:meth:`ProjectedAdam._prepare`)."""

    gradient: torch.Tensor  # X, oriented (with the error feedback added, the protected part off)
    low: torch.Tensor | None  # X P from a refresh; None: projected in the step, which cannot fail
    basis: torch.Tensor  # P
    transposed: bool
    fresh: dict[str, torch.Tensor]  # the whole state of a first step, else empty
    refreshed: dict[str, torch.Tensor]  # the projector's new state (and sketch) at a refresh
    rotation: torch.Tensor | None  # moments="rotate" at a refresh: P_old^T P_new
    reset: bool  # moments="reset" at a refresh


@renamed_arguments(**_RENAMED_OPTIONS)
class ProjectedAdam(TensorStateOptimizer):
    r"""Adam on gradients projected to an :math:`r`-dimensional subspace, one engine for every projector.

    Args:
        params: parameters or param groups (each group may override any option below), or
            ``named_parameters()``.
        lr: learning rate :math:`\eta \ge 0`: a float, or a 1-element tensor (read once per step).
        rank: columns :math:`r` kept: an int, or a float in (0, 1] as a fraction of the compressed
            dimension; clamped to it. ``None`` in a group: plain AdamW for that group.
        projector: ``"dct"`` (:class:`~optim.projectors.DCTProjector` with ``score_norm`` and
            ``dct_method``), ``"svd"`` (:class:`~optim.projectors.SVDProjector` with ``svd``) or
            ``"random"``; or any :class:`~optim.projectors.Projector` object, or a zero-argument
            factory of one (called once, when the group is checked). An object ignores
            ``score_norm``, ``dct_method`` and ``svd``, and :meth:`state_dict` saves it as its
            ``name``, which a load matches against the projector of the group it lands on.
        update_gap: steps between subspace refreshes :math:`T \ge 1`.
        scale: the factor :math:`\alpha` on the projected update (GaLore's ``scale``), finite.
        moments: on a refresh: ``"keep"``, ``"rotate"`` or ``"reset"`` (module docstring).
        score_norm: DCT column scores, ``"l2"`` (optimal subset) or ``"l1"`` (the paper's).
        betas: Adam's :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: Adam's :math:`\epsilon \ge 0`, added to the bias-corrected root as in
            ``torch.optim.AdamW``.
        weight_decay: decoupled weight decay :math:`\lambda \ge 0`, applied before the update.
        max_dim: matrices with a side of this size or more take AdamW (embeddings and LM heads
            of 32k-token vocabularies; the DCT-AdamW code's ``max_shape``).
        foreach: batch the moment arithmetic of a group (its projected matrices, and its
            parameters that take AdamW) with multi-tensor kernels (``None``, the default, does
            so on every device; ``False`` steps tensor by tensor, bitwise the same on the CPU).
        protect: keep a sketch for :meth:`consolidate` (:mod:`optim.continual`). A projected
            matrix must leave room for protected directions (:math:`r < d`, its compressed
            side), else ``ValueError`` at construction; parameters that take AdamW are not
            protected.
        protect_energy: the energy fraction of the sketch that :meth:`consolidate` protects.
        seed: base seed ``>= 0`` of the random projector and the randomized SVD (parameter ``i``
            of the optimizer uses ``seed + i``).
        svd: ``"randomized"`` (:func:`decomp.rsvd`) or ``"exact"`` (``torch.linalg.svd``) for the
            SVD projector, the word :class:`decomp.adapters.SVDParam` and :func:`decomp.tucker`
            use. ``svd_method=`` and the value ``"rsvd"`` are its deprecated spellings (same
            meaning, ``DeprecationWarning``), accepted in the constructor, in param groups and in
            loaded state dicts.
        dct_method: ``"fft"`` or ``"matmul"`` for the DCT projector's scores.
        check_finite: when a parameter is due for a refresh, raise ``ValueError`` before any
            state changes (of any parameter) if its gradient has NaN/Inf; between refreshes
            non-finite gradients propagate as in ``torch.optim.Adam``. One host sync per refresh.
        error_feedback: keep the part of each gradient outside the subspace and add it to the
            next gradient before projecting (DCT-AdamW's ``use_ef``; module docstring). Costs one
            state tensor ``error`` per projected matrix, the size of the parameter in the state
            dtype (fp32 for fp16/bf16 weights): 4 MiB for a 1024 x 1024 weight.
        matrix: ``False`` steps every parameter of the group with AdamW, as ``rank=None`` does;
            the switch :class:`~optim.ARO` and :class:`~optim.RotatedAdam` share, which
            :func:`~optim.matrix_groups` sets on its AdamW group.
        maximize: maximise the objective (step along the gradient), as ``torch.optim.Adam``.
        fused: torch.optim's flag; only its default ``None`` (or ``False``) is accepted,
            anything else raises ``ValueError`` saying why.
        capturable: likewise; only ``False``.
        differentiable: likewise; only ``False``.

    Raises:
        ValueError: an option out of range, an unknown option (with the nearest valid name), a
            parameter the options cannot serve (``protect`` without room, the SVD projector on
            row shards), or, at a step or load, a state that does not fit its parameter.
        TypeError: an option or parameter of the wrong type.

    Example:
        >>> model = torch.nn.Linear(16, 8)
        >>> opt = ProjectedAdam(model.parameters(), lr=1e-2, rank=4, projector="dct")
        >>> model(torch.randn(2, 16)).square().sum().backward()
        >>> opt.step()
        >>> state = opt.state[model.weight]
        >>> tuple(state["exp_avg"].shape), state["index"].dtype
        ((16, 4), torch.int64)
    """

    options = _OPTIONS
    renamed_options = _RENAMED_OPTIONS

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        rank: int | float | None = 128,
        *,
        projector: str | Projector | Callable[[], Projector] = "dct",
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
        svd: str = "randomized",
        dct_method: str = "fft",
        check_finite: bool = True,
        error_feedback: bool = False,
        matrix: bool = True,
        maximize: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(params, options_of(locals()))

    def _takes_adamw(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        return (
            super()._takes_adamw(param, group)
            or not group["matrix"]
            or group["rank"] is None
            or max(matrix_dims(param.shape)) >= group["max_dim"]
        )

    def _matrix_layout(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, StateSpec]:
        reduce = _row_shard_reduce(param)
        projector = _projector(group)
        if reduce is not None and isinstance(projector, SVDProjector):
            raise ValueError(
                f"the SVD projector needs the whole gradient and cannot run on row shards (FSDP) "
                f"of {self._describe(param)}; use DCTProjectedAdam or the random projector there"
            )
        rows, dim, _, _ = _orientation(param, reduce)
        rank = resolve_rank(group["rank"], dim)
        room = max(dim - rank, 0)
        if group["protect"] and room == 0:
            raise ValueError(
                f"protect=True would protect nothing for {self._describe(param)}: "
                f"rank={group['rank']!r} keeps {rank} columns of its compressed side d = {dim}, "
                f"and consolidate() protects at most d - {rank} = 0 directions; use a rank below "
                f"{dim} or protect=False for it"
            )
        layout = {
            "step": integer(),
            "moment_step": integer(),
            "dim": integer(),
            "exp_avg": floating(rows, rank),
            "exp_avg_sq": floating(rows, rank),
            **projector.layout(dim, rank),
        }
        if group["error_feedback"]:
            layout["error"] = floating(rows, dim)
        if group["protect"]:
            layout["sketch"] = floating(2 * rank, dim)
            layout["update_energy"] = floating(rank)
            layout["protected"] = floating(dim, range(room + 1))
        return layout

    def _state_value_problem(
        self, param: torch.Tensor, group: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> str | None:
        problem = super()._state_value_problem(param, group, state)
        if problem is None and not self._takes_adamw(param, group):
            dim = _compressed_side(param)
            problem = _projector(group).state_problem(state, dim)
        return problem

    def _recorded_dims_problem(
        self, param: torch.Tensor, group: dict[str, Any], state: Mapping[str, torch.Tensor]
    ) -> str | None:
        """The compressed side ``dim`` the state was made for must be ``param``'s: no other state
        entry need have that size (a DCT index, a random seed), so a state of a ``(6, 4)`` weight
        would otherwise step a ``(6, 5)`` one with columns of the wrong basis."""
        if "dim" not in state or self._takes_adamw(param, group):
            return None
        dim = _compressed_side(param)
        if int(state["dim"]) != dim:
            return f"was made for a compressed side d = {int(state['dim'])}, expected d = {dim}"
        return None

    def _upgraded_state(
        self, param: torch.Tensor, group: dict[str, Any], state: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """A state saved before ``dim`` was recorded gets ``param``'s (what it was made for cannot
        be told any more); a ``protect=True`` state saved before the sketch was fed every step
        has no ``update_energy``: zeros (its sketch already holds the last refresh's gradient,
        as that release fed it)."""
        moments = state.get("exp_avg")
        if not isinstance(moments, torch.Tensor) or moments.ndim != 2 or self._takes_adamw(param, group):
            return state  # the layout check names what is wrong
        if "dim" not in state:
            dim = _compressed_side(param)
            state = {**state, "dim": torch.tensor(dim, dtype=torch.int64)}
        if group["protect"] and "update_energy" not in state:
            state = {**state, "update_energy": moments.new_zeros(moments.shape[1])}
        return state

    def _param_index(self, param: torch.Tensor) -> int:
        """``param``'s position among all the optimizer's parameters (its seed offset), O(1).

        The positions are built once, on first use after construction or ``add_param_group``,
        and again for a parameter they lack (one appended to a group's list by hand).
        """
        positions = self.__dict__.get("_positions")
        if positions is None or id(param) not in positions:
            params = (candidate for group in self.param_groups for candidate in group["params"])
            positions = self._positions = {id(candidate): i for i, candidate in enumerate(params)}
        if id(param) not in positions:
            raise KeyError("parameter not in this optimizer")
        return positions[id(param)]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.__dict__.pop("_positions", None)
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's ``state_dict``, with a group's projector object saved as its ``name``.

        So the result holds tensors, numbers and strings only and ``torch.load(...,
        weights_only=True)`` reads it back; :meth:`load_state_dict` puts the object back when the
        group it lands on holds a projector of that name.
        """
        saved = super().state_dict()
        for group in saved["param_groups"]:
            if not isinstance(group.get("projector", ""), str):
                group["projector"] = group["projector"].name
        return saved

    def _loaded_options(
        self, index: int, saved: dict[str, Any], group: dict[str, Any]
    ) -> dict[str, Any]:
        current = group["projector"]
        if isinstance(current, str) or not isinstance(saved.get("projector"), str):
            return saved
        if saved["projector"] != current.name:
            raise ValueError(
                f"param group {index} of the state_dict was saved with projector "
                f"{saved['projector']!r}, this optimizer's holds {type(current).__name__} "
                f"named {current.name!r}"
            )
        return {**saved, "projector": current}

    def _refreshes(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``param``'s next step picks a new subspace (its first one included)."""
        state = self.state.get(param)
        return not state or int(state["step"]) % group["update_gap"] == 0

    def _check_gradients(
        self, work: list[tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]]
    ) -> None:
        """Raise before any state changes on a gradient sharded unlike its parameter, or one due
        for a refresh with NaN/Inf (``check_finite``).

        Checked up front (not parameter by parameter) so that a bad gradient in one parameter
        leaves every other parameter's state untouched too, and before the SVD, which would
        fail with a LAPACK error instead. Row shards are checked first, each with one
        all-reduce, so that every rank raises at the same point.
        """
        whole_grads = []
        for group, params in work:
            for param, grad in params:
                reduce = _row_shard_reduce(param)
                if reduce is not None and grad.placements != param.placements:
                    raise ValueError(
                        f"the gradient's placements {grad.placements} differ from the "
                        f"parameter's {param.placements} ({self._describe(param)}); the "
                        f"optimizer steps each rank's own rows"
                    )
                if not group["check_finite"] or not self._refreshes(param, group):
                    continue
                if reduce is None:
                    whole_grads.append((param, local(grad)))
                elif not _finite_on_every_rank(local(grad), reduce):
                    self._raise_nonfinite(param)
        bad = first_nonfinite([grad for _, grad in whole_grads])
        if bad is not None:
            self._raise_nonfinite(whole_grads[bad][0])

    def _raise_nonfinite(self, param: torch.Tensor) -> None:
        raise ValueError(
            f"the gradient of {self._describe(param)} contains NaN or Inf at a subspace "
            f"refresh; the optimizer state was left unchanged"
        )

    def _prepare(
        self, group: dict[str, Any], params: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[_Plan]:
        projector = _projector(group)
        return [self._plan(group, projector, param, grad) for param, grad in params]

    def _plan(
        self,
        group: dict[str, Any],
        projector: Projector,
        param: torch.Tensor,
        grad: torch.Tensor,
    ) -> _Plan:
        """The projected gradient, its basis and the state changes of a refresh; writes nothing."""
        reduce = _row_shard_reduce(param)
        _, dim, cols, transposed = _orientation(param, reduce)
        # (-1, cols), not as_matrix: an FSDP rank may hold no rows of a short weight. A reshape
        # or a cast to the dtype the tensor has is a dispatch all the same: skipped.
        matrix, dtype = local(grad), state_dtype(param)
        if matrix.ndim != 2 or matrix.shape[1] != cols:
            matrix = matrix.reshape(-1, cols)
        if matrix.dtype != dtype:
            matrix = matrix.to(dtype)
        oriented = matrix.mT if transposed else matrix
        rank = resolve_rank(group["rank"], dim)
        state = self.state.get(param)
        fresh = {}
        if not state:
            fresh = state = self._fresh_state(group, projector, param, oriented, rank)
        if group["error_feedback"]:
            oriented = oriented + state["error"]
        oriented = continual.project_off(oriented, state.get("protected"))
        step = int(state["step"])
        refreshing = step % group["update_gap"] == 0
        refreshed, rotation, low = {}, None, None
        if not refreshing:
            basis = self._basis(param, projector, state, dim, rank, oriented)
        else:
            needs_old = step > 0 and (group["moments"] == "rotate" or group["protect"])
            old_basis = (
                self._basis(param, projector, state, dim, rank, oriented) if needs_old else None
            )
            low, basis, refreshed, rotation = _refresh(
                group, projector, state, oriented, rank, reduce, transposed, old_basis
            )
            self._cache_basis(param, projector, refreshed, basis)
        reset = refreshing and group["moments"] == "reset"
        return _Plan(oriented, low, basis, transposed, fresh, refreshed, rotation, reset)

    def _basis(
        self,
        param: torch.Tensor,
        projector: Projector,
        state: dict[str, torch.Tensor],
        dim: int,
        rank: int,
        like: torch.Tensor,
    ) -> torch.Tensor:
        """``projector.basis(state, ...)``, built once per subspace (:attr:`_bases`).

        The cache holds, per parameter, the projector's state tensors it was built from and the
        basis; it is valid while ``state`` holds those very tensors (a refresh, a load or a hand
        edit replaces them), so it never serves a basis of another subspace.
        """
        key = tuple(state[name] for name in projector.keys)
        cached = self._bases.get(param)
        if cached is not None and len(cached[0]) == len(key):
            if all(old is new for old, new in zip(cached[0], key)) and cached[1].shape == (dim, rank):
                return cached[1]
        basis = projector.basis(state, dim, rank, like)
        self._cache_basis(param, projector, state, basis)
        return basis

    def _cache_basis(
        self,
        param: torch.Tensor,
        projector: Projector,
        state: dict[str, torch.Tensor],
        basis: torch.Tensor,
    ) -> None:
        self._bases[param] = (tuple(state[name] for name in projector.keys), basis)

    @property
    def _bases(self) -> dict[torch.Tensor, tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        r"""Parameter -> (the projector state tensors, the basis built from them).

        Outside :meth:`state_dict` (a :math:`d \times r` basis per matrix, rebuilt on demand),
        and outside pickles and deep copies: ``torch.optim.Optimizer.__getstate__`` keeps only
        the defaults, state and groups.
        """
        return self.__dict__.setdefault("_basis_cache", {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base class's atomic load; the cached bases are dropped too (the loaded state
        replaces the tensors they are keyed by anyway)."""
        super().load_state_dict(state_dict)
        self._bases.clear()

    def _fresh_state(
        self,
        group: dict[str, Any],
        projector: Projector,
        param: torch.Tensor,
        oriented: torch.Tensor,
        rank: int,
    ) -> dict[str, torch.Tensor]:
        """The state of ``param``'s first step: zero counters and moments, the projector's fresh
        state (seeded by the parameter's position) and, under ``protect``, an empty sketch and
        protected basis."""
        dim = oriented.shape[-1]
        seed = group["seed"] + self._param_index(param)
        state = {
            "step": torch.tensor(0, dtype=torch.int64),
            "moment_step": torch.tensor(0, dtype=torch.int64),
            "dim": torch.tensor(dim, dtype=torch.int64),
            **projector.init_state(dim, rank, oriented, seed),
            "exp_avg": oriented.new_zeros(oriented.shape[0], rank),
            "exp_avg_sq": oriented.new_zeros(oriented.shape[0], rank),
        }
        if group["error_feedback"]:
            state["error"] = oriented.new_zeros(oriented.shape)
        if group["protect"]:
            state["sketch"] = oriented.new_zeros(2 * rank, dim)
            state["update_energy"] = oriented.new_zeros(rank)
            state["protected"] = oriented.new_zeros(dim, 0)
        return state

    def _step_matrices(
        self,
        group: dict[str, Any],
        params: list[tuple[torch.Tensor, torch.Tensor]],
        plan: list[_Plan],
    ) -> None:
        states = [self._begin(param, step) for (param, _), step in zip(params, plan)]
        # one call for the two counters of every matrix: half the time of two calls per matrix
        # (CPU, 56 counters; measured)
        torch._foreach_add_(
            [state[counter] for state in states for counter in ("step", "moment_step")], 1
        )
        steps = [int(state["moment_step"]) for state in states]
        # None (the default) batches on every device: bitwise the same as the loop, and on the
        # CPU, where the multi-tensor kernels loop over the tensors themselves, still faster
        # (fewer Python calls).
        if group["foreach"] is not False:
            lows = [self._projected(state, step) for state, step in zip(states, plan)]
            exp_avgs = [state["exp_avg"] for state in states]
            exp_avg_sqs = [state["exp_avg_sq"] for state in states]
            betas, eps = group["betas"], group["eps"]
            denoms = adam_denominators(lows, exp_avgs, exp_avg_sqs, steps, betas, eps)
            ratios = torch._foreach_div(exp_avgs, denoms)
        else:
            ratios = [
                adam_ratio(
                    self._projected(state, step),
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    count,
                    group["betas"],
                    group["eps"],
                )
                for state, step, count in zip(states, plan, steps)
            ]
        for (param, _), state, step, ratio, count in zip(params, states, plan, ratios, steps):
            update = _back(ratio, step.basis, state.get("protected"), step.transposed)
            apply_update(
                local(param),
                update,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                factor=group["scale"] / first_bias_correction(count, group["betas"]),
            )

    def _begin(self, param: torch.Tensor, step: _Plan) -> dict[str, torch.Tensor]:
        """Write ``param``'s state changes of a first step or a refresh; its state."""
        state = self.state[param]
        state.update(step.fresh)
        if step.reset:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["moment_step"].zero_()
        elif step.rotation is not None:
            state["exp_avg"] = state["exp_avg"] @ step.rotation
            state["exp_avg_sq"] = _rotated_second_moment(state["exp_avg_sq"], step.rotation)
        state.update(step.refreshed)
        return state

    @staticmethod
    def _projected(state: dict[str, torch.Tensor], step: _Plan) -> torch.Tensor:
        """:math:`L = X P`, with the error feedback's new residual and the sketch's energy."""
        low = step.gradient @ step.basis if step.low is None else step.low
        if "error" in state:
            state["error"] = torch.addmm(step.gradient, low, step.basis.mT, alpha=-1)
        if "update_energy" in state:
            # this rank's rows; the squares sum over the ranks once, at the next refresh
            norms, norm_scale = column_norms(low, "l2")
            state["update_energy"] = torch.hypot(state["update_energy"], norms * norm_scale)
        return low

    @torch.no_grad()
    def consolidate(self) -> dict[str, int]:
        """End a task: protect its dominant update directions in every ``protect=True`` group.

        Returns the number of protected directions per parameter shape (for logging). Later
        updates are orthogonal to everything protected so far (:mod:`optim.continual`). The
        sketch takes the steps since the last refresh first. Every new basis is computed before
        any state changes, so an error leaves the state as it was. Row-sharded (FSDP)
        parameters need every rank to call it (one all-reduce of :math:`r` energies each).
        """
        extended = []
        for group in self.param_groups:
            if not group["protect"]:
                continue
            for param in group["params"]:
                self._check_state(param, group)
                state = self.state.get(param, {})
                if "sketch" not in state:
                    continue
                dim = state["sketch"].shape[1]
                rank = state["exp_avg"].shape[1]
                basis = self._basis(param, _projector(group), state, dim, rank, state["sketch"])
                reduce = _row_shard_reduce(param)
                sketch = _sketch_with(state["sketch"], state["update_energy"], basis, reduce)
                protected = continual.extend_basis(
                    state["protected"], sketch, group["protect_energy"], max(dim - rank, 0)
                )
                extended.append((param, group["update_gap"], protected))
        counts: dict[str, int] = {}
        for param, gap, protected in extended:
            state = self.state[param]
            state["protected"] = protected
            state["sketch"] = torch.zeros_like(state["sketch"])
            state["update_energy"] = torch.zeros_like(state["update_energy"])
            # The subspace in use is the one just protected: updates in it would be zero
            # until the next refresh, so the next step refreshes.
            state["step"] = -(-state["step"] // gap) * gap
            counts[str(tuple(param.shape))] = int(protected.shape[1])
        return counts


def _check_keywords(cls: type, options: dict[str, Any]) -> None:
    """Reject a keyword a wrapper cannot pass on, naming the nearest option (``TypeError``)."""
    for key in options:
        if key == "projector":
            raise TypeError(
                f"{cls.__name__} fixes its projector; use ProjectedAdam(projector=...) for another"
            )
        if key not in _OPTIONS:
            # a misspelt old name still points to the current one
            close = difflib.get_close_matches(key, sorted(_OPTIONS) + sorted(_RENAMED_OPTIONS), n=1)
            hint = f"; did you mean {_RENAMED_OPTIONS.get(close[0], close[0])!r}?" if close else ""
            raise TypeError(f"{cls.__name__} got an unexpected option {key!r}{hint}")


@renamed_arguments(**_RENAMED_OPTIONS)
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

    fixed_options = {"projector": "dct"}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        rank: int | float | None = 128,
        *,
        moments: str = "rotate",
        **options: Any,
    ) -> None:
        _check_keywords(type(self), options)
        super().__init__(params, lr, rank, projector="dct", moments=moments, **options)


@renamed_arguments(**_RENAMED_OPTIONS)
class SVDProjectedAdam(ProjectedAdam):
    r"""GaLore: projected Adam on the top-:math:`r` singular vectors of the gradient.

    :class:`ProjectedAdam` with ``projector="svd"`` and GaLore's ``moments="keep"``.
    ``svd="exact"`` with ``rank``, ``update_gap`` and ``scale`` as in galore-torch follows
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

    fixed_options = {"projector": "svd"}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        rank: int | float | None = 128,
        **options: Any,
    ) -> None:
        _check_keywords(type(self), options)
        super().__init__(params, lr, rank, projector="svd", **options)
