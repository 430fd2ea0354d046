r"""Model-level helpers: adapt a network, list and report its trainable tensors, merge, save, load.

* :func:`apply` registers an adapter on every targeted ``nn.Linear``/``nn.Conv1d/2d/3d`` and
  freezes everything else (all or nothing: a failure leaves the model untouched).
* :func:`trainable_parameters` -- what to hand to the optimizer.
* :func:`report` -- a per-layer table of trainable and frozen parameters.
* :func:`merge` -- bake every update into a plain weight for deployment.
* :func:`adapter_state_dict`, :func:`save_adapter`, :func:`load_adapter` -- adapter-only
  checkpoints (a safetensors file whose metadata names the layers, adapter classes, configs and
  weight shapes, checked on load).

Every helper takes the model itself or the model wrapped by ``torch.compile``,
``nn.DataParallel`` or ``DistributedDataParallel``, and names layers as the unwrapped model does
(no ``_orig_mod.``/``module.`` prefix), so an adapter file saved from a wrapped model loads into
the plain one and back. Wrapped in ``DistributedDataParallel``, a model cannot usefully gain
parameters (DDP recorded its parameters when it was built and would never synchronise new ones):
:func:`apply`, and :func:`load_adapter` into an unadapted model, raise ``TypeError`` there.

Shared weights: a module reachable under several names is one layer, adapted once and listed
under its first name. A weight ``Parameter`` held by another module too (an LM head tied to its
embedding, two layers sharing one Parameter) is refused by :func:`apply` with the names of both
holders, because an adapter would change it for one of them only. :func:`merge` of a layer whose
pretrained weight is shared (an adapter registered by hand on a tied weight) gives the layer a
weight of its own instead of rewriting the shared one, so the other holders keep their values;
:func:`~decomp.adapters.merged_state_dict` refuses such a layer (the plain architecture would tie
the two again).

Adapted layers keep working after ``copy.deepcopy``: :func:`apply` gives every copy its own
parametrized class (``torch.nn.utils.parametrize`` shares one injected class between copies, so
removing a parametrization from a copy would otherwise delete ``.weight`` from the original).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

from .._checks import _all_finite, check_bool
from .._select import (
    ALL_LINEAR,
    SUPPORTED_LAYERS,
    ModuleSelector,
)
from .._select import Module as _Module
from .._select import matches as _matches
from .._select import modules as _modules
from .._select import output_layer as _output_layer
from .._select import selector as _selector
from .base import (
    FINGERPRINT_PROJECTIONS,
    AdapterParam,
    buffer_fingerprint,
    copy_whole_into,
    dtype_kind,
    legacy_scalars_reshaped,
    rebuild_mismatch,
    same_kind_and_shape,
    whole_tensor,
)
from .registry import _classes_by_saved_name

_FORMAT = "decomp.adapters/1"
# Files that leave out rebuilt buffers: an older reader refuses them by their tag instead of
# reporting the missing factors as a mismatch.
_FORMAT_REBUILT = "decomp.adapters/2"
_ENTRY_FIELDS = ("name", "index", "adapter", "config", "weight_shape")
# Metadata entry listing the tensors save_adapter(extra=...) stores besides the adapters.
_EXTRA = "decomp.adapters.extra"
_EXTRA_FIELDS = ("key", "shape", "trainable")
# Metadata entry listing the buffers save_adapter left out, to be rebuilt from the weight on load.
_REBUILT = "decomp.adapters.rebuilt"
_REBUILT_FIELDS = ("key", "shape", "dtype", "fingerprint")
# Attribute names under which torch.compile and (Distributed)DataParallel hold the wrapped model.
_WRAPPER_PREFIXES = ("_orig_mod", "module")

# The auto progress bar shows (on a terminal) from this many layers, and only once building
# has taken _PROGRESS_DELAY_S seconds, so a quick apply never flashes one.
_PROGRESS_MIN_LAYERS = 16
_PROGRESS_DELAY_S = 2.0

AdapterFactory = Callable[[str, nn.Module], AdapterParam]

logger = logging.getLogger(__name__)


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


def _unwrap(model: nn.Module, caller: str, *, changes_parameters: bool = False) -> nn.Module:
    """The model inside ``torch.compile``/``nn.DataParallel``/``DistributedDataParallel`` wrappers.

    ``changes_parameters``: the caller adds parameters, which a DDP wrapper does not follow (its
    gradient buckets are fixed when it is built), so DDP is refused instead of unwrapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    while True:
        # torch._dynamo is only in sys.modules once torch.compile ran: no import cost otherwise.
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            if changes_parameters:
                raise TypeError(
                    f"{caller} adds parameters to the model, which DistributedDataParallel does "
                    "not follow once it is built (the new ones would never be synchronised): call "
                    "it on the model before wrapping it in DistributedDataParallel"
                )
            model = model.module
        elif isinstance(model, nn.DataParallel):
            model = model.module
        else:
            return model


def adapted_layers(model: nn.Module) -> list[AdaptedLayer]:
    """Every :class:`AdapterParam` registered on a ``weight`` in ``model``, in module order.

    A module reachable under several names is listed once, under its first; a wrapped model
    (``torch.compile``, ``DataParallel``, DDP) is listed with the wrapped model's names.

    Example:
        >>> from decomp.adapters import AtomParam, apply
        >>> from decomp.adapters.model import adapted_layers
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> model = apply(model, AtomParam, ["0"])
        >>> [(layer.name, layer.index) for layer in adapted_layers(model)]
        [('0', 0)]
    """
    found = []
    for name, module in _unwrap(model, "adapted_layers").named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for index, adapter in enumerate(module.parametrizations.weight):
                if isinstance(adapter, AdapterParam):
                    found.append(AdaptedLayer(name, module, adapter, index))
    return found


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


