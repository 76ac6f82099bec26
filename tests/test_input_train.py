"""Tests for the per-input job end to end: ``scripts/train.py --env input`` run as a user runs it (a subprocess,
tiny budgets), its run directory loaded back (the policy-gated and the gate models, the agent), the policy-gated
model deciding exactly as the agent does, resuming, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ok, run_train, train_in_process
from stable_baselines3 import DQN

from prunegym.agents import TrainConfig, load_agent, load_inference_model, make_agent
from prunegym.compression import load_dataset
from prunegym.compression.dynamic import DynamicNetwork, evaluate_dynamic
from prunegym.compression.gates import dynamic_inference
from prunegym.envs import INPUT_PRUNING_ID, InputPruningEngine, InputPruningEnv, LayerPruningEnv, make_setup

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
TIMESTEPS = 2048
TINY = ["--env", "input", "--timesteps", str(TIMESTEPS), "--base-epochs", "2", "--finetune-epochs", "1",
        "--num-envs", "16", "--checkpoint-freq", "512", "--device", "cpu"]
MEASURES = ("test_accuracy", "density_mean", "density_std", "latency_b1_ms", "latency_b64_ms")
LAYERS = 4  # digits_cnn: every conv is gated


@pytest.fixture(scope="module")
def run_dir(prunegym_cache, tmp_path_factory) -> Path:
    """One finished tiny per-input run, shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("train_input") / "run"
    ok(run_train("--run-dir", str(path), *TINY))
    return path


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def splits():
    return load_dataset(TrainConfig().dataset, 0)  # the run's: the main job's default


@pytest.fixture(scope="module")
def agent_and_setup(run_dir):
    """The trained agent and the run's setup as the search saw it: the base model, not yet fine-tuned."""
    agent, kwargs = load_agent(run_dir, device="cpu")
    setup_kwargs = {k: v for k, v in kwargs.items() if k not in ("lam", "density")}
    return agent, kwargs, make_setup(**setup_kwargs)


# ---- the run directory ---------------------------------------------------------------------------
def test_run_dir_holds_everything(run_dir):
    for name in ("config.json", "report.json", "agent.zip", "model.pt", "gate.pt", "checkpoints/state.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "uniform.pt").exists()  # the static run's baseline is not part of this job
    assert list((run_dir / "tb").rglob("events.out.tfevents.*"))
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["num_timesteps"] == TIMESTEPS
    assert (run_dir / "checkpoints" / state["agent"]).is_file()
    assert state["callback"]["episodes"] == TIMESTEPS // LAYERS
    # saved by timesteps (every 512; a step of the 16 envs adds 16), the latest two kept
    steps = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("agent_*_steps.zip"))
    assert steps == [TIMESTEPS - 512, TIMESTEPS]


