"""Layer 4, harvesting: models and their hook points, texts, a harvest in one process (``local.py``) or on Ray (``on_ray.py``).

``sae_registry.harvest.harvest`` and the text helpers are imported on first use.
"""

from .._util.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "harvest": "local", "ensure_store": "local", "resolve_store": "local",
    "demo_texts": "texts", "read_texts": "texts",
}, globals())
