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
import os
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


# -- the data path: S3 beside local, a store bigger than memory, shuffle quality ----------------------

S3_TOKENS = 32_768  # rows copied to the local S3 server (moto keeps them in its memory)


def s3_reads(source, consumption: float) -> list[dict]:
    """One shuffled epoch from a local store and from the same store on a local S3 server (moto)."""
    import os
    import sys

    sys.path.insert(0, str(DATA.parents[1] / "tests"))
    import s3fs
    from procs import start_moto

    from sae_registry import ActivationStore

    local = DATA / "s3" / "local.zarr"
    with ActivationStore.create(local, source.d, chunk_tokens=8192, source=source.source, overwrite=True) as store:
        store.append(source.read(0, S3_TOKENS))
    rows, bytes_per_token = [], source.d * 4
    with start_moto(DATA / "s3") as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # this benchmark process only, restored below
        try:
            fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
            fs.mkdir("bench")
            fs.put(str(local), "bench/acts.zarr", recursive=True)
            for where, label in ((local, "local"), ("s3://bench/acts.zarr", "S3 (moto, loopback)")):
                store = ActivationStore.open(where)
                for threads, prefetch in ((2, 4), (8, 8)):
                    start = time.perf_counter()
                    n = sum(len(b) for b in store.batches(BATCH, seed=1, threads=threads, prefetch=prefetch))
                    speed = n / (time.perf_counter() - start)
                    rows.append({"variant": f"{label}, threads {threads}, prefetch {prefetch}", "tokens_per_s": speed,
                                 "gb_per_s": speed * bytes_per_token / 1e9, "vs_training": speed / consumption})
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return rows


BIG_PROBE = """
import resource, sys, torch
limit = {limit}
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))  # heap and anonymous maps; the page cache is not ours
from sae_registry import ActivationStore, SAEConfig
from sae_registry.training.loop import TrainConfig, train
store = ActivationStore.open({path!r})
train(store, SAEConfig(store.d, 64, 4), TrainConfig(tokens=store.num_tokens("train"), batch_size=4096,
      eval_every=10**9), {out!r}, progress=False)
"""


def bigger_than_memory(limit_mib: int, d: int = 256) -> dict:
    """Train one epoch on a synthetic store 4x ``limit_mib``, under that data-memory limit; peak RSS (VmHWM)."""
    from sae_registry import ActivationStore

    n = 4 * limit_mib * 2**20 // (d * 4)
    path = DATA / "big" / "big.zarr"
    try:
        fresh = len(ActivationStore.open(path)) != n or ActivationStore.open(path).d != d
    except Exception:  # none there yet, or unfinished
        fresh = True
    if fresh:
        g = torch.Generator().manual_seed(0)
        with ActivationStore.create(path, d, chunk_tokens=8192, overwrite=True) as store:
            for lo in range(0, n, 65_536):
                store.append(torch.randn(min(65_536, n - lo), d, generator=g))
    start = time.perf_counter()
    peak = peak_rss_mb(BIG_PROBE.format(limit=limit_mib * 2**20, path=str(path), out=str(DATA / "big" / "run")))
    return {"store_mib": n * d * 4 / 2**20, "limit_mib": limit_mib, "peak_rss_mib": peak, "tokens": n,
            "seconds": time.perf_counter() - start}


def neighbour_overlap(seqs: list[np.ndarray]) -> float:
    """Mean correlation, over neighbouring batches, of how many rows each source window gives them.

    0 when batches draw their documents independently (a full shuffle), near 1 when neighbouring
    batches come from the same documents (no shuffle)."""
    n = int(max(s.max() for s in seqs)) + 1
    size = np.bincount(np.concatenate(seqs), minlength=n)  # a long window gives more rows to any batch
    counts = [np.bincount(s, minlength=n) - len(s) * size / size.sum() for s in seqs if len(s) == len(seqs[0])]
    return float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(counts, counts[1:])]))


def windows_per_batch(seqs: list[np.ndarray]) -> float:
    return float(np.mean([len(np.unique(s)) for s in seqs]))


