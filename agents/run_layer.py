"""The per-layer job, readable top to bottom: base model -> RL search -> best policy -> hard prune
-> fine-tune -> report, everything in one run directory.

Besides what every run directory holds (``prunegym.agents.job``): ``model.pt`` (the pruned,
fine-tuned model with its architecture), ``uniform.pt`` (the uniform baseline; with a latency
budget also ``latency_greedy.pt``, the widest counts the latency table fits in the budgets).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import SubprocVecEnv

from prunegym.compression.channels import prune_channels
from prunegym.compression.checkpoint import describe_architecture, save_checkpoint
from prunegym.compression.latency import widest_within
from prunegym.compression.sparsity import uniform_keep_counts
from prunegym.compression.training import resolve_device, train_classifier
from prunegym.envs import LayerPruningEnv

from .callbacks import PruningCallback
from .config import TrainConfig, env_kwargs
from .job import REPORT_ROUNDS, add_ratios, distillation, finish_report, measure_models, results_table, search

__all__ = ["format_report", "parallel_envs", "train_layer"]


def _layer_env(kwargs: dict[str, Any], device: str, threads: int) -> Monitor:
    torch.set_num_threads(threads)
    return Monitor(LayerPruningEnv(**kwargs, device=device))


def parallel_envs(kwargs: dict[str, Any], n: int, device: torch.device) -> SubprocVecEnv:
    """``n`` copies of ``LayerPruningEnv(**kwargs)``, each in its own process with an equal share of
    the CPUs, stepped together (SB3's ``SubprocVecEnv``; SB3 seeds copy i with the agent's seed + i)."""
    threads = max(1, (os.cpu_count() or 1) // n)
    return SubprocVecEnv([functools.partial(_layer_env, kwargs, str(device), threads) for _ in range(n)])


def train_layer(config: TrainConfig, *, resume: bool, progress_bar: bool, log: Any, trust_run: bool) -> dict[str, Any]:
    """The per-layer job of ``train``."""
    device = resolve_device(config.device)
    started = time.perf_counter()
    run_dir = Path(config.run_dir)

    # 1. Base model (trained once per model, dataset, seed, then cached) and the environment. Both
    # come before the run directory, so a bad setting leaves nothing behind.
    env = LayerPruningEnv(**env_kwargs(config), device=str(device))
    splits = env.splits
    dense = env.evaluate_counts(env.graph.num_channels)
    log(f"{'supernet' if config.supernet_epochs else 'base model'} {config.model} at full width: reward-split "
        f"accuracy {dense['accuracy']:.4f}, "
        f"{len(env.graph.groups)} channel groups, {env.dense_flops / 1e6:.2f} MFLOPs"
        + (f"; supernet of {config.supernet_epochs} epochs ({env.supernet_seconds:.0f} s to train)"
           if config.supernet_epochs else ""))

    # 2. The RL search, resumable from the latest checkpoint; with num_envs > 1, that many copies of
    # the env score candidates in parallel processes (each reads the base model and supernet from
    # the cache step 1 filled).
    search_started = time.perf_counter()
    searched = Monitor(env) if config.num_envs == 1 else parallel_envs(env_kwargs(config), config.num_envs, device)
    try:
        agent, pruning_cb, run_dir = search(
            config, searched, env.num_groups,
            lambda hp: PruningCallback([g.name for g in env.graph.groups], hparams=hp), device=device, resume=resume,
            progress_bar=progress_bar, log=log, env_state=env if config.num_envs == 1 else None, trust_run=trust_run)
    finally:
        if config.num_envs > 1:
            searched.close()
    search_seconds = time.perf_counter() - search_started

    # 3. The best policy found: the best episode of the search, or the final deterministic policy.
    obs, _ = env.reset()
    done = False
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        obs, reward, done, _, info = env.step(action)
    candidates = [("final deterministic policy", float(reward), info)]
    if pruning_cb.best is not None:
        candidates.append(("best search episode", pruning_cb.best["reward"], pruning_cb.best))
    source, best_reward, best = max(candidates, key=lambda c: c[1])
    counts = np.asarray(best["keep_counts"], dtype=np.int64)
    log(f"best policy ({source}): reward {best_reward:.4f}, FLOPs ratio {best['flops_ratio']:.3f}, "
        f"keep ratios {np.round(best['keep_ratios'], 3).tolist()}")

    # 4. Hard prune and fine-tune the RL choice and the uniform L1 baseline at the same FLOPs; under a
    # latency budget also the latency-greedy baseline (the widest counts the table fits in the budgets).
    uniform = uniform_keep_counts(env.graph, float(env.graph.flops(counts)) / env.graph.dense_flops,
                                  env.channel_multiple)
    allocations = {"rl": counts, "uniform": uniform}
    if env.latency_target is not None:
        allocations["latency_greedy"] = widest_within(env.latency, env.allowed, flops_target=env.flops_target,
                                                      latency_target=env.latency_target)
    models = {"dense": env.dense}  # the trained base model (env.model is the supernet, when there is one)
    teacher = distillation(config, env.dense)
    for name, keep in allocations.items():
        pruned = prune_channels(env.model, env.graph, env.kept_channels(keep))
        train_classifier(pruned, splits.train, epochs=config.finetune_epochs, lr=config.finetune_lr,
                         seed=config.seed, device=device, distill=teacher)
        models[name] = pruned

    # 5. Report: test split only, latency on the CPU with fixed threads, all models in one process.
    results = measure_models(models, splits, config.threads, rounds=REPORT_ROUNDS)
    for name, keep in allocations.items():
        results[name]["keep_ratios"] = (keep / env.graph.num_channels).tolist()
    for result in results.values():
        add_ratios(result, results["dense"])
    arch_of = lambda m: describe_architecture(m, config.model, splits.in_channels, splits.num_classes,  # noqa: E731
                                              splits.image_size)
    save_checkpoint(run_dir / "model.pt", models["rl"], arch_of(models["rl"]),
                    {"kind": "static", "keep_ratios": results["rl"]["keep_ratios"], "run_dir": str(run_dir)})
    for name in ("uniform", "latency_greedy"):
        if name in models:
            save_checkpoint(run_dir / f"{name}.pt", models[name], arch_of(models[name]),
                            {"kind": "static", "keep_ratios": results[name]["keep_ratios"]})
    report = {
        "results": results,
        "search": {"source": source, "best_reward": best_reward, "episodes": pruning_cb.episodes,
                   "timesteps": int(agent.num_timesteps), "seconds": search_seconds,
                   "supernet_seconds": env.supernet_seconds,
                   "reward_split_accuracy": best["accuracy"], "groups": [g.name for g in env.graph.groups]},
        "notes": "Every model measured in its inference form (BN folded into the convs where torch.fx can "
                 "trace it). FLOPs count 2 per multiply-add (FlopCounterMode). Latency: median ms on the CPU, "
                 f"{config.threads} thread(s), the models timed interleaved call by call in {REPORT_ROUNDS} rounds; "
                 "accuracy "
                 f"on the test split after {config.finetune_epochs} fine-tune epochs for every pruned model"
                 + (" (distilled from the dense model)." if config.distill else "."),
    }
    env.close()
    return finish_report(run_dir, report, started, format_report, log)


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for the terminal."""
    width = max(10, *(len(name) + 2 for name in report["results"]))
    lines = results_table(report["results"], [
        ("test acc", "test_accuracy", 10, ".4f"), ("FLOPs", "flops", 12, ","), ("ratio", "flops_ratio", 8, ".3f"),
        ("params", "params", 10, ","), ("bytes", "bytes", 10, ","), ("b1 ms", "latency_b1_ms", 9, ".3f"),
        ("b64 ms", "latency_b64_ms", 9, ".3f"), ("b64 ratio", "latency_ratio_b64", 11, ".3f")], name_width=width)
    search = report.get("search", {})
    if "seconds" in search:
        supernet = search.get("supernet_seconds") or 0.0
        lines.append(f"search: {search['episodes']} episodes in {search['seconds']:.1f} s"
                     + (f" (its supernet took {supernet:.1f} s to train, once per model and seed)" if supernet else ""))
    lines.append(report["notes"])
    return "\n".join(lines)
