"""The per-layer job, readable top to bottom: base model -> RL search -> best policy -> hard prune
-> fine-tune -> report, everything in one run directory.

Besides what every run directory holds (``prunegym.agents.job``): ``model.pt`` (the pruned,
fine-tuned model with its architecture), ``uniform.pt`` (the uniform baseline, cut from the same
weights), with a supernet ``uniform_l1.pt`` (uniform L1 pruned from the dense model); with a latency
budget also ``latency_greedy.pt``, the widest counts the latency table fits in the budgets.
"""

from __future__ import annotations

import copy
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
from prunegym.compression.fusion import inference_form
from prunegym.compression.importance import L1Importance
from prunegym.compression.latency import narrowed_within, widest_within
from prunegym.compression.metrics import num_threads, relative_latency
from prunegym.compression.sparsity import uniform_keep_counts
from prunegym.compression.training import resolve_device, train_classifier
from prunegym.envs import LayerPruningEnv

from .callbacks import PruningCallback
from .config import TrainConfig, env_kwargs
from .finalists import choose_finalist
from .job import (
    RATIO_BLOCKS,
    add_ratios,
    batch_of_64,
    distillation,
    finish_report,
    measure_models,
    results_table,
    search,
)

__all__ = ["NARROWING_STEPS", "format_report", "measured_latency_check", "parallel_envs", "train_layer"]

# Under a latency budget no candidate of the search measures within: how many times the check narrows
# the best one and times it again.
NARROWING_STEPS = 4


def _layer_env(kwargs: dict[str, Any], device: str, threads: int) -> Monitor:
    torch.set_num_threads(threads)
    return Monitor(LayerPruningEnv(**kwargs, device=device))


