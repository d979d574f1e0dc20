"""The ``sae-registry`` command line: parse, call one function, print. Heavy imports stay lazy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import click

from ..config.metrics import DOWNSTREAM, RECONSTRUCTION, listed
from ..config.metrics import metrics as metric_table
from ..config.options import HarvestSpec, SAEConfig, TrainConfig
from ..errors import SAERegistryError, printable
from .options import SAE_OPTIONS
from .options import built as _built
from .options import configs as _configs
from .options import options as _options

DEMO_STORE = "minilm-l3.zarr"


class _Group(click.Group):
    """Turns our errors into a one-line message and exit status 1 instead of a traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if bad := [a for a in args if "\x00" in a]:  # no file or name may hold one (only a caller in-process can)
            raise click.UsageError(f"{bad[0]!r} contains a NUL character")
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SAERegistryError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group)
@click.version_option(package_name="sae-registry")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking server or database [env MLFLOW_TRACKING_URI; default: sqlite:///mlflow.db here].")
@click.pass_context
def main(ctx: click.Context, tracking_uri: str | None) -> None:
    """Train, compare, keep and reuse sparse autoencoders."""
    from ..registry.tracking import Tracking

    # Built once, handed to every command as a value (nothing writes the environment).
    ctx.obj = Tracking.resolve(tracking_uri)


pass_tracking = click.pass_obj  # hands a command the Tracking that main put in ctx.obj


@main.command()
@click.option("--out", "out", required=True, help="Store to create: a directory, or an s3:// URL.")
@_options(HarvestSpec)
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--resume", is_flag=True, help="Continue an interrupted harvest into --out (same options).")
@click.option("--store-root", default=None,
              help="Also look here (a folder or an s3:// prefix) for a store with the same content "
                   "[env SAE_REGISTRY_STORE_ROOT].")
@click.option("--reuse/--no-reuse", default=True,
              help="Return an existing store with the same content key instead of harvesting [default: reuse].")
def harvest(out, overwrite, resume, store_root, reuse, **options) -> None:
    """Run a model over text and write one layer's (or each --hook's) activations to a zarr store."""
    spec = _built(HarvestSpec, "harvest.", **{k: v for k, v in options.items() if v not in (None, ())})  # before any work
    from ..harvest import local as H

    texts = H.read_texts(spec.text, separator=spec.separator) if spec.text else H.demo_texts()
    made = H.harvest(out, texts, text_source=spec.text or "python:pydoc_data.topics", overwrite=overwrite,
                     resume=resume, store_root=store_root, reuse=reuse, say=click.echo, **spec.harvest_options())
    for store in made.values() if isinstance(made, dict) else [made]:
        click.echo(f"wrote {len(store):,} tokens x {store.d} at {store.source['hook']} to {store.path} "
                   f"(fingerprint {store.fingerprint})")


@main.command()
@click.option("--store-root", default=None,
              help="The folder (or s3:// prefix) of stores [default: $SAE_REGISTRY_STORE_ROOT, else the working "
                   "directory].")
@pass_tracking
def stores(tracking, store_root) -> None:
    """List the stores in a folder: content key, tokens, size, hook, and the dictionaries trained on each."""
    from ..registry.versions import versions_by_store
    from ..store.reader import list_stores, store_roots
    from ..store.zarr_files import tree_bytes

    found = list_stores(store_roots(store_root) or [Path.cwd()])
    if not found:
        click.echo("no finished stores there")
        return
    trained = versions_by_store(tracking)
    for path, attrs in found:
        source = attrs.get("source", {})
        size = tree_bytes(path)
        names = sorted(trained.get(attrs.get("fingerprint", ""), []))
        click.echo(f"{source.get('content_key') or '-':16}  {attrs.get('n_tokens', 0):>12,} tokens  "
                   f"{size / 2**20:>9.1f} MiB  {source.get('hook', '-'):18}  {path}"
                   f"\n{'':18}trained on it: {', '.join(names) if names else 'nothing registered'}")


def _print_result(result) -> None:
    m = result.metrics
    numbers = "  ".join(f"{metric.label} {m[metric.key]:{metric.fmt}}" for metric in metric_table(RECONSTRUCTION)
                        if metric.key in m)
    click.echo(f"{numbers}  ({result.tokens_per_second:,.0f} tokens/s)")
    click.echo(f"dictionary saved to {result.out_dir}")


def _family_for(store_path: Path) -> str:
    """The default family name: the store's directory name without ``.zarr``."""
    name = store_path.resolve().name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


@main.command()
@click.option("--store", "store_path", required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Directory for the dictionary.")
@_options(SAEConfig, only=SAE_OPTIONS)
@click.option("--name", "family", default=None, help="Registry family [default: the store's name].")
@click.option("--alias", default=None, help="Give the new version this alias (e.g. champion).")
@click.option("--no-registry", is_flag=True, help="Only write files; record nothing in MLflow.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--overwrite", is_flag=True, help="Replace the dictionary (and checkpoint) already in --out.")
@_options(TrainConfig)
@pass_tracking
def train(tracking, store_path, out, family, alias, no_registry, resume, overwrite, **options) -> None:
    """Train one sparse autoencoder on a store; record and register it in MLflow."""
    _configs(1, options)  # every option checked before the store is opened
    from ..model.files import prepare_out

    prepare_out(out, overwrite=overwrite, resume=resume)  # refuses to replace a dictionary unasked
    from ..store.reader import ActivationStore

    store = ActivationStore.open(store_path)
    sae_cfg, cfg = _configs(store.d, options)
    if no_registry:
        from ..training.loop import train as run

        _print_result(run(store, sae_cfg, cfg, out, resume=resume))
        return
    from ..registry.runs import train_and_register

    family = _family_for(store_path) if family is None else family
    recorded = train_and_register(store, sae_cfg, cfg, out, family=family, alias=alias, resume=resume,
                                  tracking_uri=tracking)
    _print_result(recorded.result)
    click.echo(f"registered {family}/{recorded.version} (run {recorded.run_id})"
               + (f" as {family}@{alias}" if alias else ""))


DEMO_DEFAULTS = {"tokens": 1_500_000, "sparsity": "top_k"}


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(path_type=Path),
              help="Where the demo store lives (harvested on first use).")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@_options(SAEConfig, only=("dict_size", "top_k"))
@click.option("--name", "family", default="minilm-l3-demo", show_default=True, help="Registry family.")
@_options(TrainConfig, defaults=DEMO_DEFAULTS)
@pass_tracking
def demo(tracking, data_dir, out, family, **options) -> None:
    """Harvest MiniLM layer 3 over Python's docs (once), train and register one top_k SAE, load it back."""
    _configs(1, options, DEMO_DEFAULTS)  # every option checked before any harvest or training
    from ..harvest.local import ensure_store

    store_path = data_dir / DEMO_STORE
    store = ensure_store(store_path, HarvestSpec(layer=3), replace_unreadable=True, say=click.echo)
    sae_cfg, train_cfg = _configs(store.d, options, DEMO_DEFAULTS)
    from ..registry.dictionary import load
    from ..registry.runs import train_and_register

    recorded = train_and_register(store, sae_cfg, train_cfg, out, family=family, alias="champion",
                                  tracking_uri=tracking)
    _print_result(recorded.result)
    click.echo(json.dumps(recorded.result.metrics, indent=2))
    name = f"{family}@champion"
    dictionary = load(name, tracking_uri=tracking)
    batch = store.read_split("eval", max_tokens=8)
    values, indices = dictionary.encode_topk(batch)
    click.echo(f"\nregistered as {family}/{recorded.version}; loaded back with sae_registry.load({name!r})")
    click.echo(f"encoded {len(batch)} held-out tokens: first token's top latents {indices[0, :8].tolist()}")
    if store.has_provenance:  # a few seconds: one pass over the held-out split
        from ..analysis.cards import cards_for

        made, cards_dir, _ = cards_for(name, store_path=store.path, out_dir=out / "cards", top=16,
                                           tracking_uri=tracking)
        click.echo(f"feature cards of {len(made.cards)} latents: {cards_dir / 'index.html'} (also on the run, "
                   f"Artifacts > cards); more with `sae-registry cards {name}`")
    else:
        click.echo(f"no feature cards: {store_path} was harvested without token provenance (delete it to re-harvest)")
    click.echo(f"browse it: .venv/bin/sae-registry ui   (MLflow UI over {tracking.uri})")


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="Continue an interrupted sweep: finish missing trials, no duplicates.")
@click.option("--address", default=None, help="Ray cluster address [env RAY_ADDRESS; default: a local Ray].")
@pass_tracking
def sweep(tracking, spec_path, resume, address) -> None:
    """Train a grid of dictionaries (a YAML spec) on Ray Tune and register the best in MLflow."""
    from ..sweep import driver as S

    spec = S.SweepSpec.from_yaml(spec_path)
    click.echo(f"sweep {spec.name}: {len(spec.configurations())} dictionaries in {len(spec.packs())} trial(s)")
    result = S.run(spec, resume=resume, address=address, tracking_uri=tracking)
    if result.nothing_to_do:
        click.echo(f"nothing to do: sweep {spec.name} ({result.sweep_id}) finished already; its table:")
    click.echo(S.summary_table(result, spec.alias))
    if result.champion:
        click.echo(f"champion: sae_registry.load({spec.name + '@' + spec.alias!r})  (version {result.champion})")
    if result.failed_trials:
        raise click.ClickException(f"{result.failed_trials} trial(s) failed; rerun with --resume to retry them")


