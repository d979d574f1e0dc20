"""The device setting turned into a device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SAERegistryError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error.

    The one place a device setting is turned into a device: training, loading, harvest and
    downstream evaluation all ask here.
    """
    import torch  # lazily: the torch-free layers ask it only when a run is about to start

    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:  # torch's own parser; its error would otherwise surface in the middle of the work
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise SAERegistryError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SAERegistryError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise SAERegistryError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device
