"""Benchmarks that print figures and assert nothing: environment throughput, latency against FLOPs,
and the per-input (dynamic) models' batch-1 latency against their mean FLOPs density.

env: episodes and steps per second of prunegym/LayerPruning-v0 made with no keyword (the digits
CNN; the first run trains and caches its base model, which is not timed), under gymnasium.make's
wrappers and unwrapped (in alternating chunks), with seeded random actions after a few warm-up
episodes.

latency: a zoo model (ResNet-20 by default) with random weights and random batch-norm statistics at
32x32, pruned with one uniform keep ratio per FLOPs target (L1 importance), timed on the CPU at batch
1 and batch 64 in this process with one thread count. Dense and pruned models are timed in
alternating rounds and each model's latency is the median of its per-round medians, so drift on
the machine does not bias the ratios. A ratio of latency ratio to FLOPs ratio of 1 means the
pruned model is as much faster as it is smaller; above 1 it gains less than its FLOPs promise.

dynamic: a zoo model (ResNet-20 by default) with random weights at 32x32 as a DynamicNetwork (its
gated layers' channels in L1 order, BN folded), driven by a policy actor with random weights (the
architecture train.py --env input trains: obs -> 64 -> 64 -> G, tanh) and by the gate baseline with
random weights, each with its last bias shifted so that it keeps fewer or more groups, and by fixed
actions (the same groups for every input: the network's own cost, no decision). Batch-1
latency is the mean over random inputs of each input's median; the dense model is the plain
BN-folded model on the same inputs. The ideal latency ratio is the mean FLOPs density (of the
network; the policy's own FLOPs are printed beside); the last column is latency ratio / density.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunegym.agents.config import ENVS, TrainConfig
from prunegym.compression.channels import ChannelGraph, L1Importance, prune_channels
from prunegym.compression.checkpoint import read_json, write_json
from prunegym.compression.dynamic import build_dynamic
from prunegym.compression.fusion import fold_batchnorm
from prunegym.compression.gates import GateDecider
from prunegym.compression.latency import LatencyTable
from prunegym.compression.metrics import (
    count_flops,
    count_params,
    keep_freed_memory,
    measure_latency_rounds,
)
from prunegym.compression.models import MODELS, build_model
from prunegym.compression.sparsity import uniform_keep_counts
from prunegym.compression.training import BASE_EPOCHS

ENV_ID = ENVS["layer"]
FINETUNE_EPOCHS, FINETUNE_LR = TrainConfig.finetune_epochs, TrainConfig.finetune_lr  # the report's fine-tune
SUPERNET_EPOCHS = TrainConfig.supernet_epochs
IMAGE_SIZE = 32
BATCH_SIZES = (1, 64)
DEFAULT_REPEATS = {1: 200, 64: 50}
DEFAULT_WARMUP = {1: 20, 64: 5}


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "cpus_available": _available_cpus(), "torch_num_threads": torch.get_num_threads(),
            "load_average_1min": _load_average()}


def _load_average() -> float | None:
    # Other processes on the machine skew every figure; the load average says whether there were any.
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# ---- environment throughput ---------------------------------------------------------------------
def _run_episodes(env: Any, episodes: int) -> int:
    steps = 0
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            done = terminated or truncated
            steps += 1
    return steps


def bench_env(episodes: int, warmup_episodes: int, rounds: int, seed: int,
              base_epochs: int | None) -> dict[str, Any]:
    import gymnasium

    import prunegym.envs  # noqa: F401  (registers the env ids)

    kwargs = {} if base_epochs is None else {"base_epochs": base_epochs}
    started = time.perf_counter()
    env = gymnasium.make(ENV_ID, **kwargs)
    make_seconds = time.perf_counter() - started
    # gymnasium.make's wrappers (order enforcing, the passive env checker) against the bare env,
    # timed in alternating chunks so that drift on the machine favours neither.
    targets = {"wrapped": env, "unwrapped": env.unwrapped}
    env.reset(seed=seed)
    env.action_space.seed(seed)
    for target in targets.values():
        _run_episodes(target, warmup_episodes)
    chunks = [episodes // rounds + (1 if i < episodes % rounds else 0) for i in range(rounds)]
    seconds = dict.fromkeys(targets, 0.0)
    steps = dict.fromkeys(targets, 0)
    for r, chunk in enumerate(c for c in chunks if c):
        for name in list(targets) if r % 2 == 0 else list(targets)[::-1]:
            start = time.perf_counter()
            steps[name] += _run_episodes(targets[name], chunk)
            seconds[name] += time.perf_counter() - start
    env.close()
    results: dict[str, Any] = {"env_id": ENV_ID, "kwargs": kwargs, "make_seconds": make_seconds,
                               "episodes": episodes, "warmup_episodes": warmup_episodes,
                               "steps_per_episode": env.unwrapped.num_groups, "seed": seed}
    for name in targets:
        results[name] = {"seconds": seconds[name], "steps": steps[name], "episodes_per_s": episodes / seconds[name],
                         "steps_per_s": steps[name] / seconds[name], "ms_per_episode": 1e3 * seconds[name] / episodes}
    return results


def format_env(r: dict[str, Any]) -> str:
    lines = [f"environment {r['env_id']} {r['kwargs'] or '(no keywords)'}: {r['steps_per_episode']} steps per "
             f"episode, made in {r['make_seconds']:.2f} s; {r['episodes']} episodes after "
             f"{r['warmup_episodes']} warm-up each, random actions (seed {r['seed']}); "
             f"torch.get_num_threads() = {torch.get_num_threads()}",
             f"{'':<12}{'episodes/s':>12}{'steps/s':>12}{'ms/episode':>12}"]
    for name in ("wrapped", "unwrapped"):
        x = r[name]
        lines.append(f"{name:<12}{x['episodes_per_s']:>12.1f}{x['steps_per_s']:>12.1f}{x['ms_per_episode']:>12.2f}")
    return "\n".join(lines)


def bench_parallel(num_envs: list[int], timesteps: int, seed: int, base_epochs: int | None) -> dict[str, Any]:
    """The main job's search (PPO on the layer env, its default settings) with ``n`` copies of the env
    in parallel processes (``train.py --num-envs n``): episodes per second of ``agent.learn`` over
    ``timesteps``, after one untimed rollout that starts the processes."""
    from stable_baselines3.common.monitor import Monitor

    from prunegym.agents.config import TrainConfig, env_kwargs
    from prunegym.agents.factory import make_agent
    from prunegym.agents.run_layer import parallel_envs
    from prunegym.envs import LayerPruningEnv

    if min(num_envs) < 1:
        raise ValueError(f"--num-envs must be integers >= 1, got {num_envs}")
    config = TrainConfig(seed=seed, **({} if base_epochs is None else {"base_epochs": base_epochs}))
    kwargs = env_kwargs(config)
    groups = LayerPruningEnv(**kwargs).num_groups  # trains or reads the base model and supernet, untimed
    results: dict[str, Any] = {"kwargs": kwargs, "timesteps": timesteps, "steps_per_episode": groups, "runs": []}
    for n in num_envs:
        env = Monitor(LayerPruningEnv(**kwargs)) if n == 1 else parallel_envs(kwargs, n, torch.device("cpu"))
        try:
            agent = make_agent("ppo", env, episode_length=groups, seed=seed, device="cpu")
            agent.learn(agent.n_steps * agent.n_envs)  # one rollout and update: processes started, caches read
            start = time.perf_counter()
            agent.learn(timesteps, reset_num_timesteps=False)
            seconds = time.perf_counter() - start
        finally:
            env.close()
        results["runs"].append({"num_envs": n, "seconds": seconds, "episodes_per_s": timesteps / groups / seconds})
    return results


def format_parallel(r: dict[str, Any]) -> str:
    lines = [f"the main job's search (PPO, layer env {r['kwargs']}), {r['timesteps']} timesteps "
             f"({r['timesteps'] // r['steps_per_episode']} episodes) after one untimed rollout",
             f"{'num_envs':<10}{'seconds':>10}{'episodes/s':>12}{'speed-up':>10}"]
    base = r["runs"][0]["episodes_per_s"]
    for x in r["runs"]:
        lines.append(f"{x['num_envs']:<10}{x['seconds']:>10.1f}{x['episodes_per_s']:>12.1f}"
                     f"{x['episodes_per_s'] / base:>9.2f}x")
    return "\n".join(lines)


# ---- latency against FLOPs ----------------------------------------------------------------------
@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights (the builder's init) and random batch-norm statistics and affine parameters.

    Latency does not depend on the values, but a fresh BN (mean 0, variance 1, scale 1, shift 0) is
    an identity no trained network has; random ones keep the outputs ordinary.
    """
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            n = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            if m.affine:
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()