def parallel_envs(kwargs: dict[str, Any], n: int, device: torch.device) -> SubprocVecEnv:
    """``n`` copies of ``LayerPruningEnv(**kwargs)``, each in its own process with an equal share of
    the CPUs, stepped together (SB3's ``SubprocVecEnv``; SB3 seeds copy i with the agent's seed + i)."""
    threads = max(1, (os.cpu_count() or 1) // n)
    return SubprocVecEnv([functools.partial(_layer_env, kwargs, str(device), threads) for _ in range(n)])


def _candidates(final: tuple[str, float, dict[str, Any]], top: list[dict[str, Any]]) -> list[tuple[str, float, dict]]:
    """The final deterministic policy and the search's best distinct allocations, best reward first
    (of equal rewards, the final policy), each allocation once."""
    candidates = [final] + [("best search episode" if i == 0 else f"search episode {e['episode']}", e["reward"], e)
                            for i, e in enumerate(top)]
    candidates.sort(key=lambda c: -c[1])
    seen: set[tuple[int, ...]] = set()
    unique = []
    for c in candidates:
        counts = tuple(int(k) for k in c[2]["keep_counts"])
        if counts not in seen:
            seen.add(counts)
            unique.append(c)
    return unique


def measured_latency_check(env: LayerPruningEnv, candidates: list[tuple[str, float, dict]], threads: int,
                           log: Any) -> tuple[dict[str, Any], tuple[str, float, dict]]:
    """Choose the best candidate (best reward first) whose batch-64 latency, measured, is within
    ``env.latency_target`` of the dense model's: the latency table predicts a candidate's latency
    from its layers timed alone, and a candidate it puts inside the budget can run outside it
    (NetAdapt measures instead). Each candidate is pruned from the searched model, in its inference
    form, and timed against the dense model (``relative_latency``), in order, until one is within
    the budget. When none is, the best one is narrowed where the table says that saves the most
    latency per FLOP (``narrowed_within``), to the budget over the table's error as just measured,
    and timed again, up to ``NARROWING_STEPS`` times; if it is still over, the check keeps the
    allocation measured fastest and says so in the log.

    Returns what the report keeps of the check (every candidate, the narrowed ones appended, with
    its predicted and, where timed, measured ratio) and the chosen candidate."""
    if not candidates:
        raise ValueError("no candidates to check the latency of")
    dense, _ = inference_form(copy.deepcopy(env.dense))
    x = batch_of_64(env.splits.train.x)
    target = env.latency_target

    def measured(counts: Any) -> float:
        pruned = prune_channels(env.model, env.graph, env.kept_channels(np.asarray(counts)))
        return relative_latency(inference_form(pruned)[0], dense, x, blocks=RATIO_BLOCKS, threads=threads)

    candidates = list(candidates)
    ratios: list[float | None] = [None] * len(candidates)
    chosen = None
    for i, (_, _, info) in enumerate(candidates):
        ratios[i] = measured(info["keep_counts"])
        if ratios[i] <= target:
            chosen = i
            break
    narrowings = 0
    if chosen is None:
        counts, ratio = np.asarray(candidates[0][2]["keep_counts"]), ratios[0]
        for step in range(1, NARROWING_STEPS + 1):
            # the table's prediction, scaled by how it read against the machine for the last allocation timed
            table_target = target * env.latency.density(counts) / ratio
            if env.latency.density(env.min_counts) > table_target:
                break  # not even the smallest counts would be within
            counts = narrowed_within(env.latency, env.allowed, counts, table_target)
            info = env.evaluate_counts(counts)
            candidates.append((f"best search allocation narrowed ({step})", env.reward_of(info), info))
            ratio = measured(counts)
            ratios.append(ratio)
            narrowings = step
            if ratio <= target:
                chosen = len(candidates) - 1
                break
    within = chosen is not None
    if chosen is None:
        chosen = int(np.argmin([np.inf if r is None else r for r in ratios]))
    searched = len(candidates) - narrowings  # the candidates the search gave; the rest are narrowed
    if within and chosen < searched:
        verdict = f"keeping #{chosen + 1}, the best reward within the budget {target}"
    elif within:
        verdict = (f"none of the search's {searched} within the budget {target}: the best narrowed "
                   f"{narrowings} time(s), #{chosen + 1}, is")
    else:
        verdict = (f"none of {len(candidates)} within the budget {target} (the last {narrowings} narrowed from the "
                   f"best): keeping the fastest, #{chosen + 1}")
    timed = ", ".join(f"{r:.3f}" for r in ratios if r is not None)
    log(f"latency check: the search's best allocations timed against the dense model (batch 64, {threads} "
        f"thread(s)): {timed} of its latency; {verdict}")
    record = {"target": target, "threads": threads, "chosen": chosen, "within": bool(within),
              "candidates": [{"source": source, "reward": reward, "keep_counts": list(info["keep_counts"]),
                              "flops_ratio": info["flops_ratio"],
                              "predicted_latency_ratio": info.get("latency_ratio"), "measured_latency_ratio": ratio}
                             for (source, reward, info), ratio in zip(candidates, ratios, strict=True)]}
    return record, candidates[chosen]


def train_layer(config: TrainConfig, *, resume: bool, progress_bar: bool, log: Any, trust_run: bool,
                baselines: bool = True) -> dict[str, Any]:
    """The per-layer job of ``train`` (``baselines`` as there)."""
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
        # the copies have the CPUs; this process's share of the search (the agent's small network,
        # run while the copies wait) takes one thread, not the threads the copies compute on
        with num_threads(1 if config.num_envs > 1 else None):
            agent, pruning_cb, run_dir = search(
                config, searched, env.num_groups,
                lambda hp: PruningCallback([g.name for g in env.graph.groups], hparams=hp), device=device,
                resume=resume, progress_bar=progress_bar, log=log, env_state=env if config.num_envs == 1 else None,
                trust_run=trust_run, start_action=env.uniform_action() if config.policy_start == "uniform" else None)
    finally:
        if config.num_envs > 1:
            searched.close()
    # this run's search, and the runs it resumes to their last checkpoint (the steps after it are run again)
    search_seconds = pruning_cb.resumed_seconds + time.perf_counter() - search_started
    scored = env.proxy.evaluations if config.num_envs == 1 else None  # distinct candidates; the copies' are theirs

    # 3. The best policy found: the best episode of the search, or the final deterministic policy.
    # Under a latency budget, the best of them whose latency, measured, is within it.
    obs, _ = env.reset()
    done = False
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        obs, reward, done, _, info = env.step(action)
    candidates = _candidates(("final deterministic policy", float(reward), info), pruning_cb.top)
    latency_check = None
    if env.latency_target is not None:
        latency_check, checked = measured_latency_check(env, candidates, config.threads, log)
    # With finalists, the best few by reward are fine-tuned and the lowest reward-split task loss is kept.
    teacher = distillation(config, env.dense)
    finetune = functools.partial(train_classifier, split=splits.train, epochs=config.finetune_epochs,
                                 lr=config.finetune_lr, seed=config.seed, device=device, distill=teacher)
    finalists, finalist_model = None, None
    if latency_check is not None:
        source, best_reward, best = checked
    elif config.finalists:
        chosen, finalist_model, finalists = choose_finalist(env, candidates, config.finalists, finetune, log)
        source, best_reward, best = candidates[chosen]
    else:
        source, best_reward, best = candidates[0]
    counts = np.asarray(best["keep_counts"], dtype=np.int64)
    log(f"best policy ({source}): reward {best_reward:.4f}, FLOPs ratio {best['flops_ratio']:.3f}, "
        f"keep ratios {np.round(best['keep_ratios'], 3).tolist()}")

    # 4. Hard prune and fine-tune the RL choice and the uniform baseline at the same FLOPs, cut from the
    # same weights; with a supernet also uniform L1 from the dense model, the classic rule, fine-tuned as
    # many epochs since the base model as the supernet and the fine-tune together; under a latency budget
    # also the latency-greedy baseline (the widest counts the table fits in the budgets).
    allocations = {"rl": counts}
    if baselines:
        allocations["uniform"] = uniform_keep_counts(env.graph, float(env.graph.flops(counts)) / env.graph.dense_flops,
                                                     env.channel_multiple)
        if env.model is not env.dense:
            allocations["uniform_l1"] = allocations["uniform"]
        if env.latency_target is not None:
            allocations["latency_greedy"] = widest_within(env.latency, env.allowed, flops_target=env.flops_target,
                                                          latency_target=env.latency_target)
    models = {"dense": env.dense}  # the trained base model (env.model is the supernet, when there is one)
    for name, keep in allocations.items():
        if name == "rl" and finalist_model is not None:  # fine-tuned already, as a finalist
            models[name] = finalist_model
        elif name == "uniform_l1":
            kept = env.graph.kept_channels(env.graph.rankings(L1Importance(), model=env.dense), keep)
            models[name] = finetune(prune_channels(env.dense, env.graph, kept),
                                    epochs=config.finetune_epochs + config.supernet_epochs)
        else:
            models[name] = finetune(prune_channels(env.model, env.graph, env.kept_channels(keep)))

    # 5. Report: test split only, latency on the CPU with fixed threads, all models in one process.
    results = measure_models(models, splits, config.threads)
    for name, keep in allocations.items():
        results[name]["keep_ratios"] = (keep / env.graph.num_channels).tolist()
    for result in results.values():
        add_ratios(result, results["dense"])
    arch_of = lambda m: describe_architecture(m, config.model, splits.in_channels, splits.num_classes,  # noqa: E731
                                              splits.image_size)
    save_checkpoint(run_dir / "model.pt", models["rl"], arch_of(models["rl"]),
                    {"kind": "static", "keep_ratios": results["rl"]["keep_ratios"], "run_dir": str(run_dir)})
    for name in ("uniform", "uniform_l1", "latency_greedy"):
        if name in models:
            save_checkpoint(run_dir / f"{name}.pt", models[name], arch_of(models[name]),
                            {"kind": "static", "keep_ratios": results[name]["keep_ratios"]})
    report = {
        "results": results,
        "search": {"source": source, "best_reward": best_reward, "episodes": pruning_cb.episodes,
                   "timesteps": int(agent.num_timesteps), "seconds": search_seconds,
                   **({} if scored is None else {"candidates_scored": scored}),
                   "supernet_seconds": env.supernet_seconds,
                   "reward_split_accuracy": best["accuracy"], "groups": [g.name for g in env.graph.groups],
                   **({} if latency_check is None else {"latency_check": latency_check}),
                   **({} if finalists is None else {"finalists": finalists})},
        "notes": "Every model measured in its inference form (BN folded into the convs where torch.fx can "
                 "trace it). FLOPs count 2 per multiply-add (FlopCounterMode). Latency: median ms on the CPU, "
                 f"{config.threads} thread(s); the dense model's the median of its passes, every other's the dense "
                 "model's times their ratio, timed in alternating blocks of calls; "
                 "accuracy "
                 f"on the test split after {config.finetune_epochs} fine-tune epochs for every pruned model"
                 + (f" ({config.finetune_epochs + config.supernet_epochs} for uniform_l1, pruned from the dense "
                    "model: as many epochs since it as the supernet's and the fine-tune)" if "uniform_l1" in models
                    else "")
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
                     + (f", {search['candidates_scored']} distinct candidates scored (a candidate seen before "
                        "is not scored again)" if "candidates_scored" in search else "")
                     + (f" (its supernet took {supernet:.1f} s to train, once per model and seed)" if supernet else ""))
    if "finalists" in search:
        f = search["finalists"]
        lines.append(f"finalists: the {len(f['candidates'])} best allocations by reward fine-tuned in "
                     f"{f['seconds']:.1f} s; #{f['chosen'] + 1} kept, the lowest loss on the reward split")
    lines.append(report["notes"])
    return "\n".join(lines)
