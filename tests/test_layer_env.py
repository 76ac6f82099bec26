"""Tests for prunegym/LayerPruning-v0: registration, the Gymnasium/SB3 checkers, episode structure, reward,
budget mode, argument validation, API misuse and models passed in as modules."""

from __future__ import annotations

import math
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces

from prunegym.compression import base_model, evaluate, load_dataset, prune_channels, train_classifier
from prunegym.compression.sparsity import uniform_keep_counts
from prunegym.envs import DENSITY_KINDS, LAYER_PRUNING_ID, OBSERVATION_FEATURES, LayerPruningEnv

SMALL = {"base_epochs": 2}  # every test not about accuracy: a briefly trained base model (cached per session)
FINAL_KEYS = ("accuracy", "loss", "density", "flops", "flops_ratio", "params", "keep_ratios", "keep_counts")


def _make(**kwargs) -> LayerPruningEnv:
    return gymnasium.make(LAYER_PRUNING_ID, **{**SMALL, **kwargs}).unwrapped


def _episode(env: gymnasium.Env, actions, seed: int | None = None):
    """Run one episode; ``actions`` is one action for every step, or a function of the step index."""
    act = actions if callable(actions) else (lambda t: actions)
    obs, info = env.reset(seed=seed)
    trajectory = {"obs": [obs], "rewards": [], "terminated": [], "truncated": [], "infos": [info]}
    done, t = False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step(act(t))
        for key, value in (("obs", obs), ("rewards", reward), ("terminated", terminated),
                           ("truncated", truncated), ("infos", info)):
            trajectory[key].append(value)
        done = terminated or truncated
        t += 1
    return trajectory


def _box(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float32)


@pytest.fixture(scope="module")
def default_env(prunegym_cache):
    """The env exactly as ``gymnasium.make(id)`` builds it: the fully trained digits CNN."""
    env = gymnasium.make(LAYER_PRUNING_ID)
    yield env
    env.close()


@pytest.fixture(scope="module")
def small_env(prunegym_cache):
    env = _make()
    yield env
    env.close()


# ---- registration and checkers -------------------------------------------------------------------
def test_import_registers_the_id():
    assert LAYER_PRUNING_ID == "prunegym/LayerPruning-v0"
    assert LAYER_PRUNING_ID in gymnasium.registry


def test_make_without_keywords_builds_the_digits_cnn(default_env):
    env = default_env.unwrapped
    assert isinstance(env, LayerPruningEnv)
    assert env.model.__class__.__name__ == "DigitsCNN"
    assert env.splits.name == "digits"
    assert env.num_groups >= 2
    dense = env.evaluate_counts(env.graph.num_channels)
    assert dense["accuracy"] > 0.8  # the default base model is really trained


def test_passes_gymnasium_and_sb3_checkers_without_warnings(default_env):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(default_env.unwrapped)
        sb3_check_env(default_env.unwrapped)
    assert [str(w.message) for w in caught] == []


def test_discrete_env_passes_checkers_without_warnings():
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = _make(action_levels=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env)
        sb3_check_env(env)
    assert [str(w.message) for w in caught] == []


# ---- spaces and episode structure ----------------------------------------------------------------
def test_spaces(default_env):
    env = default_env.unwrapped
    assert env.observation_space.shape == (11,) == (len(OBSERVATION_FEATURES),)
    assert env.observation_space.dtype == np.float32
    assert isinstance(env.action_space, spaces.Box)
    assert env.action_space.shape == (1,)
    np.testing.assert_array_equal(env.action_space.low, [-1.0])
    np.testing.assert_array_equal(env.action_space.high, [1.0])


@pytest.mark.parametrize("action", [-1.0, 0.0, 1.0, "random"])
def test_episode_structure(default_env, action):
    env = default_env.unwrapped
    rng = np.random.default_rng(0)
    act = (lambda t: rng.uniform(-1, 1, 1).astype(np.float32)) if action == "random" else _box(action)
    traj = _episode(default_env, act, seed=0)
    n = env.num_groups
    assert len(traj["rewards"]) == n
    for obs in traj["obs"]:
        assert obs.shape == (len(OBSERVATION_FEATURES),)
        assert obs.dtype == np.float32
        assert env.observation_space.contains(obs)
    assert traj["rewards"][:-1] == [0.0] * (n - 1)
    assert traj["terminated"] == [False] * (n - 1) + [True]
    assert traj["truncated"] == [False] * n
    final = traj["infos"][-1]
    for key in FINAL_KEYS:
        assert key in final, key
    assert len(final["keep_ratios"]) == len(final["keep_counts"]) == n
    assert 0.0 <= final["accuracy"] <= 1.0
    assert final["loss"] > 0.0
    assert 0.0 < final["density"] <= 1.0
    assert final["flops"] == pytest.approx(final["flops_ratio"] * env.dense_flops)
    assert traj["rewards"][-1] == pytest.approx(-final["loss"] - 1.0 * final["density"], abs=1e-12)
    # flops_removed (feature 7) only grows as groups are pruned
    removed = [obs[OBSERVATION_FEATURES.index("flops_removed")] for obs in traj["obs"][:-1]]
    assert all(b >= a for a, b in zip(removed, removed[1:], strict=False))


