"""Tests for prunegym/InputPruning-v0 (envs/input_pruning.py) and its batched SB3 VecEnv (agents/vec_env.py)."""

from __future__ import annotations

import re
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces

from prunegym.agents.vec_env import BatchedInputPruningVecEnv
from prunegym.envs import INPUT_PRUNING_ID, InputPruningEnv, make_setup, observation_size

SMALL = {"base_epochs": 2}  # a briefly trained base model, cached per session
LAYERS = 4  # digits_cnn: every conv is gated
FINAL_KEYS = ("accuracy", "correct", "loss", "density", "flops", "flops_ratio", "actions", "keep_counts",
              "keep_ratios", "index")


@pytest.fixture(scope="module")
def setup(prunegym_cache):
    """One dynamic network for the whole module: every env below shares it."""
    return make_setup(**SMALL)


@pytest.fixture()
def env(setup):
    return InputPruningEnv(setup=setup)


def _episode(env: gymnasium.Env, actions, seed: int | None = None):
    """One episode; ``actions`` is one action for every step, or a function of the step index."""
    act = actions if callable(actions) else (lambda t: actions)
    obs, info = env.reset(seed=seed)
    traj = {"obs": [obs], "rewards": [], "terminated": [], "truncated": [], "infos": [info]}
    done, t = False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step(act(t))
        for key, value in (("obs", obs), ("rewards", reward), ("terminated", terminated),
                           ("truncated", truncated), ("infos", info)):
            traj[key].append(value)
        done = terminated or truncated
        t += 1
    return traj


def _random_actions(seed: int):
    rng = np.random.default_rng(seed)
    return lambda t: int(rng.integers(0, 4))


# ---- registration and checkers -------------------------------------------------------------------
def test_make_builds_the_env(prunegym_cache):
    env = gymnasium.make(INPUT_PRUNING_ID, **SMALL)
    assert INPUT_PRUNING_ID == "prunegym/InputPruning-v0"
    assert isinstance(env.unwrapped, InputPruningEnv)
    assert env.unwrapped.setup.net.spec.layers[0].name == "features.0"
    traj = _episode(env, 2, seed=0)
    assert len(traj["rewards"]) == LAYERS and traj["terminated"][-1]
    env.close()


def test_passes_gymnasium_and_sb3_checkers_without_warnings(setup):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gymnasium.make(INPUT_PRUNING_ID, setup=setup).unwrapped  # made, so it has a spec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env)
        sb3_check_env(env)
    assert [str(w.message) for w in caught] == []


def test_spaces(env, setup):
    width = max(layer.in_channels for layer in setup.spec.layers)
    assert width == 32
    assert env.observation_space.shape == (width + LAYERS + 1,) == (observation_size(setup.spec),)
    assert env.observation_space.dtype == np.float32
    assert env.action_space == spaces.Discrete(4)
    assert env.num_layers == LAYERS == len(setup.spec.layers)


# ---- episodes and rewards ------------------------------------------------------------------------
@pytest.mark.parametrize("actions", [0, 3, "random"])
def test_episode_structure_and_final_reward(env, actions):
    traj = _episode(env, _random_actions(1) if actions == "random" else actions, seed=3)
    assert len(traj["rewards"]) == LAYERS
    assert traj["rewards"][:-1] == [0.0] * (LAYERS - 1)
    assert traj["terminated"] == [False] * (LAYERS - 1) + [True]
    assert traj["truncated"] == [False] * LAYERS
    for obs in traj["obs"]:
        assert obs.shape == env.observation_space.shape and obs.dtype == np.float32
        assert env.observation_space.contains(obs)
    final = traj["infos"][-1]
    for key in FINAL_KEYS:
        assert key in final, key
    assert traj["rewards"][-1] == pytest.approx(-final["loss"] - 1.0 * final["density"], abs=1e-9)
    assert 0.0 < final["density"] <= 1.0
    assert final["loss"] > 0.0
    assert final["accuracy"] == float(final["correct"])
    assert final["flops"] == pytest.approx(final["flops_ratio"] * env.setup.spec.dense_flops)
    assert final["flops_ratio"] == pytest.approx(final["density"])  # density="flops"
    assert len(final["actions"]) == len(final["keep_counts"]) == len(final["keep_ratios"]) == LAYERS
    assert final["index"] == traj["infos"][0]["index"]
    counts = [layer.counts[a] for layer, a in zip(env.setup.spec.layers, final["actions"], strict=True)]
    assert final["keep_counts"] == counts
    # the final info describes what was really run: the logits of the dynamic network for that input
    x = env.setup.splits.train.x[final["index"]: final["index"] + 1]
    y = env.setup.splits.train.y[final["index"]: final["index"] + 1]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(env.setup.net(x, final["actions"]), y)
    assert final["loss"] == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
    if actions != "random":
        assert final["actions"] == [actions] * LAYERS
        for t in range(LAYERS - 1):
            assert traj["infos"][t + 1] == {"layer": t, "keep_count": counts[t]}


