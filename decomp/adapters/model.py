r"""Model-level helpers: adapt a network, list and report its trainable tensors, merge, save, load.

* :func:`apply` registers an adapter on every targeted ``nn.Linear``/``nn.Conv1d/2d/3d`` and
  freezes everything else (all or nothing: a failure leaves the model untouched).
* :func:`trainable_parameters` -- what to hand to the optimizer.
* :func:`report` -- a per-layer table of trainable and frozen parameters.
* :func:`merge` -- bake every update into a plain weight for deployment.
* :func:`adapter_state_dict`, :func:`save_adapter`, :func:`load_adapter` -- adapter-only
  checkpoints (a safetensors file whose metadata names the layers, adapter classes, configs and
  weight shapes, checked on load).

Adapted layers keep working after ``copy.deepcopy``: :func:`apply` gives every copy its own
parametrized class (``torch.nn.utils.parametrize`` shares one injected class between copies, so
removing a parametrization from a copy would otherwise delete ``.weight`` from the original).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import AdapterParam

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FORMAT = "decomp.adapters/1"

AdapterFactory = Callable[[str, nn.Module], AdapterParam]
ModuleSelector = Union[str, Callable[[str, nn.Module], bool]]


class AdaptedLayer(NamedTuple):
    """An adapter in a model: the layer's qualified name, the layer, the adapter, its slot."""

    name: str
    layer: nn.Module
    adapter: AdapterParam
    index: int  # position in layer.parametrizations.weight

    @property
    def prefix(self) -> str:
        """The adapter's key prefix in ``model.state_dict()``."""
        head = f"{self.name}." if self.name else ""
        return f"{head}parametrizations.weight.{self.index}."


def adapted_layers(model: nn.Module) -> list[AdaptedLayer]:
    """Every :class:`AdapterParam` registered on a ``weight`` in ``model``, in module order.

    Example:
        >>> from decomp.adapters import AtomParam, apply
        >>> from decomp.adapters.model import adapted_layers
        >>> model = apply(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), AtomParam)
        >>> [(layer.name, layer.index) for layer in adapted_layers(model)]
        [('0', 0)]
    """
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for index, adapter in enumerate(module.parametrizations.weight):
                if isinstance(adapter, AdapterParam):
                    found.append(AdaptedLayer(name, module, adapter, index))
    return found


def _selector(
    selector: ModuleSelector | None, name: str
) -> Callable[[str, nn.Module], bool] | None:
    if selector is None or callable(selector):
        return selector
    if isinstance(selector, str):
        pattern = re.compile(selector)
        return lambda module_name, module: pattern.fullmatch(module_name) is not None
    raise TypeError(
        f"{name} must be a regex string, a callable (name, module) -> bool, or None, "
        f"got {type(selector).__name__}"
    )


def _factory(
    adapter: type[AdapterParam] | AdapterFactory, config: dict[str, Any]
) -> AdapterFactory:
    if isinstance(adapter, type) and issubclass(adapter, AdapterParam):
        return lambda name, module: adapter(**config)
    if isinstance(adapter, AdapterParam):
        raise TypeError(
            "adapter must be an AdapterParam subclass or a factory (name, module) -> AdapterParam, "
            f"got an instance of {type(adapter).__name__} "
            "(one instance cannot adapt several layers)"
        )
    if not callable(adapter):
        raise TypeError(
            "adapter must be an AdapterParam subclass or a factory (name, module) -> AdapterParam, "
            f"got {type(adapter).__name__}"
        )
    if config:
        raise TypeError(
            f"keyword arguments {sorted(config)} are only accepted with an AdapterParam subclass"
        )
    return adapter


