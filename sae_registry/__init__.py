"""sae-registry: train, compare, keep and reuse sparse autoencoders."""

from .errors import SAERegistryError
from .sae import SAEConfig, SparseAutoencoder, SparseEncoder
from .store import ActivationStore

__version__ = "0.1.0"
__all__ = ["ActivationStore", "SAEConfig", "SAERegistryError", "SparseAutoencoder", "SparseEncoder"]
