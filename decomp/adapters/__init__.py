"""decomp.adapters: parametrizations for fine-tuning conv and linear layers.

Each adapter is an ``nn.Module`` used as
``parametrize.register_parametrization(layer, "weight", XParam(...))`` on ``nn.Linear`` and
``nn.Conv1d/2d/3d`` (any groups, dilation and padding mode: adapters act on the weight, so the
layer's own forward is untouched). :mod:`decomp.adapters.model` adds the model-level helpers;
:func:`register` makes an adapter class of your own loadable by name (:mod:`decomp.adapters.registry`).
"""

from .._deprecation import deprecated_attributes
from .atom import AtomParam
from .base import AdapterParam, option
from .dct import DCTParam
from .export import merged_state_dict
from .kron import KronParam
from .ldu import LDUParam
from .lie import LieParam
from .model import adapter_state_dict, apply, load_adapter, merge, report, save_adapter, trainable_parameters
from .registry import _register_deprecated_name, register, registered
from .snella import _DEPRECATED_NAMES, Allocator, SNELLAParam, SNELLParam
from .svd import SVDParam
from .tucker import TuckerParam

__all__ = [
    "AdapterParam",
    "option",
    "AtomParam",
    "SNELLParam",
    "SNELLAParam",
    "Allocator",
    "LieParam",
    "TuckerParam",
    "KronParam",
    "LDUParam",
    "DCTParam",
    "SVDParam",
    "apply",
    "trainable_parameters",
    "report",
    "merge",
    "merged_state_dict",
    "adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "register",
    "registered",
]

# The classes adapter files and peft configs may name (decomp.adapters.registry).
for _cls in (
    AtomParam, DCTParam, KronParam, LDUParam, LieParam, SNELLParam, SNELLAParam, SVDParam, TuckerParam
):
    register(_cls)
for _old, _new in _DEPRECATED_NAMES.items():
    _register_deprecated_name(_old, _new)
del _cls, _old, _new

# Old class names, one release (module __getattr__: absent from vars() and __all__). Saved files
# naming them resolve through the registry's deprecated names, registered above.
__getattr__ = deprecated_attributes(__name__, _DEPRECATED_NAMES, globals())
