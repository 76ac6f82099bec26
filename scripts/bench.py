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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunegym.compression.channels import ChannelGraph, L1Importance, prune_channels
from prunegym.compression.checkpoint import write_json
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

ENV_ID = "prunegym/LayerPruning-v0"
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


def uniform_counts(graph: ChannelGraph, flops_ratio: float, multiple: int = 1) -> tuple[float, np.ndarray]:
    """The one keep ratio for every group whose FLOPs ratio is nearest ``flops_ratio``, and its counts."""
    ratios = np.linspace(0.0, 1.0, 1001)
    counts = np.stack([graph.keep_counts(np.full(len(graph.groups), r), multiple=multiple) for r in ratios])
    achieved = np.asarray(graph.flops(counts)) / graph.dense_flops
    best = int(np.argmin(np.abs(achieved - flops_ratio)))
    return float(ratios[best]), counts[best]


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
        keep_ratio, counts = uniform_counts(graph, target, channel_multiple)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["env", "latency", "dynamic", "all"], default="all",
                        help="what to run (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the actions, weights and inputs (default: 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    env = parser.add_argument_group("env")
    env.add_argument("--episodes", type=_positive_int, default=300, help="timed episodes, each way (default: 300)")
    env.add_argument("--warmup-episodes", type=int, default=5, help="untimed episodes first (default: 5)")
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
