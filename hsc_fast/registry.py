"""Named registries: the extension points (methods, CRF backends). Choices are read from them.

A ``Registry`` maps names to entries. The modules that register into it are imported when the
registry is first read (``providers``: dotted module paths), so that this leaf module -- and the
config that validates against it -- need not import the layers above: dependency inversion, as
entry points do. ``get`` raises ConfigError naming the config key and the registered choices.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterator

from hsc_fast.errors import ConfigError


class Registry:
    """name -> entry, filled by ``register`` calls in the modules of ``providers``."""

    def __init__(self, key: str, *providers: str):
        self.key = key              # the config key choosing an entry, for error messages
        self.providers = providers  # modules whose import registers every entry
        self._entries: dict[str, Any] = {}
        self._loaded = False

    def register(self, name: str, entry: Any) -> Any:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for provider in self.providers:
                importlib.import_module(provider)

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        self._load()
        return tuple(self._entries)

    def get(self, name: str) -> Any:
        self._load()
        if name not in self._entries:
            raise ConfigError(f"config key '{self.key}': {name!r} is not one of {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


METHODS = Registry("loss.method", "hsc_fast.losses.methods")
# hsc_fast.crf.backends: the plug-in folder (one file per added backend), after the built-ins.
CRF_BACKENDS = Registry("seeds.crf.backend", "hsc_fast.crf", "hsc_fast.crf.backends")  # and deeplab.crf.backend
TRAIN_CRF_BACKENDS = Registry("loss.crf.backend", "hsc_fast.crf.train", "hsc_fast.crf.backends")
