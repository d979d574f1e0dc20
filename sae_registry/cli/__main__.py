"""``python -m sae_registry.cli``."""

from .commands import main

main()
