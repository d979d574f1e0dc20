"""How quickly the command line answers: median of 5 fresh processes per command, against
``python -c "import mlflow"`` measured in the same run.

    .venv/bin/python benchmarks/cli_latency.py            # ~2 min on 2 cores
    .venv/bin/python benchmarks/cli_latency.py --repeats 3
    .venv/bin/python benchmarks/cli_latency.py --other /tmp/old   # also time another checkout, interleaved

Targets: ``--help`` and every command's ``--help`` <= 0.4 s; ``list``/``show``/``promote`` on the
embedded registry <= 2 s; ``sae_registry.load(name)`` of a cached version <= 1.5 s in a fresh process.
Writes ``benchmarks/results/cli_latency.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_results

PY = sys.executable
CLI = [PY, "-m", "sae_registry.cli"]
TARGETS = {"help": 0.4, "registry": 2.0, "load": 1.5}


def timed(cmd: list[str], cwd: Path, env: dict, repeats: int) -> float:
    """Median wall seconds of ``cmd`` run ``repeats`` times as a fresh process (it must succeed)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        print(f"  {times[-1]:6.2f} s  {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    return statistics.median(times)


def make_registry(where: Path, env: dict) -> None:
    """A tiny store and one registered dictionary (family ``bench``, alias ``champion``) in ``where``."""
    setup = (
        "import torch\n"
        "from sae_registry import ActivationStore\n"
        "with ActivationStore.create('s.zarr', d=16, chunk_tokens=1024, source={'model': 'synthetic'}) as s:\n"
        "    s.append(torch.randn(4096, 16))\n"
    )
    subprocess.run([PY, "-c", setup], cwd=where, env=env, check=True)
    subprocess.run([*CLI, "train", "--store", "s.zarr", "--out", "run", "--dict-size", "64", "--k", "4",
                    "--tokens", "8192", "--batch-size", "1024", "--name", "bench", "--alias", "champion"],
                   cwd=where, env=env, check=True, capture_output=True)
    # fill load()'s cache once, so the timed loads are of a cached version
    subprocess.run([PY, "-c", "import sae_registry; sae_registry.load('bench@champion')"], cwd=where, env=env,
                   check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--other", type=Path, default=None,
                        help="another checkout (e.g. `git worktree add /tmp/old <commit>`) timed beside this one")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as tmp:
        where = Path(tmp)
        env["SAE_REGISTRY_CACHE"] = str(where / "cache")
        make_registry(where, env)
        import_commands = subprocess.run([PY, "-c", "from sae_registry.cli import main; print(' '.join(main.commands))"],
                                         cwd=where, env=env, capture_output=True, text=True, check=True)
        commands = import_commands.stdout.split()
        baseline = timed([PY, "-c", "import mlflow"], where, env, args.repeats)
        cases = [("--help", [*CLI, "--help"], "help")]
        cases += [(f"{c} --help", [*CLI, c, "--help"], "help") for c in commands]
        cases += [
            ("list", [*CLI, "list"], "registry"),
            ("list bench", [*CLI, "list", "bench"], "registry"),
            ("show bench@champion", [*CLI, "show", "bench@champion"], "registry"),
            ("promote bench 1 --alias x", [*CLI, "promote", "bench", "1", "--alias", "x"], "registry"),
            ("load (cached)", [PY, "-c", "import sae_registry; sae_registry.load('bench@champion')"], "load"),
        ]
        other_env = {**env, "PYTHONPATH": str(args.other.resolve())} if args.other else None
        for label, cmd, kind in cases:
            seconds = timed(cmd, where, env, args.repeats)
            row = {"command": label, "kind": kind, "seconds": seconds, "vs_import_mlflow": seconds / baseline,
                   "target_s": TARGETS[kind], "met": seconds <= TARGETS[kind]}
            if other_env is not None:
                try:
                    row["other_seconds"] = timed(cmd, where, other_env, args.repeats)
                except SystemExit:  # a command the other checkout does not have
                    row["other_seconds"] = None
            rows.append(row)

    print(f"baseline: python -c 'import mlflow' {baseline:.2f} s (median of {args.repeats})")
    print(f"{'command':34} {'seconds':>8} {'x mlflow':>9} {'target':>7}  met" + ("    other" if args.other else ""))
    for r in rows:
        other = "" if not args.other else (f"  {r['other_seconds']:7.2f}" if r["other_seconds"] else "        -")
        print(f"{r['command']:34} {r['seconds']:8.2f} {r['vs_import_mlflow']:9.2f} {r['target_s']:7.1f}  "
              f"{'yes' if r['met'] else 'NO ':3}" + other)
    write_results("cli_latency", {"baseline_import_mlflow_s": baseline, "repeats": args.repeats, "rows": rows})
    print(f"wrote {RESULTS / 'cli_latency.json'}")


if __name__ == "__main__":
    main()
