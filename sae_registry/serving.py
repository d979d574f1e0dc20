"""MLflow pyfunc wrapper, logged as "models from code": MLflow stores this file, not a pickle.

Each registered dictionary is logged with this file as its code and ``sae.safetensors`` +
``config.json`` as its artifacts, so that ``mlflow.pyfunc.load_model("models:/family@alias")`` and
``mlflow models serve`` answer with codes: ``predict(array [n, input_size]) -> codes [n, dict_size]``.

The model folder also carries the few modules that rebuild a dictionary, copied under the private
package name ``sae_registry_code`` (:func:`sae_registry.runs.shipped_code`): serving needs only torch,
safetensors and numpy, never resolves ``sae-registry`` on a package index (where anyone could have
claimed the name), and never shadows an installed sae-registry in the serving process.
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
        from sae_registry_code.sae import SparseAutoencoder  # the copy in the model folder's code/

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
