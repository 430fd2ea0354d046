"""The adapter classes that files and configs may name: one explicit registry, read by every loader.

An adapter file (:func:`~decomp.adapters.save_adapter`) and a peft ``adapter_config.json``
(:class:`~decomp.adapters.peft.DecompConfig`) store an adapter by its class name. Loading resolves
that name here, so a class of your own, defined outside the package, loads into a fresh model once
it is registered:

.. code-block:: python

    @decomp.adapters.register
    class ScaledLowRank(decomp.adapters.AdapterParam): ...

The built-in classes are registered by :mod:`decomp.adapters` itself. A name is a class's
``__name__``; the deprecated names of renamed classes (``SNELL`` -> ``SNELLParam``) resolve to
the class they now name. Registration is a process-wide, import-time act, as torch's
``register_*`` functions and peft's method registry are.
"""

from __future__ import annotations

from typing import TypeVar

from .base import AdapterParam

__all__ = ["register", "registered"]

AdapterClass = TypeVar("AdapterClass", bound=type)

_CLASSES: dict[str, type[AdapterParam]] = {}
_DEPRECATED: dict[str, str] = {}  # old name -> registered name


def register(cls: AdapterClass) -> AdapterClass:
    """Register the adapter class ``cls`` under its ``__name__``; returns ``cls`` (a class decorator).

    Registering the same class again does nothing.

    Example:
        >>> import decomp.adapters
        >>> decomp.adapters.register(decomp.adapters.AtomParam).__name__
        'AtomParam'

    Raises:
        TypeError: ``cls`` is not a subclass of :class:`~decomp.adapters.AdapterParam` (or is the
            base class itself).
        ValueError: another class is registered under the same name (two classes one file could
            name), or the name is a deprecated name of a registered class.
    """
    if not (isinstance(cls, type) and issubclass(cls, AdapterParam) and cls is not AdapterParam):
        shown = cls.__name__ if isinstance(cls, type) else type(cls).__name__
        raise TypeError(f"register takes an AdapterParam subclass, got {shown}")
    name = cls.__name__
    if name in _DEPRECATED:
        raise ValueError(
            f"cannot register {cls.__module__}.{cls.__qualname__} as {name!r}: saved files use "
            f"{name!r} as the deprecated name of {_DEPRECATED[name]}"
        )
    known = _CLASSES.get(name)
    if known is not None and known is not cls:
        raise ValueError(
            f"cannot register {cls.__module__}.{cls.__qualname__} as {name!r}: that name is "
            f"{known.__module__}.{known.__qualname__}, and an adapter file names its class by name alone"
        )
    _CLASSES[name] = cls
    return cls


def registered() -> dict[str, type[AdapterParam]]:
    """The registered adapter classes by name, sorted (a copy: registering goes through :func:`register`).

    Example:
        >>> import decomp.adapters
        >>> decomp.adapters.registered()["LDUParam"].__name__
        'LDUParam'
    """
    return dict(sorted(_CLASSES.items()))


def _register_deprecated_name(old: str, new: str) -> None:
    """Let files saved under ``old`` load as the registered class ``new`` (one release)."""
    if new not in _CLASSES:
        raise ValueError(f"deprecated name {old!r} must name a registered class, got {new!r}")
    if old in _CLASSES:
        raise ValueError(f"deprecated name {old!r} is a registered class name")
    _DEPRECATED[old] = new


def _classes_by_saved_name() -> dict[str, type[AdapterParam]]:
    """Every name a saved file may use: the registered names and the deprecated ones."""
    classes = registered()
    for old, new in _DEPRECATED.items():
        classes[old] = _CLASSES[new]
    return classes
