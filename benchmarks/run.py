"""Run every benchmark (or those named), print their tables, then the targets and how far each is met.

    .venv/bin/python benchmarks/run.py                 # train store sweep use hooks (~1 h on 2 cores, mostly train)
    .venv/bin/python benchmarks/run.py quality         # FVU against SAELens at each one's best lr (hours)
    .venv/bin/python benchmarks/run.py train store     # some
    .venv/bin/python benchmarks/run.py --quick         # fewer steps and tokens, for a smoke run

Each benchmark runs in its own process and writes ``benchmarks/results/NAME.json``. Not part of CI:
the numbers mean something only on a machine doing nothing else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import RESULTS, ROOT

BENCHMARKS = {
    "train": ("train_speed.py", [], ["--steps-scale", "0.3"]),
    "store": ("store_speed.py", [], []),
    "sweep": ("sweep_speed.py", [], ["--tokens", "60000"]),
    "use": ("use_speed.py", [], ["--harvest-texts", "60"]),
    "hooks": ("harvest_hooks.py", [], ["--tokens", "2048", "--repeats", "1"]),  # needs the llm extra
    # FVU against SAELens's trainer, each at its best learning rate: hours, so only when named
    "quality": ("rule_quality.py", [], ["--rules", "batch_top_k", "--lrs", "3e-3", "--saelens-lrs", "3e-3"]),
}
DEFAULT = ("train", "store", "sweep", "use", "hooks")


def targets() -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) from the JSON files present; met is None for a figure with no target."""

    def load(name: str) -> dict | None:
        path = RESULTS / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    out = []
    train = load("train_speed")
    if train:
        rows = train["rows"]

        def row(case: str, impl: str) -> dict | None:
            return next((r for r in rows if r["case"] == case and r["impl"] == impl), None)

        for case, want in (("top_k 16384", 4.0), ("top_k 4096", 2.5)):
            ours, ref = row(case, "ours"), row(case, "dense reference")
            if ours and ref:
                out.append((f"{case}: >= {want}x the dense reference's tokens/s", f"{ours['vs_reference']:.2f}x",
                            ours["vs_reference"] >= want))
                gap = ours["fvu"] / ref["fvu"] - 1
                out.append((f"{case}: FVU within 2% of the reference's (or better)",
                            f"{ours['fvu']:.4f} vs {ref['fvu']:.4f} ({gap:+.1%})", gap <= 0.02))
        ours = row("top_k 16384", "ours")
        if ours:
            out.append(("top_k 16384: >= 40% of the encoder-product bound", f"{ours['of_bound']:.0%}",
                        ours["of_bound"] >= 0.4))
    store = load("store_speed")
    if store:
        default = next((r for r in store["rows"] if r["variant"] == "float32 none chunk 8192"), None)
        if default:
            out.append(("store reads >= 5x training consumption (default store)", f"{default['vs_training']:.1f}x",
                        default["vs_training"] >= 5))
    rules = load("train_speed_rules")
    for case, want in (("batch_top_k 4096", 2.5), ("matryoshka 4096", 2.5), ("jumprelu 4096", 1.5)):
        rows = [r for r in (rules or {}).get("rows", []) if r["case"] == case]
        ours = next((r for r in rows if r["impl"] == "ours"), None)
        lens = next((r for r in rows if r["impl"].startswith("SAELens ") and "fvu" in r), None)
        if ours and lens:
            out.append((f"{case}: >= {want}x SAELens's tokens/s", f"{ours['vs_saelens']:.2f}x", ours["vs_saelens"] >= want))
    # FVU at matched L0, each implementation at its best learning rate (rule_quality.py)
    quality: dict[str, list[dict]] = {}  # rule -> its rows, from the newer file that has it (`--results` names)
    names = ("rule_quality", "rule_quality_jumprelu", "rule_quality_decoder", "rule_quality_jumprelu_target2")
    for result in sorted(filter(None, map(load, names)), key=lambda r: r["when"]):
        for rule in {row["rule"] for row in result["summary"]}:
            quality[rule] = [row for row in result["summary"] if row["rule"] == rule]
    for row in [row for rows in quality.values() for row in rows]:
        measured = (f"{row['ours']:.4f} vs {row['saelens']:.4f} at L0 {row['l0']:.1f} ({row['gap']:+.1%})"
                    if row["gap"] is not None else row["how"])
        out.append((f"{row['rule']}: FVU within 2% of SAELens's at matched L0 ({row['how']})", measured,
                    row["gap"] is not None and row["gap"] <= 0.02))
    l1_rows = [*(load("train_speed_l1") or {}).get("rows", []), *(rules or {}).get("rows", [])]  # `--results` names
    sparse = next((r for r in l1_rows if r["case"] == "l1 4096" and "sparse steps" in r["impl"]), None)
    if sparse:
        out.append(("l1 4096: >= 1.5x the dense reference once under 5% active", f"{sparse['vs_reference']:.2f}x",
                    sparse["vs_reference"] >= 1.5))
    sweep = load("sweep_speed")
    if sweep and "summary" in sweep:
        ours = sweep["summary"][0]
        tokens = f"{sweep['tokens_per_dictionary']:,} tokens each"
        out.append((f"demo sweep >= 1.5x faster than dictionary_learning's trainSAE loop ({tokens})",
                    f"{ours['speedup']:.2f}x", ours["speedup"] >= 1.5))
        worse = [d["name"] for d in sweep["dictionaries"] if d["name"].startswith("topk") and d["fvu"] > d["their_fvu"]]
        out.append(("demo sweep: FVU no worse than trainSAE's for every top_k dictionary",
                    ", ".join(worse) + " worse" if worse else "all no worse", not worse))
        out.append(("demo sweep: efficiency (step seconds / wall x cores) >= 80%", f"{ours['efficiency']:.0%}",
                    ours["efficiency"] >= 0.8))
        floor = next((r for r in sweep["summary"] if r["run"].startswith("floor")), None)
        if floor is not None:  # --bound: what no sweep of ours can beat here (no target of its own)
            out.append(("the floor under any sweep here: its packs in plain processes", f"{floor['speedup']:.2f}x", None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: {' '.join(DEFAULT)})")
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for name in args.names or DEFAULT:
        script, full, quick = BENCHMARKS[name]
        print(f"\n=== {name} ({script}) ===", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *(quick if args.quick else full)],
                              cwd=ROOT)
        print(f"=== {name}: {'ok' if done.returncode == 0 else f'FAILED ({done.returncode})'}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    print("\n=== targets ===")
    for target, measured, met in targets():
        print(f"{'    ' if met is None else 'met ' if met else 'MISS'}  {target}: {measured}")


if __name__ == "__main__":
    main()