def test_config_json_records_the_arguments(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["env_id"] == INPUT_PRUNING_ID == "prunegym/InputPruning-v0"
    assert config["config"]["env"] == "input"
    assert config["config"]["timesteps"] == TIMESTEPS
    assert config["config"]["num_envs"] == 16
    assert config["config"]["groups"] == 4
    assert config["config"]["checkpoint_freq"] == 512
    assert config["env_kwargs"]["model"] == "digits_cnn"
    assert config["env_kwargs"]["groups"] == 4
    assert "flops_target" not in config["env_kwargs"]  # a layer-env keyword


def test_report_json(report):
    assert report["env"] == "input"
    results = report["results"]
    assert set(results) >= {"dense", "rl", "gate"}
    for name in ("dense", "rl", "gate"):
        for key in MEASURES:
            assert key in results[name], (name, key)
        assert 0.0 <= results[name]["test_accuracy"] <= 1.0
        assert results[name]["latency_b1_ms"] > 0 and results[name]["latency_b64_ms"] > 0
        assert results[name]["density_std"] >= 0
    assert results["dense"]["density_mean"] == 1.0
    for name in ("rl", "gate"):
        r = results[name]
        assert 0 < r["density_mean"] <= 1, name
        assert len(r["keep_ratio_mean"]) == LAYERS
        assert 0 < r["density_latency_inputs"] <= 1
        assert r["latency_over_density_b1"] == pytest.approx(r["latency_ratio_b1"] / r["density_latency_inputs"])
    assert report["search"]["timesteps"] == TIMESTEPS
    assert report["search"]["episodes"] == TIMESTEPS // LAYERS
    assert report["search"]["layers"] == ["features.0", "features.3", "features.7", "features.10"]
    assert 0 < report["gate"]["target_density"] <= 1


def test_format_input_report(report):
    from prunegym.agents.run_input import format_input_report

    text = format_input_report(report)
    lines = text.splitlines()
    assert "test acc" in lines[0] and "density" in lines[0]
    for name in ("dense", "rl", "gate"):
        row = next(line for line in lines if line.split()[:1] == [name])
        assert f"{report['results'][name]['test_accuracy']:.4f}" in row
        assert f"{report['results'][name]['density_mean']:.3f}" in row
    assert report["notes"] in text


def test_tensorboard_has_pruning_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for directory in {f.parent for f in (run_dir / "tb").rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(directory))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    for tag in ("pruning/episode_reward", "pruning/accuracy", "pruning/density", "pruning/keep_ratio/00_features.0"):
        assert tag in tags, sorted(tags)
    assert {f"pruning/keep_ratio/{t:02d}_{name}" for t, name in
            enumerate(["features.0", "features.3", "features.7", "features.10"])} <= tags


# ---- loading the run back ------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "result"), [("model", "rl"), ("gate", "gate")])
def test_load_inference_model_reproduces_the_report(run_dir, report, splits, name, result):
    model = load_inference_model(run_dir) if name == "model" else load_inference_model(run_dir, name)
    assert isinstance(model, torch.nn.Module) and isinstance(model, DynamicNetwork)
    assert not model.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        out = model(splits.test.x[:16])
    assert out.shape == (16, splits.num_classes)
    evaluated = evaluate_dynamic(model, splits.test.x, splits.test.y)
    assert evaluated["accuracy"] == pytest.approx(report["results"][result]["test_accuracy"], abs=1e-6)
    assert evaluated["density_mean"] == pytest.approx(report["results"][result]["density_mean"], abs=1e-6)
    assert evaluated["density_std"] == pytest.approx(report["results"][result]["density_std"], abs=1e-6)


def test_loading_a_missing_name_says_what_the_run_has(run_dir):
    with pytest.raises(FileNotFoundError, match=r"uniform\.pt") as caught:
        load_inference_model(run_dir, "uniform")
    assert "gate" in str(caught.value) and "model" in str(caught.value)


def test_the_models_load_without_gymnasium_or_sb3(run_dir):
    code = (
        "import sys\n"
        "sys.modules['gymnasium'] = sys.modules['stable_baselines3'] = None  # importing them now fails\n"
        "from prunegym.agents import load_inference_model\n"
        "from prunegym.compression import load_dataset\n"
        "x = load_dataset('digits', 0).test.x[:5]\n"
        "for name in ('model', 'gate'):\n"
        f"    print(tuple(load_inference_model({str(run_dir)!r}, name)(x).shape))\n"
        "print('gymnasium' in sys.modules and sys.modules['gymnasium'] is not None)\n"
    )
    result = ok(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120))
    assert result.stdout.split("\n")[:3] == ["(5, 10)", "(5, 10)", "False"]


# ---- the policy-gated model decides as the agent does --------------------------------------------
def _predicted_episode(agent, env, net, train_x, seed: int) -> dict:
    """One env episode acted by ``agent.predict(deterministic=True)``; then ``net`` runs on the same
    input, so its ``last_actions`` can be compared with the episode's. Returns the final info."""
    obs, info = env.reset(seed=seed)
    done = False
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        obs, _, done, _, info = env.step(action)
    with torch.no_grad():
        net(train_x[info["index"]: info["index"] + 1])
    return info


