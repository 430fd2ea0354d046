r"""Rotated optimizers: a base update applied in a rotated frame of each weight matrix.

Both optimizers see a weight :math:`W \in \mathbb{R}^{m \times n}` (N-D weights viewed as
``(shape[0], -1)``) through orthonormal bases, run a simple elementwise or row/column-wise base
optimizer there, and map the result back:

* :class:`ARO` -- adaptively rotated optimization (arXiv 2602.09006): one rotation, updated every
  step by a QR of a cross-alignment matrix, around a Sinkhorn (or row-norm, or sign) base map.
* :class:`RotatedAdam` -- full-rank Adam in a rotated basis: the fixed orthonormal DCT-II on both
  sides (no basis state), or SOAP's Shampoo eigenbases (arXiv 2409.11321).

1-D parameters (biases, norm gains) and scalars take the ``torch.optim.AdamW`` step of
:func:`optim._adam.adamw_steps` inside the same optimizer, with their group's ``lr``, ``betas``,
``eps`` and ``weight_decay``; so does every parameter of a group with ``matrix=False`` (the
embeddings and output head in :func:`~optim.matrix_groups`, Muon's recipe). All state is tensors
(``weights_only``-loadable); floating state of fp16/bf16 weights is fp32, and the weight keeps its
own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from decomp import dct, idct
from decomp._checks import unit_scaled
from decomp._qr import signed_qr
from decomp._sides import matrix_dims, transposes

from ._adam import adam_ratio, apply_update, first_bias_correction, init_moments
from ._base import (
    COMMON_OPTIONS,
    _adam_betas,
    _learning_rate,
    StateSpec,
    TensorStateOptimizer,
    as_matrix,
    choice,
    first_nonfinite,
    flag,
    floating,
    integer,
    optional,
    options_of,
    real,
    state_dtype,
    whole,
)

__all__ = ["ARO", "RotatedAdam"]

_ARO_BASES = ("sinkhorn", "row_norm", "sign")
_ARO_LR_ADJUSTMENTS = ("fan_in", "rms_norm", "spectral_norm", "none")
_ROTATED_ADAM_BASES = ("dct", "eigen")
# What lr=None and betas=None mean in a RotatedAdam group, by its basis: SOAP's defaults
# (nikhilvyas/SOAP; shampoo_beta=None then follows beta2 = 0.95, SOAP's too) and AdamW's.
_ROTATED_ADAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "eigen": {"lr": 3e-3, "betas": (0.95, 0.95)},
    "dct": {"lr": 1e-3, "betas": (0.9, 0.999)},
}
_SIDES = ("left", "right")
_ARO_ROTATED_SIDES = ("rows", "smaller")


# Rows (and columns) of R^T M whose norm is at most this many machine epsilons of the largest
# are rounding noise: when M is rank-deficient (a first step on a small batch) the QR completes R
# with columns orthogonal to M, which exact arithmetic maps to zero rows and floating point to
# rows of about eps ||M||; normalising those would blow noise up to a full-size update. Measured
# (fp32, rank-1 M, sides up to 1024): noise at 1-6 eps; the smallest row of a 1024 x 1024
# Gaussian M sits at about 600 eps.
_ROUNDING_EPS = 32

# ARO steps the matrices of one shape as a batch, each kernel once for all of them, where one
# matrix at a time is dozens of small kernels each (the official code batches them likewise); a
# batch stacks copies of the momenta, so it holds at most this many entries (16 MiB in fp32) and
# larger matrices step one by one.
_ARO_BATCH_ELEMENTS = 2**22


def _normalize_rows(x: torch.Tensor, target: float) -> torch.Tensor:
    r"""Rows of ``x`` (``(..., m, n)``, each matrix on its own) scaled to L2 norm ``target``;
    rows at the rounding level become zero.

    ``x`` must be of moderate scale (the base maps divide it by :func:`unit_scaled` first), so
    no squared norm over- or underflows. A row whose norm is at most ``_ROUNDING_EPS`` machine
    epsilons of the largest one (a zero row included) maps to zero: it is divided by ``inf``.
    """
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    floor = _rounding_floor(norms, dim=-2)
    return x.div(torch.where(norms > floor, norms, torch.inf)).mul_(target)


def _rounding_floor(norms: torch.Tensor, dim: int) -> torch.Tensor:
    """The norm at or below which a row or column of a matrix is rounding: ``_ROUNDING_EPS``
    machine epsilons of the largest of ``norms`` along ``dim`` (each matrix on its own)."""
    return norms.amax(dim=dim, keepdim=True) * (_ROUNDING_EPS * torch.finfo(norms.dtype).eps)


def _sinkhorn(x: torch.Tensor, iters: int) -> torch.Tensor:
    r"""``iters`` rounds of: rows to L2 norm :math:`\sqrt{n}`, then columns to :math:`\sqrt{m}`
    (each :math:`m \times n` matrix of ``x`` on its own, as every base map).

    Every round keeps the form :math:`\operatorname{diag}(a)\, X \operatorname{diag}(b)`, so the
    rounds update the vectors :math:`a, b` alone, from :math:`S = X \odot X`: the row norms are
    :math:`a \odot \sqrt{S (b \odot b)}` and the column norms
    :math:`b \odot \sqrt{S^\top (a \odot a)}`, two matrix-vector products a round in place of
    four passes over the matrix (a column reduction of a row-major matrix was most of ARO's step
    on small matrices). A row or column whose norm is at the rounding level
    (:func:`_normalize_rows`) gets a zero factor, and keeps it.
    """
    rows, cols = x.shape[-2:]
    x = unit_scaled(x, (-2, -1))[0]  # the map is scale-invariant; this makes it scale-safe
    squares = x.square()
    row_scale = x.new_ones(*x.shape[:-1], 1)  # a, (..., m, 1)
    col_scale = x.new_ones(*x.shape[:-2], 1, cols)  # b, (..., 1, n)
    for _ in range(iters):
        row_norms = (squares @ col_scale.square().mT).sqrt_()  # without a: (..., m, 1)
        row_scale = _reciprocal_above_floor(row_norms, row_scale, math.sqrt(cols), dim=-2)
        col_norms = (row_scale.square().mT @ squares).sqrt_()  # without b: (..., 1, n)
        col_scale = _reciprocal_above_floor(col_norms, col_scale, math.sqrt(rows), dim=-1)
    return x * row_scale * col_scale


def _reciprocal_above_floor(
    norms: torch.Tensor, scale: torch.Tensor, target: float, dim: int
) -> torch.Tensor:
    """``target / norms`` where the current norms ``norms * |scale|`` are above the rounding
    floor of their largest (along ``dim``), else 0: the new scale that sets them to ``target``."""
    current = norms * scale.abs()
    return torch.where(current > _rounding_floor(current, dim), target / norms, 0.0)


def _row_norm(x: torch.Tensor, iters: int) -> torch.Tensor:
    r""":math:`\sqrt{n}\, x_i / \lVert x_i \rVert` for every row (``iters`` is unused)."""
    return _normalize_rows(unit_scaled(x, (-2, -1))[0], math.sqrt(x.shape[-1]))


def _sign(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Elementwise sign, zero on rows at the rounding level (``iters`` is unused)."""
    return _normalize_rows(unit_scaled(x, (-2, -1))[0], 1.0).sign()


