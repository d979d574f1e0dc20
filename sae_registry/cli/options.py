"""The command line's options, generated from the config dataclasses' fields (name, type, choices,
help and bounds declared once in ``config/options.py``), and the configs built back from what was given,
with errors in the command line's words (``--k``, not ``top_k``). No torch here: ``--help`` stays fast."""

from __future__ import annotations

from dataclasses import MISSING, fields

import click

from ..config.options import SAEConfig, TrainConfig, choices_of, field_type
from ..errors import SAERegistryError


def options(cls, *, only: tuple[str, ...] | None = None, defaults: dict | None = None):
    """click options for the fields of config dataclass ``cls``, read from the fields themselves.

    ``--kebab-name`` (or the field's ``flags``), its type, choices and help; ``--x/--no-x`` for a
    bool. Every option defaults to None, so an option left unset keeps the dataclass's default
    (or ``defaults``' value for this command), which the help shows.
    """
    chosen = [f for f in fields(cls) if (only is None or f.name in only) and f.metadata.get("cli", True)]

    def decorate(command):
        for f in reversed(chosen):
            meta, kebab = f.metadata, f.name.replace("_", "-")
            kind, _ = field_type(cls, f.name)
            flags = meta.get("flags") or ((f"--{kebab}/--no-{kebab}",) if kind is bool else (f"--{kebab}",))
            default = (defaults or {}).get(f.name, f.default)
            shown = "" if default is None or default is MISSING or "[default:" in meta["help"] else (
                f" [default: {str(default).lower() if kind is bool else default}]")
            kw = {"default": None, "help": meta["help"] + shown}
            if "choices" in meta:
                kw["type"] = click.Choice(choices_of(meta))
            elif meta.get("multiple"):
                kw.update(multiple=True, type=str)
            elif kind is not bool:
                kw["type"] = kind
            command = click.option(*flags, f.name, **kw)(command)
        return command

    return decorate


SAE_OPTIONS = ("dict_size", "top_k", "sparsity", "prefixes")  # the dictionary's shape; input_size is the store's d


def flag(cls, name: str) -> str:
    """The command-line name of field ``name`` of ``cls`` (``top_k`` -> ``--k``)."""
    flags = cls.__dataclass_fields__[name].metadata.get("flags")
    return flags[0].split("/")[0] if flags else "--" + name.replace("_", "-")


def built(cls, prefix: str = "", **values):
    """``cls(**values)``; an error about one field names its option instead (the user's words here)."""
    try:
        return cls(**values)
    except SAERegistryError as e:
        message = str(e).removeprefix(prefix)
        name = message.split(" ", 1)[0]
        if name in cls.__dataclass_fields__ and message[len(name):].startswith(" must"):
            raise SAERegistryError(flag(cls, name) + message[len(name):]) from None
        raise


def configs(input_size: int, options: dict, defaults: dict | None = None):
    """The SAEConfig and TrainConfig of the options given (the rest: ``defaults``, then the dataclasses')."""
    given = {**(defaults or {}), **{k: v for k, v in options.items() if v is not None}}
    sae = {k: v for k, v in given.items() if k in SAE_OPTIONS}
    return (built(SAEConfig, input_size=input_size, **sae),
            built(TrainConfig, **{k: v for k, v in given.items() if k not in SAE_OPTIONS}))
