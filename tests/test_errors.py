"""Bad input, one clear error each: every row of docs/errors.md, as a case of one test.

A case does the bad thing and the test checks what a user sees: from Python an ``SAERegistryError``
with the row's message; from the CLI exit status 2 (click's usage errors) or 1 with one
``Error: ...`` line, and never a traceback. Also here: files from outside (pickles are never run).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import sae_registry
import sae_registry.tracking
from sae_registry import ActivationStore, SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.cli import main
from sae_registry.sweep import SweepSpec
from sae_registry.train import TrainConfig, train

TABLE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
FAMILY = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(path: Path, n: int = 2000, d: int = 8, **kw) -> Path:
    with ActivationStore.create(path, d=d, chunk_tokens=256, **kw) as store:
        store.append(torch.randn(n, d, generator=torch.Generator().manual_seed(0)))
    return path


class Env:
    """What the cases need: a small store, and a registry holding one dictionary (tiny@champion)."""

    def __init__(self, root: Path) -> None:
        from sae_registry.registry import train_and_register

        self.root = root
        self.store = _store(root / "s.zarr")
        self.narrow = _store(root / "narrow.zarr", d=4)
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        mp = pytest.MonkeyPatch()
        try:  # the experiment's artifacts go under the working directory at its creation
            mp.chdir(root)
            mp.setenv("MLFLOW_TRACKING_URI", self.uri)
            train_and_register(ActivationStore.open(self.store), SAEConfig(8, 16, 2),
                               TrainConfig(tokens=2048, batch_size=256, eval_every=4), root / "run",
                               family=FAMILY, alias="champion", progress=False)
        finally:
            mp.undo()

    def registry(self, monkeypatch) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.uri)

    def stored(self, name: str) -> Path:
        """The registry's own copy of one of tiny/1's files."""
        (path,) = (self.root / "mlruns").rglob(name)
        return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("errors"))


# -- the cases: each does one bad thing -----------------------------------------------------------


def _saved(tmp: Path, change) -> Path:
    """A saved dictionary in ``tmp/d`` whose config.json ``change(config)`` altered."""
    SparseAutoencoder.build(8, 16, 2).save(tmp / "d")
    config = json.loads((tmp / "d" / "config.json").read_text())
    change(config)
    (tmp / "d" / "config.json").write_text(json.dumps(config))
    return tmp / "d"


def _chunk(store: Path, i: int) -> Path:
    return store / "activations" / "c" / str(i) / "0"


def _nan_chunk_store(tmp: Path) -> Path:
    """A store whose chunk 1 (uncompressed) now decodes to NaN, as bytes written by another tool would."""
    path = _store(tmp / "nan.zarr", compressor="none")
    chunk = _chunk(path, 1)
    chunk.write_bytes(np.full(256 * 8, np.nan, dtype="<f4").tobytes())
    return path


class Payload:
    """A pickle that, if ever unpickled, creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def api_width(env, tmp, mp):
    SparseAutoencoder.build(8, 16, 2).encode(torch.zeros(3, 7))


def api_encode_nan(env, tmp, mp):
    env.registry(mp)
    x = torch.zeros(3, 8)
    x[1, 2] = float("nan")
    sae_registry.load(f"{FAMILY}@champion").encode(x)


def api_config_unknown_field(env, tmp, mp):
    SparseAutoencoder.load(_saved(tmp, lambda c: c["sae"].update(activation="gelu")))


def api_config_out_of_range(env, tmp, mp):
    SparseAutoencoder.load(_saved(tmp, lambda c: c["sae"].update(top_k=-3)))


def api_config_format(env, tmp, mp):
    SparseAutoencoder.load(_saved(tmp, lambda c: c.update(format_version=2)))


def api_weights_pickle(env, tmp, mp):
    d = _saved(tmp, lambda c: None)
    (d / "sae.safetensors").write_bytes(pickle.dumps(Payload(tmp / "marker")))
    try:
        SparseAutoencoder.load(d)
    finally:
        assert not (tmp / "marker").exists()