def apply(
    model: nn.Module,
    adapter: type[AdapterParam] | AdapterFactory,
    target: ModuleSelector | None = None,
    *,
    train_heads: ModuleSelector | None = None,
    **config: Any,
) -> nn.Module:
    r"""Register an adapter on the targeted layers of ``model`` and freeze everything else.

    Every targeted layer gets :math:`W \mapsto W'` through
    ``parametrize.register_parametrization(layer, "weight", adapter)``; afterwards the only
    trainable tensors are the adapters' own Parameters and the parameters of the ``train_heads``
    modules (the pretrained weights and biases are frozen). Trainable parameters: the sum of each
    adapter's ``trainable_count`` plus the heads'. The model is identical to the pretrained one at
    init for adapters with a zero initial update.

    Matching: a string ``target``/``train_heads`` is a regex that must match a module's whole
    qualified name (``re.fullmatch``, as peft does for a string: ``"fc"`` does not match
    ``"fc2"``; write ``".*fc.*"`` to search); a callable is called as ``(name, module)``.
    ``target=None`` selects every ``nn.Linear`` and ``nn.Conv1d/2d/3d``. A matched module without
    a weight of its own (an activation, a container) is skipped, so ``r"features\.\d+"`` is fine;
    a matched module with a weight of an unsupported type (``nn.Embedding``,
    ``nn.ConvTranspose2d``, ``nn.LayerNorm``) raises. Modules matched by ``train_heads`` are never
    adapted.

    All or nothing: unsupported targets, already adapted layers and factories that do not return
    a fresh :class:`AdapterParam` are rejected before anything is registered, and if building an
    adapter fails the layers registered so far are restored, so an error leaves the model as it was.
    Every adapted layer's class is made copy-safe (``copy.deepcopy`` gives an independent model).

    Args:
        model: the network, modified in place.
        adapter: an :class:`AdapterParam` subclass (``config`` are its keyword arguments) or a
            factory ``(name, module) -> AdapterParam`` returning a new adapter per layer.
        target: which modules to adapt (regex or callable); default every supported layer.
        train_heads: modules whose own parameters stay trainable (regex or callable), e.g. ``"fc"``.
        **config: keyword arguments of ``adapter`` when it is a class.

    Returns:
        ``model``.

    Raises:
        TypeError: ``adapter`` is neither a subclass nor a callable (or is an instance); ``config``
            given with a factory; a factory returned something other than an ``AdapterParam``; a
            targeted module is not ``nn.Linear``/``nn.Conv1d/2d/3d`` (e.g. ``nn.Embedding``,
            ``nn.ConvTranspose2d``); ``target``/``train_heads`` of a wrong type.
        ValueError: ``target`` matched no module; a targeted layer is already adapted; a factory
            returned an adapter that is already built; the adapter rejects a layer (e.g. an
            explicit ``num_atoms`` above the kernel size).

    Example:
        >>> from decomp.adapters import AtomParam, apply, trainable_parameters
        >>> conv, head = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(128, 2)
        >>> model = torch.nn.Sequential(conv, torch.nn.Flatten(), head)
        >>> model = apply(model, AtomParam, train_heads=r"2", num_atoms=4)
        >>> sum(p.numel() for p in trainable_parameters(model))  # 4*9 atom entries + 258 (head)
        294
    """
    make_adapter = _factory(adapter, config)
    is_target = _selector(target, "target")
    is_head = _selector(train_heads, "train_heads")

    head_modules = [
        module for name, module in model.named_modules() if is_head and is_head(name, module)
    ]
    head_ids = {id(module) for module in head_modules}
    targets: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if id(module) in head_ids:
            continue
        if is_target is None:
            if isinstance(module, SUPPORTED_LAYERS):
                targets.append((name, module))
        elif is_target(name, module):
            if not isinstance(module, SUPPORTED_LAYERS):
                if not _has_own_weight(module):
                    continue  # activations and containers carry no weight to adapt
                layer_type = parametrize.type_before_parametrizations(module).__name__
                raise TypeError(
                    f"target matched {name!r} of type {layer_type}; adapters support "
                    "nn.Linear and nn.Conv1d/2d/3d"
                )
            targets.append((name, module))
    if not targets:
        raise ValueError(f"target={target!r} matched no nn.Linear or nn.Conv1d/2d/3d in the model")

    planned: list[tuple[str, nn.Module, AdapterParam]] = []
    for name, module in targets:
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(
                f"layer {name!r} is already adapted; "
                "merge(model) or remove its parametrization first"
            )
        new_adapter = make_adapter(name, module)
        if not isinstance(new_adapter, AdapterParam):
            raise TypeError(
                f"the adapter factory returned {type(new_adapter).__name__} for {name!r}, "
                "not an AdapterParam"
            )
        if new_adapter.is_built:
            raise ValueError(
                f"the adapter factory returned an already built adapter for {name!r}; "
                "return a new one"
            )
        planned.append((name, module, new_adapter))

    registered: list[nn.Module] = []
    try:
        for name, module, new_adapter in planned:
            parametrize.register_parametrization(module, "weight", new_adapter)
            registered.append(module)
    except Exception:
        # Building happens inside register_parametrization (right_inverse), so a bad layer is
        # only found here; the layers before it get their plain weight back.
        for module in registered:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        raise

    for module in registered:
        _make_copies_independent(module)
    # Every adapter in the model, not only the new ones: a second apply() on other layers must
    # not freeze the adapters of the first.
    adapter_tensors = {id(p) for layer in adapted_layers(model) for p in layer.adapter.parameters()}
    head_tensors = {id(p) for head in head_modules for p in head.parameters()}
    for parameter in model.parameters():
        if id(parameter) in head_tensors:
            parameter.requires_grad_(True)
        elif id(parameter) not in adapter_tensors:
            parameter.requires_grad_(False)
    return model