def _holders(root: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Per tensor: every ``(qualified name, module, attribute)`` slot holding it, aliases too."""
    found: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in root.named_modules(remove_duplicate=False):
        slots = list(module._parameters.items()) + list(module._buffers.items())
        for attribute, tensor in slots:
            if tensor is not None:
                qualified = f"{module_name}.{attribute}" if module_name else attribute
                found.setdefault(id(tensor), []).append((qualified, module, attribute))
    return found


def _other_holders(
    holders: dict[int, list[tuple[str, nn.Module, str]]],
    tensor: torch.Tensor,
    owner: nn.Module,
    attribute: str,
) -> list[str]:
    """The names under which modules other than ``owner.attribute`` hold ``tensor``."""
    return [
        qualified
        for qualified, module, slot in holders.get(id(tensor), [])
        if module is not owner or slot != attribute
    ]


def _adaptable_problem(
    name: str, module: nn.Module, holders: dict[int, list[tuple[str, nn.Module, str]]]
) -> str | None:
    """Why ``module``'s weight cannot take an adapter (None: it can); says what to do."""
    if parametrize.is_parametrized(module, "weight"):
        chain = list(module.parametrizations.weight)
        adapters = [type(item).__name__ for item in chain if isinstance(item, AdapterParam)]
        if adapters:
            return (
                f"layer {name!r} is already adapted ({', '.join(adapters)}); an adapter must be "
                "the only parametrization of a weight: merge(model) to bake it in first, or leave "
                f"{name!r} out of target"
            )
        others = ", ".join(type(item).__name__ for item in chain)
        return (
            f"layer {name!r} has its weight parametrized by {others} (weight_norm, spectral_norm "
            "or another parametrization); an adapter must be the only parametrization of a weight: "
            "remove it first (torch.nn.utils.parametrize.remove_parametrizations(layer, "
            f'"weight")) or leave {name!r} out of target'
        )
    weight = module._parameters.get("weight")
    if weight is None:
        hooks = [
            type(hook).__name__
            for hook in module._forward_pre_hooks.values()
            if getattr(hook, "name", None) == "weight"
        ]
        if hooks:
            return (
                f"layer {name!r} computes its weight in a forward pre-hook ({', '.join(hooks)}: "
                "torch.nn.utils.weight_norm or spectral_norm); an adapter needs the weight as a "
                "Parameter: remove the hook first (torch.nn.utils.remove_weight_norm / "
                f"remove_spectral_norm) or leave {name!r} out of target"
            )
        return f"layer {name!r} has no weight Parameter to adapt"
    if weight.is_meta:
        return (
            f"layer {name!r} has its weight on the meta device, without values to build an "
            "adapter from: materialise the model and load its pretrained weights first "
            "(model.to_empty(device=...) and load_state_dict, or from_pretrained), then adapt it"
        )
    tied = _other_holders(holders, weight, module, "weight")
    if tied:
        return (
            f"the weight of layer {name!r} is shared with {', '.join(map(repr, tied))} (tied "
            f"weights); an adapter would change it for {name!r} only: leave {name!r} out of "
            "target, or give it a weight of its own first "
            "(layer.weight = nn.Parameter(layer.weight.detach().clone()))"
        )
    return None


def apply(
    model: nn.Module,
    adapter: type[AdapterParam] | AdapterFactory,
    target: ModuleSelector | None = None,
    *,
    train_heads: ModuleSelector | None = None,
    progress: bool | None = None,
    branch: bool = True,
    **config: Any,
) -> nn.Module:
    r"""Register an adapter on the targeted layers of ``model`` and freeze everything else.

    Every targeted layer gets :math:`W \mapsto W'` through
    ``parametrize.register_parametrization(layer, "weight", adapter)``; afterwards the only
    trainable tensors are the adapters' own Parameters and the parameters of the ``train_heads``
    modules (the pretrained weights and biases are frozen). Trainable parameters: the sum of each
    adapter's ``trainable_count`` plus the heads'. The model is identical to the pretrained one at
    init for adapters with a zero initial update.

    Matching, as peft's ``target_modules`` (``target`` and ``train_heads`` alike):

    * a list, tuple or set of names: a module matches if its qualified name is one of them or
      ends with ``"." + name`` (``["q_proj", "v_proj"]`` matches ``layers.0.self_attn.q_proj``;
      ``"fc"`` does not match ``fc2``); every name must match some module of the model;
    * a string: a regex that must match the whole qualified name (``re.fullmatch``: write
      ``".*fc.*"`` to search);
    * ``"all-linear"``: every ``nn.Linear`` except the output layer (below);
    * a callable ``(name, module) -> bool``;
    * ``None`` (``target``'s default): every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` except the
      output layer.

    The output layer is ``model.get_output_embeddings()`` where the model has that method and
    it returns a module (a transformers language model's LM head), otherwise the model's last
    ``nn.Linear``/``nn.Conv1d/2d/3d`` in ``named_modules()`` order (a classifier such as
    torchvision's ``fc``, transformers' ``classifier``, the last layer of an ``nn.Sequential``).
    So the defaults never adapt the classifier head; name it (``target=[..., "fc"]``,
    ``target=r".*"``) to adapt it, or pass it to ``train_heads`` to train it in full. (peft
    leaves the output layer out of ``"all-linear"`` on transformers models only; here it is left
    out on every model. transformers' GPT-2 style ``Conv1D`` is not an ``nn.Linear`` and is not
    supported.)

    A module reachable under several names (one layer used twice) matches if any of its names
    does and is adapted once. A matched module without a weight of its own (an activation, a
    container) is skipped, so ``r"features\.\d+"`` is fine; a matched module with a weight of an
    unsupported type (``nn.Embedding``, ``nn.ConvTranspose2d``, ``nn.LayerNorm``) raises. A module
    matched by ``train_heads`` is a head with all its submodules: none of them is adapted and
    all their parameters become trainable (``requires_grad=True``, also where it was ``False``).

    Linear layers compute the update as a side branch (``branch=True``, the default): an adapted
    ``nn.Linear`` whose adapter has a branch form (:attr:`AdapterParam.has_branch`: DCT, LDU,
    SVD, Tucker) runs :math:`y = x W^\top + b + x \Delta W^\top` with
    :meth:`AdapterParam.branch`, which never forms :math:`W'` or :math:`\Delta W` and whose
    backward never forms :math:`\partial L / \partial W'` (an :math:`m \times n` matrix and a
    tokens :math:`\times m \times n` matmul per layer per step) -- what peft's LoRA does. The
    result equals the weight path up to rounding (exactly at init, where :math:`\Delta W = 0`);
    ``layer.weight`` still reads :math:`W'`, so code that reads the weight (``nn.MultiheadAttention``
    reads its ``out_proj.weight``, :func:`merge`, a state dict) is unchanged. Convs, ``nn.Linear``
    subclasses with their own ``forward``, methods without a branch form (Atom, Kron, Lie, SNELL,
    SNELLA) and a layer on which another parametrization is later stacked compute :math:`W'`
    (the weight path); so does every layer with ``branch=False``. Registering an adapter by hand
    (``parametrize.register_parametrization``) gives the weight path.

    Repeated calls compose: when ``model`` already carries adapters (from an earlier call, or
    registered by hand), this call adapts its own targets (freezing their pretrained weights and
    biases, but not a tensor that another module holds too) and makes its own heads trainable,
    and leaves every other ``requires_grad`` flag as it is -- the earlier adapters and heads stay
    trainable. A model without adapters (a fresh one, or one after :func:`merge`) is adapted as
    new: everything but this call's adapters and heads is frozen.

    All or nothing: unsupported targets, layers that already carry an adapter or another
    parametrization (``weight_norm``, ``spectral_norm``, hook-based or not), weights shared with
    another module or on the ``meta`` device, heads holding an adapted layer, and factories that
    do not return a fresh :class:`AdapterParam` for each layer are rejected before anything is
    registered, and if building an adapter fails the layers registered so far are restored, so an
    error leaves the model as it was.
    Every adapted layer's class is made copy-safe (``copy.deepcopy`` gives an independent model).

    Reporting: the logger ``decomp.adapters.model`` writes one INFO line per call (layers
    adapted, trainable and total parameters) and one DEBUG line per layer; nothing is printed.
    Building adapters can take a while (SVD-initialised adapters on a ViT-B-sized model: about
    20 s on one core): ``progress=True`` shows a ``tqdm`` bar over the layers (tqdm must be
    installed), ``False`` never does, and ``None`` shows one only where ``tqdm`` is installed,
    stderr is a terminal, there are at least 16 layers and building has taken 2 s.

    Args:
        model: the network, modified in place (or its ``torch.compile``/``DataParallel`` wrapper).
        adapter: an :class:`AdapterParam` subclass (``config`` are its keyword arguments) or a
            factory ``(name, module) -> AdapterParam`` returning a new adapter per layer.
        target: which modules to adapt (names, regex, ``"all-linear"`` or callable); default
            every supported layer except the output layer.
        train_heads: modules whose own parameters stay trainable (same forms), e.g. ``["fc"]``.
        progress: show a progress bar while the adapters are built (None: automatic).
        branch: run adapted ``nn.Linear`` layers as :math:`x W^\top + b + ` ``adapter.branch(x)``
            where the method has a branch form (default True); ``False`` forms :math:`W'` every
            forward, as ``register_parametrization`` alone does.
        **config: keyword arguments of ``adapter`` when it is a class.

    Returns:
        ``model``.

    Raises:
        TypeError: ``adapter`` is neither a subclass nor a callable (or is an instance); ``config``
            given with a factory; a factory returned something other than an ``AdapterParam``; a
            targeted module is not ``nn.Linear``/``nn.Conv1d/2d/3d`` (e.g. ``nn.Embedding``,
            ``nn.ConvTranspose2d``); ``target``/``train_heads`` of a wrong type (or a collection
            holding a non-string); ``model`` is wrapped in ``DistributedDataParallel`` (apply
            before wrapping); an unknown keyword in ``config`` (the message names the nearest
            option); ``progress`` not a bool or None; ``branch`` not a bool.
        ValueError: ``target`` matched no module (or only heads, or only the output layer); a
            ``target``/``train_heads`` collection is empty or holds a name that matches no
            module; a string that is not a valid regex; a targeted layer already carries an
            adapter or another parametrization or a weight-norm hook; a targeted layer's weight
            is shared with another module (the message names both) or is on the ``meta``
            device; a ``train_heads`` module holds an adapted layer; a factory returned an
            adapter that is already built, or one adapter for two layers; the adapter rejects a
            layer (e.g. an explicit ``num_atoms`` above the kernel size).
        ImportError: ``progress=True`` without ``tqdm`` installed.

    Example:
        >>> from decomp.adapters import AtomParam, apply, trainable_parameters
        >>> conv, head = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(128, 2)
        >>> model = torch.nn.Sequential(conv, torch.nn.Flatten(), head)
        >>> model = apply(model, AtomParam, train_heads=["2"], num_atoms=4)
        >>> sum(p.numel() for p in trainable_parameters(model))  # 4*9 atom entries + 258 (head)
        294
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> [layer.name for layer in adapted_layers(apply(mlp, AtomParam))]  # not the output layer
        ['0']
    """
    make_adapter = _factory(adapter, config)
    _check_progress(progress)
    check_bool(branch, "branch")
    root = _unwrap(model, "apply", changes_parameters=True)
    modules = _modules(root)
    is_target = _selector(target, "target", root, modules)
    is_head = _selector(train_heads, "train_heads", root, modules)

    heads = _heads(modules, is_head)
    head_ids = {id(module) for head in heads for module in head.modules()}
    output_layer = _output_layer(root) if is_target is None else None
    targets: list[tuple[str, nn.Module]] = []
    matched_heads: list[str] = []
    for entry in modules:
        if id(entry.module) in head_ids:
            if _matches(is_target, entry):
                matched_heads.append(entry.name)
            continue
        if is_target is None:
            if isinstance(entry.module, SUPPORTED_LAYERS) and entry.module is not output_layer:
                targets.append((entry.name, entry.module))
        elif _matches(is_target, entry):
            if not isinstance(entry.module, SUPPORTED_LAYERS):
                if not _has_own_weight(entry.module):
                    continue  # activations and containers carry no weight to adapt
                layer_type = parametrize.type_before_parametrizations(entry.module).__name__
                raise TypeError(
                    f"target matched {entry.name!r} of type {layer_type}; adapters support "
                    "nn.Linear and nn.Conv1d/2d/3d"
                )
            targets.append((entry.name, entry.module))
    if not targets:
        if matched_heads:
            raise ValueError(
                f"target={target!r} matched only train_heads modules or their submodules "
                f"{matched_heads}, which are never adapted"
            )
        if output_layer is not None and id(output_layer) not in head_ids:
            name = next(entry.name for entry in modules if entry.module is output_layer)
            raise ValueError(
                f"the default target (every nn.Linear and nn.Conv1d/2d/3d except the output "
                f"layer) leaves nothing to adapt: the model's only such layer is its output layer "
                f"{name!r}; name it to adapt it (target=[{name!r}])"
            )
        raise ValueError(f"target={target!r} matched no nn.Linear or nn.Conv1d/2d/3d in the model")

    holders = _holders(root)
    problems = [_adaptable_problem(name, module, holders) for name, module in targets]
    problems = [problem for problem in problems if problem is not None]
    if problems:
        raise ValueError("; ".join(problems))
    planned: list[tuple[str, nn.Module, AdapterParam]] = []
    returned_for: dict[int, str] = {}
    for name, module in targets:
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
        if id(new_adapter) in returned_for:
            # It would be built from the first layer's weight and then shared by both layers.
            raise ValueError(
                "the adapter factory returned the same adapter for "
                f"{returned_for[id(new_adapter)]!r} and {name!r}; return a new one per layer"
            )
        returned_for[id(new_adapter)] = name
        planned.append((name, module, new_adapter))

    first_call = not adapted_layers(root)
    registered = _register(planned, progress)
    _commit(root, registered, heads, first_call, branch)
    _log_summary("apply", root, planned, len(heads))
    return model


def _check_progress(progress: object) -> None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {type(progress).__name__}")
    if progress and importlib.util.find_spec("tqdm") is None:
        raise ImportError("progress=True needs tqdm: pip install tqdm (or pass progress=None)")


def _progress_bar(planned: list[Any], progress: bool | None, what: str) -> Iterable[Any]:
    """``planned`` itself, or wrapped in a tqdm bar on stderr when ``progress`` asks for one."""
    if progress is False:
        return planned
    if progress is None:
        interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        if not interactive or len(planned) < _PROGRESS_MIN_LAYERS:
            return planned
        if importlib.util.find_spec("tqdm") is None:
            return planned
    from tqdm.auto import tqdm

    delay = 0.0 if progress else _PROGRESS_DELAY_S
    return tqdm(planned, desc=what, unit="layer", delay=delay, leave=False)


def _log_summary(
    caller: str, root: nn.Module, planned: list[tuple[str, nn.Module, AdapterParam]], heads: int
) -> None:
    """One INFO line for the call, one DEBUG line per layer it adapted."""
    if logger.isEnabledFor(logging.DEBUG):
        for name, module, new_adapter in planned:
            layer_type = parametrize.type_before_parametrizations(module).__name__
            shape = "x".join(map(str, module.weight.shape))
            count = sum(parameter.numel() for parameter in new_adapter.parameters())
            logger.debug(
                "%s: %r (%s %s) <- %s, %d trainable",
                caller, name, layer_type, shape, type(new_adapter).__name__, count,
            )
    if logger.isEnabledFor(logging.INFO):
        adapters = sorted({type(new_adapter).__name__ for _, _, new_adapter in planned})
        trainable = sum(p.numel() for p in root.parameters() if p.requires_grad)
        total = sum(p.numel() for p in root.parameters())
        logger.info(
            "%s: %d layers adapted with %s, %d heads trained; %d of %d parameters trainable",
            caller, len(planned), ", ".join(adapters), heads, trainable, total,
        )


def _heads(
    modules: list[_Module], is_head: Callable[[str, nn.Module], bool] | None
) -> list[nn.Module]:
    """The modules ``train_heads`` matches; refused if one holds an adapted layer."""
    heads = [entry for entry in modules if _matches(is_head, entry)]
    for entry in heads:
        for inner_name, inner in entry.module.named_modules():
            if parametrize.is_parametrized(inner, "weight") and any(
                isinstance(item, AdapterParam) for item in inner.parametrizations.weight
            ):
                where = ".".join(part for part in (entry.name, inner_name) if part)
                raise ValueError(
                    f"train_heads matched {entry.name!r}, which holds the adapted layer {where!r}: "
                    "a head's parameters all become trainable, its pretrained weight included; "
                    f"leave {entry.name!r} out of train_heads, or merge(model) first"
                )
    return [entry.module for entry in heads]


def _register(
    planned: list[tuple[str, nn.Module, AdapterParam]], progress: bool | None = None
) -> list[nn.Module]:
    """Register every planned adapter, or none: a failure restores the layers registered so far."""
    registered: list[nn.Module] = []
    try:
        for name, module, new_adapter in _progress_bar(planned, progress, "building adapters"):
            try:
                parametrize.register_parametrization(module, "weight", new_adapter)
            except Exception as error:
                error.add_note(f"while registering {type(new_adapter).__name__} on layer {name!r}")
                raise
            registered.append(module)
    except Exception:
        # Building happens inside register_parametrization (right_inverse), so a bad layer is
        # only found here; the layers before it get their plain weight back.
        _unregister(registered)
        raise
    return registered


def _unregister(modules: Iterable[nn.Module]) -> None:
    """Undo :func:`_register`: each layer gets its own weight Parameter (same object) and class."""
    for module in modules:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def _commit(
    root: nn.Module, registered: list[nn.Module], heads: list[nn.Module], first_call: bool, branch: bool
) -> None:
    """Make the new layers copy-safe, give linear ones the branch forward (``branch``) and set
    ``requires_grad``: adapters and heads trainable.

    On a model's first adaptation everything else is frozen; later calls freeze only the layers
    they adapted, so what earlier calls (or the user) made trainable stays so -- including a
    tensor of an adapted layer that another module holds too (a bias shared with an earlier head).
    """
    for module in registered:
        _make_copies_independent(module)
        if branch and _takes_branch(module):
            type(module).forward = _branch_forward
    adapter_tensors = {id(p) for layer in adapted_layers(root) for p in layer.adapter.parameters()}
    head_tensors = {id(p) for head in heads for p in head.parameters()}
    if first_call:
        scope = list(root.parameters())
    else:
        inside = {id(sub) for module in registered for sub in module.modules()}
        elsewhere = {
            id(p)
            for m in root.modules()
            if id(m) not in inside
            for p in m.parameters(recurse=False)
        }
        scope = [p for m in registered for p in m.parameters() if id(p) not in elsewhere]
    for parameter in scope:
        if id(parameter) not in adapter_tensors and id(parameter) not in head_tensors:
            parameter.requires_grad_(False)
    for head in heads:
        for parameter in head.parameters():
            parameter.requires_grad_(True)


def _takes_branch(module: nn.Module) -> bool:
    """An adapted layer that runs ``nn.Linear.forward`` and whose adapter has a branch form."""
    runs_linear_forward = parametrize.type_before_parametrizations(module).forward is nn.Linear.forward
    return runs_linear_forward and module.parametrizations.weight[0].has_branch


def _branch_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    r"""``nn.Linear.forward`` of a layer adapted with ``branch=True``: :math:`x W^\top + b + x \Delta W^\top`.

    Installed on the layer's own parametrized class, so :func:`merge` and
    ``remove_parametrizations`` (which restore the original class) take it away. A parametrization
    stacked on the adapter afterwards changes what :math:`W'` is, so the layer then reads it.
    """
    chain = self.parametrizations.weight
    if len(chain) != 1:
        return nn.functional.linear(input, self.weight, self.bias)
    return nn.functional.linear(input, chain.original, self.bias) + chain[0].branch(input)


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
        >>> model = apply(torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3)), AtomParam, ["0"])
        >>> tuple(tuple(p.shape) for p in trainable_parameters(model))
        ((3, 3),)
    """
    root = _unwrap(model, "trainable_parameters")
    return [parameter for parameter in root.parameters() if parameter.requires_grad]


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
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
        >>> model = apply(model, AtomParam, ["0"], num_atoms=4)
        >>> rows = report(model)
        >>> rows[0].layer_type, rows[0].trainable, rows[0].frozen
        ('Conv2d', 36, 224)
        >>> print(rows)  # doctest: +NORMALIZE_WHITESPACE
        layer type weight shape adapter trainable frozen
        0 Conv2d 8x3x3x3 AtomParam(num_atoms=4, levels=1, sub_atoms=None, block=None, channel_block=1, scale=None) 36 224
        trainable 36 of 260 parameters (13.846%)
    """
    root = _unwrap(model, "report")
    rows = []
    for layer in adapted_layers(root):
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
    model_trainable = sum(p.numel() for p in root.parameters() if p.requires_grad)
    return Report(rows, model_trainable, sum(p.numel() for p in root.parameters()))


