"""The demo sweep as a user runs it, against dictionary-learning's multi-trainer loop on the same tokens.

Ours: the grid of ``jobs/demo.yaml`` through ``sae_registry.sweep.driver.run`` in a fresh Python process
(imports, a local Ray, MLflow recording, downstream evaluation, registration and the frontier all
counted), as ``sae-registry sweep jobs/demo.yaml`` does it. Theirs: dictionary-learning's
``trainSAE`` with the same 8 configurations (dict_size, k, l1 coefficient, learning rate, seed,
batch size, tokens) in one fresh process, all trainers on one stream of the same store's batches,
its weights saved at the end. Both are timed from process start to exit. Each dictionary's FVU
and L0 come from the same held-out split, computed the same way (``metrics.fvu``).

Efficiency: the seconds the trials spent in their step loops (summed, times each trial's CPUs)
over wall x cores. With ``--repeats N`` each contender runs N times, in turn, and its run of median
wall time is the one reported (runs on one quiet 2-core machine varied by about 15 %). Also printed: where the sweep's seconds went outside training, and the cost
model's estimate of each trial against its measured step loop.

``--bound`` also times the floor under any sweep of this grid here: the packs the sweep plans, each
trained by ``train.train_pack`` in a plain process of its own, all started at once (no Ray, MLflow,
evaluation or outputs). Our sweep's wall can only approach it; their loop over its wall is the most
any sweep of ours could reach on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, real_store, table, write_results

RESULT = "SWEEP_SPEED_RESULT "


def demo_spec(store: str, tokens: int, workdir: Path, evaluate: str | None = None) -> dict:
    """jobs/demo.yaml on the benchmark's store, with ``tokens`` per dictionary (and ``evaluate`` when given)."""
    spec = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    spec.update(store=store, harvest=None, storage=str(workdir / "ray_results"))
    spec["train"]["tokens"] = tokens
    if evaluate is not None:
        spec["evaluate"] = evaluate
    return spec


def ours(spec: dict, workdir: Path) -> dict:
    """The sweep (runs in its own process: see ``--_ours``)."""
    from sae_registry.config.sweep import SweepSpec, estimated_cost
    from sae_registry.sweep.driver import run

    spec = SweepSpec.from_dict(spec)
    result = run(spec, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", verbose=0)
    ended = time.time()  # what follows is the benchmark's own bookkeeping
    import mlflow

    from sae_registry import ActivationStore
    from sae_registry.registry.runs import default_run_name

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    loop = {}  # member name -> its pack's step-loop seconds (tokens at the loop's measured rate)
    for row in result.dictionaries:
        m = client.get_run(row["run_id"]).data.metrics
        loop[row["name"]] = spec.train["tokens"] // spec.train["batch_size"] * spec.train["batch_size"] / m[
            "final/tokens_per_second"]
    d = ActivationStore.open(spec.store).d
    configs = spec.configurations(d)
    slots, plan = local_plan(spec, d)
    trials = []
    for pack in plan:
        names = [default_run_name(*configs[i]) for i in pack]
        trials.append({"members": names, "predicted": sum(estimated_cost(*configs[i], d) for i in pack),
                       "measured": loop[names[0]]})
    return {"ended": ended, "wall_in_run": result.wall_seconds, "seconds": result.seconds, "trials": trials,
            "cpus_per_trial": spec.resources.cpu, "slots": slots,
            "dictionaries": [{k: r[k] for k in ("name", "sparsity", "dict_size", "k", "l1_coeff", "fvu", "l0")}
                             for r in result.dictionaries]}


def local_plan(sweep, d: int) -> tuple[int, list[list[int]]]:
    """The trials a sweep runs at once on a local Ray (every CPU of this machine), and its packs
    (deterministic: the plan the sweep ran)."""
    slots = sweep.concurrent_slots([{"Alive": True, "Resources": {"CPU": float(os.cpu_count() or 1)}}])
    return slots, sweep.pack_plan(d, slots)


