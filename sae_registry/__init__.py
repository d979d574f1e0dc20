"""sae-registry: train, compare, keep and reuse sparse autoencoders.

>>> import sae_registry
>>> d = sae_registry.load("minilm-l3@champion")     # a registered dictionary, by name
>>> codes = d.encode(x)                               # [batch, dict_size]
"""

__version__ = "0.1.0"

from .errors import SAERegistryError  # noqa: E402
from .dictionary import Dictionary, load  # noqa: E402
from .downstream import evaluate  # noqa: E402  (downstream fidelity; the module is sae_registry.downstream)
from .registry import find  # noqa: E402
from .sae import SAEConfig, SparseAutoencoder, SparseEncoder  # noqa: E402
from .store import ActivationStore  # noqa: E402
from .tracking import Tracking  # noqa: E402

__all__ = [
    "ActivationStore",
    "Dictionary",
    "SAEConfig",
    "SAERegistryError",
    "SparseAutoencoder",
    "SparseEncoder",
    "Tracking",
    "evaluate",
    "find",
    "load",
]