def merge(model: nn.Module) -> nn.Module:
    r"""Bake every adapter into its layer: ``weight`` becomes the plain tensor :math:`W'`.

    Uses ``remove_parametrizations(leave_parametrized=True)``; the merged model computes the same
    outputs as the adapted one (to the rounding of the weight's dtype), has no adapter tensors left,
    and its merged weights keep ``requires_grad=False``. Safe on a ``copy.deepcopy`` of an adapted
    model: the original keeps its adapters. A layer whose pretrained weight is shared with another
    module (an adapter registered by hand on a tied weight; :func:`apply` refuses those) gets a
    new merged weight Parameter of its own, with the shared one's ``requires_grad``: the shared
    Parameter is not rewritten, so the other modules keep the weight they computed with in the
    adapted model. A ``torch.compile``/``DataParallel``/DDP wrapper is looked through.

    Example:
        >>> from decomp.adapters import AtomParam, apply, merge
        >>> model = apply(torch.nn.Sequential(torch.nn.Linear(8, 8)), AtomParam, ["0"])
        >>> merged = merge(model)
        >>> type(merged[0]).__name__, merged[0].weight.shape
        ('Linear', torch.Size([8, 8]))
    """
    root = _unwrap(model, "merge")
    holders = _holders(root)
    for layer in {id(item.layer): item.layer for item in adapted_layers(root)}.values():
        # A layer registered by hand and then deep-copied still shares its class with the
        # original; detaching it first keeps the removal from reaching the original.
        _own_class(layer)
        chain = layer.parametrizations.weight
        original = getattr(chain, "original", None)
        if original is None or not _other_holders(holders, original, chain, "original"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            continue
        # leave_parametrized=True would write W' into the shared tensor (set_), and so into
        # every other module holding it.
        with torch.no_grad():
            merged = layer.weight.detach().clone()
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        if isinstance(original, nn.Parameter):
            merged = nn.Parameter(merged, requires_grad=original.requires_grad)
        layer.weight = merged
        holders[id(original)] = [slot for slot in holders[id(original)] if slot[1] is not chain]
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (Parameters and persistent buffers), keyed as in ``state_dict()``.

    Keys are those of the unwrapped model (no ``_orig_mod.``/``module.`` prefix for a
    ``torch.compile``/``DataParallel``/DDP wrapper). Every buffer is included, the ones
    :func:`save_adapter` leaves out to be rebuilt from the weight too: this is the adapters'
    whole state, as ``model.state_dict()`` holds it.

    Example:
        >>> from decomp.adapters import AtomParam, adapter_state_dict, apply
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3))
        >>> model = apply(model, AtomParam, ["0"], num_atoms=3)
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


