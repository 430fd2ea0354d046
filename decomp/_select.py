"""Which modules of a network a ``target`` names: one matcher for ``decomp.adapters`` and ``optim``.

``decomp.adapters.apply`` (``target``, ``train_heads``) and ``optim.param_groups`` (``target``)
accept the forms of peft's ``target_modules`` and read them here, so one ``target`` names the same
modules in both. Private: the public documentation of the forms is :func:`decomp.adapters.apply`.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, NamedTuple, Union

from torch import nn

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ALL_LINEAR = "all-linear"

ModuleSelector = Union[
    str, list[str], tuple[str, ...], set[str], frozenset[str], Callable[[str, nn.Module], bool]
]


class Module(NamedTuple):
    """A module of the model, its first qualified name and every name it is reachable under."""

    name: str
    module: nn.Module
    aliases: tuple[str, ...]


def modules(root: nn.Module) -> list[Module]:
    """Every module of ``root`` once, in ``named_modules()`` order, with all its names."""
    names: dict[int, list[str]] = {}
    found: dict[int, nn.Module] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        found[id(module)] = module
    return [Module(aliases[0], found[key], tuple(aliases)) for key, aliases in names.items()]


def output_layer(root: nn.Module) -> nn.Module | None:
    """The layer that computes the model's output, which the default targets leave out.

    A model with ``get_output_embeddings()`` returning a module (a transformers language model:
    its LM head) has that module; any other model has its last ``nn.Linear``/``nn.Conv1d/2d/3d``
    in ``named_modules()`` order (the order the layers were assigned in ``__init__``: a
    classifier such as torchvision's ``fc`` or ``heads.head``, transformers' ``classifier``, the
    last layer of an ``nn.Sequential``). None: the model has no such layer.
    """
    get_output_embeddings = getattr(root, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        found = get_output_embeddings()
        if isinstance(found, nn.Module):
            return found
    layers = [module for module in root.modules() if isinstance(module, SUPPORTED_LAYERS)]
    return layers[-1] if layers else None


def name_matches(module_name: str, names: Iterable[str]) -> bool:
    """peft's ``target_modules`` list rule: the qualified name is a name or ends with ``.name``."""
    return any(module_name == name or module_name.endswith("." + name) for name in names)


def selector(
    selector: ModuleSelector | None, argument: str, root: nn.Module, modules: list[Module]
) -> Callable[[str, nn.Module], bool] | None:
    """``target``/``train_heads`` as a predicate ``(name, module) -> bool`` (None stays None)."""
    if selector is None or callable(selector):
        return selector
    if isinstance(selector, str):
        if selector.lower() == ALL_LINEAR:
            head = output_layer(root)
            return lambda module_name, module: isinstance(module, nn.Linear) and module is not head
        try:
            pattern = re.compile(selector)
        except re.error as error:
            raise ValueError(f"{argument}={selector!r} is not a valid regex ({error})") from error
        return lambda module_name, module: pattern.fullmatch(module_name) is not None
    if isinstance(selector, (list, tuple, set, frozenset)):
        names = list(selector)
        wrong = [name for name in names if not isinstance(name, str)]
        if wrong:
            raise TypeError(
                f"{argument} as a collection must hold module names (str), got {wrong!r}"
            )
        if not names:
            raise ValueError(
                f"{argument} is an empty {type(selector).__name__}: name the modules to match, "
                f"or leave {argument} out"
            )
        unmatched = [
            name
            for name in names
            if not any(name_matches(alias, [name]) for entry in modules for alias in entry.aliases)
        ]
        if unmatched:
            raise ValueError(
                f"{argument} names {unmatched} match no module of the model (a name matches a "
                "module whose qualified name is the name or ends with '.' + name, as peft's "
                "target_modules; write a regex string for patterns)"
            )
        frozen = frozenset(names)
        return lambda module_name, module: name_matches(module_name, frozen)
    raise TypeError(
        f"{argument} must be a regex string, 'all-linear', a list of module names, "
        f"a callable (name, module) -> bool, or None, got {type(selector).__name__}"
    )


def matches(selector: Callable[[str, nn.Module], bool] | None, entry: Module) -> bool:
    """Whether ``selector`` matches the module under any of its names (None matches nothing)."""
    return selector is not None and any(selector(alias, entry.module) for alias in entry.aliases)