def _has_own_weight(module: nn.Module) -> bool:
    own_weight = module._parameters.get("weight") is not None
    return own_weight or parametrize.is_parametrized(module, "weight")


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a parametrized class of its own, equal to the one it shares."""
    shared = type(module)
    members = {
        key: value for key, value in vars(shared).items() if key not in ("__dict__", "__weakref__")
    }
    module.__class__ = type(shared.__name__, shared.__bases__, members)


def _independent_deepcopy(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    # torch's default_deepcopy for parametrized modules, except that the replica gets its own
    # class: parametrize keeps the injected properties on the class, so a shared class lets
    # remove_parametrizations on one copy delete `.weight` from every other.
    if id(self) in memo:
        return memo[id(self)]
    replica = self.__new__(type(self))
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    _own_class(replica)
    return replica


def _make_copies_independent(module: nn.Module) -> None:
    type(module).__deepcopy__ = _independent_deepcopy


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` with ``requires_grad`` (after :func:`apply`: adapters and heads).

    Example:
        >>> from decomp.adapters import AtomParam, apply, trainable_parameters
        >>> model = apply(torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3)), AtomParam)
        >>> tuple(tuple(p.shape) for p in trainable_parameters(model))
        ((3, 3),)
    """
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


class LayerReport(NamedTuple):
    """One row of :func:`report`."""

    name: str
    layer_type: str
    weight_shape: tuple[int, ...]
    adapter: str
    trainable: int
    frozen: int


class Report(list):
    """The rows of :func:`report` (a list of :class:`LayerReport`); ``str()`` renders a table.

    ``model_trainable`` and ``model_total`` count the whole model (heads and unadapted layers too).
    """

    def __init__(self, rows: list[LayerReport], model_trainable: int, model_total: int) -> None:
        super().__init__(rows)
        self.model_trainable = model_trainable
        self.model_total = model_total

    def __str__(self) -> str:
        header = ("layer", "type", "weight shape", "adapter", "trainable", "frozen")
        cells = [header] + [
            (
                row.name,
                row.layer_type,
                "x".join(map(str, row.weight_shape)),
                row.adapter,
                f"{row.trainable:,}",
                f"{row.frozen:,}",
            )
            for row in self
        ]
        widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in cells
        ]
        share = 100.0 * self.model_trainable / max(self.model_total, 1)
        lines.append(
            f"trainable {self.model_trainable:,} of {self.model_total:,} parameters ({share:.3f}%)"
        )
        return "\n".join(lines)


def report(model: nn.Module) -> Report:
    """Per adapted layer: name, layer type, weight shape, adapter, trainable and frozen parameters.

    ``frozen`` counts the layer's parameters without ``requires_grad`` (its pretrained weight and
    bias, and any frozen adapter Parameter); buffers are not parameters and are not counted.

    Example:
        >>> from decomp.adapters import AtomParam, apply, report
        >>> model = apply(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), AtomParam, num_atoms=4)
        >>> rows = report(model)
        >>> rows[0].layer_type, rows[0].trainable, rows[0].frozen
        ('Conv2d', 36, 224)
        >>> print(rows)  # doctest: +NORMALIZE_WHITESPACE
        layer type weight shape adapter trainable frozen
        0 Conv2d 8x3x3x3 AtomParam(num_atoms=4, levels=1, sub_atoms=None, block=None) 36 224
        trainable 36 of 260 parameters (13.846%)
    """
    rows = []
    for layer in adapted_layers(model):
        config = ", ".join(f"{key}={value!r}" for key, value in layer.adapter.config().items())
        rows.append(
            LayerReport(
                name=layer.name,
                layer_type=parametrize.type_before_parametrizations(layer.layer).__name__,
                weight_shape=tuple(layer.adapter.weight_shape),
                adapter=f"{type(layer.adapter).__name__}({config})",
                trainable=layer.adapter.num_trainable(),
                frozen=sum(p.numel() for p in layer.layer.parameters() if not p.requires_grad),
            )
        )
    model_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Report(rows, model_trainable, sum(p.numel() for p in model.parameters()))