# -- the registry ---------------------------------------------------------------------------------


def _created(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _fmt(value: str | None, spec: str) -> str:
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "-"


@main.command("list")
@click.argument("family", required=False)
@pass_tracking
def list_(tracking, family) -> None:
    """Families in the registry, or the versions of FAMILY as a table."""
    from ..registry import versions as registry

    if family is None:
        found = registry.families(tracking)
        if not found:
            click.echo(f"no dictionaries registered at {tracking.uri}")
        for name, newest, aliases in found:
            named = ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items()))
            click.echo(printable(f"{name:32s} latest v{newest}  {named}"))  # names and aliases: anyone's text
        return
    family_versions = registry.versions(family, tracking)
    # the metrics table's listed columns; a downstream one only when some version has it
    columns = [m for m in listed() if not m.optional or any(m.tag in v.tags for v in family_versions)]
    click.echo(f"{'version':>7}  {'aliases':18} {'architecture':12} {'dict_size':>9} {'k':>4} {'l1_coeff':>9}"
               + "".join(f" {m.header}" for m in columns) + "  created")
    for v in family_versions:
        t = v.tags
        click.echo(printable(
            f"{v.version:>7}  {','.join(v.aliases) or '-':18} {t.get('sparsity') or '-':12} "
            f"{t.get('dict_size', '-'):>9} {t.get('k') or '-':>4} {_fmt(t.get('l1_coeff'), '.2g'):>9}"
            + "".join(f" {m.cell(t.get(m.tag))}" for m in columns) + f"  {_created(v.created)}"
        ))


