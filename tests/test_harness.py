"""Bad values into every command and public function: one clear error each, before any work.

Each case is one argument of one command (through click's ``CliRunner``) or of one public function,
and a hypothesis strategy of bad values for it (names, paths, numbers, shapes, filters, spec
fields). The other arguments are small and valid, so a value that slipped through would start real
(but short) work. For every value the harness checks what a user sees:

- the CLI exits 1 or 2 with exactly one ``Error: ...`` line, no traceback, and no exception other
  than click's own (``CliRunner`` would otherwise hide a raw torch or MLflow error);
- a function raises ``SAERegistryError`` (nothing else, and not silence);
- nothing was recorded: the registry holds as many runs and versions as before, and the paths the
  call would write (``--out``) do not exist.

Hypothesis is derandomised with few examples per case, so a run is the same every time and quick.
With ``SAE_HARNESS_SURVEY=<file.json>`` a failed check is counted instead of raised, and the counts
(cases, values tried, values that found a traceback, a silent accept or work done) are written there.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sae_registry
from sae_registry import ActivationStore, SAEConfig, SAERegistryError
from sae_registry.cli.commands import main
from sae_registry.training.loop import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore")
SURVEY = os.environ.get("SAE_HARNESS_SURVEY")
FAMILY, IMPORTED = "h", "imp"
EXAMPLES = settings(derandomize=True, max_examples=5 if SURVEY else 3, deadline=None, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))
TEXTS = [f"Sentence {i} of the harness: the quick brown fox number {i} jumps over the lazy dog." for i in range(40)]


class World:
    """Built once per module: a harvested store with provenance, a narrow store of another width,
    a registry with one trained dictionary (h@champion, h/1) and one imported (imp/1), an export."""

    def __init__(self, root: Path) -> None:
        from sae_registry.harvest.local import harvest
        from sae_registry.interchange.formats import export
        from sae_registry.registry.runs import import_dictionary, train_and_register

        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.text = root / "text.txt"
        self.text.write_text("\n\n".join(TEXTS))
        cwd = os.getcwd()
        os.chdir(root)  # the experiment's artifacts go under the working directory at its creation
        try:
            self.store = harvest(root / "m.zarr", TEXTS, layer=1, max_tokens=1500, chunk_tokens=256,
                                 device="cpu", progress=False)
            with ActivationStore.create(root / "narrow.zarr", d=8, chunk_tokens=256) as s:
                s.append(torch.randn(1024, 8, generator=torch.Generator().manual_seed(0)))
            self.narrow = ActivationStore.open(root / "narrow.zarr")
            train_and_register(self.store, SAEConfig(self.store.d, 32, 4),
                               TrainConfig(tokens=512, batch_size=128, eval_every=2, eval_tokens=128, device="cpu"),
                               root / "run", family=FAMILY, alias="champion", tracking_uri=self.uri, progress=False)
            self.dictionary = sae_registry.load(f"{FAMILY}@champion", tracking_uri=self.uri)
            self.exported = export(self.dictionary.sae, "saelens", root / "exported")  # the bare SAE: no lineage
            import_dictionary(self.exported, IMPORTED, tracking_uri=self.uri)
        finally:
            os.chdir(cwd)
        self.a_file = root / "text.txt"
        self.empty_dir = root / "empty"
        self.empty_dir.mkdir()
        self.spec = root / "spec.yaml"

    def recorded(self) -> tuple[int, int]:
        """(runs of any status, registered versions) in the registry."""
        import mlflow
        from mlflow.entities import ViewType

        client = mlflow.MlflowClient(tracking_uri=self.uri)
        experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        runs = len(client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=50000))
        return runs, len(client.search_model_versions(max_results=50000))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("harness"))


# -- what is checked, and counted --------------------------------------------------------------------

COUNTS: dict[str, dict] = {}


def _count(case: str, value: object, problem: str | None) -> None:
    entry = COUNTS.setdefault(case, {"tried": 0, "found": []})
    entry["tried"] += 1
    if problem:
        entry["found"].append(f"{value!r}: {problem}")
    if problem and not SURVEY:
        pytest.fail(f"{case} with {value!r}: {problem}")


def teardown_module() -> None:
    if SURVEY:
        found = {c: e["found"] for c, e in COUNTS.items() if e["found"]}
        Path(SURVEY).write_text(json.dumps({
            "cases": len(COUNTS), "values_tried": sum(e["tried"] for e in COUNTS.values()),
            "values_found": sum(len(f) for f in found.values()), "cases_found": len(found), "found": found,
        }, indent=1))


def _out(world: World, case: str) -> Path:
    """A path the call would write to; it must not exist afterwards."""
    path = world.root / "out" / case.replace(" ", "_")
    shutil.rmtree(path, ignore_errors=True)
    return path


def check_cli(world: World, case: str, value: object, argv: list[str], out: Path | None = None) -> None:
    before = world.recorded()
    result = CliRunner().invoke(main, ["--tracking-uri", world.uri, *argv])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    problem = None
    if result.exit_code == 0:
        problem = "accepted silently (exit 0)"
    elif not isinstance(result.exception, SystemExit):
        problem = f"traceback: {type(result.exception).__name__}: {str(result.exception)[:160]}"
    elif "Traceback" in result.output or result.exit_code not in (1, 2) or len(errors) != 1:
        problem = f"exit {result.exit_code}, not one Error line: {result.output[-300:]!r}"
    elif world.recorded() != before:
        problem = f"recorded before refusing ({before} -> {world.recorded()} runs, versions): {errors[0]}"
    elif out is not None and out.exists():
        problem = f"wrote {out.name} before refusing: {errors[0]}"
    _count(case, value, problem)


def check_api(world: World, case: str, value: object, call: Callable[[], object], out: Path | None = None) -> None:
    before = world.recorded()
    problem = None
    try:
        got = call()
        problem = f"accepted silently (returned {str(got)[:80]})"
    except SAERegistryError:
        if world.recorded() != before:
            problem = "recorded before refusing"
        elif out is not None and out.exists():
            problem = f"wrote {out.name} before refusing"
    except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
        problem = f"traceback: {type(e).__name__}: {str(e)[:160]}"
    _count(case, value, problem)


# -- bad values ----------------------------------------------------------------------------------------

BAD_NAMES = st.sampled_from(["", "   ", "a/b/c", "h@", "@champion", "nope@champion", "h/99", "h/0", "h@gold",
                             "h/-1", "h\x00", "h\n@champion", "h@cham\x1bpion", "x" * 300, "models:/", "h/1.5",
                             "h/99999999999999999999"]) | st.text(max_size=6).map(lambda s: "zz" + s)
BAD_FAMILIES = st.sampled_from(["", "a/b", "x@y", "bad name", "tab\tname", "nul\x00", "-lead", "x" * 200, "ü"])
BAD_ALIASES = st.sampled_from(["latest", "v2", "", "a b", "1x", "a/b", "bell\x07", "x@y"])
BAD_VERSIONS = st.sampled_from(["0", "-1", "99", "1.5", "abc", "nan", "", "99999999999999999999", "1\x00"])
BAD_POSITIVE = st.sampled_from(["0", "-1", "nan", "inf", "1.5", "abc", "true", ""])
BAD_NONNEGATIVE = st.sampled_from(["-1", "nan", "1.5", "abc", ""])
BAD_FLOATS = st.sampled_from(["-1", "nan", "inf", "-inf", "abc", "", "1e999"])
BAD_DEVICES = st.sampled_from(["foo", "gpu", "", "cuda:x", "-1", "tpu:0", "cpu cpu"])
BAD_CHOICES = st.sampled_from(["", "bogus", "ALL", "all ", "topk"])
PY_NUMBERS = st.sampled_from([0, -1, math.nan, math.inf, True, "3", 1.5])  # for positive integers
PY_HUGE = st.sampled_from([10**30, 2**63])


def bad_paths(world_paths: tuple[str, ...] = ("missing", "file", "empty", "")) -> st.SearchStrategy:
    return st.sampled_from(world_paths)


def path_of(world: World, which: str) -> str:
    return {"missing": str(world.root / "nope" / "x.zarr"), "file": str(world.a_file), "empty": str(world.empty_dir),
            "": "", "narrow": str(world.narrow.path), "nul": str(world.root / "a\x00b")}[which]


# -- the CLI: each case is (command, argument), the rest of the command line small and valid ----------


@dataclass(frozen=True)
class Cli:
    case: str
    values: st.SearchStrategy
    argv: Callable[[World, object, Path], list[str]]


def _train(w: World, out: Path, **change) -> list[str]:
    options = {"--store": str(w.store.path), "--out": str(out), "--dict-size": "32", "--k": "4", "--tokens": "256",
               "--batch-size": "128", "--eval-every": "2", "--eval-tokens": "128", "--device": "cpu", **change}
    return ["train", *[x for kv in options.items() for x in kv if x is not None]]


def _harvest(w: World, out: Path, **change) -> list[str]:
    options = {"--out": str(out), "--text": str(w.text), "--layer": "1", "--max-tokens": "64", "--device": "cpu",
               **change}
    return ["harvest", *[x for kv in options.items() for x in kv]]


TRAIN_INTS = ("--dict-size", "--k", "--tokens", "--batch-size", "--eval-every", "--eval-tokens", "--checkpoint-every",
              "--aux-k", "--dead-after-tokens")
CLI_CASES = [
    *[Cli(f"train {o}", BAD_POSITIVE, lambda w, v, out, o=o: _train(w, out, **{o: v})) for o in TRAIN_INTS],
    Cli("train --k huge", st.sampled_from(["33", "1000"]), lambda w, v, out: _train(w, out, **{"--k": v})),
    Cli("train --batch-size huge", st.sampled_from(["100000", "2000000000"]),
        lambda w, v, out: _train(w, out, **{"--batch-size": v})),
    Cli("train --dict-size huge", st.sampled_from(["100000000000", "9" * 30]),
        lambda w, v, out: _train(w, out, **{"--dict-size": v})),
    Cli("train --seed", BAD_NONNEGATIVE, lambda w, v, out: _train(w, out, **{"--seed": v})),
    *[Cli(f"train {o}", BAD_FLOATS, lambda w, v, out, o=o: _train(w, out, **{o: v}))
      for o in ("--lr", "--l1-coeff", "--aux-coeff", "--encoder-init-scale", "--l1-warmup-fraction",
                "--lr-decay-fraction")],
    *[Cli(f"train {o}", BAD_CHOICES, lambda w, v, out, o=o: _train(w, out, **{o: v}))
      for o in ("--sparsity", "--encoder-init", "--b-dec-init", "--precision")],
    Cli("train --device", BAD_DEVICES, lambda w, v, out: _train(w, out, **{"--device": v})),
    Cli("train --store", bad_paths(("missing", "file", "empty", "", "nul")),
        lambda w, v, out: _train(w, out, **{"--store": path_of(w, v)})),
    Cli("train --out", st.sampled_from(["file", "nul"]), lambda w, v, out: _train(w, out, **{"--out": path_of(w, v)})),
    Cli("train --name", BAD_FAMILIES, lambda w, v, out: [*_train(w, out), "--name", v]),
    Cli("train --alias", BAD_ALIASES, lambda w, v, out: [*_train(w, out), "--alias", v]),
    Cli("harvest --out", st.sampled_from(["existing", "file"]),
        lambda w, v, out: _harvest(w, out, **{"--out": str(w.store.path) if v == "existing" else str(w.a_file)})),
    *[Cli(f"harvest {o}", BAD_POSITIVE, lambda w, v, out, o=o: _harvest(w, out, **{o: v}))
      for o in ("--max-length", "--batch-size", "--max-tokens", "--chunk-tokens")],
    Cli("harvest --layer", st.sampled_from(["-1", "7", "99", "abc", "nan"]),
        lambda w, v, out: _harvest(w, out, **{"--layer": v})),
    Cli("harvest --seed", BAD_NONNEGATIVE, lambda w, v, out: _harvest(w, out, **{"--seed": v})),
    Cli("harvest --dtype", BAD_CHOICES, lambda w, v, out: _harvest(w, out, **{"--dtype": v})),
    Cli("harvest --device", BAD_DEVICES, lambda w, v, out: _harvest(w, out, **{"--device": v})),
    Cli("harvest --text", bad_paths(("missing", "empty", "", "nul")),
        lambda w, v, out: _harvest(w, out, **{"--text": path_of(w, v)})),
    Cli("harvest --model", bad_paths(("missing", "file", "empty", "nul")),
        lambda w, v, out: _harvest(w, out, **{"--model": path_of(w, v)})),
    Cli("list FAMILY", BAD_FAMILIES | BAD_NAMES, lambda w, v, out: ["list", v]),
    Cli("show NAME", BAD_NAMES, lambda w, v, out: ["show", v]),
    Cli("promote FAMILY", BAD_FAMILIES, lambda w, v, out: ["promote", v, "1", "--alias", "x"]),
    Cli("promote VERSION", BAD_VERSIONS, lambda w, v, out: ["promote", FAMILY, v, "--alias", "x"]),
    Cli("promote --alias", BAD_ALIASES, lambda w, v, out: ["promote", FAMILY, "1", "--alias", v]),
    Cli("promote --remove --alias", BAD_ALIASES | st.just("gold"),
        lambda w, v, out: ["promote", FAMILY, "--remove", "--alias", v]),
    Cli("encode NAME", BAD_NAMES, lambda w, v, out: ["encode", v, "--store", str(w.store.path), "--out", str(out)]),
    Cli("encode --store", bad_paths(("missing", "file", "empty", "narrow", "nul")),
        lambda w, v, out: ["encode", FAMILY, "--store", path_of(w, v), "--out", str(out)]),
    Cli("encode --out", st.sampled_from(["file", "store"]),
        lambda w, v, out: ["encode", FAMILY, "--store", str(w.store.path), "--out",
                           str(w.a_file) if v == "file" else str(w.store.path)]),
    Cli("encode --batch-size", BAD_POSITIVE, lambda w, v, out: ["encode", FAMILY, "--store", str(w.store.path),
                                                                "--out", str(out), "--batch-size", v]),
    Cli("encode --split", BAD_CHOICES, lambda w, v, out: ["encode", FAMILY, "--store", str(w.store.path),
                                                          "--out", str(out), "--split", v]),
    Cli("encode --device", BAD_DEVICES, lambda w, v, out: ["encode", FAMILY, "--store", str(w.store.path),
                                                           "--out", str(out), "--device", v]),
    Cli("export NAME", BAD_NAMES, lambda w, v, out: ["export", v, str(out), "--format", "saelens"]),
    Cli("export DIRECTORY", st.sampled_from(["file", "existing"]),
        lambda w, v, out: ["export", FAMILY, str(w.a_file) if v == "file" else str(w.exported), "--format", "saelens"]),
    Cli("export --format", BAD_CHOICES, lambda w, v, out: ["export", FAMILY, str(out), "--format", v]),
    Cli("import DIRECTORY", bad_paths(("missing", "file", "empty", "narrow")),
        lambda w, v, out: ["import", path_of(w, v), "--name", "fresh"]),
    Cli("import --name", BAD_FAMILIES, lambda w, v, out: ["import", str(w.exported), "--name", v]),
    Cli("import --alias", BAD_ALIASES, lambda w, v, out: ["import", str(w.exported), "--name", "fresh", "--alias", v]),
    Cli("import --format", st.sampled_from(["dictionary_learning", "bogus", ""]),
        lambda w, v, out: ["import", str(w.exported), "--name", "fresh", "--format", v]),
    Cli("cards NAME", BAD_NAMES, lambda w, v, out: ["cards", v, "--out", str(out), "--no-log"]),
    Cli("cards --features", st.sampled_from(["32", "-1", "99999999999", "a,b", "1,,x", "1.5", "0;1"]),
        lambda w, v, out: ["cards", FAMILY, "--out", str(out), "--no-log", "--features", v]),
    *[Cli(f"cards {o}", BAD_POSITIVE, lambda w, v, out, o=o: ["cards", FAMILY, "--out", str(out), "--no-log", o, v])
      for o in ("--top", "--max-tokens", "--contexts")],
    Cli("cards --window", BAD_NONNEGATIVE,
        lambda w, v, out: ["cards", FAMILY, "--out", str(out), "--no-log", "--window", v]),
    Cli("cards --split", BAD_CHOICES, lambda w, v, out: ["cards", FAMILY, "--out", str(out), "--no-log", "--split", v]),
    Cli("cards --store", bad_paths(("missing", "file", "empty", "narrow", "nul")),
        lambda w, v, out: ["cards", FAMILY, "--out", str(out), "--no-log", "--store", path_of(w, v)]),
    Cli("cards --out", st.sampled_from(["file"]), lambda w, v, out: ["cards", FAMILY, "--no-log", "--out", str(w.a_file)]),
    Cli("evaluate NAME", BAD_NAMES, lambda w, v, out: ["evaluate", v, "--tokens", "64"]),
    Cli("evaluate --store", bad_paths(("missing", "file", "empty", "narrow", "nul")),
        lambda w, v, out: ["evaluate", FAMILY, "--tokens", "64", "--store", path_of(w, v)]),
    Cli("evaluate --model", bad_paths(("missing", "file", "empty", "nul")),
        lambda w, v, out: ["evaluate", FAMILY, "--tokens", "64", "--model", path_of(w, v), "--text", str(w.text)]),
    Cli("evaluate --text", bad_paths(("missing", "empty", "nul")),
        lambda w, v, out: ["evaluate", FAMILY, "--tokens", "64", "--text", path_of(w, v)]),
    Cli("evaluate --layer", st.sampled_from(["-1", "7", "99", "abc"]),
        lambda w, v, out: ["evaluate", FAMILY, "--tokens", "64", "--layer", v]),
    Cli("evaluate --tokens", BAD_POSITIVE, lambda w, v, out: ["evaluate", FAMILY, "--tokens", v]),
    Cli("evaluate --device", BAD_DEVICES, lambda w, v, out: ["evaluate", FAMILY, "--tokens", "64", "--device", v]),
    Cli("evaluate imported", st.sampled_from([IMPORTED]), lambda w, v, out: ["evaluate", v, "--tokens", "64"]),
    Cli("sweep SPEC", st.sampled_from(["missing", "empty", "file-not-yaml", "list", "bad-field", "narrow-harvest"]),
        lambda w, v, out: ["sweep", _spec_file(w, v)]),
    Cli("ui --port", st.sampled_from(["0", "-1", "70000", "abc", ""]), lambda w, v, out: ["ui", "--port", v]),
    Cli("--tracking-uri", st.sampled_from(["nonsense://x", "http://127.0.0.1:9", "ftp://x/y"]),
        lambda w, v, out: ["--tracking-uri", v, "list"]),
]


def _spec_file(w: World, which: str) -> str:
    if which == "missing":
        return str(w.root / "nope.yaml")
    if which == "empty":
        return str(w.empty_dir)
    text = {"file-not-yaml": "name: [unclosed", "list": "- 1\n- 2\n",
            "bad-field": f"name: s\nstore: {w.store.path}\ngrid: {{dict_size: [32], k: [4]}}\nregistr: all\n",
            "narrow-harvest": f"name: s\nstore: {w.store.path}\ngrid: {{dict_size: [32], kk: [4]}}\n"}[which]
    w.spec.write_text(text)
    return str(w.spec)


@pytest.mark.parametrize("cli", CLI_CASES, ids=lambda c: c.case)
@EXAMPLES
@given(data=st.data())
def test_the_command_line_refuses_bad_values_before_any_work(world, cli, data):
    value = data.draw(cli.values)
    out = _out(world, cli.case)
    check_cli(world, cli.case, value, cli.argv(world, value, out), out)


# -- the public functions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    case: str
    values: st.SearchStrategy
    call: Callable[[World, object, Path], object]


def _cfgs(w: World, **train) -> tuple[SAEConfig, TrainConfig]:
    small = {"tokens": 256, "batch_size": 128, "eval_every": 2, "eval_tokens": 128, "device": "cpu"}
    return SAEConfig(w.store.d, 32, 4), TrainConfig(**{**small, **train})


def _train_and_register(w: World, out: Path, **kw):
    from sae_registry.registry.runs import train_and_register

    return train_and_register(w.store, *_cfgs(w), out, **{"family": "fresh", "tracking_uri": w.uri,
                                                             "progress": False, **kw})


def _make_cards(w: World, store=None, **kw):
    from sae_registry.analysis.cards import make_cards

    return make_cards(w.dictionary.sae, store or w.store, **kw)


def _encode(w: World, out: Path, store=None, **kw):
    from sae_registry.analysis.encode import encode_store

    return encode_store(w.dictionary.sae, store or w.store, out, progress=False, **kw)


def _harvest_api(w: World, out: Path, texts=TEXTS[:4], **kw):
    from sae_registry.harvest.local import harvest

    return harvest(out, texts, **{"layer": 1, "max_tokens": 64, "device": "cpu", "progress": False, **kw})


def _spec(**change) -> dict:
    from sae_registry.config.sweep import SweepSpec

    return SweepSpec.from_dict({"name": "s", "store": "x.zarr", "grid": {"dict_size": [32], "k": [4]}, **change})


BAD_TENSORS = st.sampled_from(["wide", "1-D", "3-D", "0-D", "nan", "inf", "list", "str"])


def _tensor(w: World, which: str):
    d = w.store.d
    return {"wide": torch.zeros(3, d + 1), "1-D": torch.zeros(d - 1), "3-D": torch.zeros(2, 3, d - 1),
            "0-D": torch.tensor(1.0), "nan": torch.full((2, d), math.nan), "inf": torch.full((2, d), math.inf),
            "list": [[1.0, 2.0]], "str": "x"}[which]


API_CASES = [
    Api("load name", BAD_NAMES, lambda w, v, out: sae_registry.load(v, tracking_uri=w.uri)),
    Api("load device", BAD_DEVICES, lambda w, v, out: sae_registry.load(FAMILY, device=v, tracking_uri=w.uri)),
    Api("load tracking_uri", st.sampled_from(["nonsense://x", 3, "http://127.0.0.1:9"]),
        lambda w, v, out: sae_registry.load(FAMILY, tracking_uri=v)),
    Api("find family", BAD_FAMILIES, lambda w, v, out: sae_registry.find(v, tracking_uri=w.uri)),
    Api("find filter key", st.sampled_from(["dict_sise", "K", "kk", "fvu_", "store", "sparsty"]),
        lambda w, v, out: sae_registry.find(FAMILY, tracking_uri=w.uri, **{v: 4})),
    Api("find order_by", st.sampled_from(["fvuu", "", "FVU", "l_0"]),
        lambda w, v, out: sae_registry.find(FAMILY, tracking_uri=w.uri, order_by=v)),
    Api("registry.resolve name", BAD_NAMES, lambda w, v, out: __import__("sae_registry.registry.versions").registry.versions.resolve(
        v, w.uri)),
    Api("registry.set_alias alias", BAD_ALIASES,
        lambda w, v, out: __import__("sae_registry.registry.versions").registry.versions.set_alias(FAMILY, v, "1", w.uri)),
    Api("registry.set_alias version", st.sampled_from(["0", "99", "abc", -1, 1.5, None, "99999999999999999999"]),
        lambda w, v, out: __import__("sae_registry.registry.versions").registry.versions.set_alias(FAMILY, "x", v, w.uri)),
    Api("evaluate store", bad_paths(("missing", "file", "empty", "narrow")),
        lambda w, v, out: sae_registry.evaluate(w.dictionary, path_of(w, v), max_tokens=64)),
    Api("evaluate max_tokens", PY_NUMBERS,
        lambda w, v, out: sae_registry.evaluate(w.dictionary, w.store, max_tokens=v)),
    Api("evaluate device", BAD_DEVICES,
        lambda w, v, out: sae_registry.evaluate(w.dictionary, w.store, max_tokens=64, device=v)),
    Api("evaluate layer", st.sampled_from([-1, 99, "1", 1.5]),
        lambda w, v, out: sae_registry.evaluate(w.dictionary, None, model=w.store.source["model_path"], texts=TEXTS,
                                                layer=v, max_tokens=64)),
    Api("Dictionary.encode x", BAD_TENSORS, lambda w, v, out: w.dictionary.encode(_tensor(w, v))),
    Api("ActivationStore.open path", bad_paths(("missing", "file", "empty", "", "nul")),
        lambda w, v, out: ActivationStore.open(path_of(w, v))),
    Api("ActivationStore.create d", PY_NUMBERS | PY_HUGE, lambda w, v, out: ActivationStore.create(out, d=v)),
    Api("ActivationStore.create chunk_tokens", PY_NUMBERS | PY_HUGE,
        lambda w, v, out: ActivationStore.create(out, d=8, chunk_tokens=v)),
    Api("ActivationStore.create existing", st.sampled_from(["store", "file"]),
        lambda w, v, out: ActivationStore.create(w.store.path if v == "store" else w.a_file, d=8)),
    Api("train.train store width", st.sampled_from(["narrow"]),
        lambda w, v, out: __import__("sae_registry.training.loop").training.loop.train(w.narrow, *_cfgs(w), out, progress=False)),
    Api("train.train out", st.sampled_from(["file"]),
        lambda w, v, out: __import__("sae_registry.training.loop").training.loop.train(w.store, *_cfgs(w), w.a_file, progress=False)),
    Api("runs.train_and_register family", BAD_FAMILIES, lambda w, v, out: _train_and_register(w, out, family=v)),
    Api("runs.train_and_register alias", BAD_ALIASES, lambda w, v, out: _train_and_register(w, out, alias=v)),
    Api("runs.train_and_register batch_size", st.sampled_from([10**6, 2**40]),
        lambda w, v, out: __import__("sae_registry.registry.runs").registry.runs.train_and_register(
            w.store, _cfgs(w)[0], _cfgs(w, batch_size=v)[1], out, family="fresh", tracking_uri=w.uri, progress=False)),
    Api("runs.train_and_register tracking_uri", st.sampled_from(["nonsense://x", "ftp://x/y"]),
        lambda w, v, out: _train_and_register(w, out, tracking_uri=v)),
    Api("interchange.export fmt", BAD_CHOICES,
        lambda w, v, out: __import__("sae_registry.interchange.formats").interchange.formats.export(w.dictionary, v, out)),
    Api("interchange.export directory", st.sampled_from(["file", "existing"]),
        lambda w, v, out: __import__("sae_registry.interchange.formats").interchange.formats.export(
            w.dictionary, "saelens", w.a_file if v == "file" else w.exported)),
    Api("interchange.read directory", bad_paths(("missing", "file", "empty", "narrow")),
        lambda w, v, out: __import__("sae_registry.interchange.formats").interchange.formats.read(path_of(w, v))),
    Api("interchange.read fmt", BAD_CHOICES | st.just("dictionary_learning"),
        lambda w, v, out: __import__("sae_registry.interchange.formats").interchange.formats.read(w.exported, v)),
    Api("encode.encode_store store width", st.sampled_from(["narrow"]), lambda w, v, out: _encode(w, out, w.narrow)),
    Api("encode.encode_store split", BAD_CHOICES, lambda w, v, out: _encode(w, out, split=v)),
    Api("encode.encode_store batch_size", PY_NUMBERS, lambda w, v, out: _encode(w, out, batch_size=v)),
    Api("cards.make_cards store width", st.sampled_from(["narrow"]), lambda w, v, out: _make_cards(w, w.narrow)),
    Api("cards.make_cards features", st.sampled_from([[32], [-1], [10**12], ["a"], [1.5], [True], "0,1"]),
        lambda w, v, out: _make_cards(w, features=v)),
    *[Api(f"cards.make_cards {a}", PY_NUMBERS, lambda w, v, out, a=a: _make_cards(w, **{a: v}))
      for a in ("top", "n_contexts", "max_tokens")],
    Api("cards.make_cards window", st.sampled_from([-1, math.nan, True, "3", 1.5]),
        lambda w, v, out: _make_cards(w, window=v)),
    Api("cards.make_cards split", BAD_CHOICES, lambda w, v, out: _make_cards(w, split=v)),
    Api("sweep.SweepSpec.from_dict field", st.sampled_from(
        [{"registr": "all"}, {"grid": {"dict_sise": [1]}}, {"grid": {"k": [0]}}, {"name": ""}, {"name": "a/b"},
         {"store": 3}, {"grid": []}, {"train": {"lr": "x"}}, {"harvest": {"layr": 1}}, {"resources": {"cpu": -1}},
         {"grid": {"dict_size": [math.nan]}}, {"alias": "latest"}, {"name": None}]),
        lambda w, v, out: _spec(**v)),
    Api("harvest texts", st.sampled_from([[], [""], [1, 2], "just a string", [None]]),
        lambda w, v, out: _harvest_api(w, out, texts=v)),
    Api("harvest layer", st.sampled_from([-1, math.nan, True, "3", 1.5, 7, 99]), lambda w, v, out: _harvest_api(w, out, layer=v)),
    Api("harvest device", BAD_DEVICES, lambda w, v, out: _harvest_api(w, out, device=v)),
    Api("harvest dtype", BAD_CHOICES, lambda w, v, out: _harvest_api(w, out, dtype=v)),
    Api("harvest store_path existing", st.sampled_from(["store"]), lambda w, v, out: _harvest_api(w, w.store.path)),
    *[Api(f"harvest {a}", PY_NUMBERS, lambda w, v, out, a=a: _harvest_api(w, out, **{a: v}))
      for a in ("max_length", "batch_size", "chunk_tokens")],
    Api("harvest seed", st.sampled_from([-1, math.nan, True, "3", 1.5]), lambda w, v, out: _harvest_api(w, out, seed=v)),
]


@pytest.mark.parametrize("api", API_CASES, ids=lambda c: c.case)
@EXAMPLES
@given(data=st.data())
def test_the_public_functions_refuse_bad_values_before_any_work(world, api, data):
    value = data.draw(api.values)
    out = _out(world, api.case)
    check_api(world, api.case, value, lambda: api.call(world, value, out), out)


# -- what the harness cannot see: the order of checks and work, and the words --------------------------


def test_harvest_refuses_an_existing_store_before_loading_the_model(world, monkeypatch):
    from sae_registry.harvest import local as H

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(H, "load_model", no_model)
    monkeypatch.setattr(H, "load_tokenizer", no_model)
    result = CliRunner().invoke(main, ["harvest", "--out", str(world.store.path), "--text", str(world.text)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "already exists; pass overwrite=True (--overwrite)" in result.output


def test_a_sweep_that_already_ran_is_refused_before_ray_starts(world, tmp_path, monkeypatch):
    from sae_registry.sweep import driver as S

    def no_ray(address):
        raise AssertionError("Ray was started before the sweep's state was checked")

    monkeypatch.setattr(S, "connect", no_ray)
    (tmp_path / "ray_results" / "s").mkdir(parents=True)
    (tmp_path / "ray_results" / "s" / "tuner.pkl").write_bytes(b"")  # what Tune leaves after a run
    spec = S.SweepSpec.from_dict({"name": "s", "store": str(world.narrow.path), "grid": {"dict_size": [16], "k": [2]},
                                  "storage": str(tmp_path / "ray_results")})
    with pytest.raises(SAERegistryError, match="sweep 's' already ran at .*: continue it with --resume"):
        S.run(spec, tracking_uri=world.uri)


def test_list_of_an_unknown_family_prints_no_table_before_the_error(world):
    result = CliRunner().invoke(main, ["--tracking-uri", world.uri, "list", "nope"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: no dictionary family 'nope'"), result.output


def test_the_cli_names_the_options_the_api_names_the_arguments(world):
    result = CliRunner().invoke(main, ["--tracking-uri", world.uri, "evaluate", IMPORTED])
    assert "give one with --store, or a model directory with --model" in result.output
    assert "store_or_model=" not in result.output and "model=DIR" not in result.output
    imported = sae_registry.load(IMPORTED, tracking_uri=world.uri)
    with pytest.raises(SAERegistryError, match="pass store_or_model= .* or model= .* with texts= and layer="):
        sae_registry.evaluate(imported)


def test_a_cached_load_reads_the_embedded_registry_without_mlflow(world):
    import subprocess
    import sys

    sae_registry.load(f"{FAMILY}@champion", tracking_uri=world.uri)  # into this test's cache
    code = ("import json, sys, sae_registry\n"
            f"d = sae_registry.load('{FAMILY}@champion', tracking_uri={world.uri!r})\n"
            "print(json.dumps([d.family, d.version, d.aliases, d.tags['sha256.sae.safetensors'], 'mlflow' in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    sha = world.dictionary.tags["sha256.sae.safetensors"]
    assert json.loads(got.stdout.splitlines()[-1]) == [FAMILY, "1", ["champion"], sha, False]
    # the same answer as MLflow's
    from sae_registry.registry.versions import resolve, resolve_embedded

    assert resolve_embedded(f"{FAMILY}@champion", world.uri) == resolve(f"{FAMILY}@champion", world.uri)
    assert resolve_embedded(f"{FAMILY}/1", world.uri) == resolve(f"{FAMILY}/1", world.uri)
    assert resolve_embedded(f"{FAMILY}@gold", world.uri) is None  # unknown: MLflow says why
