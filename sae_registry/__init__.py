"""sae-registry: train, compare, keep and reuse sparse autoencoders.

>>> import sae_registry
>>> d = sae_registry.load("minilm-l3@champion")     # a registered dictionary, by name
>>> codes = d.encode(x)                               # [batch, dict_size]

The public names are imported when first used (a module ``__getattr__``): ``import sae_registry``
and ``sae-registry --help`` import neither torch nor MLflow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ActivationStore": "store",
    "Dictionary": "dictionary",
    "SAEConfig": "sae",
    "SAERegistryError": "errors",
    "SparseAutoencoder": "sae",
    "SparseEncoder": "sae",
    "Tracking": "tracking",
    "evaluate": "downstream",  # downstream fidelity; the module is sae_registry.downstream
    "find": "registry",
    "load": "dictionary",
    "read_codes": "encode",  # codes files written by `sae-registry encode`
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .dictionary import Dictionary, load
    from .downstream import evaluate
    from .errors import SAERegistryError
    from .registry import find
    from .sae import SAEConfig, SparseAutoencoder, SparseEncoder
    from .store import ActivationStore
    from .tracking import Tracking


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