def save_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    extra: bool | Sequence[str] = True,
    factors: bool = False,
) -> None:
    """Write :func:`adapter_state_dict` to a safetensors file; its metadata describes the layers.

    By default the file holds O(trainable) bytes: the frozen buffers an adapter
    class declares in :attr:`~decomp.adapters.AdapterParam.rebuilt_buffers` (LDU's factors,
    atom coefficients, the Kronecker and SVD starts, DCT locations, ...), which ``_build``
    computes from the pretrained weight and the config alone, are left out, and
    :func:`load_adapter` rebuilds them from the target model's weight. For each, the metadata
    entry ``"decomp.adapters.rebuilt"`` (JSON) keeps its key, shape, dtype and
    :func:`~decomp.adapters.base.buffer_fingerprint` (9 numbers), by which the load detects a
    rebuild that came out different (another pretrained weight, a decomposition that is not
    reproducible there); such a file is tagged ``"decomp.adapters/2"``. ``factors=True`` stores
    those buffers too (tag ``"decomp.adapters/1"``, readable by older versions): for a target
    whose weight is not the one the adapter was built from, or to skip the rebuild.

    ``extra`` adds what else the tuned model needs, under its plain ``state_dict`` keys, so that
    :func:`load_adapter` into a fresh copy of the pretrained network gives the tuned outputs
    exactly (peft's ``modules_to_save``):

    * ``True`` (default): every trainable parameter that is not an adapter tensor (the heads
      :func:`apply` made trainable with ``train_heads``, anything you unfroze) and every buffer
      of a normalisation layer with running statistics (``BatchNorm``/``InstanceNorm``/
      ``SyncBatchNorm``: ``running_mean``, ``running_var``, ``num_batches_tracked``), which
      training in ``train()`` mode changes even where the layer is frozen;
    * ``False``: the adapter tensors only (files as written before ``extra`` existed);
    * a list of module names (each the qualified name or a dotted suffix of it, as peft's
      ``modules_to_save``): every parameter and persistent buffer of exactly those modules.

    The metadata entry ``"decomp.adapters.extra"`` (JSON) lists each extra tensor's key, shape
    and whether it is a trainable parameter.

    The metadata (key ``"decomp.adapters"``, JSON) lists per adapted layer its name, slot, adapter
    class, config and weight shape; :func:`load_adapter` checks it against the target model.
    Names are the unwrapped model's, so a file saved from a ``torch.compile``\\ d or
    ``DataParallel`` model loads into the plain one and back.

    Raises:
        ValueError: ``model`` has no adapters; or an adapter or extra tensor holds a value
            :func:`load_adapter` would refuse (NaN/Inf from a diverged run, a kept count out of
            range): no file is written that could not be loaded back; or a name in ``extra``
            matches no module.
        TypeError: ``extra`` is not a bool or a list of module names; ``factors`` not a bool.

    Example:
        >>> import tempfile, pathlib
        >>> from decomp.adapters import AtomParam, apply, load_adapter, save_adapter
        >>> model = apply(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3)), AtomParam, ["0"])
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "adapter.safetensors"
        >>> save_adapter(model, path)
        >>> _ = load_adapter(model, path)
    """
    from safetensors.torch import save_file

    check_bool(factors, "factors")
    root = _unwrap(model, "save_adapter")
    if not adapted_layers(root):
        raise ValueError("model has no adapters to save; call decomp.adapters.apply first")
    extras = _extra_tensors(root, extra)
    rebuilt = {} if factors else _rebuilt_tensors(root)
    adapters = {key: value for key, value in adapter_state_dict(root).items() if key not in rebuilt}
    state = {**adapters, **{key: value for key, (value, _) in extras.items()}}
    # Parameters sharded by FSDP2 (DTensors) are gathered: a collective, so every rank calls
    # save_adapter, and rank 0 alone writes the file.
    gathered = {key: whole_tensor(value) for key, value in state.items()}
    sharded = any(gathered[key] is not value for key, value in state.items())
    tensors = {key: value.detach().contiguous().clone() for key, value in gathered.items()}
    problems = _value_problems(tensors, root)
    problems += _nonfinite({key: tensors[key] for key in extras})
    if problems:
        raise ValueError(
            f"save_adapter: the model's adapters hold values load_adapter would refuse, so {path} "
            "was not written: " + "; ".join(problems)
        )
    # Fingerprints gather sharded buffers too (FSDP2 shards only Parameters, but be safe): on
    # every rank, before rank 0 alone goes on.
    fingerprints = [
        {
            "key": key,
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "fingerprint": buffer_fingerprint(value),
        }
        for key, value in rebuilt.items()
    ]
    if sharded and torch.distributed.get_rank() != 0:
        return
    metadata = {
        "format": _FORMAT_REBUILT if fingerprints else _FORMAT,
        "decomp.adapters": json.dumps(_layer_metadata(root)),
    }
    if fingerprints:
        metadata[_REBUILT] = json.dumps(fingerprints)
    if extra is not False:
        metadata[_EXTRA] = json.dumps(
            [
                {"key": key, "shape": list(tensors[key].shape), "trainable": trainable}
                for key, (_, trainable) in extras.items()
            ]
        )
    save_file(tensors, str(path), metadata=metadata)


