"""The catalogue of architectures: one torch-free entry per sparsity rule, from which everything else derives.

Config choices and help, CLI options, a sweep's keys and cost table, run names, interchange
dispatch and registry columns all read this table; nothing lists the rules again by hand. An
entry names its torch code (``rule``, a ``module:Class`` path) without importing it, so that
``sae-registry --help`` and a sweep spec's checks stay torch-free; :func:`rule_of` imports it on
first use, as Ray Tune's table of search algorithms does.

Add an architecture: write ``architectures/<name>.py`` (a :class:`~.base.Rule` subclass) and add
its line to :data:`BUILTIN`. Outside this package, a distribution declares an entry point in the
group ``sae_registry.architectures`` whose object is an :class:`Architecture` (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import SAERegistryError

if TYPE_CHECKING:
    from .base import Rule

ENTRY_POINT_GROUP = "sae_registry.architectures"
# l1 and jumprelu switch to the sparse step once the last step's active fraction is below this
# (above it the dense products win: the sparse backward's gathers cost several times a dense FLOP).
SPARSE_BELOW = 0.05


@dataclass(frozen=True)
class RuleCost:
    """A rule's training cost per token, in nanoseconds on one core of the reference machine.

    ``dense`` is paid per input dimension per latent (the encoder product; for a dense rule, the
    whole step), ``active`` per input dimension per active latent (the sparse selection, decoder
    and backward). Active latents are ``k`` for a k rule, ``active_fraction`` x dict_size otherwise.
    ``thins_with_l1``: the active fraction at the end is about this / l1_coeff (l1's codes thin out
    as it trains), and the step turns sparse below :data:`SPARSE_BELOW` (see ``config/sweep.py``'s ``estimated_cost``).
    """

    dense: float
    active: float = 0.0
    active_fraction: float = 1.0
    thins_with_l1: float | None = None


@dataclass(frozen=True)
class Architecture:
    """One sparsity rule as the torch-free parts of the package see it."""

    name: str  # the value of ``sparsity``
    rule: str  # its torch code, ``module:Class``; a leading dot is relative to this package
    summary: str  # one line for help texts and docs
    uses_k: bool = False  # top_k (``--k``) sets its sparsity
    fixed_k: bool = False  # every token has exactly k codes: compact (values, indices) codes exist
    named_keys: tuple[str, ...] = ()  # the grid keys a run's name shows (besides sparsity and dict_size)
    lr_scale: float = 1.0  # the default learning rate is this times top_k's
    decoder_lr_scale: float = 1.0  # the decoder's default learning rate is this times the rest's
    encoder_init_scale: float = 1.0  # the encoder starts as the decoder's transpose times this
    l1_coeff: float = 0.0  # the default l1_coeff: the weight of its L1 penalty when none is given
    saelens: str | None = None  # the architecture SAELens saves it as (None: not exportable)
    dictionary_learning: str | None = None  # its dictionary_learning class (None: not exportable)
    # a cost the sweep can pack by; the default costs it as the densest built-in rule
    cost: RuleCost = field(default_factory=lambda: RuleCost(dense=0.62))
    source: str = "sae-registry"  # the distribution that provides it (a plugin's name)


BUILTIN: tuple[Architecture, ...] = (
    # Fitted to one-thread step times at batch 2048, d 384, dict_size 1024-4096, k 16-64, on the
    # reference machine (2 cores, loaded): within 14 % for every point; docs/sweeps.md "The cost model".
    # The rules after top_k and l1: top_k's constants times their step's cost against the encoder
    # product alone (benchmarks/results/train_speed_rules.json: of the bound, top_k 0.56, batch_top_k
    # 0.22, matryoshka 0.19, jumprelu 0.42 at L0 70, its sparse step).
    Architecture("top_k", ".top_k:TopK", "the k largest codes per token (Gao et al. 2024)", uses_k=True,
                 fixed_k=True, named_keys=("k",), saelens="topk", dictionary_learning="AutoEncoderTopK",
                 cost=RuleCost(dense=0.12, active=4.9)),
    # l1's active fraction at the end was about 3.7e-4 / l1_coeff on the demo store (3.5-3.8 % at
    # 0.01, 12.3-12.7 % at 0.003; dict_size 1024 and 2048, 300 k tokens); timed on its dense step.
    Architecture("l1", ".l1:L1", "ReLU codes and an L1 penalty (Anthropic's recipe)", named_keys=("l1_coeff",),
                 encoder_init_scale=0.1, l1_coeff=5e-3, saelens="standard", dictionary_learning="AutoEncoder",
                 cost=RuleCost(dense=0.62, thins_with_l1=3.7e-4)),
    # batch_top_k's rates, measured on MiniLM (d 384, k 32; benchmarks/rule_quality.py's case: dict_size
    # 4096, batch 4096, 800 k tokens). With one rate for all: FVU 0.155 at top_k's 1e-3, 0.104 at 3e-3,
    # 0.091 at 6e-3, 0.102 at 1.2e-2. With the decoder at 3x (SAELens's decoder is weight-normalised: a
    # row's step is lr / its norm, 0.1 at first): 0.092 at 3e-3, 0.087 at 6e-3, where SAELens's best was
    # 0.087; matryoshka (inheriting) 0.102 against 0.111 at 6e-3, SAELens's best 0.113. At dict_size 1024
    # (batch 2048, 300 k tokens) 3x top_k's rate is 6e-3: FVU 0.125 with the decoder at 3x (0.128 at 1x),
    # and 6x (1.2e-2) left 10 % of the latents dead (0.142). So 3x, and the decoder at 3x that.
    Architecture("batch_top_k", ".batch_top_k:BatchTopK", "the k x batch largest codes over a batch; a "
                 "threshold at inference (Bussmann et al. 2024)", uses_k=True, named_keys=("k",), lr_scale=3.0,
                 decoder_lr_scale=3.0, saelens="jumprelu", dictionary_learning="BatchTopKSAE",
                 cost=RuleCost(dense=0.31, active=12.5)),
    # jumprelu: the encoder at 0.1 as SAELens's decoder_init_norm 0.1 with encoder = decoder transpose.
    # SAELens's decoder rows start at norm 0.1 and are free, so a row turns about ten times faster than
    # ours (kept at unit norm); as for batch_top_k, the decoder at 3x: on rule_quality.py's case (target
    # L0 32, lr 3e-3, first threshold 0.3) FVU 0.0738 at L0 86.5 against 0.0790 at L0 94.1 at 1x, and
    # from 0.35, 0.0783 at L0 64.0 against 0.0845 at L0 70.6.
    Architecture("jumprelu", ".jumprelu:JumpReLU", "per-latent thresholds trained towards an L0 penalty or "
                 "target (Rajamanoharan et al. 2024)", named_keys=("l0_coeff", "target_l0"), decoder_lr_scale=3.0,
                 encoder_init_scale=0.1, saelens="jumprelu", dictionary_learning="JumpReluAutoEncoder",
                 cost=RuleCost(dense=0.16, active=6.5, active_fraction=0.017)),
    Architecture("matryoshka", ".matryoshka:Matryoshka", "batch_top_k whose nested prefixes each reconstruct "
                 "(Bussmann et al. 2025)", uses_k=True, named_keys=("k", "prefixes"), lr_scale=3.0,
                 decoder_lr_scale=3.0, saelens="jumprelu", dictionary_learning="MatryoshkaBatchTopKSAE",
                 cost=RuleCost(dense=0.36, active=14.7)),
    # abs_top_k: top_k's cost (not measured: an abs over the encoder outputs is all it adds).
    Architecture("abs_top_k", ".abs_top_k:AbsTopK", "the k codes of largest magnitude per token, signed (AbsTopK, "
                 "arXiv 2510.00404)", uses_k=True, fixed_k=True, named_keys=("k",), saelens="abstopk",
                 cost=RuleCost(dense=0.12, active=4.9)),
    # gated: l1's dense step with a third product, the gate path's decoding (not measured: 8/6 of l1's). Its
    # l1_coeff on MiniLM layer 3 (a 60 k-token store, dict_size 1024, 300 k tokens, batch 2048): FVU 0.099 at
    # L0 138 at l1's 5e-3, 0.187 at L0 44 at 1.5e-2, where l1 at 5e-3 ended at 0.213, L0 67.
    Architecture("gated", ".gated:Gated", "a gate picks the latents, a magnitude path their values; L1 on the "
                 "gate (Rajamanoharan et al. 2024)", named_keys=("l1_coeff",), encoder_init_scale=0.1, l1_coeff=1.5e-2,
                 saelens="gated", dictionary_learning="GatedAutoEncoder", cost=RuleCost(dense=0.83)),
)


@functools.cache
def catalogue() -> dict[str, Architecture]:
    """Every architecture by name: the built-in ones, then those installed packages declare."""
    from importlib.metadata import entry_points

    found = {a.name: a for a in BUILTIN}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry = point.load()
        except Exception as e:  # a broken plugin must not take the built-in rules down with it
            raise SAERegistryError(f"the architecture plugin {point.name!r} ({point.value}) cannot be loaded: "
                                   f"{type(e).__name__}: {e}") from e
        if not isinstance(entry, Architecture) and dataclasses.is_dataclass(entry) \
                and type(entry).__name__ == "Architecture":  # another copy of this class (a model's shipped code)
            entry = Architecture(**{f.name: getattr(entry, f.name) for f in dataclasses.fields(Architecture)})
        if not isinstance(entry, Architecture):
            raise SAERegistryError(f"the architecture plugin {point.name!r} ({point.value}) must be a "
                                   f"sae_registry Architecture, got {type(entry).__name__}")
        if entry.name in found:
            raise SAERegistryError(f"the architecture plugin {point.name!r} ({point.value}) is named "
                                   f"{entry.name!r}, which {found[entry.name].source} already provides")
        if entry.rule.startswith("."):
            raise SAERegistryError(f"the architecture plugin {entry.name!r} must name its rule with an absolute "
                                   f"module path, got {entry.rule!r}")
        found[entry.name] = entry
    return found


def names() -> tuple[str, ...]:
    """The architectures' names, built-in first: the choices of ``sparsity``."""
    return tuple(catalogue())


def k_rules() -> tuple[str, ...]:
    """The architectures whose sparsity ``k`` sets."""
    return tuple(a.name for a in catalogue().values() if a.uses_k)


def architecture(name: str) -> Architecture:
    """The entry called ``name``; an unknown one is an error naming the choices."""
    try:
        return catalogue()[name]
    except (KeyError, TypeError):
        raise SAERegistryError(f"sparsity must be one of {', '.join(names())}, got {name!r}") from None


@functools.cache
def rule_of(name: str) -> Rule:
    """The rule (its torch code) of architecture ``name``, imported on first use."""
    entry = architecture(name)
    module, _, cls = entry.rule.partition(":")
    rule = getattr(importlib.import_module(module, __package__ if module.startswith(".") else None), cls)(entry)
    return rule
