"""Using dictionaries: load(name@alias) latency, encode throughput, harvest throughput.

- ``load``: a registered 4096 x 384 dictionary fetched by name in a fresh Python process (the
  figure a notebook or job sees, imports included) with an empty cache, again with the cache
  filled, and a second load in the same process; from the embedded SQLite registry and from an
  ``mlflow server`` on 127.0.0.1. Baselines in the same run: reading the same two files from a local
  directory (``SparseAutoencoder.load``, the floor) and MLflow's own ``mlflow.pyfunc.load_model``.
- ``encode``: ``encode_store`` over the whole real store (codes written to zarr) against the bare
  ``sae.encode`` of the same tokens already in memory.
- ``harvest``: ``harvest`` (forward pass stopped after layer 3, activations and provenance written to
  zarr) against the bare full forward pass of the same model over the same texts.
Peak RSS is each fresh process's own (``load``), or a fresh process doing just that step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PEAK_RSS_LINE, ROOT, peak_rss_mb, real_store, table, write_results

sys.path.insert(0, str(ROOT / "tests"))

LOAD_CODE = PEAK_RSS_LINE + """
import json, os, sys, time
start = time.perf_counter()
{body}
first = time.perf_counter() - start
start = time.perf_counter()
{body}
second = time.perf_counter() - start
print(json.dumps({{"first": first, "second": second, "rss": _peak_rss_mb()}}))
"""
BODIES = {
    "sae_registry.load": "import sae_registry; sae_registry.load('bench@champion')",
    "mlflow.pyfunc.load_model": "import mlflow.pyfunc; mlflow.pyfunc.load_model('models:/bench@champion')",
    "SparseAutoencoder.load (local files)": "from sae_registry import SparseAutoencoder; SparseAutoencoder.load({local!r})",
}


def timed_process(body: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_CODE.format(body=body)], env=env, cwd=env["BENCH_CWD"],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def register_one(store, workdir: Path, tracking_uri: str) -> Path:
    from sae_registry import SAEConfig
    from sae_registry.registry.runs import train_and_register
    from sae_registry.training.loop import TrainConfig

    run_dir = workdir / "run"
    train_and_register(store, SAEConfig(store.d, 4096, 32), TrainConfig(tokens=8192, batch_size=4096, eval_every=1),
                       run_dir, family="bench", alias="champion", progress=False, tracking_uri=tracking_uri)
    return run_dir


def load_rows(store) -> list[dict]:
    from procs import start_mlflow_server

    rows = []
    for where in ("embedded sqlite", "mlflow server 127.0.0.1"):
        workdir = Path(tempfile.mkdtemp(prefix="load-bench-"))
        env = {**os.environ, "SAE_REGISTRY_CACHE": str(workdir / "cache"), "BENCH_CWD": str(workdir),
               "PYTHONPATH": str(ROOT)}
        server = start_mlflow_server(workdir) if where.startswith("mlflow server") else None
        try:
            uri = server.__enter__()["uri"] if server else f"sqlite:///{workdir / 'mlflow.db'}"
            env["MLFLOW_TRACKING_URI"] = uri
            local = register_one(store, workdir, uri)
            for name, body in BODIES.items():
                if name.startswith("SparseAutoencoder") and where != "embedded sqlite":
                    continue
                body = body.format(local=str(local))
                shutil.rmtree(workdir / "cache", ignore_errors=True)
                cold = timed_process(body, env)
                warm = timed_process(body, env)  # sae_registry.load's cache now filled
                rows.append({"what": name, "where": where if not name.startswith("SparseAutoencoder") else "local disk",
                             "cold_s": cold["first"], "cache_filled_s": warm["first"],
                             "same_process_s": cold["second"], "peak_rss_mb": cold["rss"]})
        finally:
            if server:
                server.__exit__(None, None, None)
            shutil.rmtree(workdir, ignore_errors=True)
    floor = next(r for r in rows if r["what"].startswith("SparseAutoencoder"))["cold_s"]
    for row in rows:
        row["vs_floor"] = row["cold_s"] / floor
    return rows


ENCODE_PROBE = """
import sys, tempfile; sys.path.insert(0, "benchmarks")
from common import real_store
from sae_registry import SparseAutoencoder
from sae_registry.analysis.encode import encode_store
encode_store(SparseAutoencoder.build(384, 4096, 32), real_store(), tempfile.mkdtemp() + "/codes.zarr", progress=False)
"""


def encode_rows(store) -> list[dict]:
    import torch

    from sae_registry import SparseAutoencoder
    from sae_registry.analysis.encode import encode_store

    torch.manual_seed(0)
    sae = SparseAutoencoder.build(store.d, 4096, 32).eval()
    x = store.read()
    start = time.perf_counter()
    with torch.no_grad():
        for xb in x.split(8192):
            sae.encode_topk(xb)
    bare = len(x) / (time.perf_counter() - start)
    out = Path(tempfile.mkdtemp(prefix="encode-bench-"))
    start = time.perf_counter()
    encode_store(sae, store, out / "codes.zarr", progress=False)
    ours = len(store) / (time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    return [{"what": "encode_store (store -> codes zarr)", "tokens_per_s": ours, "vs_baseline": ours / bare,
             "peak_rss_mb": peak_rss_mb(ENCODE_PROBE)},
            {"what": "bare sae.encode_topk, in memory (baseline)", "tokens_per_s": bare, "vs_baseline": 1.0}]


HARVEST_PROBE = """
import sys, tempfile; sys.path.insert(0, "benchmarks")
from sae_registry.harvest import demo_texts, harvest
harvest(tempfile.mkdtemp() + "/s.zarr", demo_texts()[:{n}], layer=3, progress=False)
"""


def harvest_rows(n_texts: int) -> list[dict]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from sae_registry.harvest.local import default_model_path, demo_texts, harvest

    texts = demo_texts()[:n_texts]
    out = Path(tempfile.mkdtemp(prefix="harvest-bench-"))
    start = time.perf_counter()
    store = harvest(out / "s.zarr", texts, layer=3, progress=False)
    ours = len(store) / (time.perf_counter() - start)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    start, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            enc = tokenizer(texts[i : i + 32], truncation=True, max_length=128, return_overflowing_tokens=True,
                            padding=True, return_tensors="pt")
            enc.pop("overflow_to_sample_mapping", None)
            model(**enc)
            tokens += int(enc["attention_mask"].sum())
    bare = tokens / (time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    return [{"what": f"harvest (layer 3 of 6, to zarr), {len(store):,} tokens", "tokens_per_s": ours,
             "vs_baseline": ours / bare, "peak_rss_mb": peak_rss_mb(HARVEST_PROBE.format(n=n_texts))},
            {"what": "bare full forward of MiniLM-L6 (baseline)", "tokens_per_s": bare, "vs_baseline": 1.0}]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvest-texts", type=int, default=300, help="demo passages harvested")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    store = real_store()
    print("load latency", flush=True)
    loads = load_rows(store)
    print("encode", flush=True)
    encodes = encode_rows(store)
    print("harvest", flush=True)
    harvests = harvest_rows(args.harvest_texts)
    print()
    print(table(loads, [("what", "load", ""), ("where", "registry", ""), ("cold_s", "new process, empty cache s", ".2f"),
                        ("cache_filled_s", "new process, cache filled s", ".2f"),
                        ("same_process_s", "again in that process s", ".3f"), ("vs_floor", "cold x floor", ".2f"),
                        ("peak_rss_mb", "peak RSS MiB", ",.0f")]))
    print()
    print(table(encodes + harvests, [("what", "throughput", ""), ("tokens_per_s", "tokens/s", ",.0f"),
                                     ("vs_baseline", "x baseline", ".2f"), ("peak_rss_mb", "peak RSS MiB", ",.0f")]))
    path = write_results("use_speed", {"load": loads, "encode": encodes, "harvest": harvests})
    print(f"\nwritten {path}")
    return {"load": loads, "encode": encodes, "harvest": harvests}


if __name__ == "__main__":
    main()