def _policy_net(agent, setup) -> DynamicNetwork:
    from prunegym.agents import PolicyDecider

    return dynamic_inference(setup.model, setup.spec, PolicyDecider.from_agent(agent, setup.stats))


def test_policy_gated_actions_equal_agent_predict(agent_and_setup):
    agent, kwargs, setup = agent_and_setup
    assert agent.num_timesteps == TIMESTEPS
    env = InputPruningEnv(lam=kwargs["lam"], density=kwargs["density"], setup=setup)
    net = _policy_net(agent, setup)
    train_x = setup.splits.train.x
    seen = set()
    for seed in range(100):
        info = _predicted_episode(agent, env, net, train_x, seed)
        assert [int(a) for a in net.last_actions] == info["actions"], (seed, info["index"])
        assert float(net.last_density) == pytest.approx(info["flops_ratio"], abs=1e-6)
        seen.add(tuple(info["actions"]))
    assert len(seen) > 1  # the policy decides per input, not once for all


def test_load_agent_env_kwargs_make_the_env(run_dir, agent_and_setup):
    import gymnasium

    agent, kwargs, _ = agent_and_setup
    env = gymnasium.make(json.loads((run_dir / "config.json").read_text())["env_id"], **kwargs)
    obs, _ = env.reset(seed=0)
    done, steps = False, 0
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        obs, reward, done, _, info = env.step(action)
        steps += 1
    assert steps == LAYERS
    assert reward == pytest.approx(-info["loss"] - kwargs["lam"] * info["density"], abs=1e-9)
    env.close()


def test_policy_gated_batch_equals_per_input_predictions(agent_and_setup):
    agent, kwargs, setup = agent_and_setup
    batch = 64
    engine = InputPruningEngine(setup, batch, kwargs["lam"], kwargs["density"])
    obs = engine.reset([np.random.default_rng(1000 + i) for i in range(batch)])
    done = False
    while not done:
        actions, _ = agent.predict(obs, deterministic=True)  # one row per input
        obs, _, done, infos = engine.step(actions)
    expected = torch.tensor([info["actions"] for info in infos])
    index = torch.tensor([info["index"] for info in infos])
    assert len(set(map(tuple, expected.tolist()))) > 1  # a mixed batch
    net = _policy_net(agent, setup)
    x = setup.splits.train.x[index]
    with torch.no_grad():
        out = net(x)
        decided = torch.stack([torch.as_tensor(a).expand(batch) for a in net.last_actions], dim=1)
        loop = net(x, mode="loop")
    assert torch.equal(decided, expected)
    torch.testing.assert_close(out, loop, atol=1e-4, rtol=0)


# ---- resuming ------------------------------------------------------------------------------------
def test_resume_with_more_timesteps_continues(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    (target / "report.json").write_text("{}")  # a marker: the resumed run writes its own
    more = TIMESTEPS + 1024
    result = ok(run_train("--run-dir", str(target), "--resume", "--timesteps", str(more)))
    assert "resuming" in result.stdout
    state = json.loads((target / "checkpoints" / "state.json").read_text())
    assert state["num_timesteps"] == more
    assert state["callback"]["episodes"] == more // LAYERS
    report = json.loads((target / "report.json").read_text())
    assert report["search"]["timesteps"] == more
    assert set(report["results"]) >= {"dense", "rl", "gate"}
    config = json.loads((target / "config.json").read_text())
    assert config["config"]["timesteps"] == more
    for name in ("agent.zip", "model.pt", "gate.pt"):
        assert (target / name).is_file(), name
    assert len({f.parent for f in (target / "tb").rglob("events.out.tfevents.*")}) == 1


# ---- export ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load
def test_export_writes_a_scripted_per_input_model_that_decides_as_the_run_does(run_dir, tmp_path):
    out = tmp_path / "export"
    result = ok(subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), "--run-dir", str(run_dir),
                                "--out", str(out)], capture_output=True, text=True, timeout=300))
    assert "skipping onnx" in result.stdout and "decision paths" in result.stdout
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    net = load_inference_model(run_dir)
    scales = torch.logspace(-1, 1, 16).view(-1, 1, 1, 1)  # inputs whose features move the decisions
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * scales
    with torch.no_grad():
        expected = net(x, mode="loop")
        logits, actions, density = scripted(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(actions, torch.stack([torch.as_tensor(a) for a in net.last_actions], dim=1))
    torch.testing.assert_close(density, net.last_density.double())
    refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), "--run-dir", str(run_dir),
                              "--format", "onnx", "--out", str(tmp_path / "onnx")], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "ONNX is not offered" in refused.stderr