def _rebuilt_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers :func:`save_adapter` leaves out: each adapter's rebuilt ones, keyed as in
    :func:`adapter_state_dict`, but for those no larger than their fingerprint (a scale of shape
    ``(1,)``), which are cheaper to store.
    """
    return {
        layer.prefix + name: buffer
        for layer in adapted_layers(root)
        for name, buffer in layer.adapter.rebuilt_state().items()
        if buffer.numel() > FINGERPRINT_PROJECTIONS + 1
    }


def _extra_tensors(root: nn.Module, extra: object) -> dict[str, tuple[torch.Tensor, bool]]:
    """What ``save_adapter(extra=extra)`` stores besides adapters: key -> (tensor, trainable)."""
    if extra is False:
        return {}
    adapter_ids = {id(tensor) for _, tensor in _adapter_tensors(root)}
    if extra is True:
        chosen = [
            (name, parameter, True)
            for name, parameter in root.named_parameters()
            if parameter.requires_grad and id(parameter) not in adapter_ids
        ]
        for name, module in root.named_modules():
            if isinstance(module, _NormBase):
                buffers = _persistent_buffers(module, name)
                chosen += [(key, buffer, False) for key, buffer in buffers]
        return {name: (tensor, trainable) for name, tensor, trainable in chosen}
    if isinstance(extra, (str, bytes)) or not isinstance(extra, Sequence) or not all(
        isinstance(name, str) for name in extra
    ):
        raise TypeError(f"extra must be True, False or a list of module names, got {extra!r}")
    modules = list(root.named_modules())
    chosen_modules: dict[str, nn.Module] = {}
    unmatched = []
    for wanted in extra:
        found = [
            (name, module)
            for name, module in modules
            if name == wanted or name.endswith("." + wanted)
        ]
        if not found:
            unmatched.append(wanted)
        chosen_modules.update(found)
    if unmatched:
        raise ValueError(
            f"extra names modules the model does not have: {unmatched} (a name is a module's "
            "qualified name or a dotted suffix of it)"
        )
    tensors: dict[str, tuple[torch.Tensor, bool]] = {}
    for name, module in chosen_modules.items():
        for key, parameter in module.named_parameters(prefix=name):
            if id(parameter) not in adapter_ids:
                tensors.setdefault(key, (parameter, parameter.requires_grad))
        for key, buffer in _persistent_buffers(module, name):
            if id(buffer) not in adapter_ids:
                tensors.setdefault(key, (buffer, False))
    return tensors


def _persistent_buffers(module: nn.Module, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The buffers ``module.state_dict()`` holds, keyed as in the model, where it is ``name``."""
    for owner_name, owner in module.named_modules(prefix=name):
        for key, buffer in owner._buffers.items():
            if buffer is not None and key not in owner._non_persistent_buffers_set:
                yield (f"{owner_name}.{key}" if owner_name else key), buffer


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The floating tensors among ``tensors`` that hold NaN or Inf."""
    return [
        f"tensor {key!r} holds NaN or Inf"
        for key, value in tensors.items()
        if (value.is_floating_point() or value.is_complex()) and not _all_finite(value)
    ]


def load_adapter(
    model: nn.Module, path: str | Path, *, progress: bool | None = None, branch: bool = True
) -> nn.Module:
    """Load an adapter file written by :func:`save_adapter` into ``model`` (in place).

    ``model`` either carries the same adapters as the saved one (the same :func:`apply` call on a
    fresh copy of the pretrained network), or none at all: then the adapters the file describes
    are registered as :func:`apply` does (class and config from the metadata; everything else
    frozen). Tensors are copied into the existing Parameters and buffers (so an optimizer holding
    them keeps working), cast to their dtype and device. A ``torch.compile``/``DataParallel``/DDP
    wrapper is looked through, and layer names that all start with its ``_orig_mod.`` or
    ``module.`` prefix (a file written from a wrapped model by an older version) are read without
    it.

    Atomic: everything is checked before the model changes -- the file (safetensors, the format
    tag, the metadata's structure), the adapter classes and configs (each class must accept its
    config), the layer names, slots, classes, configs and weight shapes against the model, the
    layers themselves (supported type, no other parametrization, no weight shared with another
    module), every tensor (present on both sides, same shape, same kind of dtype) and every value
    as it will be stored, cast to the model's dtype (no NaN/Inf; each adapter's own invariants,
    :meth:`AdapterParam._state_problems`: a SNELL kept count in range, distinct DCT locations).
    Configs are compared as the class reads them (an option the file leaves out is at its
    default). Adapters for an unadapted model are built first and removed again if their tensors
    do not match. On any error the model is exactly as before: no adapters registered, the same
    ``requires_grad`` flags, the same values.

    Frozen factors the file leaves out (``save_adapter``'s default; see its ``factors``) are
    rebuilt from the model's own weight -- by building the adapters for an unadapted model, or
    as the adapted model already holds them -- and each is compared, in the same check, with the
    fingerprint the file keeps of it (:func:`~decomp.adapters.base.fingerprint_difference` within
    :func:`~decomp.adapters.base.rebuild_tolerance`: :math:`10^{-3}` relative for floating
    factors, exact for integer ones). A file that stores its factors (``factors=True``, or
    written before this option existed) loads them as stored, onto any weight of the right shape.

    Extra tensors (``save_adapter(..., extra=...)``: trained heads, normalisation statistics) are
    copied after the adapters, in the same check: each must be a parameter or buffer of the model
    under the same key, of the same shape and kind of dtype, finite in the model's dtype, and a
    trainable one a Parameter; the loaded parameters get the saved ``requires_grad`` (a head
    trained with ``train_heads`` stays trainable). A file without extra tensors (written with
    ``extra=False`` or before they existed) loads as before.

    Adapter classes are looked up in :mod:`decomp.adapters` and among the model's own adapters,
    so a class of your own loads into a model that already carries it.

    ``progress`` and logging as in :func:`apply` (the bar shows while adapters are built for an
    unadapted model; one INFO line per call). ``branch`` is :func:`apply`'s, for the adapters
    this call registers (a model that already carries adapters keeps their forward).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a safetensors file, not an adapter file written by
            :func:`save_adapter`, or its metadata is malformed (missing, not JSON, wrong structure
            or types, unknown keys, an adapter class :mod:`decomp.adapters` does not have, a
            config the class rejects); or the file does not match ``model`` (the message lists
            every mismatch, a value an adapter refuses included); for an unadapted model, the
            file names a layer the model lacks, of another weight shape or type, or one that
            cannot take an adapter (see :func:`apply`); or a frozen factor rebuilt from the
            model's weight differs from the one the adapter was saved with (another pretrained
            weight, or a decomposition not reproducible here: save with ``factors=True``).
        TypeError: ``model`` is wrapped in ``DistributedDataParallel`` and has no adapters yet
            (load into the model before wrapping it); ``progress`` not a bool or None;
            ``branch`` not a bool.
        ImportError: ``progress=True`` without ``tqdm`` installed.

    Example:
        >>> import tempfile, pathlib
        >>> from decomp.adapters import AtomParam, apply, load_adapter, save_adapter
        >>> model = apply(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3)), AtomParam, ["0"])
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "adapter.safetensors"
        >>> save_adapter(model, path)
        >>> other = apply(torch.nn.Sequential(torch.nn.Conv2d(2, 5, 3)), AtomParam, ["0"])
        >>> load_adapter(other, path)
        Traceback (most recent call last):
        ...
        ValueError: adapter file ... does not match the model: layer '0': weight shape ...
    """
    _check_progress(progress)
    check_bool(branch, "branch")
    root = _unwrap(model, "load_adapter")
    entries, extra_entries, rebuilt, saved = _read_adapter_file(path)
    extra = {entry["key"]: saved.pop(entry["key"]) for entry in extra_entries}
    entries, saved = _without_wrapper_prefixes(entries, saved, root)
    described = _described_adapters(entries, path, root)
    # Compare configs as the classes see them: a key left at its default, 4 for 4.0, are equal.
    # Under their current names too: a file that says SNELLA (or alpha=) matches SNELLAParam.
    entries = [
        {
            **entry,
            "adapter": type(adapter).__name__,
            "config": json.loads(json.dumps(adapter.config(), default=repr)),
        }
        for entry, adapter in zip(entries, described)
    ]

    if adapted_layers(root):
        _check_match(root, entries, saved, path, extra_entries, extra, rebuilt)
        _copy_tensors(root, saved)
        _copy_extra(root, extra_entries, extra)
        logger.info(
            "load_adapter: %d adapters and %d extra tensors from %s into the model's own",
            len(entries), len(extra), path,
        )
        return model

    _unwrap(model, "load_adapter (into a model without adapters)", changes_parameters=True)
    planned = _plan_described(root, entries, described, path)
    registered = _register(planned, progress)
    try:
        # Tensor shapes, and the rebuilt buffers, are only known once the adapters are built.
        _check_match(root, entries, saved, path, extra_entries, extra, rebuilt)
    except ValueError:
        _unregister(registered)
        raise
    _commit(root, registered, [], first_call=True, branch=branch)
    _copy_tensors(root, saved)
    _copy_extra(root, extra_entries, extra)
    _log_summary(f"load_adapter from {path}", root, planned, 0)
    return model


def _check_match(
    root: nn.Module,
    entries: list[dict[str, Any]],
    saved: dict[str, torch.Tensor],
    path: str | Path,
    extra_entries: list[dict[str, Any]],
    extra: dict[str, torch.Tensor],
    rebuilt: list[dict[str, Any]],
) -> None:
    """Raise listing every difference between the file and the model (adapters, extra tensors)."""
    for layer in adapted_layers(root):  # tensors an older version saved in another layout
        layer.adapter.upgrade_state(saved, layer.prefix)
    # A file from before adapters held their scalars with shape (1,) has them 0-d.
    saved.update(legacy_scalars_reshaped(saved, adapter_state_dict(root)))
    rebuilt_keys = {entry["key"] for entry in rebuilt}
    current = {
        key: value for key, value in adapter_state_dict(root).items() if key not in rebuilt_keys
    }
    problems = _mismatches(entries, _layer_metadata(root))
    problems = problems or _tensor_problems(saved, current)
    problems = problems or _value_problems(saved, root)
    problems = problems or _rebuild_problems(root, rebuilt)
    problems += _extra_problems(root, extra_entries, extra)
    if problems:
        raise ValueError(f"adapter file {path} does not match the model: " + "; ".join(problems))


def _rebuild_problems(root: nn.Module, rebuilt: list[dict[str, Any]]) -> list[str]:
    """Each buffer the file left out, as the model holds it (rebuilt), against its fingerprint."""
    buffers = dict(adapter_state_dict(root))
    declared = {
        layer.prefix + name
        for layer in adapted_layers(root)
        for name in layer.adapter.rebuilt_state()
    }
    problems, differing = [], []
    for entry in rebuilt:
        key, buffer = entry["key"], buffers.get(entry["key"])
        if buffer is None:
            problems.append(f"rebuilt tensor {key!r} is not an adapter buffer of the model")
            continue
        if key not in declared:
            problems.append(
                f"tensor {key!r} is left out of the file as rebuilt, but its adapter does not "
                "rebuild it (not in its class's rebuilt_buffers)"
            )
            continue
        saved_dtype = getattr(torch, entry["dtype"])
        same_kind = dtype_kind(saved_dtype) == dtype_kind(buffer.dtype)
        if list(buffer.shape) != entry["shape"] or not same_kind:
            problems.append(
                f"rebuilt tensor {key!r}: shape {entry['shape']} and dtype {entry['dtype']} in the "
                f"file, {list(buffer.shape)} and {buffer.dtype} in the model"
            )
            continue
        if mismatch := rebuild_mismatch(entry["fingerprint"], buffer, saved_dtype):
            differing.append(f"{key!r} ({mismatch})")
    if differing:
        problems.append(
            "the frozen factors rebuilt from the model's weight differ from those the adapter was "
            f"saved with: {', '.join(differing)}. The model's pretrained weight differs from the "
            "one the adapter was saved with, or the decomposition is not reproducible here "
            "(another device, LAPACK or library version); load into the pretrained model the "
            "adapter was tuned from, or save with save_adapter(..., factors=True), which stores "
            "the factors"
        )
    return problems


def _read_adapter_file(
    path: str | Path,
) -> tuple[
    list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, torch.Tensor]
]:
    """The validated layer, extra-tensor and rebuilt-buffer entries and the tensors of a file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            entries = _parse_metadata(metadata, path)
            saved = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    extra = _parse_extra(metadata, saved, path)
    return entries, extra, _parse_rebuilt(metadata, saved, path), saved