def test_all_max_actions_keep_density_one_and_fewer_actions_less(env):
    full = _episode(env, 3, seed=0)["infos"][-1]
    assert full["density"] == pytest.approx(1.0)
    assert full["keep_counts"] == [16, 32, 32, 64]
    assert full["keep_ratios"] == [1.0] * LAYERS
    densities = [_episode(env, a, seed=0)["infos"][-1]["density"] for a in range(4)]
    assert all(lo < hi for lo, hi in zip(densities, densities[1:], strict=False)), densities
    assert densities[0] < 0.2


def test_lam_changes_the_reward_by_exactly_lam_times_density(setup):
    free, costly = InputPruningEnv(lam=0.0, setup=setup), InputPruningEnv(lam=2.0, setup=setup)
    for seed in range(3):
        a = _episode(free, _random_actions(seed), seed=seed)
        b = _episode(costly, _random_actions(seed), seed=seed)
        info = a["infos"][-1]
        assert b["infos"][-1] == info
        assert a["rewards"][-1] == pytest.approx(-info["loss"], abs=1e-12)
        assert a["rewards"][-1] - b["rewards"][-1] == pytest.approx(2.0 * info["density"], abs=1e-12)


def test_channel_density(setup):
    env = InputPruningEnv(density="channels", setup=setup)
    info = _episode(env, _random_actions(4), seed=4)["infos"][-1]
    assert info["density"] == pytest.approx(sum(info["keep_counts"]) / (16 + 32 + 32 + 64))
    assert info["flops_ratio"] != pytest.approx(info["density"])


# ---- observations --------------------------------------------------------------------------------
def test_observation_position_and_spent_density(env):
    width = env.observation_space.shape[0] - LAYERS - 1
    for seed in range(3):
        traj = _episode(env, _random_actions(10 + seed), seed=seed)
        for t, obs in enumerate(traj["obs"][:LAYERS]):
            np.testing.assert_array_equal(obs[width: width + LAYERS], np.eye(LAYERS, dtype=np.float32)[t])
        spent = [obs[-1] for obs in traj["obs"]]
        assert spent[0] == 0.0  # the first conv is gated: nothing ran before it
        assert all(lo <= hi for lo, hi in zip(spent, spent[1:], strict=False)), spent
        terminal = traj["obs"][-1]
        assert terminal[-1] == pytest.approx(traj["infos"][-1]["density"], abs=1e-6)
        assert not terminal[:-1].any()
        assert np.abs(traj["obs"][0][:width]).max() > 0  # the input's features are there


