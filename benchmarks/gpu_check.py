"""The GPU check: training, saving, loading and encoding on a CUDA device, training speed at GPU
shapes, and a Ray sweep of 8 dictionaries sharing one GPU (``gpu: 0.25``); one table, one JSON.

    benchmarks/gpu_check.sh                         # one GPU: about 4 of its 8 minutes on an H200
    benchmarks/gpu_check.sh --smoke --out x.json    # tiny shapes on the CPU, to know it works

Sections of the table:
- ``check``: the same dictionary trained with the sparse and the dense top-k backward on the device
  (same numbers to float32 rounding), saved and loaded back (identical tensors and outputs), and
  encoding on the device against the CPU (same codes to rounding). Status ``ok`` or ``FAIL``.
- ``speed``: training tokens/s through :func:`sae_registry.training.loop.train` (the store streamed from
  disk, batches moved to the device), d 768 and 2304 x dict_size 32768 and 131072 x k 32 and 64 x
  float32 and bfloat16 top-k selection. Timed between two evaluations after warm-up steps, so the
  first steps (allocation, kernel selection) and the final save are not counted.
- ``crossover``: one l1 training step on its dense and on its sparse path at active fractions held
  by hand (3, 6, 10 and 15 %; the first d and dict_size above), as dense / sparse: above 1 the sparse
  step is faster. Where that crosses 1 is where ``config.SPARSE_BELOW`` should sit on this device
  (5 %, set from the CPU; ``benchmarks/l1_crossover.py`` has the CPU table).
- ``sweep``: ``sae-registry sweep`` on a spec of 8 one-dictionary trials, four at a time on one GPU,
  as a user runs it: wall time (Ray start, trials, MLflow, registration), GPU utilisation sampled
  with nvidia-smi (mean and peak over the sweep), dictionaries registered.

Activations are synthetic (Gaussian): speed does not depend on what the numbers are, and nothing
is downloaded. Depends on the public API (ActivationStore, SAEConfig, TrainConfig, train and the
``sae-registry sweep`` command), and for the crossover rows on ``l1_crossover.step_seconds``, which
steps a training member directly.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, ROOT, machine, table

FULL = {"d": (768, 2304), "dict_size": (32768, 131072), "k": (32, 64), "batch": 4096, "store_batches": 24,
        "eval_every": 10, "intervals": 2, "sweep_dict_size": (16384, 32768), "sweep_k": (16, 32, 64, 128),
        "sweep_steps": 400, "sweep_resources": {"cpu": 1, "gpu": 0.25}, "sweep_concurrent": 4, "sweep_reserve": 150}
SMOKE = {"d": (32, 64), "dict_size": (256, 512), "k": (8, 16), "batch": 256, "store_batches": 16,
         "eval_every": 2, "intervals": 2, "sweep_dict_size": (64, 128), "sweep_k": (2, 4, 8, 16),
         "sweep_steps": 8, "sweep_resources": {"cpu": 0.5, "gpu": 0}, "sweep_concurrent": 4, "sweep_reserve": 0}
PRECISIONS = ("float32", "bfloat16")
COLUMNS = [("section", "section", ""), ("case", "case", ""), ("status", "status", ""),
           ("shown", "value", ""), ("unit", "unit", ""), ("note", "note", "")]
CHECK = {"d": 64, "dict_size": 1024, "k": 16, "batch": 512, "steps": 4}
CROSSOVER = (0.03, 0.06, 0.1, 0.15)  # l1's active fractions at which its two steps are timed


class _Measured(Exception):
    """Raised from the training callback once the timed steps are done: nothing more to train."""


def make_store(path: Path, d: int, tokens: int, seed: int):
    """A synthetic store of ``tokens`` Gaussian rows of width ``d``."""
    import torch

    from sae_registry import ActivationStore

    g = torch.Generator().manual_seed(seed)
    with ActivationStore.create(path, d=d, chunk_tokens=4096, source={"model": "synthetic"}, overwrite=True) as s:
        for start in range(0, tokens, 8192):  # bounded host memory at d 2304
            s.append(torch.randn(min(8192, tokens - start), d, generator=g))
    return ActivationStore.open(path)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- checks ---------------------------------------------------------------------------------------


def _train_small(store, device: str, out: Path, **options):
    from sae_registry import SAEConfig
    from sae_registry.training.loop import TrainConfig, train

    cfg = TrainConfig(tokens=CHECK["steps"] * CHECK["batch"], batch_size=CHECK["batch"], eval_every=2,
                      checkpoint_every=CHECK["steps"], eval_tokens=CHECK["batch"], device=device, **options)
    return train(store, SAEConfig(store.d, CHECK["dict_size"], CHECK["k"]), cfg, out, progress=False)


def _relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_rows(store, device: str, work: Path) -> list[dict]:
    """Sparse vs dense backward, save/load, encode on ``device`` vs the CPU."""
    import torch

    rows = []

    def timed(case: str, fn) -> None:
        start = time.perf_counter()
        try:
            ok, note = fn()
        except Exception as e:  # a failed check is a row of the table, not the end of the run
            ok, note = False, f"{type(e).__name__}: {e}"[:200]
        _sync(device)
        rows.append({"section": "check", "case": case, "status": "ok" if ok else "FAIL",
                     "value": time.perf_counter() - start, "unit": "s", "note": note})

    state: dict = {}

    def sparse_vs_dense():
        sparse = _train_small(store, device, work / "sparse", sparse_backward=True)
        dense = _train_small(store, device, work / "dense", sparse_backward=False)
        state["trained"] = sparse
        params = {n: _relative(p.detach().cpu(), dict(dense.sae.named_parameters())[n].detach().cpu())
                  for n, p in sparse.sae.named_parameters()}
        fvu = max(abs(a["eval/fvu"] - b["eval/fvu"]) / b["eval/fvu"] for a, b in zip(sparse.history, dense.history))
        worst = max(params, key=params.get)
        ok = len(sparse.history) == len(dense.history) > 0 and fvu < 1e-3 and params[worst] < 1e-3
        return ok, f"{CHECK['steps']} steps; FVU rel diff {fvu:.1e}, params rel diff {params[worst]:.1e} ({worst})"

    def save_load():
        trained = state["trained"]
        sae = trained.sae.eval()
        loaded = type(sae).load(trained.out_dir, device=device)
        a, b = sae.state_dict(), loaded.state_dict()
        same = set(a) == set(b) and all(torch.equal(a[n].to(device), b[n]) for n in a)
        x = store.read_split("eval", max_tokens=CHECK["batch"]).to(device)
        with torch.no_grad():
            out_same = torch.equal(sae(x), loaded(x))
        return same and out_same, f"{len(a)} tensors identical: {same}; outputs identical: {out_same}"

    def encode():
        trained = state["trained"]
        on_device = type(trained.sae).load(trained.out_dir, device=device).eval()
        on_cpu = type(trained.sae).load(trained.out_dir, device="cpu").eval()
        x = store.read_split("eval", max_tokens=CHECK["batch"])
        with torch.no_grad():
            a, b = on_device.encode(x.to(device)).cpu(), on_cpu.encode(x)
        # rounding may swap a latent at the top-k boundary, never more than a few
        agree = float(((a > 0) & (b > 0)).sum() / (b > 0).sum().clamp_min(1))
        diff = _relative(a, b)
        return agree > 0.99 and diff < 1e-2, f"{device} vs cpu: active latents agree {agree:.2%}, rel diff {diff:.1e}"

    timed(f"sparse vs dense backward ({device})", sparse_vs_dense)
    timed(f"save / load ({device})", save_load)
    timed(f"encode ({device} vs cpu)", encode)
    return rows


# -- speed ----------------------------------------------------------------------------------------


def speed_row(store, dict_size: int, k: int, precision: str, shape: dict, device: str, work: Path) -> dict:
    """Training tokens/s of one configuration, timed between evaluations after warm-up."""
    import torch

    from sae_registry import SAEConfig
    from sae_registry.training.loop import TrainConfig, train

    every, intervals, batch = shape["eval_every"], shape["intervals"], shape["batch"]
    marks: list[float] = []

    def callback(step: int, entry: dict, checkpoint) -> None:
        marks.append(time.perf_counter())  # an evaluation just read its numbers: the device is idle
        if len(marks) > intervals:
            raise _Measured

    cfg = TrainConfig(tokens=100 * every * batch, batch_size=batch, eval_every=every, eval_tokens=batch,
                      checkpoint_every=10**9, device=device, precision=precision)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        train(store, SAEConfig(store.d, dict_size, k), cfg, work / "speed", callback=callback, progress=False)
    except _Measured:
        pass
    finally:
        shutil.rmtree(work / "speed", ignore_errors=True)
        gc.collect()  # the interrupted trainer's tensors go before the next row allocates its own
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    seconds = marks[-1] - marks[0]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    note = f"{intervals * every} steps of {batch} timed" + (f"; peak {peak:.1f} GiB" if peak else "")
    return {"section": "speed", "case": f"d {store.d}, dict_size {dict_size}, k {k}, {precision}", "status": "ok",
            "value": intervals * every * batch / seconds, "unit": "tokens/s", "note": note,
            "d": store.d, "dict_size": dict_size, "k": k, "precision": precision, "peak_gib": peak}


def crossover_row(store, dict_size: int, fraction: float, shape: dict, device: str) -> dict:
    """One l1 step's dense time over its sparse time at ``fraction`` active (median of 5 steps each)."""
    from itertools import islice

    from l1_crossover import step_seconds

    from sae_registry.architectures.catalogue import SPARSE_BELOW

    batches = list(islice(store.batches(shape["batch"], seed=1, drop_last=True), 6))
    dense, sparse = (step_seconds(store, batches, dict_size, fraction, path, device) for path in (False, True))
    return {"section": "crossover", "case": f"l1 step at {fraction:.0%} active, d {store.d}, dict_size {dict_size}",
            "status": "ok", "value": dense / sparse, "unit": "x dense",
            "note": f"dense {dense * 1e3:.2f} ms, sparse {sparse * 1e3:.2f} ms a step of {shape['batch']}; "
                    f"the sparse step is taken under {SPARSE_BELOW:.0%}",
            "fraction": fraction, "dense_ms": dense * 1e3, "sparse_ms": sparse * 1e3}