def shuffle_quality(source) -> dict:
    """Neighbouring batches' source windows (provenance ``seq``): ``batches`` against a full shuffle."""
    from sae_registry import ActivationStore

    lo, hi = source.split_range("train")
    seq = source.provenance(lo, hi)["seq"]
    # the row's number in column 0, to see where batches come from; as wide as the store, so that a
    # shuffle buffer sized in bytes holds as many rows as it would there
    index = DATA / "shuffle" / "index.zarr"
    with ActivationStore.create(index, source.d, chunk_tokens=source.metadata["chunk_tokens"], eval_fraction=1e-6,
                                overwrite=True) as store:
        for start in range(0, hi - lo, 32_768):
            rows = torch.zeros(min(32_768, hi - lo - start), source.d)
            rows[:, 0] = torch.arange(start, start + len(rows), dtype=torch.float32)
            store.append(rows)
    store = ActivationStore.open(index)
    ours = [seq[b[:, 0].long().numpy()] for b in store.batches(BATCH, seed=1)]
    window = store.shuffle_window(BATCH) if hasattr(store, "shuffle_window") else 8 * source.metadata["chunk_tokens"]
    # smaller windows (shuffle_tokens), to see how the correlation falls as the window grows
    by_window = {w: neighbour_overlap([seq[b[:, 0].long().numpy()]
                                       for b in store.batches(BATCH, seed=1, shuffle_tokens=w)])
                 for w in (16_384, 32_768, 65_536, 98_304)} if hasattr(store, "shuffle_window") else {}
    perm = np.random.default_rng(1).permutation(hi - lo)
    full = [seq[perm[i : i + BATCH]] for i in range(0, hi - lo, BATCH)]
    ordered = [seq[i : i + BATCH] for i in range(0, hi - lo, BATCH)]
    return {"window_rows": window, "by_window": by_window, "batches": neighbour_overlap(ours),
            "full_shuffle": neighbour_overlap(full), "no_shuffle": neighbour_overlap(ordered),
            "windows_per_batch": {"batches": windows_per_batch(ours), "full_shuffle": windows_per_batch(full),
                                  "no_shuffle": windows_per_batch(ordered)}}


def shuffle_and_speed() -> dict:
    """Shuffle quality and the speed of one shuffled epoch of the real store (best of 5, page cache warm),
    with ``batches``' defaults: the same command measures any version of the reader."""
    from sae_registry import ActivationStore

    source = real_store()
    quality = shuffle_quality(source)
    store = ActivationStore.open(source.path)
    speed = max(read_epoch(store) for _ in range(5))
    gb = speed * source.d * 4 / 1e9
    peak = peak_rss_mb(MEMORY_PROBE.format(path=str(store.path)))
    print(f"neighbouring batches' source windows, correlation of row counts: batches() {quality['batches']:.4f}, "
          f"full shuffle {quality['full_shuffle']:.4f}, no shuffle {quality['no_shuffle']:.4f}; source windows per "
          f"batch {quality['windows_per_batch']}; shuffle window {quality['window_rows']:,} rows; by window "
          f"{ {w: round(c, 4) for w, c in quality['by_window'].items()} }")
    print(f"one shuffled epoch of {source.num_tokens('train'):,} rows: {speed:,.0f} tokens/s, {gb:.3f} GB/s; "
          f"peak RSS of an epoch {peak:,.0f} MiB; load average {os.getloadavg()}")
    result = {"shuffle": quality, "tokens_per_s": speed, "gb_per_s": gb, "peak_rss_mib": peak,
              "load_average": os.getloadavg()}
    print(f"written {write_results('store_speed_shuffle', result)}")
    return result


def datapath(limit_mib: int) -> dict:
    source = real_store()
    consumption = training_consumption(source)
    s3 = s3_reads(source, consumption)
    print(f"training consumes {consumption:,.0f} tokens/s (top_k 4096, batch {BATCH})")
    print(table(s3, [("variant", "store", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("gb_per_s", "GB/s", ".3f"),
                     ("vs_training", "x training", ".1f")]))
    quality = shuffle_quality(source)
    print(f"\nneighbouring batches' source windows, correlation of row counts: batches() {quality['batches']:.4f}, full shuffle "
          f"{quality['full_shuffle']:.4f}, no shuffle {quality['no_shuffle']:.4f}; source windows per batch "
          f"{quality['windows_per_batch']} (shuffle window "
          f"{quality['window_rows']:,} rows)")
    big = bigger_than_memory(limit_mib)
    print(f"\ntraining one epoch on a {big['store_mib']:,.0f} MiB store under a {limit_mib} MiB data limit: "
          f"peak RSS {big['peak_rss_mib']:,.0f} MiB ({big['seconds']:.0f} s)")
    result = {"s3": s3, "training_tokens_per_s": consumption, "shuffle": quality, "bigger_than_memory": big,
              "load_average": os.getloadavg()}
    shutil.rmtree(DATA / "big", ignore_errors=True)
    print(f"\nwritten {write_results('store_speed_datapath', result)}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--datapath", action="store_true",
                        help="Only S3 beside local reads, a store 4x a memory limit, and shuffle quality.")
    parser.add_argument("--limit-mib", type=int, default=1024, help="The memory limit of --datapath's big store.")
    parser.add_argument("--shuffle", action="store_true",
                        help="Only shuffle quality and the speed and memory of one shuffled epoch of the real store.")
    args = parser.parse_args(argv)
    if args.shuffle:
        return shuffle_and_speed()
    if args.datapath:
        return datapath(args.limit_mib)

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
