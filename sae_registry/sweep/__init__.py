"""Layer 8, sweeps: a spec to a Ray Tune grid of packs (``driver.py``), one trial (``trial.py``), what a running sweep shows (``progress.py``).

``sae_registry.sweep.run`` and ``SweepSpec`` are imported on first use.
"""

from .._util.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"run": "driver", "SweepSpec": "driver"}, globals())
