"""FVU at matched L0 against SAELens's own trainer of the same rule, each implementation at its best learning rate.

Our decoder rows are kept at unit norm; SAELens starts its rows at norm 0.1 and never normalises
them. Adam moves every weight by about the learning rate per step, so one learning rate is a
larger step for SAELens, relative to its weights, than for us: comparing both at one learning rate
measures which parametrisation that rate suits. Here each implementation trains at every rate of a
grid, on the same batches (``train_speed.py``'s case: d 384 -> 4096, k 32, batch 4096, 196 steps =
803 k tokens), and is scored on the same held-out split; the best of each is compared.

batch_top_k and matryoshka are scored with the training rule (the k * 4096 largest of each
4096-token held-out batch), so every run's L0 is 32 and the FVUs compare directly. jumprelu's L0
is whatever training reached, so our jumprelu runs also cross the first threshold, and our FVU is
read at each SAELens run's L0 by interpolating (log L0, FVU) between the two runs of our frontier (the
runs no other run of ours beats on both L0 and FVU) that bracket it
(the row says when none do). With ``--target-l0 T`` both train jumprelu towards L0 T instead (our
``target_l0``, SAELens's ``quadratic`` mode: the same penalty) from the same first thresholds,
and ours may also move its thresholds at ``--threshold-lr-scales`` times the rate
(``threshold_lr_scale``); the reading at each SAELens run's L0 is the same.

    python rule_quality.py                                   # all three rules (about 3 h on 2 quiet cores)
    python rule_quality.py --rules batch_top_k --lrs 3e-3 1e-2
    python rule_quality.py --rules jumprelu --target-l0 32 --thresholds 0.1 0.3 --threshold-lr-scales 1 10
    python rule_quality.py ... --reuse rule_quality_jumprelu_target   # runs already in that file are not trained again
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from common import RESULTS, real_store, table, write_results
from train_speed import BATCH, D_IN, INIT_THRESHOLD, evaluate_ours, held_out, ours, saelens

RULES = ("batch_top_k", "matryoshka", "jumprelu")
LRS = (3e-3, 6e-3, 1.2e-2, 2.4e-2)  # at 1e-3 both were worse than at 3e-3 (docs/benchmarks.md)
SAELENS_LRS = (3e-3, 6e-3, 1.2e-2)  # its runs take 3x ours
JUMPRELU_LRS = (1e-3, 3e-3)
THRESHOLDS = (0.45, INIT_THRESHOLD, 0.55)  # jumprelu: our first thresholds (train_speed.py's module doc)
STEPS = 196


def train_one(impl: str, store, sparsity: str, lr: float, threshold: float, batches, x_eval,
              target_l0: float | None = None, threshold_lr_scale: float = 1.0) -> dict:
    """Train one dictionary for STEPS steps on ``batches``; its held-out FVU and L0, and its seconds."""
    torch.manual_seed(0)
    started = time.perf_counter()
    if impl == "ours":
        member = ours(store, sparsity, 4096, STEPS, lr=lr, init_threshold=threshold, target_l0=target_l0,
                      threshold_lr_scale=threshold_lr_scale)
        for i in range(STEPS):
            member.train_step(batches[i % len(batches)], STEPS)
            if (i + 1) % member.cfg.eval_every == 0:
                member.refresh_dead()
        seconds = time.perf_counter() - started
        return {**evaluate_ours(member, x_eval), "seconds": seconds, "decoder_lr_scale": member.cfg.decoder_lr_scale}
    scale = math.sqrt(D_IN) / store.mean_norm  # SAELens takes the batches scaled as ours normalises them
    trainer = saelens(sparsity, 4096, lr, STEPS, init_threshold=threshold, target_l0=target_l0)
    for i in range(STEPS):
        trainer.step(batches[i % len(batches)] * scale)
        trainer.n_training_steps += 1
    seconds = time.perf_counter() - started
    trainer.sae.eval()
    return {**held_out(trainer.sae.encode, trainer.sae.decode, x_eval * scale), "seconds": seconds}


def run_key(run: dict, target_l0: float | None) -> tuple:
    """What makes two runs the same: rule, implementation, lr; jumprelu's first threshold, thresholds'
    rate and target L0; our decoder's rate."""
    jumprelu = run["rule"] == "jumprelu"
    return (run["rule"], run["impl"], run["lr"], run["threshold"] if jumprelu else None,
            (run.get("threshold_lr_scale") or 1.0) if jumprelu else None, target_l0 if jumprelu else None,
            run.get("decoder_lr_scale", 1.0) if run["impl"] == "ours" else None)


def _our_decoder_scale(rule: str) -> float:
    """Our rule's default decoder_lr_scale: runs made at another are not reused."""
    from sae_registry.architectures.catalogue import rule_of

    return rule_of(rule).decoder_lr_scale


def earlier_runs(name: str | None) -> dict[tuple, dict]:
    """The runs of an earlier results file (same batches, steps and scoring), by their settings."""
    if name is None:
        return {}
    data = json.loads((RESULTS / f"{name}.json").read_text())
    if (data["steps"], data["batch_size"]) != (STEPS, BATCH):
        raise SystemExit(f"{name}: {data['steps']} steps of {data['batch_size']}, not {STEPS} of {BATCH}: not comparable")
    return {run_key(r, data.get("target_l0")): r for r in data["runs"]}


