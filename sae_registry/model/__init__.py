"""Layer 3, the model: the sparse autoencoder of the seed API (``sae.py``), its two files (``files.py``) and the folded form the field shares (``folded.py``): what ships inside each MLflow model."""