def _parse_rebuilt(
    metadata: dict[str, str], saved: dict[str, torch.Tensor], path: str | Path
) -> list[dict[str, Any]]:
    """The file's list of left-out buffers (empty for a file that stores every factor)."""
    if _REBUILT not in metadata:
        return []

    def problem(label: str, entry: dict[str, Any], seen: set[str]) -> str | None:
        key, shape, dtype, fingerprint = (entry[field] for field in _REBUILT_FIELDS)
        if not isinstance(key, str) or key in saved or key in seen:
            return f"{label}: key {key!r} must be a string, not stored in the file, listed once"
        if not isinstance(shape, list) or not all(_is_int(size) and size >= 0 for size in shape):
            return f"{label}: shape must be a list of ints >= 0, got {shape!r}"
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            return f"{label}: dtype must name a torch dtype, got {dtype!r}"
        if (
            not isinstance(fingerprint, list)
            or len(fingerprint) != FINGERPRINT_PROJECTIONS + 1
            or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool)
                for value in fingerprint
            )
        ):
            return f"{label}: fingerprint must be a list of numbers, got {fingerprint!r}"
        return None

    return _metadata_list(metadata, _REBUILT, _REBUILT_FIELDS, "rebuilt buffers", path, problem)


def _metadata_list(
    metadata: dict[str, str],
    name: str,
    fields: Sequence[str],
    what: str,
    path: str | Path,
    problem: Callable[[str, dict[str, Any], set[str]], str | None],
) -> list[dict[str, Any]]:
    """The JSON list ``metadata[name]`` of ``what``: objects with exactly ``fields``, each of which
    ``problem(label, entry, keys listed before it)`` finds nothing wrong with (``None``).

    Raises ``ValueError`` naming every entry that is wrong (invalid JSON: at once).
    """
    try:
        described = json.loads(metadata[name])
    except json.JSONDecodeError as error:
        raise ValueError(f"adapter file {path}: metadata {name!r} is not valid JSON ({error})") from error
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[str] = set()
    if not isinstance(described, list):
        problems.append(f"expected a list of {what}, got {type(described).__name__}")
        described = []
    for position, entry in enumerate(described):
        label = f"entry {position}"
        if not (isinstance(entry, dict) and sorted(entry) == sorted(fields)):
            problems.append(
                f"{label} must be an object with exactly the keys {list(fields)}, got {entry!r}"
            )
            continue
        found = problem(label, entry, seen)
        if found is not None:
            problems.append(found)
        if isinstance(entry["key"], str):
            seen.add(entry["key"])
        entries.append(entry)
    if problems:
        raise ValueError(f"adapter file {path}: malformed metadata {name!r}: " + "; ".join(problems))
    return entries


