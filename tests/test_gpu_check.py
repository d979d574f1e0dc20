"""benchmarks/gpu_check.sh --smoke: the GPU check runs end to end on the CPU before a GPU is ever lent.

It starts a local Ray for its sweep of 8 dictionaries: slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def _expected_cases() -> list[str]:
    shape = gpu_check.SMOKE
    speed = [f"d {d}, dict_size {n}, k {k}, {p}" for d in shape["d"] for n in shape["dict_size"]
             for k in shape["k"] for p in gpu_check.PRECISIONS]
    crossover = [f"l1 step at {f:.0%} active, d {shape['d'][0]}, dict_size {shape['dict_size'][0]}"
                 for f in gpu_check.CROSSOVER]
    return ["sparse vs dense backward (cpu)", "save / load (cpu)", "encode (cpu vs cpu)", *speed, *crossover,
            "wall (8 trials of 1, cpu 0.5, gpu 0 each, 4 at a time)", "dictionaries registered",
            "GPU utilisation, mean over the sweep", "GPU utilisation, peak"]


@pytest.mark.slow
def test_the_gpu_check_smoke_run_prints_every_row_and_writes_positive_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TIMEOUT": "1500"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out),
                           "--budget", "1400"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    payload = json.loads(out.read_text())
    assert payload["mode"] == "smoke" and payload["device"] == "cpu"
    rows = {r["case"]: r for r in payload["rows"]}
    expected = _expected_cases()
    assert list(rows) == expected and len(payload["rows"]) == len(expected)  # every row, once, in order
    for case, row in rows.items():
        if case.startswith("GPU utilisation"):  # no GPU in a smoke run: said, not invented
            assert row["status"] == "n/a" and row["value"] is None, row
            continue
        assert row["status"] == "ok", row
        assert isinstance(row["value"], (int, float)) and row["value"] > 0, row
    assert rows["dictionaries registered"]["value"] == 8
    assert sum(r["section"] == "speed" for r in payload["rows"]) == 16
    assert all(r["unit"] == "tokens/s" for r in payload["rows"] if r["section"] == "speed")
    assert sum(r["section"] == "crossover" for r in payload["rows"]) == len(gpu_check.CROSSOVER)
    assert all(r["unit"] == "x dense" and r["dense_ms"] > 0 and r["sparse_ms"] > 0
               for r in payload["rows"] if r["section"] == "crossover")

    # the printed table: a header, then one line per row with its status and value as in the JSON
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"section\s+case\s+status\s+value\s+unit", line))
    body = lines[header + 2: header + 2 + len(expected)]
    for line, case in zip(body, expected):
        row = rows[case]
        assert case in line and f" {row['status']} " in line, line
        assert f" {gpu_check.shown(row['value'])} " in line, line
    assert f"wrote {out}" in done.stdout


def test_the_table_cells_say_na_for_a_missing_number():
    assert gpu_check.shown(None) == "n/a"
    assert gpu_check.shown(1234567.8) == "1,234,568"
    assert gpu_check.shown(2.345) == "2.35"


def test_the_full_run_refuses_a_machine_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "--smoke" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
