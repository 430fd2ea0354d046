"""Old names kept for one release: one mechanism for keywords, option values and module attributes.

Every renamed name behaves exactly as its new name and emits a ``DeprecationWarning`` that names
the replacement; giving both the old and the new name of one option raises ``TypeError`` (which
value to use would be a guess). Used by :mod:`decomp.adapters` and :mod:`optim` alike, so every
rename reads and fails the same way.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["deprecated_attributes", "renamed_arguments", "renamed_keywords", "renamed_value"]

ClassT = TypeVar("ClassT", bound=type)


def renamed_keywords(
    options: Mapping[str, Any], renames: Mapping[str, str], owner: str, stacklevel: int = 3
) -> dict[str, Any]:
    """``options`` with every old key of ``renames`` (old -> new) replaced by its new name.

    Each old key found emits a ``DeprecationWarning`` naming the new one; ``TypeError`` if an old
    key and its new name are both given. Keys keep their order; other keys are untouched.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed_keywords({"alpha": 2.0, "seed": 1}, {"alpha": "scale"}, "DCTParam")
        {'scale': 2.0, 'seed': 1}
        >>> print(caught[0].message)
        DCTParam: 'alpha' is deprecated, use 'scale' (same meaning); 'alpha' will be removed in the next release
    """
    renamed: dict[str, Any] = {}
    for key, value in options.items():
        new = renames.get(key) if isinstance(key, str) else None
        if new is None:
            renamed[key] = value
            continue
        if new in options:
            raise TypeError(
                f"{owner} got both {key!r} and {new!r}: {key!r} is the deprecated name of "
                f"{new!r}, pass {new!r} only"
            )
        warnings.warn(
            f"{owner}: {key!r} is deprecated, use {new!r} (same meaning); {key!r} will be removed "
            "in the next release",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        renamed[new] = value
    return renamed


def renamed_arguments(**renames: str) -> Callable[[ClassT], ClassT]:
    """Class decorator: ``cls(old=value)`` means ``cls(new=value)``, with a ``DeprecationWarning``.

    Wraps ``cls.__init__`` outermost, so the constructor's own checks (the adapters' unknown-keyword
    ``TypeError`` naming the nearest option) see the new name only, and ``inspect.signature(cls)``
    shows the new names only.

    Example:
        >>> @renamed_arguments(alpha="scale")
        ... class Scaled:
        ...     def __init__(self, scale: float = 1.0) -> None:
        ...         self.scale = scale
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     Scaled(alpha=3.0).scale
        3.0
    """

    def decorate(cls: ClassT) -> ClassT:
        init = cls.__init__

        @functools.wraps(init)
        def init_with_old_names(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **renamed_keywords(kwargs, renames, type(self).__name__))

        cls.__init__ = init_with_old_names  # type: ignore[misc]
        return cls

    return decorate


def renamed_value(
    value: Any, renames: Mapping[Any, Any], name: str, owner: str, stacklevel: int = 3
) -> Any:
    """``value``, or its new spelling if it is an old one of ``renames`` (with a ``DeprecationWarning``).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     renamed_value("rsvd", {"rsvd": "randomized"}, "svd", "SVDProjectedAdam")
        'randomized'
    """
    if not isinstance(value, str) or value not in renames:
        return value
    new = renames[value]
    warnings.warn(
        f"{owner}: {name}={value!r} is deprecated, use {name}={new!r} (same meaning); {value!r} "
        "will be removed in the next release",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return new


def deprecated_attributes(
    module: str, aliases: Mapping[str, str], namespace: Mapping[str, Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` that resolves each old name of ``aliases`` (old -> new) with a warning.

    ``namespace`` is the module's ``globals()``, where the new names live. Module ``__getattr__``
    runs only for names the module does not define, so the old names stay out of ``vars(module)``
    and ``from module import *``.

    Example:
        >>> __getattr__ = deprecated_attributes("pkg", {"Old": "New"}, {"New": int})
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     __getattr__("Old")
        <class 'int'>
    """

    def module_getattr(name: str) -> Any:
        new = aliases.get(name)
        if new is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} is deprecated, use {module}.{new} (the same class); {name!r} will be "
            "removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return namespace[new]

    return module_getattr
