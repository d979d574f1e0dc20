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
import sae_registry.harvest.local
import sae_registry.registry.tracking
from sae_registry import ActivationStore, SAEConfig, SAERegistryError, SparseAutoencoder
from sae_registry.cli.commands import main
from sae_registry.config.sweep import SweepSpec
from sae_registry.training.loop import TrainConfig, train

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
        from sae_registry.registry.runs import train_and_register

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
        """The registry's own copy of one of tiny/1's files (other cases may add families beside it)."""
        import mlflow

        experiment = mlflow.MlflowClient(tracking_uri=self.uri).get_experiment_by_name(FAMILY).experiment_id
        (path,) = (self.root / "mlruns" / experiment).rglob(name)
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


def store_read_count_for_stop(env, tmp, mp):
    ActivationStore.open(_store(tmp / "s.zarr")).read(1000, 100)  # meant rows 1000-1099


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
    from sae_registry.analysis.encode import encode_store

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
    from sae_registry.sweep.driver import run

    spec = SweepSpec.from_dict(_spec(store=str(env.store), grid={"dict_size": [16], "k": [2]}))
    started = time.perf_counter()
    try:
        run(spec, address=f"127.0.0.1:{_free_port()}", verbose=0)
    finally:
        assert time.perf_counter() - started < 30


def train_out_busy(env, tmp, mp):
    from sae_registry.training.checkpoints import writing_to

    with writing_to([tmp / "o"]):  # as a first training holds it
        train(ActivationStore.open(env.store), SAEConfig(8, 16, 2), TrainConfig(batch_size=256), tmp / "o",
              resume=True, progress=False)


def ray_token_refused(env, tmp, mp):
    """Ray's own exception chain, as a head with RAY_AUTH_MODE=token answers a driver without it."""
    import ray

    from sae_registry._util import cluster

    def refused(**kwargs):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication "
                               "token is missing or incorrect. Note: RAY_AUTH_MODE is currently 'disabled'")
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6391") from e

    mp.setattr(ray, "is_initialized", lambda: False)
    mp.setattr(ray, "init", refused)
    mp.setattr(cluster, "check_address", lambda address: None)
    mp.delenv("RAY_AUTH_MODE", raising=False)
    mp.setenv("RAY_AUTH_TOKEN", "a-token")
    cluster.connect("127.0.0.1:6391")


def sweep_driver_failed(env, tmp, mp):
    from sae_registry.registry.tracking import Tracking
    from sae_registry.sweep.driver import _driver_guard

    tracking = Tracking.resolve(f"sqlite:///{tmp / 'sweep.db'}")
    parent = tracking.client.create_run(tracking.ensure_experiment("ok"))
    with _driver_guard(SweepSpec.from_dict(SPEC), tracking.client, parent.info.run_id):
        raise FileNotFoundError(2, "No such file or directory")  # os.getcwd() in Tune's result analysis


def _after_sweep_driver_failed(env, tmp):
    from sae_registry.registry.tracking import Tracking

    client = Tracking.resolve(f"sqlite:///{tmp / 'sweep.db'}").client
    runs = client.search_runs([client.get_experiment_by_name("ok").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


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
    from sae_registry.harvest.local import harvest

    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}))
    harvest(tmp / "s.zarr", ["some text"], model_path=tmp / "model", progress=False)


