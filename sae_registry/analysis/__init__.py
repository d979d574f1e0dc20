"""Layer 8, what a registered dictionary is used for: a store encoded to codes (``encode.py``) and feature cards (``cards.py``, ``cards_page.py``)."""