@main.command()
@click.argument("name")
@pass_tracking
def show(tracking, name) -> None:
    """Everything the registry knows about NAME (FAMILY@ALIAS, FAMILY/VERSION or FAMILY)."""
    from ..registry import versions as registry

    info = registry.resolve(name, tracking)
    # Every name, alias and tag is text anyone who can write to the registry chose: shown escaped.
    click.echo(printable(f"{info.family}/{info.version}  aliases: {', '.join(info.aliases) or '-'}  run: {info.run_id}"))
    click.echo(f"created {_created(info.created)}")
    for key in sorted(info.tags):
        click.echo(printable(f"  {key:28s} {info.tags[key]}"))


@main.command()
@click.argument("family")
@click.argument("version", required=False)
@click.option("--alias", default="champion", show_default=True)
@click.option("--remove", is_flag=True, help="Remove the alias instead of setting it.")
@pass_tracking
def promote(tracking, family, version, alias, remove) -> None:
    """Point ALIAS at VERSION of FAMILY (moving it if needed), or --remove it."""
    from ..registry import versions as registry

    if remove:
        registry.remove_alias(family, alias, tracking)
        click.echo(f"removed {family}@{alias}")
        return
    if version is None:
        raise click.UsageError("give the VERSION to promote (or --remove)")
    registry.set_alias(family, alias, version, tracking)
    click.echo(f"{family}@{alias} -> version {version}")


