"""Layer 5, the numbers: reconstruction metrics (``reconstruction.py``), downstream fidelity (``downstream.py``, ``windows.py``) and plots (``plots.py``)."""