def api_batch_larger_than_store(env, tmp, mp):
    train(ActivationStore.open(env.store), SAEConfig(8, 16, 2), TrainConfig(batch_size=100_000), tmp / "o",
          progress=False)


def api_store_d_mismatch(env, tmp, mp):
    train(ActivationStore.open(env.store), SAEConfig(16, 16, 2), TrainConfig(batch_size=256), tmp / "o",
          progress=False)


def store_nan_append(env, tmp, mp):
    x = torch.zeros(4, 8)
    x[0, 0] = float("inf")
    ActivationStore.create(tmp / "s.zarr", d=8).append(x)


def store_nan_chunk(env, tmp, mp):
    for _ in ActivationStore.open(_nan_chunk_store(tmp)).batches(100):
        pass


def store_truncated_chunk(env, tmp, mp):
    path = _store(tmp / "t.zarr", compressor="lz4")
    data = _chunk(path, 2).read_bytes()
    _chunk(path, 2).write_bytes(data[: len(data) // 2])  # the writer died mid-file
    ActivationStore.open(path).read()


def store_empty(env, tmp, mp):
    ActivationStore.create(tmp / "e.zarr", d=8).close()


def store_not_a_store(env, tmp, mp):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "a.txt").write_text("hello")
    ActivationStore.open(tmp / "notes")


def store_foreign_zarr(env, tmp, mp):
    import zarr

    zarr.create_group(store=str(tmp / "o.zarr"), zarr_format=3).create_array("activations", shape=(4, 2),
                                                                                dtype="float32")
    ActivationStore.open(tmp / "o.zarr")


def store_half_written(env, tmp, mp):
    store = ActivationStore.create(tmp / "h.zarr", d=8, chunk_tokens=100)
    store.append(torch.randn(450, 8))  # and the writer is killed: never closed
    ActivationStore.open(tmp / "h.zarr")


def store_encode_d_mismatch(env, tmp, mp):
    from sae_registry.encode import encode_store

    encode_store(SparseAutoencoder.build(16, 32, 2), ActivationStore.open(env.store), tmp / "codes.zarr",
                 progress=False)


def store_disk_full(env, tmp, mp):
    import zarr.storage

    real_set = zarr.storage.LocalStore.set

    async def full(self, key, value):
        if "/c/" in key:  # chunk data; metadata still fits
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real_set(self, key, value)

    mp.setattr(zarr.storage.LocalStore, "set", full)
    with ActivationStore.create(tmp / "full.zarr", d=8, chunk_tokens=100) as store:
        store.append(torch.randn(1000, 8))


def store_missing_chunk(env, tmp, mp):
    path = _store(tmp / "m.zarr")
    _chunk(path, 3).unlink()
    ActivationStore.open(path)


def store_chunk_too_big(env, tmp, mp):
    import json

    path = _store(tmp / "bomb.zarr", n=8, d=16)
    for meta, edit in ((path / "activations" / "zarr.json", lambda m: m["chunk_grid"]["configuration"]["chunk_shape"]),
                       (path / "zarr.json", lambda m: m["attributes"])):
        doc = json.loads(meta.read_text())
        target = edit(doc)
        target[0 if isinstance(target, list) else "chunk_tokens"] = 2**25
        meta.write_text(json.dumps(doc))
    ActivationStore.open(path).read(0, 2)


def store_overwrite_foreign(env, tmp, mp):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "a.txt").write_text("mine")
    ActivationStore.create(tmp / "notes", d=8, overwrite=True)


def _after_overwrite_foreign(env, tmp):
    assert (tmp / "notes" / "a.txt").read_text() == "mine"


def _after_disk_full(env, tmp):
    with pytest.raises(SAERegistryError, match="never finished"):
        ActivationStore.open(tmp / "full.zarr")


SPEC = {"name": "ok", "store": "x.zarr", "grid": {"dict_size": [64], "k": [4]}}


def _spec(**change) -> dict:
    return {**SPEC, **change}


