"""A loaded model's blocks and hook points: reading the activations there, or replacing them.

``layer`` names the residual stream the way ``output_hidden_states`` does: 0 is the embedding
output (the input of block 0), ``L`` the output of block ``L``. Hook points have the names
TransformerLens and SAELens use (:func:`parse_hook`): ``blocks.L.hook_resid_pre`` is ``layer`` L.
Harvest captures them, downstream fidelity splices a reconstruction in, feature cards read them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SAERegistryError

# Where the common architectures keep their list of transformer blocks.
BLOCK_PATHS = ("encoder.layer", "layers", "model.layers", "h", "transformer.h", "decoder.layers")

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


# -- hook points by name --------------------------------------------------------------------------

# The hook points of a block, in the order a forward pass computes them (TransformerLens's names).
HOOK_POINTS = ("hook_resid_pre", "hook_attn_out", "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")
# Where each architecture computes the points inside a block (the submodule whose output it is);
# the residual points are the block's own input and output.
LAYOUTS = {
    "llama": {"hook_attn_out": "self_attn", "ln2.hook_normalized": "post_attention_layernorm", "hook_mlp_out": "mlp"},
    "gpt2": {"hook_attn_out": "attn", "ln2.hook_normalized": "ln_2", "hook_mlp_out": "mlp"},
    # post-LN: the attention's own output before its LayerNorm adds the residual; the MLP reads
    # the LayerNorm's output (which is also the residual stream between the two sublayers)
    "bert": {"hook_attn_out": "attention.output.dense", "ln2.hook_normalized": "attention.output.LayerNorm",
             "hook_mlp_out": "output.dense"},
}
_HOOK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Hook:
    """A hook point: ``blocks.{block}.{point}``."""

    name: str
    block: int
    point: str

    @property
    def layer(self) -> int | None:
        """The residual stream's index (``output_hidden_states``' numbering) for a residual point, else None."""
        return {"hook_resid_pre": self.block, "hook_resid_post": self.block + 1}.get(self.point)

    @property
    def depth(self) -> tuple[int, int]:
        """Sorts hook points in the order the forward pass reaches them."""
        return self.block, HOOK_POINTS.index(self.point)


def architecture(blocks: nn.ModuleList) -> str | None:
    """Which of :data:`LAYOUTS` the blocks follow (None: only the residual points are known)."""
    for arch, points in LAYOUTS.items():
        if all(_submodule(blocks[0], path) is not None for path in points.values()):
            return arch
    return None


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def layer_hook(layer: int, n_layers: int) -> str:
    """The hook name of residual stream ``layer`` (0..n_layers): ``blocks.L.hook_resid_pre``, and the
    last block's ``hook_resid_post`` for ``n_layers``."""
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def parse_hook(name: object, n_layers: int, arch: str | None = None, model: str = "the model") -> Hook:
    """The hook point ``name`` names in a model of ``n_layers`` blocks, else an error listing the valid names."""
    points = tuple(p for p in HOOK_POINTS if arch in LAYOUTS or p.startswith("hook_resid"))
    valid = f"blocks.L.{{{', '.join(points)}}} with L in 0..{n_layers - 1}"
    match = _HOOK_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None or match.group(2) not in points:
        raise SAERegistryError(f"unknown hook {name!r} for {model}: the hook names are {valid}")
    block = int(match.group(1))
    if block >= n_layers:
        raise SAERegistryError(f"hook {name!r} is beyond the last layer: {model} has {n_layers} blocks, so the "
                               f"hook names are {valid}")
    return Hook(name, block, match.group(2))


def _output(out):
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def capture_hooks(model: nn.Module, hooks: list[Hook], *, stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass records the activation ``[batch, seq, d]`` at each hook into the
    yielded dict (by hook name); with ``stop`` the pass ends (:class:`StopForward`) after the deepest one."""
    blocks = find_blocks(model)
    if blocks is None:
        raise SAERegistryError(f"cannot find the transformer blocks of {type(model).__name__} to hook")
    arch, seen, handles = architecture(blocks), {}, []
    last = max(hooks, key=lambda h: h.depth).name if hooks else None

    def keeper(name: str):
        def keep(value: torch.Tensor) -> None:
            seen[name] = value
            if stop and name == last:
                raise StopForward
        return keep

    for hook in hooks:
        keep = keeper(hook.name)
        if hook.point == "hook_resid_pre":
            handles.append(blocks[hook.block].register_forward_pre_hook(
                lambda _m, args, kwargs, keep=keep: keep(args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
            continue
        if hook.point == "hook_resid_post":
            module = blocks[hook.block]
        else:
            module = _submodule(blocks[hook.block], LAYOUTS.get(arch, {}).get(hook.point, ""))
            if module is None:
                raise SAERegistryError(f"{type(model).__name__} has no {hook.point} that sae-registry can find")
        handles.append(module.register_forward_hook(lambda _m, _a, out, keep=keep: keep(_output(out))))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edit_hook(model: nn.Module, hook: Hook, edit) -> Iterator[None]:
    """Within the block, the activation at ``hook`` is replaced by ``edit(activation)`` (any point)."""
    blocks = find_blocks(model)
    if hook.point == "hook_resid_pre":
        def before(_module, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

        handle = blocks[hook.block].register_forward_pre_hook(before, with_kwargs=True)
    else:
        module = blocks[hook.block] if hook.point == "hook_resid_post" else _submodule(
            blocks[hook.block], LAYOUTS[architecture(blocks)][hook.point])

        def after(_module, _args, out):
            return (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out)

        handle = module.register_forward_hook(after)
    try:
        yield
    finally:
        handle.remove()
