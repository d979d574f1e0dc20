"""A sweep spec (``jobs/*.yaml``) as typed data: the grid, its training options, its resources, how to
harvest a missing store. Validated once, on construction; every error names the spec's field.

No torch, Ray or MLflow here: a spec is checked (``sae-registry sweep`` does it first) before anything
heavy is imported or started. ``sweep/driver.py`` runs it.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..architectures.catalogue import SPARSE_BELOW, architecture, k_rules
from ..errors import (
    SAERegistryError,
    check_family_name,
    require_choice,
    require_float,
    require_int,
    require_positive_int,
)
from .metrics import DOWNSTREAM, RECONSTRUCTION, champion_metric, default_champion
from .options import PACK_SHARED, HarvestSpec, SAEConfig, TrainConfig

REGISTER_CHOICES = ("all", "pareto", "none")
EVALUATE_CHOICES = ("none", DOWNSTREAM)
SAE_KEYS = {"dict_size", "k", "sparsity", "prefixes"}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
# The sparsity rules each key means something for (absent: every rule); a grid key is not crossed
# with the rules it means nothing for.
def rule_keys() -> dict[str, tuple[str, ...]]:
    """Each key that belongs to some sparsity rules only -> those rules (``k``: the catalogue's k rules)."""
    return {"k": k_rules(), **{f.name: f.metadata["rules"] for cls in (SAEConfig, TrainConfig)
                               for f in fields(cls) if "rules" in f.metadata}}


@dataclass(frozen=True)
class Resources:
    """What one trial asks of a Ray node: CPUs and (a fraction of) GPUs."""

    cpu: float = 1
    gpu: float = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            require_float(f"resources.{f.name}", getattr(self, f.name), min=0)
        if self.cpu <= 0 and self.gpu <= 0:
            raise SAERegistryError("resources: a trial needs some cpu or gpu")

    @classmethod
    def from_dict(cls, data: object) -> Resources:
        """A spec's ``resources:`` block; a key left out asks for none of that resource."""
        if not isinstance(data, dict):
            raise SAERegistryError(f"resources: must be a mapping, got {data!r}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise SAERegistryError(f"resources: unknown keys {sorted(unknown)}; use cpu and gpu")
        return cls(**{"cpu": 0, "gpu": 0, **data})

    @property
    def device(self) -> str:
        """Where a trial trains: ``cuda`` when it asks for a GPU."""
        return "cuda" if self.gpu > 0 else "cpu"


@dataclass(frozen=True)
class SweepSpec:
    """A sweep, as written in ``jobs/*.yaml``. Validated once; errors name the field."""

    name: str  # the registry family, and the sweep's name
    store: str  # path (relative to the working directory) or URL of the activation store
    grid: tuple[dict, ...]  # one or more grids: {key: [values]}; keys: dict_size, k, sparsity, any train option
    train: dict = field(default_factory=dict)  # fixed training options
    seeds: tuple[int, ...] = (0,)
    resources: Resources = field(default_factory=Resources)  # per trial
    max_concurrent_trials: int = 0  # 0: as many as the resources allow
    pack: int | str = 1  # configurations trained together on one batch stream, per trial; or "auto"
    register: str = "pareto"
    alias: str | None = "champion"
    champion_max_l0: float | None = None  # the alias goes to the best (champion_by) among versions with L0 <= this
    max_failures: int = 2  # retries of a crashed trial, each from its last checkpoint
    storage: str = "ray_results"  # where Tune keeps trial state and checkpoints (shared path or URL on a cluster)
    harvest: HarvestSpec | None = None  # how to make the store when it does not exist yet
    evaluate: str = "none"  # "downstream": splice each dictionary into the source model at the end
    evaluate_tokens: int = 4096  # held-out tokens spliced per dictionary for that
    # the metric the alias goes to the best of: config/metrics.py's champion_choices (fvu: the lowest FVU;
    # downstream: the highest downstream fidelity)
    champion_by: str = field(default_factory=default_champion)

    def __post_init__(self) -> None:
        check_family_name(self.name)
        if not isinstance(self.store, str) or not self.store:
            raise SAERegistryError("store: give the path or URL of an activation store")
        # the typed parts may be given as the spec's mappings (as in YAML)
        if isinstance(self.resources, dict):
            object.__setattr__(self, "resources", Resources.from_dict(self.resources))
        if isinstance(self.harvest, dict):
            object.__setattr__(self, "harvest", HarvestSpec.from_dict(self.harvest))
        if not isinstance(self.resources, Resources):
            raise SAERegistryError(f"resources: must be a mapping, got {self.resources!r}")
        if self.harvest is not None and not isinstance(self.harvest, HarvestSpec):
            raise SAERegistryError(f"harvest: must be a mapping of harvest options, got {self.harvest!r}")
        self._check_grid()
        if not isinstance(self.train, dict):
            raise SAERegistryError(f"train: must be a mapping, got {self.train!r}")
        unknown = set(self.train) - TRAIN_KEYS
        if unknown:
            raise SAERegistryError(f"train: unknown options {sorted(unknown)}; known: {', '.join(sorted(TRAIN_KEYS))}")
        if "seed" in self.train:
            raise SAERegistryError("train.seed: use seeds: [..] at the top level")
        if not self.seeds:
            raise SAERegistryError("seeds: must be a non-empty list of integers, got []")
        for seed in self.seeds:
            require_int("seeds", seed, min=0)
        require_int("max_concurrent_trials", self.max_concurrent_trials, min=0)
        if self.pack != "auto" and (isinstance(self.pack, bool) or not isinstance(self.pack, int) or self.pack <= 0):
            raise SAERegistryError(f"pack must be a positive integer or auto, got {self.pack!r}")
        require_int("max_failures", self.max_failures, min=0)
        if self.champion_max_l0 is not None:
            require_float("champion_max_l0", self.champion_max_l0, above=0)
        require_choice("register", self.register, REGISTER_CHOICES)
        require_choice("evaluate", self.evaluate, EVALUATE_CHOICES)
        require_positive_int("evaluate_tokens", self.evaluate_tokens)
        ranked = champion_metric(self.champion_by)  # one of the choices, else an error listing them
        if ranked.where not in (RECONSTRUCTION, self.evaluate):  # a downstream metric needs evaluate: downstream
            raise SAERegistryError(f"champion_by: {self.champion_by} needs evaluate: {ranked.where} "
                                   f"(the {ranked.label} it ranks by)")
        self.configurations()  # every combination must be a valid SAE and training config

    def _check_grid(self) -> None:
        if not self.grid:
            raise SAERegistryError("grid: is empty; give at least one key with a list of values")
        for g in self.grid:
            if not isinstance(g, dict) or not g:
                raise SAERegistryError("grid: each grid must be a non-empty mapping of key -> list of values")
            for key, values in g.items():
                if key not in SAE_KEYS | TRAIN_KEYS:
                    raise SAERegistryError(
                        f"grid: unknown key {key!r}; use dict_size, k, sparsity, prefixes or a training option "
                        f"({', '.join(sorted(TRAIN_KEYS))})"
                    )
                if not isinstance(values, list) or not values:
                    raise SAERegistryError(f"grid.{key}: must be a non-empty list, got {values!r}")
            rules = g.get("sparsity", ["top_k"])
            for key in g:  # (k stays allowed with l1 alone, as it always was: it is dropped there)
                if key in rule_keys() and key != "k" and isinstance(rules, list) and not set(rules) & set(rule_keys()[key]):
                    raise SAERegistryError(
                        f"grid.{key}: belongs to sparsity {' or '.join(rule_keys()[key])}, and this grid trains "
                        f"{', '.join(map(str, rules))}; move it to a grid of that rule"
                    )

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> SweepSpec:
        """A spec from its YAML mapping: unknown fields refused, lists made tuples, typed parts built."""
        if not isinstance(data, dict):
            raise SAERegistryError("a sweep spec must be a YAML mapping")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SAERegistryError(f"unknown spec fields {sorted(unknown)}; known: {', '.join(sorted(known))}")
        missing = {"name", "store", "grid"} - set(data)
        if missing:
            raise SAERegistryError(f"the spec is missing {', '.join(sorted(missing))}")
        data = dict(data)
        grid = data["grid"]
        data["grid"] = tuple(grid) if isinstance(grid, list) else (grid,)
        if "seeds" in data:
            seeds = data["seeds"]
            data["seeds"] = tuple(seeds) if isinstance(seeds, list) else (seeds,)
        if "resources" in data:
            data["resources"] = Resources.from_dict(data["resources"])
        if data.get("harvest") is not None:
            data["harvest"] = HarvestSpec.from_dict(data["harvest"])
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpec:
        """The spec in the YAML file at ``path``, checked."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise SAERegistryError(f"no sweep spec at {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SAERegistryError(f"{path} is not valid YAML: {e}") from e
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        """The spec as plain data (what ``from_dict`` reads back)."""
        d = asdict(self)
        d["grid"], d["seeds"] = list(self.grid), list(self.seeds)
        return d

    def configurations(self, input_size: int = 1) -> list[tuple[SAEConfig, TrainConfig]]:
        """Every distinct (SAEConfig, TrainConfig) of the grid(s) x seeds, in a stable order.

        Combinations that mean the same thing are kept once: a key means nothing for the rules it
        does not belong to (``k`` for ``l1``, ``l0_coeff`` for all but ``jumprelu``: :func:`rule_keys`).
        ``input_size`` is the store's width (unknown, and irrelevant, when only validating).
        """
        seen, out = set(), []
        for g, seed in itertools.product(self.grid, self.seeds):
            keys = list(g)
            for values in itertools.product(*(g[k] for k in keys)):
                point = dict(zip(keys, values))
                sparsity = point.get("sparsity", "top_k")
                point = {k: v for k, v in point.items() if sparsity in rule_keys().get(k, (sparsity,))}
                sae_kw = {"dict_size": point.get("dict_size", 4096), "sparsity": sparsity,
                          "top_k": point.get("k", 32), **({"prefixes": point["prefixes"]} if "prefixes" in point else {})}
                train_kw = {**self.train, **{k: v for k, v in point.items() if k in TRAIN_KEYS}, "seed": seed}
                try:
                    sae_cfg = SAEConfig(input_size=input_size, **sae_kw)
                    train_cfg = TrainConfig(**train_kw)
                except SAERegistryError as e:
                    raise SAERegistryError(f"grid point {point} (seed {seed}): {e}") from None
                key = (json.dumps(sae_cfg.to_dict(), sort_keys=True), json.dumps(train_cfg.to_dict(), sort_keys=True))
                if key not in seen:
                    seen.add(key)
                    out.append((sae_cfg, train_cfg))
        return out

    def concurrent_slots(self, nodes: list[dict]) -> int:
        """How many trials run at once on a cluster of ``nodes`` (``ray.nodes()``): whole trials per
        node (3 CPUs hold one 2-CPU trial), by CPU and, when asked for, GPU; capped by max_concurrent_trials."""
        slots = 0
        for node in nodes:
            have = node.get("Resources", {}) if node.get("Alive") else {}
            slots += min(int(have.get(key, 0) / need + 1e-9) for key, need in
                         (("CPU", self.resources.cpu), ("GPU", self.resources.gpu)) if need > 0)
        return max(1, min(slots, self.max_concurrent_trials or slots))

    def pack_plan(self, input_size: int = 1, slots: int = 1) -> list[list[int]]:
        """The packs as indices into :meth:`configurations`, the costliest pack first.

        Members are spread over the packs longest-processing-time first by :func:`estimated_cost`,
        so that packs running side by side end together. ``pack: N`` makes ``ceil(n / N)`` packs of
        at most N per group of configurations that can share a batch stream; ``pack: auto`` makes
        ``slots`` packs (the trials the cluster runs at once: :meth:`concurrent_slots`), at
        least one per group and never an empty one. Deterministic: the same spec and slots give the
        same plan (a trial finds its members by it).
        """
        configs = self.configurations(input_size)
        costs = [estimated_cost(s, t, input_size) for s, t in configs]
        groups: dict[tuple, list[int]] = {}
        for i, (_, train_cfg) in enumerate(configs):
            groups.setdefault(tuple(getattr(train_cfg, k) for k in PACK_SHARED), []).append(i)
        members = list(groups.values())
        capacity: int | None
        if isinstance(self.pack, int):
            bins = [math.ceil(len(g) / self.pack) for g in members]
            capacity = self.pack
        else:  # auto
            bins = _share_bins([[costs[i] for i in g] for g in members], max(1, slots))
            capacity = None
        plan = [[g[j] for j in b] for g, n in zip(members, bins)
                for b in balanced_bins([costs[i] for i in g], n, capacity)]
        return sorted(plan, key=lambda p: (-sum(costs[i] for i in p), p))

    def packs(self, input_size: int = 1, slots: int = 1) -> list[list[tuple[SAEConfig, TrainConfig]]]:
        """The configurations of each pack of :meth:`pack_plan`; a pack only holds configs that can share batches."""
        configs = self.configurations(input_size)
        return [[configs[i] for i in p] for p in self.pack_plan(input_size, slots)]


# -- the cost model --------------------------------------------------------------------------------------


# A run of l1 expected to end under SPARSE_BELOW takes its dense step for about the first
# L1_DENSE_SHARE of its steps (train_speed.py's l1 case: 53 of 100) and top_k's sparse step at its
# active latents after; one expected to end above it stays dense.
L1_DENSE_SHARE = 0.5


def estimated_cost(sae_cfg: SAEConfig, train_cfg: TrainConfig, input_size: int) -> float:
    """Estimated seconds of training steps of one dictionary on one core of the reference machine.

    tokens x d x (dense x dict_size + active x active latents), with the rule's constants (its
    catalogue entry's :class:`~sae_registry.architectures.catalogue.RuleCost`). A rule whose codes thin
    with its L1 coefficient (l1) runs its dense step, or, when the coefficient is expected to thin its
    codes below ``SPARSE_BELOW``, dense for the first :data:`L1_DENSE_SHARE` of its steps and then
    top_k's sparse step at its active latents.
    """
    arch = architecture(sae_cfg.sparsity)
    rule, per_token = arch.cost, input_size * 1e-9
    if rule.thins_with_l1 is not None:
        dense = rule.dense * sae_cfg.dict_size
        fraction = rule.thins_with_l1 / max(train_cfg.l1_coeff_for(sae_cfg.sparsity), 1e-12)
        if fraction >= SPARSE_BELOW:
            return train_cfg.tokens * per_token * dense
        top_k = architecture("top_k").cost
        sparse = top_k.dense * sae_cfg.dict_size + top_k.active * fraction * sae_cfg.dict_size
        return train_cfg.tokens * per_token * (L1_DENSE_SHARE * dense + (1 - L1_DENSE_SHARE) * sparse)
    active = sae_cfg.top_k if arch.uses_k else rule.active_fraction * sae_cfg.dict_size
    return train_cfg.tokens * per_token * (rule.dense * sae_cfg.dict_size + rule.active * active)


def balanced_bins(costs: list[float], bins: int, capacity: int | None = None) -> list[list[int]]:
    """Indices of ``costs`` in ``bins`` groups of nearly equal sums (longest processing time first).

    Each item, costliest first, goes to the least-loaded bin that still has room (``capacity``
    items at most); ties go to the lower index, so the result is deterministic. Empty bins are dropped.
    """
    bins = max(1, min(bins, len(costs)))
    if capacity is not None and capacity * bins < len(costs):
        raise ValueError(f"{len(costs)} items do not fit in {bins} bins of {capacity}")
    loads = [0.0] * bins
    members: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min((b for b in range(bins) if capacity is None or len(members[b]) < capacity),
                key=lambda b: (loads[b], len(members[b]), b))
        loads[b] += costs[i]
        members[b].append(i)
    return [sorted(m) for m in members if m]


def _share_bins(groups: list[list[float]], slots: int) -> list[int]:
    """How many packs each group of configurations gets out of ``slots``: one each at least, the rest
    one at a time to the group whose packs would otherwise be the longest (never more than its size)."""
    bins = [1] * len(groups)
    totals = [sum(g) for g in groups]
    for _ in range(max(0, slots - len(groups))):
        open_ = [i for i, g in enumerate(groups) if bins[i] < len(g)]
        if not open_:
            break
        i = max(open_, key=lambda i: (totals[i] / bins[i], -i))
        bins[i] += 1
    return bins
