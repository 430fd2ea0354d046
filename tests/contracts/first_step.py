"""The first AdamW step of an adapter against a LoRA r=8 step on the same weight (issue 12).

The one-learning-rate rule (``docs/adapters/index.md``) scales every default adapter so that the
AdamW learning rate that suits LoRA suits it too; its measurable form is the first step. On a
weight with entries of RMS :math:`1/\\sqrt{n}` and the loss :math:`\\langle W', R \\rangle`, one
AdamW step moves LoRA (:math:`\\alpha = r = 8`, Kaiming-uniform :math:`A`, :math:`B = 0`) by
:math:`\\eta\\sqrt{8 d_{out}/3}` in norm; :func:`first_step_over_loras` is the adapter's
:math:`\\lVert W'_1 - W'_0 \\rVert` over that, with :math:`R` a Gaussian (``"iid"``) or a rank-one
product (``"rank1"``: the structure of a one-example gradient);
:func:`median_first_step_over_loras` is the median over both kinds and two seeds.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from decomp.adapters import AdapterParam

LORA_RANK = 8


def _gradient(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "iid":
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    rows = torch.randn(shape[0], 1, generator=generator, dtype=torch.float64)
    columns = torch.randn(1, math.prod(shape[1:]), generator=generator, dtype=torch.float64)
    return (rows @ columns).reshape(shape)


def _step_norm(parameters: list[torch.Tensor], forward: Callable[[], torch.Tensor], direction: torch.Tensor) -> float:
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.0)
    with torch.no_grad():
        before = forward()
    (forward() * direction).sum().backward()
    optimizer.step()
    with torch.no_grad():
        return float((forward() - before).norm())


def first_step_over_loras(
    factory: Callable[[], AdapterParam], shape: tuple[int, ...], kind: str = "iid", seed: int = 0
) -> float:
    """The adapter's first AdamW step (lr 1e-3) over LoRA r=8's, both on one float64 weight."""
    generator = torch.Generator().manual_seed(seed)
    n = math.prod(shape[1:])
    weight = torch.randn(shape, generator=generator, dtype=torch.float64) / math.sqrt(n)
    direction = _gradient(shape, kind, generator)
    lora_a = (torch.rand(LORA_RANK, n, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(n)
    lora_b = torch.zeros(shape[0], LORA_RANK, dtype=torch.float64, requires_grad=True)
    lora = _step_norm([lora_b], lambda: (lora_b @ lora_a).reshape(shape), direction)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        adapter = factory()
        adapter.right_inverse(weight)
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    return _step_norm(trainable, lambda: adapter(weight), direction) / lora


def median_first_step_over_loras(factory: Callable[[], AdapterParam], shape: tuple[int, ...]) -> float:
    """The median of :func:`first_step_over_loras` over an iid and a rank-one gradient, two seeds
    each (the mean of the middle two of the four)."""
    steps = sorted(first_step_over_loras(factory, shape, kind, seed) for kind in ("iid", "rank1") for seed in (0, 1))
    return (steps[1] + steps[2]) / 2
