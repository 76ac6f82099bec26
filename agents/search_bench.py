"""How well each searcher optimises the per-layer search's reward: the benchmark behind
``scripts/bench.py --what search``. It prints figures and asserts nothing.

A search keeps its best episode, so a searcher is as good as the best reward it finds in a fixed
number of reward evaluations. For each FLOPs budget and seed, one env is built as ``train.py``
builds it (the same base model, supernet, reward and budget clamp), and every searcher plays it:
the SB3 agents for the job's timesteps, and random search (``random_search``: uniform actions)
for as many episodes as the agents played. The env remembers each candidate's score, and a score
depends on the candidate alone, so the searchers share those scores and none sees another's
results. Per searcher: the best reward (the mean over seeds) and, paired over the seeds, its
difference from random search's with a 95% interval and the seeds it found the higher reward on;
the distinct allocations it played and its seconds (searchers after the first find some
candidates scored already, so seconds compare only roughly).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

from stable_baselines3.common.monitor import Monitor

from prunegym.agents.callbacks import PruningCallback
from prunegym.agents.config import TrainConfig, env_kwargs
from prunegym.agents.factory import ALGORITHMS, check_hyperparameters, make_agent
from prunegym.agents.random_search import random_search
from prunegym.compression.statistics import paired_difference

__all__ = ["RANDOM", "SEARCHERS", "bench_search", "format_search"]

RANDOM = "random"
SEARCHERS = (*(a for a in ALGORITHMS if a != "dqn"), RANDOM)  # what can search the per-layer env's Box actions


def _check(budgets: Sequence[float], searchers: Sequence[str], seeds: Sequence[int]) -> None:
    unknown = [s for s in searchers if s not in SEARCHERS]
    if unknown or not searchers:
        raise ValueError(f"searchers must be some of {list(SEARCHERS)}; got {list(searchers)}")
    if RANDOM not in searchers or all(s == RANDOM for s in searchers):
        raise ValueError(f"searchers must hold {RANDOM!r} (the reference) and at least one agent; "
                         f"got {list(searchers)}")
    if len(set(searchers)) != len(searchers):
        raise ValueError(f"searchers must be distinct; got {list(searchers)}")
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"budgets must be FLOPs ratios in (0, 1]; got {list(budgets)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, at least one; got {list(seeds)}")


def bench_search(config: TrainConfig, budgets: Sequence[float], searchers: Sequence[str], seeds: Sequence[int],
                 log: Any = print) -> dict[str, Any]:
    """Every searcher on the env of ``config`` at each of ``budgets`` (its ``flops_target``) and each
    of ``seeds`` (the base model's, the supernet's and the searcher's seed); ``config.timesteps``
    steps for each agent (train.py's default when None), on ``config.device``. Returns ``{"rows":
    per (budget, seed, searcher), "table": per (budget, searcher)}``."""
    from prunegym.compression.training import resolve_device
    from prunegym.envs import LayerPruningEnv

    _check(budgets, searchers, seeds)
    device = str(resolve_device(config.device))
    agents = [s for s in searchers if s != RANDOM]
    for name in agents:  # every agent takes the same overrides: each must accept them
        check_hyperparameters(name, config.hyperparameters)
    rows: list[dict[str, Any]] = []
    for budget in budgets:
        for seed in seeds:
            run = dataclasses.replace(config, flops_target=budget, seed=seed, env="layer", algo=agents[0])
            run.validate()  # every setting checked, by name, before an env is built
            env = LayerPruningEnv(**env_kwargs(run), device=device)
            played = 0
            for name in (*agents, RANDOM):
                before, started = env.proxy.evaluations, time.perf_counter()
                if name == RANDOM:
                    episodes = played
                    found = random_search(env, episodes, seed=seed)
                    best, distinct = found["best"]["reward"], found["distinct"]
                else:
                    # the job's own record of a search; keeping every distinct allocation counts them
                    record = PruningCallback([g.name for g in env.graph.groups], top=run.timesteps)
                    agent = make_agent(name, Monitor(env), episode_length=env.num_groups, seed=seed, device=device,
                                       hyperparameters=run.hyperparameters)
                    agent.learn(run.timesteps, callback=record)
                    best, episodes, distinct = record.best["reward"], record.episodes, len(record.top)
                    played = max(played, episodes)
                rows.append({"budget": budget, "seed": seed, "searcher": name, "best_reward": best,
                             "episodes": episodes, "distinct": distinct,
                             "newly_scored": env.proxy.evaluations - before,
                             "seconds": time.perf_counter() - started})
                log(f"budget {budget:g} seed {seed} {name}: best reward {best:.4f} in {episodes} episodes "
                    f"({rows[-1]['seconds']:.0f} s)")
            env.close()
    return {"rows": rows, "table": _table(rows, budgets, searchers, seeds)}


def _table(rows: list[dict[str, Any]], budgets: Sequence[float], searchers: Sequence[str],
           seeds: Sequence[int]) -> list[dict[str, Any]]:
    table = []
    for budget in budgets:
        best = {(r["searcher"], r["seed"]): r for r in rows if r["budget"] == budget}
        reference = [best[RANDOM, s]["best_reward"] for s in seeds]
        for name in searchers:
            mine = [best[name, s] for s in seeds]
            entry = {"budget": budget, "searcher": name,
                     "best_reward": statistics.mean(r["best_reward"] for r in mine),
                     "episodes": statistics.mean(r["episodes"] for r in mine),
                     "distinct": statistics.mean(r["distinct"] for r in mine),
                     "seconds": statistics.mean(r["seconds"] for r in mine)}
            if name != RANDOM:
                entry["versus_random"] = paired_difference([r["best_reward"] for r in mine], reference).as_dict()
            table.append(entry)
    return table


def format_search(figures: dict[str, Any]) -> str:
    versus_title = "minus random search (95% interval), seeds higher/lower"
    lines = [f"{'FLOPs':<7}{'searcher':<10}{'best reward':>12}  {versus_title:<56}{'episodes':>9}{'distinct':>9}"
             f"{'seconds':>8}"]
    for e in figures["table"]:
        paired = e.get("versus_random")
        if paired is None:
            versus = "(reference)"
        else:
            interval = "" if paired["low"] is None else f" [{paired['low']:+.4f}, {paired['high']:+.4f}]"
            versus = f"{paired['mean']:+.4f}{interval}, {paired['won']}/{paired['lost']} of {paired['n']}"
        lines.append(f"{e['budget']:<7g}{e['searcher']:<10}{e['best_reward']:>12.4f}  {versus:<56}"
                     f"{e['episodes']:>9.0f}{e['distinct']:>9.0f}{e['seconds']:>8.0f}")
    return "\n".join(lines)