class Batches:
    """The store's training batches in the order our trainer reads them (epoch after epoch); re-iterable."""

    def __init__(self, store, batch_size: int, seed: int) -> None:
        self.store, self.batch_size, self.seed = store, batch_size, seed

    def __iter__(self):
        epoch = 0
        while True:
            yield from self.store.batches(self.batch_size, seed=self.seed + 1 + epoch, drop_last=True)
            epoch += 1


def theirs(spec: dict, workdir: Path) -> dict:
    """dictionary-learning's trainSAE on the same configurations (runs in its own process: ``--_theirs``)."""
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.training import trainSAE

    from sae_registry import ActivationStore
    from sae_registry.config.sweep import SweepSpec

    sweep = SweepSpec.from_dict(spec)
    store = ActivationStore.open(sweep.store)
    configs = sweep.configurations(store.d)
    train = configs[0][1]
    steps = train.tokens // train.batch_size
    trainer_configs = []
    for sae_cfg, cfg in configs:
        cfg = cfg.resolved(sae_cfg)
        common = {"steps": steps, "activation_dim": store.d, "dict_size": sae_cfg.dict_size, "layer": 3,
                  "lm_name": "minilm", "lr": cfg.lr, "seed": cfg.seed, "device": "cpu",
                  "warmup_steps": max(1, steps // 20), "decay_start": int(steps * (1 - cfg.lr_decay_fraction))}
        if sae_cfg.sparsity == "top_k":
            trainer_configs.append({"trainer": TopKTrainer, "k": sae_cfg.top_k, **common})
        else:
            trainer_configs.append({"trainer": StandardTrainerAprilUpdate, "l1_penalty": cfg.l1_coeff,
                                    "sparsity_warmup_steps": max(1, int(steps * cfg.l1_warmup_fraction)), **common})
    started = time.perf_counter()
    trainSAE(Batches(store, train.batch_size, train.seed), trainer_configs, steps, save_dir=str(workdir / "dl"),
             normalize_activations=True, device="cpu")
    loop = time.perf_counter() - started
    ended = time.time()  # FVU and L0 below are the benchmark's, not the loop's
    return {"ended": ended, "loop": loop, "dictionaries": _their_metrics(store, configs, workdir / "dl")}


def _their_metrics(store, configs, save_dir: Path) -> list[dict]:
    """FVU and L0 of each saved dictionary-learning dictionary on our held-out split."""
    import torch
    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    from sae_registry.metrics.reconstruction import fvu
    from sae_registry.registry.runs import default_run_name

    x = store.read_split("eval")
    rows = []
    for i, (sae_cfg, cfg) in enumerate(configs):
        state = torch.load(save_dir / f"trainer_{i}" / "ae.pt")
        if sae_cfg.sparsity == "top_k":
            ae = AutoEncoderTopK(store.d, sae_cfg.dict_size, sae_cfg.top_k)
        else:
            ae = AutoEncoder(store.d, sae_cfg.dict_size)
        ae.load_state_dict(state)
        with torch.no_grad():
            f = ae.encode(x)
            rows.append({"name": default_run_name(sae_cfg, cfg), "fvu": fvu(x, ae.decode(f)),
                         "l0": float((f != 0).sum(-1).float().mean())})
    return rows


def pack_alone(spec: dict, workdir: Path, members: list[int]) -> dict:
    """One pack of the sweep's plan through ``train.train_pack`` alone, on the trial's CPUs: no Ray,
    no MLflow, no evaluation, no outputs (runs in its own process: ``--_pack``)."""
    import torch

    from sae_registry import ActivationStore
    from sae_registry.config.sweep import SweepSpec
    from sae_registry.training.loop import train_pack

    sweep = SweepSpec.from_dict(spec)
    torch.set_num_threads(max(1, int(sweep.resources.cpu)))
    store = ActivationStore.open(sweep.store)
    configs = sweep.configurations(store.d)
    first = train_pack(store, [(*configs[i], workdir / f"member-{i}") for i in members], progress=False)[0]
    return {"ended": time.time(), "loop": first.history[-1]["tokens"] / first.tokens_per_second}


def bound(spec: dict, workdir: Path) -> dict:
    """The floor under any sweep of this grid on this machine: the sweep's own packs, each in a plain
    process, all started at once; wall from the first start to the last end."""
    from sae_registry import ActivationStore
    from sae_registry.config.sweep import SweepSpec

    sweep = SweepSpec.from_dict(spec)
    slots, plan = local_plan(sweep, ActivationStore.open(sweep.store).d)
    started = time.time()
    running = [_start("--_pack", spec, workdir, json.dumps(members)) for members in plan]
    results = [_result("--_pack", p) for p in running]
    return {"wall": max(r["ended"] for r in results) - started, "loops": [r["loop"] for r in results],
            "cpus_per_trial": sweep.resources.cpu, "slots": slots}


def _start(flag: str, spec: dict, workdir: Path, *more: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, flag, json.dumps(spec), str(workdir), *more], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", "RAY_USAGE_STATS_ENABLED": "0"})


def _result(flag: str, process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{flag} failed ({process.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    line = next(line for line in stdout.splitlines() if line.startswith(RESULT))
    return json.loads(line.removeprefix(RESULT))


def timed_process(flag: str, spec: dict, workdir: Path) -> dict:
    """Run this file with ``flag`` in a fresh process; its result, and its wall time from the start of
    the process to the end of the job (the process's own ``ended`` clock: its bookkeeping after that
    is not counted)."""
    started = time.time()
    result = _result(flag, _start(flag, spec, workdir))
    return {**result, "wall": result["ended"] - started}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens per dictionary")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each contender this many times, alternating; the run of median wall counts")
    parser.add_argument("--like-for-like", action="store_true",
                        help="also run the sweep with evaluate: none (their loop does no downstream evaluation)")
    parser.add_argument("--bound", action="store_true",
                        help="also time the floor: the sweep's packs in plain processes, all at once (no Ray, "
                             "MLflow or evaluation)")
    parser.add_argument("--results", default="sweep_speed",
                        help="the results file's name in benchmarks/results/ (run.py's targets read sweep_speed)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    store = str(real_store().path)
    load_before = os.getloadavg()
    every: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):  # the contenders alternate, so that a slow spell hits each alike
        for who, flag, evaluate in (("ours", "--_ours", None), ("plain", "--_ours", "none"), ("theirs", "--_theirs", None)):
            if who == "plain" and not args.like_for_like:
                continue
            workdir = Path(tempfile.mkdtemp(prefix=f"sweep-speed-{who}-"))
            print(f"{who}: the demo grid, {args.tokens:,} tokens per dictionary (run {repeat + 1} of {args.repeats})",
                  flush=True)
            every.setdefault(who, []).append(timed_process(flag, demo_spec(store, args.tokens, workdir, evaluate), workdir))
        if args.bound:
            workdir = Path(tempfile.mkdtemp(prefix="sweep-speed-bound-"))
            print(f"bound: the sweep's packs in plain processes (run {repeat + 1} of {args.repeats})", flush=True)
            every.setdefault("bound", []).append(bound(demo_spec(store, args.tokens, workdir), workdir))
    load_after = os.getloadavg()
    # each contender's run of median wall time (the lower of the two middle ones for an even count)
    runs = {who: sorted(done, key=lambda r: r["wall"])[(len(done) - 1) // 2] for who, done in every.items()}
    us, them = runs["ours"], runs["theirs"]

    def row(name: str, run: dict, who: str) -> dict:
        step_seconds = sum(t["measured"] for t in run["trials"]) * run["cpus_per_trial"]
        return {"run": name, "wall": run["wall"], "speedup": them["wall"] / run["wall"],
                "efficiency": step_seconds / (run["wall"] * min(cores, run["slots"] * run["cpus_per_trial"])),
                "walls": ", ".join(f"{r['wall']:.1f}" for r in every[who])}

    summary = [row("sae-registry sweep (jobs/demo.yaml, downstream evaluation on)", us, "ours")]
    if "plain" in runs:
        summary.append(row("the same sweep, evaluate: none (like for like)", runs["plain"], "plain"))
    if "bound" in runs:
        floor = runs["bound"]
        summary.append({"run": "floor: the same packs in plain processes (no Ray, MLflow, evaluation)",
                        "wall": floor["wall"], "speedup": them["wall"] / floor["wall"],
                        "efficiency": sum(floor["loops"]) * floor["cpus_per_trial"]
                        / (floor["wall"] * min(cores, floor["slots"] * floor["cpus_per_trial"])),
                        "walls": ", ".join(f"{r['wall']:.1f}" for r in every["bound"])})
    summary.append({"run": "dictionary_learning trainSAE, 8 trainers (no evaluation)", "wall": them["wall"],
                    "speedup": 1.0, "efficiency": them["loop"] / them["wall"],
                    "walls": ", ".join(f"{r['wall']:.1f}" for r in every["theirs"])})
    print(f"\nload average {load_before[0]:.1f} before, {load_after[0]:.1f} after; {cores} cores")
    columns = [("run", "run", ""), ("wall", "wall s", ".1f"), ("speedup", "x their loop", ".2f"),
               ("efficiency", "efficiency", ".0%")]
    if "bound" in runs:  # what a sweep's own overheads cost: the floor's wall over each run's
        for r in summary[:-1]:  # ours (their loop, last, is another program)
            r["of_floor"] = runs["bound"]["wall"] / r["wall"]
        columns.append(("of_floor", "floor / wall", ".0%"))
    if args.repeats > 1:
        columns[1] = ("wall", f"median wall s of {args.repeats}", ".1f")
        columns.append(("walls", "every run's wall s", ""))
    print(table(summary, columns))
    theirs_by_name = {r["name"]: r for r in them["dictionaries"]}
    per_dict = [{"name": r["name"], "fvu": r["fvu"], "their_fvu": theirs_by_name[r["name"]]["fvu"],
                 "l0": r["l0"], "their_l0": theirs_by_name[r["name"]]["l0"]} for r in us["dictionaries"]]
    print()
    print(table(per_dict, [("name", "dictionary", ""), ("fvu", "FVU ours", ".4f"), ("their_fvu", "FVU theirs", ".4f"),
                           ("l0", "L0 ours", ".1f"), ("their_l0", "L0 theirs", ".1f")]))
    mean_ratio = sum(t["measured"] / t["predicted"] for t in us["trials"]) / len(us["trials"])
    for t in us["trials"]:
        t["error"] = t["measured"] / (t["predicted"] * mean_ratio) - 1  # the model's error on the trials' shares
        t["members"] = ", ".join(t["members"])
    print()
    print(table(us["trials"], [("members", "trial (pack)", ""), ("predicted", "predicted s (1 core)", ".1f"),
                               ("measured", "measured step loop s", ".1f"), ("error", "error of share", "+.0%")]))
    phases = [{"phase": k, "seconds": v} for k, v in us["seconds"].items()]
    phases.append({"phase": "process start to run() (python, imports)", "seconds": us["wall"] - us["wall_in_run"]})
    columns = [("phase", "where the sweep's seconds went (trials/*: summed over trials)", ""), ("seconds", "seconds", ".1f")]
    if "plain" in runs:
        plain = dict(runs["plain"]["seconds"], **{"process start to run() (python, imports)":
                                                  runs["plain"]["wall"] - runs["plain"]["wall_in_run"]})
        for p in phases:
            p["plain"] = plain.get(p["phase"], float("nan"))
        columns.append(("plain", "evaluate: none", ".1f"))
    print()
    print(table(phases, columns))
    path = write_results(args.results, {"tokens_per_dictionary": args.tokens, "cores": cores, "repeats": args.repeats,
                                         "load_average": [load_before, load_after], "summary": summary,
                                         "dictionaries": per_dict, "trials": us["trials"], "phases": phases})
    print(f"\nwritten {path}")
    return {"summary": summary, "dictionaries": per_dict}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("--_ours", "--_theirs"):
        fn = ours if sys.argv[1] == "--_ours" else theirs
        print(RESULT + json.dumps(fn(json.loads(sys.argv[2]), Path(sys.argv[3]))), flush=True)
    elif len(sys.argv) == 5 and sys.argv[1] == "--_pack":
        print(RESULT + json.dumps(pack_alone(json.loads(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]))),
              flush=True)
    else:
        main()
