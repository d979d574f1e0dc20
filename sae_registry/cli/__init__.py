"""Layer 9, the command line: thin commands (``commands.py``) whose options are generated from the configs (``options.py``).

Commands import the layers they call inside their bodies, so that ``sae-registry --help`` imports
neither torch nor MLflow: the one place where our own modules are imported lazily.
"""

from .commands import main

__all__ = ["main"]
