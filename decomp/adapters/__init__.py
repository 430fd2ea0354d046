"""decomp.adapters: parametrizations for fine-tuning conv and linear layers.

Each adapter is an ``nn.Module`` used as
``parametrize.register_parametrization(layer, "weight", XParam(...))`` on ``nn.Linear`` and
``nn.Conv1d/2d/3d`` (any groups, dilation and padding mode: adapters act on the weight, so the
layer's own forward is untouched). :mod:`decomp.adapters.model` adds the model-level helpers.
"""

from .._deprecation import deprecated_attributes
from .atom import AtomParam
from .base import AdapterParam
from .dct import DCTParam
from .export import merged_state_dict
from .kron import KronParam
from .ldu import LDUParam
from .lie import LieParam
from .model import adapter_state_dict, apply, load_adapter, merge, report, save_adapter, trainable_parameters
from .snella import _DEPRECATED_NAMES, Allocator, SNELLAParam, SNELLParam
from .svd import SVDParam
from .tucker import TuckerParam

__all__ = [
    "AdapterParam",
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
]

# Old class names, one release (module __getattr__: absent from vars() and __all__). Code that
# resolves saved class names (load_adapter) maps them through _DEPRECATED_NAMES first.
__getattr__ = deprecated_attributes(__name__, _DEPRECATED_NAMES, globals())
