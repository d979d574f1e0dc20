"""Layer 5, foreign formats: SAELens and dictionary_learning files, exported and imported with the weights mapped exactly (``formats.py``)."""