def test_observation_position_and_previous_keep_ratio(small_env):
    traj = _episode(small_env, _box(0.0), seed=0)
    n = small_env.num_groups
    position = [obs[OBSERVATION_FEATURES.index("position")] for obs in traj["obs"][:n]]
    np.testing.assert_allclose(position, np.arange(n) / (n - 1), atol=1e-6)
    previous = [obs[OBSERVATION_FEATURES.index("previous_keep_ratio")] for obs in traj["obs"][:n]]
    assert previous[0] == 1.0
    for t in range(1, n):
        assert previous[t] == pytest.approx(traj["infos"][t]["keep_ratio"], abs=1e-6)


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_reward_is_minus_loss_minus_lam_density(lam):
    env = _make(lam=lam)
    rng = np.random.default_rng(1)
    for _ in range(3):
        traj = _episode(env, lambda t: rng.uniform(-1, 1, 1).astype(np.float32))
        info = traj["infos"][-1]
        assert traj["rewards"][-1] == pytest.approx(-info["loss"] - lam * info["density"], abs=1e-12)
    env.close()


def test_task_loss_error_pays_the_error_rate():
    """task_loss="error": the reward's task loss is the reward split's error rate, the same episode's
    cross-entropy otherwise; in budget mode as without a budget. Anything else is refused by name."""
    for kwargs in ({"lam": 2.0}, {"flops_target": 0.5}):
        env, plain = _make(task_loss="error", **kwargs), _make(**kwargs)
        actions = lambda t: np.array([0.3 - 0.4 * t], dtype=np.float32)  # noqa: E731
        traj, ref = _episode(env, actions, seed=0), _episode(plain, actions, seed=0)
        info = traj["infos"][-1]
        price = 0.0 if "flops_target" in kwargs else 2.0 * info["density"]
        assert traj["rewards"][-1] == pytest.approx(-(1.0 - info["accuracy"]) - price, abs=1e-12)
        assert ref["rewards"][-1] == pytest.approx(-info["loss"] - price, abs=1e-12)
        assert info["loss"] == ref["infos"][-1]["loss"]  # the same candidate, scored alike
        env.close(), plain.close()
    with pytest.raises(ValueError, match="task_loss must be one of.*'hinge'"):
        _make(task_loss="hinge")


def test_refit_head_scores_the_same_candidate_through_a_refitted_classifier():
    """refit_head: the same episode keeps the same channels, and its reward is the score of the candidate
    with its classifier re-fitted (``ProxyEvaluator(refit_head=True)``); it is refused by name beside a
    short-term fine-tune or without recalibration batches."""
    env, plain = _make(refit_head=True, flops_target=0.5), _make(flops_target=0.5)
    actions = lambda t: np.array([0.3 - 0.4 * t], dtype=np.float32)  # noqa: E731
    info, ref = _episode(env, actions, seed=0)["infos"][-1], _episode(plain, actions, seed=0)["infos"][-1]
    assert info["keep_counts"] == ref["keep_counts"] and info["loss"] != ref["loss"]
    counts = np.asarray(info["keep_counts"])
    assert env.proxy.refit_head and not plain.proxy.refit_head
    assert info["loss"] == pytest.approx(env.proxy(counts, env.splits.reward)["loss"])
    env.close(), plain.close()
    for kwargs, match in (({"refit_head": "yes"}, "refit_head must be a bool, got 'yes'"),
                          ({"refit_head": True, "finetune_steps": 3}, "no finetune_steps .got 3"),
                          ({"refit_head": True, "recalibration_batches": 0}, "recalibration_batches >= 1 .got 0")):
        with pytest.raises(ValueError, match=match):
            _make(**kwargs)


