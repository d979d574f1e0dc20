"""The registry: dictionaries registered as versions of families, with aliases; finding them by name.

A family is an MLflow registered model; each registered dictionary is a version of it, tagged with
its shape, its final metrics (under their tags in the metrics table, ``config/metrics.py``), its
lineage and the SHA-256 of its two files, and described in Markdown for the MLflow UI. Only a
FINISHED run that logged a dictionary is ever registered (see ``runs.py`` for how runs are
recorded; ``dictionary.py`` for loading one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..architectures.catalogue import k_rules
from ..config.metrics import RECONSTRUCTION, by_tag, champion_metric, default_champion, listed
from ..config.metrics import metrics as metric_table
from ..errors import SAERegistryError, check_family_name
from .tracking import VERSION_TAG_PREFIXES, Tracking, TrackingLike, retrying

SHAPE_TAGS = ("dict_size", "k", "sparsity", "l1_coeff")  # on every version (see register_run)
CARDS_DIR = "cards"  # feature cards: an artifact folder on the dictionary's run (cards.py writes it)
PLOTS = ("training_curves", "feature_density", "l0_distribution")  # plots/<name>.png on a trained run
_NAME = re.compile(r"^(?:models:/)?(?P<family>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))?$")


def parse_name(name: str) -> tuple[str, str | None, str | None]:
    """``family@alias`` / ``family/3`` / ``models:/...`` / ``family`` -> (family, alias, version)."""
    m = _NAME.match(name.strip()) if isinstance(name, str) else None
    if not m:
        raise SAERegistryError(
            f"cannot read dictionary name {name!r}: use FAMILY@ALIAS, FAMILY/VERSION or models:/FAMILY/VERSION"
        )
    return m["family"], m["alias"], m["version"]


# -- registering ------------------------------------------------------------------------------------


def register_run(run_id: str, family: str, tracking_uri: TrackingLike = None) -> str:
    """Register a finished run's dictionary as a version of ``family``; returns the version.

    Idempotent: a run already registered in ``family`` gives its existing version. Refuses runs that
    did not finish (nothing half-trained or failed is ever registered).
    """
    check_family_name(family)
    tracking = Tracking.resolve(tracking_uri)
    client = tracking.client
    run = client.get_run(run_id)
    rt, params, metrics = run.data.tags, run.data.params, run.data.metrics
    if run.info.status != "FINISHED" or "sae.model_uri" not in rt:
        raise SAERegistryError(f"run {run_id} is {run.info.status}, not a finished dictionary; refusing to register it")
    existing = _registered(client, family, run_id)
    if existing is not None:
        return existing
    sparsity = params["sparsity"]
    version_tags = {
        "dict_size": params["dict_size"],
        "k": params["top_k"] if sparsity in k_rules() else "",
        "sparsity": sparsity,
        "l1_coeff": params.get("l1_coeff", ""),  # none for an imported dictionary
        **metric_tags(metrics),
        **{k: v for k, v in rt.items() if k.split(".")[0] in VERSION_TAG_PREFIXES},
    }
    _ensure_registered_model(client, family, family_description(family, params, version_tags))
    description = version_description(family, params, version_tags, run.info.artifact_uri, run_id)
    model_id = rt["sae.model_uri"].rsplit("/", 1)[-1]
    # The logged model's own location as the source: given ``models:/<id>``, MLflow's SQL registry
    # would look the id up on its *global* tracking URI instead of this server.
    source = client.get_logged_model(model_id).artifact_location

    def create() -> str:
        version = client.create_model_version(family, source=source, run_id=run_id, tags=version_tags,
                                              model_id=model_id, description=description)
        return str(version.version)

    # MLflow retries a version number taken meanwhile 3 times and SQLite waits 20 s for its lock; more
    # writers than that (a sweep registering at once) are retried here, checking first that it landed.
    return retrying(create, f"registering run {run_id} in {family}", transient=_contended,
                    landed=lambda: _registered(client, family, run_id), first_wait=0.2)


def metric_tags(run_metrics: dict[str, float]) -> dict[str, str]:
    """A version's metric tags: each metric of the metrics table its run logged (``final/fvu``,
    ``downstream/fidelity``), under the metric's tag (``fvu``, ``downstream.fidelity``)."""
    return {m.tag: repr(float(run_metrics[m.run_key])) for m in metric_table() if m.run_key in run_metrics}


