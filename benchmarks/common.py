"""What every benchmark shares: the real activation store, timing, tables, JSON, peak memory.

Benchmarks compare against a baseline measured in the same run on the same machine, and print
ratios; absolute figures move with the machine and whatever else runs on it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / ".data"  # stores and registries made by the benchmarks (git-ignored)
RESULTS = ROOT / "benchmarks" / "results"
STORE = DATA / "minilm-l3.zarr"


def real_store(path: Path = STORE, **options):
    """The demo's MiniLM-L6 layer-3 store (128 k real tokens), harvested once and kept."""
    from sae_registry import ActivationStore
    from sae_registry.harvest.local import demo_texts, harvest

    try:
        return ActivationStore.open(path)
    except Exception:
        print(f"harvesting {path} (once, about a minute)", file=sys.stderr)
        return harvest(path, demo_texts(), layer=3, overwrite=True, text_source="pydoc_data.topics", **options)


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PEAK_RSS_LINE = """
def _peak_rss_mb():
    try:  # VmHWM starts afresh at exec; ru_maxrss would still count the parent we were forked from
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


def peak_rss_mb(code: str) -> float:
    """Peak resident memory (MiB) of a fresh Python process running ``code``."""
    program = f"{code}\n{PEAK_RSS_LINE}\nprint('PEAK_RSS_MB', _peak_rss_mb())\n"
    out = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed ({out.returncode}): {out.stderr[-2000:]}")
    return float(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_MB")))


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        **cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def cpu_model() -> dict:
    """The CPU's model name and the vector extensions that decide matmul speed (bfloat16 above all),
    from /proc/cpuinfo; empty where there is none. Two "2-core x86_64" machines can differ 4x in bfloat16."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu_model": name, "cpu_flags": [f for f in wanted if f in flags]}


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec). Missing values print as blanks."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([
            "" if row.get(k) is None else (format(row[k], f) if f else str(row[k])) for k, _, f in columns
        ])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path