def merge(model: nn.Module) -> nn.Module:
    r"""Bake every adapter into its layer: ``weight`` becomes the plain tensor :math:`W'`.

    Uses ``remove_parametrizations(leave_parametrized=True)``; the merged model computes the same
    outputs as the adapted one (to the rounding of the weight's dtype), has no adapter tensors left,
    and its merged weights keep ``requires_grad=False``. Safe on a ``copy.deepcopy`` of an adapted
    model: the original keeps its adapters.

    Example:
        >>> from decomp.adapters import AtomParam, apply, merge
        >>> model = apply(torch.nn.Sequential(torch.nn.Linear(8, 8)), AtomParam)
        >>> merged = merge(model)
        >>> type(merged[0]).__name__, merged[0].weight.shape
        ('Linear', torch.Size([8, 8]))
    """
    for layer in {id(item.layer): item.layer for item in adapted_layers(model)}.values():
        # A layer registered by hand and then deep-copied still shares its class with the
        # original; detaching it first keeps the removal from reaching the original.
        _own_class(layer)
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (Parameters and persistent buffers), keyed as in ``state_dict()``.

    Buffers are included on purpose: frozen factors from an SVD (the atom coefficients, say) can
    differ by sign from one machine to another, so rebuilding them from the weight is not enough.

    Example:
        >>> from decomp.adapters import AtomParam, adapter_state_dict, apply
        >>> model = apply(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3)), AtomParam, num_atoms=3)
        >>> sorted(adapter_state_dict(model))
        ['0.parametrizations.weight.0.atom_delta', '0.parametrizations.weight.0.coeffs']
    """
    state: dict[str, torch.Tensor] = {}
    for layer in adapted_layers(model):
        state.update(layer.adapter.state_dict(prefix=layer.prefix, keep_vars=False))
    return state


def _layer_metadata(model: nn.Module) -> list[dict[str, Any]]:
    # Through JSON and back so that the model's side compares equal to a file's (tuples -> lists).
    described = [
        {
            "name": layer.name,
            "index": layer.index,
            "adapter": type(layer.adapter).__name__,
            "config": layer.adapter.config(),
            "weight_shape": list(layer.adapter.weight_shape),
        }
        for layer in adapted_layers(model)
    ]
    return json.loads(json.dumps(described, default=repr))


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write :func:`adapter_state_dict` to a safetensors file; its metadata describes the layers.

    The metadata (key ``"decomp.adapters"``, JSON) lists per adapted layer its name, slot, adapter
    class, config and weight shape; :func:`load_adapter` checks it against the target model.

    Example:
        >>> import tempfile, pathlib
        >>> from decomp.adapters import AtomParam, apply, load_adapter, save_adapter
        >>> model = apply(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3)), AtomParam)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "adapter.safetensors"
        >>> save_adapter(model, path)
        >>> _ = load_adapter(model, path)
    """
    from safetensors.torch import save_file

    if not adapted_layers(model):
        raise ValueError("model has no adapters to save; call decomp.adapters.apply first")
    tensors = {
        key: value.detach().contiguous().clone() for key, value in adapter_state_dict(model).items()
    }
    metadata = {"format": _FORMAT, "decomp.adapters": json.dumps(_layer_metadata(model))}
    save_file(tensors, str(path), metadata=metadata)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter file written by :func:`save_adapter` into ``model`` (in place).

    ``model`` either carries the same adapters as the saved one (the same :func:`apply` call on a
    fresh copy of the pretrained network), or none at all: then the adapters the file describes
    are first registered with :func:`apply` (class and config from the metadata; everything else
    frozen). The file is checked -- layer names, adapter classes, configs, weight shapes, tensor
    names and shapes -- and a mismatch raises without loading anything. Tensors are copied into
    the existing Parameters and buffers (so an optimizer holding them keeps working), cast to
    their dtype and device.

    Raises:
        ValueError: the file was not written by :func:`save_adapter`, or does not match ``model``
            (the message lists every mismatch); for an unadapted model, the file names a layer
            the model lacks or of another weight shape, or an adapter class
            :mod:`decomp.adapters` does not have (the model is then left unadapted).

    Example:
        >>> import tempfile, pathlib
        >>> from decomp.adapters import AtomParam, apply, load_adapter, save_adapter
        >>> model = apply(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3)), AtomParam)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "adapter.safetensors"
        >>> save_adapter(model, path)
        >>> other = apply(torch.nn.Sequential(torch.nn.Conv2d(2, 5, 3)), AtomParam)
        >>> load_adapter(other, path)
        Traceback (most recent call last):
        ...
        ValueError: adapter file ... does not match the model: layer '0': weight shape ...
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not an adapter file written by decomp.adapters.save_adapter"
            )
        saved = {key: handle.get_tensor(key) for key in handle.keys()}
    described = json.loads(metadata["decomp.adapters"])
    if not adapted_layers(model):
        _adapt_as_described(model, described)
    problems = _mismatches(described, _layer_metadata(model))
    current = adapter_state_dict(model)
    if not problems:
        for key in sorted(set(saved) ^ set(current)):
            problems.append(f"tensor {key!r} only in the {'file' if key in saved else 'model'}")
        for key in sorted(set(saved) & set(current)):
            if saved[key].shape != current[key].shape:
                problems.append(
                    f"tensor {key!r}: shape {tuple(saved[key].shape)} in the file, "
                    f"{tuple(current[key].shape)} in the model"
                )
    if problems:
        raise ValueError(f"adapter file {path} does not match the model: " + "; ".join(problems))
    targets = dict(_adapter_tensors(model))
    with torch.no_grad():
        for key, value in saved.items():
            targets[key].copy_(value)
    return model


