"""A registered dictionary, ready to encode: :class:`Dictionary` and :func:`load` with its verified cache.

``load("family@alias")``, ``load("family/3")``, ``load("models:/family/3")``: asks the registry which
version that is, downloads its two files (``sae.safetensors`` + ``config.json``) once per version and
tracking server into a local cache, checks them against the SHA-256 recorded at registration, and
rebuilds the model. Never unpickles; never imports the training code, Ray or matplotlib.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config.options import SAEConfig
from ..errors import SAERegistryError
from ..model.files import CONFIG_FILE, WEIGHTS_FILE
from ..model.folded import SAEBenchConfig, Weights, folded_weights, saebench_config
from ..model.sae import SparseAutoencoder
from .tracking import Tracking, TrackingLike, lineage_of, sha256
from .versions import VersionInfo, resolve, resolve_embedded

__all__ = ["Dictionary", "cache_root", "load"]


def cache_root() -> Path:
    """``$SAE_REGISTRY_CACHE``, default ``~/.cache/sae-registry``."""
    return Path(os.environ.get("SAE_REGISTRY_CACHE", Path.home() / ".cache" / "sae-registry"))


def _cache_dir(tracking: Tracking, info: VersionInfo) -> Path:
    # Keyed on the server: two registries may each hold a different family/3.
    where = hashlib.sha256(tracking.uri.encode()).hexdigest()[:12]
    return cache_root() / where / info.family / info.version


def _verified(directory: Path, info: VersionInfo) -> bool:
    """Whether both files are present and match the checksums recorded at registration."""
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        path = directory / name
        expected = info.tags.get(f"sha256.{name}")
        if not path.is_file() or expected is None or sha256(path) != expected:
            return False
    return True


def _download(tracking: Tracking, info: VersionInfo, directory: Path) -> None:
    import mlflow.artifacts

    # The version's storage location, asked of this server: MLflow resolves ``models:/family/3`` URIs
    # on its global registry URI whatever tracking URI the download is given.
    where = tracking.client.get_model_version_download_uri(info.family, info.version)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=directory.parent))
    try:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            got = mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/artifacts/{name}", dst_path=str(tmp),
                                                      tracking_uri=tracking.uri)
            shutil.move(got, tmp / name)
        _swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, directory: Path) -> None:
    """Replace ``directory`` by the downloaded ``tmp`` (callers hold :func:`_version_lock`)."""
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


@contextmanager
def _version_lock(directory: Path) -> Iterator[None]:
    """One process at a time fetches a version into a shared cache (an advisory lock beside it).

    Without it, two processes loading the same version at once could each remove and replace the
    other's folder (``Directory not empty``). The lock file is left in place: removing it would race too.
    """
    import fcntl

    with open(directory.with_name(directory.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Dictionary:
    """A registered dictionary, ready to encode. Get one with :func:`load`.

    It is also an SAE as SAEBench's custom-SAE interface wants one (``sae_bench.custom_saes.base_sae``):
    ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``, ``encode``,
    ``decode``, ``forward`` (and calling it), ``device``, ``dtype``, ``to(device=, dtype=)`` and ``cfg``
    (``d_in``, ``d_sae``, ``model_name``, ``hook_name``, ``hook_layer``, ``architecture``, ...). The
    weights are the model's with its ``input_scale`` s folded in (see ``interchange/formats.py``):

        W_enc = s * encoder.weight.T    b_enc = encoder.bias    W_dec = W_dec / s    b_dec = b_dec / s

    so that on raw activations ``x [..., d_in]`` and codes ``f [..., d_sae]``

        encode(x) == TopK_k(ReLU((x - b_dec) @ W_enc + b_enc))     # sparsity l1: no TopK
        decode(f) == f @ W_dec + b_dec

    bit for bit when s is 1 (every imported dictionary), else to float32 rounding. They are tensors
    derived from ``sae`` (read-only views or copies, cached until :meth:`to`), not its parameters.
    Decoder rows have norm 1/s when the trainer kept them at unit norm.
    """

    name: str
    family: str
    version: str
    aliases: list[str]
    sae: SparseAutoencoder
    metrics: dict[str, float]
    lineage: dict[str, str]
    path: Path
    tags: dict[str, str] = field(repr=False, default_factory=dict)
    _folded: Weights | None = field(init=False, repr=False, compare=False, default=None)

    @property
    def config(self) -> SAEConfig:
        return self.sae.cfg

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.W_dec.dtype

    @property
    def cfg(self) -> SAEBenchConfig:
        """SAEBench's config view: shape, architecture, source model and hook (from the lineage)."""
        return saebench_config(self.sae.cfg, self.lineage, self.device, self.dtype)

    def _weights(self) -> Weights:
        if self._folded is None:
            self._folded = folded_weights(self.sae)
        return self._folded

    @property
    def W_enc(self) -> torch.Tensor:
        """``[d_in, d_sae]``, input_scale folded in (see the class docstring)."""
        return self._weights().W_enc

    @property
    def b_enc(self) -> torch.Tensor:
        """``[d_sae]``."""
        return self._weights().b_enc

    @property
    def W_dec(self) -> torch.Tensor:
        """``[d_sae, d_in]``, rows are the dictionary directions, input_scale folded in."""
        return self._weights().W_dec

    @property
    def b_dec(self) -> torch.Tensor:
        """``[d_in]``, input_scale folded in."""
        return self._weights().b_dec

    def _tensor(self, x) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(self.device, self.dtype)
        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device).to(self.dtype)

    @torch.no_grad()
    def encode(self, x) -> torch.Tensor:
        """Sparse codes ``[..., dict_size]`` of raw activations ``[..., input_size]``."""
        return self.sae.encode(self._tensor(x))

    @torch.no_grad()
    def encode_topk(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact codes ``(values, indices)``, each ``[batch, k]`` (top_k dictionaries)."""
        return self.sae.encode_topk(self._tensor(x))

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """Reconstruction ``[..., input_size]`` (raw units) of dense codes ``[..., dict_size]``."""
        return self.sae.decode(self._tensor(codes))

    @torch.no_grad()
    def reconstruct(self, x) -> torch.Tensor:
        return self.sae(self._tensor(x))

    def forward(self, x) -> torch.Tensor:
        """``decode(encode(x))``: the reconstruction (SAEBench calls the SAE itself)."""
        return self.reconstruct(x)

    __call__ = forward

    def to(self, *args, **kwargs) -> Dictionary:
        """Move and/or cast the model in place, as ``nn.Module.to``: ``to("cuda")``, ``to(dtype=torch.bfloat16)``."""
        self.sae.to(*args, **kwargs)
        self._folded = None
        return self


def load(name: str, *, device: str | torch.device = "cpu", tracking_uri: TrackingLike = None) -> Dictionary:
    """Fetch a registered dictionary by name and rebuild it on ``device``.

    ``load("family@champion")``, ``load("family/3")``, ``load("models:/family/3")``, from the registry
    at ``tracking_uri`` (a URI or a :class:`~sae_registry.registry.tracking.Tracking`; default
    ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` here). The two files are cached per server and version
    (``$SAE_REGISTRY_CACHE``, default ``~/.cache/sae-registry``) and checked against the SHA-256
    recorded at registration every time; a mismatch in the cache means a fresh download, a mismatch in
    the registry's own copy is refused. Processes sharing a cache fetch a version one at a time.
    """
    tracking = Tracking.resolve(tracking_uri)
    # A cached version of an embedded registry is checked against its database without MLflow (fast);
    # anything else (a server, a bare family, a cache that does not match) asks MLflow.
    info = resolve_embedded(name, tracking)
    if info is None or not _verified(_cache_dir(tracking, info), info):
        info = resolve(name, tracking)
    directory = _cache_dir(tracking, info)
    if not _verified(directory, info):
        directory.parent.mkdir(parents=True, exist_ok=True)
        with _version_lock(directory):
            if not _verified(directory, info):  # another process may have fetched it while we waited
                _download(tracking, info, directory)
                if not _verified(directory, info):
                    shutil.rmtree(directory, ignore_errors=True)
                    raise SAERegistryError(
                        f"the files of {info.family}/{info.version} do not match the checksums recorded when "
                        "it was registered: they were changed or damaged. Refusing to load them."
                    )
    sae = SparseAutoencoder.load(directory, device=device)
    lineage = lineage_of(info.tags)
    lineage["run_id"] = info.run_id or ""
    return Dictionary(name, info.family, info.version, info.aliases, sae, info.metrics, lineage, directory,
                      info.tags)
