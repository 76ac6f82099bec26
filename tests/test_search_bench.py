"""Tests for prunegym.agents.search_bench: each searcher's best reward against random search's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunegym.agents.config import TrainConfig, env_kwargs
from prunegym.agents.random_search import random_search
from prunegym.agents.search_bench import bench_search, format_search
from prunegym.compression.statistics import paired_difference
from prunegym.envs import LayerPruningEnv

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SETTINGS = dict(model="digits_cnn", dataset="digits", task_loss="cross_entropy", supernet_epochs=0, base_epochs=2,
                timesteps=40, device="cpu")


@pytest.fixture(scope="module")
def figures(prunegym_cache: Path):
    return bench_search(TrainConfig(**SETTINGS), [0.3], ["ppo", "td3", "random"], [0, 1], log=lambda _: None)


def test_every_searcher_plays_every_seed_and_random_search_as_many_episodes(figures):
    rows = figures["rows"]
    assert [(r["seed"], r["searcher"]) for r in rows] == [(s, n) for s in (0, 1) for n in ("ppo", "td3", "random")]
    for seed in (0, 1):
        mine = {r["searcher"]: r for r in rows if r["seed"] == seed}
        assert mine["ppo"]["episodes"] >= 10 and mine["td3"]["episodes"] == 10  # 40 timesteps of 4 layers
        assert mine["random"]["episodes"] == max(mine["ppo"]["episodes"], mine["td3"]["episodes"])
        for r in mine.values():
            assert 1 <= r["distinct"] <= r["episodes"] and r["best_reward"] < 0 and r["seconds"] > 0


def test_random_search_row_is_random_search_on_the_same_env(figures):
    config = TrainConfig(**SETTINGS, flops_target=0.3, seed=1)
    config.resolve_defaults()
    env = LayerPruningEnv(**env_kwargs(config), device="cpu")
    row = next(r for r in figures["rows"] if r["seed"] == 1 and r["searcher"] == "random")
    assert random_search(env, row["episodes"], seed=1)["best"]["reward"] == pytest.approx(row["best_reward"])
    env.close()


def test_the_table_pairs_each_agent_with_random_search_over_the_seeds(figures):
    table = {e["searcher"]: e for e in figures["table"]}
    best = {(r["searcher"], r["seed"]): r["best_reward"] for r in figures["rows"]}
    assert "versus_random" not in table["random"]
    for name in ("ppo", "td3"):
        expected = paired_difference([best[name, s] for s in (0, 1)], [best["random", s] for s in (0, 1)])
        assert table[name]["versus_random"] == expected.as_dict()
        assert table[name]["best_reward"] == pytest.approx((best[name, 0] + best[name, 1]) / 2)
    text = format_search(figures)
    assert "(reference)" in text and len(text.splitlines()) == 4


@pytest.mark.parametrize(("searchers", "message"), [(["ppo", "rnd"], "'rnd'"), (["ppo"], "'random'"),
                                                    (["random"], "at least one agent"),
                                                    (["ppo", "ppo", "random"], "distinct")])
def test_bad_searchers_are_refused_by_name(searchers, message):
    with pytest.raises(ValueError, match=message):
        bench_search(TrainConfig(**SETTINGS), [0.3], searchers, [0])


@pytest.mark.parametrize(("budgets", "seeds", "message"), [([1.5], [0], "budgets"), ([0.3], [0, 0], "seeds"),
                                                           ([], [0], "budgets")])
def test_bad_budgets_and_seeds_are_refused_by_name(budgets, seeds, message):
    with pytest.raises(ValueError, match=message):
        bench_search(TrainConfig(**SETTINGS), budgets, ["ppo", "random"], seeds)


def test_hyperparameters_every_agent_takes_are_used_and_others_refused_before_any_search(prunegym_cache: Path):
    with pytest.raises(ValueError, match=r"\['n_epochs'\] are not arguments of SAC"):  # PPO's, not SAC's
        bench_search(TrainConfig(**SETTINGS, hyperparameters={"n_epochs": 2}), [0.3], ["ppo", "sac", "random"], [0],
                     log=lambda _: None)
    settings = {**SETTINGS, "timesteps": 16, "hyperparameters": {"buffer_size": 64, "learning_starts": 4}}
    figures = bench_search(TrainConfig(**settings), [0.3], ["sac", "random"], [0], log=lambda _: None)
    assert [r["episodes"] for r in figures["rows"]] == [4, 4]  # an off-policy agent's own argument, not PPO's


def test_bench_script_runs_the_search_and_names_bad_searchers_and_hyperparameters(tmp_path: Path, prunegym_cache: Path):
    env = {**os.environ, "PRUNEGYM_CACHE": str(prunegym_cache), "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(SCRIPTS / "bench.py"), "--what", "search", "--model", "digits_cnn", "--budgets",
              "0.3", "--seeds", "0", "--base-epochs", "2", "--supernet-epochs", "0", "--task-loss", "cross_entropy",
              "--search-timesteps", "16", "--threads", "1"]
    out = tmp_path / "search.json"
    done = subprocess.run([*common, "--searchers", "a2c,random", "--hyperparameters", '{"n_steps": 8}', "--json",
                           str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "minus random search" in done.stdout
    assert [e["searcher"] for e in json.loads(out.read_text())["search"]["table"]] == ["a2c", "random"]
    bad = subprocess.run([*common, "--searchers", "a2c,dqn"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "'a2c,dqn'" in bad.stderr
    bad = subprocess.run([*common, "--searchers", "a2c,random", "--hyperparameters", '{"n_epochs": 2}'], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "n_epochs" in bad.stderr  # A2C has no such argument