# ---- command-line behaviour ----------------------------------------------------------------------
def test_help_mentions_the_input_flags():
    result = ok(run_train("--help"))
    for flag in ("--env", "--groups", "--num-envs"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize(("args", "pattern"), [
    (["--algo", "sac"], "sac"), (["--flops-target", "0.5"], "flops_target"), (["--groups", "1"], "groups"),
    (["--density", "params"], "params"), (["--num-envs", "0"], "num_envs"), (["--finalists", "2"], "finalists"),
])
def test_bad_input_options_exit_2_naming_them(tmp_path, capsys, args, pattern):
    target = tmp_path / "run"
    status, stderr = train_in_process(capsys, "--run-dir", str(target), *TINY, *args)
    assert status == 2, stderr
    assert pattern in stderr, stderr
    assert not target.exists()  # nothing is written for a run that cannot start


def test_an_unknown_env_is_an_argparse_error(tmp_path):
    target = tmp_path / "run"
    result = run_train("--run-dir", str(target), "--env", "bogus")
    assert result.returncode == 2
    assert "--env" in result.stderr and "bogus" in result.stderr and "invalid choice" in result.stderr
    assert not target.exists()


def test_timesteps_default_per_env():
    config = TrainConfig(env="input")
    assert config.timesteps is None
    config.validate()
    assert config.timesteps == 200_000
    assert (config.flops_target, config.task_loss) == (None, "cross_entropy")  # the layer env's defaults unused
    layer = TrainConfig()
    layer.validate()
    assert layer.timesteps == 6000
    given = TrainConfig(env="input", timesteps=100)
    given.validate()
    assert given.timesteps == 100


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"algo": "td3"}, "td3"), ({"min_keep": 0.5}, "min_keep"), ({"channel_multiple": 8}, "channel_multiple"),
    ({"groups": 0}, "groups"), ({"env": "bogus"}, "bogus"), ({"reward_finetune_steps": 5}, "reward_finetune_steps"),
])
def test_train_config_rejects_layer_only_and_bad_options(kwargs, match):
    config = TrainConfig(**{"env": "input", **kwargs})
    with pytest.raises(ValueError, match=match):
        config.validate()


# ---- DQN -----------------------------------------------------------------------------------------
def test_make_agent_builds_a_dqn_for_the_input_env(agent_and_setup):
    _, _, setup = agent_and_setup
    agent = make_agent("dqn", InputPruningEnv(setup=setup), episode_length=LAYERS, device="cpu")
    assert isinstance(agent, DQN)
    assert agent.gamma == 1.0


def test_a_dqn_actor_decides_as_the_dqn_predicts(agent_and_setup):
    """The policy-gated model of a DQN takes the argmax of its Q-values: what predict(deterministic) does."""
    _, _, setup = agent_and_setup
    env = InputPruningEnv(setup=setup)
    agent = make_agent("dqn", env, episode_length=LAYERS, device="cpu", hyperparameters={"learning_starts": 40})
    agent.learn(160)
    net = _policy_net(agent, setup)
    for seed in range(20):
        info = _predicted_episode(agent, env, net, setup.splits.train.x, seed)
        assert [int(a) for a in net.last_actions] == info["actions"], seed


def test_make_agent_refuses_dqn_for_a_continuous_action(prunegym_cache):
    env = LayerPruningEnv(base_epochs=2)
    with pytest.raises(ValueError, match="dqn"):
        make_agent("dqn", env, episode_length=3)
    env.close()