_BASE_MAPS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "sinkhorn": _sinkhorn,
    "row_norm": _row_norm,
    "sign": _sign,
}


def _rank_bounded(rotated: torch.Tensor) -> torch.Tensor:
    r""":math:`R^\top M` with its rows past the :math:`n`-th set to zero when it has more rows
    :math:`m` than columns :math:`n` (the rows rotated on a tall weight).

    :math:`R = \operatorname{qf}(C)` for the cross matrix :math:`C = M F^\top`,
    :math:`F = f(R_{\mathrm{prev}}^\top M)`. When :math:`C`'s first :math:`n` columns span
    :math:`C`'s column space, which is :math:`M`'s (the generic case: :math:`F`'s first
    :math:`n` rows independent; from the second step on :math:`F`'s other rows are these zeros),
    :math:`R`'s first :math:`n` columns span it too and the rows past :math:`n` of
    :math:`R^\top M` are zero in exact arithmetic, rounding in floating point. The rounding is
    up to :math:`10^{-4}` of the largest row in float32 on an ill-conditioned momentum, above
    any relative floor, and a base map would normalise it to full rows in directions no gradient
    has: the official code's Sinkhorn does, and 82% of its update's norm on a
    :math:`384 \times 128` momentum lies outside :math:`M`'s column space (measured).
    """
    rows, cols = rotated.shape[-2:]
    if rows <= cols:
        return rotated
    bounded = rotated.clone()
    bounded[..., cols:, :] = 0
    return bounded


def _aro_transposes(rows: int, cols: int, group: dict[str, Any]) -> bool:
    r"""Whether ARO steps :math:`W^\top` (so :math:`R` rotates its rows, the weight's columns):
    ``rotate="smaller"`` on a tall weight, which keeps :math:`R` at :math:`\min(m, n)^2`."""
    return group["rotate"] == "smaller" and transposes(rows, cols, smaller="rows")


class _MatrixOrAdamW(TensorStateOptimizer):
    """Both optimizers: each matrix through ``_matrix_step``, the rest through AdamW (1-D
    parameters, scalars, and every parameter of a ``matrix=False`` group)."""

    def _takes_adamw(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        return super()._takes_adamw(param, group) or not group["matrix"]

    def _decomposes(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``param``'s next step runs a decomposition (what ``check_finite`` guards)."""
        raise NotImplementedError

    def _decomposition_inputs(
        self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]
    ) -> list[tuple[torch.Tensor, str]]:
        """What this step's decomposition of ``param`` reads, each with the error if non-finite.

        Default: the gradient. The messages name the parameter through ``{param}``.
        """
        return [(grad, "the gradient of {param} contains NaN or Inf at a basis update")]

    def _check_gradients(
        self, work: list[tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]]
    ) -> None:
        """With ``check_finite``, raise before anything changes if a gradient (or a statistic)
        due for a decomposition has NaN/Inf (one host sync for all of them)."""
        due = [
            (param, tensor, problem)
            for group, params in work
            if group["check_finite"]
            for param, grad in params
            if self._decomposes(param, group)
            for tensor, problem in self._decomposition_inputs(param, grad, group)
        ]
        bad = first_nonfinite([tensor for _, tensor, _ in due])
        if bad is not None:
            param, _, problem = due[bad]
            raise ValueError(
                f"{problem.format(param=self._describe(param))}; the optimizer state was left "
                f"unchanged"
            )

    def _matrix_step(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        group: dict[str, Any],
    ) -> None:
        raise NotImplementedError

    def _step_matrices(
        self, group: dict[str, Any], params: list[tuple[torch.Tensor, torch.Tensor]], plan: Any
    ) -> None:
        for param, grad in params:
            self._matrix_step(param, grad, self.state[param], group)