@pytest.mark.parametrize("density", [k for k in DENSITY_KINDS if k != "latency"])  # timed: test_latency.py
def test_density_kinds(density):
    env = _make(density=density)
    actions = [-1.0, -0.5, 0.0, 0.5, 1.0]
    densities = [_episode(env, _box(a))["infos"][-1]["density"] for a in actions]
    for d in densities:
        assert 0.0 <= d <= 1.0
    assert densities[-1] == pytest.approx(1.0)  # action 1.0 keeps every channel
    assert all(lo < hi for lo, hi in zip(densities, densities[1:], strict=False)), densities
    full = _episode(env, _box(1.0))["infos"][-1]
    assert full["flops_ratio"] == pytest.approx(1.0)
    assert full["keep_counts"] == env.graph.num_channels.tolist()
    assert full["keep_ratios"] == [1.0] * env.num_groups
    env.close()


def test_wrapped_episode_emits_no_warnings():
    env = gymnasium.make(LAYER_PRUNING_ID, **SMALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _episode(env, _box(0.0), seed=0)
        _episode(env, _box(1.0))
    assert [str(w.message) for w in caught] == []
    env.close()


def test_reset_mid_episode_starts_over(small_env):
    small_env.reset()
    small_env.step(_box(-1.0))
    small_env.step(_box(-1.0))
    assert _episode(small_env, _box(1.0))["infos"][-1]["density"] == pytest.approx(1.0)


def test_episodes_leave_the_dense_model_unchanged(small_env):
    """Soft masks and BN recalibration are undone after every reward evaluation."""
    dense = small_env.evaluate_counts(small_env.graph.num_channels)
    rng = np.random.default_rng(5)
    for _ in range(3):
        info = _episode(small_env, lambda t: rng.uniform(-1, 1, 1).astype(np.float32))["infos"][-1]
        again = small_env.evaluate_counts(info["keep_counts"])
        assert again["loss"] == info["loss"]
        assert again["accuracy"] == info["accuracy"]
    assert small_env.evaluate_counts(small_env.graph.num_channels) == dense


def test_short_term_finetune_reward_is_the_pruned_and_trained_models_loss():
    """With ``finetune_steps`` the task loss is the hard-pruned model's after that many batches of
    training on the train split: the same figure as pruning and training it by hand, the same
    every time for the same widths, and the env's own model untouched."""
    env = _make(finetune_steps=3, finetune_lr=2e-3)
    before = {k: v.clone() for k, v in env.model.state_dict().items()}
    info = _episode(env, _box(-0.5))["infos"][-1]
    counts = np.asarray(info["keep_counts"])
    assert (counts < env.graph.num_channels).any()
    pruned = prune_channels(env.model, env.graph, env.kept_channels(counts))
    train_classifier(pruned, env.splits.train, epochs=0, lr=2e-3, seed=env.seed_value, max_steps=3)
    loss, accuracy = evaluate(pruned, env.splits.reward)
    assert info["loss"] == pytest.approx(loss, rel=1e-6) and info["accuracy"] == pytest.approx(accuracy)
    assert info["loss"] != pytest.approx(_make().evaluate_counts(counts)["loss"])  # not the soft-masked loss
    assert env.evaluate_counts(counts)["loss"] == info["loss"]
    assert all(torch.equal(before[k], v) for k, v in env.model.state_dict().items())
    env.close()


@pytest.mark.parametrize("kwargs", [{"importance": "l2"}, {"importance": "bn_scale"}, {"recalibration_batches": 0},
                                    {"min_keep": 1.0}])
def test_other_valid_options_run(kwargs):
    env = _make(**kwargs)
    info = _episode(env, _box(-1.0))["infos"][-1]
    for key in FINAL_KEYS:
        assert key in info
    if kwargs.get("min_keep") == 1.0:
        assert info["density"] == pytest.approx(1.0)
    env.close()


def test_keep_counts_respect_min_keep(small_env):
    info = _episode(small_env, _box(-1.0))["infos"][-1]
    counts = np.asarray(info["keep_counts"])
    assert np.all(counts >= 1)
    assert np.all(counts >= np.ceil(0.1 * small_env.graph.num_channels - 1e-9))
    assert np.all(counts < small_env.graph.num_channels)


def test_same_seed_same_actions_same_trajectory():
    rng = np.random.default_rng(7)
    actions = [rng.uniform(-1, 1, 1).astype(np.float32) for _ in range(40)]
    trajectories = []
    for _ in range(2):
        env = gymnasium.make(LAYER_PRUNING_ID, **SMALL, seed=0)
        per_env, k = [], 0
        for episode in range(3):
            n = env.unwrapped.num_groups
            traj = _episode(env, lambda t, k=k: actions[k + t], seed=episode)
            k += n
            per_env.append(traj)
        trajectories.append(per_env)
        env.close()
    for a, b in zip(*trajectories, strict=True):
        assert len(a["obs"]) == len(b["obs"])
        for oa, ob in zip(a["obs"], b["obs"], strict=True):
            np.testing.assert_array_equal(oa, ob)
        assert a["rewards"] == b["rewards"]
        assert a["infos"] == b["infos"]


# ---- budget mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_budget_mode_never_exceeds_the_target(target):
    env = _make(flops_target=target, lam=2.0)
    rng = np.random.default_rng(int(target * 10))
    for _ in range(200):
        traj = _episode(env, lambda t: rng.uniform(-1, 1, 1).astype(np.float32))
        info = traj["infos"][-1]
        assert info["flops_ratio"] <= target + 1e-9
        assert traj["rewards"][-1] == pytest.approx(-info["loss"], abs=1e-12)  # lam is ignored
        for obs in traj["obs"]:
            assert env.observation_space.contains(obs)
    # the greedy "keep everything" policy is clamped to the budget too
    assert _episode(env, _box(1.0))["infos"][-1]["flops_ratio"] <= target + 1e-9
    env.close()


def test_capacity_weight_adds_flops_ratio_to_a_budgeted_reward():
    env = _make(flops_target=0.5, capacity_weight=0.5)
    rng = np.random.default_rng(3)
    for _ in range(3):
        info = (traj := _episode(env, lambda t: rng.uniform(-1, 1, 1).astype(np.float32)))["infos"][-1]
        assert traj["rewards"][-1] == pytest.approx(-info["loss"] + 0.5 * info["flops_ratio"], abs=1e-12)
    env.close()


def test_the_uniform_action_asks_for_the_uniform_widths_at_the_budget():
    """Asked at every step, the uniform action keeps the uniform widths (to a channel); the middle action
    (0) spends a small budget on the first groups, and the clamp leaves the later ones narrower."""
    env = _make(flops_target=0.1, min_keep=0.1)
    channels = env.graph.num_channels
    uniform = uniform_keep_counts(env.graph, 0.1, env.channel_multiple)
    action = env.uniform_action()
    assert -1 < action < 0
    assert env.keep_ratio_of(_box(action)) == pytest.approx(np.mean(uniform / channels), abs=1e-6)
    at_uniform = np.array(_episode(env, _box(action))["infos"][-1]["keep_counts"])
    assert np.abs(at_uniform - uniform).max() <= 1
    at_middle = np.array(_episode(env, _box(0.0))["infos"][-1]["keep_counts"])
    assert at_middle[0] > at_uniform[0] and (at_middle[2:] < at_uniform[2:]).all()
    env.close()
    for kwargs in ({"lam": 1.0}, {"flops_target": 0.3, "action_levels": 5}):
        env = _make(**kwargs)
        with pytest.raises(ValueError, match="needs a FLOPs budget.*and a continuous action"):
            env.uniform_action()
        env.close()


def test_budget_below_reachable_minimum_raises():
    with pytest.raises(ValueError, match="flops_target"):
        _make(flops_target=0.01)


# ---- discrete actions ----------------------------------------------------------------------------
def test_action_levels_gives_discrete_actions():
    env = _make(action_levels=5)
    assert env.action_space == spaces.Discrete(5)
    traj = _episode(env, lambda t: t % 5)
    assert traj["terminated"][-1]
    for key in FINAL_KEYS:
        assert key in traj["infos"][-1]
    assert _episode(env, 4)["infos"][-1]["density"] == pytest.approx(1.0)
    assert _episode(env, np.int64(0))["infos"][-1]["density"] < _episode(env, 2)["infos"][-1]["density"]
    env.reset()
    for bad in (5, -1, 0.5):
        with pytest.raises(ValueError):
            env.step(bad)
    env.close()


def test_one_action_level_raises():
    with pytest.raises(ValueError, match="action_levels"):
        _make(action_levels=1)


# ---- argument validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lam": -1}, "lam"),
        ({"lam": math.nan}, "lam"),
        ({"density": "bogus"}, "density"),
        ({"min_keep": 0}, "min_keep"),
        ({"min_keep": 1.5}, "min_keep"),
        ({"flops_target": 0}, "flops_target"),
        ({"flops_target": 1.5}, "flops_target"),
        ({"importance": "bogus"}, "importance"),
        ({"model": "nonexistent_model"}, "model"),
        ({"dataset": "bogus:x"}, "dataset"),
        ({"recalibration_batches": -1}, "recalibration_batches"),
        ({"finetune_steps": -1}, "finetune_steps"),
        ({"finetune_steps": 1.5}, "finetune_steps"),
        ({"finetune_lr": 0}, "finetune_lr"),
        ({"finetune_lr": math.inf}, "finetune_lr"),
        ({"capacity_weight": -0.5, "flops_target": 0.5}, "capacity_weight"),
        ({"capacity_weight": math.nan, "flops_target": 0.5}, "capacity_weight"),
        ({"capacity_weight": 0.5}, "capacity_weight"),  # without a budget, lam prices density
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LayerPruningEnv(**{**SMALL, **kwargs})


# ---- API misuse ----------------------------------------------------------------------------------
def test_step_before_reset_raises():
    env = _make()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_box(0.0))
    wrapped = gymnasium.make(LAYER_PRUNING_ID, **SMALL)
    with pytest.raises((RuntimeError, gymnasium.error.ResetNeeded)):
        wrapped.step(_box(0.0))
    wrapped.close()
    env.close()


