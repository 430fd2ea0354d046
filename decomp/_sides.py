r"""The matrix view of a weight shape and the side rule: which orientation of an :math:`m \times n`
matrix puts its smaller side where a method wants it.

Sketching, projecting or rotating the smaller side keeps a method's work and memory at
:math:`O(\min(m, n))` per column instead of :math:`O(\max(m, n))`. :func:`decomp.rsvd` and the
projected optimizers want the smaller side last (the tall orientation, :math:`m \ge n`); ARO's
rotation wants it first. A square matrix is never transposed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    r"""The matrix view's dimensions :math:`(d_0, \prod_{j \ge 1} d_j)` of a weight ``shape``.

    A linear weight is its own view, ``(d_out, d_in)``; a conv weight is
    ``(c_out, c_in/groups * prod(kernel))``, one row per output channel. From the shape alone, so
    an N-D DTensor needs no (dispatched) reshape.

    Example:
        >>> matrix_dims((64, 32)), matrix_dims((64, 16, 3, 3))
        ((64, 32), (64, 144))
    """
    return shape[0], math.prod(shape[1:])


def transposes(rows: int, cols: int, smaller: str = "cols") -> bool:
    r"""Whether an ``(rows, cols)`` matrix must be transposed for its smaller side to be ``smaller``.

    With :math:`(m, n)` = ``(rows, cols)``: ``smaller="cols"`` (the tall orientation, the
    smaller side last) transposes exactly when :math:`m < n`; ``smaller="rows"`` (the wide
    orientation) exactly when :math:`m > n`. After the transpose the chosen side has length
    :math:`\min(m, n)`; ties (:math:`m = n`) are never transposed.

    Args:
        rows: the number of rows :math:`m \ge 0`.
        cols: the number of columns :math:`n \ge 0`.
        smaller: ``"cols"`` or ``"rows"``, the side that must end up the smaller one.

    Raises:
        ValueError: ``smaller`` is neither ``"cols"`` nor ``"rows"``.

    Example:
        >>> transposes(3, 8), transposes(8, 3), transposes(4, 4)
        (True, False, False)
        >>> transposes(8, 3, smaller="rows")
        True
    """
    if smaller == "cols":
        return rows < cols
    if smaller == "rows":
        return rows > cols
    raise ValueError(f"smaller must be 'cols' or 'rows', got {smaller!r}")
