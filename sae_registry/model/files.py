"""A dictionary on disk: ``sae.safetensors`` (the five tensors, plus the rule's: a threshold) + ``config.json`` (shape and metadata).

No pickle anywhere. Reading treats both files as someone else's: the shape in ``config.json`` is
bounded and compared with the weight file's header (names, shapes, dtypes; safetensors checks the
header against the file's length) before anything is allocated, so a crafted config cannot make
loading reserve more memory than the weights the file really holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._util.device import resolve_device
from ..architectures.catalogue import rule_of
from ..config.options import MAX_DICT_SIZE, MAX_INPUT_SIZE, SAEConfig
from ..errors import SAERegistryError, require_int

if TYPE_CHECKING:
    from .sae import SparseAutoencoder

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
DICTIONARY_FORMAT = "sae-registry/dictionary"


def write(sae: SparseAutoencoder, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``sae`` to ``directory`` as ``sae.safetensors`` + ``config.json`` (plus ``extra`` metadata)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in sae.state_tensors().items()}
    save_weights(tensors, directory / WEIGHTS_FILE, metadata={"format": DICTIONARY_FORMAT})
    config = {"format": DICTIONARY_FORMAT, "format_version": 1, "sae": sae.cfg.to_dict()}
    config.update(extra or {})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


# What a training writes into its output directory (training/loop.py's names, kept here to stay torch-light).
TRAINING_OUTPUTS = (WEIGHTS_FILE, CONFIG_FILE, "metrics.json", "checkpoint", "checkpoint.tmp", "checkpoint.old")


def prepare_out(directory: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Make ``directory`` ready for a training, refusing to replace a dictionary unasked.

    A directory that already holds a dictionary or a training's checkpoint is refused unless
    ``resume`` (its checkpoint is continued, as before) or ``overwrite`` (what a training wrote there
    is removed first, and only that: other files stay). Checked before any work starts.
    """
    import shutil

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SAERegistryError(f"--out {directory} is a file, not a directory; choose another --out")
    found = [name for name in TRAINING_OUTPUTS if (directory / name).exists()]
    if not found or resume:
        return directory
    if not overwrite:
        raise SAERegistryError(
            f"--out {directory} already holds a dictionary or a training ({', '.join(found)}); pass --overwrite "
            "to replace it, --resume to continue its training, or choose another --out"
        )
    for name in found:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return directory


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors``' ``save_file``, then the permissions every other file gets (``0o666`` less the umask).

    ``save_file`` writes through a temporary file created owner-only (0600) and renames it: teammates
    sharing a registry, a runs folder or an export could read ``config.json`` but not the weights.
    """
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    path.chmod(0o666 & ~_umask())
    return path


def _umask() -> int:
    """The process's umask: from ``/proc`` on Linux (no change of state), else by setting it and back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # there is no getter elsewhere; set straight back
    os.umask(mask)
    return mask


def read(cls: type[SparseAutoencoder], directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The dictionary saved in ``directory``, as ``cls``, in eval mode on ``device`` (``auto`` allowed)."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise SAERegistryError(f"{directory} holds no {name}; it is not a saved dictionary")
    cfg = _read_config(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    _check_header(weights, cfg)
    device = resolve_device(device)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise SAERegistryError(f"{weights} is not a readable safetensors file: {e}") from e
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise SAERegistryError(f"{name} in {weights} holds NaN or Inf")
    # The header matched: the model is no larger than the weights the file holds. (Not built on
    # torch's meta device to skip the init: its first use costs seconds of import.)
    sae = cls(cfg)
    with torch.no_grad():
        for name, target in sae.state_tensors().items():
            target.copy_(tensors[name])
    return sae.to(device).eval()


def _read_config(path: Path) -> SAEConfig:
    """The ``sae`` section of a saved ``config.json``, checked and bounded; nothing allocated."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAERegistryError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("sae"), dict):
        raise SAERegistryError(f"{path} has no 'sae' section")
    # format and sae are read; every other top-level key (train, store, metrics, lineage, ...:
    # what save(extra=...) wrote) is description only and never interpreted.
    if (config.get("format"), config.get("format_version")) != (DICTIONARY_FORMAT, 1):
        raise SAERegistryError(
            f"{path} says format {config.get('format')!r} version "
            f"{config.get('format_version')!r}; this sae-registry reads {DICTIONARY_FORMAT!r} version 1"
        )
    try:
        cfg = SAEConfig.from_dict(config["sae"])
        require_int("dict_size", cfg.dict_size, max=MAX_DICT_SIZE)
        require_int("input_size", cfg.input_size, max=MAX_INPUT_SIZE)
    except SAERegistryError as e:
        raise SAERegistryError(f"{path}: {e}; refusing to load it") from None
    return cfg


def _check_header(path: Path, cfg: SAEConfig) -> None:
    """The weight file's header (names, shapes, dtypes) must match ``cfg``; read without loading a tensor."""
    expected = {"W_enc": (cfg.dict_size, cfg.input_size), "b_enc": (cfg.dict_size,),
                "W_dec": (cfg.dict_size, cfg.input_size), "b_dec": (cfg.input_size,), "input_scale": (),
                **rule_of(cfg.sparsity).tensors(cfg)}  # e.g. a threshold
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise SAERegistryError(f"{path} is not a readable safetensors file: {e}") from e
    if set(shapes) != set(expected):
        raise SAERegistryError(f"{path} holds {sorted(shapes)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise SAERegistryError(
                f"{name} in {path} has shape {shapes[name]}, config.json implies {shape}; "
                "the two files do not belong together: refusing to load them"
            )
        if dtypes[name] not in ("F32", "F16", "BF16", "F64"):
            raise SAERegistryError(f"{name} in {path} has dtype {dtypes[name]}, expected a floating-point type")