def _parse_extra(
    metadata: dict[str, str], saved: dict[str, torch.Tensor], path: str | Path
) -> list[dict[str, Any]]:
    """The file's ``"decomp.adapters.extra"`` list, checked against its tensors (none: ``[]``)."""
    if _EXTRA not in metadata:
        return []  # written before save_adapter stored extra tensors, or with extra=False

    def problem(label: str, entry: dict[str, Any], seen: set[str]) -> str | None:
        key, shape, trainable = entry["key"], entry["shape"], entry["trainable"]
        if not isinstance(key, str) or key not in saved:
            return f"{label}: key {key!r} is not a tensor of the file"
        if key in seen:
            return f"{label} repeats the key {key!r}"
        if not isinstance(shape, list) or list(saved[key].shape) != shape:
            return f"{label}: shape {shape!r} differs from the tensor's {list(saved[key].shape)}"
        if not isinstance(trainable, bool):
            return f"{label}: trainable must be true or false, got {trainable!r}"
        return None

    return _metadata_list(metadata, _EXTRA, _EXTRA_FIELDS, "tensor entries", path, problem)


def _extra_targets(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``root`` under each of its ``state_dict`` keys."""
    targets: dict[str, torch.Tensor] = dict(root.named_parameters(remove_duplicate=False))
    targets.update(_persistent_buffers(root, ""))
    return targets


def _extra_problems(
    root: nn.Module, entries: list[dict[str, Any]], extra: dict[str, torch.Tensor]
) -> list[str]:
    """Each extra tensor in the model, of its shape and dtype kind, finite in the model's dtype."""
    targets = _extra_targets(root)
    problems = []
    for entry in entries:
        key, value = entry["key"], extra[entry["key"]]
        target = targets.get(key)
        if target is None:
            problems.append(f"extra tensor {key!r} is not a parameter or buffer of the model")
        elif misfit := _misfit(f"extra tensor {key!r}", value, target):
            problems.append(misfit)
        elif entry["trainable"] and not isinstance(target, nn.Parameter):
            problems.append(
                f"extra tensor {key!r} is a trainable parameter in the file, a buffer in the model"
            )
        else:
            cast = {key: value.to(target.dtype)}
            problems += [f"extra {problem}" for problem in _nonfinite(cast)]
    return problems


def _copy_extra(
    root: nn.Module, entries: list[dict[str, Any]], extra: dict[str, torch.Tensor]
) -> None:
    """Copy the checked extra tensors in; parameters get the saved model's ``requires_grad``."""
    targets = _extra_targets(root)
    with torch.no_grad():
        for entry in entries:
            target = targets[entry["key"]]
            copy_whole_into(target, extra[entry["key"]])
            if isinstance(target, nn.Parameter):
                target.requires_grad_(entry["trainable"])


def _parse_metadata(metadata: dict[str, str], path: str | Path) -> list[dict[str, Any]]:
    found = metadata.get("format")
    if found not in (_FORMAT, _FORMAT_REBUILT):
        if isinstance(found, str) and found.startswith("decomp.adapters/"):
            raise ValueError(
                f"{path} is an adapter file of format {found!r}; this version reads {_FORMAT!r} "
                f"and {_FORMAT_REBUILT!r}"
            )
        raise ValueError(f"{path} is not an adapter file written by decomp.adapters.save_adapter")
    if "decomp.adapters" not in metadata:
        raise ValueError(
            f"adapter file {path}: its metadata lacks the 'decomp.adapters' entry "
            "(the JSON list of adapted layers that save_adapter writes)"
        )
    try:
        described = json.loads(metadata["decomp.adapters"])
    except json.JSONDecodeError as error:
        raise ValueError(
            f"adapter file {path}: metadata 'decomp.adapters' is not valid JSON ({error})"
        ) from error
    problems = _entry_problems(described)
    if problems:
        raise ValueError(
            f"adapter file {path}: malformed metadata 'decomp.adapters': " + "; ".join(problems)
        )
    return described


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_problems(described: object) -> list[str]:
    """What is wrong with the structure of a file's layer list (empty: nothing)."""
    if not isinstance(described, list) or not described:
        got = "an empty list" if isinstance(described, list) else type(described).__name__
        return [f"expected a non-empty list of layer entries, got {got}"]
    problems = []
    seen: set[tuple[str, int]] = set()
    for position, entry in enumerate(described):
        label = f"entry {position}"
        if not isinstance(entry, dict):
            problems.append(f"{label} is a {type(entry).__name__}, not an object")
            continue
        missing = [field for field in _ENTRY_FIELDS if field not in entry]
        unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
        if missing:
            problems.append(f"{label} lacks {missing}")
        if unknown:
            problems.append(f"{label} has unknown keys {unknown} (expected {list(_ENTRY_FIELDS)})")
        if missing:
            continue
        name, index, shape = entry["name"], entry["index"], entry["weight_shape"]
        checks = [
            (isinstance(name, str), "name must be a string", name),
            (_is_int(index) and index >= 0, "index must be an int >= 0", index),
            (isinstance(entry["adapter"], str), "adapter must be a class name", entry["adapter"]),
            (isinstance(entry["config"], dict), "config must be an object", entry["config"]),
            (
                isinstance(shape, list)
                and 2 <= len(shape) <= 5
                and all(_is_int(size) and size >= 1 for size in shape),
                "weight_shape must be a list of 2 to 5 positive ints",
                shape,
            ),
        ]
        failed = [f"{label}: {what}, got {value!r}" for ok, what, value in checks if not ok]
        problems.extend(failed)
        if not failed:
            if (name, index) in seen:
                problems.append(f"{label} repeats layer {name!r} slot {index}")
            seen.add((name, index))
    return problems


def _adapter_classes(root: nn.Module) -> dict[str, type[AdapterParam]]:
    """The registered adapter classes by every name a file may use, and those ``root`` carries."""
    classes = _classes_by_saved_name()
    for layer in adapted_layers(root):
        classes[type(layer.adapter).__name__] = type(layer.adapter)
    return classes


def _described_adapters(
    entries: list[dict[str, Any]], path: str | Path, root: nn.Module
) -> list[AdapterParam]:
    """One unbuilt adapter per entry, from its class and config (each class checks its config)."""
    classes = _adapter_classes(root)
    unknown = sorted({entry["adapter"] for entry in entries} - set(classes))
    if unknown:
        raise ValueError(
            f"adapter file {path} names adapter classes unknown to decomp.adapters: {unknown} "
            f"(known: {sorted(classes)}); register an adapter class of your own with "
            "decomp.adapters.register, or apply it first, then load"
        )
    adapters, problems = [], []
    for entry in entries:
        try:
            with warnings.catch_warnings():
                # An older file's option names (alpha=) are the file's, not the caller's, to update.
                warnings.simplefilter("ignore", DeprecationWarning)
                cls = classes[entry["adapter"]]
                adapters.append(cls(**{**cls.saved_defaults, **entry["config"]}))
        except (TypeError, ValueError) as error:
            problems.append(
                f"layer {entry['name']!r}: {entry['adapter']} rejects the config "
                f"{entry['config']} ({error})"
            )
    if problems:
        raise ValueError(f"adapter file {path}: " + "; ".join(problems))
    return adapters


def _strip_prefix(name: str, prefix: str) -> str | None:
    if name == prefix:
        return ""
    return name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None


def _without_wrapper_prefixes(
    entries: list[dict[str, Any]], saved: dict[str, torch.Tensor], root: nn.Module
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The file's names without a ``torch.compile``/``DataParallel`` prefix shared by all of them.

    Only a prefix that every layer name and tensor key carries and that is not a submodule of
    ``root`` is removed; the names are then checked against the model like any others.
    """
    children = {name for name, _ in root.named_children()}
    while True:
        for prefix in _WRAPPER_PREFIXES:
            names = [_strip_prefix(entry["name"], prefix) for entry in entries]
            if (
                prefix in children
                or None in names
                or not all(key.startswith(prefix + ".") for key in saved)
            ):
                continue
            entries = [{**entry, "name": name} for entry, name in zip(entries, names)]
            saved = {key[len(prefix) + 1 :]: value for key, value in saved.items()}
            break
        else:
            return entries, saved


def _plan_described(
    root: nn.Module,
    entries: list[dict[str, Any]],
    described: list[AdapterParam],
    path: str | Path,
) -> list[tuple[str, nn.Module, AdapterParam]]:
    """Where each adapter of a file goes in an unadapted model; raises before anything changes."""
    stacked = sorted({entry["name"] for entry in entries if entry["index"] != 0})
    if stacked:
        raise ValueError(
            f"adapter file {path} stacks several parametrizations on {stacked}; into a model "
            "without adapters load_adapter registers one adapter per layer: register the same "
            "stack first, then load"
        )
    modules = dict(root.named_modules())
    missing = sorted(entry["name"] for entry in entries if entry["name"] not in modules)
    if missing:
        raise ValueError(f"the adapter file adapts layers the model does not have: {missing}")
    layers = [(entry["name"], modules[entry["name"]]) for entry in entries]
    unsupported = [
        f"{name!r} ({parametrize.type_before_parametrizations(layer).__name__})"
        for name, layer in layers
        if not isinstance(layer, SUPPORTED_LAYERS)
    ]
    if unsupported:
        raise ValueError(
            f"the adapter file adapts {', '.join(unsupported)}; adapters support nn.Linear and "
            "nn.Conv1d/2d/3d"
        )
    holders = _holders(root)
    problems = [_adaptable_problem(name, layer, holders) for name, layer in layers]
    problems = [problem for problem in problems if problem is not None]
    if problems:
        raise ValueError(f"adapter file {path}: " + "; ".join(problems))
    reshaped = [
        f"{name}: {entry['weight_shape']} in the file, {list(layer.weight.shape)} in the model"
        for entry, (name, layer) in zip(entries, layers)
        if list(layer.weight.shape) != entry["weight_shape"]
    ]
    if reshaped:
        raise ValueError(
            "the adapter file's weight shapes differ from the model's: " + "; ".join(reshaped)
        )
    return [(name, layer, adapter) for (name, layer), adapter in zip(layers, described)]


def _tensor_problems(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> list[str]:
    """Every tensor present on both sides, with the same shape and the same kind of dtype."""
    problems = [
        f"tensor {key!r} only in the {'file' if key in saved else 'model'}"
        for key in sorted(set(saved) ^ set(current))
    ]
    for key in sorted(set(saved) & set(current)):
        if misfit := _misfit(f"tensor {key!r}", saved[key], current[key]):
            problems.append(misfit)
    return problems


def _misfit(label: str, in_file: torch.Tensor, in_model: torch.Tensor) -> str | None:
    """Why the file's tensor cannot be copied into the model's: shape, dtype kind, meta (or None)."""
    if in_file.shape != in_model.shape:
        return (
            f"{label}: shape {tuple(in_file.shape)} in the file, {tuple(in_model.shape)} in the "
            "model"
        )
    if dtype_kind(in_file.dtype) != dtype_kind(in_model.dtype):
        return (
            f"{label}: dtype {in_file.dtype} in the file, {in_model.dtype} in the model "
            f"({dtype_kind(in_file.dtype)} vs {dtype_kind(in_model.dtype)})"
        )
    if in_model.is_meta:
        return f"{label} is on the meta device in the model (no values)"
    return None


def _value_problems(saved: dict[str, torch.Tensor], root: nn.Module) -> list[str]:
    """Each adapter's verdict on the file's values for it, cast to the dtypes they will take."""
    problems = []
    for layer in adapted_layers(root):
        incoming = {}
        for key, current in layer.adapter.state_dict(keep_vars=True).items():
            value = saved.get(layer.prefix + key)
            if value is not None and same_kind_and_shape(value, current):
                incoming[key] = value.to(current.dtype)
        problems += [
            f"tensor {layer.prefix + key!r} {problem}"
            for key, problem in layer.adapter._state_problems(incoming).items()
        ]
    return problems


def _copy_tensors(root: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    targets = dict(_adapter_tensors(root))
    with torch.no_grad():
        for key, value in saved.items():
            copy_whole_into(targets[key], value)


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