@main.command()
@click.argument("name")
@click.option("--store", "store_path", required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Zarr group to write the codes to.")
@click.option("--split", type=click.Choice(["all", "train", "eval"]), default="all", show_default=True)
@click.option("--batch-size", default=8192, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted encoding into --out (same options).")
@pass_tracking
def encode(tracking, name, store_path, out, split, batch_size, device, overwrite, resume) -> None:
    """Encode a whole store with dictionary NAME; top_k codes are kept as values + indices."""
    from .._util.device import resolve_device
    from ..analysis.encode import encode_store
    from ..registry.dictionary import load
    from ..store.reader import ActivationStore

    dictionary = load(name, device=resolve_device(device), tracking_uri=tracking)
    store = ActivationStore.open(store_path)
    path = encode_store(dictionary.sae, store, out, split=split, batch_size=batch_size, overwrite=overwrite,
                        resume=resume, attrs={"dictionary": f"{dictionary.family}/{dictionary.version}"})
    click.echo(f"encoded {store.num_tokens(split):,} tokens with {dictionary.family}/{dictionary.version} into {path}")


@main.command()
@click.argument("name")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["saelens", "dictionary_learning"]), required=True,
              help="saelens: cfg.json + sae_weights.safetensors; dictionary_learning: ae.pt + config.json.")
@click.option("--overwrite", is_flag=True, help="Replace those files if DIRECTORY already holds them.")
@pass_tracking
def export(tracking, name, directory, fmt, overwrite) -> None:
    """Write dictionary NAME to DIRECTORY in SAELens's or dictionary_learning's saved format (weights mapped exactly)."""
    from ..interchange.formats import export as export_dictionary
    from ..registry.dictionary import load

    dictionary = load(name, tracking_uri=tracking)
    export_dictionary(dictionary, fmt, directory, overwrite=overwrite)
    click.echo(f"wrote {dictionary.family}/{dictionary.version} as {fmt} to {directory}")


@main.command("import")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--name", "family", required=True, help="The family to register it in (as its next version).")
@click.option("--format", "fmt", type=click.Choice(["auto", "saelens", "dictionary_learning"]), default="auto",
              show_default=True, help="auto: SAELens if DIRECTORY has cfg.json + sae_weights.safetensors, else ae.pt.")
@click.option("--alias", default=None, help="Also point this alias at the new version.")
@pass_tracking
def import_(tracking, directory, family, fmt, alias) -> None:
    """Register a SAELens or dictionary_learning SAE saved in DIRECTORY as the next version of --name."""
    from ..registry.runs import import_dictionary

    made = import_dictionary(directory, family, fmt=None if fmt == "auto" else fmt, alias=alias,
                             tracking_uri=tracking)
    click.echo(f"imported {made.format} {made.architecture} from {directory} as {family}/{made.version}"
               + (f" ({family}@{alias})" if alias else "") + f"  run: {made.run_id}")


@main.command()
@click.argument("name")
@click.option("--features", default=None, help="Comma-separated latent indices, e.g. 0,5,7 [default: --top latents chosen by --select].")
@click.option("--top", default=16, show_default=True, type=click.IntRange(min=1), help="Without --features: this many latents.")
@click.option("--select", type=click.Choice(["bands", "frequent"]), default="bands", show_default=True,
              help="bands: a random sample across frequency bands (dense, common, rare); frequent: the most frequent.")
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=None,
              help="Store to read [default: the one the dictionary was trained on].")
@click.option("--split", type=click.Choice(["eval", "train", "all"]), default="eval", show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Read at most this many tokens of the split.")
@click.option("--contexts", default=10, show_default=True, type=click.IntRange(min=1), help="Top activating contexts per latent.")
@click.option("--window", default=8, show_default=True, type=click.IntRange(min=0), help="Tokens shown either side of the activating one.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where to write index.html + cards.json [default: cards/FAMILY-vVERSION].")
@click.option("--no-log", is_flag=True, help="Do not log the cards on the dictionary's MLflow run.")
@click.option("--print", "print_text", is_flag=True, help="Also print each card's top contexts as text.")
@pass_tracking
def cards(tracking, name, features, top, select, store_path, split, max_tokens, contexts, window, out_dir, no_log, print_text) -> None:
    """Feature cards for dictionary NAME: frequency, mean activation, top contexts, promoted tokens (HTML + JSON)."""
    from ..analysis.cards import cards_for

    try:
        chosen = [int(f) for f in features.split(",") if f.strip()] if features else None
    except ValueError:
        raise click.UsageError(f"--features takes comma-separated integers, got {features!r}") from None
    made, out, uri = cards_for(name, store_path=store_path, out_dir=out_dir, log=not no_log, features=chosen,
                               top=top, select=select, n_contexts=contexts, window=window, split=split, max_tokens=max_tokens,
                               tracking_uri=tracking)
    if print_text:
        click.echo(made.text())
    click.echo(f"{len(made.cards)} feature cards written to {out / 'index.html'} (+ cards.json)")
    if uri:
        click.echo(f"logged on the dictionary's run: {uri}  (MLflow UI: run > Artifacts > cards)")


@main.command("evaluate")
@click.argument("name")
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=None,
              help="The store whose held-out text to use [default: the one the dictionary was trained on].")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="The model to splice into [default: the store's].")
