"""Default budgets that never train more numbers than the weight they adapt.

An adapter's budget left at its default (``None``) resolves, per weight shape, to the largest
candidate whose trainable count is at most the weight's size: an adapter exists to train fewer
numbers than the layer, and on small layers (a 13x7 linear, a ``(1, n)`` head) the unclamped
default would train more than fine-tuning the layer in full. An explicit budget is the user's
choice and is kept as given (its own range checks still apply).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

Budget = TypeVar("Budget")


def default_budget(
    owner: str,
    option: str,
    shape: Sequence[int],
    candidates: Iterable[Budget],
    count: Callable[[Budget], int],
    describe: Callable[[Budget], str] | None = None,
) -> Budget:
    """The first of ``candidates`` (largest budget first) whose ``count`` fits a weight of ``shape``.

    Raises ``ValueError`` naming the layer shape and what to do when even the last (smallest)
    candidate trains more numbers than the weight holds; ``describe`` words a candidate in that
    message (default ``"{option}={candidate!r}"``).

    Example:
        >>> default_budget("LoRA", "rank", (13, 7), range(8, 0, -1), lambda r: r * (13 + 7))
        4
    """
    size = math.prod(shape)
    smallest = None
    for candidate in candidates:
        smallest = candidate
        if count(candidate) <= size:
            return candidate
    if smallest is None:
        needed = "no budget"
    else:
        worded = describe(smallest) if describe is not None else f"{option}={smallest!r}"
        needed = f"{worded} trains {count(smallest)} numbers"
    raise ValueError(
        f"{owner}'s default {option} does not fit a weight of shape {tuple(shape)}: {needed}, more "
        f"than the {size} of the weight itself. Pass an explicit {option}= to adapt it anyway, or "
        "train this layer in full (leave it out of the adapter's target and train its weight)"
    )
