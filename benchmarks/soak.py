"""Soak: a sweep of small trials under faults, counted at the end. Not part of CI (minutes of both cores).

Faults are scheduled by the sweep's progress, not by the clock, so that a faster sweep meets every
one of them. Progress is the steps the trials have logged on the tracking server, as a fraction of
all the steps planned:
- ``--kills`` trial worker processes (Ray's ``ray::ImplicitFunc.train``, children of this sweep
  only) are killed, one as each of ``--kills`` points spread over 10-85 % of the steps is passed;
  Tune retries each from its last checkpoint;
- the MLflow tracking server is stopped and started again once (same port, database, artifacts),
  down for ``--outage`` seconds while trials train and log, when about half the trials have logged steps.

Then it counts, from the tracking server: trials planned, finished (run FINISHED, every evaluation
step logged), registered (exactly one version each) and lost (planned but not finished and
registered once), prints ``soak: kills asked K injected K, restarts asked 1 injected 1, planned N,
finished N, registered N, lost 0`` and writes benchmarks/results/soak.json. It exits non-zero when
anything was lost, the sweep failed, or the sweep ended before every fault asked for was injected.

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
STEPS, EVERY, BATCH = 30, 5, 2048


def spec(store_path: Path) -> dict:
    """16 small trials: 2 dictionary sizes x 4 k x 2 seeds on MiniLM layer 3, two at a time."""
    return {
        "name": FAMILY,
        "store": str(store_path),
        "grid": [{"sparsity": ["top_k"], "dict_size": [256, 512], "k": [8, 16, 32, 64]}],
        "seeds": [0, 1],
        "train": {"tokens": STEPS * BATCH, "batch_size": BATCH, "eval_every": EVERY, "checkpoint_every": EVERY},
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


class Progress:
    """How far the sweep is, read from the tracking server: steps logged per trial run."""

    def __init__(self, uri: str, batch_size: int) -> None:
        from mlflow import MlflowClient

        self.client, self.batch_size = MlflowClient(uri), batch_size

    def steps(self) -> dict[str, int]:
        """Run id -> its last logged step (from the ``tokens`` metric), for trial runs that logged one."""
        experiment = self.client.get_experiment_by_name(FAMILY)
        if experiment is None:
            return {}
        runs = self.client.search_runs([experiment.experiment_id], max_results=1000)
        return {r.info.run_id: int(r.data.metrics["tokens"]) // self.batch_size for r in runs
                if r.data.tags.get("sweep.role") != "parent" and "tokens" in r.data.metrics}


def kill_points(kills: int, rng: random.Random) -> list[float]:
    """Fractions of all planned steps at which to kill: spread over 10-85 %, jittered, increasing."""
    if kills <= 0:
        return []
    width = 0.75 / kills
    return [0.10 + width * (i + rng.uniform(0.2, 0.8)) for i in range(kills)]


def faults(sweep: subprocess.Popen, server: Server, progress: Progress, plan: dict, rng: random.Random,
           log: list) -> None:
    """Inject the planned faults as the sweep progresses (not as time passes).

    ``plan``: ``total_steps`` (all trials' planned steps), ``kill_at`` (fractions of them, one per
    kill), ``restart_after_trials`` (the server restarts once that many trials have logged steps;
    None: no restart) and ``outage`` (seconds down). Progress is read only while the server is up.
    """
    import psutil

    kill_at = list(plan["kill_at"])
    restart_due = plan["restart_after_trials"] is not None
    while sweep.poll() is None and (kill_at or restart_due):
        try:
            steps = progress.steps()
        except Exception:  # the server busy or slow: ask again
            time.sleep(1)
            continue
        done = sum(steps.values()) / plan["total_steps"]
        if restart_due and len(steps) >= plan["restart_after_trials"]:
            t0 = time.time()
            server.down()
            time.sleep(plan["outage"])
            server.up()
            restart_due = False
            log.append({"fault": "server restart", "at": t0, "down_seconds": round(time.time() - t0, 1),
                        "progress": round(done, 3), "trials_logging": len(steps)})
            print(f"  fault: tracking server down for {time.time() - t0:.0f} s at {done:.0%} of the steps, "
                  f"{len(steps)} trials logging", flush=True)
            continue
        if kill_at and done >= kill_at[0]:
            workers = trial_workers(sweep)
            if workers:
                victim = rng.choice(workers)
                try:
                    victim.kill()
                except psutil.Error:  # finished meanwhile: another victim next time round
                    continue
                kill_at.pop(0)
                log.append({"fault": "trial killed", "at": time.time(), "pid": victim.pid, "progress": round(done, 3)})
                print(f"  fault: killed trial worker {victim.pid} at {done:.0%} of the steps "
                      f"({len(plan['kill_at']) - len(kill_at)}/{len(plan['kill_at'])})", flush=True)
                continue
        time.sleep(0.5)


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
    parser.add_argument("--kills", type=int, default=4, help="trial workers to kill, spread over the steps")
    parser.add_argument("--outage", type=float, default=15.0,
                        help="seconds the tracking server stays down in its one restart (0: no restart)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kills < 0 or args.outage < 0:
        parser.error("--kills and --outage must be >= 0")

    root = DATA / "soak"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = real_store()
    sweep_spec = spec(store.path)
    planned = len(sweep_spec["grid"][0]["dict_size"]) * len(sweep_spec["grid"][0]["k"]) * len(sweep_spec["seeds"])
    (root / "soak.yaml").write_text(yaml.safe_dump(sweep_spec))

    restart_after = -(-planned // 2) if args.outage > 0 else None  # about half the trials logging steps
    plan = {"total_steps": planned * STEPS, "kill_at": kill_points(args.kills, random.Random(args.seed)),
            "restart_after_trials": restart_after, "outage": args.outage}
    server = Server(root)
    server.up()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    injected: list[dict] = []
    t0 = time.time()
    sweep = subprocess.Popen([str(BIN / "sae-registry"), "sweep", str(root / "soak.yaml")], cwd=root, env=env,
                             stdout=open(root / "sweep.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    print(f"soak: {planned} trials of {STEPS} steps; kills at {', '.join(f'{f:.0%}' for f in plan['kill_at'])} "
          f"of the steps; " + (f"a {args.outage:.0f} s server restart once {restart_after} trials log steps"
                               if restart_after else "no server restart") + f"; log {root / 'sweep.log'}", flush=True)
    injector = threading.Thread(target=faults, args=(sweep, server, Progress(server.uri, BATCH), plan,
                                                     random.Random(args.seed + 1), injected), daemon=True)
    injector.start()
    try:
        rc = sweep.wait(timeout=3600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    injector.join(timeout=args.outage + 120)  # a restart under way finishes before counting
    wall = time.time() - t0
    try:
        counts = count(server, planned)
    finally:
        server.down()
    kills = sum(f["fault"] == "trial killed" for f in injected)
    restarts = sum(f["fault"] == "server restart" for f in injected)
    asked = {"kills": args.kills, "restarts": int(restart_after is not None)}
    line = (f"soak: kills asked {asked['kills']} injected {kills}, restarts asked {asked['restarts']} injected "
            f"{restarts}, planned {counts['planned']}, finished {counts['finished']}, registered "
            f"{counts['registered']}, lost {counts['lost']}")
    print(f"{line}  (sweep exit {rc}, {wall:.0f} s)")
    short = kills < asked["kills"] or restarts < asked["restarts"]
    if short:
        print(f"soak FAILED: the sweep ended before every fault was injected ({kills} of {asked['kills']} kills, "
              f"{restarts} of {asked['restarts']} restarts): it proves nothing about the missing ones; "
              "lengthen the trials (STEPS) or ask for fewer faults", file=sys.stderr)
    path = write_results("soak", {"line": line, **counts, "kills_asked": asked["kills"], "trial_kills": kills,
                                  "restarts_asked": asked["restarts"], "server_restarts": restarts,
                                  "sweep_exit_code": rc, "wall_seconds": round(wall, 1), "plan": plan,
                                  "faults": injected, "spec": sweep_spec})
    print(f"wrote {path}")
    sys.exit(0 if counts["lost"] == 0 and rc == 0 and not short else 1)


if __name__ == "__main__":
    main()
