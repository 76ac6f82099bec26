"""Tests for prunegym.agents.random_search: the best of random episodes in the layer env."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import trained_digits_cnn

from prunegym.agents.random_search import random_search
from prunegym.compression.data import load_dataset
from prunegym.envs import LayerPruningEnv


@pytest.fixture(scope="module")
def env():
    splits = load_dataset("digits", 0)
    env = LayerPruningEnv(model=trained_digits_cnn(splits.train), dataset=splits, flops_target=0.3)
    yield env
    env.close()


def test_the_best_episode_is_the_one_with_the_highest_reward(env):
    result = random_search(env, 12, seed=3)
    best = result["best"]
    assert result["episodes"] == 12 and result["seconds"] > 0
    assert best["flops_ratio"] <= 0.3 + 1e-9 and best["reward"] == pytest.approx(-best["loss"])
    # Replaying the same random actions finds no episode better than the one reported.
    env.action_space.seed(3)
    env.reset(seed=3)
    rewards = []
    for _ in range(12):
        env.reset()
        done = False
        while not done:
            _, reward, done, _, _ = env.step(env.action_space.sample())
        rewards.append(reward)
    assert max(rewards) == pytest.approx(best["reward"])


def test_a_seed_reproduces_the_search_and_another_differs(env):
    a, b, c = (random_search(env, 6, seed=s)["best"] for s in (1, 1, 2))
    assert a["keep_counts"] == b["keep_counts"]
    assert not np.array_equal(a["keep_counts"], c["keep_counts"]) or a["reward"] != c["reward"]


@pytest.mark.parametrize("episodes", [0, -3, 2.5])
def test_bad_episode_counts_are_refused_by_name(env, episodes):
    with pytest.raises(ValueError, match="episodes"):
        random_search(env, episodes)


def test_top_holds_the_best_distinct_allocations_best_first(env):
    result = random_search(env, 12, seed=3, top=4)
    top = result["top"]
    assert 1 <= len(top) <= 4 and top[0] is result["best"]
    assert [e["reward"] for e in top] == sorted((e["reward"] for e in top), reverse=True)
    assert len({tuple(e["keep_counts"]) for e in top}) == len(top)
    assert random_search(env, 12, seed=3)["best"]["keep_counts"] == result["best"]["keep_counts"]
    with pytest.raises(ValueError, match="top"):
        random_search(env, 12, top=0)


def test_the_finalist_kept_has_the_lowest_fine_tuned_loss_on_the_reward_split(env):
    from prunegym.agents.finalists import choose_finalist
    from prunegym.compression.training import evaluate, train_classifier

    top = random_search(env, 12, seed=3, top=3)["top"]
    candidates = [(f"#{i}", e["reward"], e) for i, e in enumerate(top)]

    def finetune(model):
        return train_classifier(model, env.splits.train, epochs=1, lr=5e-4, seed=0)

    chosen, model, record = choose_finalist(env, candidates, 3, finetune, log=lambda text: None)
    losses = [r["reward_split_loss"] for r in record["candidates"]]
    assert len(losses) == len(top) and record["chosen"] == chosen == int(np.argmin(losses))
    assert evaluate(model, env.splits.reward)[0] == pytest.approx(losses[chosen])
    assert [r["keep_counts"] for r in record["candidates"]] == [list(e["keep_counts"]) for e in top]
    one, _, _ = choose_finalist(env, candidates, 1, finetune, log=lambda text: None)
    assert one == 0  # one finalist: the best reward, as without
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="finalists"):
            choose_finalist(env, candidates, bad, finetune)


def test_under_the_error_rate_the_finalist_kept_has_the_lowest_fine_tuned_error(env):
    from prunegym.agents.finalists import choose_finalist
    from prunegym.compression.training import train_classifier

    top = random_search(env, 12, seed=3, top=3)["top"]
    candidates = [(f"#{i}", e["reward"], e) for i, e in enumerate(top)]

    def finetune(model):
        return train_classifier(model, env.splits.train, epochs=1, lr=5e-4, seed=0)

    env.task_loss = "error"
    try:
        chosen, _, record = choose_finalist(env, candidates, 3, finetune, log=lambda text: None)
    finally:
        env.task_loss = "cross_entropy"
    keys = [(1 - r["reward_split_accuracy"], r["reward_split_loss"]) for r in record["candidates"]]
    assert chosen == min(range(len(keys)), key=keys.__getitem__)