def test_step_after_episode_end_raises(small_env):
    _episode(small_env, _box(0.5))
    with pytest.raises(RuntimeError):
        small_env.step(_box(0.5))
    assert _episode(small_env, _box(0.5))["terminated"][-1]  # reset starts a fresh episode


@pytest.mark.parametrize("action", [2.0, [0.5, 0.5], math.nan, np.array([np.nan], dtype=np.float32)])
def test_actions_outside_the_space_raise(small_env, action):
    small_env.reset()
    with pytest.raises(ValueError):
        small_env.step(action)
    # a rejected action does not advance the episode
    obs, reward, terminated, truncated, info = small_env.step(_box(0.0))
    assert info["step"] == 1
    assert not terminated


# ---- a model and data passed in by the caller ----------------------------------------------------
def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in module.modules())


def test_module_and_splits_as_arguments_leave_the_callers_module_alone():
    splits = load_dataset("digits", 0)
    model = base_model("digits_cnn", splits, 0, epochs=2)
    model.eval()
    x = splits.test.x[:32]
    with torch.no_grad():
        before = model(x).clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    env = gymnasium.make(LAYER_PRUNING_ID, model=model, dataset=splits)
    assert env.unwrapped.splits is splits
    rng = np.random.default_rng(3)
    for _ in range(3):
        info = _episode(env, lambda t: rng.uniform(-1, 1, 1).astype(np.float32))["infos"][-1]
        for key in FINAL_KEYS:
            assert key in info
        assert info["density"] < 1.0

    assert _hooks(model) == 0
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(model(x), before)
    env.close()