def bench_latency(model_name: str, targets: list[float], threads: int, repeats: int | None,
                  warmup: int | None, rounds: int, seed: int, fold_bn: bool = True,
                  channel_multiple: int = 1) -> dict[str, Any]:
    torch.manual_seed(seed)
    dense = randomize(build_model(model_name, 3, 10), seed)
    example = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    graph = ChannelGraph(dense, example)
    dense_flops = count_flops(dense, example)
    pruned_models, rows, all_counts = [], [], []
    for target in targets:
        counts = uniform_keep_counts(graph, target, channel_multiple)
        keep_ratio = float(np.mean(counts / graph.num_channels))
        pruned = prune_channels(dense, graph, graph.kept_channels(L1Importance(), counts)).eval()
        pruned_models.append(pruned)
        all_counts.append(counts)
        rows.append({"target": target, "keep_ratio": keep_ratio, "flops": count_flops(pruned, example),
                     "params": count_params(pruned)})
    results: dict[str, Any] = {
        "model": model_name, "input": [3, IMAGE_SIZE, IMAGE_SIZE], "threads": threads, "rounds": rounds,
        "bn_folded": fold_bn, "channel_multiple": channel_multiple,
        "dense": {"flops": dense_flops, "params": count_params(dense)}, "pruned": rows}
    timed = [dense, *pruned_models]
    if fold_bn:  # the inference form of every model: BN folded into the conv before it
        timed = [fold_batchnorm(m) for m in timed]
    for batch in BATCH_SIZES:
        x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed + batch))
        n = repeats if repeats is not None else DEFAULT_REPEATS[batch]
        passes = warmup if warmup is not None else DEFAULT_WARMUP[batch]
        seconds = measure_latency_rounds(timed, x, rounds=rounds, repeats=n, warmup=passes, threads=threads)
        results["dense"][f"latency_b{batch}_ms"] = 1e3 * seconds[0]
        results[f"repeats_b{batch}"] = n
        results[f"warmup_b{batch}"] = passes
        for row, s in zip(rows, seconds[1:], strict=True):
            row[f"latency_b{batch}_ms"] = 1e3 * s
    if fold_bn:  # what the latency table (density="latency") predicts, built after the timings above
        table = LatencyTable(dense, graph, example, batch_size=BATCH_SIZES[-1], threads=threads)
        for row, counts in zip(rows, all_counts, strict=True):
            row[f"predicted_latency_ratio_b{BATCH_SIZES[-1]}"] = table.density(counts)
    for row in rows:
        row["flops_ratio"] = row["flops"] / dense_flops
        row["params_ratio"] = row["params"] / results["dense"]["params"]
        for batch in BATCH_SIZES:
            ratio = row[f"latency_b{batch}_ms"] / results["dense"][f"latency_b{batch}_ms"]
            row[f"latency_ratio_b{batch}"] = ratio
            row[f"latency_over_flops_b{batch}"] = ratio / row["flops_ratio"]
    return results


