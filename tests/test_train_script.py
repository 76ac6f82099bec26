"""Tests for scripts/train.py, run as a user runs it (a subprocess, tiny budgets), and for loading its run
directory back: the inference model, the agent and its env."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium
import pytest
import torch
from helpers import ok, run_train, train_in_process, train_script

from prunegym.agents import TrainConfig, load_agent, load_inference_model
from prunegym.compression import count_flops, count_params, load_dataset
from prunegym.envs import LAYER_PRUNING_ID

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--timesteps", "64", "--finetune-epochs", "1", "--base-epochs", "2", "--checkpoint-freq", "32",
        "--device", "cpu"]
MEASURES = ("test_accuracy", "flops", "params", "bytes", "latency_b1_ms", "latency_b64_ms")


@pytest.fixture(scope="module")
def run_dir(prunegym_cache, tmp_path_factory) -> Path:
    """One finished tiny run, shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("train") / "run"
    ok(run_train("--run-dir", str(path), *TINY))
    return path


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


# ---- the run directory ---------------------------------------------------------------------------
def test_run_dir_holds_everything(run_dir):
    for name in ("config.json", "report.json", "agent.zip", "model.pt", "uniform.pt", "uniform_l1.pt",
                 "checkpoints/state.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").rglob("events.out.tfevents.*"))
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert (run_dir / "checkpoints" / state["agent"]).is_file()
    assert state["num_timesteps"] == 64
    assert len(list((run_dir / "checkpoints").glob("agent_*.zip"))) <= 2


