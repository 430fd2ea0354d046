r"""Param groups: a matrix optimizer on some weights, AdamW on the rest, in one optimizer.

:func:`param_groups` splits ``model.parameters()`` into the weights of the targeted
``nn.Linear``/``nn.Conv1d/2d/3d`` layers, which get ``rank`` and the given options, and the rest
(biases, norms, embeddings, untargeted layers), which gets ``rank=None``: plain AdamW in
:class:`~optim.ProjectedAdam`, :class:`~optim.DCTProjectedAdam` and :class:`~optim.SVDProjectedAdam`
(transformers' ``optim_target_modules``).

:func:`matrix_groups` is Muon's split (``MuonWithAuxAdam``): the hidden weight matrices in one
group, the embeddings, the output head and every 1-D parameter in an AdamW group
(``matrix=False``) with its own options; every optimizer here takes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from decomp._select import (
    SUPPORTED_LAYERS,
    ModuleSelector,
    matches,
    modules,
    output_layer,
    selector,
)

__all__ = ["matrix_groups", "param_groups"]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def param_groups(
    model: nn.Module, target: ModuleSelector, *, rank: int | float, **options: Any
) -> list[dict[str, Any]]:
    r"""Param groups that project the targeted layers' weights and step everything else as AdamW.

    The weight :math:`W` (shape ``(out, in)`` or ``(out, in/groups, *kernel)``) of every
    ``nn.Linear``/``nn.Conv1d/2d/3d`` that ``target`` matches goes into the first group, with
    ``rank`` and ``options``; every other parameter of ``model`` -- the targeted layers' biases,
    norms, embeddings, untargeted layers -- goes into a second group with ``rank=None`` and the
    optimizer's defaults. Each parameter is in exactly one group, once, in ``model.parameters()``
    order (a weight tied to another module's, such as an LM head tied to its embedding, goes
    with the group of its targeted holder). The second group is left out when it would be empty.

    ``target`` takes the forms of :func:`decomp.adapters.apply` and peft's ``target_modules``,
    matched against the qualified names of ``model.named_modules()``: a list of names (a module
    matches if its name is one of them or ends with ``"." + name``; every name must match), a
    regex string (``re.fullmatch``), ``"all-linear"`` (every ``nn.Linear`` except the output
    layer: ``model.get_output_embeddings()`` where that returns a module, else the last
    ``nn.Linear``/``nn.Conv1d/2d/3d``), or a callable ``(name, module) -> bool``. A matched module
    without a weight of its own (an activation, a container) is skipped. transformers'
    ``optim_target_modules`` differs in two places: its list names also match as substrings
    (``"proj"`` matches ``q_proj``) and its ``"all-linear"`` keeps the LM head.

    The groups suit the optimizers with a ``rank`` option. :class:`~optim.ARO` and
    :class:`~optim.RotatedAdam` refuse the ``rank`` key with ``ValueError``; give them
    :func:`matrix_groups`.

    Args:
        model: the network (names as its ``named_modules()`` gives them).
        target: which modules' weights to project (names, regex, ``"all-linear"`` or callable).
        rank: the targeted group's ``rank`` (an int, or a float in (0, 1]; checked by the
            optimizer).
        **options: further options of the targeted group (``update_gap``, ``scale``, ``lr``...),
            checked by the optimizer.

    Returns:
        ``[{"params": targeted, "rank": rank, **options}, {"params": rest, "rank": None}]``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``target`` of a wrong type (or a collection
            holding a non-string); a matched module with a weight is not
            ``nn.Linear``/``nn.Conv1d/2d/3d`` (e.g. ``nn.Embedding``).
        ValueError: ``target`` matches no layer weight; a ``target`` collection is empty or holds a
            name that matches no module; a string that is not a valid regex; ``rank=None``
            (nothing would be projected); ``options`` holds ``params``; a matched layer's weight
            is parametrized (an adapted layer: hand the optimizer its adapter's parameters).

    Example:
        >>> from optim import DCTProjectedAdam, param_groups
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> groups = param_groups(model, ["0"], rank=4, update_gap=50)
        >>> tuple((len(group["params"]), group["rank"]) for group in groups)
        ((1, 4), (3, None))
        >>> opt = DCTProjectedAdam(groups, lr=1e-3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if target is None:
        raise TypeError(
            "target must be a regex string, 'all-linear', a list of module names or a callable "
            "(name, module) -> bool, got None"
        )
    if rank is None:
        raise ValueError(
            "rank=None would step the targeted weights with AdamW too, so nothing is projected: "
            "pass an int or a fraction, or use torch.optim.AdamW(model.parameters())"
        )
    if "params" in options:
        raise ValueError("options must not hold 'params': param_groups chooses the parameters")
    entries = modules(model)
    is_target = selector(target, "target", model, entries)
    targeted: dict[int, torch.Tensor] = {}
    for entry in entries:
        if not matches(is_target, entry):
            continue
        if parametrize.is_parametrized(entry.module, "weight"):
            raise ValueError(
                f"target matched {entry.name!r}, whose weight is parametrized (an adapted layer?): "
                "its pretrained weight is not what trains; hand its adapter's parameters to the "
                "optimizer instead, or leave it out of target"
            )
        weight = entry.module._parameters.get("weight")
        if weight is None:
            continue  # activations and containers carry no weight to project
        if not isinstance(entry.module, SUPPORTED_LAYERS):
            raise TypeError(
                f"target matched {entry.name!r} of type {type(entry.module).__name__}; "
                "param_groups projects nn.Linear and nn.Conv1d/2d/3d weights"
            )
        targeted[id(weight)] = weight
    if not targeted:
        raise ValueError(
            f"target={target!r} matches no nn.Linear/nn.Conv1d/2d/3d weight of the model"
        )
    chosen = [param for param in model.parameters() if id(param) in targeted]
    rest = [param for param in model.parameters() if id(param) not in targeted]
    groups = [{"params": chosen, "rank": rank, **options}]
    if rest:
        groups.append({"params": rest, "rank": None})
    return groups


# torch.optim.AdamW's default: the AdamW group's lr where matrix_groups is given none.
_ADAMW_LR = 1e-3


def matrix_groups(
    model: nn.Module, *, adamw: dict[str, Any] | None = None, **options: Any
) -> list[dict[str, Any]]:
    r"""Muon's split: the hidden weight matrices in one group, AdamW for everything else.

    The first group holds every parameter of ``model`` with two or more dimensions (hidden
    ``nn.Linear`` and convolution weights, raw matrix parameters) except the embeddings
    (``nn.Embedding``/``nn.EmbeddingBag`` weights) and the output layer's parameters
    (``model.get_output_embeddings()`` where that returns a module, else the last
    ``nn.Linear``/``nn.Conv1d/2d/3d``), with ``options``; the second holds the rest (embeddings,
    head, biases, norm gains, scalars) with ``matrix=False`` and ``adamw``, so
    :class:`~optim.ARO`, :class:`~optim.RotatedAdam` and the projected optimizers step it as
    ``torch.optim.AdamW`` at its own lr. This is the recipe of Muon (``MuonWithAuxAdam``; the
    first group is what ``torch.optim.Muon``, which refuses 1-D parameters, takes) and of the
    official ARO and SOAP set-ups, and what the matrix optimizers' learning rates are tuned for:
    an embedding row sees a gradient only when its token occurs, and a rotation of a
    32000-row head costs 3.8 GiB. Each parameter is in exactly one group, once, in
    ``model.parameters()`` order (a head tied to its embedding goes to the AdamW group); the
    second group is left out when empty.

    Args:
        model: the network.
        adamw: options of the AdamW group (``lr``, ``betas``, ``weight_decay``...), checked by
            the optimizer; ``None``: the optimizer's defaults, but ``lr`` 1e-3
            (``torch.optim.AdamW``'s) where ``adamw`` names none: a matrix optimizer's own lr
            need not suit AdamW (``ARO``'s default 0.02 is on Muon's scale).
        **options: options of the matrix group (``lr``, ``rank``...), checked by the optimizer.

    Returns:
        ``[{"params": hidden, **options}, {"params": rest, "matrix": False, "lr": 1e-3, **adamw}]``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``adamw`` is not a dict.
        ValueError: the model has no hidden matrix, or ``options``/``adamw`` hold ``params`` or
            ``matrix`` (the function sets them).

    Example:
        >>> from optim import ARO, matrix_groups
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
        ...     torch.nn.Linear(8, 10))
        >>> groups = matrix_groups(model, lr=2e-2, adamw={"lr": 3e-4})
        >>> [len(group["params"]) for group in groups], groups[1]["matrix"]
        ([1, 6], False)
        >>> opt = ARO(groups)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if adamw is None:
        adamw = {}
    if not isinstance(adamw, dict):
        raise TypeError(f"adamw must be a dict of options or None, got {type(adamw).__name__}")
    for where, given in (("options", options), ("adamw", adamw)):
        clash = sorted({"params", "matrix"} & set(given))
        if clash:
            raise ValueError(f"{where} must not hold {clash}: matrix_groups sets them")
    head = output_layer(model)
    excluded = {
        id(param)
        for module in model.modules()
        if isinstance(module, _EMBEDDINGS) or module is head
        for param in module.parameters()
    }
    hidden = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in excluded]
    if not hidden:
        raise ValueError(
            "the model has no hidden matrix (every 2-D+ parameter is an embedding or the output "
            "layer): use torch.optim.AdamW(model.parameters())"
        )
    chosen = {id(param) for param in hidden}
    rest = [param for param in model.parameters() if id(param) not in chosen]
    groups = [{"params": hidden, **options}]
    if rest:
        groups.append({"params": rest, "matrix": False, "lr": _ADAMW_LR, **adamw})
    return groups
