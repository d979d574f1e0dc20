"""What someone else wrote (a package index, another process, a registry's tags) cannot take over ours."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_registry import SAEConfig, SAERegistryError
from sae_registry.registry.runs import train_and_register
from sae_registry.training.loop import TrainConfig

FAMILY = "trust-d32"

# Loads a logged model in a fresh interpreter where ``sae_registry`` cannot be imported at all (as on
# a serving machine that never installed it), and writes its codes for the given inputs.
_PREDICT_WITHOUT_PACKAGE = """
import sys, numpy as np

class NoSaeRegistry:
    def find_spec(self, name, path=None, target=None):
        if name == "sae_registry" or name.startswith("sae_registry."):
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NoSaeRegistry())
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
assert not any(m == "sae_registry" or m.startswith("sae_registry.") for m in sys.modules)
"""


@pytest.fixture
def trained(synthetic_store, tmp_path):
    store, _ = synthetic_store
    cfg = TrainConfig(tokens=4 * 1024, batch_size=1024, eval_every=4, lr=3e-3, seed=1)
    return train_and_register(store, SAEConfig(32, 64, 4), cfg, tmp_path / "run", family=FAMILY, progress=False)


def test_a_logged_model_carries_its_code_and_never_names_our_package(trained, synthetic_store, tmp_path):
    import mlflow.artifacts

    from sae_registry.registry.tracking import Tracking

    tracking = Tracking.resolve(None)
    uri = tracking.client.get_model_version_download_uri(FAMILY, "1")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "model"),
                                                     tracking_uri=tracking.uri))
    requirements = (local / "requirements.txt").read_text().lower()
    assert "torch" in requirements
    assert "sae-registry" not in requirements and "sae_registry" not in requirements
    for name in ("model/sae.py", "model/files.py", "architectures/kernels.py", "architectures/top_k.py",
                 "architectures/catalogue.py", "errors.py", "config/options.py", "__init__.py", "model/__init__.py"):
        assert (local / "code" / "sae_registry_code" / name).is_file(), name

    store, _ = synthetic_store
    x = store.read_split("eval")[:20].numpy()
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", _PREDICT_WITHOUT_PACKAGE, str(local), str(tmp_path / "x.npy"),
                    str(tmp_path / "codes.npy")], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (20, 64)
    assert np.array_equal(codes, trained.result.sae.encode(store.read_split("eval")[:20]).detach().numpy())


def _load_slowly(cwd: str, name: str, results) -> None:
    """In a child process: load ``name`` with the swap into the cache widened to two seconds."""
    import os
    import time

    os.chdir(cwd)
    real = os.replace

    def slow_replace(src, dst, *args, **kwargs):
        time.sleep(2)  # between "is the folder there?" and the swap: where two loaders collided
        return real(src, dst, *args, **kwargs)

    os.replace = slow_replace
    try:
        from sae_registry import load

        results.put(("ok", load(name).version))
    except BaseException as e:  # reported to the parent, which asserts on it
        results.put((type(e).__name__, str(e)))


def test_two_processes_loading_one_version_into_a_shared_cache_both_succeed(trained, tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no forked sqlite or MLflow state
    results = ctx.Queue()
    procs = [ctx.Process(target=_load_slowly, args=(str(tmp_path), f"{FAMILY}/1", results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert got == [("ok", "1"), ("ok", "1")], got
    cached = [p for p in (tmp_path / "sae-registry-cache").rglob("*") if p.is_dir() and p.name == "1"]
    assert len(cached) == 1 and sorted(f.name for f in cached[0].iterdir()) == ["config.json", "sae.safetensors"]


def test_a_second_training_into_the_same_out_is_refused_while_the_first_writes(synthetic_store, tmp_path):
    from sae_registry.training.loop import train

    store, _ = synthetic_store
    cfg = TrainConfig(tokens=4 * 1024, batch_size=1024, eval_every=2, checkpoint_every=2, lr=3e-3, seed=1)
    refusals = []

    def second_resume(step, metrics, checkpoint):
        # A flock conflicts between two opens of the file even in one process: this is the second `--resume`.
        with pytest.raises(SAERegistryError, match=r"another training is writing to .*out.*another --out") as e:
            train(store, SAEConfig(32, 64, 4), cfg, tmp_path / "out", resume=True, progress=False)
        refusals.append(str(e.value))

    result = train(store, SAEConfig(32, 64, 4), cfg, tmp_path / "out", progress=False, callback=second_resume)
    assert refusals and (result.out_dir / "sae.safetensors").is_file()
    # Once the first has finished, resuming there works again.
    train(store, SAEConfig(32, 64, 4), cfg, tmp_path / "out", resume=True, progress=False)


def test_show_and_list_print_registry_text_with_control_characters_escaped(trained):
    from click.testing import CliRunner

    from sae_registry.cli.commands import main
    from sae_registry.registry.tracking import Tracking

    evil = "\x1b]0;owned\x07\x1b[2J\r\u202e"
    client = Tracking.resolve(None).client
    client.set_model_version_tag(FAMILY, "1", "note", f"hello{evil}")
    client.set_model_version_tag(FAMILY, "1", "k", evil)
    for args in (["show", f"{FAMILY}/1"], ["list", FAMILY], ["list"]):
        out = CliRunner().invoke(main, args, catch_exceptions=False).output
        assert not any(ch in out for ch in "\x1b\x07\r\u202e"), (args, out)
    shown = CliRunner().invoke(main, ["show", f"{FAMILY}/1"], catch_exceptions=False).output
    assert "hello\\x1b]0;owned\\x07\\x1b[2J\\r\\u202e" in shown
    assert "\\x1b" in CliRunner().invoke(main, ["list", FAMILY], catch_exceptions=False).output