def test_features_of_dropped_channels_enter_as_zeros(env):
    """With one channel group kept, the next layer reads 4 of its 16 input channels: the other 12 pool
    to 0 before standardising, and the 16 positions past its input width are padding."""
    width = env.observation_space.shape[0] - LAYERS - 1
    env.reset(seed=5)
    obs, *_ = env.step(0)
    mean, std = (t.numpy()[1] for t in env.setup.stats)
    np.testing.assert_allclose(obs[4:16], np.clip(-mean[4:16] / std[4:16], -10, 10), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(obs[16:width], 0.0)
    assert np.abs(obs[:4]).max() > 0


# ---- seeding -------------------------------------------------------------------------------------
def test_same_seed_same_trajectory(setup):
    trajectories = []
    for _ in range(2):
        env = InputPruningEnv(setup=setup)
        runs = [_episode(env, _random_actions(20), seed=7)] + [_episode(env, _random_actions(21 + k)) for k in range(2)]
        trajectories.append(runs)
    for a, b in zip(*trajectories, strict=True):
        for oa, ob in zip(a["obs"], b["obs"], strict=True):
            np.testing.assert_array_equal(oa, ob)
        assert a["rewards"] == b["rewards"]
        assert a["infos"] == b["infos"]


def test_different_seeds_draw_different_inputs(env):
    indices = [env.reset(seed=seed)[1]["index"] for seed in range(6)]
    assert len(set(indices)) == len(indices)
    assert all(0 <= i < len(env.setup.splits.train) for i in indices)
    # unseeded resets continue the stream: two episodes in a row draw (almost surely) different inputs
    env.reset(seed=0)
    assert len({env.reset()[1]["index"] for _ in range(4)}) > 1


# ---- API misuse ----------------------------------------------------------------------------------
def test_step_before_reset_raises(setup):
    env = InputPruningEnv(setup=setup)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def test_step_after_the_episode_ended_raises(env):
    _episode(env, 1, seed=0)
    with pytest.raises(RuntimeError, match="ended"):
        env.step(1)
    assert _episode(env, 1)["terminated"][-1]  # reset starts a fresh episode


@pytest.mark.parametrize("action", [5, 4, -1, 1.5, np.float32(2.0), [1, 2], "2"])
def test_bad_action_raises_naming_it(env, action):
    env.reset(seed=0)
    with pytest.raises(ValueError, match=re.escape(f"got {action!r}")):
        env.step(action)
    # a rejected action does not advance the episode
    rewards = [env.step(np.int64(2))[1] for _ in range(LAYERS)]
    assert rewards[-1] != 0.0
    with pytest.raises(RuntimeError):
        env.step(2)


def test_good_action_types(env):
    for action in (2, np.int64(2), np.array(2), np.array([2], dtype=np.int32)):
        traj = _episode(env, action, seed=0)
        assert traj["infos"][-1]["actions"] == [2] * LAYERS


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lam": -1}, r"lam.*-1"),
    ({"lam": float("nan")}, "lam"),
    ({"density": "params"}, r"density.*'params'"),
])
def test_bad_arguments_with_a_setup_raise_naming_them(setup, kwargs, match):
    with pytest.raises(ValueError, match=match):
        InputPruningEnv(setup=setup, **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"groups": 1}, r"groups.*got 1"),
    ({"groups": 2.5}, r"groups.*got 2.5"),
    ({"seed": "x"}, r"seed.*'x'"),
    ({"importance": "taylor"}, "'taylor'"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InputPruningEnv(**SMALL, **kwargs)


# ---- the batched VecEnv --------------------------------------------------------------------------
def _assert_infos_match(batched: dict, single: dict) -> None:
    assert batched.keys() == single.keys()
    for key, value in batched.items():
        if key == "terminal_observation":
            np.testing.assert_allclose(value, single[key], atol=1e-5)
        elif isinstance(value, float):
            assert value == pytest.approx(single[key], rel=1e-5, abs=1e-5), key
        else:
            assert value == single[key], key


@pytest.mark.parametrize("num_envs", [1, 3])
def test_batched_vec_env_matches_dummy_vec_env(setup, num_envs):
    from stable_baselines3.common.vec_env import DummyVecEnv

    batched = BatchedInputPruningVecEnv(num_envs, lam=0.5, setup=setup)
    dummy = DummyVecEnv([lambda: InputPruningEnv(lam=0.5, setup=setup) for _ in range(num_envs)])
    assert batched.observation_space == dummy.observation_space
    assert batched.action_space == dummy.action_space
    batched.seed(11)
    dummy.seed(11)
    obs_b, obs_d = batched.reset(), dummy.reset()
    np.testing.assert_allclose(obs_b, obs_d, atol=1e-5)
    assert batched.reset_infos == dummy.reset_infos
    rng = np.random.default_rng(12)
    episodes, first_indices = 0, [info["index"] for info in batched.reset_infos]
    for _ in range(3 * LAYERS):
        actions = rng.integers(0, 4, size=num_envs)
        obs_b, rew_b, done_b, infos_b = batched.step(actions)
        obs_d, rew_d, done_d, infos_d = dummy.step(actions)
        assert obs_b.shape == (num_envs, batched.observation_space.shape[0]) and obs_b.dtype == np.float32
        np.testing.assert_allclose(obs_b, obs_d, atol=1e-5)
        np.testing.assert_allclose(rew_b, rew_d, atol=1e-5)
        np.testing.assert_array_equal(done_b, done_d)
        for info_b, info_d in zip(infos_b, infos_d, strict=True):
            _assert_infos_match(info_b, info_d)
        if done_b.all():
            episodes += 1
            for info in infos_b:
                assert "terminal_observation" in info
                assert info["terminal_observation"][-1] == pytest.approx(info["density"], abs=1e-6)
            assert (rew_b != 0).all()
            # auto-reset: the returned observation starts the next episode
            assert (obs_b[:, -1] == 0).all() and (obs_b[:, -1 - LAYERS] == 1).all()
        else:
            assert not done_b.any() and (rew_b == 0).all()
            assert all("terminal_observation" not in info for info in infos_b)
    assert episodes == 3
    assert len({info["index"] for info in infos_b} | set(first_indices)) > 1
    batched.close()
    dummy.close()


def test_batched_vec_env_reset_infos_follow_auto_resets(setup):
    from stable_baselines3.common.vec_env import DummyVecEnv

    batched = BatchedInputPruningVecEnv(2, setup=setup)
    dummy = DummyVecEnv([lambda: InputPruningEnv(setup=setup) for _ in range(2)])
    batched.seed(3)
    dummy.seed(3)
    batched.reset()
    dummy.reset()
    for _ in range(LAYERS):
        batched.step(np.array([1, 2]))
        dummy.step(np.array([1, 2]))
    assert batched.reset_infos == dummy.reset_infos


def test_batched_vec_env_seeds_like_dummy_vec_env_after_reseeding(setup):
    """``seed`` then ``reset`` restarts every episode stream; an unseeded reset continues them."""
    batched = BatchedInputPruningVecEnv(2, setup=setup)
    batched.seed(5)
    first = batched.reset().copy()
    batched.reset()
    batched.seed(5)
    np.testing.assert_array_equal(batched.reset(), first)
    assert not np.array_equal(batched.reset(), first)


def test_batched_vec_env_trains_with_ppo(setup):
    from stable_baselines3 import PPO

    vec = BatchedInputPruningVecEnv(8, setup=setup)
    model = PPO("MlpPolicy", vec, n_steps=8, batch_size=32, n_epochs=2, seed=0, device="cpu",
                policy_kwargs={"net_arch": [32]})
    model.learn(512)
    assert model.num_timesteps >= 512
    # the spaces are the single env's: the policy runs there too
    env = InputPruningEnv(setup=setup)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        obs, reward, done, _, info = env.step(action)
    assert "density" in info
    vec.close()


@pytest.mark.parametrize("actions", [np.array([1, 2]), np.array([1, 2, 3, 4]), np.array([0, 1, 2]) - 1,
                                     np.array([4, 0, 0]), np.array([1.0, 2.0, 3.0])])
def test_batched_vec_env_rejects_bad_actions(setup, actions):
    vec = BatchedInputPruningVecEnv(3, setup=setup)
    vec.reset()
    with pytest.raises(ValueError, match="3 int"):
        vec.step(actions)
    obs, rewards, dones, _ = vec.step(np.array([1, 2, 3]))  # the episodes did not advance
    assert obs[0, -1 - LAYERS + 1] == 1.0 and not dones.any()


def test_batched_vec_env_step_before_reset_raises(setup):
    vec = BatchedInputPruningVecEnv(2, setup=setup)
    with pytest.raises(RuntimeError, match="reset"):
        vec.step(np.array([0, 0]))
    with pytest.raises(ValueError, match="num_envs"):
        BatchedInputPruningVecEnv(0, setup=setup)