def spec_ray_unreachable(env, tmp, mp):
    from sae_registry.sweep import run

    spec = SweepSpec.from_dict(_spec(store=str(env.store), grid={"dict_size": [16], "k": [2]}))
    started = time.perf_counter()
    try:
        run(spec, address=f"127.0.0.1:{_free_port()}", verbose=0)
    finally:
        assert time.perf_counter() - started < 30


def spec_not_yaml(env, tmp, mp):
    (tmp / "bad.yaml").write_text("name: [unclosed")
    SweepSpec.from_yaml(tmp / "bad.yaml")


def registry_checksum_mismatch(env, tmp, mp):
    env.registry(mp)
    stored = env.stored("config.json")
    original = stored.read_bytes()
    try:
        stored.write_bytes(original.replace(b'"top_k": 2', b'"top_k": 1'))
        sae_registry.load(f"{FAMILY}/1")
    finally:
        stored.write_bytes(original)


def registry_server_unreachable(env, tmp, mp):
    mp.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    started = time.perf_counter()
    try:
        sae_registry.load(f"{FAMILY}@champion")
    finally:
        assert time.perf_counter() - started < 30


def api_remote_code_model(env, tmp, mp):
    from sae_registry.harvest import harvest

    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}))
    harvest(tmp / "s.zarr", ["some text"], model_path=tmp / "model", progress=False)


