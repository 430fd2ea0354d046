r"""Export an adapted model as a plain one, without touching it: :func:`merged_state_dict`.

The trap it avoids: ``torch.nn.utils.parametrize`` moves an adapted layer's pretrained weight to
``<layer>.parametrizations.weight.original`` and adds the adapter's tensors beside it, so
``model.state_dict()`` of an adapted model has no ``<layer>.weight`` key at all. Loading it into a
plain copy of the architecture with ``strict=False`` -- or ``save_pretrained`` followed by
``from_pretrained`` in transformers, which only warns about "unexpected" and "missing" keys --
silently leaves every adapted weight at its fresh initialisation. :func:`merge` avoids it by
removing the adapters in place; :func:`merged_state_dict` gives the same plain keys and merged
values while the model keeps training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import AdapterParam
from .model import _holders, _other_holders, _unwrap

__all__ = ["merged_state_dict"]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    r"""``model.state_dict()`` as the unadapted architecture has it, with every update merged.

    For each adapted layer the keys ``<layer>.parametrizations.weight.original`` and
    ``<layer>.parametrizations.weight.<i>.*`` are replaced, at the same position, by one key
    ``<layer>.weight`` holding :math:`W' = \mathrm{compose}(W, \Delta W)` -- exactly what the
    layer computes with (the value of ``layer.weight``), detached, in the weight's dtype and on its
    device. Every other entry (biases, unadapted layers, buffers) is ``model.state_dict()``'s own.
    The model is not modified: its adapters stay registered and trainable. A model wrapped by
    ``torch.compile``, ``nn.DataParallel`` or ``DistributedDataParallel`` gives the keys of the
    model inside (no ``_orig_mod.``/``module.`` prefix), as the adapter helpers name its layers.

    The result loads with ``strict=True`` into a plain copy of the architecture, and is what to
    hand to transformers' ``save_pretrained(path, state_dict=merged_state_dict(model))``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a parametrized ``weight`` mixes an adapter with another parametrization
            (``weight_norm``, ``spectral_norm``): the plain architecture would store that one's
            own tensors, not a merged weight; or an adapted layer's pretrained weight is shared
            with another module (an adapter registered by hand on a tied weight, which
            :func:`apply` refuses): the plain architecture ties the two again, so loading would
            write one value into both.

    Example:
        >>> from decomp.adapters import LieParam, apply, merged_state_dict
        >>> model = apply(torch.nn.Sequential(torch.nn.Linear(4, 3)), LieParam, ["0"])
        >>> sorted(merged_state_dict(model))
        ['0.bias', '0.weight']
        >>> plain = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> plain.load_state_dict(merged_state_dict(model))
        <All keys matched successfully>
    """
    model = _unwrap(model, "merged_state_dict")
    holders = _holders(model)
    merged: dict[str, torch.Tensor] = {}
    # Every name of a module reused under several names: state_dict() lists it under each.
    for name, module in model.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        chain = module.parametrizations.weight
        adapters = [item for item in chain if isinstance(item, AdapterParam)]
        if not adapters:
            continue
        if len(adapters) != len(chain):
            others = [type(item).__name__ for item in chain if not isinstance(item, AdapterParam)]
            raise ValueError(
                f"layer {name!r} has an adapter and other parametrizations of its weight "
                f"({others}); merged_state_dict only merges adapters"
            )
        tied = _other_holders(holders, chain.original, chain, "original")
        if tied:
            raise ValueError(
                f"layer {name!r} is adapted on a weight it shares with {', '.join(map(repr, tied))} "
                "(tied weights): a plain copy of the architecture ties them again and would load "
                f"one value into both, losing either the update of {name!r} or the other's "
                "weight; merge(model) unties them in place (the layer gets a merged weight of its "
                "own), for an architecture without that tie"
            )
        with torch.no_grad():
            merged[f"{name}." if name else ""] = module.weight.detach()

    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        head, marker, _ = key.partition("parametrizations.weight.")
        owner = head if marker else key[: key.rfind(".") + 1]
        if owner in merged:
            # torch's layers register weight before bias: the merged weight comes first.
            state.setdefault(f"{owner}weight", merged[owner])
            if marker:
                continue
        state[key] = value
    return state
