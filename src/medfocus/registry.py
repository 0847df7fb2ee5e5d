"""One small lazy registry, the same verbs for every kind of plug-in (attribution methods, datasets,
editors, CLI commands, LVLMs), in the spirit of timm's model registry.

An entry is either the object itself or a lazy ``"module:attribute"`` string, imported only when the
entry is first resolved, so optional dependencies cost nothing until used. The verbs:

* :meth:`LazyRegistry.register` adds an entry and **refuses a name that is taken** unless
  ``overwrite=True`` (a silent overwrite would swap a method under a user's feet);
* :meth:`LazyRegistry.resolve` returns the object (importing it), or raises
  :class:`~medfocus.errors.ConfigError` naming the registry, the name, and what is available or why
  the import failed;
* :meth:`LazyRegistry.names` lists the names, sorted; every ``list_*`` function of the package returns
  a ``{name: description}`` dict built from it (iterating gives the names).

The registry is a ``dict`` subclass so that ``name in registry``, ``registry[name]`` (the raw entry)
and test fixtures (``monkeypatch.setitem``) keep working.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from medfocus.errors import ConfigError

__all__ = ["LazyRegistry", "import_target", "lazy_exports"]

T = TypeVar("T")


def import_target(target: str) -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted). Raises ImportError or
    AttributeError (the callers turn them into a ConfigError with context)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ImportError(f"{target!r} is not of the form 'module:attribute'")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class LazyRegistry(dict, Generic[T]):
    """``name -> T | "module:attribute"`` with register/resolve/names (see module docstring).

    Args:
        kind: what the entries are, for messages (``"attribution method"``, ``"dataset"``...).
        entries: built-in entries.
        normalize: maps a user-given name to its key (e.g. ``str.lower``); default: unchanged.
    """

    def __init__(self, kind: str, entries: Mapping[str, T | str] | Iterable[tuple[str, T | str]] = (), *,
                 normalize: Callable[[str], str] | None = None) -> None:
        super().__init__(entries)
        self.kind = kind
        self._normalize = normalize or (lambda name: name)

    def key(self, name: str) -> str:
        """The registry key of a user-given name (no check that it exists)."""
        return self._normalize(str(name))

    def register(self, name: str, target: T | str, *, overwrite: bool = False) -> None:
        """Add ``target`` (the object or a lazy ``"module:attribute"`` string) under ``name``.

        Raises:
            ConfigError: ``name`` is taken and ``overwrite`` is false.
        """
        key = self.key(name)
        if key in self and not overwrite:
            raise ConfigError(f"{self.kind} {name!r} is already registered ({self[key]!r}); pass overwrite=True to replace it")
        self[key] = target

    def unregister(self, name: str) -> None:
        """Remove an entry (a no-op when absent)."""
        self.pop(self.key(name), None)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self)

    def require(self, name: str) -> str:
        """The key of ``name``; raises :class:`ConfigError` listing the available names when unknown."""
        key = self.key(name)
        if key not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return key

    def resolve(self, name: str) -> T:
        """The registered object (a lazy entry is imported now).

        Raises:
            ConfigError: unknown name, or the entry's module/attribute cannot be imported (the message
                says why, e.g. a missing optional dependency).
        """
        key = self.require(name)
        target = self[key]
        if not isinstance(target, str):
            return target
        try:
            return import_target(target)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{self.kind} {key!r} ({target}) could not be imported: {exc}") from exc


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose public names are imported on first use
    (PEP 562), like HF transformers' lazy ``__init__``: ``exports`` maps a name to its module.

    The package should also import the same names under ``typing.TYPE_CHECKING`` so that IDEs,
    type checkers and ``help()`` see them.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__
