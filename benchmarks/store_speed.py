"""Store read speed: shuffled batches from zarr, per codec, dtype and chunk size, against a numpy memmap.

Every variant holds the same real MiniLM activations. Reads are one shuffled epoch of
``batches(4096)`` (whole chunks in random order, rows shuffled across a buffer, decoded in
background threads), page cache warm, as a training run sees them; GB/s counts the float32 bytes
delivered. The memmap baseline reads the same rows from an uncompressed ``.npy`` file with the
same chunk order and shuffle. "x training" is read speed over what our fastest training step
(top_k, dict_size 4096, batch 4096) consumes, measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
import torch
from common import DATA, peak_rss_mb, real_store, table, write_results

VARIANTS = [  # (dtype, compressor, chunk_tokens)
    ("float32", "none", 8192),
    ("float32", "lz4", 8192),
    ("float32", "zstd", 8192),
    ("float32", "lz4", 2048),
    ("float32", "lz4", 32768),
    ("float16", "lz4", 8192),
    ("float16", "zstd", 8192),
    ("bfloat16", "lz4", 8192),
]
BATCH = 4096


def variant_path(dtype: str, compressor: str, chunk: int):
    return DATA / "store-variants" / f"{dtype}-{compressor}-{chunk}.zarr"


def make_variant(source, dtype: str, compressor: str, chunk: int) -> dict:
    from sae_registry import ActivationStore

    path = variant_path(dtype, compressor, chunk)
    start = time.perf_counter()
    with ActivationStore.create(path, source.d, dtype=dtype, compressor=compressor, chunk_tokens=chunk,
                                source=source.source, overwrite=True) as store:
        for lo in range(0, len(source), 32_768):
            store.append(source.read(lo, lo + 32_768))
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.joinpath("activations").rglob("*") if f.is_file())
    return {"write_mb_per_s": len(source) * source.d * 4 / seconds / 1e6, "disk_mb": size / 1e6}


def read_epoch(store) -> float:
    """Tokens per second over one shuffled epoch."""
    start = time.perf_counter()
    n = sum(len(b) for b in store.batches(BATCH, seed=1))
    return n / (time.perf_counter() - start)


def memmap_epoch(path, chunk: int, d: int) -> float:
    """The same read pattern from a numpy memmap: chunks in random order, rows shuffled in a buffer."""
    data = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(1)
    starts = rng.permutation(np.arange(0, len(data), chunk))
    begin = time.perf_counter()
    n = 0
    for g in range(0, len(starts), 8):
        rows = np.concatenate([data[s : s + chunk] for s in starts[g : g + 8]])
        rows = rows[rng.permutation(len(rows))]
        for i in range(0, len(rows), BATCH):
            n += len(torch.from_numpy(rows[i : i + BATCH]))
    return n / (time.perf_counter() - begin)


def training_consumption(source) -> float:
    import train_speed as T

    member = T.ours(source, "top_k", 4096, 12)
    batch = source.read(0, BATCH)
    member.train_step(batch, 12)
    start = time.perf_counter()
    for _ in range(8):
        member.train_step(batch, 12)
    return 8 * BATCH / (time.perf_counter() - start)


MEMORY_PROBE = """
import sys; sys.path.insert(0, "benchmarks")
from sae_registry import ActivationStore
store = ActivationStore.open({path!r})
for batch in store.batches(4096, seed=1): pass
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)

    from sae_registry import ActivationStore

    source = real_store()
    consumption = training_consumption(source)
    npy = DATA / "store-variants" / "memmap.npy"
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, source.read().numpy())
    memmap = max(memmap_epoch(npy, 8192, source.d) for _ in range(3))
    bytes_per_token = source.d * 4
    rows = [{"variant": "numpy memmap (baseline)", "tokens_per_s": memmap, "gb_per_s": memmap * bytes_per_token / 1e9,
             "vs_memmap": 1.0, "vs_training": memmap / consumption, "disk_mb": npy.stat().st_size / 1e6}]
    for dtype, compressor, chunk in VARIANTS:
        print(f"store {dtype} {compressor} chunks of {chunk}", flush=True)
        made = make_variant(source, dtype, compressor, chunk)
        store = ActivationStore.open(variant_path(dtype, compressor, chunk))
        speed = max(read_epoch(store) for _ in range(3))  # the first read also warms the page cache
        row = {"variant": f"{dtype} {compressor} chunk {chunk}", "tokens_per_s": speed,
               "gb_per_s": speed * bytes_per_token / 1e9, "vs_memmap": speed / memmap,
               "vs_training": speed / consumption, **made}
        if not args.no_memory:
            row["peak_rss_mb"] = peak_rss_mb(MEMORY_PROBE.format(path=str(store.path)))
        rows.append(row)
    print(f"\ntraining consumes {consumption:,.0f} tokens/s (top_k 4096, batch {BATCH}); "
          f"{source.d}-wide float32 rows, {len(source):,} tokens\n")
    print(table(rows, [("variant", "store", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("gb_per_s", "GB/s", ".2f"),
                       ("vs_memmap", "x memmap", ".2f"), ("vs_training", "x training", ".1f"),
                       ("disk_mb", "disk MB", ",.0f"), ("write_mb_per_s", "write MB/s", ",.0f"),
                       ("peak_rss_mb", "peak RSS MiB", ",.0f")]))
    shutil.rmtree(DATA / "store-variants", ignore_errors=True)
    path = write_results("store_speed", {"rows": rows, "training_tokens_per_s": consumption, "tokens": len(source)})
    print(f"\nwritten {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
