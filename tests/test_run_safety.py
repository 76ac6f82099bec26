"""Run directories, checkpoints and caches are data: loading them runs no code unless the user trusts
them, a failed resume loses nothing, one run directory has one writer, and cache keys follow the data."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from helpers import ok, run_train

from prunegym.agents import UntrustedFileError as ExportedUntrustedFileError
from prunegym.agents import load_agent, make_agent
from prunegym.agents.agent_files import UntrustedFileError, load_agent_file, load_replay_buffer
from prunegym.agents.factory import ALGORITHMS
from prunegym.compression.data import Split, Splits
from prunegym.compression.locking import DirectoryLock, DirectoryLocked
from prunegym.compression.training import cache_key
from prunegym.compression.unpickling import restricted_loads

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--timesteps", "64", "--finetune-epochs", "1", "--base-epochs", "2", "--checkpoint-freq", "32",
        "--device", "cpu"]


class _Planted:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _plant_in_zip(zip_path: Path, marker: Path, key: str = "lr_schedule") -> None:
    """Rewrite the agent zip with its ``key`` entry replaced by a pickled call."""
    with zipfile.ZipFile(zip_path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(files["data"])
    data[key] = {":type:": "<class 'function'>",
                 ":serialized:": base64.b64encode(pickle.dumps(_Planted(marker))).decode()}
    files["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)


@pytest.fixture(scope="module")
def finished_run(prunegym_cache, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("safety") / "run"
    ok(run_train("--run-dir", str(path), *TINY))
    return path


def _copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# ---- restricted unpickling ------------------------------------------------------------------------
def test_restricted_loads_refuses_a_call_and_admits_arrays(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec"):
        restricted_loads(pickle.dumps(_Planted(marker)), what="a test file")
    assert not marker.exists()
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(restricted_loads(pickle.dumps(array), what="a test file"), array)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithms_agent_zip_loads_without_trust(algo, tmp_path):
    env = gymnasium.make("CartPole-v1" if algo == "dqn" else "Pendulum-v1")
    agent = make_agent(algo, env, episode_length=4, seed=0, device="cpu",
                       hyperparameters={} if algo in ("ppo", "a2c") else {"buffer_size": 64})
    agent.save(tmp_path / "agent.zip")
    loaded = load_agent_file(ALGORITHMS[algo], tmp_path / "agent.zip", device="cpu")
    assert type(loaded) is type(agent)
    assert loaded.observation_space == agent.observation_space and loaded.action_space == agent.action_space
    for a, b in zip(agent.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if hasattr(agent, "replay_buffer"):
        agent.replay_buffer.add(env.observation_space.sample(), env.observation_space.sample(),
                                np.atleast_1d(env.action_space.sample()), np.zeros(1), np.zeros(1), [{}])
        agent.save_replay_buffer(tmp_path / "buffer.pkl")
        load_replay_buffer(loaded, tmp_path / "buffer.pkl")
        assert loaded.replay_buffer.size() == 1
        assert np.array_equal(loaded.replay_buffer.observations[0], agent.replay_buffer.observations[0])


def test_a_replay_buffer_with_a_planted_call_is_refused(tmp_path):
    env = gymnasium.make("Pendulum-v1")
    agent = make_agent("sac", env, episode_length=4, device="cpu", hyperparameters={"buffer_size": 64})
    marker = tmp_path / "ran"
    (tmp_path / "buffer.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(UntrustedFileError, match="builtins.exec"):
        load_replay_buffer(agent, tmp_path / "buffer.pkl")
    assert not marker.exists()


# ---- agent zips of a run --------------------------------------------------------------------------
def test_load_agent_refuses_a_planted_call_unless_trusted(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "ran"
    _plant_in_zip(run / "agent.zip", marker)
    with pytest.raises(ExportedUntrustedFileError, match="lr_schedule"):
        load_agent(run, device="cpu")
    assert ExportedUntrustedFileError is UntrustedFileError
    assert not marker.exists()
    load_agent(run, device="cpu", trust=True)
    assert marker.exists()  # the planted call is real: trusting the file runs it


def test_resume_refuses_a_checkpoint_with_a_planted_call(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    marker = tmp_path / "ran"
    _plant_in_zip(run / "checkpoints" / state["agent"], marker)
    result = run_train("--run-dir", str(run), "--resume", "--timesteps", "96")
    assert result.returncode == 2, result.stderr
    assert "could run code" in result.stderr and "--trust-run" in result.stderr
    assert not marker.exists()
    for name in ("report.json", "model.pt", "uniform.pt", "agent.zip"):
        assert (run / name).is_file(), name


def test_a_failed_resume_keeps_the_finished_results(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    (run / "checkpoints" / state["agent"]).write_bytes(b"not a zip")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    result = run_train("--run-dir", str(run), "--resume", "--timesteps", "96")
    assert result.returncode == 2
    assert state["agent"] in result.stderr and "left as it was" in result.stderr
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_trust_run_needs_resume(tmp_path):
    result = run_train("--run-dir", str(tmp_path / "run"), "--trust-run", *TINY)
    assert result.returncode == 2 and "--trust-run" in result.stderr
    assert not (tmp_path / "run").exists()


# ---- one writer per run directory -----------------------------------------------------------------
def test_a_directory_lock_has_one_holder(tmp_path):
    first = DirectoryLock(tmp_path / "dir").acquire()
    with pytest.raises(DirectoryLocked, match="in use"):
        DirectoryLock(tmp_path / "dir").acquire()
    first.release()
    with DirectoryLock(tmp_path / "dir") as again:
        assert again.held


def test_concurrent_runs_on_one_run_dir_and_one_new_cache(tmp_path):
    """Several train.py processes at once: exactly one claims the run directory; every file the
    others and it leave in the (new, shared) cache is complete."""
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEGYM_CACHE": str(cache)}
    target = tmp_path / "run"
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "--run-dir", str(target), *TINY,
            "--supernet-epochs", "1", "--flops-target", "none"]  # no budget: each λ a run of its own
    procs = [subprocess.Popen([*args, "--lam", str(lam)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for lam in (1, 2, 3)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    winners = [lam for lam, (code, _) in zip((1, 2, 3), results, strict=True) if code == 0]
    assert len(winners) == 1, results
    for code, err in results:
        if code != 0:
            assert code == 2 and ("in use by another" in err or "already exists" in err), err
    config = json.loads((target / "config.json").read_text())
    assert config["config"]["lam"] == winners[0]
    assert json.loads((target / "report.json").read_text())["results"]["rl"]
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.name.startswith(".")]  # no temporary file left behind
    for path in files:
        torch.load(path, map_location="cpu", weights_only=True)  # complete: it loads


def _default_sigint() -> None:
    # A job started in the background by a shell (CI, nohup) inherits SIGINT ignored, and Python then
    # never raises KeyboardInterrupt; the child gets the default back, as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path):
    target = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), "--run-dir", str(target),
                             "--timesteps", "100000", "--checkpoint-freq", "12", "--base-epochs", "2",
                             "--supernet-epochs", "0", "--device", "cpu"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 300
    while not (target / "checkpoints" / "state.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"--run-dir {target} --resume" in err


# ---- the base-model cache -----------------------------------------------------------------------
def test_the_cache_key_follows_the_images_not_only_the_labels():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(20) % 2

    def splits(x: torch.Tensor) -> Splits:
        part = Split(x, y)
        return Splits(part, part, part, in_channels=1, num_classes=2, image_size=4, name="npz:/same/path.npz")

    x = torch.rand(20, 1, 4, 4, generator=gen)
    assert cache_key("digits_cnn", splits(x), 0, 1) == cache_key("digits_cnn", splits(x.clone()), 0, 1)
    assert cache_key("digits_cnn", splits(x), 0, 1) != cache_key("digits_cnn", splits(x + 0.01), 0, 1)


def test_a_cached_base_model_naming_another_factory_is_refused(tmp_path, monkeypatch):
    """The cache trusts only the factory asked for: a planted file naming other code is not built."""
    from prunegym.compression.checkpoint import describe_architecture, save_checkpoint
    from prunegym.compression.data import load_dataset
    from prunegym.compression.models import build_model
    from prunegym.compression.training import base_model, cache_dir

    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path / "cache"))
    splits = load_dataset("digits", 0)
    model = build_model("digits_cnn", splits.in_channels, splits.num_classes)
    arch = describe_architecture(model, "digits_cnn", splits.in_channels, splits.num_classes, splits.image_size)
    path = cache_dir() / "base" / f"{cache_key('digits_cnn', splits, 0, 1)}.pt"
    save_checkpoint(path, model, {**arch, "model": "json:loads"})
    with pytest.raises(ValueError, match="json:loads.*importing and calling code"):
        base_model("digits_cnn", splits, 0, epochs=1)


@pytest.mark.parametrize("name", ["config.json", "checkpoints/state.json"])
def test_json_files_of_a_run_are_never_unpickled(finished_run, tmp_path, name):
    run = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "ran"
    (run / name).write_bytes(pickle.dumps(_Planted(marker)))
    result = run_train("--run-dir", str(run), "--resume", "--timesteps", "96")
    assert result.returncode == 2 and "not valid JSON" in result.stderr, result.stderr
    assert not marker.exists()


def test_a_compare_cell_holding_a_pickle_is_refused(tmp_path):
    from prunegym.agents.compare import CompareConfig, compare

    out = tmp_path / "out"
    config = dict(budgets=[0.5], seeds=[0], finetune_epochs=1, base_epochs=2, supernet_epochs=0,
                  methods=["uniform_l1"], device="cpu", out=str(out))
    compare(CompareConfig(**config), log=lambda text: None)
    marker = tmp_path / "ran"
    (out / "cells" / "uniform_l1__b0.5__s0.json").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ValueError, match="not valid JSON"):
        compare(CompareConfig(**config), log=lambda text: None)
    assert not marker.exists()
