"""Packed against unpacked sweeps: 8 configurations as one pack on one batch stream, or as 8 trials.

Both sweeps run the same 8 dictionaries (top_k and l1, dict_size 1024/2048) on the real MiniLM
store through ``sae_registry.sweep.run`` on a local Ray, with MLflow recording and registering
every dictionary, and both use the whole machine: the pack is one trial with every core, the
unpacked sweep runs one-core trials side by side. Wall time is the whole ``run()``, Ray start,
MLflow and registration included, as a user sees it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import real_store, table, write_results

GRID = [
    {"sparsity": ["top_k"], "dict_size": [1024, 2048], "k": [16, 32]},
    {"sparsity": ["l1"], "dict_size": [1024, 2048], "l1_coeff": [0.003, 0.01]},
]


def spec(store: str, packed: bool, tokens: int, name: str) -> dict:
    cores = os.cpu_count() or 1
    return {
        "name": name, "store": store, "grid": GRID,
        "train": {"tokens": tokens, "batch_size": 2048, "eval_every": 40, "checkpoint_every": 40},
        "pack": 8 if packed else 1,
        "resources": {"cpu": cores if packed else 1, "gpu": 0},
        "max_concurrent_trials": 1 if packed else cores,
        "register": "all", "alias": "champion",
    }


def run_sweep(store: str, packed: bool, tokens: int, workdir: Path) -> dict:
    from sae_registry.sweep import SweepSpec, run

    name = "packed" if packed else "unpacked"
    os.chdir(workdir)
    start = time.perf_counter()
    result = run(SweepSpec.from_dict({**spec(store, packed, tokens, name), "storage": str(workdir / "ray")}),
                 tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", verbose=0)
    seconds = time.perf_counter() - start
    rows = result.dictionaries
    best = min((r["fvu"] for r in rows if r.get("fvu") is not None), default=None)
    return {"sweep": f"{name}: " + ("1 trial of 8" if packed else "8 trials of 1"), "seconds": seconds,
            "dictionaries": len(rows), "best_fvu": best, "failed_trials": result.failed_trials}


class WorkerMemory:
    """Samples the summed resident memory of Ray's worker processes; keeps the peak (MiB)."""

    def __init__(self, every: float = 0.5) -> None:
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(every,), daemon=True)

    def _watch(self, every: float) -> None:
        import psutil

        while not self._stop.wait(every):
            total = 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if cmd.startswith("ray::") and proc.info["memory_info"]:
                    total += proc.info["memory_info"].rss
            self.peak = max(self.peak, total / 2**20)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens per dictionary")
    args = parser.parse_args(argv)
    import ray

    store = str(real_store().path)
    rows = []
    for packed in (True, False):
        workdir = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
        print(f"sweep {'packed' if packed else 'unpacked'} ({args.tokens:,} tokens per dictionary)", flush=True)
        with WorkerMemory() as memory:
            row = run_sweep(store, packed, args.tokens, workdir)
        row["workers_peak_rss_mb"] = memory.peak
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
        rows.append(row)
    rows[0]["speedup"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[1]["speedup"] = 1.0
    print(table(rows, [("sweep", "sweep", ""), ("seconds", "wall s", ".1f"), ("speedup", "x unpacked", ".2f"),
                       ("dictionaries", "dictionaries", "d"), ("best_fvu", "best FVU", ".4f"),
                       ("failed_trials", "failed trials", "d"),
                       ("workers_peak_rss_mb", "Ray workers peak RSS MiB (sum)", ",.0f")]))
    path = write_results("sweep_speed", {"rows": rows, "tokens_per_dictionary": args.tokens, "grid": GRID})
    print(f"\nwritten {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
