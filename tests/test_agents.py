"""Tests for prunegym.agents' factory and callbacks: every algorithm learns a few hundred steps on the pruning
env, ``pruning/*`` scalars reach TensorBoard, checkpoints rotate and name a complete agent."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from stable_baselines3.common.monitor import Monitor
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prunegym.agents import ALGORITHMS, PruningCallback, ResumableCheckpointCallback, latest_checkpoint, make_agent
from prunegym.agents.factory import start_policy_at
from prunegym.compression.checkpoint import read_json, write_json
from prunegym.envs import LayerPruningEnv

SMALL = {"base_epochs": 2}
OFF_POLICY = {"learning_starts": 20}


@pytest.fixture(scope="module")
def env(prunegym_cache):
    env = LayerPruningEnv(**SMALL)
    yield env
    env.close()


@pytest.fixture(scope="module")
def discrete_env(prunegym_cache):
    env = LayerPruningEnv(**SMALL, action_levels=5)
    yield env
    env.close()


def _group_names(env: LayerPruningEnv) -> list[str]:
    return [g.name for g in env.graph.groups]


def _scalars(log_dir) -> dict[str, list[float]]:
    """Every scalar of every event file under ``log_dir``, by tag."""
    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {log_dir}"
    scalars: dict[str, list[float]] = {}
    for directory in sorted({f.parent for f in files}):
        accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return scalars


def _play(agent, env: LayerPruningEnv) -> dict:
    obs, _ = env.reset()
    done = False
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        assert env.action_space.contains(action)
        obs, _, done, _, info = env.step(action)
    return info


# ---- the factory ---------------------------------------------------------------------------------
def test_algorithms():
    assert set(ALGORITHMS) == {"ppo", "a2c", "sac", "td3", "ddpg", "dqn"}


@pytest.mark.parametrize(("algo", "timesteps", "hyper"),
                         [("ppo", 128, None), ("a2c", 128, None), ("sac", 200, OFF_POLICY),
                          ("td3", 200, OFF_POLICY), ("ddpg", 200, OFF_POLICY)])
def test_every_algorithm_learns_on_the_env(env, algo, timesteps, hyper):
    agent = make_agent(algo, env, episode_length=env.num_groups, seed=0, device="cpu", hyperparameters=hyper)
    assert isinstance(agent, ALGORITHMS[algo])
    assert agent.gamma == 1.0
    agent.learn(timesteps)
    assert agent.num_timesteps >= timesteps
    info = _play(agent, env)
    assert 0.0 < info["density"] <= 1.0


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_on_policy_algorithms_learn_on_discrete_actions(discrete_env, algo):
    agent = make_agent(algo, discrete_env, episode_length=discrete_env.num_groups, device="cpu")
    agent.learn(64)
    assert agent.num_timesteps >= 64
    assert "keep_counts" in _play(agent, discrete_env)


def test_hyperparameters_override_the_defaults(env):
    agent = make_agent("ppo", env, episode_length=env.num_groups, device="cpu",
                       hyperparameters={"n_steps": 8, "batch_size": 8, "gamma": 0.5})
    assert agent.n_steps == 8
    assert agent.batch_size == 8
    assert agent.gamma == 0.5


def test_ppo_updates_every_four_episodes_from_a_narrow_policy(env):
    agent = make_agent("ppo", env, episode_length=env.num_groups, device="cpu")
    assert agent.n_steps == agent.batch_size == 4 * env.num_groups  # one minibatch of four episodes
    assert torch.allclose(agent.policy.log_std, torch.tensor([-1.0]))  # std 0.37 at the start, not 1
    # a policy_kwargs given replaces the keys it names and keeps the others
    agent = make_agent("ppo", env, episode_length=env.num_groups, device="cpu",
                       hyperparameters={"policy_kwargs": {"net_arch": [16]}})
    assert torch.allclose(agent.policy.log_std, torch.tensor([-1.0]))
    assert agent.policy.mlp_extractor.policy_net[0].out_features == 16
    with pytest.raises(ValueError, match="policy_kwargs must be a JSON object, got \\[16\\]"):
        make_agent("ppo", env, episode_length=env.num_groups, device="cpu", hyperparameters={"policy_kwargs": [16]})


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_a_policy_started_at_an_action_proposes_it_at_every_step(env, discrete_env, algo):
    agent = make_agent(algo, env, episode_length=env.num_groups, device="cpu", seed=1)
    start_policy_at(agent, -0.5)
    obs, _ = env.reset()
    for _ in range(env.num_groups):  # the action net's weights start near 0: its bias is the mean
        action, _ = agent.predict(obs, deterministic=True)
        assert action[0] == pytest.approx(-0.5, abs=0.05)
        obs, *_ = env.step(action)
    with pytest.raises(ValueError, match=r"in \[-1, 1\], got 1.5"):
        start_policy_at(agent, 1.5)
    with pytest.raises(ValueError, match="only a ppo or a2c agent with a continuous action.*Discrete"):
        start_policy_at(make_agent(algo, discrete_env, episode_length=env.num_groups, device="cpu"), 0.0)
    with pytest.raises(ValueError, match="only a ppo or a2c agent.*SAC"):
        start_policy_at(make_agent("sac", env, episode_length=env.num_groups, device="cpu"), 0.0)


@pytest.mark.parametrize("algo", ["sac", "td3", "ddpg"])
def test_continuous_only_algorithms_reject_discrete_actions(discrete_env, algo):
    with pytest.raises(ValueError, match=algo):
        make_agent(algo, discrete_env, episode_length=discrete_env.num_groups, device="cpu")


def test_unknown_algo_raises(env):
    with pytest.raises(ValueError, match="bogus"):
        make_agent("bogus", env, episode_length=env.num_groups)


def test_bad_episode_length_raises(env):
    with pytest.raises(ValueError, match="episode_length"):
        make_agent("ppo", env, episode_length=0)


# ---- PruningCallback -----------------------------------------------------------------------------
def test_pruning_callback_writes_tensorboard_scalars(env, tmp_path):
    monitored = Monitor(env)
    agent = make_agent("ppo", monitored, episode_length=env.num_groups, seed=0, device="cpu",
                       tensorboard_log=str(tmp_path))
    callback = PruningCallback(_group_names(env), hparams={"lam": 1.0, "algo": "ppo", "hyperparameters": {}})
    agent.learn(128, callback=callback, tb_log_name="ppo")

    episode_rewards = monitored.get_episode_rewards()
    assert callback.episodes == len(episode_rewards) == 128 // env.num_groups
    assert callback.best is not None
    assert callback.best["reward"] == pytest.approx(max(episode_rewards), rel=1e-6)
    assert len(callback.best["keep_ratios"]) == env.num_groups
    assert callback.state_dict() == {"episodes": callback.episodes, "best": callback.best, "top": callback.top,
                                     "seconds": callback.seconds}
    assert callback.seconds > 0 and callback.seconds == callback.state_dict()["seconds"]  # stopped with training
    assert callback.top[0] == callback.best
    rewards = [e["reward"] for e in callback.top]
    assert rewards == sorted(rewards, reverse=True) and 1 <= len(rewards) <= 10
    assert len({tuple(e["keep_counts"]) for e in callback.top}) == len(callback.top)

    scalars = _scalars(tmp_path)
    for tag in ("pruning/episode_reward", "pruning/accuracy", "pruning/loss", "pruning/density",
                "pruning/flops_ratio", "pruning/best_reward"):
        assert tag in scalars, sorted(scalars)
    keep_tags = sorted(t for t in scalars if t.startswith("pruning/best_keep_ratio/"))
    assert len(keep_tags) == env.num_groups
    assert all(name in tag for name, tag in zip(_group_names(env), keep_tags, strict=True))
    assert scalars["pruning/best_reward"][-1] == pytest.approx(callback.best["reward"], rel=1e-6)
    assert max(scalars["pruning/episode_reward"]) <= callback.best["reward"] + 1e-6
    for tag, ratio in zip(keep_tags, callback.best["keep_ratios"], strict=True):
        assert scalars[tag][-1] == pytest.approx(ratio, rel=1e-6)
    assert all(0.0 <= d <= 1.0 for d in scalars["pruning/density"])


def test_pruning_callback_state_round_trip():
    first = PruningCallback(["a", "b"])
    first.episodes, first.best = 7, {"reward": -1.5, "keep_ratios": [0.5, 1.0], "keep_counts": [2, 4]}
    first.top = [first.best]
    second = PruningCallback(["a", "b"])
    first.resumed_seconds = 12.5  # as if it had searched that long before
    second.load_state_dict(first.state_dict())
    assert second.episodes == 7
    assert second.best == first.best and second.top == first.top
    assert second.seconds == second.resumed_seconds == 12.5
    older = PruningCallback(["a", "b"])  # a run saved before the top list and the seconds
    older.load_state_dict({"episodes": 7, "best": first.best})
    assert older.top == [first.best] and older.seconds == 0.0


def test_pruning_callback_keeps_the_best_distinct_allocations():
    callback = PruningCallback(["a", "b"], top=3)
    for reward, counts in [(-3, [1, 1]), (-1, [2, 2]), (-2, [1, 1]), (-5, [3, 3]), (-4, [4, 4]), (-1.5, [2, 2]),
                           (-0.5, [5, 5])]:
        callback._remember({"reward": reward, "keep_counts": counts})
    assert [(e["reward"], e["keep_counts"]) for e in callback.top] == [(-0.5, [5, 5]), (-1, [2, 2]), (-2, [1, 1])]
    with pytest.raises(ValueError, match="top must be an int >= 1, got 0"):
        PruningCallback(["a"], top=0)


# ---- ResumableCheckpointCallback and latest_checkpoint ------------------------------------------
def test_checkpoint_callback_keeps_two_complete_checkpoints(env, tmp_path):
    directory = tmp_path / "checkpoints"
    agent = make_agent("ppo", env, episode_length=env.num_groups, device="cpu")
    pruning = PruningCallback(_group_names(env))
    agent.learn(128, callback=[pruning, ResumableCheckpointCallback(directory, save_freq=16, pruning=pruning)])

    state = read_json(directory / "state.json")
    assert (directory / state["agent"]).is_file()
    assert state["num_timesteps"] == agent.num_timesteps
    saved, now = dict(state["callback"]), pruning.state_dict()
    assert 0 < saved.pop("seconds") <= now.pop("seconds")  # the search's time up to the checkpoint
    assert saved == now
    zips = sorted(directory.glob("agent_*.zip"))
    assert 1 <= len(zips) <= 2
    assert directory / state["agent"] in zips

    found = latest_checkpoint(directory)
    assert found is not None
    path, found_state = found
    assert path == directory / state["agent"]
    assert found_state == state
    loaded = ALGORITHMS["ppo"].load(path, device="cpu")
    assert loaded.num_timesteps == agent.num_timesteps


def test_checkpoint_callback_saves_the_replay_buffer_of_off_policy_agents(env, tmp_path):
    directory = tmp_path / "checkpoints"
    agent = make_agent("sac", env, episode_length=env.num_groups, device="cpu", hyperparameters=OFF_POLICY)
    pruning = PruningCallback(_group_names(env))
    agent.learn(48, callback=[pruning, ResumableCheckpointCallback(directory, save_freq=8, pruning=pruning)])
    state = read_json(directory / "state.json")
    assert (directory / state["replay_buffer"]).is_file()
    assert len(list(directory.glob("agent_*.zip"))) <= 2
    assert len(list(directory.glob("*_replay_buffer.pkl"))) <= 2


@pytest.mark.usefixtures("python_sigint")
def test_a_ctrl_c_while_a_checkpoint_is_written_stops_after_it(env, tmp_path, monkeypatch):
    """Cut short, torch's zip writer turns the KeyboardInterrupt into a RuntimeError and leaves a
    truncated zip; held, the checkpoint is whole and the run stops right after it."""
    from stable_baselines3.common import save_util

    torch_save = save_util.th.save
    pressed = []

    def interrupted_save(*args, **kwargs):
        if not pressed:  # once: a second Ctrl-C would stop at once
            pressed.append(True)
            signal.raise_signal(signal.SIGINT)
        return torch_save(*args, **kwargs)

    monkeypatch.setattr(save_util.th, "save", interrupted_save)
    directory = tmp_path / "checkpoints"
    agent = make_agent("ppo", env, episode_length=env.num_groups, device="cpu")
    pruning = PruningCallback(_group_names(env))
    with pytest.raises(KeyboardInterrupt):
        agent.learn(128, callback=[pruning, ResumableCheckpointCallback(directory, save_freq=16, pruning=pruning)])
    monkeypatch.undo()
    state = read_json(directory / "state.json")
    assert state["num_timesteps"] <= 32  # the first checkpoint, not one after the Ctrl-C
    assert sorted(p.name for p in directory.iterdir()) == sorted([state["agent"], "state.json"])
    assert ALGORITHMS["ppo"].load(directory / state["agent"], device="cpu").num_timesteps == state["num_timesteps"]


def test_latest_checkpoint_of_an_empty_dir_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


def test_latest_checkpoint_naming_a_missing_agent_raises(tmp_path):
    write_json(tmp_path / "state.json", {"agent": "agent_8_steps.zip", "num_timesteps": 8})
    with pytest.raises(FileNotFoundError, match="agent_8_steps.zip"):
        latest_checkpoint(tmp_path)


def test_checkpoint_callback_rejects_bad_save_freq(tmp_path):
    with pytest.raises(ValueError, match="save_freq"):
        ResumableCheckpointCallback(tmp_path, save_freq=0, pruning=PruningCallback([]))


def test_agents_are_reproducible_with_a_seed(env):
    infos = []
    for _ in range(2):
        agent = make_agent("a2c", env, episode_length=env.num_groups, seed=3, device="cpu")
        agent.learn(32)
        infos.append(_play(agent, env))
    assert infos[0]["keep_counts"] == infos[1]["keep_counts"]
    np.testing.assert_allclose(infos[0]["loss"], infos[1]["loss"])
