"""MLflow pyfunc wrapper, logged as "models from code": MLflow stores this file, not a pickle.

Each registered dictionary is logged with this file as its code and ``sae.safetensors`` +
``config.json`` as its artifacts, so that ``mlflow.pyfunc.load_model("models:/family@alias")`` and
``mlflow models serve`` answer with codes: ``predict(array [n, input_size]) -> codes [n, dict_size]``.

The model folder also carries the few modules that rebuild a dictionary, copied under the private
package name ``sae_registry_code`` (:func:`sae_registry.registry.runs.shipped_code`): serving needs only torch,
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
        from sae_registry_code.model.sae import SparseAutoencoder  # the copy in the model folder's code/

        weights = Path(context.artifacts[WEIGHTS_KEY])
        config = Path(context.artifacts[CONFIG_KEY])
        if weights.parent != config.parent:  # SparseAutoencoder.load reads one directory
            raise RuntimeError(f"{weights} and {config} must lie in one directory")
        self.sae = SparseAutoencoder.load(weights.parent, device="auto")

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """Codes ``[n, dict_size]`` of activations ``[n, input_size]`` (float32; a list of rows is accepted).

        The type hint tells MLflow what the input is (an array: no schema is inferred from it, the
        logged TensorSpec signature stands); the checks below refuse what the signature lets through
        with a message instead of a torch error: another width, not 2-D, NaN or Inf.
        """
        import torch

        x = _checked(model_input, self.sae.cfg.input_size)
        with torch.no_grad():
            return self.sae.encode(torch.from_numpy(x).to(self.sae.W_dec.device)).cpu().numpy()


def _checked(model_input, input_size: int) -> np.ndarray:
    """``model_input`` as a float32 array ``[n, input_size]`` of finite values, or an MLflow input error (HTTP 400)."""
    from mlflow.exceptions import MlflowException

    try:
        x = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise MlflowException.invalid_parameter_value(f"input must be an array of numbers: {e}") from None
    if x.ndim != 2 or x.shape[1] != input_size:
        raise MlflowException.invalid_parameter_value(
            f"input must have shape [n, {input_size}] (one row of activations per token), got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise MlflowException.invalid_parameter_value("input contains NaN or Inf values; drop or fix those rows first")
    return np.ascontiguousarray(x)


mlflow.models.set_model(DictionaryModel())
