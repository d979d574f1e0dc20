"""MLflow pyfunc wrapper, logged as "models from code": MLflow stores this file, not a pickle.

Each registered dictionary is logged with this file as its code and ``sae.safetensors`` +
``config.json`` as its artifacts, so that ``mlflow.pyfunc.load_model("models:/family@alias")`` and
``mlflow models serve`` (``--env-manager local``, with sae-registry installed) answer with codes:
``predict(array [n, input_size]) -> codes [n, dict_size]``.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WEIGHTS_KEY = "sae.safetensors"
CONFIG_KEY = "config.json"


class DictionaryModel(PythonModel):
    """Encodes activations with a saved dictionary; reads only safetensors and JSON."""

    def load_context(self, context) -> None:
        from sae_registry.sae import SparseAutoencoder

        weights = Path(context.artifacts[WEIGHTS_KEY])
        config = Path(context.artifacts[CONFIG_KEY])
        if weights.parent != config.parent:  # SparseAutoencoder.load reads one directory
            raise RuntimeError(f"{weights} and {config} must lie in one directory")
        self.sae = SparseAutoencoder.load(weights.parent, device="auto")

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.sae.encode(x.to(self.sae.W_dec.device)).cpu().numpy()


mlflow.models.set_model(DictionaryModel())