@click.option("--text", "text_path", type=click.Path(path_type=Path), default=None,
              help="Evaluate on these texts (a file or a directory of .txt/.md) instead of the held-out split.")
@click.option("--layer", type=click.IntRange(min=0), default=None, help="Residual stream to splice into [default: the store's layer].")
@click.option("--hook", default=None, help="Hook point to splice into, e.g. blocks.3.hook_mlp_out [default: the store's].")
@click.option("--tokens", default=4096, show_default=True, type=click.IntRange(min=1), help="Tokens to splice (whole windows).")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-record", is_flag=True, help="Only print the numbers; do not record them on the version.")
@pass_tracking
def evaluate_(tracking, name, store_path, model_path, text_path, layer, hook, tokens, device, no_record) -> None:
    """Downstream fidelity of NAME: splice it into its source model and measure what the model loses.

    The numbers are recorded on the version (downstream.* tags, as a sweep records them; `list`
    shows the fidelity) unless --no-record.
    """
    if layer is not None and hook is not None:
        raise SAERegistryError("give --layer or --hook, not both: they both name where the dictionary is spliced in")
    from ..metrics.downstream import evaluate
    from ..registry.dictionary import load

    dictionary = load(name, tracking_uri=tracking)
    store = store_path or (None if model_path else dictionary.lineage.get("store.path"))
    if store is None and model_path is None:
        raise SAERegistryError(f"{name} records no store it was trained on (an imported dictionary): give one with "
                               "--store, or a model directory with --model, --text and --layer (or --hook)")
    if store is None and (text_path is None or (layer is None and hook is None)):  # checked here to name the options
        raise SAERegistryError("evaluating in a --model directory needs --text (the texts to run it on) and --layer "
                               "or --hook (the activations the dictionary reconstructs)")
    texts = None
    if text_path is not None:
        from ..harvest.local import read_texts

        texts = read_texts(text_path)
    m = evaluate(dictionary, store, texts=texts, model=model_path, layer=layer, hook=hook, max_tokens=tokens,
                 device=device)
    headline = ", ".join(f"{metric.label} {m[metric.key]:{metric.fmt}}" for metric in listed()
                         if metric.where == DOWNSTREAM and metric.key in m)
    click.echo(f"{dictionary.family}/{dictionary.version}: {headline} "
               f"({m['downstream/tokens']:,.0f} tokens in {m['downstream/windows']:.0f} windows)")
    for key in sorted(m):
        click.echo(f"  {key:28s} {m[key]:.6g}")
    if m["downstream/tokens"] < tokens:
        where = f"the texts of --text {text_path}" if text_path else f"the held-out split of {store}"
        click.echo(f"note: used {m['downstream/tokens']:,.0f} tokens, fewer than --tokens {tokens:,}: "
                   f"{where} holds no more (in whole windows)")
    if not no_record:
        from ..registry.runs import record_downstream

        about = {"downstream.text": str(text_path) if text_path else f"held-out split of {store}",
                 "downstream.layer": str(layer) if layer is not None else "the store's"}
        if model_path:
            about["downstream.model"] = str(model_path)
        record_downstream(dictionary.family, dictionary.version, m, about=about, tracking_uri=tracking)
        click.echo(f"recorded on {dictionary.family}/{dictionary.version} (downstream.* tags; see `list {dictionary.family}`)")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@pass_tracking
def ui(tracking, host, port) -> None:
    """Start the MLflow UI on the registry (the embedded default unless a server is set)."""
    uri = tracking.uri
    if uri.startswith(("http://", "https://")):
        click.echo(f"the registry is a tracking server: open {uri} in a browser")
        return
    click.echo(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl-C to stop)", err=False)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    raise SystemExit(subprocess.call(cmd, env=env))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
