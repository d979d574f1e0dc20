"""Layer 2, the configurations: every option once (``options.py``: a dictionary, its training, a harvest) and the sweep spec (``sweep.py``); torch-free."""
