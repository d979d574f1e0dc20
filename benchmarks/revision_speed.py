"""Training speed of this checkout against another git revision of sae-registry, in one run.

For a refactor that must not slow the step loop down (the move into folders, 2026-12-07): the other
revision is extracted with ``git archive`` into a temporary folder and each contender trains the same
dictionaries on the demo store in a fresh process of its own (``train`` as that revision imports it),
alternating, so that a slow spell of the machine hits both alike. Printed: tokens/s of each, and
this checkout's over the other's, median of ``--repeats``.

    cd benchmarks && python revision_speed.py --against 4cae604 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, real_store, table, write_results

# one process: train each case, print {case: tokens/s}; `train` is found where that revision keeps it
CHILD = """
import json, sys, tempfile, torch
torch.set_num_threads(1)
try:
    from sae_registry.training.loop import TrainConfig, train
except ImportError:
    from sae_registry.train import TrainConfig, train
from sae_registry import ActivationStore, SAEConfig
store = ActivationStore.open(sys.argv[1])
out = {}
for case in json.loads(sys.argv[2]):
    sae_cfg = SAEConfig(store.d, case["dict_size"], case.get("k", 32), case["sparsity"])
    cfg = TrainConfig(tokens=case["tokens"], batch_size=2048, eval_every=10_000, device="cpu")
    result = train(store, sae_cfg, cfg, tempfile.mkdtemp(), progress=False)
    out[case["name"]] = result.tokens_per_second
print(json.dumps(out))
"""

CASES = [
    {"name": "top_k d4096 k32", "sparsity": "top_k", "dict_size": 4096, "tokens": 200_000},
    {"name": "batch_top_k d4096 k32", "sparsity": "batch_top_k", "dict_size": 4096, "tokens": 200_000},
    {"name": "jumprelu d4096", "sparsity": "jumprelu", "dict_size": 4096, "tokens": 200_000},
]


def run(code_root: Path, store: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(store), json.dumps(CASES)], env=env, check=True,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the git revision to compare with (e.g. 4cae604)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    store = real_store().path
    other = Path(tempfile.mkdtemp(prefix="sae-revision-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.against, "sae_registry"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(other)], input=archive, check=True)
    runs: dict[str, list[dict[str, float]]] = {"this checkout": [], args.against: []}
    for repeat in range(args.repeats):
        for who, where in (("this checkout", ROOT), (args.against, other)):
            print(f"{who}, run {repeat + 1} of {args.repeats}", file=sys.stderr, flush=True)
            runs[who].append(run(where, store))
    rows = []
    for case in CASES:
        ours = statistics.median(r[case["name"]] for r in runs["this checkout"])
        theirs = statistics.median(r[case["name"]] for r in runs[args.against])
        rows.append({"case": case["name"], "this": ours, "other": theirs, "ratio": ours / theirs})
    print(table(rows, [("case", "case", ""), ("this", "this checkout tokens/s", ",.0f"),
                       ("other", f"{args.against} tokens/s", ",.0f"), ("ratio", "this / other", ".3f")]))
    write_results("revision_speed", {"against": args.against, "repeats": args.repeats, "rows": rows, "runs": runs})


if __name__ == "__main__":
    main()