def test_config_json_records_the_arguments(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["env_id"] == LAYER_PRUNING_ID
    assert config["config"]["timesteps"] == 64
    assert config["config"]["base_epochs"] == 2
    assert config["config"]["checkpoint_freq"] == 32
    assert config["env_kwargs"]["model"] == "digits_cnn"
    # The main job's defaults: the distorted digits, at most a fifth of the FLOPs, the error-rate reward.
    assert config["env_kwargs"]["dataset"] == "digits_distorted"
    assert config["env_kwargs"]["flops_target"] == 0.2 and config["env_kwargs"]["task_loss"] == "error"
    assert config["config"]["importance"] == config["env_kwargs"]["importance"] == "group_l1"  # recorded resolved


def test_report_json(report):
    assert set(report["results"]) >= {"dense", "rl", "uniform"}
    for name in ("dense", "rl", "uniform"):
        result = report["results"][name]
        for key in MEASURES:
            assert key in result, (name, key)
        assert 0.0 <= result["test_accuracy"] <= 1.0
        assert result["flops"] > 0 and result["params"] > 0 and result["bytes"] > 0
        assert result["latency_b1_ms"] > 0 and result["latency_b64_ms"] > 0
    results = report["results"]
    assert results["rl"]["flops"] <= results["dense"]["flops"]
    assert results["uniform"]["flops"] <= results["dense"]["flops"]
    assert results["dense"]["flops_ratio"] == 1.0
    assert results["rl"]["flops_ratio"] <= 0.2 + 1e-9  # the default budget holds
    assert report["search"]["timesteps"] == 64
    assert report["search"]["seconds"] > 0


def test_the_default_search_prunes_a_supernet(run_dir, report):
    """By default the job trains a supernet (once per base model, cached), searches it, and the env
    load_agent rebuilds scores the best widths as the search did."""

    config = json.loads((run_dir / "config.json").read_text())
    assert config["env_kwargs"]["supernet_epochs"] == TrainConfig().supernet_epochs > 0
    assert report["search"]["supernet_seconds"] > 0
    env = gymnasium.make(LAYER_PRUNING_ID, **config["env_kwargs"]).unwrapped
    assert env.model is not env.dense
    # The report's dense model is the trained base model, not the supernet at full width.
    from prunegym.compression.training import evaluate

    assert report["results"]["dense"]["test_accuracy"] == pytest.approx(evaluate(env.dense, env.splits.test)[1],
                                                                         abs=1.5 / len(env.splits.test))
    assert not torch.equal(env.model.features[0].weight, env.dense.features[0].weight)
    # Beside the uniform widths cut from the supernet: uniform L1, the same widths pruned from the dense model.
    uniform, classic = report["results"]["uniform"], report["results"]["uniform_l1"]
    assert classic["keep_ratios"] == uniform["keep_ratios"] and classic["flops"] == uniform["flops"]
    assert f"({1 + TrainConfig().supernet_epochs} for uniform_l1" in report["notes"]  # epochs since the base model
    assert set(load_inference_model(run_dir, "uniform_l1").state_dict()) == \
        set(load_inference_model(run_dir, "uniform").state_dict())
    assert [r.tolist() for r in env.ranking] == [list(range(n)) for n in env.graph.num_channels]
    counts = [round(r * n) for r, n in zip(report["results"]["rl"]["keep_ratios"], env.graph.num_channels,
                                           strict=True)]
    assert env.evaluate_counts(counts)["accuracy"] == report["search"]["reward_split_accuracy"]
    env.close()


def test_tensorboard_has_pruning_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for directory in {f.parent for f in (run_dir / "tb").rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(directory))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    for tag in ("pruning/episode_reward", "pruning/accuracy", "pruning/density", "pruning/best_reward"):
        assert tag in tags, sorted(tags)
    assert any(t.startswith("pruning/best_keep_ratio/") for t in tags)


# ---- command-line behaviour ----------------------------------------------------------------------
def test_help():
    result = ok(run_train("--help"))
    for flag in ("--env", "--dataset", "--model", "--algo", "--lam", "--flops-target", "--timesteps", "--seed",
                 "--device", "--run-dir", "--resume"):
        assert flag in result.stdout, flag
    assert "``" not in result.stdout  # plain text, not the fields' reStructuredText


def test_existing_run_dir_without_resume_fails(run_dir):
    before = (run_dir / "report.json").read_bytes()
    result = run_train("--run-dir", str(run_dir), *TINY)
    assert result.returncode != 0
    assert str(run_dir) in result.stderr
    assert "--resume" in result.stderr
    assert (run_dir / "report.json").read_bytes() == before


@pytest.mark.parametrize(("args", "pattern"),
                         [(["--lam", "-1"], "lam"), (["--algo", "bogus"], "algo"),
                          (["--flops-target", "2"], "flops[_-]target"), (["--density", "bogus"], "density"),
                          (["--model", "bogus"], "model"), (["--timesteps", "0"], "timesteps"),
                          (["--min-keep", "0"], "min_keep"), (["--finetune-lr", "-1"], "finetune_lr"),
                          (["--reward-finetune-steps", "-1"], "reward_finetune_steps"),
                          (["--reward-model", "teacher"], "reward-model"),
                          (["--task-loss", "hinge"], "task-loss.*hinge"),
                          (["--env", "input", "--task-loss", "error"], "task_loss.*layer env only"),
                          (["--env", "input", "--refit-head"], "refit_head.*layer env only"),
                          (["--refit-head", "--reward-finetune-steps", "5"],
                           "refit_head.*reward_finetune_steps=5.*one of the two"),
                          (["--env", "input", "--flops-target", "0.2"], "flops_target.*layer env only"),
                          (["--env", "input", "--min-keep", "0.5"], "min_keep.*layer env only"),
                          (["--lam", "2"], r"\['lam'\] price density only without a budget.*flops_target=0.2"),
                          (["--reward-model", "dense", "--supernet-epochs", "0"], "supernet_epochs > 0"),
                          (["--supernet-extremes", "1.5"], "supernet_extremes.*1.5"),
                          (["--supernet-extremes", "0.5", "--supernet-epochs", "0"], "supernet_extremes=0.5.*needs"),
                          (["--supernet-sampling", "layers"], "supernet-sampling.*layers"),
                          (["--supernet-sampling", "budget", "--flops-target", "none"],
                           "supernet_sampling 'budget'.*--flops-target"),
                          (["--capacity-weight", "-1", "--flops-target", "0.5"], "capacity_weight.*-1"),
                          (["--capacity-weight", "0.5", "--flops-target", "none"], "capacity_weight=0.5.*needs"),
                          (["--finalists", "-1"], "finalists must be >= 0"),
                          (["--policy-start", "warm"], "policy-start.*warm"),
                          (["--policy-start", "uniform", "--flops-target", "none"],
                           "policy_start 'uniform'.*--flops-target.*None"),
                          (["--policy-start", "uniform", "--algo", "sac"], "policy_start 'uniform'.*'sac'"),
                          (["--env", "input", "--policy-start", "uniform"], "policy_start.*layer env only"),
                          (["--finalists", "2", "--flops-target", "0.5", "--latency-target", "0.6"],
                           "finalists=2.*latency"),
                          (["--flops-target", "0.01"], "flops_target"), (["--dataset", "mnist:/nonexistent"],
                                                                          "nonexistent"),
                          (["--hyperparameters", '{"foo": 1}'], "foo"), (["--device", "bogus"], "bogus"),
                          (["--hyperparameters", '{"learning_rate": "abc"}'], "learning_rate.*abc"),
                          (["--hyperparameters", '{"n_steps": 0}'], "n_steps"),
                          (["--seed", "-1"], "seed must be an integer.*-1"), (["--seed", "1e20"], "--seed.*1e20"),
                          (["--seed", str(2**40)], "seed must be an integer"),
                          (["--model", "json:loads"], "json:loads.*failed")])
def test_bad_values_fail_naming_them(tmp_path, capsys, args, pattern):
    target = tmp_path / "run"
    status, stderr = train_in_process(capsys, "--run-dir", str(target), *TINY, *args)
    assert status == 2
    assert re.search(pattern, stderr), stderr
    assert not target.exists()  # nothing is written for a run that cannot start


def test_a_run_dir_that_is_a_file_is_refused_by_name(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    result = run_train("--run-dir", str(target), *TINY)
    assert result.returncode == 2 and f"{target} is a file" in result.stderr and "Traceback" not in result.stderr
    assert target.read_text() == "x"


def test_resume_without_config_fails_naming_it(tmp_path):
    target = tmp_path / "not_a_run"
    target.mkdir()
    result = run_train("--run-dir", str(target), "--resume", "--timesteps", "64")
    assert result.returncode != 0
    assert "config.json" in result.stderr
    assert str(target) in result.stderr


def test_resume_continues_the_timestep_count(tmp_path):
    target = tmp_path / "run"
    ok(run_train("--run-dir", str(target), *TINY))
    first, _ = load_agent(target, device="cpu")
    assert first.num_timesteps == 64
    first_seconds = json.loads((target / "checkpoints" / "state.json").read_text())["callback"]["seconds"]
    assert 0 < first_seconds <= json.loads((target / "report.json").read_text())["search"]["seconds"]

    result = ok(run_train("--run-dir", str(target), "--resume", "--timesteps", "128"))
    assert "resuming" in result.stdout
    agent, _ = load_agent(target, device="cpu")
    assert agent.num_timesteps == 128
    report = json.loads((target / "report.json").read_text())
    assert report["search"]["timesteps"] == 128
    state = json.loads((target / "checkpoints" / "state.json").read_text())
    assert state["num_timesteps"] == 128
    assert state["callback"]["episodes"] == 128 // len(report["search"]["groups"])
    assert state["callback"]["seconds"] > first_seconds  # the search's time counts both runs
    assert report["search"]["seconds"] > first_seconds
    # the search logs to the same TensorBoard run, and its steps continue past the first run's
    assert len({f.parent for f in (target / "tb").rglob("events.out.tfevents.*")}) == 1


def test_resume_without_timesteps_keeps_the_saved_total(run_dir, tmp_path, monkeypatch):

    target = tmp_path / "run"
    target.mkdir()
    shutil.copy(run_dir / "config.json", target / "config.json")  # a run started with --timesteps 64
    seen = {}

    class Stop(Exception):
        pass

    def validate(self):
        seen["timesteps"] = self.timesteps
        raise Stop

    monkeypatch.setattr(TrainConfig, "validate", validate)
    with pytest.raises(Stop):
        train_script().main(["--run-dir", str(target), "--resume"])
    assert seen["timesteps"] == 64


def test_resume_refuses_flags_that_would_change_the_saved_config(run_dir, tmp_path):
    result = run_train("--run-dir", str(run_dir), "--resume", "--lam", "3")
    assert result.returncode != 0
    assert "--lam" in result.stderr


def test_resume_of_a_moved_run_dir_continues_it(run_dir, tmp_path):
    original = tmp_path / "original"
    ok(run_train("--run-dir", str(original), *TINY))
    moved = tmp_path / "moved"
    original.rename(moved)
    result = run_train("--run-dir", str(moved), "--resume", "--timesteps", "64")
    assert result.returncode == 0, result.stderr
    assert not original.exists()
    assert (moved / "report.json").is_file()


# ---- loading the run back ------------------------------------------------------------------------
def test_load_inference_model(run_dir, report):
    model = load_inference_model(run_dir)
    assert isinstance(model, torch.nn.Module)
    assert not model.training
    splits = load_dataset(TrainConfig().dataset, 0)
    x = splits.test.x[:16]
    with torch.no_grad():
        out = model(x)
    assert out.shape == (16, splits.num_classes)
    assert count_flops(model, x[:1]) == report["results"]["rl"]["flops"]
    assert count_params(model) == report["results"]["rl"]["params"]


def test_the_pruned_model_loads_without_gymnasium_or_sb3(run_dir, report):
    code = (
        "import sys\n"
        "sys.modules['gymnasium'] = sys.modules['stable_baselines3'] = None  # importing them now fails\n"
        "from prunegym.compression import count_flops, load_checkpoint, load_dataset\n"
        f"model, _, _ = load_checkpoint({str(run_dir / 'model.pt')!r})\n"
        "print(count_flops(model, load_dataset('digits', 0).test.x[:1]))\n"
    )
    result = ok(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120))
    assert int(result.stdout.split()[-1]) == report["results"]["rl"]["flops"]


def test_load_inference_model_of_an_incomplete_run_raises(run_dir, tmp_path):
    shutil.copy(run_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_inference_model(tmp_path)


def test_a_run_without_its_report_is_not_loaded(run_dir, tmp_path):
    # A run whose report is missing (resumed, or stopped while finishing) may hold outdated files.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.json").unlink()
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_inference_model(copy)


def test_train_refuses_to_resume_with_other_settings(run_dir):
    from prunegym.agents import load_config, train

    config = load_config(run_dir)
    config.run_dir = str(run_dir)
    config.lam = config.lam + 1
    with pytest.raises(ValueError, match="lam"):
        train(config, resume=True)


def test_load_inference_model_of_a_non_run_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_inference_model(tmp_path)


def test_load_agent_rebuilds_its_env(run_dir):
    agent, env_kwargs = load_agent(run_dir, device="cpu")
    assert agent.num_timesteps == 64
    assert env_kwargs["base_epochs"] == 2
    env = gymnasium.make(LAYER_PRUNING_ID, **env_kwargs)
    obs, _ = env.reset(seed=0)
    done, steps = False, 0
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        obs, reward, done, _, info = env.step(action)
        steps += 1
    assert steps == env.unwrapped.num_groups
    # The main job's default reward: within the FLOPs budget, minus the reward split's error rate.
    assert reward == pytest.approx(-(1 - info["accuracy"]), abs=1e-12)
    env.close()


def test_load_agent_of_a_stopped_run_uses_its_latest_checkpoint(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    (target / "agent.zip").unlink()
    agent, _ = load_agent(target, device="cpu")
    assert agent.num_timesteps == 64


def test_reward_finetune_steps_reach_the_env_and_its_reloaded_twin(prunegym_cache, tmp_path):
    """--reward-finetune-steps becomes the env's finetune_steps; the env load_agent rebuilds prices
    the best search episode's widths as the search did."""
    target = tmp_path / "run"
    ok(run_train("--run-dir", str(target), "--timesteps", "16", "--finetune-epochs", "1", "--base-epochs", "2",
                 "--device", "cpu", "--reward-finetune-steps", "2"))
    config = json.loads((target / "config.json").read_text())
    assert config["config"]["reward_finetune_steps"] == 2
    assert config["env_kwargs"]["finetune_steps"] == 2
    report = json.loads((target / "report.json").read_text())
    _, env_kwargs = load_agent(target, device="cpu")
    env = gymnasium.make(LAYER_PRUNING_ID, **env_kwargs).unwrapped
    assert env.finetune_steps == 2
    counts = [round(r * n) for r, n in zip(report["results"]["rl"]["keep_ratios"], env.graph.num_channels,
                                           strict=True)]
    assert env.evaluate_counts(counts)["accuracy"] == report["search"]["reward_split_accuracy"]
    env.close()


def test_finalists_keep_the_lowest_fine_tuned_loss_of_the_best_allocations(tmp_path, capsys):
    target = tmp_path / "run"
    status, stderr = train_in_process(capsys, "--run-dir", str(target), *TINY, "--flops-target", "0.5",
                                      "--finalists", "3", "--dataset", "digits", "--task-loss", "cross_entropy")
    assert status == 0, stderr
    report = json.loads((target / "report.json").read_text())
    finalists = report["search"]["finalists"]
    losses = [f["reward_split_loss"] for f in finalists["candidates"]]
    assert len(losses) == 3 and finalists["chosen"] == losses.index(min(losses))
    rewards = [f["reward"] for f in finalists["candidates"]]
    assert rewards == sorted(rewards, reverse=True)  # the best three by reward
    assert len({tuple(f["keep_counts"]) for f in finalists["candidates"]}) == 3
    kept = finalists["candidates"][finalists["chosen"]]
    model = load_inference_model(target, fold_bn=False)
    splits = load_dataset("digits", 0)
    assert report["results"]["rl"]["flops_ratio"] == pytest.approx(kept["flops_ratio"], rel=1e-6)
    assert report["search"]["best_reward"] == kept["reward"]
    with torch.no_grad():  # the finalist's fine-tuned model is the one saved, not another fine-tune of it
        loss = torch.nn.functional.cross_entropy(model(splits.reward.x), splits.reward.y).item()
    assert loss == pytest.approx(kept["reward_split_loss"], rel=1e-4)


def test_parallel_envs_search_and_resume_continues_the_timestep_count(tmp_path):
    target = tmp_path / "run"
    ok(run_train("--run-dir", str(target), "--num-envs", "2", *TINY))
    first, _ = load_agent(target, device="cpu")
    assert first.num_timesteps == 64 and first.n_envs == 2
    ok(run_train("--run-dir", str(target), "--resume", "--timesteps", "128"))
    agent, _ = load_agent(target, device="cpu")
    assert agent.num_timesteps == 128
    report = json.loads((target / "report.json").read_text())
    assert report["search"]["timesteps"] == 128
    assert report["search"]["episodes"] == 128 // len(report["search"]["groups"])
    assert json.loads((target / "config.json").read_text())["config"]["num_envs"] == 2


def test_parallel_copies_keep_one_envs_rollout_and_update_sizes():
    from prunegym.agents.factory import default_hyperparameters

    for algo in ("ppo", "a2c"):
        one, two = default_hyperparameters(algo, 4, 4), default_hyperparameters(algo, 4, 4, num_envs=2)
        assert two["n_steps"] * 2 == one["n_steps"]
        assert two.get("batch_size") == one.get("batch_size")
    assert default_hyperparameters("sac", 4, 4, num_envs=2)["gradient_steps"] == 2
    batched = default_hyperparameters("ppo", 4, None, num_envs=64, batched=True)
    assert batched["n_steps"] == 16 and batched["ent_coef"] > 0  # the per-input env's many inputs


def test_num_envs_is_checked_and_old_layer_runs_load_with_one(tmp_path):
    from prunegym.agents.config import TrainConfig, load_config

    with pytest.raises(ValueError, match="num_envs must be >= 1, got 0"):
        TrainConfig(num_envs=0).validate()
    with pytest.raises(ValueError, match="num_envs=2: a latency-priced search"):
        TrainConfig(num_envs=2, density="latency").validate()
    config = TrainConfig()
    config.resolve_defaults()
    assert config.num_envs == 1 and TrainConfig(env="input").num_envs is None
    old = tmp_path / "old"
    old.mkdir()  # config.json of a layer run written before num_envs applied to the layer env
    (old / "config.json").write_text(json.dumps({"config": {"env": "layer", "num_envs": 64, "timesteps": 64}}))
    assert load_config(old).num_envs == 1
    assert load_config(old).task_loss == "cross_entropy"  # what it ran with before the setting existed
    assert load_config(old).importance == "l1"


def test_importance_defaults_per_env_and_a_given_one_stays():
    """The supernet's channel order defaults to group L1 for the layer env (measured against L1 there) and
    to L1 for the input env; a criterion given is kept for either."""
    from prunegym.agents.config import TrainConfig

    for env, expected in (("layer", "group_l1"), ("input", "l1")):
        config = TrainConfig(env=env)
        config.validate()
        assert config.importance == expected
        for given in ("l1", "group_l1", "bn_scale"):
            config = TrainConfig(env=env, importance=given)
            config.validate()
            assert config.importance == given
    with pytest.raises(ValueError, match="importance 'taylor' is unknown"):
        TrainConfig(importance="taylor").validate()


def test_settings_given_are_resolved_as_the_main_job_reads_them():
    from prunegym.agents.config import resolve_given

    config = TrainConfig(latency_target=0.5)
    resolve_given(config, {"latency_target"})  # a latency budget alone: no FLOPs budget besides it
    assert (config.flops_target, config.latency_target) == (None, 0.5)
    config = TrainConfig(latency_target=0.5, flops_target=0.4)
    resolve_given(config, {"latency_target", "flops_target"})
    assert config.flops_target == 0.4
    config = TrainConfig(flops_target=None, lam=2.0, density="params")
    resolve_given(config, {"flops_target", "lam", "density"})  # no budget: λ prices density
    with pytest.raises(ValueError, match=r"\['density', 'lam'\] price density only without a budget"):
        resolve_given(TrainConfig(lam=2.0, density="params"), {"lam", "density"})
    with pytest.raises(ValueError, match=r"\['task_loss'\] apply to the layer env only"):
        resolve_given(TrainConfig(env="input"), {"task_loss"})
