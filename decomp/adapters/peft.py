r"""Every adapter of :mod:`decomp.adapters` through peft's own workflow (peft is an optional extra).

Importing this module registers one peft method, ``"DECOMP"``, whose config names the adapter
class and its options:

.. code-block:: python

    import decomp.adapters.peft  # registers the method with peft
    from decomp.adapters.peft import DecompConfig
    from peft import get_peft_model

    config = DecompConfig(method="AtomParam", options={"num_atoms": 4},
                          target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    model = get_peft_model(model, config)

From there everything is peft's: ``print_trainable_parameters``, ``disable_adapter()``,
``merge_and_unload()``, ``unload()``, ``add_adapter``/``set_adapter``/``delete_adapter``,
``save_pretrained`` (``adapter_config.json`` carries ``method`` and every option) and
``PeftModel.from_pretrained`` (after ``import decomp.adapters.peft``).

Each targeted ``nn.Linear``/``nn.Conv1d/2d/3d`` is wrapped in a :class:`DecompLayer` that holds,
per adapter name, one :class:`~decomp.adapters.AdapterParam` built from the layer's weight
(``XParam.from_weight(weight, **options)``, exactly what :func:`decomp.adapters.apply` registers)
and computes the layer's own forward with the adapted weight :math:`W' = A(W)`
(``torch.func.functional_call``), so groups, dilation, stride and ``padding_mode`` are those of
the layer. Several active adapters compose in the order they are listed,
:math:`W' = A_k(\cdots A_1(W))`, which is also what merging them one after the other writes.
Merging writes :math:`A(W)` into the base weight; unmerging writes back
``A.right_inverse(A(W))``, the weight that the adapter maps to the merged one. Every built-in
adapter's update depends on the weight's shape and dtype only, so this is the pretrained weight to
float rounding (:math:`(W + \Delta) - \Delta`; LieParam's :math:`(W \odot e^{\Delta}) \oslash
e^{\Delta}`); the tests check each class.

What peft 0.21 cannot express without patching, and what this module does instead:

* ``peft.utils.register_peft_method`` accepts only a member of the closed ``PeftType`` enum, and
  adding a member to a Python enum means patching its internals. ``PeftType`` is a ``str`` enum,
  so peft's registries (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``, ``..._TUNER_MAPPING``,
  ``..._PREFIX_MAPPING``) find an entry stored under the plain string ``"DECOMP"`` by
  ``config.peft_type`` exactly as they find a member: this module writes those three entries (what
  ``register_peft_method`` itself writes) and leaves the enum alone. Consequences:
  ``config.peft_type`` is the string ``"DECOMP"``, not a ``PeftType``; ``PeftType("DECOMP")``
  raises; the method is not registered for ``PeftMixedModel``.
* peft's ``target_modules=None`` means "peft's default for this model type"; there is no such
  table for our method, so ``None`` means the default of :func:`decomp.adapters.apply`: every
  ``nn.Linear``/``nn.Conv1d/2d/3d`` except the model's output layer.
* Adapter files hold O(trainable) numbers, as :func:`decomp.adapters.save_adapter`'s: a frozen
  buffer that the adapter rebuilds from the pretrained weight (its class's
  :attr:`~decomp.adapters.AdapterParam.rebuilt_buffers`) is stored as its 9-number
  :func:`~decomp.adapters.base.buffer_fingerprint` under the buffer's key + ``".fingerprint"``;
  loading rebuilds the buffer from the model's weight and raises ``ValueError`` when it differs
  from the saved one (a different pretrained model). Other buffers are stored as they are.

Options must be JSON values (``adapter_config.json`` stores them); an adapter that needs a Python
object as an option (a callable) is reached through :func:`decomp.adapters.apply` with a factory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

try:
    from peft.config import PeftConfig
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
except ImportError as error:  # peft is an optional extra
    raise ImportError(
        "decomp.adapters.peft needs peft (>= 0.21): pip install decomp-optim[peft]"
    ) from error

import torch
from torch import nn

from .. import adapters as _adapters
from .._checks import _all_finite
from .._select import SUPPORTED_LAYERS, output_layer
from .base import AdapterParam, buffer_fingerprint, rebuild_mismatch
from .registry import registered

__all__ = ["PEFT_TYPE", "DecompConfig", "DecompLayer", "DecompModel", "adapter_class"]

PEFT_TYPE = "DECOMP"
"""The ``peft_type`` of :class:`DecompConfig` (a plain string: see the module docstring)."""

_PREFIX = "decomp_"
_ADAPTERS = "decomp_adapters"  # the DecompLayer attribute holding the adapters by name
_JSON_SCALARS = (str, int, float, bool, type(None))
_FINGERPRINT = ".fingerprint"  # saved in place of a rebuilt buffer: key + this suffix
_PEFT_PREFIX = "base_model.model."  # what a PeftModel adds to the wrapped model's keys


def _subclasses(root: type) -> list[type]:
    found, stack = [], [root]
    while stack:
        for child in stack.pop().__subclasses__():
            found.append(child)
            stack.append(child)
    return found


def _is_adapter_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, AdapterParam) and value is not AdapterParam


def _method_name(cls: type[AdapterParam]) -> str:
    """The name a config stores for ``cls``: its registered name, else ``module.QualName``."""
    for name, value in registered().items():
        if value is cls:
            return name
    return f"{cls.__module__}.{cls.__qualname__}"


def adapter_class(method: str | type[AdapterParam]) -> type[AdapterParam]:
    """The adapter class a :class:`DecompConfig` ``method`` names.

    ``method`` is a registered name (:func:`decomp.adapters.registered`: the built-in
    ``"AtomParam"``, ``"LDUParam"``, ... and classes of your own registered with
    :func:`decomp.adapters.register`) or, for an unregistered
    :class:`~decomp.adapters.AdapterParam` subclass, ``"module.QualName"`` of a class whose module
    is already imported (nothing is imported here, so an adapter config file
    cannot make this module import code). A class is returned as it is.

    Example:
        >>> adapter_class("AtomParam").__name__
        'AtomParam'

    Raises:
        ValueError: no such adapter class (the message lists the registered ones).
        TypeError: ``method`` is neither a string nor an ``AdapterParam`` subclass.
    """
    if isinstance(method, type):
        if _is_adapter_class(method):
            return method
        raise TypeError(f"method must be an AdapterParam subclass, got {method.__name__}")
    if not isinstance(method, str):
        raise TypeError(f"method must be an adapter class name (str), got {type(method).__name__}")
    public = registered()
    if method in public:
        return public[method]
    # A deprecated old name (SNELL): decomp.adapters resolves it with a DeprecationWarning.
    value = getattr(_adapters, method, None) if method.isidentifier() else None
    if _is_adapter_class(value):
        return value
    for cls in _subclasses(AdapterParam):
        if f"{cls.__module__}.{cls.__qualname__}" == method:
            return cls
    raise ValueError(
        f"method={method!r} names no adapter class: use one of {sorted(public)} or "
        "'module.QualName' of an AdapterParam subclass whose module is imported"
    )


def _json_value(value: Any, where: str) -> Any:
    """``value`` as ``adapter_config.json`` stores and gives it back (tuples as lists), or ``TypeError``.

    Storing the list at once means the adapter built now takes exactly the options that
    ``from_pretrained`` will pass it.
    """
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise TypeError(
        f"{where} is a {type(value).__name__}; adapter_config.json stores JSON values only "
        "(numbers, strings, booleans, None and lists of them). For a Python object (a callable) "
        "use decomp.adapters.apply with a factory instead"
    )


@dataclass
class DecompConfig(PeftConfig):
    """peft config of one :mod:`decomp.adapters` method: the class, its options, peft's targeting.

    Args:
        method: the adapter class, by its public name in :mod:`decomp.adapters` (``"AtomParam"``,
            ``"SNELLAParam"``, ``"LieParam"``, ``"TuckerParam"``, ``"KronParam"``, ``"LDUParam"``,
            ``"DCTParam"``, ``"SVDParam"``, ...) or the class itself (stored by name).
        options: the class's keyword arguments (``{"num_atoms": 4}``), JSON values; checked by
            the class's constructor here (an unknown option raises ``TypeError`` naming the
            nearest one) and stored complete: every option of the class, defaults included, under
            its current name.
        target_modules: peft's forms: a list of names matched as suffixes of qualified module
            names, a regex string (full match) or ``"all-linear"``; ``None``: every
            ``nn.Linear``/``nn.Conv1d/2d/3d`` except the output layer (as
            :func:`decomp.adapters.apply`).
        exclude_modules: modules not to adapt, in the same forms (not ``"all-linear"``).
        modules_to_save: modules trained in full and stored in the adapter file (a classifier).

    Example:
        >>> config = DecompConfig(method="AtomParam", options={"num_atoms": 4}, target_modules=["fc"])
        >>> config.peft_type, config.method
        ('DECOMP', 'AtomParam')
        >>> config.options
        {'num_atoms': 4, 'levels': 1, 'sub_atoms': None, 'block': None, 'channel_block': 1, 'scale': None}
    """

    method: str = field(default="", metadata={"help": "adapter class name in decomp.adapters"})
    options: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the class"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "list of module-name suffixes, a regex or 'all-linear'"}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "list of module-name suffixes or a regex"}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "modules trained in full and saved with the adapter"}
    )
    # peft's target matcher reads this field; this method adapts modules, not bare parameters.
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "unsupported: must stay None (adapt modules instead)"}
    )

    def __post_init__(self) -> None:
        # peft stamps peft_version on every config it creates, so one that arrives stamped was
        # read from a file (adapter_config.json) and its options are those of the release that
        # wrote it.
        from_file = self.peft_version is not None
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.method is None or self.method == "":
            raise ValueError(
                "DecompConfig needs method=, the adapter class name (one of "
                f"{sorted(registered())})"
            )
        cls = adapter_class(self.method)
        self.method = _method_name(cls)
        if not isinstance(self.options, dict):
            raise TypeError(f"options must be a dict of keyword arguments, got {type(self.options).__name__}")
        for key, value in self.options.items():
            _json_value(value, f"options[{key!r}]")
        # Every option, defaults included, under its current name: the constructor validates them
        # (now, not at injection) and the saved file rebuilds the same adapter even if a later
        # release changes a default. A file's options lack only those added after it was
        # written, which mean what the class says they meant before (saved_defaults).
        options = {**cls.saved_defaults, **self.options} if from_file else self.options
        self.options = {
            key: _json_value(value, f"{cls.__name__} option {key!r}")
            for key, value in cls(**options).config().items()
        }
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple, list)):
                setattr(self, name, sorted(value))  # a copy: peft rewrites the config's own list
        if self.target_parameters is not None:
            raise ValueError(
                f"target_parameters={self.target_parameters!r}: the peft method {PEFT_TYPE} adapts "
                "modules (target_modules), not bare parameters"
            )
        if isinstance(self.exclude_modules, str) and self.exclude_modules.lower() == "all-linear":
            raise ValueError("exclude_modules='all-linear' would exclude every target")

    def adapter(self, weight: torch.Tensor) -> AdapterParam:
        """The adapter this config builds for ``weight`` (``XParam.from_weight(weight, **options)``)."""
        return adapter_class(self.method).from_weight(weight, **self.options)


class DecompLayer(nn.Module, BaseTunerLayer):
    r"""A linear or conv layer with named :class:`~decomp.adapters.AdapterParam`\ s on its weight.

    ``forward(x)`` is the base layer's own forward with the weight :math:`A_k(\cdots A_1(W))` of
    the active adapters (the base layer itself when adapters are disabled or merged); ``x`` has
    the shape the base layer takes. On an ``nn.Linear`` whose active adapters all have a branch
    form (:attr:`~decomp.adapters.AdapterParam.has_branch`) that is computed as
    :math:`x W^\top + b + \sum_k x \Delta W_k^\top` with their
    :meth:`~decomp.adapters.AdapterParam.branch`, never forming the adapted weight, as native
    :func:`~decomp.adapters.apply`'s default and peft's LoRA do (a branch update does not depend on
    the weight it is added to, so the chain is the sum of the updates). peft creates these
    layers; the example shows one alone.

    Example:
        >>> layer = DecompLayer(torch.nn.Conv2d(4, 6, 3, padding_mode="reflect", padding=1), "default")
        >>> layer.update_layer("default", DecompConfig(method="LDUParam", target_modules=["conv"]))
        >>> x = torch.randn(2, 4, 5, 5)
        >>> torch.equal(layer(x), layer.base_layer(x))  # the update starts at zero
        True
    """

    adapter_layer_names = (_ADAPTERS,)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(
                f"the peft method {PEFT_TYPE} adapts nn.Linear and nn.Conv1d/2d/3d layers, got "
                f"{type(base_layer).__name__}; leave it out of target_modules"
            )
        self.base_layer = base_layer
        self.decomp_adapters = nn.ModuleDict()
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []

    def update_layer(self, adapter_name: str, config: DecompConfig) -> None:
        """Build the adapter ``adapter_name`` of ``config`` from the base layer's weight."""
        if self.merged:
            raise ValueError(
                f"cannot add adapter {adapter_name!r} while {self.merged_adapters} are merged into "
                "the weight: unmerge first (model.unmerge_adapter())"
            )
        self.decomp_adapters[adapter_name] = config.adapter(self.get_base_layer().weight.detach())
        self.set_adapter(self.active_adapters)

    def adapted_weight(self) -> torch.Tensor:
        """The base weight through the active adapters, in the order they are listed."""
        weight = self.get_base_layer().weight
        for name in self.active_adapters:
            if name in self.decomp_adapters:
                weight = self.decomp_adapters[name](weight)
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [self.decomp_adapters[name] for name in self.active_adapters if name in self.decomp_adapters]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if type(self.base_layer).forward is nn.Linear.forward and all(adapter.has_branch for adapter in active):
            output = self.base_layer(x, *args, **kwargs)
            for adapter in active:
                output = output + adapter.branch(x)
            return output
        weight = self.adapted_weight()
        return torch.func.functional_call(self.base_layer, {"weight": weight}, (x, *args), kwargs)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the adapters (default: the active ones) into the base weight, in order."""
        names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in names:
            if name not in self.decomp_adapters:
                continue
            merged = self.decomp_adapters[name](base.weight)
            if safe_merge and not _all_finite(merged):
                raise ValueError(f"NaNs or Infs in the weight merged with adapter {name!r}: not merged")
            base.weight.data = merged
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`, last merged first, with each adapter's ``right_inverse``."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data = self.decomp_adapters[name].right_inverse(base.weight)

    def __repr__(self) -> str:
        return "decomp." + super().__repr__()


class DecompModel(BaseTuner):
    """peft tuner of :class:`DecompConfig`: wraps every targeted layer in a :class:`DecompLayer`.

    peft builds it from the config (``get_peft_model``, ``PeftModel.from_pretrained``,
    ``inject_adapter_in_model``); it is not called directly.

    Example:
        >>> from peft import get_peft_model
        >>> config = DecompConfig(method="DCTParam", target_modules=["0"])
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3)), config)
        >>> type(model.base_model).__name__, type(model.base_model.model[0]).__name__
        ('DecompModel', 'DecompLayer')
    """

    prefix: str = _PREFIX
    tuner_layer_cls = DecompLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: DecompConfig, model_config: dict) -> DecompConfig:
        return peft_config  # target_modules=None is resolved against the model in _prepare_model

    def _prepare_model(self, peft_config: DecompConfig, model: nn.Module) -> None:
        if peft_config.target_modules is None:
            head = output_layer(model)
            inside_ours = {
                f"{name}.base_layer"
                for name, module in model.named_modules()
                if isinstance(module, DecompLayer)
            }
            peft_config.target_modules = sorted(
                name
                for name, module in model.named_modules()
                if name
                and name not in inside_ours
                and isinstance(module, (*SUPPORTED_LAYERS, DecompLayer))
                and module is not head
            )

    def _create_and_replace(
        self,
        peft_config: DecompConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, DecompLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = DecompLayer(target, adapter_name)
        new_module.update_layer(adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter trains once it is set active
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: DecompConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        # A buffer the adapter rebuilds from the pretrained weight (its class's rebuilt_buffers)
        # is saved as its fingerprint, under the buffer's key + _FINGERPRINT, so files hold
        # O(trainable) numbers; loading rebuilds it and checks it against the fingerprint.
        selected = super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        for key, buffer in _rebuilt_buffers(model, adapter_name).items():
            if key in selected:
                del selected[key]
                selected[key + _FINGERPRINT] = torch.tensor(buffer_fingerprint(buffer), dtype=torch.float64)
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: DecompConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        state_dict = dict(state_dict)
        rebuilt = {}
        for key, buffer in _rebuilt_buffers(model, adapter_name).items():
            saved = cls._remove_adapter_name_from_key(key, adapter_name)
            rebuilt[saved] = rebuilt[saved.removeprefix(_PEFT_PREFIX)] = (key, buffer)
        differing = []
        for saved_key in [key for key in state_dict if key.endswith(_FINGERPRINT)]:
            buffer_key = saved_key.removesuffix(_FINGERPRINT)
            if buffer_key not in rebuilt:
                continue  # not an adapter buffer of this model: peft reports it as unexpected
            fingerprint = state_dict.pop(saved_key).tolist()
            key, buffer = rebuilt[buffer_key]
            if mismatch := rebuild_mismatch(fingerprint, buffer):
                differing.append(f"{key!r} ({mismatch})")
            state_dict[buffer_key] = buffer
        if differing:
            raise ValueError(
                f"adapter {adapter_name!r}: the frozen factors rebuilt from the model's weights differ "
                f"from those it was saved with: {', '.join(differing)}. Load it into the pretrained "
                "model it was tuned from"
            )
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # An adapter's tensors sit one or two levels below its name (TuckerParam's factors.0), so
        # the name is taken out after the container, not from the key's end as peft's default does.
        infix = f".{_ADAPTERS}.{adapter_name}."
        if infix in key:
            return key.replace(infix, f".{_ADAPTERS}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


def _rebuilt_buffers(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The rebuilt buffers of adapter ``adapter_name`` in ``model``, by ``model.state_dict()`` key."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, DecompLayer) and adapter_name in module.decomp_adapters:
            prefix = f"{module_name}.{_ADAPTERS}.{adapter_name}.".removeprefix(".")
            for key, buffer in module.decomp_adapters[adapter_name].rebuilt_state().items():
                found[prefix + key] = buffer
    return found


def _register() -> None:
    """What ``peft.utils.register_peft_method`` writes, under the plain string ``PEFT_TYPE``."""
    for mapping, value in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, DecompConfig),
        (PEFT_TYPE_TO_TUNER_MAPPING, DecompModel),
        (PEFT_TYPE_TO_PREFIX_MAPPING, _PREFIX),
    ):
        present = mapping.get(PEFT_TYPE)
        if present is not None and present is not value:
            raise RuntimeError(f"peft already has a method {PEFT_TYPE!r}: {present!r}")
        mapping[PEFT_TYPE] = value


_register()