def import_k_not_one_integer(env, tmp, mp):
    from sae_registry.interchange.formats import read

    (tmp / "dl").mkdir()
    (tmp / "dl" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    torch.save({"encoder.weight": torch.randn(16, 8), "encoder.bias": torch.zeros(16),
                "decoder.weight": torch.randn(8, 16), "b_dec": torch.zeros(8), "k": torch.tensor([4, 4])},
               tmp / "dl" / "ae.pt")
    read(tmp / "dl")


def api_store_key_other_options(env, tmp, mp):
    from sae_registry.config.options import HarvestSpec
    from sae_registry.harvest.local import resolve_store

    _store(tmp / "keyed.zarr", source={"content_key": "abcdef0123456789", "layer": 3, "max_length": 128})
    mp.chdir(tmp)
    resolve_store("key:abcdef01", HarvestSpec(layer=4))


def _no_s3_credentials(mp, tmp):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        mp.delenv(name, raising=False)
    mp.setenv("HOME", str(tmp))


def api_s3_unreachable(env, tmp, mp):
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    ActivationStore.open("s3://stores/acts.zarr")


def store_s3_outage(env, tmp, mp):
    import botocore.exceptions

    from sae_registry.store import writer as store_writer
    from sae_registry.store import zarr_files

    mp.setenv("SAE_REGISTRY_S3_WAIT_SECONDS", "0")  # the endpoint's real comings and goings: tests/test_s3.py

    def write():
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/stores/acts.zarr")

    zarr_files.through_outages("s3://stores/acts.zarr", "writing rows 0-64", store_writer.RESUME_HINT, write)


def store_s3_wait_not_seconds(env, tmp, mp):
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("SAE_REGISTRY_S3_WAIT_SECONDS", "soon")
    ActivationStore.open("s3://stores/acts.zarr")


def _harvest_minilm(**options):
    def case(env, tmp, mp):
        from sae_registry.harvest.local import harvest

        harvest(tmp / "s.zarr", ["some text"], progress=False, **options)
    return case


def gguf_not_causal_lm(env, tmp, mp):
    from sae_registry.harvest.local import harvest

    (tmp / "notes.gguf").write_bytes(b"GGUF but not really" * 8)
    harvest(tmp / "s.zarr", ["some text"], model_path=tmp / "notes.gguf", progress=False)


def jsonl_without_text(env, tmp, mp):
    from sae_registry.harvest.local import read_texts

    (tmp / "d.jsonl").write_text(json.dumps({"content": "words"}) + "\n")
    read_texts(tmp / "d.jsonl")


def api_find_unknown_filter(env, tmp, mp):
    env.registry(mp)
    sae_registry.find(FAMILY, dict_sise=16)


def api_alias_before_training(env, tmp, mp):
    from sae_registry.registry.runs import train_and_register

    env.registry(mp)
    mp.chdir(env.root)
    before = _runs(env)
    try:
        train_and_register(ActivationStore.open(env.store), SAEConfig(8, 16, 2), TrainConfig(tokens=512, batch_size=256),
                           tmp / "o", family=FAMILY, alias="latest", progress=False)
    finally:
        assert _runs(env) == before and not (tmp / "o").exists()  # refused before any run or file


def _runs(env) -> int:
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(tracking_uri=env.uri)
    return len(client.search_runs([e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)],
                                  run_view_type=ViewType.ALL))


def api_resume_changed(env, tmp, mp):
    store = ActivationStore.open(env.store)
    cfg = TrainConfig(tokens=1024, batch_size=256, eval_every=2, checkpoint_every=2)
    train(store, SAEConfig(8, 16, 2), cfg, tmp / "r", progress=False)
    train(store, SAEConfig(8, 16, 2), TrainConfig(**{**cfg.to_dict(), "lr": 0.01}), tmp / "r", resume=True,
          progress=False)


def spec_resume_changed(env, tmp, mp):
    import mlflow

    from sae_registry.sweep.driver import _check_same_trials

    client = mlflow.MlflowClient(tracking_uri=env.uri)
    mp.chdir(env.root)
    parent = client.create_run(client.get_experiment_by_name(FAMILY).experiment_id, run_name="a sweep's parent")
    client.log_dict(parent.info.run_id, SweepSpec.from_dict(_spec()).to_dict(), "sweep_spec.json")
    client.set_terminated(parent.info.run_id)
    _check_same_trials(client, parent.info.run_id, SweepSpec.from_dict(_spec(grid={"dict_size": [64], "k": [8]})))


def cli_evaluate_imported(env, tmp, mp):
    from sae_registry.interchange.formats import export
    from sae_registry.registry.runs import import_dictionary

    env.registry(mp)
    export(sae_registry.load(f"{FAMILY}@champion").sae, "saelens", tmp / "e")  # the bare SAE: no lineage
    import_dictionary(tmp / "e", "zz-imported")
    return CliRunner().invoke(main, ["evaluate", "zz-imported"])


