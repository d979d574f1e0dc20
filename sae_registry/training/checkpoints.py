"""Training checkpoints: the model, Adam's moments, the dead-latent counters and the loop state.

Safetensors + JSON, like dictionaries (no pickle), written to a temporary folder and swapped in,
so that a run stopped at any moment resumes from the last whole checkpoint, exactly. One training at
a time writes into an output folder (:func:`writing_to`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import SAERegistryError
from ..model.files import save_weights
from ..model.sae import SparseAutoencoder

LOCK_FILE = ".training.lock"


@contextmanager
def writing_to(out_dirs: list[Path]) -> Iterator[None]:
    """Hold each output folder for one training; a second one (e.g. two ``--resume``) is refused at once.

    An advisory ``fcntl.flock`` on a file in the folder: the kernel releases it when the process ends,
    however it ends, so a crashed run never leaves a folder locked.
    """
    import fcntl

    with ExitStack() as stack:
        for out in out_dirs:
            out.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(out / LOCK_FILE, "a"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SAERegistryError(
                    f"another training is writing to {out}: wait for it to finish, or train into another --out"
                ) from None
        yield


def save_checkpoint(path: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer,
                    since_fired: torch.Tensor, state: dict) -> None:
    """Atomically replace ``path`` with the model, Adam's moments and the loop state."""
    tensors = {f"model.{k}": v for k, v in sae.state_tensors().items()}
    for name, p in sae.state_tensors().items():
        s = opt.state.get(p)
        if s:
            tensors[f"adam.{name}.exp_avg"] = s["exp_avg"]
            tensors[f"adam.{name}.exp_avg_sq"] = s["exp_avg_sq"]
            state.setdefault("adam_steps", {})[name] = float(s["step"])
    tensors["since_fired"] = since_fired
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer,
                    since_fired: torch.Tensor) -> dict:
    """Restore what :func:`save_checkpoint` wrote into ``sae``, ``opt`` and ``since_fired``; returns the loop state."""

    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    device = since_fired.device
    with torch.no_grad():
        for name, p in sae.state_tensors().items():
            p.copy_(tensors[f"model.{name}"])
            if f"adam.{name}.exp_avg" in tensors:
                opt.state[p] = {
                    "step": torch.tensor(state["adam_steps"][name], dtype=torch.float32, device=device),
                    "exp_avg": tensors[f"adam.{name}.exp_avg"].to(device),
                    "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].to(device),
                }
        since_fired.copy_(tensors["since_fired"])
    return state
