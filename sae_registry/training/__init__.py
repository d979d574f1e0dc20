"""Layer 6, training: the step loop for one dictionary or a pack of them, evaluations during training (``loop.py``) and checkpoints (``checkpoints.py``); no MLflow, no Ray."""