def import_k_not_one_integer(env, tmp, mp):
    from sae_registry.interchange import read

    (tmp / "dl").mkdir()
    (tmp / "dl" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    torch.save({"encoder.weight": torch.randn(16, 8), "encoder.bias": torch.zeros(16),
                "decoder.weight": torch.randn(8, 16), "b_dec": torch.zeros(8), "k": torch.tensor([4, 4])},
               tmp / "dl" / "ae.pt")
    read(tmp / "dl")


def import_unmapped_architecture(env, tmp, mp):
    from sae_registry.interchange import read

    (tmp / "dl").mkdir()
    (tmp / "dl" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder"}}))
    torch.save({"encoder.weight": torch.randn(16, 8)}, tmp / "dl" / "ae.pt")
    read(tmp / "dl")


def export_batch_top_k_without_threshold(env, tmp, mp):
    from sae_registry.interchange import export

    export(SparseAutoencoder.build(8, 16, 2, "batch_top_k"), "saelens", tmp / "out")


def spec_rule_key_of_another_rule(env, tmp, mp):
    SweepSpec.from_dict({"name": "x", "store": "s.zarr", "grid": [{"sparsity": ["top_k"], "l0_coeff": [0.1]}]})


def _cli(*args, registry: bool = False):
    def case(env, tmp, mp):
        mp.setenv("MLFLOW_TRACKING_URI", "x")  # the CLI may set it: restored (unset) after the case
        mp.delenv("MLFLOW_TRACKING_URI")
        if registry:
            env.registry(mp)
        subs = {"STORE": str(env.store), "NARROW": str(env.narrow), "TMP": str(tmp), "PORT": str(_free_port())}
        argv = [re.sub("|".join(subs), lambda m: subs[m[0]], a) for a in args]
        if "NAN" in args:
            argv[argv.index("NAN")] = str(_nan_chunk_store(tmp))
        if any(a.endswith("spec.yaml") for a in argv):
            spec = _spec(store=str(env.store), registr="all") if "--address" not in argv else \
                _spec(store=str(env.store), grid={"dict_size": [16], "k": [2]})
            (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
        return CliRunner().invoke(main, argv)
    return case


TRAIN = ("train", "--store", "STORE", "--out", "TMP/o")

# id -> (what the user does, the message they get (a regex), [a check afterwards])
CASES = {
    "api-width": (api_width, r"input must have last dimension 8, got shape \(3, 7\)"),
    "api-encode-nan": (api_encode_nan, "input contains NaN or Inf values; drop or fix those rows"),
    "api-unknown-sparsity": (lambda e, t, m: SAEConfig(8, 16, 2, "topk"),
                             "sparsity must be one of top_k, l1, batch_top_k, jumprelu, matryoshka, got 'topk'"),
    "api-k-zero": (lambda e, t, m: SAEConfig(8, 16, 0), "top_k must be a positive integer, got 0"),
    "api-k-too-big": (lambda e, t, m: SAEConfig(8, 16, 32), r"top_k \(32\) cannot exceed dict_size \(16\)"),
    "api-negative-l1": (lambda e, t, m: TrainConfig(l1_coeff=-0.1), "l1_coeff must be >= 0, got -0.1"),
    "api-batch-larger-than-store": (api_batch_larger_than_store,
                                    "fewer than one batch .*harvest more or lower --batch-size"),
    "api-store-d-mismatch": (api_store_d_mismatch, r"input_size \(16\) differs from the store's d \(8\)"),
    "api-config-unknown-field": (api_config_unknown_field,
                                 r"config.json: SAE config has unknown fields \['activation'\].*refusing to load"),
    "api-config-out-of-range": (api_config_out_of_range,
                                "config.json: top_k must be a positive integer, got -3; refusing to load"),
    "api-config-format": (api_config_format, "this sae-registry reads 'sae-registry/dictionary' version 1"),
    "api-weights-pickle": (api_weights_pickle, "sae.safetensors is not a readable safetensors file"),
    "store-nan-append": (store_nan_append, "append got NaN or Inf activations.*refusing to store them"),
    "store-nan-chunk": (store_nan_chunk,
                        (r"is damaged: chunk 1 of activations/ \(rows 256-512\) cannot be read \(it holds NaN or Inf\)"
                        r"\. Delete the store and harvest it again")),
    "store-truncated-chunk": (store_truncated_chunk,
                              (r"is damaged: chunk 2 of activations/ \(rows 512-768\) cannot be read \(RuntimeError: "
                              r".*\)\. Delete the store and harvest it again")),
    "store-empty": (store_empty, "a store needs at least 2 tokens; .* got 0"),
    "store-not-a-store": (store_not_a_store, "no activation store at .*; make one with `sae-registry harvest`"),
    "store-foreign-zarr": (store_foreign_zarr, "is a zarr group but not an sae-registry activation store"),
    "store-half-written": (store_half_written, "was never finished .*Delete it and harvest again"),
    "store-encode-d-mismatch": (store_encode_d_mismatch, "holds 8-wide activations but the dictionary takes input_size=16"),
    "store-disk-full": (store_disk_full, ("the disk is full: writing .*full.zarr failed .*No space left on device.*"
                        "left 'writing' \\(unfinished\\).*free some space, then harvest again"), _after_disk_full),
    "store-missing-chunk": (store_missing_chunk, (r"m.zarr is damaged: 1 of the 8 chunk files of activations/ are "
                            r"missing \(deleted, or never copied\)\. Delete the store and harvest it again")),
    "store-chunk-too-big": (store_chunk_too_big, (r"refusing its chunk shape \(33554432, 16\) of activations/: a chunk "
                            r"holds more rows than the whole store \(8\).*smaller --chunk-tokens")),
    "store-url-scheme": (lambda e, t, m: ActivationStore.open("http://127.0.0.1:9/acts.zarr"),
                         "http:// is not a place sae-registry reads stores from; use a local path or one of s3://"),
    "store-overwrite-foreign": (store_overwrite_foreign, (r"notes exists and was not made by sae-registry as "
                                r"'sae-registry/activation-store' .*refusing to delete it with --overwrite"),
                                _after_overwrite_foreign),
    "spec-empty-grid": (lambda e, t, m: SweepSpec.from_dict(_spec(grid=[])), "grid: is empty; give at least one key"),
    "spec-unknown-grid-key": (lambda e, t, m: SweepSpec.from_dict(_spec(grid={"dict_sise": [64]})),
                              "grid: unknown key 'dict_sise'; use dict_size, k, sparsity or a training option"),
    "spec-field-typo": (lambda e, t, m: SweepSpec.from_dict(_spec(registr="all")),
                        r"unknown spec fields \['registr'\]; known: .*register"),
    "spec-unknown-sparsity": (lambda e, t, m: SweepSpec.from_dict(_spec(grid={"sparsity": ["topk"]})),
                              "grid point .*: sparsity must be one of top_k, l1, batch_top_k, jumprelu, matryoshka, got 'topk'"),
    "spec-k-too-big": (lambda e, t, m: SweepSpec.from_dict(_spec(grid={"dict_size": [8], "k": [16]})),
                       r"grid point .*: top_k \(16\) cannot exceed dict_size \(8\)"),
    "spec-negative-l1": (lambda e, t, m: SweepSpec.from_dict(_spec(train={"l1_coeff": -1})),
                         "grid point .*: l1_coeff must be >= 0, got -1"),
    "spec-not-yaml": (spec_not_yaml, "bad.yaml is not valid YAML"),
    "spec-harvest-typo": (lambda e, t, m: SweepSpec.from_dict(_spec(harvest={"layr": 3})),
                          "harvest.layr: unknown harvest option; the options are text, model_path, layer"),
    "spec-bad-resources": (lambda e, t, m: SweepSpec.from_dict(_spec(resources={"cpu": -1})),
                           "resources.cpu must be >= 0, got -1"),
    "spec-ray-unreachable": (spec_ray_unreachable, (r"no Ray cluster answers at 127\.0\.0\.1:\d+ .*start one "
                             r"\(`ray start --head`\), fix --address / RAY_ADDRESS")),
    "registry-unknown-family": (lambda e, t, m: (e.registry(m), sae_registry.load("nope@champion")),
                                f"no dictionary family 'nope' in the registry at .*; families: {FAMILY}"),
    "registry-unknown-version": (lambda e, t, m: (e.registry(m), sae_registry.load(f"{FAMILY}/9")),
                                 f"{FAMILY} has no version 9; versions: 1"),
    "registry-unknown-alias": (lambda e, t, m: (e.registry(m), sae_registry.load(f"{FAMILY}@gold")),
                               rf"{FAMILY} has no alias 'gold'; aliases: champion \(v1\)"),
    "registry-bad-name": (lambda e, t, m: sae_registry.load("a/b/c"),
                          "cannot read dictionary name 'a/b/c': use FAMILY@ALIAS, FAMILY/VERSION"),
    "registry-checksum-mismatch": (registry_checksum_mismatch,
                                   (f"the files of {FAMILY}/1 do not match the checksums recorded when it was "
                                   "registered.*Refusing to load them")),
    "registry-server-unreachable": (registry_server_unreachable,
                                    (r"cannot reach the MLflow tracking server at http://127\.0\.0\.1:\d+ .*start it, "
                                    "or point MLFLOW_TRACKING_URI")),
    "cli-missing-option": (_cli("train", "--out", "TMP/o"), "2:.*Missing option '--store'"),
    "cli-bad-choice": (_cli(*TRAIN, "--sparsity", "topk"), "2:.*Invalid value for '--sparsity': 'topk' is not one of"),
    "cli-not-a-number": (_cli(*TRAIN, "--k", "many"), "2:.*Invalid value for '--k': 'many' is not a valid integer"),
    "cli-store-missing": (_cli("train", "--store", "TMP/nope.zarr", "--out", "TMP/o"),
                          "1:Error: no activation store at .*nope.zarr; make one with `sae-registry harvest`"),
    "cli-k-zero": (_cli(*TRAIN, "--k", "0", "--no-registry"), "1:Error: --k must be a positive integer, got 0"),
    "cli-negative-l1": (_cli(*TRAIN, "--l1-coeff", "-1", "--no-registry"),
                        "1:Error: --l1-coeff must be >= 0, got -1"),
    "cli-batch-larger-than-store": (_cli(*TRAIN, "--batch-size", "100000", "--no-registry"),
                                    "1:Error: the store's training split has 1900 tokens, fewer than one batch"),
    "cli-encode-unknown-name": (_cli("encode", "nope@champion", "--store", "STORE", "--out", "TMP/c", registry=True),
                                f"1:Error: no dictionary family 'nope' in the registry at .*; families: {FAMILY}"),
    "cli-encode-d-mismatch": (_cli("encode", f"{FAMILY}@champion", "--store", "NARROW", "--out", "TMP/c",
                                   registry=True),
                              "1:Error: .*narrow.zarr holds 4-wide activations but the dictionary takes input_size=8"),
    "cli-encode-nan-store": (_cli("encode", f"{FAMILY}@champion", "--store", "NAN", "--out", "TMP/c", registry=True),
                             r"1:Error: .*nan.zarr is damaged: chunk 1 of activations/ \(rows 256-512\) .*it holds NaN or Inf"),
    "cli-sweep-typo": (_cli("sweep", "TMP/spec.yaml"), r"1:Error: unknown spec fields \['registr'\]"),
    "cli-sweep-ray-unreachable": (_cli("sweep", "TMP/spec.yaml", "--address", "127.0.0.1:PORT"),
                                  r"1:Error: no Ray cluster answers at 127\.0\.0\.1:\d+"),
    "cli-tracking-unreachable": (_cli("--tracking-uri", "http://127.0.0.1:PORT", "list"),
                                 r"1:Error: cannot reach the MLflow tracking server at http://127\.0\.0\.1:\d+"),
    "api-retry-seconds": (lambda e, t, m: (m.setenv("SAE_REGISTRY_RETRY_SECONDS", "abc"),
                                           sae_registry.tracking.retrying(lambda: None, "a registry call")),
                          "SAE_REGISTRY_RETRY_SECONDS='abc' is not a number of seconds"),
    "api-weights-header-mismatch": (
        lambda e, t, m: SparseAutoencoder.load(_saved(t, lambda c: c["sae"].update(dict_size=3_000_000))),
        r"W_enc in .*sae.safetensors has shape \(16, 8\), config.json implies \(3000000, 8\)"),
    "api-config-too-large": (lambda e, t, m: SparseAutoencoder.load(_saved(t, lambda c: c["sae"].update(dict_size=10**12))),
                             r"config.json: dict_size must be <= 16777216, got 1000000000000; refusing to load it"),
    "api-remote-code-model": (api_remote_code_model, "names its own model code \\(auto_map\\); sae-registry never runs"),
    "import-k-not-one-integer": (import_k_not_one_integer, r"ae.pt: k must be one integer .*shape \(2,\)"),
    "spec-rule-key-of-another-rule": (spec_rule_key_of_another_rule,
                                      "grid.l0_coeff: belongs to sparsity jumprelu, and this grid trains top_k"),
    "api-rule-key-of-another-rule": (lambda e, t, m: SAEConfig(8, 16, sparsity="top_k", prefixes="4,16"),
                                     "prefixes applies to sparsity matryoshka only, not top_k"),
    "api-prefixes-not-increasing": (lambda e, t, m: SAEConfig(8, 16, 2, "matryoshka", prefixes="8,4,16"),
                                    "prefixes must be increasing positive latent counts, got '8,4,16'"),
    "api-prefixes-not-dict-size": (lambda e, t, m: SAEConfig(8, 16, 2, "matryoshka", prefixes="4,8"),
                                   r"prefixes must end at dict_size \(16\), got '4,8'"),
    "api-k-exceeds-dict-size": (lambda e, t, m: SAEConfig(8, 16, 17, "batch_top_k"),
                                r"top_k \(17\) cannot exceed dict_size \(16\)"),
    "api-negative-l0-coeff": (lambda e, t, m: TrainConfig(l0_coeff=-0.5), "l0_coeff must be >= 0, got -0.5"),
    "import-unmapped-architecture": (import_unmapped_architecture,
                                     "trainer.dict_class 'GatedAutoEncoder' cannot be mapped exactly"),
    "export-batch-top-k-no-threshold": (export_batch_top_k_without_threshold,
                                        "threshold: this batch_top_k dictionary has no inference threshold yet"),
}


def _table_ids() -> list[str]:
    return re.findall(r"^\|\s*\d+\s*\|.*\|\s*`([a-z0-9-]+)`\s*\|\s*$", TABLE.read_text(), flags=re.MULTILINE)


def test_every_row_has_a_case():
    ids = _table_ids()
    assert len(ids) == len(set(ids)) >= 25
    assert set(ids) == set(CASES), (sorted(set(ids) - set(CASES)), sorted(set(CASES) - set(ids)))
    numbers = [int(n) for n in re.findall(r"^\|\s*(\d+)\s*\|", TABLE.read_text(), flags=re.MULTILINE)]
    assert numbers == list(range(1, len(ids) + 1))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_error(case, env, tmp_path, monkeypatch):
    action, message, *after = CASES[case]
    if case.startswith("cli-"):
        result = action(env, tmp_path, monkeypatch)
        status, message = message.split(":", 1)
        assert result.exit_code == int(status), result.output
        assert "Traceback" not in result.output and not isinstance(result.exception, SAERegistryError)
        assert re.search(message, result.output, flags=re.DOTALL), result.output
        if status == "1":
            assert result.output.count("Error:") == 1
    else:
        with pytest.raises(SAERegistryError, match=message):
            action(env, tmp_path, monkeypatch)
    for check in after:
        check(env, tmp_path)


# -- files from outside ------------------------------------------------------------------------------


def test_pickles_beside_a_registered_dictionary_are_never_run(env, tmp_path, monkeypatch):
    """A model.pkl / python_model.pkl put into a version's artifacts: load() and `encode` never unpickle it."""
    env.registry(monkeypatch)
    marker = tmp_path / "pwned"
    weights = env.stored("sae.safetensors")
    planted = []
    for directory in {weights.parent, weights.parent.parent}:  # beside the files, and at the model's root
        for name in ("model.pkl", "python_model.pkl"):
            planted.append(directory / name)
            planted[-1].write_bytes(pickle.dumps(Payload(marker)))
    try:
        d = sae_registry.load(f"{FAMILY}@champion")
        assert d.encode(torch.randn(3, 8)).shape == (3, 16)
        assert sorted(p.name for p in d.path.rglob("*") if p.is_file()) == ["config.json", "sae.safetensors"]
        r = CliRunner().invoke(main, ["encode", f"{FAMILY}@champion", "--store", str(env.store),
                                      "--out", str(tmp_path / "codes.zarr"), "--split", "eval"])
        assert r.exit_code == 0, r.output
        assert not marker.exists()
        pickle.loads(planted[0].read_bytes())  # the payload is live: unpickling it would have left the marker
        assert marker.exists()
    finally:
        for p in planted:
            p.unlink()


def test_top_level_metadata_in_config_json_is_kept_but_never_read(tmp_path):
    sae = SparseAutoencoder.build(8, 16, 2)
    sae.save(tmp_path / "d", extra={"train": {"lr": 1e-3}, "metrics": {"fvu": 0.1}, "anything": [1, 2]})
    loaded = SparseAutoencoder.load(tmp_path / "d")
    assert loaded.cfg == sae.cfg
    good = json.loads((tmp_path / "d" / "config.json").read_text())
    for bad, message in [({"dict_size": "16"}, "dict_size must be a positive integer, got '16'"),
                         ({"top_k": True}, "top_k must be a positive integer, got True"),
                         ({"sparsity": None}, "sparsity must be one of"),
                         ({"input_size": None}, "input_size must be a positive integer")]:
        config = json.loads(json.dumps(good))
        config["sae"].update(bad)
        (tmp_path / "d" / "config.json").write_text(json.dumps(config))
        with pytest.raises(SAERegistryError, match=message):
            SparseAutoencoder.load(tmp_path / "d")
    config["sae"] = {"dict_size": 16}
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SAERegistryError, match=r"missing \['input_size'\]"):
        SparseAutoencoder.load(tmp_path / "d")