def _adapt_as_described(model: nn.Module, described: list[dict[str, Any]]) -> None:
    """:func:`apply` the adapters a file describes to an unadapted model (slot 0 of each layer)."""
    from decomp import adapters  # the package imports this module: resolve the classes lazily

    classes = {
        name: value
        for name, value in vars(adapters).items()
        if isinstance(value, type) and issubclass(value, AdapterParam) and value is not AdapterParam
    }
    unknown = sorted({entry["adapter"] for entry in described} - set(classes))
    if unknown:
        raise ValueError(
            f"the adapter file names adapter classes unknown to decomp.adapters: {unknown}"
        )
    plan = {entry["name"]: entry for entry in described if entry["index"] == 0}
    modules = dict(model.named_modules())
    missing = sorted(set(plan) - set(modules))
    if missing:
        raise ValueError(f"the adapter file adapts layers the model does not have: {missing}")
    reshaped = []
    for name, entry in plan.items():
        weight = getattr(modules[name], "weight", None)
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else None
        if shape != entry["weight_shape"]:
            reshaped.append(f"{name}: {entry['weight_shape']} in the file, {shape} in the model")
    if reshaped:
        raise ValueError(
            "the adapter file's weight shapes differ from the model's: " + "; ".join(reshaped)
        )
    apply(
        model,
        lambda name, module: classes[plan[name]["adapter"]](**plan[name]["config"]),
        target=lambda name, module: name in plan,
    )


def _adapter_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for layer in adapted_layers(model):
        for name, tensor in layer.adapter.named_parameters():
            yield layer.prefix + name, tensor
        for name, tensor in layer.adapter.named_buffers():
            yield layer.prefix + name, tensor


def _mismatches(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[str]:
    saved_by_key = {(entry["name"], entry["index"]): entry for entry in saved}
    current_by_key = {(entry["name"], entry["index"]): entry for entry in current}
    problems = []
    for key in sorted(set(saved_by_key) | set(current_by_key)):
        label = f"layer {key[0]!r}" + (f" slot {key[1]}" if key[1] else "")
        if key not in current_by_key:
            problems.append(f"{label} is adapted in the file but not in the model")
            continue
        if key not in saved_by_key:
            problems.append(f"{label} is adapted in the model but not in the file")
            continue
        fields = (("adapter", "adapter"), ("config", "config"), ("weight_shape", "weight shape"))
        for field, what in fields:
            in_file, in_model = saved_by_key[key][field], current_by_key[key][field]
            if in_file != in_model:
                problems.append(f"{label}: {what} {in_file} in the file, {in_model} in the model")
    return problems