class ARO(_MatrixOrAdamW):
    r"""Adaptively rotated optimization: a base map applied in a learned rotated frame.

    For each matrix :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G`, momentum
    :math:`\mu`, base map :math:`f` and rotation :math:`R` (initially :math:`I`):

    .. math::

        M &\leftarrow \mu M + (1-\mu) G, \qquad
            \tilde M = \mu M + (1-\mu) G \;\; (\text{Nesterov, default}) \;\text{ or }\; M \\
        R &\leftarrow \operatorname{qf}\!\big(\tilde M f(R^\top \tilde M)^\top\big) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s\, R f(R^\top \tilde M)

    (``nesterov=True``, the default: the step sees the gradient once more, as
    ``torch.optim.Muon``'s Nesterov momentum does; ``nesterov=False`` steps on :math:`M` itself,
    as the paper and the official code do), where :math:`\operatorname{qf}` is the Q factor of a
    QR factorisation with :math:`\operatorname{diag}(R_{qr}) \ge 0` and the scale is
    :math:`s = 1/\sqrt{n}`
    (``adjust_lr="fan_in"``, the default: a step of RMS :math:`\eta/\sqrt{n}`, that of
    ``torch.optim.Muon`` at its default ``adjust_lr_fn``, so a Muon learning rate is an ARO one),
    :math:`0.2\sqrt{\max(m, n)}` (``"rms_norm"``, Moonlight's AdamW-matched RMS, the paper's and
    the official code's), :math:`\sqrt{m/n}` (``"spectral_norm"``) or :math:`1` (``"none"``).
    Base maps:

    * ``"sinkhorn"`` -- ``sinkhorn_iters`` rounds of rows to L2 norm :math:`\sqrt{n}`, then
      columns to :math:`\sqrt{m}` (SinkGD, arXiv 2502.06742);
    * ``"row_norm"`` -- :math:`\sqrt{n}\, x_i / \lVert x_i \rVert` per row;
    * ``"sign"`` -- :math:`\operatorname{sign}(X)`.

    A zero row or column stays zero, so a zero gradient gives a zero update (no NaN). So does a
    row (column) whose norm is at most :math:`32\,\epsilon` of the largest (:math:`\epsilon` the
    state dtype's machine epsilon): when :math:`M` is rank-deficient (a first step on a batch
    smaller than :math:`\min(m, n)`) the QR completes :math:`R` with columns orthogonal to
    :math:`M`, whose rows of :math:`R^\top M` are zero in exact arithmetic and rounding noise in
    floating point, and normalising them would turn noise into most of the update. For a rank-1
    :math:`M` that noise is a few :math:`\epsilon` and the update stays in :math:`M`'s span; for
    rank 2 and more the unpivoted QR of an ill-conditioned :math:`C` can leave rows of about
    :math:`10^{-5}` of the largest (float32), which are normalised like any other row. With the
    rows rotated on a tall weight (:math:`m > n`) :math:`R^\top M` has rank at most :math:`n`,
    and its rows past the :math:`n`-th, zero in exact arithmetic whenever :math:`C`'s first
    :math:`n` columns span :math:`C` (the generic case, kept so by these very zeros), are set to
    zero whatever their size: a first step on a rank-8-plus-noise gradient left them at
    :math:`10^{-4}` of the largest row in float32, and normalised they carried 24-46% of the
    update's norm outside :math:`M`'s column space. The official code normalises them (its
    Sinkhorn floors a row norm at :math:`10^{-8}` and the second round scales any row up to full
    size), so on every step 82% of its update's norm on a :math:`384 \times 128` momentum lies
    outside that space (measured, its formula in float32, gradients of scale :math:`10^{-2}` to
    :math:`10^{-6}`); this is the clean formula instead. Each
    :math:`f` commutes with flipping the sign of rows, so the sign convention of the QR does not
    change the update; it is fixed only so the rotation state is deterministic. With ``"sign"``
    the step is not continuous in :math:`M`: :math:`R^\top M` can hold exact zeros whose
    computed sign is rounding, so runs on different devices or LAPACKs may drift apart. Every
    :math:`f` is scale-invariant and runs on :math:`R^\top M` divided by a power of two (and the
    QR on :math:`C` likewise), so a momentum of 1e20 or 1e-30 gets the update of its unit-scale
    copy, where raw squared norms would overflow or underflow float32.

    Which side is rotated (``rotate``): ``"smaller"`` (default) runs the step on :math:`W^\top`
    when :math:`m > n`, so :math:`R` is :math:`\min(m, n) \times \min(m, n)` and :math:`f`
    normalises the rows of :math:`R^\top M^\top`; ``"rows"`` rotates the rows for every shape,
    :math:`R` is :math:`m \times m`, as the paper and the official code (``microsoft/dion``
    ``aro.py``) do. They differ only on tall weights, where ``"rows"`` works in a frame whose
    rows past the :math:`n`-th are zero (above) and costs :math:`m^2` floats (462 MiB for an
    11008 x 4096 MLP up-projection in fp32, where ``"smaller"`` keeps 64 MiB; 3.8 GiB for a
    32000-token embedding or LM head) and an :math:`O(m^3)` QR against :math:`O(n^2 m)`. Measured (issue 12; the byte-level
    Llama of the optimizer benchmark, ARO on the attention and MLP matrices, each side at its
    best rate of one sweep, 3 seeds): validation loss 1.841 with ``"smaller"`` against 1.856
    with ``"rows"`` at the defaults; with ``adjust_lr="rms_norm"``, ``nesterov=False`` 2.152
    against 2.186, ``"smaller"`` lower on each of the three seeds (by 0.028 to 0.040); the issue had
    measured the official code's ``"rows"`` 0.05 nats ahead with ARO on every parameter. Tall
    embeddings and heads belong in an AdamW group anyway (``matrix=False``,
    :func:`~optim.matrix_groups`). The scale :math:`s` is computed from the unflipped
    :math:`(m, n)`. The QR is a Householder ``torch.linalg.qr`` (the paper recommends a shifted
    Cholesky-QR for speed). The matrices of one shape step as one batch, up to
    :data:`_ARO_BATCH_ELEMENTS` momentum entries (the official code batches them likewise).

    Learning rate. Each base map gives :math:`R f(R^\top M)` entries of RMS 1, so the scale
    alone sets a matrix step's RMS: :math:`\eta/\sqrt{n}` with ``"fan_in"``, the RMS of Muon's
    step (:math:`\sqrt{\max(1, m/n)}` times an orthogonal update of RMS
    :math:`1/\sqrt{\max(m, n)}`), so a Muon learning rate carries over; :math:`0.2\sqrt{\max(m,
    n)}\,\eta` with ``"rms_norm"`` (Moonlight's factor assumes the orthogonal update), which grows
    with the matrix where Muon's shrinks. Measured on the benchmark's byte-level Llama (issue 12
    review, ARO on the attention and MLP matrices, each row at its best rate of a sweep, 3 seeds):
    validation loss 1.841 at the defaults (best lr 0.04, Muon's best too), 1.936 with
    ``nesterov=False``, 2.152 with ``"rms_norm"`` and ``nesterov=False`` (the paper's, best lr
    1e-3); ``torch.optim.Muon`` 1.880 (docs/optim/rotated.md has the sweeps and a 3.3M check). An
    AdamW learning rate is not an ARO one: give the embeddings, head and 1-D parameters their own
    AdamW group and lr (:func:`~optim.matrix_groups`). ``adjust_lr="rms_norm", lr=1e-3,
    nesterov=False`` is the default before the review.

    ``lr`` is the matrix step size; 1-D parameters, scalars and ``matrix=False`` groups take
    ``torch.optim.AdamW`` steps at their group's ``lr`` with ``betas``, ``eps`` and
    ``weight_decay`` (at the default 0.02, on Muon's scale, that is 20 times AdamW's usual 1e-3:
    give them a group of their own, as :func:`~optim.matrix_groups` does at 1e-3). State per
    matrix: ``step`` (0-d int64 on the CPU), ``momentum`` (:math:`m \times n`) and ``rotation`` (:math:`\min(m,n)^2`, or :math:`m^2` with
    ``"rows"``), fp32 for fp16/bf16 weights.

    Args:
        params: parameters or param groups (groups may override every option below).
        lr: step size :math:`\eta \ge 0` (default 0.02: with ``"fan_in"`` the best of 0.014, 0.02
            and 0.04 on a 3.3M byte-level Llama, where Muon's best is 0.02 too; the benchmark's 0.92M
            one prefers 0.04, as Muon does; the paper's and the official code's 0.01 is for
            ``"rms_norm"``); see "Learning rate" above.
        momentum: EMA factor :math:`\mu \in [0, 1)` of the gradient (default 0.95).
        nesterov: step on :math:`\mu M + (1-\mu) G` (default True, torch.optim.Muon's momentum)
            instead of :math:`M` (``False``: the paper's and the official code's). See "Learning
            rate" above for the measurement.
        weight_decay: decoupled decay :math:`\lambda \ge 0`, applied as :math:`1 - \eta\lambda`
            (default 0.0, as every optimizer here and ``torch.optim.Adam``; the paper uses 0.01).
        base: ``"sinkhorn"`` (default), ``"row_norm"`` or ``"sign"``.
        sinkhorn_iters: rounds of the Sinkhorn map, ``>= 1`` (default 5).
        adjust_lr: ``"fan_in"`` (default), ``"rms_norm"`` (the paper's), ``"spectral_norm"`` or
            ``"none"``.
        betas: AdamW betas for the parameters that take AdamW, each in ``[0, 1)`` (default
            ``(0.9, 0.999)``).
        eps: AdamW epsilon for the parameters that take AdamW, ``>= 0`` (default 1e-8).
        rotate: ``"smaller"`` (default) or ``"rows"`` (the paper's): the side :math:`R` rotates.
        matrix: ``False`` steps every parameter of the group with AdamW (embeddings, head).
        check_finite: raise ``ValueError`` before anything changes if a matrix gradient has
            NaN/Inf (the rotation's QR runs every step, and a NaN rotation never recovers); one
            host sync per step for all parameters (default True).
        maximize: step along the gradient, as ``torch.optim.Adam`` (default False).
        fused: torch.optim's flag; only its default ``None`` (or ``False``) is accepted,
            anything else raises ``ValueError`` saying why.
        capturable: likewise; only ``False``.
        differentiable: likewise; only ``False``.

    ``lr`` may be a 1-element tensor (read as a number once per step, as LR schedulers that
    ``fill_`` it expect).

    Raises:
        ValueError: an option out of range, an unknown ``base`` / ``adjust_lr`` or param-group
            key (with the nearest valid name), or, at a step or load, a state that does not fit
            its parameter.
        TypeError: a complex or integer parameter, or an option of the wrong type.

    Example:
        >>> from optim.rotated import ARO
        >>> _ = torch.manual_seed(0)
        >>> weight = torch.nn.Parameter(torch.randn(6, 4))
        >>> bias = torch.nn.Parameter(torch.zeros(6))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 6)
        >>> def loss_fn():
        ...     return ((x @ weight.T + bias - y) ** 2).mean()
        >>> opt = ARO([weight, bias], lr=0.02)
        >>> start = loss_fn().item()
        >>> for _ in range(20):
        ...     opt.zero_grad()
        ...     loss_fn().backward()
        ...     _ = opt.step()
        >>> loss_fn().item() < start
        True
        >>> state = opt.state[weight]
        >>> state["rotation"].shape  # the smaller side of the 6 x 4 weight
        torch.Size([4, 4])
    """

    options = {
        **COMMON_OPTIONS,
        "momentum": real(0.0, 1.0, low_inclusive=True),
        "nesterov": flag,
        "base": choice(*_ARO_BASES),
        "sinkhorn_iters": whole(1),
        "adjust_lr": choice(*_ARO_LR_ADJUSTMENTS),
        "rotate": choice(*_ARO_ROTATED_SIDES),
        "matrix": flag,
        "check_finite": flag,
    }

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        base: str = "sinkhorn",
        sinkhorn_iters: int = 5,
        adjust_lr: str = "fan_in",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        nesterov: bool = True,
        rotate: str = "smaller",
        matrix: bool = True,
        check_finite: bool = True,
        maximize: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(params, options_of(locals()))

    def _matrix_layout(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, StateSpec]:
        rows, cols = matrix_dims(param.shape)
        side = cols if _aro_transposes(rows, cols, group) else rows
        return {
            "step": integer(),
            "momentum": floating(rows, cols),
            "rotation": floating(side, side),
        }

    def _decomposes(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        return True  # the rotation's QR runs every step

    def _step_matrices(
        self, group: dict[str, Any], params: list[tuple[torch.Tensor, torch.Tensor]], plan: Any
    ) -> None:
        """The matrices of one shape step together, in batches of at most
        :data:`_ARO_BATCH_ELEMENTS` momentum entries (the official code's megabatches)."""
        batches: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for param, grad in params:
            momentum = self._started(param, group)["momentum"]
            key = (momentum.shape, momentum.dtype, momentum.device)
            batches.setdefault(key, []).append((param, grad))
        for (shape, _, _), pairs in batches.items():
            size = max(1, _ARO_BATCH_ELEMENTS // math.prod(shape))
            for start in range(0, len(pairs), size):
                self._step_batch(pairs[start : start + size], group)

    def _started(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``param``'s state, created on its first step: zero momentum, identity rotation."""
        state = self.state[param]
        if "step" not in state:
            rows, cols = as_matrix(param).shape
            dtype = state_dtype(param)
            state["step"] = torch.tensor(0, dtype=torch.int64)
            state["momentum"] = torch.zeros(rows, cols, dtype=dtype, device=param.device)
            side = cols if _aro_transposes(rows, cols, group) else rows
            state["rotation"] = torch.eye(side, dtype=dtype, device=param.device)
        return state

    def _step_batch(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]
    ) -> None:
        """One step of matrices whose momenta share shape, dtype and device, as one batch."""
        states = [self.state[param] for param, _ in pairs]
        torch._foreach_add_([state["step"] for state in states], 1)
        momenta = [state["momentum"] for state in states]
        grads = [as_matrix(grad).to(momentum.dtype) for (_, grad), momentum in zip(pairs, momenta)]
        torch._foreach_lerp_(momenta, grads, 1 - group["momentum"])

        rows, cols = momenta[0].shape
        base_map = _BASE_MAPS[group["base"]]
        iters = group["sinkhorn_iters"]
        tall = _aro_transposes(rows, cols, group)
        framed = torch.stack(momenta)
        if group["nesterov"]:
            framed = torch.stack(grads).lerp_(framed, group["momentum"])
        if tall:
            framed = framed.mT
        rotation = torch.stack([state["rotation"] for state in states])
        cross = framed @ base_map(_rank_bounded(rotation.mT @ framed), iters).mT
        rotation = signed_qr(unit_scaled(cross, (-2, -1))[0])[0]
        torch._foreach_copy_([state["rotation"] for state in states], list(rotation.unbind(0)))
        updates = rotation @ base_map(_rank_bounded(rotation.mT @ framed), iters)
        if tall:
            updates = updates.mT

        if group["adjust_lr"] == "fan_in":
            scale = 1.0 / math.sqrt(cols)
        elif group["adjust_lr"] == "rms_norm":
            scale = 0.2 * math.sqrt(max(rows, cols))
        elif group["adjust_lr"] == "spectral_norm":
            scale = math.sqrt(rows / cols)
        else:
            scale = 1.0
        for (param, _), update in zip(pairs, updates.unbind(0)):
            apply_update(
                param, update, lr=group["lr"], weight_decay=group["weight_decay"], factor=scale
            )


class RotatedAdam(_MatrixOrAdamW):
    r"""Full-rank Adam in a rotated basis of each weight matrix: fixed DCT or SOAP eigenbases.

    For :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G` and orthonormal bases
    :math:`Q_L \in \mathbb{R}^{m \times m}`, :math:`Q_R \in \mathbb{R}^{n \times n}`, one step at
    Adam step :math:`t` is AdamW on the rotated gradient:

    .. math::

        \hat G &= Q_L^\top G Q_R, \quad
        m \leftarrow \beta_1 m + (1-\beta_1)\hat G, \quad
        v \leftarrow \beta_2 v + (1-\beta_2)\hat G^2 \\
        W &\leftarrow W(1 - \eta\lambda) - \eta\, Q_L\,
            \frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}\, Q_R^\top

    with :math:`m, v` kept in the rotated basis.

    ``basis="dct"``: :math:`Q_L^\top = D_m`, :math:`Q_R^\top = D_n`, the orthonormal DCT-II, so
    :math:`\hat G = D_m G D_n^\top` is :func:`decomp.dct` along both dims (FFT for long sides, no
    :math:`n \times n` matrix) and the update is :func:`decomp.idct` along both. This is exactly
    AdamW run on the coordinates :math:`D_m W D_n^\top`. It is no published method (this
    library's experiment: a fixed rotation, where SOAP's adapts); use it as such. State:
    ``step``, ``exp_avg``, ``exp_avg_sq``; ``max_dim`` and ``update_gap`` do not apply.

    ``basis="eigen"`` (SOAP, ``nikhilvyas/SOAP``): Shampoo's statistics
    :math:`L \leftarrow \beta_s L + (1-\beta_s) G G^\top` and
    :math:`R \leftarrow \beta_s R + (1-\beta_s) G^\top G` (:math:`\beta_s` = ``shampoo_beta``)
    define the bases. The first step only accumulates :math:`L, R` and sets
    :math:`Q_L, Q_R` to their eigenvectors (``torch.linalg.eigh``, descending eigenvalues); it
    does **not** move the matrix (as SOAP, so the basis never depends on the gradient it rotates),
    and the Adam step count :math:`t` starts at the second step. Every later step does the Adam
    update above, then folds :math:`G` into :math:`L, R`, and every ``update_gap`` Adam steps
    refreshes each basis by one power iteration: sort :math:`Q`'s columns by the estimated
    eigenvalues :math:`\operatorname{diag}(Q^\top L Q)` (descending), permute :math:`v` the same
    way, :math:`Q \leftarrow \operatorname{qf}(L Q)` (Q factor, :math:`\operatorname{diag}(R_{qr})
    \ge 0`), and carry :math:`m` over exactly: :math:`m \leftarrow Q_L'^\top (Q_L m Q_R^\top) Q_R'`.
    A side longer than ``max_dim`` is not rotated (identity, no :math:`L` or :math:`R` kept).
    State: ``step`` (counting the first step), ``exp_avg``, ``exp_avg_sq`` and, per rotated side,
    ``gram_left``/``basis_left`` (:math:`m \times m`), ``gram_right``/``basis_right``
    (:math:`n \times n`).

    Differences from SOAP's code, by choice: the clean AdamW form above (SOAP adds ``eps`` to
    :math:`\sqrt{v}` before the bias correction and folds the correction into the step size), and
    decoupled weight decay applied before the update as ``torch.optim.AdamW`` (SOAP decays after
    it). No ``merge_dims``/``precondition_1d``/``normalize_grads``.

    1-D parameters, scalars and every parameter of a ``matrix=False`` group take
    ``torch.optim.AdamW`` steps with the group's options (both bases). Floating state is fp32 for
    fp16/bf16 weights.

    Defaults by basis: ``lr`` and ``betas`` left at ``None`` are resolved in each param group
    (given, added or loaded) from that group's ``basis``: ``"eigen"`` takes SOAP's lr 3e-3 and
    betas (0.95, 0.95) (so ``shampoo_beta=None`` is SOAP's 0.95 too), ``"dct"`` takes 1e-3 and
    (0.9, 0.999). A value given anywhere (constructor or group) wins; the group then holds the
    number, as LR schedulers expect. SOAP's weight decay 0.01 is not taken over: 0, as every
    optimizer here.

    Args:
        params: parameters or param groups (groups may override every option below).
        lr: step size :math:`\eta \ge 0`; ``None`` (default): 3e-3 for ``"eigen"``, 1e-3 for
            ``"dct"``.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``; ``None`` (default):
            ``(0.95, 0.95)`` for ``"eigen"``, ``(0.9, 0.999)`` for ``"dct"``.
        eps: :math:`\epsilon \ge 0` (default 1e-8).
        weight_decay: decoupled decay :math:`\lambda \ge 0` (default 0).
        basis: ``"dct"`` (default) or ``"eigen"``.
        update_gap: Adam steps between eigenbasis refreshes, ``>= 1`` (default 10; ``"eigen"``).
        shampoo_beta: EMA factor :math:`\beta_s \in [0, 1)` of :math:`L, R`; ``None`` (default)
            uses :math:`\beta_2` (``"eigen"``).
        max_dim: longest side that gets an eigenbasis, ``>= 1`` (default 10000; ``"eigen"``).
        matrix: ``False`` steps every parameter of the group with AdamW (embeddings, head;
            :func:`~optim.matrix_groups`).
        check_finite: ``"eigen"``: raise ``ValueError`` before anything changes if a gradient
            due for a basis computation (the first step's ``eigh``, a refresh's QR) has NaN/Inf,
            or if a Gram it decomposes is not finite (squared gradients beyond the dtype's range,
            about 1e19 / sqrt(n) in float32, or a NaN gradient folded in since the last refresh);
            one host sync per such step (default True). Between refreshes, and with ``"dct"``,
            non-finite gradients propagate as in ``torch.optim.Adam``.
        maximize: step along the gradient, as ``torch.optim.Adam`` (default False).
        fused: torch.optim's flag; only its default ``None`` (or ``False``) is accepted,
            anything else raises ``ValueError`` saying why.
        capturable: likewise; only ``False``.
        differentiable: likewise; only ``False``.

    ``lr`` may be a 1-element tensor (read as a number once per step). The first eigen step of
    every parameter computes all its eigenbases before any parameter is written, so a failing
    ``eigh`` (``check_finite=False`` with NaN) leaves the optimizer as it was.

    Raises:
        ValueError: an option out of range, an unknown ``basis`` or param-group key (with the
            nearest valid name), or, at a step or load, a state that does not fit its parameter.
        TypeError: a complex or integer parameter, or an option of the wrong type.

    Example:
        >>> from optim.rotated import RotatedAdam
        >>> _ = torch.manual_seed(0)
        >>> weight = torch.nn.Parameter(torch.randn(6, 4))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 6)
        >>> def loss_fn():
        ...     return ((x @ weight.T - y) ** 2).mean()
        >>> opt = RotatedAdam([weight], lr=0.05, basis="eigen", update_gap=5)
        >>> start = loss_fn().item()
        >>> for _ in range(20):
        ...     opt.zero_grad()
        ...     loss_fn().backward()
        ...     _ = opt.step()
        >>> loss_fn().item() < start
        True
        >>> state = opt.state[weight]
        >>> state["basis_left"].shape, state["basis_right"].shape
        (torch.Size([6, 6]), torch.Size([4, 4]))
    """

    options = {
        **COMMON_OPTIONS,
        "lr": optional(_learning_rate),
        "betas": optional(_adam_betas),
        "basis": choice(*_ROTATED_ADAM_BASES),
        "update_gap": whole(1),
        "shampoo_beta": optional(real(0.0, 1.0, low_inclusive=True)),
        "max_dim": whole(1),
        "matrix": flag,
        "check_finite": flag,
    }

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor | None = None,
        betas: tuple[float, float] | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        basis: str = "dct",
        update_gap: int = 10,
        shampoo_beta: float | None = None,
        max_dim: int = 10000,
        *,
        matrix: bool = True,
        check_finite: bool = True,
        maximize: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(params, options_of(locals()))

    @classmethod
    def _resolved_options(cls, group: Mapping[str, Any]) -> Mapping[str, Any]:
        """``lr`` and ``betas`` left at ``None`` take the defaults of the group's ``basis``."""
        basis = cls.options["basis"](group.get("basis"), "basis")
        missing = {
            key: value
            for key, value in _ROTATED_ADAM_DEFAULTS[basis].items()
            if group.get(key) is None
        }
        return {**group, **missing}

    def _matrix_layout(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, StateSpec]:
        shape = matrix_dims(param.shape)
        layout = {"step": integer(), "exp_avg": floating(*shape), "exp_avg_sq": floating(*shape)}
        if group["basis"] == "eigen":
            for side, size in zip(_SIDES, shape):
                if size <= group["max_dim"]:
                    layout[f"gram_{side}"] = floating(size, size)
                    layout[f"basis_{side}"] = floating(size, size)
        return layout

    def _state_value_problem(
        self, param: torch.Tensor, group: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> str | None:
        problem = super()._state_value_problem(param, group, state)
        eigen = group["basis"] == "eigen" and not self._takes_adamw(param, group)
        if problem is None and eigen and int(state["step"]) < 1:
            problem = "has 'step' = 0, expected >= 1 (the eigenbases exist after the first step)"
        return problem

    def _decomposes(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        """The first eigen step (``eigh``) and every ``update_gap``-th Adam step (a QR)."""
        if group["basis"] != "eigen":
            return False
        state = self.state.get(param)
        return not state or int(state["step"]) % group["update_gap"] == 0

    def _decomposition_inputs(
        self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]
    ) -> list[tuple[torch.Tensor, str]]:
        r"""The gradient, and the diagonals of the Grams this step decomposes.

        A Gram's diagonal bounds its other entries (:math:`|L_{ij}| \le \sqrt{L_{ii} L_{jj}}`),
        so checking it, in :math:`O(mn)` without forming :math:`G G^\top`, tells whether the
        accumulated Gram is finite: a finite gradient of about :math:`10^{19} / \sqrt{n}` or
        more in float32 overflows it (Adam's own moments fit up to about :math:`10^{19}`), and
        a NaN gradient folded in between two refreshes leaves it NaN; its basis would be NaN.
        """
        matrix = as_matrix(grad).to(state_dtype(param))
        state = self.state.get(param) or {}
        beta = _shampoo_beta(group)
        inputs = super()._decomposition_inputs(param, grad, group)
        for dim, (side, size) in enumerate(zip(_SIDES, matrix.shape)):
            if size > group["max_dim"]:
                continue
            squares = matrix.square().sum(1 - dim)
            gram = state.get(f"gram_{side}")
            diagonal = squares if gram is None else torch.lerp(gram.diagonal(), squares, 1 - beta)
            inputs.append((
                diagonal,
                f"the {side} Gram statistics of {{param}} are not finite in {matrix.dtype} at a "
                f"basis update: its squared gradients overflow the dtype (entries of about "
                f"1e19 / sqrt({matrix.shape[1 - dim]}) or more in float32), or a NaN/Inf "
                f"gradient was folded in since the last update; lower the loss scale, or clear "
                f"this parameter's state (optimizer.state[param].clear()) to restart it",
            ))
        return inputs

    def _prepare(
        self, group: dict[str, Any], params: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """The whole first-step state of every eigen parameter starting now (its ``eigh`` can
        fail), computed before any parameter is written."""
        if group["basis"] != "eigen":
            return {}
        return {
            param: _first_eigen_state(as_matrix(grad).to(state_dtype(param)), group)
            for param, grad in params
            if not self.state.get(param)
        }

    def _step_matrices(
        self,
        group: dict[str, Any],
        params: list[tuple[torch.Tensor, torch.Tensor]],
        plan: dict[torch.Tensor, dict[str, torch.Tensor]],
    ) -> None:
        for param, grad in params:
            if param in plan:
                self.state[param].update(plan[param])  # the first eigen step moves nothing
            else:
                self._matrix_step(param, grad, self.state[param], group)

    def _matrix_step(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        group: dict[str, Any],
    ) -> None:
        if group["basis"] == "dct":
            self._dct_step(param, grad, state, group)
        else:
            self._eigen_step(param, grad, state, group)

    @staticmethod
    def _dct_step(
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        group: dict[str, Any],
    ) -> None:
        dtype = state_dtype(param)
        if "step" not in state:
            state["step"] = torch.tensor(0, dtype=torch.int64)
            init_moments(
                state, torch.zeros(as_matrix(param).shape, dtype=dtype, device=param.device)
            )
        state["step"] += 1
        matrix = as_matrix(grad).to(dtype)
        rotated = dct(dct(matrix, dim=-1, check_finite=False), dim=0, check_finite=False)
        step = int(state["step"])
        ratio = adam_ratio(
            rotated, state["exp_avg"], state["exp_avg_sq"], step, group["betas"], group["eps"]
        )
        update = idct(idct(ratio, dim=0, check_finite=False), dim=-1, check_finite=False)
        apply_update(
            param,
            update,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            factor=1 / first_bias_correction(step, group["betas"]),
        )

    @staticmethod
    def _eigen_step(
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        group: dict[str, Any],
    ) -> None:
        matrix = as_matrix(grad).to(state_dtype(param))
        state["step"] += 1
        adam_steps = int(state["step"]) - 1
        ratio = adam_ratio(
            _to_basis(matrix, state),
            state["exp_avg"],
            state["exp_avg_sq"],
            adam_steps,
            group["betas"],
            group["eps"],
        )
        apply_update(
            param,
            _from_basis(ratio, state),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            factor=1 / first_bias_correction(adam_steps, group["betas"]),
        )
        _accumulate_grams(state, matrix, _shampoo_beta(group))
        if adam_steps % group["update_gap"] == 0:
            _refresh_bases(state)


def _first_eigen_state(matrix: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
    """SOAP's first step: zero moments, the Grams of ``matrix`` and their eigenbases."""
    state = {"step": torch.tensor(1, dtype=torch.int64)}
    init_moments(state, torch.zeros_like(matrix))
    for side, size in zip(_SIDES, matrix.shape):
        if size <= group["max_dim"]:
            state[f"gram_{side}"] = matrix.new_zeros(size, size)
    _accumulate_grams(state, matrix, _shampoo_beta(group))
    for side in _SIDES:
        if f"gram_{side}" in state:
            # The eigenvectors are scale-free; a unit-scale Gram keeps eigh clear of over/underflow.
            gram = unit_scaled(state[f"gram_{side}"], (-2, -1))[0]
            state[f"basis_{side}"] = torch.linalg.eigh(gram).eigenvectors.flip(-1)
    return state


def _shampoo_beta(group: dict[str, Any]) -> float:
    r""":math:`\beta_s`: ``shampoo_beta``, or :math:`\beta_2` when it is ``None``."""
    beta = group["shampoo_beta"]
    return group["betas"][1] if beta is None else beta


def _accumulate_grams(state: dict[str, torch.Tensor], grad: torch.Tensor, beta: float) -> None:
    r""":math:`L \leftarrow \beta L + (1-\beta) G G^\top` and :math:`R` with :math:`G^\top G`."""
    if "gram_left" in state:
        state["gram_left"].lerp_(grad @ grad.T, 1 - beta)
    if "gram_right" in state:
        state["gram_right"].lerp_(grad.T @ grad, 1 - beta)


def _to_basis(x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    r""":math:`Q_L^\top X Q_R`, with the identity on a side that has no basis."""
    if "basis_left" in state:
        x = state["basis_left"].T @ x
    if "basis_right" in state:
        x = x @ state["basis_right"]
    return x


def _from_basis(x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    r""":math:`Q_L X Q_R^\top`, the inverse of :func:`_to_basis`."""
    if "basis_left" in state:
        x = state["basis_left"] @ x
    if "basis_right" in state:
        x = x @ state["basis_right"].T
    return x


def _refresh_bases(state: dict[str, torch.Tensor]) -> None:
    """One sorted power-iteration step per basis; ``exp_avg`` rotated, ``exp_avg_sq`` permuted."""
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    unrotated_exp_avg = _from_basis(exp_avg, state)
    for dim, side in enumerate(_SIDES):
        if f"basis_{side}" not in state:
            continue
        basis = state[f"basis_{side}"]
        # Unit scale: L Q of a Gram near the dtype's largest numbers would overflow; the order
        # and the Q factor are scale-free.
        power = unit_scaled(state[f"gram_{side}"], (-2, -1))[0] @ basis
        estimated_eigenvalues = (basis * power).sum(dim=0)
        # stable: tied estimates (a zero gram) keep their order on every device.
        order = torch.argsort(estimated_eigenvalues, descending=True, stable=True)
        exp_avg_sq.copy_(exp_avg_sq.index_select(dim, order))
        basis.copy_(signed_qr(power[:, order])[0])
    exp_avg.copy_(_to_basis(unrotated_exp_avg, state))