def import_unmapped_architecture(env, tmp, mp):
    from sae_registry.interchange.formats import read

    (tmp / "dl").mkdir()
    (tmp / "dl" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderNew"}}))
    torch.save({"encoder.weight": torch.randn(16, 8)}, tmp / "dl" / "ae.pt")
    read(tmp / "dl")


def export_batch_top_k_without_threshold(env, tmp, mp):
    from sae_registry.interchange.formats import export

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


def cli_train_out_exists(env, tmp, mp):
    (tmp / "o").mkdir()
    (tmp / "o" / "sae.safetensors").write_bytes(b"an earlier dictionary")
    return _cli(*TRAIN, "--no-registry")(env, tmp, mp)


def _after_train_out_exists(env, tmp):
    assert (tmp / "o" / "sae.safetensors").read_bytes() == b"an earlier dictionary"

# id -> (what the user does, the message they get (a regex), [a check afterwards])
CASES = {
    "api-width": (api_width, r"input must have last dimension 8, got shape \(3, 7\)"),
    "api-encode-nan": (api_encode_nan, "input contains NaN or Inf values; drop or fix those rows"),
    "api-unknown-sparsity": (lambda e, t, m: SAEConfig(8, 16, 2, "topk"),
                             "sparsity must be one of top_k, l1, batch_top_k, jumprelu, matryoshka, abs_top_k, gated, "
                             "got 'topk'"),
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
                              "grid: unknown key 'dict_sise'; use dict_size, k, sparsity, prefixes or a training option"),
    "spec-field-typo": (lambda e, t, m: SweepSpec.from_dict(_spec(registr="all")),
                        r"unknown spec fields \['registr'\]; known: .*register"),
    "spec-unknown-sparsity": (lambda e, t, m: SweepSpec.from_dict(_spec(grid={"sparsity": ["topk"]})),
                              "grid point .*: sparsity must be one of top_k, l1, batch_top_k, jumprelu, matryoshka, "
                              "abs_top_k, gated, got 'topk'"),
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
                                           sae_registry.registry.tracking.retrying(lambda: None, "a registry call")),
                          "SAE_REGISTRY_RETRY_SECONDS='abc' is not a number of seconds"),
    "api-weights-header-mismatch": (
        lambda e, t, m: SparseAutoencoder.load(_saved(t, lambda c: c["sae"].update(dict_size=3_000_000))),
        r"W_enc in .*sae.safetensors has shape \(16, 8\), config.json implies \(3000000, 8\)"),
    "api-config-too-large": (lambda e, t, m: SparseAutoencoder.load(_saved(t, lambda c: c["sae"].update(dict_size=10**12))),
                             r"config.json: dict_size must be <= 16777216, got 1000000000000; refusing to load it"),
    "api-remote-code-model": (api_remote_code_model, "names its own model code \\(auto_map\\); sae-registry never runs"),
    "import-k-not-one-integer": (import_k_not_one_integer, r"ae.pt: k must be one integer .*shape \(2,\)"),
    "api-find-unknown-filter": (api_find_unknown_filter,
                                r"find\('tiny'\): no tag 'dict_sise' to filter on; the versions' tags are: .*dict_size"),
    "api-alias-before-training": (api_alias_before_training, "alias 'latest' must be a word"),
    "api-resume-changed": (api_resume_changed, r"checkpoint in .* was made with other options: lr was 0.016, now 0.01; "
                           "resume with the same ones"),
    "spec-resume-changed": (spec_resume_changed, r"sweep 'ok' was started with other options: grid was "
                            r"\[\{'dict_size': \[64\], 'k': \[4\]\}\], now \[\{'dict_size': \[64\], 'k': \[8\]\}\]"),
    "cli-evaluate-imported": (cli_evaluate_imported, "1:Error: zz-imported records no store it was trained on .*: "
                              "give one with --store, or a model directory with --model"),
    "cli-evaluate-layer-and-hook": (_cli("evaluate", f"{FAMILY}@champion", "--layer", "1", "--hook",
                                         "blocks.0.hook_resid_post", registry=True),
                                    "1:Error: give --layer or --hook, not both"),
    "cli-evaluate-model-without-text": (_cli("evaluate", f"{FAMILY}@champion", "--model", "TMP", "--layer", "1",
                                             registry=True),
                                        "1:Error: evaluating in a --model directory needs --text .* and --layer or --hook"),
    "cli-dict-size-too-big": (_cli(*TRAIN, "--dict-size", "100000000000", registry=True),
                              "1:Error: --dict-size must be <= 16777216, got 100000000000"),
    "cli-list-versioned-name": (_cli("list", f"{FAMILY}/1", registry=True),
                                f"1:Error: '{FAMILY}/1' is not a family name: give FAMILY alone"),
    "cli-bad-device": (_cli("encode", f"{FAMILY}@champion", "--store", "STORE", "--out", "TMP/c", "--device", "gpu",
                            registry=True), "1:Error: device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    "cli-tracking-scheme": (_cli("--tracking-uri", "ftp://x/y", "list"),
                            "1:Error: 'ftp://x/y' is not a tracking URI MLflow can use"),
    "cli-out-is-a-file": (_cli("export", f"{FAMILY}@champion", "STORE/zarr.json", "--format", "saelens", registry=True),
                          "1:Error: .*zarr.json is a file; export into a directory"),
    "api-harvest-one-string": (lambda e, t, m: __import__("sae_registry.harvest.local").harvest.local.harvest(t / "s.zarr", "a text"),
                               r"texts must be a list of documents \(strings\), got one string; wrap it: \[text\]"),
    "cli-cards-width": (_cli("cards", f"{FAMILY}@champion", "--store", "NARROW", "--no-log", "--out", "TMP/c",
                             registry=True),
                        "1:Error: the dictionary reads 8-wide activations but .*narrow.zarr holds 4-wide ones"),
    "train-out-busy": (train_out_busy, r"another training is writing to .*o: wait for it to finish, or train into "
                       "another --out"),
    "ray-token-refused": (ray_token_refused, r"the Ray cluster at 127.0.0.1:6391 answers but refused authentication "
                          r"\(RAY_AUTH_MODE is unset, RAY_AUTH_TOKEN is set\): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"),
    "sweep-driver-failed": (sweep_driver_failed, r"sweep 'ok' failed in this process .*FileNotFoundError.*"
                            r"`sae-registry sweep SPEC --resume` continues the sweep and registers", _after_sweep_driver_failed),
    "store-model-not-here": (lambda e, t, m: __import__("sae_registry.harvest.models").harvest.models.find_model(
        {"model_path": "/nonexistent/model", "model_id": "someone/not-here"}),
        r"the store's model is not on this machine: /nonexistent/model does not exist .*pass --model DIR"),
    "cli-train-out-exists": (cli_train_out_exists, (r"1:Error: --out .*o already holds a dictionary or a training "
                                                    r"\(sae.safetensors\); pass --overwrite"), _after_train_out_exists),
    "cli-harvest-workers-zero": (_cli("harvest", "--out", "TMP/w.zarr", "--workers", "0"),
                                 "1:Error: --workers must be a positive integer, got 0"),
    "api-harvest-workers-over-documents": (
        lambda e, t, m: sae_registry.harvest.local.harvest(t / "w.zarr", ["one", "two"], workers=3, progress=False),
        "workers is 3 but there are only 2 documents to harvest: each worker needs at least one"),
    "api-store-key-other-options": (api_store_key_other_options,
                                    r"store: key:abcdef01 is .*keyed.zarr, made with other options .*layer: 3 there, 4 here"),
    "api-s3-no-credentials": (lambda e, t, m: (_no_s3_credentials(m, t), ActivationStore.open("s3://stores/acts.zarr")),
                              "s3://stores/acts.zarr: no S3 credentials: set AWS_ACCESS_KEY_ID"),
    "api-s3-unreachable": (api_s3_unreachable, r"s3://stores/acts.zarr: cannot reach the S3 endpoint http://127\.0\.0\.1:\d+"),
    "store-s3-outage": (store_s3_outage, r"s3://stores/acts.zarr: the S3 endpoint .* stopped answering while writing "
                        r"rows 0-64 and did not come back within 0 s \(EndpointConnectionError: .*\)\. The store is "
                        r"left 'writing' .* run the same harvest with --resume"),
    "store-read-count-for-stop": (store_read_count_for_stop,
                                  r"read\(1000, 100\): stop is before start; read takes the rows \[start, stop\) of "
                                  r"2000, not a start and a count: read\(1000, 1000 \+ count\)"),
    "store-s3-wait-not-seconds": (store_s3_wait_not_seconds,
                                  "SAE_REGISTRY_S3_WAIT_SECONDS must be a number of seconds >= 0, got 'soon'"),
    "harvest-unknown-hook": (_harvest_minilm(hook="blocks.2.resid_post"),
                             (r"unknown hook 'blocks.2.resid_post' for sentence-transformers/all-MiniLM-L6-v2: the hook "
                              r"names are blocks.L.\{hook_resid_pre, hook_attn_out, ln2.hook_normalized, hook_mlp_out, "
                              r"hook_resid_post\} with L in 0..5")),
    "harvest-hook-beyond-last-layer": (_harvest_minilm(hook="blocks.6.hook_resid_post"),
                                       r"hook 'blocks.6.hook_resid_post' is beyond the last layer: .* has 6 blocks"),
    "harvest-gguf-not-causal-lm": (gguf_not_causal_lm,
                                   r"notes.gguf is not a causal language model transformers can read from GGUF"),
    "harvest-jsonl-without-text": (jsonl_without_text, r"d.jsonl line 1 has no `text` field \(a string\)"),
    "harvest-model-missing": (_harvest_minilm(model_path="/nonexistent/model"),
                              r"no model at /nonexistent/model: give a local transformers model directory, a .gguf "
                              r"file, or one of the named models \(smollm2-135m, minilm-l6\)"),
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
                                     "trainer.dict_class 'AutoEncoderNew' cannot be mapped exactly"),
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
