r"""The optimizer inside accelerate's and transformers' wrappers, and ``consolidate`` through them.

``accelerator.prepare(optimizer)`` returns accelerate's ``AcceleratedOptimizer``, and
transformers' ``Trainer`` keeps that wrapper as ``trainer.optimizer``. The wrapper forwards the
``torch.optim.Optimizer`` interface (``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``,
``param_groups``, ``state``) to the optimizer it holds as ``.optimizer``, but no method of that
optimizer's own: in accelerate 1.16, ``accelerator.prepare(opt).consolidate()`` raises
``AttributeError``.
:func:`consolidate` reaches the method through any chain of such wrappers.

Neither accelerate nor transformers is imported here: the wrappers are recognised by their
``.optimizer`` attribute.
"""

from __future__ import annotations

import torch

__all__ = ["consolidate", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside wrappers that hold it as ``.optimizer`` (accelerate, transformers).

    Follows ``optimizer.optimizer`` while that is a ``torch.optim.Optimizer``: accelerate's
    ``AcceleratedOptimizer`` (what ``accelerator.prepare`` and transformers' ``Trainer`` hand
    out) and wrappers of wrappers. An unwrapped optimizer is returned as it is.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``; the chain of wrappers loops.

    Example:
        >>> from optim import DCTProjectedAdam
        >>> from optim import unwrap_optimizer
        >>> opt = DCTProjectedAdam([torch.nn.Parameter(torch.zeros(4, 4))], rank=2)
        >>> unwrap_optimizer(opt) is opt
        True
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    seen = {id(optimizer)}
    # A plain optimizer's attributes live in __dict__; a property named "optimizer" does not count.
    while isinstance(inner := vars(optimizer).get("optimizer"), torch.optim.Optimizer):
        if id(inner) in seen:
            raise TypeError(
                f"{type(optimizer).__name__}.optimizer leads back to a wrapper already seen"
            )
        seen.add(id(inner))
        optimizer = inner
    return optimizer


def consolidate(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    r"""``consolidate()`` of the optimizer inside accelerate's or transformers' wrapper.

    Ends a continual-learning task (:meth:`optim.ProjectedAdam.consolidate`): in every
    ``protect=True`` group, the dominant directions of the task's updates are appended to the
    orthonormal protected basis :math:`B` of each weight, and later gradients and updates
    :math:`X` are projected off it, :math:`X \leftarrow X - X B B^\top` (:mod:`optim.continual`).

    Args:
        optimizer: a :class:`~optim.ProjectedAdam` (``DCTProjectedAdam``, ``SVDProjectedAdam``),
            plain or as ``accelerator.prepare`` / ``Trainer.optimizer`` wrap it.

    Returns:
        The number of protected directions per parameter shape, as ``consolidate()`` returns it.

    Raises:
        TypeError: the wrapped optimizer has no ``consolidate`` method (AdamW, ARO,
            RotatedAdam), or ``optimizer`` is not a ``torch.optim.Optimizer``.

    Example:
        >>> from optim import DCTProjectedAdam
        >>> from optim import consolidate
        >>> weight = torch.nn.Parameter(torch.randn(8, 8))
        >>> opt = DCTProjectedAdam([weight], rank=2, protect=True)
        >>> weight.grad = torch.randn(8, 8)
        >>> opt.step()
        >>> counts = consolidate(opt)  # the same call for accelerator.prepare(opt)
        >>> sorted(counts)
        ['(8, 8)']
    """
    inner = unwrap_optimizer(optimizer)
    method = getattr(inner, "consolidate", None)
    if not callable(method):
        wrapped = "" if inner is optimizer else f" (inside {type(optimizer).__name__})"
        raise TypeError(
            f"{type(inner).__name__}{wrapped} has no consolidate(): continual learning needs a "
            "ProjectedAdam, DCTProjectedAdam or SVDProjectedAdam with protect=True groups"
        )
    return method()