def _contended(error: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and ("Giving up after" in str(error) or "database is locked" in str(error))


def _registered(client, family: str, run_id: str) -> str | None:
    for mv in client.search_model_versions(f"run_id='{run_id}'"):
        if mv.name == family:
            return str(mv.version)
    return None


def _ensure_registered_model(client, family: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(family)
    except MlflowException:
        try:
            client.create_registered_model(family, description=description)
        except MlflowException:  # created meanwhile by another process
            client.get_registered_model(family)


def _shape(params: dict, tags: dict) -> str:
    sparsity = params.get("sparsity", "?")
    shape = f"{params.get('input_size', '?')} → {params.get('dict_size', '?')} latents"
    if sparsity == "top_k":
        return f"top-k sparse autoencoder (k = {params.get('top_k')}), {shape}"
    coeff = f" (L1 coefficient {tags['l1_coeff']})" if tags.get("l1_coeff") else ""
    return f"L1 (ReLU) sparse autoencoder{coeff}, {shape}"


def _source(tags: dict) -> str:
    model = tags.get("source.model") or "unknown model"
    where = ", ".join(f"{k} {tags[f'source.{k}']}" for k in ("layer", "hook") if tags.get(f"source.{k}"))
    return f"`{model}`" + (f" ({where})" if where else "")


def family_description(family: str, params: dict, tags: dict) -> str:
    """Markdown for the MLflow UI's page of a family: what its dictionaries are and where to look."""
    if tags.get("import.format"):
        origin = f"imported from {tags['import.format']} (`{tags.get('import.origin', '?')}`)"
    else:
        origin = f"trained on the activation store `{tags.get('store.path', '?')}` " \
                 f"(fingerprint `{tags.get('store.fingerprint', '?')}`)"
    return (
        f"**{family}**: a family of sparse-autoencoder dictionaries made with sae-registry.\n\n"
        f"- First version: {_shape(params, tags)}; {origin}.\n"
        f"- Source activations: {_source(tags)}.\n"
        f"- Each version's description gives its numbers ({', '.join(m.label for m in listed() if not m.optional)}) "
        f"and its run; the run's "
        f"artifacts hold the plots (`plots/*.png`) and, once made with `sae-registry cards {family}/N`, "
        f"the feature cards (`{CARDS_DIR}/index.html`).\n"
        f"- Load one with `sae_registry.load(\"{family}@champion\")` or `sae_registry.load(\"{family}/N\")`."
    )


def version_description(family: str, params: dict, tags: dict, artifact_uri: str, run_id: str) -> str:
    """Markdown for the MLflow UI's page of a version: shape, numbers, data, and where its plots and cards are."""
    lines = [f"**{_shape(params, tags)}**.", ""]
    numbers = [(m.label, tags[m.tag]) for m in metric_table() if tags.get(m.tag)]
    if numbers:
        lines += ["| " + " | ".join(label for label, _ in numbers) + " |",
                  "|" + " --- |" * len(numbers),
                  "| " + " | ".join(f"{float(v):.4g}" for _, v in numbers) + " |", ""]
    if tags.get("import.format"):
        lines.append(f"- Imported from {tags['import.format']} ({tags.get('import.architecture', '?')}), "
                     f"`{tags.get('import.origin', '?')}`; no training metrics.")
    if tags.get("store.fingerprint"):
        lines.append(f"- Store: `{tags.get('store.path', '?')}`, fingerprint `{tags['store.fingerprint']}`.")
    lines.append(f"- Source activations: {_source(tags)}.")
    if tags.get("sweep.id"):
        lines.append(f"- Sweep: `{tags['sweep.id']}`.")
    lines.append(f"- Run `{run_id}`.")
    if not tags.get("import.format"):
        lines.append("- Plots: " + ", ".join(f"`{artifact_uri}/plots/{p}.png`" for p in PLOTS) + ".")
    lines.append(f"- Feature cards: `{artifact_uri}/{CARDS_DIR}/index.html` "
                 f"(made by `sae-registry cards {family}/N`).")
    return "\n".join(lines)


# -- aliases ------------------------------------------------------------------------------------------


def check_alias(alias: str) -> str:
    """``alias`` when MLflow accepts it as an alias, else a clear error (checked before any work)."""
    if (not isinstance(alias, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", alias)
            or re.fullmatch(r"v\d+", alias) or alias == "latest"):
        raise SAERegistryError(f"alias {alias!r} must be a word (letters, digits, '_', '-'), not 'latest' or 'v<N>'")
    return alias


def set_alias(family: str, alias: str, version: str | int, tracking_uri: TrackingLike = None) -> None:
    """Point ``alias`` at ``version`` of ``family`` (moving it if it pointed elsewhere)."""
    check_alias(alias)
    tracking = Tracking.resolve(tracking_uri)
    _get_version(tracking, family, str(version))
    tracking.client.set_registered_model_alias(family, alias, str(version))


def remove_alias(family: str, alias: str, tracking_uri: TrackingLike = None) -> None:
    """Remove ``alias`` from ``family``."""
    tracking = Tracking.resolve(tracking_uri)
    aliases = _get_model(tracking, family).aliases
    if alias not in aliases:
        raise SAERegistryError(f"{family} has no alias {alias!r}; it has: {_listing(sorted(aliases))}")
    tracking.client.delete_registered_model_alias(family, alias)


# -- finding ------------------------------------------------------------------------------------------


@dataclass
class VersionInfo:
    """One registered dictionary, as the registry describes it."""

    family: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None
    created: int  # ms since epoch

    @property
    def metrics(self) -> dict[str, float]:
        """The held-out numbers (the reconstruction metrics), by name."""
        return {m.name: float(self.tags[m.tag]) for m in metric_table(RECONSTRUCTION) if self.tags.get(m.tag)}


def _listing(items: list[str], limit: int = 20) -> str:
    if not items:
        return "(none)"
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def families(tracking_uri: TrackingLike = None) -> list[tuple[str, int, dict[str, str]]]:
    """Every family in the registry: (name, newest version, {alias: version}), by name."""
    client = Tracking.resolve(tracking_uri).client
    out = []
    for m in client.search_registered_models():
        newest = max((int(v.version) for v in _versions(client, m.name)), default=0)
        out.append((m.name, newest, {a: str(v) for a, v in m.aliases.items()}))
    return sorted(out)


def versions_by_store(tracking_uri: TrackingLike = None) -> dict[str, list[str]]:
    """Every registered version (``family/version``) by the fingerprint of the store it was trained on."""
    trained: dict[str, list[str]] = {}
    for mv in Tracking.resolve(tracking_uri).client.search_model_versions(max_results=10_000):
        if fingerprint := (mv.tags or {}).get("store.fingerprint"):
            trained.setdefault(fingerprint, []).append(f"{mv.name}/{mv.version}")
    return trained


def _get_model(tracking: Tracking, family: str):
    from mlflow.exceptions import MlflowException

    if not isinstance(family, str) or not family.strip() or "/" in family or ":" in family:
        raise SAERegistryError(f"{family!r} is not a family name: give FAMILY alone (no '/' or ':'); "
                               "`sae-registry show FAMILY/VERSION` shows one version")
    try:
        return tracking.client.get_registered_model(family)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # not "no such family": the server's own error
            raise
        raise SAERegistryError(
            f"no dictionary family {family!r} in the registry at {tracking.uri}; "
            f"families: {_listing([name for name, _, _ in families(tracking)])}"
        ) from None


def _versions(client, family: str) -> list:
    return client.search_model_versions(f"name='{family}'")


def _get_version(tracking: Tracking, family: str, version: str):
    from mlflow.exceptions import MlflowException

    model = _get_model(tracking, family)
    try:
        return tracking.client.get_model_version(family, version), model
    except MlflowException:
        existing = sorted((str(v.version) for v in _versions(tracking.client, family)), key=int)
        raise SAERegistryError(f"{family} has no version {version}; versions: {_listing(existing)}") from None


def _aliases_by_version(model) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(model.aliases.items()):
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def _info(mv, aliases_by_version: dict[str, list[str]]) -> VersionInfo:
    version = str(mv.version)
    return VersionInfo(mv.name, version, aliases_by_version.get(version, []), dict(mv.tags), mv.run_id,
                       mv.creation_timestamp)


def versions(family: str, tracking_uri: TrackingLike = None) -> list[VersionInfo]:
    """Every version of ``family``, newest first."""
    tracking = Tracking.resolve(tracking_uri)
    by_version = _aliases_by_version(_get_model(tracking, family))
    infos = [_info(mv, by_version) for mv in _versions(tracking.client, family)]
    return sorted(infos, key=lambda i: int(i.version), reverse=True)


def find(family: str, *, tracking_uri: TrackingLike = None, order_by: str | None = None,
         **filters: Any) -> list[VersionInfo]:
    """Versions of ``family`` whose tags match every filter, best first by ``order_by``: a metric's tag
    ranks as the metrics table says it is better (highest ``downstream.fidelity`` first), any other tag
    lowest first; default: the tag a sweep's default ``champion_by`` ranks by (``fvu``).

    ``find("minilm-l3", dict_size=4096, k=32)``; filters compare as numbers when both sides are. A
    filter or ``order_by`` naming a tag that no version has (a misspelt ``dict_sise``) is an error
    listing the tags there are, not an empty result.
    """
    if order_by is None:
        order_by = champion_metric(default_champion()).tag
    found = versions(family, tracking_uri)
    # what every trained version has, even where none is registered yet, and whatever tags there are
    known = sorted(set(SHAPE_TAGS + tuple(m.tag for m in metric_table(RECONSTRUCTION))).union(*(i.tags for i in found)))
    for key, role in [*((k, "filter on") for k in filters), (order_by, "order by")]:
        if key not in known:
            raise SAERegistryError(f"find({family!r}): no tag {key!r} to {role}; the versions' tags are: "
                                   f"{_listing(known, 60)}")

    def matches(info: VersionInfo) -> bool:
        for key, wanted in filters.items():
            have = info.tags.get(key)
            if have is None:
                return False
            try:
                if float(have) != float(wanted):
                    return False
            except (TypeError, ValueError):
                if str(have) != str(wanted):
                    return False
        return True

    metric = by_tag(order_by)

    def rank(info: VersionInfo) -> tuple:
        try:
            value = float(info.tags[order_by])
            return (0, metric.rank(value) if metric else value, -int(info.version))
        except (KeyError, ValueError):
            return (1, 0.0, -int(info.version))

    return sorted((i for i in found if matches(i)), key=rank)


def resolve(name: str, tracking_uri: TrackingLike = None) -> VersionInfo:
    """The registered version ``name`` points at (a bare family means its newest version)."""
    family, alias, version = parse_name(name)
    tracking = Tracking.resolve(tracking_uri)
    model = _get_model(tracking, family)
    if alias is not None:
        if alias not in model.aliases:
            raise SAERegistryError(
                f"{family} has no alias {alias!r}; aliases: "
                f"{_listing([f'{a} (v{v})' for a, v in sorted(model.aliases.items())])}"
            )
        version = str(model.aliases[alias])
    elif version is None:
        all_versions = _versions(tracking.client, family)
        if not all_versions:
            raise SAERegistryError(f"{family} has no versions yet")
        version = str(max(int(v.version) for v in all_versions))
    mv, _ = _get_version(tracking, family, version)
    return _info(mv, _aliases_by_version(model))


def resolve_embedded(name: str, tracking_uri: TrackingLike = None) -> VersionInfo | None:
    """What :func:`resolve` returns for ``FAMILY@ALIAS`` or ``FAMILY/VERSION`` in an embedded (SQLite)
    registry, read from its database without importing MLflow; ``None`` when it cannot say (a server,
    a bare family, a name or database it does not find as expected): then ask :func:`resolve`.

    For ``load`` of a cached dictionary: importing MLflow and opening its store costs more than the
    whole load otherwise does. Read-only; the cache is still checked against the checksums read here.
    """
    import sqlite3
    from contextlib import closing

    uri = Tracking.resolve(tracking_uri).uri
    try:
        family, alias, version = parse_name(name)
    except SAERegistryError:
        return None
    if not uri.startswith("sqlite:///") or "?" in uri or (alias is None and version is None):
        return None
    try:
        with closing(sqlite3.connect(f"file:{uri[len('sqlite:///'):]}?mode=ro", uri=True)) as db:
            if alias is not None:
                rows = db.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ? "
                                  "AND workspace = 'default'", (family, alias)).fetchall()
                if len(rows) != 1:
                    return None
                version = str(rows[0][0])
            assert version is not None  # parse_name gave one, or the alias named one
            rows = db.execute("SELECT run_id, creation_time FROM model_versions WHERE name = ? AND version = ? AND "
                              "workspace = 'default' AND current_stage != 'Deleted_Internal' AND status = 'READY'",
                              (family, int(version))).fetchall()
            if len(rows) != 1:
                return None
            tags = db.execute("SELECT key, value FROM model_version_tags WHERE name = ? AND version = ? "
                              "AND workspace = 'default'", (family, int(version))).fetchall()
            aliases = db.execute("SELECT alias FROM registered_model_aliases WHERE name = ? AND version = ? "
                                 "AND workspace = 'default' ORDER BY alias", (family, int(version))).fetchall()
    except (sqlite3.Error, ValueError, OverflowError):
        return None
    run_id, created = rows[0]
    return VersionInfo(family, str(version), [a for (a,) in aliases], dict(tags), run_id, created)
