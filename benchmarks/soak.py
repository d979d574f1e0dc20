"""Soak: a sweep of small trials under faults, counted at the end. Not part of CI (minutes of both cores).

Faults injected while the sweep runs:
- trial worker processes (Ray's ``ray::ImplicitFunc.train``, children of this sweep only) killed
  at random moments, ``--kills`` times; Tune retries each from its last checkpoint;
- the MLflow tracking server stopped and started again once (same port, database, artifacts),
  down for ``--outage`` seconds while trials train and log.

Then it counts, from the tracking server: trials planned, finished (run FINISHED, every evaluation
step logged), registered (exactly one version each) and lost (planned but not finished and
registered once), prints ``soak: planned N, finished N, registered N, lost 0`` and writes
benchmarks/results/soak.json.

    .venv/bin/python benchmarks/soak.py [--kills 4] [--outage 15] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import DATA, real_store, write_results
from procs import BIN, MLFLOW, free_port, start, stop, wait_for

FAMILY = "soak"
STEPS, EVERY = 30, 5


def spec(store_path: Path) -> dict:
    """16 small trials: 2 dictionary sizes x 4 k x 2 seeds on MiniLM layer 3, two at a time."""
    return {
        "name": FAMILY,
        "store": str(store_path),
        "grid": [{"sparsity": ["top_k"], "dict_size": [256, 512], "k": [8, 16, 32, 64]}],
        "seeds": [0, 1],
        "train": {"tokens": STEPS * 2048, "batch_size": 2048, "eval_every": EVERY, "checkpoint_every": EVERY},
        "resources": {"cpu": 1},
        "max_concurrent_trials": 2,
        "max_failures": 3,
        "register": "all",
    }


class Server:
    """`mlflow server` on one loopback port, restartable on the same database and artifacts."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc, self.starts = root, free_port(), None, 0
        self.uri = f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        log = self.root / f"server-{self.starts}.log"
        self.proc = start([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                           "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                           "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")], log)
        self.starts += 1
        wait_for(f"{self.uri}/health", self.proc, log)

    def down(self) -> None:
        stop(self.proc)


def trial_workers(sweep: subprocess.Popen) -> list:
    """Ray's trial worker processes under our sweep process (never anyone else's)."""
    import psutil

    try:
        children = psutil.Process(sweep.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in children:
        try:
            if "ImplicitFunc" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def faults(sweep: subprocess.Popen, server: Server, kills: int, outage: float, rng: random.Random,
           log: list) -> None:
    """Kill ``kills`` trial workers at random moments; restart the server once, after the first kills."""
    import psutil

    restart_after = kills // 2
    done = 0
    time.sleep(20)  # let trials start and checkpoint
    while sweep.poll() is None and (done < kills or server.starts < 2):
        if done == restart_after and server.starts < 2:
            t0 = time.time()
            server.down()
            time.sleep(outage)
            server.up()
            log.append({"fault": "server restart", "at": t0, "down_seconds": round(time.time() - t0, 1)})
            print(f"  fault: tracking server down for {time.time() - t0:.0f} s", flush=True)
            time.sleep(rng.uniform(5, 15))
            continue
        workers = trial_workers(sweep)
        if not workers:
            time.sleep(1)
            continue
        victim = rng.choice(workers)
        try:
            victim.kill()
        except psutil.Error:  # finished meanwhile
            continue
        done += 1
        log.append({"fault": "trial killed", "at": time.time(), "pid": victim.pid})
        print(f"  fault: killed trial worker {victim.pid} ({done}/{kills})", flush=True)
        time.sleep(rng.uniform(8, 25))


def count(server: Server, planned: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(FAMILY)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("sweep.role") != "parent"]
    expected = set(range(EVERY, STEPS + 1, EVERY))
    finished = {r.info.run_id for r in children if r.info.status == "FINISHED"
                and {m.step for m in client.get_metric_history(r.info.run_id, "eval/fvu")} >= expected}
    versions = Counter(v.run_id for v in client.search_model_versions(f"name='{FAMILY}'"))
    registered = {run_id for run_id, n in versions.items() if n == 1}
    members = Counter(r.data.tags.get("sweep.member") for r in children)
    whole = finished & registered
    return {"planned": planned, "runs": len(children), "finished": len(finished), "registered": len(registered),
            "duplicate_runs": sum(n - 1 for n in members.values()), "duplicate_versions": sum(n - 1 for n in versions.values()
                                                                                             if n > 1),
            "lost": planned - len(whole)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--outage", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = DATA / "soak"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = real_store()
    sweep_spec = spec(store.path)
    planned = len(sweep_spec["grid"][0]["dict_size"]) * len(sweep_spec["grid"][0]["k"]) * len(sweep_spec["seeds"])
    (root / "soak.yaml").write_text(yaml.safe_dump(sweep_spec))

    server = Server(root)
    server.up()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    injected: list[dict] = []
    t0 = time.time()
    sweep = subprocess.Popen([str(BIN / "sae-registry"), "sweep", str(root / "soak.yaml")], cwd=root, env=env,
                             stdout=open(root / "sweep.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    print(f"soak: {planned} trials, {args.kills} kills, one {args.outage:.0f} s server restart; log {root / 'sweep.log'}")
    injector = threading.Thread(target=faults, args=(sweep, server, args.kills, args.outage,
                                                     random.Random(args.seed), injected), daemon=True)
    injector.start()
    try:
        rc = sweep.wait(timeout=3600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    injector.join(timeout=60)
    wall = time.time() - t0
    try:
        counts = count(server, planned)
    finally:
        server.down()
    kills = sum(f["fault"] == "trial killed" for f in injected)
    restarts = sum(f["fault"] == "server restart" for f in injected)
    line = (f"soak: planned {counts['planned']}, finished {counts['finished']}, registered {counts['registered']}, "
            f"lost {counts['lost']}")
    print(f"{line}  ({kills} trial kills, {restarts} server restart, sweep exit {rc}, {wall:.0f} s)")
    path = write_results("soak", {"line": line, **counts, "trial_kills": kills, "server_restarts": restarts,
                                  "sweep_exit_code": rc, "wall_seconds": round(wall, 1), "faults": injected,
                                  "spec": sweep_spec})
    print(f"wrote {path}")
    sys.exit(0 if counts["lost"] == 0 and rc == 0 else 1)


if __name__ == "__main__":
    main()
