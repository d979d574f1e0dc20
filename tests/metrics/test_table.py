"""The metrics table (``config/metrics.py``) is the one list of metrics: a row added there shows up in
the registry's tags, `list`, the train command's line, a sweep's summary, frontier, live table and
``champion_by``, and nothing else names a metric by hand."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from sae_registry.config import metrics as table
from sae_registry.config.metrics import DOWNSTREAM, METRICS, RECONSTRUCTION, Metric
from sae_registry.errors import SAERegistryError

PACKAGE = Path(__file__).resolve().parents[2] / "sae_registry"
# The modules that show, record or rank metrics: each reads the table.
READERS = ("cli/commands.py", "config/sweep.py", "registry/versions.py", "sweep/driver.py", "sweep/progress.py",
           "sweep/trial.py")
FAKE = Metric("sharpness", "higher", ".2f", RECONSTRUCTION, "sharpness", "a metric made up for this test",
              heading="sharp", width=7, listed=True, champion="sharpest")


@pytest.fixture
def fake_row(monkeypatch):
    """The table with one more listed, ranking reconstruction metric."""
    monkeypatch.setattr(table, "METRICS", METRICS + (FAKE,))
    return FAKE


def _spec(**fields):
    from sae_registry.config.sweep import SweepSpec

    return SweepSpec.from_dict({"name": "fake", "store": "nowhere.zarr", "grid": {"dict_size": [64]}, **fields})


# -- the table itself ---------------------------------------------------------------------------------


def test_the_rows_are_well_formed():
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names) and len({m.tag for m in METRICS}) == len(METRICS)
    for m in METRICS:
        assert m.better in ("lower", "higher") and m.where in (RECONSTRUCTION, DOWNSTREAM), m
        assert format(0.5, m.fmt) and m.description and "\n" not in m.description, m
        assert not (m.listed or m.axis) or len(m.title) <= m.width, m  # a column's heading fits it
    x, y = table.axis("x"), table.axis("y")
    assert [m.axis for m in METRICS if m.axis] in (["x", "y"], ["y", "x"])
    assert x.where == y.where == RECONSTRUCTION  # the live table shows them while training runs
    choices = table.champion_choices()
    assert len(set(choices)) == len(choices) and table.default_champion() == choices[0]
    assert table.champion_metric(table.default_champion()).where == RECONSTRUCTION  # ranks without evaluate
    keys = {m.name: (m.key, m.eval_key, m.run_key, m.tag) for m in METRICS}
    assert keys["fvu"] == ("fvu", "eval/fvu", "final/fvu", "fvu")
    assert keys["fidelity"][::2] == ("downstream/fidelity", "downstream/fidelity")
    assert keys["fidelity"][3] == "downstream.fidelity"


def test_the_table_imports_no_torch():
    code = "import sys, sae_registry.config.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_reconstruction_rows_are_what_evaluate_returns():
    import torch

    from sae_registry.metrics.reconstruction import summary

    x = torch.randn(6, 3)
    got = summary(x, x * 0.5, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert set(got) == {m.key for m in table.metrics(RECONSTRUCTION)}


def test_every_downstream_row_is_a_number_downstream_reports():
    source = (PACKAGE / "metrics" / "downstream.py").read_text()
    reported = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)}
    assert {m.key for m in table.metrics(DOWNSTREAM)} <= reported


def test_every_row_is_in_the_evaluation_docs():
    docs = (PACKAGE.parent / "docs" / "evaluation.md").read_text()
    assert [m.name for m in METRICS if not re.search(rf"\b{m.name}\b", docs)] == []


def test_no_metric_is_named_by_hand_outside_the_table():
    """No string in the modules that show, record or rank metrics is a metric's name, key, tag or heading."""
    spelled = {s for m in METRICS for s in (m.name, m.key, m.eval_key, m.run_key, m.tag, m.title)}
    found = []
    for module in READERS:
        tree = ast.parse((PACKAGE / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in spelled:
                found.append(f"{module}:{node.lineno}: {node.value!r}")
    assert not found, "metrics named by hand (read them from config/metrics.py):\n" + "\n".join(found)


# -- a row added shows up everywhere ------------------------------------------------------------------


def test_a_new_row_is_a_champion_by_choice(fake_row):
    assert "sharpest" in table.champion_choices()
    assert _spec(champion_by="sharpest").champion_by == "sharpest"
    assert _spec().champion_by == "fvu"  # the default stays the first row that ranks
    with pytest.raises(SAERegistryError, match="champion_by must be one of fvu, downstream, sharpest, got 'l0'"):
        _spec(champion_by="l0")


def test_a_downstream_champion_needs_the_downstream_evaluation():
    with pytest.raises(SAERegistryError, match="champion_by: downstream needs evaluate: downstream"):
        _spec(champion_by="downstream")
    assert _spec(champion_by="downstream", evaluate="downstream").champion_by == "downstream"


def test_a_new_row_is_tagged_described_and_read_back(fake_row):
    from sae_registry.registry.versions import VersionInfo, metric_tags, version_description

    tags = metric_tags({"final/fvu": 0.25, "final/sharpness": 2.5, "downstream/fidelity": 0.75, "final/other": 1.0})
    assert tags == {"fvu": "0.25", "sharpness": "2.5", "downstream.fidelity": "0.75"}
    described = version_description("fam", {"dict_size": 64, "input_size": 32}, tags, "file:///a", "r1")
    assert "| FVU | downstream fidelity | sharpness |" in described and "| 0.25 | 0.75 | 2.5 |" in described
    info = VersionInfo("fam", "1", [], tags, "r1", 0)
    assert info.metrics == {"fvu": 0.25, "sharpness": 2.5}  # the held-out numbers: reconstruction rows


def _listing(monkeypatch, tags: list[dict]) -> list[str]:
    from sae_registry.cli.commands import main
    from sae_registry.registry import versions
    from sae_registry.registry.versions import VersionInfo

    found = [VersionInfo("fam", str(i + 1), [], {"sparsity": "top_k", "dict_size": "64", "k": "4", **t}, "r", 0)
             for i, t in enumerate(tags)]
    monkeypatch.setattr(versions, "versions", lambda family, tracking: found)
    r = CliRunner().invoke(main, ["list", "fam"])
    assert r.exit_code == 0, r.output
    return r.output.splitlines()


def test_list_shows_the_listed_rows(monkeypatch):
    lines = _listing(monkeypatch, [{"fvu": "0.25", "l0": "4.0", "dead_fraction": "0.0", "mse": "0.5"}])
    assert lines[0].split() == ["version", "aliases", "architecture", "dict_size", "k", "l1_coeff", "FVU", "L0", "dead",
                                "created"]  # no fidelity column until a version has one
    assert lines[1].split()[5:9] == ["-", "0.2500", "4.0", "0.000"]
    lines = _listing(monkeypatch, [{"fvu": "0.25"}, {"downstream.fidelity": "0.5"}])
    assert lines[0].split()[6:] == ["FVU", "L0", "dead", "fidelity", "created"]
    assert [line.split()[6:10] for line in lines[1:]] == [["0.2500", "-", "-", "-"], ["-", "-", "-", "0.5000"]]


def test_a_new_row_is_a_column_of_list(monkeypatch, fake_row):
    lines = _listing(monkeypatch, [{"fvu": "0.25", "sharpness": "2.5"}])
    assert lines[0].split()[6:] == ["FVU", "L0", "dead", "sharp", "created"]
    assert lines[1].split()[6:10] == ["0.2500", "-", "-", "2.50"]


def test_a_new_row_is_on_the_train_commands_line(fake_row, capsys):
    from sae_registry.cli.commands import _print_result

    metrics = {"fvu": 0.25, "explained_variance": 0.75, "l0": 4.0, "dead_fraction": 0.0, "mse": 0.5, "sharpness": 2.5}
    _print_result(SimpleNamespace(metrics=metrics, tokens_per_second=1000.0, out_dir="runs/a"))
    assert capsys.readouterr().out.splitlines()[0] == (
        "FVU 0.2500  explained variance 0.7500  L0 4.0  dead fraction 0.000  MSE 0.50000  sharpness 2.50  "
        "(1,000 tokens/s)")


def _row(name: str, version: str | None, **metrics) -> dict:
    return {"name": name, "version": version, "frontier": True, "dict_size": 64, "k": 4, "l1_coeff": 0.0,
            **{m.name: None for m in table.metrics()}, **metrics}


def test_a_new_row_is_in_the_sweep_summary_and_can_crown_the_champion(fake_row):
    from sae_registry.sweep.driver import SweepResult, champion_of, summary_row, summary_table

    row = summary_row("r1", "a", {"dict_size": "64", "sparsity": "top_k", "top_k": "4", "l1_coeff": "0", "lr": "0.001",
                                  "seed": "0"}, {"final/fvu": 0.25, "final/l0": 4.0, "final/sharpness": 2.5})
    assert (row["fvu"], row["l0"], row["sharpness"], row["fidelity"]) == (0.25, 4.0, 2.5, None)
    rows = [_row("a", "1", fvu=0.2, l0=8.0, dead_fraction=0.0, sharpness=1.0),
            _row("b", "2", fvu=0.3, l0=4.0, dead_fraction=0.0, sharpness=3.0)]
    lines = summary_table(SweepResult("s", "p", rows, "2", 0, 1.0), "champion").splitlines()
    assert lines[0].split() == ["dictionary", "dict_size", "k", "l1_coeff", "FVU", "L0", "dead", "sharp", "version"]
    assert lines[2].split()[-4:] == ["0.000", "3.00", "2", "(champion)"]
    assert champion_of(rows, _spec()) == "1"  # the lowest FVU
    assert champion_of(rows, _spec(champion_by="sharpest")) == "2"  # the highest sharpness
    assert champion_of(rows, _spec(champion_by="sharpest", champion_max_l0=5)) == "2"
    assert champion_of(rows, _spec(champion_max_l0=5)) == "2"


def test_the_summary_shows_fidelity_once_measured_and_ranks_by_it():
    from sae_registry.sweep.driver import SweepResult, champion_of, summary_table

    rows = [_row("a", "1", fvu=0.2, l0=8.0, dead_fraction=0.0, fidelity=0.5),
            _row("b", "2", fvu=0.3, l0=4.0, dead_fraction=0.0, fidelity=0.9),
            _row("c", "3", fvu=0.1, l0=4.0, dead_fraction=0.0, fidelity=float("nan")),  # zeros changed nothing
            _row("d", None, fvu=0.1, l0=4.0, dead_fraction=0.0, fidelity=1.0)]  # not registered
    spec = _spec(champion_by="downstream", evaluate="downstream")
    assert champion_of(rows, spec) == "2"
    assert summary_table(SweepResult("s", "p", rows, "2", 0, 1.0), None).splitlines()[0].split()[-2:] == [
        "fidelity", "version"]
    without = [{k: v for k, v in r.items() if k != "fidelity"} for r in rows]
    assert "fidelity" not in summary_table(SweepResult("s", "p", without, "2", 0, 1.0), None)


def test_the_frontier_and_live_table_follow_the_axis_rows(monkeypatch):
    """Swap FVU for a made-up y axis: the frontier, the live reports and the live table follow."""
    from sae_registry.sweep.driver import pareto_frontier
    from sae_registry.sweep.progress import LiveTable, live_numbers, report

    error = Metric("error", "lower", ".3f", RECONSTRUCTION, "error", "made up", axis="y")
    monkeypatch.setattr(table, "METRICS", tuple(replace(m, axis="") if m.axis == "y" else m for m in METRICS)
                        + (error,))
    rows = [{"dict_size": 64, "l0": 4.0, "error": 0.5, "fvu": 0.1}, {"dict_size": 64, "l0": 8.0, "error": 0.6,
                                                                      "fvu": 0.05}]
    assert pareto_frontier(rows) == [True, False]  # by FVU both would be on it
    assert live_numbers({"eval/l0": 4.0, "eval/error": 0.5}, lambda m: m.eval_key) == (4.0, 0.5)
    r = report(3, {"a": (4.0, 0.5), "b": (8.0, 0.2)})
    assert (r["best"], r["l0"], r["error"], r["a/error"]) == ("b", 8.0, 0.2, 0.5)
    live = LiveTable(every_seconds=60)
    live.update("t1", r, now=0.0)
    lines = live.text().splitlines()
    assert lines[0].split()[-2:] == ["L0", "error"] and lines[1].split()[-2:] == ["4.0", "0.500"]


@pytest.mark.slow
def test_the_registry_tags_a_version_with_every_rows_tag(tmp_path, fake_row):
    """A finished run that logged every metric of the table: its version carries each under the row's tag."""
    from mlflow.entities import Metric as Logged
    from mlflow.entities import Param

    from sae_registry.registry.tracking import Tracking
    from sae_registry.registry.versions import register_run, resolve

    tracking = Tracking.resolve(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = tracking.client
    experiment = client.create_experiment("fake")
    run_id = client.create_run(experiment).info.run_id
    values = {m.run_key: 0.125 * (i + 1) for i, m in enumerate(table.metrics())}
    params = {"sparsity": "top_k", "dict_size": "64", "top_k": "4", "input_size": "32", "l1_coeff": "0"}
    client.log_batch(run_id, metrics=[Logged(k, v, 0, 0) for k, v in values.items()],
                     params=[Param(k, v) for k, v in params.items()])
    model = client.create_logged_model(experiment, source_run_id=run_id)
    client.set_tag(run_id, "sae.model_uri", f"models:/{model.model_id}")
    client.set_terminated(run_id, "FINISHED")
    tags = resolve(f"fake/{register_run(run_id, 'fake', tracking)}", tracking).tags
    written = {m.tag: tags.get(m.tag) for m in table.metrics()}
    assert written == {m.tag: repr(values[m.run_key]) for m in table.metrics()}
    assert FAKE.tag in tags