def at_l0(runs: list[dict], l0: float) -> float | None:
    """FVU at ``l0`` on the line (log L0, FVU) between the two runs of the frontier that bracket it (None if
    none do): a run that another beats on both L0 and FVU is left out, so each implementation is read at its best."""
    pts = sorted((r["l0"], r["fvu"]) for r in runs if r["l0"] > 0)
    pts = [(l0_a, f_a) for l0_a, f_a in pts if not any(l0_b <= l0_a and f_b < f_a for l0_b, f_b in pts)]
    for (l0_a, f_a), (l0_b, f_b) in zip(pts, pts[1:]):
        if l0_a <= l0 <= l0_b:
            w = 0.0 if l0_b == l0_a else (math.log(l0) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a))
            return f_a + w * (f_b - f_a)
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    parser.add_argument("--lrs", nargs="*", type=float, default=list(LRS), help="our learning rates")
    parser.add_argument("--saelens-lrs", nargs="*", type=float, default=list(SAELENS_LRS), help="SAELens's")
    parser.add_argument("--jumprelu-lrs", nargs="*", type=float, default=list(JUMPRELU_LRS),
                        help="jumprelu's learning rates, for both")
    parser.add_argument("--thresholds", nargs="*", type=float, default=list(THRESHOLDS),
                        help="jumprelu: our first thresholds (SAELens's is train_speed.py's, whose L0 ours must bracket)")
    parser.add_argument("--threshold-lr-scales", nargs="*", type=float, default=[1.0],
                        help="jumprelu: ours also at each of these multiples of lr for its thresholds")
    parser.add_argument("--target-l0", type=float, default=None,
                        help="jumprelu: both train towards this L0 (quadratic penalty), from each first threshold")
    parser.add_argument("--reuse", default=None, help="an earlier results file's name: its runs are not trained again")
    parser.add_argument("--results", default="rule_quality", help="the results file's name in benchmarks/results/")
    args = parser.parse_args(argv)
    store = real_store()
    x_eval = store.read_split("eval", max_tokens=16_384)
    batches = list(store.batches(BATCH, seed=0, drop_last=True))
    runs, summary, earlier = [], [], earlier_runs(args.reuse)
    for rule in args.rules:
        by_impl: dict[str, list[dict]] = {"ours": [], "SAELens": []}
        if rule == "jumprelu":
            plan = [("ours", lr, t, s) for lr in args.jumprelu_lrs for t in args.thresholds for s in args.threshold_lr_scales]
            theirs = args.thresholds if args.target_l0 is not None else [INIT_THRESHOLD]
            plan += [("SAELens", lr, t, 1.0) for lr in args.jumprelu_lrs for t in theirs]
        else:  # the first threshold means nothing to the k rules
            plan = [("ours", lr, INIT_THRESHOLD, 1.0) for lr in args.lrs]
            plan += [("SAELens", lr, INIT_THRESHOLD, 1.0) for lr in args.saelens_lrs]
        for impl, lr, threshold, scale in plan:
            jumprelu = rule == "jumprelu"
            planned = {"rule": rule, "impl": impl, "lr": lr, "threshold": threshold if jumprelu else None,
                       "threshold_lr_scale": scale if jumprelu else None,
                       **({"decoder_lr_scale": _our_decoder_scale(rule)} if impl == "ours" else {})}
            key = run_key(planned, args.target_l0)
            if key in earlier:
                by_impl[impl].append(earlier[key])
                runs.append(earlier[key])
                continue
            print(f"{rule}: {impl} at lr {lr:g}" + (f", first threshold {threshold:g}, thresholds at {scale:g}x"
                                                    if jumprelu else ""), flush=True)
            run = {**planned,
                   **train_one("ours" if impl == "ours" else "saelens", store, rule, lr, threshold, batches, x_eval,
                               args.target_l0 if jumprelu else None, scale)}
            by_impl[impl].append(run)
            runs.append(run)
            print(f"    FVU {run['fvu']:.4f}  L0 {run['l0']:.1f}  ({run['seconds']:.0f} s)", flush=True)
        if rule == "jumprelu":  # L0 differs run to run: ours read at each SAELens run's L0
            for theirs in by_impl["SAELens"]:
                mine = at_l0(by_impl["ours"], theirs["l0"])
                summary.append({"rule": rule, "ours": mine, "saelens": theirs["fvu"], "l0": theirs["l0"],
                                "how": f"ours interpolated at SAELens's L0 (its lr {theirs['lr']:g}, first threshold "
                                       f"{theirs['threshold']:g})" if mine is not None
                                else "no two runs of ours bracket SAELens's L0",
                                "gap": None if mine is None else mine / theirs["fvu"] - 1})
        else:
            theirs, mine = min(r["fvu"] for r in by_impl["SAELens"]), min(r["fvu"] for r in by_impl["ours"])
            summary.append({"rule": rule, "ours": mine, "saelens": theirs, "l0": 32.0, "gap": mine / theirs - 1,
                            "how": "the best of each (L0 32 for all)"})
    print()
    print(table(runs, [("rule", "rule", ""), ("impl", "implementation", ""), ("lr", "lr", "g"),
                       ("threshold", "first threshold", "g"), ("threshold_lr_scale", "thresholds' lr", "g"),
                       ("fvu", "FVU", ".4f"), ("l0", "L0", ".1f"),
                       ("seconds", "seconds", ".0f")]))
    print()
    print(table(summary, [("rule", "rule", ""), ("ours", "FVU ours", ".4f"), ("saelens", "FVU SAELens", ".4f"),
                          ("l0", "at L0", ".1f"), ("gap", "ours vs SAELens", "+.1%"), ("how", "compared", "")]))
    path = write_results(args.results, {"steps": STEPS, "batch_size": BATCH, "target_l0": args.target_l0,
                                        "runs": runs, "summary": summary})
    print(f"\nwritten {path}")
    return {"runs": runs, "summary": summary}


if __name__ == "__main__":
    main()