def format_latency(r: dict[str, Any]) -> str:
    d = r["dense"]
    folded = "BN folded into convs" if r["bn_folded"] else "BN not folded"
    if r["channel_multiple"] > 1:
        folded += f", channel counts multiples of {r['channel_multiple']}"
    lines = [f"latency vs FLOPs: {r['model']} (random weights and BN statistics; {folded}), input {r['input']}, CPU, "
             f"{r['threads']} thread(s), median of {r['rounds']} alternating rounds of "
             f"{r['repeats_b1']} (b1) / {r['repeats_b64']} (b64) timed passes",
             f"dense: {d['flops']:,} FLOPs, {d['params']:,} params, b1 {d['latency_b1_ms']:.3f} ms, "
             f"b64 {d['latency_b64_ms']:.3f} ms"]
    header = (f"{'target':>7}{'keep':>7}{'FLOPs ratio':>13}{'b1 ms':>9}{'b64 ms':>9}{'lat ratio b1':>14}"
              f"{'lat ratio b64':>15}{'b1 / FLOPs':>12}{'b64 / FLOPs':>13}{'table b64':>11}")
    lines += [header, "-" * len(header)]
    for p in r["pruned"]:
        predicted = p.get("predicted_latency_ratio_b64")
        lines.append(f"{p['target']:>7.2f}{p['keep_ratio']:>7.3f}{p['flops_ratio']:>13.3f}{p['latency_b1_ms']:>9.3f}"
                     f"{p['latency_b64_ms']:>9.3f}{p['latency_ratio_b1']:>14.3f}{p['latency_ratio_b64']:>15.3f}"
                     f"{p['latency_over_flops_b1']:>12.2f}{p['latency_over_flops_b64']:>13.2f}"
                     f"{'-' if predicted is None else f'{predicted:.3f}':>11}")
    lines.append("FLOPs count 2 per multiply-add (FlopCounterMode). latency / FLOPs ratio 1: the pruned model is "
                 "as much faster as it is smaller. table b64: the latency ratio the latency lookup table "
                 "(density='latency') predicts, against the measured lat ratio b64 beside it.")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------
# ---- per-input (dynamic) models ----------------------------------------------------------------
def _policy_actor(obs_size: int, groups: int, preferred: int | None, generator: torch.Generator) -> list[nn.Module]:
    layers = [nn.Linear(obs_size, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, groups)]
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.in_features ** 0.5)
                layer.bias.zero_()
        if preferred is not None:
            layers[-1].bias[preferred] = 1.5
    return layers