# -- sweep ----------------------------------------------------------------------------------------


class GpuSampler:
    """Samples GPU utilisation (%) and memory (MiB) every ``every`` seconds while in use."""

    def __init__(self, every: float = 0.5) -> None:
        self.util: list[float] = []
        self.memory: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(every,), daemon=True)
        self.source = "nvidia-smi" if shutil.which("nvidia-smi") else "torch.cuda.utilization"

    def _sample(self) -> tuple[float, float | None] | None:
        if self.source == "nvidia-smi":
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits", "--id=0"], capture_output=True, text=True,
                                 timeout=10)
            util, memory = out.stdout.strip().split(",")[:2]
            return float(util), float(memory)
        import torch

        return float(torch.cuda.utilization(0)), None  # needs pynvml; raises without it

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                sample = self._sample()
            except Exception:  # no working sampler: the row says n/a
                return
            self.util.append(sample[0])
            if sample[1] is not None:
                self.memory.append(sample[1])

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def sweep_spec(store_path: Path, shape: dict) -> dict:
    batch, steps = shape["batch"], shape["sweep_steps"]
    return {
        "name": "gpu-check",
        "store": str(store_path),
        "grid": [{"sparsity": ["top_k"], "dict_size": list(shape["sweep_dict_size"]), "k": list(shape["sweep_k"])}],
        "train": {"tokens": steps * batch, "batch_size": batch, "eval_every": max(1, steps // 4),
                  "checkpoint_every": max(1, steps // 2), "eval_tokens": batch},
        "pack": 1,
        "resources": shape["sweep_resources"],
        "max_concurrent_trials": shape["sweep_concurrent"],
        "register": "all",
        "alias": "champion",
        "storage": "ray_results",
    }


def sweep_rows(store_path: Path, shape: dict, device: str, work: Path, timeout: float, log_path: Path) -> list[dict]:
    """``sae-registry sweep`` of 8 dictionaries in a subprocess: wall time, GPU utilisation, registered."""
    import yaml

    spec = sweep_spec(store_path, shape)
    planned = len(spec["grid"][0]["dict_size"]) * len(spec["grid"][0]["k"])
    root = work / "sweep"
    root.mkdir()
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # a local Ray on this machine, never someone's cluster
    log = root / "sweep.log"
    gpu = device.startswith("cuda")
    start = time.perf_counter()
    with GpuSampler() if gpu else contextlib.nullcontext() as sampler:
        proc = subprocess.Popen([sys.executable, "-m", "sae_registry.cli", "sweep", str(root / "spec.yaml")],
                                cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the Ray it started, nothing else
                proc.wait()
    wall = time.perf_counter() - start
    registered = _registered(uri, spec["name"])
    ok = rc == 0 and registered == planned
    tail = ""
    if not ok:  # the work directory goes at the end: keep the log beside the JSON
        kept = log_path.with_name(log_path.name + ".sweep.log")
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, kept)
        tail = f"; exit {rc}, log {kept}: " + log.read_text()[-160:].replace("\n", " | ")
    resources = ", ".join(f"{k} {v:g}" for k, v in spec["resources"].items())
    case = f"{planned} trials of 1, {resources} each, {spec['max_concurrent_trials']} at a time"
    rows = [{"section": "sweep", "case": f"wall ({case})", "status": "ok" if ok else "FAIL", "value": wall,
             "unit": "s", "note": f"{spec['train']['tokens']:,} tokens each, Ray start to registration" + tail},
            {"section": "sweep", "case": "dictionaries registered", "status": "ok" if ok else "FAIL",
             "value": registered, "unit": f"of {planned}", "note": f"exit {rc}"}]
    util = sampler.util if gpu else []
    rows.append({"section": "sweep", "case": "GPU utilisation, mean over the sweep", "status": "ok" if util else "n/a",
                 "value": sum(util) / len(util) if util else None, "unit": "%",
                 "note": f"{len(util)} samples ({sampler.source})" if gpu else "n/a: no GPU in this run"})
    rows.append({"section": "sweep", "case": "GPU utilisation, peak", "status": "ok" if util else "n/a",
                 "value": max(util) if util else None, "unit": "%",
                 "note": (f"GPU memory peak {max(sampler.memory):,.0f} MiB" if gpu and sampler.memory else
                          "n/a: no GPU in this run" if not gpu else "")})
    return rows


def _registered(uri: str, family: str) -> int:
    from mlflow import MlflowClient

    try:
        return len(MlflowClient(uri).search_model_versions(f"name='{family}'"))
    except Exception:  # no registry made: the sweep failed before registering
        return 0


# -- main -----------------------------------------------------------------------------------------


def shown(value: float | None) -> str:
    """A table cell: thousands separated, three significant digits below 1000, n/a for none."""
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds): does it all run?")
    parser.add_argument("--device", default=None, help="default: cpu with --smoke, else cuda")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON (default: benchmarks/results/gpu.json on a GPU, benchmarks/.data/gpu-smoke.json "
                             "with --smoke)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for the whole run: speed rows that would leave the sweep too little are "
                             "skipped, and the sweep is stopped at it (gpu_check.sh stops everything at 480 s)")
    args = parser.parse_args(argv)

    import torch

    # gpu_check.sh's timeout sends TERM: exit through the finally blocks (the sweep's process group is killed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shape = SMOKE if args.smoke else FULL
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("torch sees no CUDA GPU; run with --smoke for the CPU run")
    out = args.out or (DATA / "gpu-smoke.json" if args.smoke or not device.startswith("cuda")
                       else RESULTS / "gpu.json")
    started = time.perf_counter()
    payload = {"benchmark": "gpu_check", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
               "mode": "smoke" if args.smoke else "full", "device": device, "shape": shape, "rows": []}
    rows = payload["rows"]
    scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=scratch))  # stores in memory where there is some
    try:
        print(f"gpu check ({payload['mode']}, {device}): checks", flush=True)
        rows += check_rows(make_store(work / "check.zarr", CHECK["d"], 8 * CHECK["batch"], seed=0), device, work)
        write(out, payload)

        def measure(section: str, case: str, row) -> None:
            """Add ``row()`` to ``section``; skipped when the sweep's reserve is at stake, FAIL on an error."""
            if time.perf_counter() - started > args.budget - shape["sweep_reserve"]:
                rows.append({"section": section, "case": case, "status": "skipped",
                             "note": f"skipped: {shape['sweep_reserve']} s of the {args.budget:.0f} s budget are "
                                     "kept for the sweep"})
                return
            print(f"  {section}: {case}", flush=True)
            try:
                rows.append(row())
            except Exception as e:
                rows.append({"section": section, "case": case, "status": "FAIL",
                             "note": f"{type(e).__name__}: {e}"[:200]})
            write(out, payload)

        stores = {}
        for d in shape["d"]:
            stores[d] = make_store(work / f"d{d}.zarr", d, shape["store_batches"] * shape["batch"], seed=d)
            for dict_size in shape["dict_size"]:
                for k in shape["k"]:
                    for precision in PRECISIONS:
                        measure("speed", f"d {d}, dict_size {dict_size}, k {k}, {precision}",
                                partial(speed_row, stores[d], dict_size, k, precision, shape, device, work))
        d, dict_size = shape["d"][0], shape["dict_size"][0]
        for fraction in CROSSOVER:
            measure("crossover", f"l1 step at {fraction:.0%} active, d {d}, dict_size {dict_size}",
                    partial(crossover_row, stores[d], dict_size, fraction, shape, device))
        print("  sweep", flush=True)
        remaining = max(30.0, args.budget - (time.perf_counter() - started))
        rows += sweep_rows(stores[shape["d"][0]].path, shape, device, work, timeout=remaining, log_path=out)
    finally:  # stopped part way (timeout, error): the rows measured so far are still printed and written
        payload["wall_seconds"] = round(time.perf_counter() - started, 1)
        write(out, payload)
        shutil.rmtree(work, ignore_errors=True)
        print(table([{**r, "shown": shown(r.get("value"))} for r in rows], COLUMNS))
        print(f"\n{payload['wall_seconds']:.0f} s; wrote {out}", flush=True)
    return 0 if all(r["status"] in ("ok", "n/a") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