# ---- channel counts at multiples of a vector width ----------------------------------------------
def test_channel_multiple_keeps_counts_at_multiples_or_whole_groups():
    env = LayerPruningEnv(base_epochs=2, channel_multiple=16, flops_target=0.5)
    rng = np.random.default_rng(0)
    for _ in range(30):
        env.reset()
        done = False
        while not done:
            _, _, done, _, info = env.step(rng.uniform(-1, 1, size=1).astype(np.float32))
        for count, channels in zip(info["keep_counts"], env.graph.num_channels, strict=True):
            assert count % 16 == 0 or count == channels
        assert info["flops_ratio"] <= 0.5 + 1e-9
    with pytest.raises(ValueError, match="channel_multiple"):
        LayerPruningEnv(base_epochs=2, channel_multiple=0)


# ---- copies, pickles and closed envs ------------------------------------------------------------
def test_a_deep_copy_and_an_unpickled_env_price_as_the_original(small_env):
    """Their soft masks act on their own models: a copy must not price the dense model."""
    import copy
    import pickle

    reference = _episode(small_env, _box(-0.5))
    for other in (copy.deepcopy(small_env), pickle.loads(pickle.dumps(small_env))):
        trajectory = _episode(other, _box(-0.5))
        assert trajectory["rewards"][-1] == pytest.approx(reference["rewards"][-1], abs=1e-6)
        assert trajectory["infos"][-1]["accuracy"] == pytest.approx(reference["infos"][-1]["accuracy"])
        other.close()
    dense = small_env.evaluate_counts(small_env.graph.num_channels)
    assert reference["infos"][-1]["loss"] > dense["loss"]  # the masks bite: a quarter kept is not the dense model
    assert _episode(small_env, _box(-0.5))["rewards"][-1] == pytest.approx(reference["rewards"][-1], abs=1e-6)


def test_a_closed_env_refuses_to_step():
    env = _make()
    env.reset(seed=0)
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.step(_box(0.0))
