"""sae-registry: train, compare, keep and reuse sparse autoencoders.

>>> import sae_registry
>>> d = sae_registry.load("minilm-l3@champion")     # a registered dictionary, by name
>>> codes = d.encode(x)                               # [batch, dict_size]
>>> r = sae_registry.train(acts, dict_size=4096)      # acts: [n, d] tensor or array; family= registers it

The public names are imported when first used (a module ``__getattr__``): ``import sae_registry``
and ``sae-registry --help`` import neither torch nor MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._util.lazy import lazy_exports
from ._util.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "ActivationStore": "store.reader",
    "Dictionary": "registry.dictionary",
    "SAEConfig": "config.options",
    "SAERegistryError": "errors",
    "SparseAutoencoder": "model.sae",
    "SparseEncoder": "model.sae",
    "TrainConfig": "config.options",
    "Tracking": "registry.tracking",
    "evaluate": "metrics.downstream",  # downstream fidelity
    "find": "registry.versions",
    "load": "registry.dictionary",
    "read_codes": "analysis.encode",  # codes files written by `sae-registry encode`
    "train": "registry.runs",  # from an array or any activation source; registered with family=
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .analysis.encode import read_codes
    from .config.options import SAEConfig, TrainConfig
    from .errors import SAERegistryError
    from .metrics.downstream import evaluate
    from .model.sae import SparseAutoencoder, SparseEncoder
    from .registry.dictionary import Dictionary, load
    from .registry.runs import train
    from .registry.tracking import Tracking
    from .registry.versions import find
    from .store.reader import ActivationStore


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
