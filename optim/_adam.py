r"""The Adam arithmetic every optimizer of :mod:`optim` shares, on full or projected gradients.

One formula (``torch.optim.AdamW``'s): decoupled weight decay before the update, then

.. math::

    m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
    u = \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}.

The projected and rotated optimizers compute :math:`q = m / (\sqrt{v / (1-\beta_2^t)} +
\epsilon)` (:func:`adam_ratio`) in a subspace or a rotated basis, map it back (a linear map) and
fold :math:`1/(1-\beta_1^t)`, with any scale of theirs, into the step size of
:func:`apply_update`: the same :math:`u`, two elementwise passes fewer per matrix. Parameters they
do not handle (1-D ones, say) take :func:`adamw_steps`, ``torch.optim.AdamW``'s step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from decomp._checks import compute_dtype

__all__ = [
    "adam_denominators",
    "adam_ratio",
    "adamw_step",
    "adamw_steps",
    "apply_update",
    "first_bias_correction",
    "init_moments",
]


def init_moments(state: dict[str, torch.Tensor], like: torch.Tensor) -> None:
    """Zero first and second moments shaped like ``like`` (in its dtype and device)."""
    state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)


def _update_moments(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, betas: tuple[float, float]
) -> None:
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _denominator(exp_avg_sq: torch.Tensor, step: int, beta2: float, eps: float) -> torch.Tensor:
    r""":math:`\sqrt{v / (1-\beta_2^t)} + \epsilon`, in torch.optim.AdamW's order of operations."""
    return (exp_avg_sq.sqrt() / ((1 - beta2**step) ** 0.5)).add_(eps)


def first_bias_correction(step: int, betas: tuple[float, float]) -> float:
    r""":math:`1 - \beta_1^t`, which divides :func:`adam_ratio` to give Adam's direction."""
    return 1 - betas[0] ** step


def adam_ratio(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
    r"""Update the moments in place with ``grad`` and return
    :math:`q = m / (\sqrt{v / (1-\beta_2^t)} + \epsilon)`: Adam's direction times
    :math:`1 - \beta_1^t` (:func:`first_bias_correction`).

    ``step`` is the number of moment updates including this one (:math:`t \ge 1`). ``grad``,
    ``exp_avg`` and ``exp_avg_sq`` share one shape and dtype (the state dtype).

    Example:
        >>> m, v = torch.zeros(2), torch.zeros(2)
        >>> adam_ratio(torch.tensor([2.0, -3.0]), m, v, 1, (0.9, 0.999), 0.0)  # 0.1 sign(g)
        tensor([ 0.1000, -0.1000])
    """
    _update_moments(grad, exp_avg, exp_avg_sq, betas)
    return exp_avg / _denominator(exp_avg_sq, step, betas[1], eps)


def adam_denominators(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    betas: tuple[float, float],
    eps: float,
) -> list[torch.Tensor]:
    r"""Update the moments in place and return the denominators
    :math:`\sqrt{v / (1-\beta_2^t)} + \epsilon`, over lists with multi-tensor kernels: the same
    kernels in the same order as :func:`adam_ratio` per tensor (its ratio is
    ``torch._foreach_div(exp_avgs, denominators)``) and as ``torch.optim.AdamW``."""
    beta1, beta2 = betas
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**step) ** 0.5 for step in steps])
    torch._foreach_add_(denoms, eps)
    return list(denoms)


def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One ``torch.optim.AdamW`` step of ``param`` (state initialised on first use)."""
    _start_adamw(state, param)
    state["step"] += 1
    step = int(state["step"])
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    _update_moments(grad.to(exp_avg.dtype), exp_avg, exp_avg_sq, betas)
    denom = _denominator(exp_avg_sq, step, betas[1], eps)
    # torch.optim.AdamW's exact sequence (addcdiv with lr / bc1), so the fallback is bitwise AdamW.
    with _in_dtype(param, exp_avg.dtype, lr=lr, weight_decay=weight_decay) as target:
        target.addcdiv_(exp_avg, denom, value=-lr / first_bias_correction(step, betas))


def _start_adamw(state: dict[str, torch.Tensor], param: torch.Tensor) -> None:
    """A zero step counter and zero moments in the compute dtype, unless ``state`` has them."""
    if "step" not in state:
        state["step"] = torch.tensor(0, dtype=torch.int64)
        init_moments(state, torch.zeros_like(param, dtype=compute_dtype(param.dtype)))


def adamw_steps(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    foreach: bool = True,
) -> None:
    """:func:`adamw_step` of every ``(param, grad, state)``; with ``foreach``, multi-tensor kernels
    for the parameters in their state dtype (``torch.optim.AdamW``'s foreach sequence, the same
    kernels in the same order, so bitwise its single-tensor result on the CPU) and fp16/bf16
    parameters, whose moments are fp32, one by one."""
    batched = []
    for param, grad, state in zip(params, grads, states):
        if foreach and param.dtype == compute_dtype(param.dtype):
            batched.append((param, grad, state))
        else:
            adamw_step(param, grad, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if not batched:
        return
    for param, _, state in batched:
        _start_adamw(state, param)
    targets, moving, moved = (list(column) for column in zip(*batched))
    torch._foreach_add_([state["step"] for state in moved], 1)
    steps = [int(state["step"]) for state in moved]
    exp_avgs = [state["exp_avg"] for state in moved]
    exp_avg_sqs = [state["exp_avg_sq"] for state in moved]
    denoms = adam_denominators(moving, exp_avgs, exp_avg_sqs, steps, betas, eps)
    if weight_decay:
        torch._foreach_mul_(targets, 1 - lr * weight_decay)
    step_sizes = [-lr / first_bias_correction(step, betas) for step in steps]
    torch._foreach_addcdiv_(targets, exp_avgs, denoms, step_sizes)


def apply_update(
    param: torch.Tensor,
    direction: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    factor: float = 1.0,
) -> None:
    r""":math:`W \leftarrow W (1 - \eta\lambda) - \eta\, c\, U` (``factor`` :math:`c`), computed in
    the state dtype; ``direction`` :math:`U` is reshaped to the parameter's shape."""
    if direction.shape != param.shape:  # a reshape costs a dispatch even when it is a view
        direction = direction.reshape(param.shape)
    if param.dtype == direction.dtype:  # what _in_dtype does, without its generator (hot path)
        if weight_decay:
            param.mul_(1 - lr * weight_decay)
        param.add_(direction, alpha=-lr * factor)
        return
    with _in_dtype(param, direction.dtype, lr=lr, weight_decay=weight_decay) as target:
        target.add_(direction, alpha=-lr * factor)


@contextlib.contextmanager
def _in_dtype(
    param: torch.Tensor, dtype: torch.dtype, *, lr: float, weight_decay: float
) -> Iterator[torch.Tensor]:
    r"""``param`` in ``dtype``, already decayed by :math:`1 - \eta\lambda`.

    ``param`` itself when the dtypes agree; else an fp32 copy of the half weight, written back on
    exit.
    """
    target = param if param.dtype == dtype else param.to(dtype)
    if weight_decay:
        target.mul_(1 - lr * weight_decay)
    yield target
    if target is not param:
        param.copy_(target)