@torch.no_grad()
def bench_dynamic(model_name: str, groups: int, threads: int, inputs: int, repeats: int, rounds: int,
                  seed: int, tune: bool) -> dict[str, Any]:
    from prunegym.agents.gated import PolicyDecider
    from prunegym.envs.input_pruning import observation_stats

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dense = randomize(build_model(model_name, 3, 10), seed)
    x = torch.randn(inputs, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    folded = fold_batchnorm(dense)
    deciders: list[tuple[str, Any]] = []
    base, _, spec = build_dynamic(dense, x[:1], groups)
    stats = observation_stats(base, torch.randn(64, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    obs_size = stats[0].shape[1] + len(spec.layers) + 1
    for preferred in (0, 1, 2, None):
        label = "rl (random actor)" + ("" if preferred is None else f", prefers {preferred + 1}/{groups}")
        deciders.append((label, PolicyDecider(_policy_actor(obs_size, groups, preferred, generator), *stats)))
    for kept in range(groups):  # the network alone: every input keeps the same groups, nothing decides
        deciders.append((f"fixed {kept + 1}/{groups} (no decider)", lambda gate, features, spent, a=kept: a))
    for shift in (-1.0, 0.5, 2.0):
        gate = GateDecider(spec)
        for g in gate.gates:
            g.fc2.bias.fill_(shift)
        deciders.append((f"gate (random, bias {shift:+.1f})", gate.eval()))
    policy_flops = 2 * sum(m.in_features * m.out_features for m in deciders[0][1].actor if isinstance(m, nn.Linear))
    rows = []
    models: list[nn.Module] = [folded]
    for label, decider in deciders:
        net, _, _ = build_dynamic(dense, x[:1], groups, decider=decider)
        net.eval()
        if tune:
            net.tune(x[:1])
        densities = []
        for i in range(inputs):
            net(x[i:i + 1])
            densities.append(float(net.last_density))
        rows.append({"model": label, "density_mean": float(np.mean(densities)),
                     "density_std": float(np.std(densities))})
        models.append(net)
    if tune:  # the fair dense reference runs the same kernels: the dynamic path keeping everything
        reference, _, _ = build_dynamic(dense, x[:1], groups, decider=lambda g, f, s: groups - 1)
        reference.eval()
        reference.tune(x[:1])
        models[0] = reference
    latency = measure_latency_rounds(models, x, rounds=rounds, repeats=repeats, warmup=2, threads=threads,
                                     per_input=True)
    for row, ms in zip(rows, latency[1:], strict=True):
        row["latency_b1_ms"] = 1e3 * ms
        row["latency_ratio"] = ms / latency[0]
        row["ratio_over_density"] = row["latency_ratio"] / row["density_mean"]
    return {"model": model_name, "image_size": IMAGE_SIZE, "groups": groups, "threads": threads,
            "inputs": inputs, "repeats": repeats, "rounds": rounds, "tuned_kernels": tune,
            "gated_layers": [layer.name for layer in spec.layers], "dense_flops": spec.dense_flops,
            "policy_flops_per_input": policy_flops * len(spec.layers),
            "dense_b1_ms": 1e3 * latency[0], "rows": rows}


def format_dynamic(r: dict[str, Any]) -> str:
    lines = [f"per-input models, {r['model']} at {r['image_size']}x{r['image_size']}, batch 1, {r['threads']} "
             f"thread(s), {r['groups']} groups per gated layer ({len(r['gated_layers'])} layers), "
             f"{'tuned' if r['tuned_kernels'] else 'ATen'} kernels; dense {r['dense_b1_ms']:.3f} ms, "
             f"{r['dense_flops'] / 1e6:.1f} MFLOPs; policy {r['policy_flops_per_input'] / 1e6:.3f} MFLOPs per input",
             f"{'model':<34}{'density':>9}{'± std':>8}{'b1 ms':>9}{'lat ratio':>11}{'ratio/density':>15}"]
    for row in r["rows"]:
        lines.append(f"{row['model']:<34}{row['density_mean']:>9.3f}{row['density_std']:>8.3f}"
                     f"{row['latency_b1_ms']:>9.3f}{row['latency_ratio']:>11.3f}{row['ratio_over_density']:>15.3f}")
    return "\n".join(lines)


# ---- proxy fidelity: how well each candidate evaluation ranks candidates ------------------------
PROXY_METRICS = (("loss", -1.0), ("accuracy", 1.0), ("distillation", -1.0))  # (metric, sign: higher is better)
PROXY_SOURCES = ("dense", "supernet")  # the models candidates are pruned from


def _proxy_sources(model_name: str, dataset: str, seed: int, base_epochs: int, supernet_epochs: int,
                   min_keep: float, device: torch.device) -> tuple[Any, dict[str, tuple[nn.Module, Any, list]]]:
    """The splits, and each model candidates are pruned from: its channel graph and ranking."""
    from prunegym.compression.data import load_dataset
    from prunegym.compression.supernet import prefix_kept, supernet_model
    from prunegym.compression.training import base_model

    splits = load_dataset(dataset, seed)
    example = splits.train.x[:1].to(device)
    dense = base_model(model_name, splits, seed, epochs=base_epochs, device=device).eval()
    graph = ChannelGraph(dense, example)
    sources = {"dense": (dense, graph, graph.rankings(L1Importance()))}
    if supernet_epochs:
        supernet, _ = supernet_model(model_name, dense, splits, seed, base_epochs=base_epochs, epochs=supernet_epochs,
                                  min_keep=min_keep, importance=L1Importance(), device=device)
        supernet_graph = ChannelGraph(supernet, example)
        sources["supernet"] = (supernet, supernet_graph, prefix_kept(supernet_graph.num_channels))
    return splits, sources


def _finetune_cell(cells: Path | None, settings: dict[str, Any], compute: Any) -> tuple[float, float, float]:
    """``compute()`` (test accuracy and loss) and the seconds it took, or what was saved for the same
    ``settings`` in ``cells`` (then saved there): an interrupted benchmark continues where it stopped.
    A cell saved with other settings is refused; one saved without the loss is measured again."""
    started = time.perf_counter()
    path = None
    if cells is not None:
        name = "__".join(f"{k}{v}" for k, v in settings.items()
                         if k in ("source", "budget", "candidate", "finetune_seed"))
        path = cells / f"{name}.json"
        if path.is_file():
            saved = read_json(path)
            if saved.get("settings") != settings:
                raise ValueError(f"{path} was measured with other settings ({saved.get('settings')}, not {settings}); "
                                 "pass another --cells folder")
            if "loss" in saved:
                return float(saved["accuracy"]), float(saved["loss"]), float(saved["seconds"])
    accuracy, loss = map(float, compute())
    seconds = time.perf_counter() - started
    if path is not None:
        write_json(path, {"settings": settings, "accuracy": accuracy, "loss": loss, "seconds": seconds})
    return accuracy, loss, seconds


def bench_proxy(model_name: str, dataset: str, budget: float, candidates: int, seed: int, finetune_epochs: int,
                finetune_lr: float, supernet_epochs: int, finetune_steps: list[int], min_keep: float,
                base_epochs: int, device: str, finetune_seeds: list[int], cells: Path | None = None,
                finetune_from: Sequence[str] = PROXY_SOURCES, log: Any = print) -> dict[str, Any]:
    """Sample ``candidates`` random allocations at ``budget`` (EagleEye's sampler), fine-tune each
    with the report's recipe once per fine-tune seed (pruned from each model in ``finetune_from``:
    the dense model, the supernet), and score each with every candidate evaluation a search can use;
    returns every score and the fine-tuned accuracies. With ``cells``, each fine-tuned accuracy is
    saved there as it is measured and read back by a rerun with the same settings."""
    import math

    from prunegym.compression.channels import prune_channels as prune
    from prunegym.compression.proxy import RECALIBRATION_BATCH, ProxyEvaluator
    from prunegym.compression.sparsity import random_keep_counts
    from prunegym.compression.supernet import width_choices
    from prunegym.compression.training import evaluate, resolve_device, train_classifier

    unknown = [s for s in finetune_from if s not in PROXY_SOURCES]
    if unknown or not finetune_from:
        raise ValueError(f"finetune_from must name some of {PROXY_SOURCES}, got {list(finetune_from)!r}")
    if "supernet" in finetune_from and not supernet_epochs:
        raise ValueError("fine-tuning candidates cut from the supernet needs supernet_epochs > 0")
    device = resolve_device(device)
    splits, sources = _proxy_sources(model_name, dataset, seed, base_epochs, supernet_epochs, min_keep, device)
    _, graph, _ = sources["dense"]
    rng = np.random.default_rng([seed, round(budget * 1e6)])
    choices = width_choices(graph, min_keep)
    allocations = [random_keep_counts(graph, budget, choices, rng) for _ in range(candidates)]
    all_batches = math.ceil(len(splits.train) / RECALIBRATION_BATCH)
    proxies = []
    for source in sources:
        prefix = "" if source == "dense" else "supernet, "
        proxies += [(f"{prefix}BN 2 batches", source, {"recalibration_batches": 2}),
                    (f"{prefix}BN {all_batches} batches (adaptive BN)", source,
                     {"recalibration_batches": all_batches})]
        proxies += [(f"{prefix}fine-tune {n} steps", source, {"recalibration_batches": 0, "finetune_steps": n})
                    for n in finetune_steps]

    def finetuned(model: nn.Module, graph: ChannelGraph, kept: list[torch.Tensor],
                  finetune_seed: int) -> tuple[float, float]:
        pruned = train_classifier(prune(model, graph, kept), splits.train, epochs=finetune_epochs, lr=finetune_lr,
                                  seed=finetune_seed, device=device)
        loss, accuracy = evaluate(pruned, splits.test, device=device)
        return accuracy, loss

    # source -> per candidate, the accuracy after each fine-tune seed; candidate by candidate, every
    # source in turn, so that an interrupted run (--cells) leaves the same candidates for each source
    truth: dict[str, list[list[float]]] = {source: [] for source in sources if source in finetune_from}
    truth_loss: dict[str, list[list[float]]] = {source: [] for source in truth}
    spent: dict[str, list[float]] = {source: [] for source in truth}
    for i, counts in enumerate(allocations):
        for source in truth:
            model, source_graph, ranking = sources[source]
            kept = source_graph.kept_channels(ranking, counts)
            truth[source].append([])
            truth_loss[source].append([])
            for s in finetune_seeds:
                settings = {"model": model_name, "dataset": dataset, "seed": seed, "base_epochs": base_epochs,
                            "supernet_epochs": supernet_epochs if source == "supernet" else 0, "min_keep": min_keep,
                            "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr, "source": source,
                            "budget": budget, "candidate": i, "finetune_seed": s, "keep_counts": counts.tolist()}
                accuracy, loss, seconds = _finetune_cell(cells, settings,
                                                         partial(finetuned, model, source_graph, kept, s))
                truth[source][-1].append(accuracy)
                truth_loss[source][-1].append(loss)
                spent[source].append(seconds)
            log(f"  {source} candidate {i + 1}/{candidates}: fine-tuned test accuracy "
                f"{np.round(truth[source][-1], 4).tolist()}")
    truth_seconds = {source: float(np.mean(seconds)) for source, seconds in spent.items()}  # as measured
    rows = []
    for name, source, kwargs in proxies:
        model, source_graph, ranking = sources[source]
        evaluator = ProxyEvaluator(model, source_graph, ranking, splits.train, finetune_lr=1e-3, seed=seed,
                                   device=device, **kwargs)
        scores, started = [], time.perf_counter()
        for counts in allocations:
            scores.append(evaluator(counts, splits.reward))
        seconds = (time.perf_counter() - started) / candidates
        evaluator.close()
        log(f"  {name}: {seconds:.3f} s per candidate")
        rows.append({"proxy": name, "source": source, "seconds": seconds, "scores": scores})
    return {"model": model_name, "dataset": dataset, "budget": budget, "candidates": candidates, "seed": seed,
            "min_keep": min_keep, "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr,
            "supernet_epochs": supernet_epochs, "finetune_seeds": finetune_seeds,
            "keep_counts": [c.tolist() for c in allocations],
            "flops_ratios": [float(graph.flops(c)) / graph.dense_flops for c in allocations],
            "finetuned_accuracy": truth, "finetuned_loss": truth_loss, "finetune_seconds": truth_seconds,
            "proxies": rows}


def _mean_truth(r: dict[str, Any], measure: str = "accuracy") -> dict[str, np.ndarray]:
    """Each source's fine-tuned test accuracy (or loss) per candidate, averaged over the fine-tune
    seeds; no loss in results measured before it was recorded."""
    return {source: np.asarray(v).mean(axis=1) for source, v in r.get(f"finetuned_{measure}", {}).items()}


def proxy_reliability(r: dict[str, Any]) -> dict[str, float]:
    """Per source, Spearman between the candidates' accuracies after two fine-tune seeds (the first
    two): how well the fine-tuned accuracy ranks candidates itself, the ceiling for any proxy."""
    from prunegym.compression.statistics import spearman

    return {source: spearman(np.asarray(acc)[:, 0], np.asarray(acc)[:, 1])
            for source, acc in r["finetuned_accuracy"].items() if np.asarray(acc).shape[1] > 1}


def proxy_table(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Per proxy and metric: Spearman with each source's fine-tuned test accuracy and with its
    negated test loss (means over the fine-tune seeds; the loss ranks candidates whose accuracies tie
    on a small test split), and the fine-tuned accuracy of the candidate it ranks first."""
    from prunegym.compression.statistics import spearman

    truth, truth_loss = _mean_truth(r), _mean_truth(r, "loss")
    table = []
    for row in r["proxies"]:
        for metric, sign in PROXY_METRICS:
            score = [sign * s[metric] for s in row["scores"]]
            entry = {"proxy": row["proxy"], "metric": metric, "source": row["source"], "seconds": row["seconds"]}
            for source, accuracy in truth.items():
                entry[f"spearman_{source}"] = spearman(score, accuracy)
            for source, loss in truth_loss.items():
                entry[f"spearman_{source}_loss"] = spearman(score, -loss)
            entry["top1_accuracy"] = (float(truth[row["source"]][int(np.argmax(score))]) if row["source"] in truth
                                      else float("nan"))  # its own model's candidates were not fine-tuned
            table.append(entry)
    return table


def format_proxy(r: dict[str, Any]) -> str:
    sources = list(r["finetuned_accuracy"])
    columns = [(f"ρ {s}", f"spearman_{s}") for s in sources] + [(f"ρ {s} loss", f"spearman_{s}_loss")
                                                                 for s in r.get("finetuned_loss", {})]
    truth, reliability = _mean_truth(r), proxy_reliability(r)
    lines = [f"proxy fidelity: {r['model']} on {r['dataset']}, {r['candidates']} random allocations at FLOPs "
             f"{r['budget']:g} (ratios {min(r['flops_ratios']):.3f}-{max(r['flops_ratios']):.3f}), seed {r['seed']}, "
             f"min_keep {r['min_keep']:g}; each fine-tuned {r['finetune_epochs']} epochs at lr {r['finetune_lr']:g} "
             f"with fine-tune seeds {r['finetune_seeds']}"
             + (f"; supernet trained {r['supernet_epochs']} epochs" if r["supernet_epochs"] else "")]
    for source in sources:
        acc = 100 * truth[source]
        spread = 100 * np.asarray(r["finetuned_accuracy"][source]).std(axis=1, ddof=1).mean() \
            if len(r["finetune_seeds"]) > 1 else float("nan")
        lines.append(f"fine-tuned from {source}: test accuracy over candidates {acc.mean():.2f} ± {acc.std(ddof=1):.2f}"
                     f" (min {acc.min():.2f}, max {acc.max():.2f}); over fine-tune seeds ± {spread:.2f}; "
                     f"ρ between two fine-tune seeds {reliability.get(source, float('nan')):.2f}; "
                     f"{r['finetune_seconds'][source]:.1f} s per fine-tune")
    header = f"{'candidate evaluation':<40}{'score':>14}" + "".join(f"{c:>17}" for c, _ in columns) + \
        f"{'top-1 acc':>11}{'s/eval':>9}"
    lines += [header, "-" * len(header)]
    for e in proxy_table(r):
        score = ("-" if e["metric"] != "accuracy" else "") + e["metric"]
        lines.append(f"{e['proxy']:<40}{score:>14}" + "".join(f"{e[key]:>17.2f}" for _, key in columns)
                     + f"{100 * e['top1_accuracy']:>11.2f}{e['seconds']:>9.3f}")
    lines.append("ρ: Spearman rank correlation of the score with the test accuracy (ρ ... loss: the negated test "
                 "loss) after the fine-tune, for candidates "
                 "pruned from that model; top-1 acc: the fine-tuned accuracy of the candidate the score ranks first "
                 "(from the model the evaluation prunes); scores on the reward split.")
    return "\n".join(lines)


# ---- fine-tune length: where test accuracy stops moving ------------------------------------------
def bench_finetune(model_name: str, dataset: str, budget: float, epochs: list[int], finetune_seeds: list[int],
                   seed: int, finetune_lr: float, base_epochs: int, device: str, log: Any = print) -> dict[str, Any]:
    """Test accuracy of one allocation (uniform L1 at ``budget``) after fine-tunes of each length in
    ``epochs``, for each fine-tune seed (the order of the batches; base model and split fixed by ``seed``)."""
    from prunegym.compression.channels import prune_channels as prune
    from prunegym.compression.data import load_dataset
    from prunegym.compression.sparsity import uniform_keep_counts
    from prunegym.compression.training import base_model, evaluate, resolve_device, train_classifier

    device = resolve_device(device)
    splits = load_dataset(dataset, seed)
    dense = base_model(model_name, splits, seed, epochs=base_epochs, device=device).eval()
    graph = ChannelGraph(dense, splits.train.x[:1].to(device))
    counts = uniform_keep_counts(graph, budget)
    kept = graph.kept_channels(L1Importance(), counts)
    rows = []
    for n in epochs:
        accuracies, started = [], time.perf_counter()
        for s in finetune_seeds:
            pruned = train_classifier(prune(dense, graph, kept), splits.train, epochs=n, lr=finetune_lr, seed=s,
                                      device=device)
            accuracies.append(evaluate(pruned, splits.test, device=device)[1])
        rows.append({"epochs": n, "accuracies": accuracies,
                     "seconds": (time.perf_counter() - started) / len(finetune_seeds)})
        log(f"  {n} epochs: {np.round(100 * np.asarray(accuracies), 2).tolist()}")
    return {"model": model_name, "dataset": dataset, "budget": budget, "seed": seed, "finetune_lr": finetune_lr,
            "finetune_seeds": finetune_seeds, "keep_counts": counts.tolist(),
            "flops_ratio": float(graph.flops(counts)) / graph.dense_flops, "rows": rows}


def format_finetune(r: dict[str, Any]) -> str:
    lines = [f"fine-tune length: {r['model']} on {r['dataset']} (seed {r['seed']}), uniform L1 at FLOPs "
             f"{r['flops_ratio']:.3f}, lr {r['finetune_lr']:g}, fine-tune seeds {r['finetune_seeds']}",
             f"{'epochs':>7}{'test acc %':>16}{'min':>8}{'max':>8}{'s/fine-tune':>13}"]
    for row in r["rows"]:
        acc = 100 * np.asarray(row["accuracies"])
        std = acc.std(ddof=1) if len(acc) > 1 else 0.0
        lines.append(f"{row['epochs']:>7}{f'{acc.mean():.2f} ± {std:.2f}':>16}{acc.min():>8.2f}{acc.max():>8.2f}"
                     f"{row['seconds']:>13.1f}")
    return "\n".join(lines)


def _sources(text: str) -> list[str]:
    sources = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in sources if s not in PROXY_SOURCES]
    if bad or not sources:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(PROXY_SOURCES)}, got {text!r}")
    return sources


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected FLOPs ratios in (0, 1), got {text!r}")
    return values


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["env", "latency", "dynamic", "all", "proxy", "finetune", "parallel"],
                        default="all", help="what to run (default: all: env, latency and dynamic; proxy, finetune "
                                            "and parallel run for minutes and only when named)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the actions, weights and inputs (default: 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    env = parser.add_argument_group("env")
    env.add_argument("--episodes", type=_positive_int, default=300, help="timed episodes, each way (default: 300)")
    env.add_argument("--warmup-episodes", type=int, default=5, help="untimed episodes first (default: 5)")
    env.add_argument("--num-envs", type=_counts, default=[1, 2],
                     help="parallel: the search's env copies to time, in turn (default: 1,2)")
    env.add_argument("--timesteps", type=_positive_int, default=1536,
                     help="parallel: timed timesteps of the search at each num_envs (default: 1536)")
    env.add_argument("--base-epochs", type=int, default=None,
                     help="pass base_epochs to the env (a quicker, differently cached base model); default: "
                          "no keyword, the env's own default")
    latency = parser.add_argument_group("latency")
    latency.add_argument("--model", default="resnet20", help=f"zoo model, one of {sorted(MODELS)} or "
                         "'package.module:factory' (default: resnet20)")
    latency.add_argument("--flops-ratios", type=_ratios, default=[0.25, 0.5, 0.75],
                         help="FLOPs targets of the uniformly pruned models (default: 0.25,0.5,0.75)")
    latency.add_argument("--threads", type=_positive_int, default=_available_cpus(),
                         help=f"CPU threads for every timing (default: the CPUs available, {_available_cpus()})")
    latency.add_argument("--repeats", type=_positive_int, default=None,
                         help="timed passes per round (default: 200 at batch 1, 50 at batch 64)")
    latency.add_argument("--warmup", type=int, default=None,
                         help="untimed passes before each timing (default: 20 at batch 1, 5 at batch 64)")
    latency.add_argument("--channel-multiple", type=_positive_int, default=1,
                         help="prune to channel counts that are multiples of this (default: 1)")
    latency.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                         help="time the inference form, BN folded into the convs, of dense and pruned models "
                              "alike (default: on)")
    dynamic = parser.add_argument_group("dynamic (also uses --model, --threads, --rounds)")
    dynamic.add_argument("--groups", type=_positive_int, default=4, help="channel groups per gated layer (default: 4)")
    dynamic.add_argument("--inputs", type=_positive_int, default=32,
                         help="random inputs the batch-1 latency is averaged over (default: 32)")
    dynamic.add_argument("--input-repeats", type=_positive_int, default=15,
                         help="timed passes of each input per round (default: 15)")
    dynamic.add_argument("--tune-kernels", action="store_true",
                         help="pick each conv slice's fastest batch-1 kernel (ATen, NNPACK, oneDNN) for the gated "
                              "models and a dense reference run through the same path")
    proxy = parser.add_argument_group("proxy and finetune (also use --model, --seed, --base-epochs)")
    proxy.add_argument("--dataset", default="digits", help="dataset spec (default: digits)")
    proxy.add_argument("--budgets", type=_ratios, default=[0.25, 0.5],
                       help="proxy: FLOPs budgets the candidates are sampled at; finetune: the first is the "
                            "uniform allocation's budget (default: 0.25,0.5)")
    proxy.add_argument("--candidates", type=_positive_int, default=24,
                       help="proxy: random allocations per budget (default: 24)")
    proxy.add_argument("--finetune-epochs", type=int, default=FINETUNE_EPOCHS,
                       help=f"proxy: the fine-tune each candidate gets, as the report's (default: {FINETUNE_EPOCHS})")
    proxy.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                       help=f"learning rate of every fine-tune (default: {FINETUNE_LR})")
    proxy.add_argument("--supernet-epochs", type=int, default=SUPERNET_EPOCHS,
                       help=f"proxy: epochs of the supernet the supernet evaluations prune from; 0: none "
                            f"(default: {SUPERNET_EPOCHS})")
    proxy.add_argument("--finetune-steps", type=_counts, default=[20, 60],
                       help="proxy: lengths of the short-term fine-tune evaluation, in batches of 64 "
                            "(default: 20,60)")
    proxy.add_argument("--min-keep", type=float, default=0.25,
                       help="proxy: the smallest keep ratio of a group in a sampled allocation (default: 0.25)")
    proxy.add_argument("--epochs-list", type=_counts, default=[5, 10, 20, 40, 80],
                       help="finetune: the fine-tune lengths to measure, in epochs (default: 5,10,20,40,80)")
    proxy.add_argument("--finetune-seeds", type=_counts, default=None,
                       help="the fine-tune seeds (batch orders): proxy: each candidate's fine-tuned accuracy is the "
                            "mean over them (default: 0,1); finetune: at each length (default: 0,1,2)")
    proxy.add_argument("--finetune-from", type=_sources, default=list(PROXY_SOURCES),
                       help="proxy: fine-tune the candidates pruned from these models, comma-separated: dense, "
                            "supernet (default: both); every evaluation is scored either way")
    proxy.add_argument("--device", default="auto", help="where training runs (default: auto)")
    proxy.add_argument("--cells", type=Path, default=None,
                       help="proxy: save each fine-tuned accuracy in this folder as it is measured; a rerun with the "
                            "same folder and settings continues from them")
    parser.add_argument("--rounds", type=_positive_int, default=3,
                        help="alternating rounds: dense and pruned models, or wrapped and bare env, take turns "
                             "this many times (default: 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("warmup_episodes", "warmup"):
        value = getattr(args, name)
        if value is not None and value < 0:
            print(f"error: --{name.replace('_', '-')} must be >= 0, got {value}", file=sys.stderr)
            return 2
    figures: dict[str, Any] = {"machine": machine(), "keeps_freed_memory": keep_freed_memory()}
    m = figures["machine"]
    print(f"torch {m['torch']} on {m['platform']} ({m['processor']}); CPU count {m['cpu_count']}, "
          f"{m['cpus_available']} available; torch.get_num_threads() = {m['torch_num_threads']}; "
          f"load average (1 min) {m['load_average_1min']}"
          f"; freed memory kept (glibc mallopt): {figures['keeps_freed_memory']}")
    try:
        if args.what in ("env", "all"):
            figures["env"] = bench_env(args.episodes, args.warmup_episodes, args.rounds, args.seed,
                                       args.base_epochs)
            print()
            print(format_env(figures["env"]))
        if args.what in ("latency", "all"):
            figures["latency"] = bench_latency(args.model, args.flops_ratios, args.threads, args.repeats,
                                               args.warmup, args.rounds, args.seed, args.fold_bn,
                                               args.channel_multiple)
            print()
            print(format_latency(figures["latency"]))
        if args.what in ("dynamic", "all"):
            figures["dynamic"] = bench_dynamic(args.model, args.groups, args.threads, args.inputs, args.input_repeats,
                                               args.rounds, args.seed, args.tune_kernels)
            print()
            print(format_dynamic(figures["dynamic"]))
        if args.what == "parallel":
            figures["parallel"] = bench_parallel(args.num_envs, args.timesteps, args.seed, args.base_epochs)
            print()
            print(format_parallel(figures["parallel"]))
        if args.what == "proxy":
            base_epochs = BASE_EPOCHS if args.base_epochs is None else args.base_epochs
            figures["proxy"] = []
            for budget in args.budgets:
                print(f"\nproxy fidelity at FLOPs {budget:g}:")
                figures["proxy"].append(bench_proxy(
                    args.model, args.dataset, budget, args.candidates, args.seed, args.finetune_epochs,
                    args.finetune_lr, args.supernet_epochs, args.finetune_steps, args.min_keep, base_epochs,
                    args.device, args.finetune_seeds or [0, 1], args.cells, args.finetune_from))
                print(format_proxy(figures["proxy"][-1]))
        if args.what == "finetune":
            base_epochs = BASE_EPOCHS if args.base_epochs is None else args.base_epochs
            print("\nfine-tune length:")
            figures["finetune"] = bench_finetune(args.model, args.dataset, args.budgets[0], args.epochs_list,
                                                 args.finetune_seeds or [0, 1, 2], args.seed, args.finetune_lr,
                                                 base_epochs, args.device)
            print(format_finetune(figures["finetune"]))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    figures["load_average_1min_after"] = _load_average()
    print(f"\nload average (1 min) at the end: {figures['load_average_1min_after']}")
    if args.json is not None:
        write_json(args.json, figures)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
