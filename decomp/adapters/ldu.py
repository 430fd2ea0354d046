r"""LoLDU: train the pivots and one scale of a frozen pivoted LDU factorisation of the weight.

The weight's matrix view :math:`M = W.\mathrm{reshape}(c_\mathrm{out}, -1)` (``(d_out, d_in)`` for a
linear layer, ``(c_out, c_in/groups * prod(kernel))`` for a conv) is factored by :func:`decomp.ldu`
as :math:`M = P L \operatorname{diag}(D) U`. LoLDU keeps :math:`P L_r` and :math:`U_r` frozen and
trains the ``r`` pivots :math:`z` and a scalar :math:`s`; see :class:`LDUParam`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from .._checks import check_choice, check_optional_int, check_real
from .._ldu import ldu
from .._deprecation import renamed_arguments
from .base import AdapterParam, fan_in, matrix_dims, matrix_view, option

# How scale=None sets s0: 1/sqrt(fan_in) (the first rule), or from the factors' norms
_SCALE_RULES = ("fan_in", "factors")
# The LoRA rank whose first step the factor rule matches (capped by r): a constant of the rule,
# which no config records, so it must not follow the adapters' default rank
_LORA_RANK = 8


@renamed_arguments(alpha="scale")
class LDUParam(AdapterParam):
    r"""LoLDU: :math:`W' = W + P L_r \operatorname{diag}(s z - s_0 z_0) U_r`, trainable pivots and scale.

    With :math:`M = P L \operatorname{diag}(D) U` the pivoted LDU factorisation
    (:func:`decomp.ldu`) of the weight's ``(shape[0], -1)`` matrix view, of shape
    :math:`m \times n`, and :math:`k = \min(m, n)`:

    .. math::

        \Delta W = P L_r \operatorname{diag}(s z - s_0 z_0) U_r,
        \qquad L_r = L_{:, :r},\; U_r = U_{:r, :},

    reshaped back to the weight's shape. Trainable: the pivots :math:`z \in \mathbb{R}^r`
    (initialised to :math:`z_0 = D_{:r}`) and the scale, parametrized relative to its start as
    :math:`s = s_0 (1 + t)` with :math:`s_0` the one-learning-rate rule (``scale_rule``) or
    :math:`c / r` (:math:`c` a number given as ``scale``, the official start), and the
    trainable ``relative_scale`` :math:`t`, initialised to 0 (the Parameter ``relative_scale``
    and the buffer ``initial_scale`` have shape ``(1,)``, as FSDP2 shards no 0-d parameter; the
    property ``scale`` is :math:`s`). The official code trains :math:`s` itself: an Adam step
    moves it by about ``lr`` whatever :math:`s_0` is, so with :math:`s_0 = 1/r` one step at lr
    0.1 took :math:`s` from 0.031 to 0.131 (:math:`\lVert \Delta W \rVert / \lVert W \rVert =
    0.43`) and one seed of three diverged. In :math:`t` the same step changes :math:`s` by the
    fraction ``lr`` of itself. Frozen buffers: ``left`` :math:`= P L_r` (``(m, r)``, the
    permutation applied as a row gather, so no :math:`m \times m` matrix is ever formed or
    stored: building on a 32000-row head needs :math:`O(m n)` memory, not 4 GB), ``right``
    :math:`= U_r` (``(r, n)``), :math:`z_0` and :math:`s_0`.

    This is the official code's residual form :math:`W_\mathrm{res} + s P L_r \operatorname{diag}(z)
    U_r` with :math:`W_\mathrm{res} = W - s_0 P L_r \operatorname{diag}(z_0) U_r`, written as an
    additive update of the frozen :math:`W`: the same function of :math:`(z, s)`, with the layer's
    stored weight left untouched. At init :math:`s_0 (1 + 0) z_0 = s_0 z_0` bit for bit, so
    :math:`\Delta W` is exactly zero and the layer reproduces the pretrained output exactly.

    Adapter files and state dicts saved before the scale was relative (key ``scale``, holding
    :math:`s`) still load: :meth:`upgrade_state` turns it into :math:`t = s / s_0 - 1`.

    **Trainable parameters:** :math:`r + 1`. **Cost:** :math:`\Delta W` is an :math:`m \times r
    \times n` product per forward, like a rank-``r`` LoRA merge. The branch (:meth:`branch`, a
    linear layer under :func:`decomp.adapters.apply`) adds :math:`4 r (m + n)` flops per token
    (forward and backward) and saves ``(..., r)`` numbers beside ``x``, where the weight path adds
    :math:`4 m n r + 2 T m n` per step of :math:`T` tokens: at the default :math:`r = m = n` the
    branch does fewer flops only while :math:`T < 2n/3`, but never holds an :math:`m \times n`
    matrix.

    Args:
        rank: number of pivots :math:`r` trained, an int in :math:`[1, k]`. ``None`` (default)
            trains all :math:`k = \min(m, n)` pivots, as the official ViT configuration does
            (rank 768 on 768-wide layers): the parameter count stays :math:`k + 1`, and a
            truncated rank only trains the pivots of the first ``r`` eliminated columns, which are
            not the "largest" in any sense. Pass a small rank to cut the :math:`O(mnr)` cost on
            wide layers. The default is lowered to keep :math:`r + 1` at most the weight's size;
            a ``(1, 1)`` weight (2 numbers for 1) raises ``ValueError``. An explicit ``rank`` is
            kept.
        scale: :math:`c`, a finite real > 0: the scale starts at :math:`s_0 = c / r`, the
            official code's ``alpha / rank`` (its ``from_linear``/``from_conv2d`` default is
            ``alpha = 1``; measured on the adapters benchmark's CNN, :math:`c = 1` stepped 3 to
            15 times less than LoRA r=8, issue 12). ``None`` (default) is the rule
            ``scale_rule``. ``alpha=`` is its deprecated name (same meaning;
            ``DeprecationWarning``).
        scale_rule: how ``scale=None`` sets :math:`s_0`. A first Adam step at lr :math:`\eta`
            moves every pivot by :math:`\pm\eta`, so :math:`\Delta W = s_0 \eta \sum_k \pm
            P L_k U_k` (plus :math:`s_0 \eta` times the rank-:math:`r` part of :math:`W`, from
            :math:`t`), of norm about :math:`s_0 \eta \sqrt{\sum_k \lVert L_k \rVert^2
            \lVert U_k \rVert^2}`; LoRA's (:math:`\alpha = r`) is :math:`\eta\sqrt{r_L m / 3}`.

            * ``"factors"`` (default): :math:`s_0 = \sqrt{r_L m / 3} / \sqrt{\sum_k \lVert L_k
              \rVert^2 \lVert U_k \rVert^2}`, :math:`r_L = \min(8, r)`, from the factors
              themselves: the first step is 0.96 to 1.12 times LoRA r=8's on linear and conv
              layers from 11 x 91 to 256 x 64 (``tests/contracts/first_step.py``). The total
              step is LoRA's, but one tiny pivot (an input column near zero) makes its term
              dominate the sum: then almost all of the step lies along that one direction and
              the other pivots move far less (measured on a 768 x 768 weight with one column
              times 1e-2: 96% of the step on one term, the rest 37 times below the rule's
              intent; ``"fan_in"`` stepped 481 times LoRA's there). ``ValueError`` where the
              factors' norms overflow float64.
            * ``"fan_in"``: :math:`s_0 = 1/\sqrt{n}`, which assumes the unit-triangular factors
              have entries of order 1. On a wide matrix :math:`U`'s rows carry
              :math:`1/\text{pivot}` and are long: the first step was 4.7 times LoRA's on an
              11 x 91 layer and 0.35 times on a 70 x 11 one (0.6 times on the benchmark's
              convs). Adapter files and peft configs saved before ``scale_rule`` existed load
              with it (adapter files store :math:`s_0`; peft's rebuild it and check it against
              its fingerprint).

    Raises:
        TypeError: ``rank`` is not an int (or ``None``) or ``scale`` is not a real number (or
            ``None``);
            both ``scale`` and its deprecated name ``alpha`` given.
        ValueError: ``rank < 1`` or ``scale <= 0``; on build, ``rank > min(m, n)``, the matrix
            view has a zero LU pivot (:func:`decomp.ldu` cannot factor it), or (``scale_rule=
            "factors"``) its factors' norms overflow float64.

    Differences from the official code (SKDDJ/LoLDU ``minloldu/loldu.py``): the permutation is
    folded into ``left`` instead of stored as a dense :math:`m \times m` parameter; ``U``'s
    diagonal is exactly 1 and a zero pivot raises instead of producing inf/NaN; the pretrained
    weight is not overwritten by the residual (the update form above is equivalent); the scale is
    trained as :math:`t` in :math:`s = s_0 (1 + t)`, not as :math:`s` (the same function class).

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Conv2d(4, 6, 3)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> before = layer(x)
        >>> _ = parametrize.register_parametrization(layer, "weight", LDUParam(rank=4))
        >>> torch.equal(layer(x), before)
        True
        >>> layer.parametrizations.weight[0].num_trainable(), LDUParam.trainable_count((6, 4, 3, 3), rank=4)
        (5, 5)
    """

    # Partial-pivoting LDU of the weight and scale / rank: no sign or seed to fix.
    rebuilt_buffers: ClassVar[tuple[str, ...]] = ("left", "right", "initial_pivots", "initial_scale")

    rank: int | None = option(None, check_optional_int, low=1)
    # the argument c; the attribute ``scale`` is the trainable Parameter _build creates from it
    # None: s0 by scale_rule (one learning rate); a number c: s0 = c / r (official)
    scale_argument: float | None = option(None, check_real, keyword="scale", optional=True, low=0.0)
    scale_rule: str = option("factors", check_choice, keyword_only=True, choices=_SCALE_RULES)
    saved_defaults: ClassVar[Mapping[str, Any]] = {"scale_rule": "fan_in"}

    def _rank(self, shape: tuple[int, ...]) -> int:
        return self._resolved_rank(
            shape, self.rank, high=min(matrix_dims(shape)), count=lambda r: r + 1, default=None
        )

    def _count(self, shape: tuple[int, ...]) -> int:
        """``r + 1``: the ``r`` pivots and the scale.

        Example:
            >>> LDUParam.trainable_count((16, 8)), LDUParam.trainable_count((16, 8, 3), rank=5)
            (9, 6)
        """
        return self._rank(shape) + 1

    def _build(self, weight: torch.Tensor) -> None:
        matrix = matrix_view(weight)
        m, n = matrix.shape
        rank = self._rank(tuple(weight.shape))
        try:
            # In float64: the factors are rebuilt from the weight when an adapter file is loaded
            # (rebuilt_buffers), and a float32 elimination's rounding depends on the BLAS thread
            # count enough (2.5e-3 relative on a 768 x 3072 weight) to fail that check elsewhere.
            perm, L, D, U = ldu(matrix.to(torch.float64), check_finite=False)
        except ValueError as error:
            raise ValueError(
                f"LDUParam cannot factor the weight's ({m}, {n}) matrix view: {error}. "
                f"Use another adapter (e.g. SVDParam) for this layer."
            ) from error
        if self.scale_argument is not None:
            start = self.scale_argument / rank
        elif self.scale_rule == "fan_in":
            start = 1 / math.sqrt(fan_in(weight.shape))
        else:
            # in float64, from the factors before their cast: rebuilt identically on load
            pivot_terms = float((L[:, :rank].pow(2).sum(0) * U[:rank].pow(2).sum(1)).sum())
            if not math.isfinite(pivot_terms):
                raise ValueError(
                    f"LDUParam's scale_rule='factors' is undefined for this ({m}, {n}) weight: its "
                    "LDU factors' norms overflow float64 (a pivot below about 1e-155). Pass scale= "
                    "or scale_rule='fan_in', or use another adapter (e.g. SVDParam) for this layer."
                )
            start = math.sqrt(min(_LORA_RANK, rank) * m / 3) / math.sqrt(pivot_terms)
        L, D, U = (factor.to(weight.dtype) for factor in (L, D, U))
        # P L_r as a row gather (L_r[perm], exactly the product): no m x m matrix is formed.
        self.register_buffer("left", L[perm, :rank])
        self.register_buffer("right", U[:rank].clone())
        self.register_buffer("initial_pivots", D[:rank].clone())
        # Shape (1,), not a 0-d scalar: FSDP2 (fully_shard) refuses 0-d parameters.
        initial_scale = torch.full((1,), start, dtype=weight.dtype, device=weight.device)
        self.register_buffer("initial_scale", initial_scale)
        self.pivots = nn.Parameter(self.initial_pivots.clone())
        self.relative_scale = nn.Parameter(torch.zeros_like(initial_scale))

    @property
    def scale(self) -> torch.Tensor:
        r"""The current scale :math:`s = s_0 (1 + t)`, shape ``(1,)`` (a function of ``relative_scale``)."""
        return self.initial_scale * (1 + self.relative_scale)

    def _coefficients(self, dtype: torch.dtype) -> torch.Tensor:
        r""":math:`s z - s_0 z_0`, shape ``(r,)``, in ``dtype``: what :meth:`delta` and
        :meth:`branch` put between :math:`P L_r` and :math:`U_r`."""
        initial_scale = self.initial_scale.to(dtype)
        # s0 (1 + 0) z0 - s0 z0 is exactly zero at init (1 + 0 and s0 * 1 are exact), so the
        # update is exactly zero too.
        scale = initial_scale * (1 + self.relative_scale.to(dtype))
        return scale * self.pivots.to(dtype) - initial_scale * self.initial_pivots.to(dtype)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        dtype = weight.dtype
        update = (self.left.to(dtype) * self._coefficients(dtype)) @ self.right.to(dtype)
        return update.reshape(weight.shape)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`x \Delta W^\top = ((x U_r^\top) \odot (s z - s_0 z_0)) (P L_r)^\top` (exactly zero
        at init)."""
        dtype = x.dtype
        return ((x @ self.right.to(dtype).T) * self._coefficients(dtype)) @ self.left.to(dtype).T

    def upgrade_state(self, state: dict[str, Any], prefix: str = "") -> None:
        r"""Rewrite, in ``state``, a scale saved before it was relative: key ``scale`` (holding
        :math:`s`) becomes ``relative_scale`` :math:`t = s / s_0 - 1`.

        :math:`s_0` is the ``initial_scale`` saved beside it when ``state`` holds one (the state
        overwrites this adapter's buffer with it, so :math:`t` must be relative to it, whatever
        :math:`s_0` this adapter was built with), else this adapter's own (from the config and
        shape); so the loaded layer computes the saved function up to one rounding of :math:`t`.
        A state that has ``relative_scale`` is left as it is.

        Example:
            >>> adapter = LDUParam.from_weight(torch.randn(3, 2, dtype=torch.float64), scale=1.0)
            >>> state = {"pivots": adapter.pivots.detach(), "scale": torch.tensor([1.0], dtype=torch.float64)}
            >>> adapter.upgrade_state(state)
            >>> sorted(state), state["relative_scale"]
            (['pivots', 'relative_scale'], tensor([1.], dtype=torch.float64))
        """
        old = state.get(prefix + "scale")
        if not isinstance(old, torch.Tensor) or prefix + "relative_scale" in state:
            return
        if not old.is_floating_point() or old.numel() != 1:
            return  # not a saved scale: the shape and key checks report it
        saved_start = state.get(prefix + "initial_scale")
        start = self.initial_scale
        if isinstance(saved_start, torch.Tensor) and saved_start.is_floating_point() and saved_start.numel() == 1:
            start = saved_start.reshape(1).to(self.initial_scale)
        del state[prefix + "scale"]
        relative = old.reshape(1).to(self.initial_scale.dtype) / start - 1
        state[prefix + "relative_scale"] = relative
