"""Benchmarks that print figures and assert nothing: environment throughput, latency against FLOPs,
and the per-input (dynamic) models' batch-1 latency against their mean FLOPs density.

env: episodes and steps per second of prunegym/LayerPruning-v0 made with no keyword (the digits
CNN; the first run trains and caches its base model, which is not timed), under gymnasium.make's
wrappers and unwrapped (in alternating chunks), with seeded random actions after a few warm-up
episodes.

latency: a zoo model (ResNet-20 by default) with random weights and random batch-norm statistics at
32x32, pruned with one uniform keep ratio per FLOPs target (L1 importance), timed on the CPU at batch
1 and batch 64 in this process with one thread count. Dense and pruned models are timed
interleaved call by call and each model's latency is the median of its per-round medians, so
drift on the machine does not bias the ratios. A ratio of latency ratio to FLOPs ratio of 1 means the
pruned model is as much faster as it is smaller; above 1 it gains less than its FLOPs promise.

dynamic: batch-1 latency of per-input models against their mean FLOPs density
(prunegym.agents.dynamic_bench). proxy, finetune: how well each candidate evaluation ranks
allocations, and test accuracy against the fine-tune's length (prunegym.agents.proxy_bench).
parallel: episodes per second of the search with --num-envs copies of the env. scoring: the
search's reward for one candidate, on its sliced sub-network and soft-masked at full width.
search: the best reward each agent's search finds against random search's, in as many episodes
(prunegym.agents.search_bench).
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

from prunegym.agents.cli import json_dict
from prunegym.agents.config import DEFAULT_IMPORTANCE, ENVS, TrainConfig
from prunegym.agents.dynamic_bench import IMAGE_SIZE, bench_dynamic, format_dynamic
from prunegym.agents.proxy_bench import (
    PROXY_SOURCES,
    bench_finetune,
    bench_proxy,
    bench_scoring,
    format_finetune,
    format_proxy,
    format_scoring,
)
from prunegym.agents.search_bench import SEARCHERS, bench_search, format_search
from prunegym.compression.channels import ChannelGraph, prune_channels
from prunegym.compression.checkpoint import write_json
from prunegym.compression.fusion import fold_batchnorm
from prunegym.compression.importance import IMPORTANCES, L1Importance
from prunegym.compression.latency import LatencyTable
from prunegym.compression.metrics import (
    count_flops,
    count_params,
    keep_freed_memory,
    measure_latency_rounds,
    randomize,
)
from prunegym.compression.models import MODELS, build_model
from prunegym.compression.sparsity import uniform_keep_counts
from prunegym.compression.supernet import SUPERNET_SAMPLING
from prunegym.compression.training import BASE_EPOCHS
from prunegym.envs import TASK_LOSSES

ENV_ID = ENVS["layer"]
FINETUNE_EPOCHS, FINETUNE_LR = TrainConfig.finetune_epochs, TrainConfig.finetune_lr  # the report's fine-tune
SUPERNET_EPOCHS = TrainConfig.supernet_epochs

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
    import gymnasium
    from stable_baselines3.common.monitor import Monitor

    from prunegym.agents.config import TrainConfig, env_kwargs
    from prunegym.agents.factory import make_agent
    from prunegym.agents.run_layer import parallel_envs
    from prunegym.compression.metrics import num_threads
    from prunegym.envs import LayerPruningEnv

    if min(num_envs) < 1:
        raise ValueError(f"--num-envs must be integers >= 1, got {num_envs}")
    # a fixed set-up, so that its figures stay comparable: the digits CNN on the digits, no budget
    config = TrainConfig(seed=seed, dataset="digits", flops_target=None, task_loss="cross_entropy", importance="l1",
                         **({} if base_epochs is None else {"base_epochs": base_epochs}))
    kwargs = env_kwargs(config)
    groups = LayerPruningEnv(**kwargs).num_groups  # trains or reads the base model and supernet, untimed

    class StepTimer(gymnasium.Wrapper):  # one env's seconds in ``step``: what copies could share
        seconds = 0.0

        def step(self, action):
            start = time.perf_counter()
            try:
                return self.env.step(action)
            finally:
                self.seconds += time.perf_counter() - start

    results: dict[str, Any] = {"kwargs": kwargs, "timesteps": timesteps, "steps_per_episode": groups, "runs": []}
    for n in num_envs:
        env = StepTimer(Monitor(LayerPruningEnv(**kwargs))) if n == 1 else parallel_envs(kwargs, n, torch.device("cpu"))
        try:
            with num_threads(1 if n > 1 else None):  # as train.py: the copies have the CPUs
                agent = make_agent("ppo", env, episode_length=groups, seed=seed, device="cpu")
                agent.learn(agent.n_steps * agent.n_envs)  # one rollout and update: processes started, caches read
                if n == 1:
                    env.seconds = 0.0  # the timed steps only
                start = time.perf_counter()
                agent.learn(timesteps, reset_num_timesteps=False)
                seconds = time.perf_counter() - start
        finally:
            env.close()
        results["runs"].append({"num_envs": n, "seconds": seconds, "episodes_per_s": timesteps / groups / seconds,
                                "env_step_seconds": env.seconds if n == 1 else None})
    return results


def format_parallel(r: dict[str, Any]) -> str:
    lines = [f"the main job's search (PPO, layer env {r['kwargs']}), {r['timesteps']} timesteps "
             f"({r['timesteps'] // r['steps_per_episode']} episodes) after one untimed rollout",
             f"{'num_envs':<10}{'seconds':>10}{'episodes/s':>12}{'speed-up':>10}"]
    base = r["runs"][0]["episodes_per_s"]
    for x in r["runs"]:
        lines.append(f"{x['num_envs']:<10}{x['seconds']:>10.1f}{x['episodes_per_s']:>12.1f}"
                     f"{x['episodes_per_s'] / base:>9.2f}x")
    one = next((x for x in r["runs"] if x["env_step_seconds"] is not None), None)
    if one is not None:  # Amdahl: copies share the env's steps, not the agent's rollouts and updates
        share = one["env_step_seconds"] / one["seconds"]
        lines.append(f"one env: {one['env_step_seconds']:.1f} s of {one['seconds']:.1f} s in the env's steps "
                     f"({share:.0%}); the rest is the agent's own work, which copies do not share: "
                     + ", ".join(f"{n} copies at most {1 / (1 - share + share / n):.2f}x"
                                 for n in sorted({x['num_envs'] for x in r['runs']} | {2, 4}) if n > 1))
    return "\n".join(lines)


# ---- latency against FLOPs ----------------------------------------------------------------------
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
             f"{r['threads']} thread(s), median of {r['rounds']} interleaved rounds of "
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


def _comma_list(text: str, kind: type, what: str, valid: Any) -> list[Any]:
    """The comma-separated values of ``text`` as ``kind``, each one ``valid``; refused naming ``what``."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from err
    if not values or not all(valid(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def _ratios(text: str) -> list[float]:
    return _comma_list(text, float, "FLOPs ratios in (0, 1)", lambda v: 0 < v < 1)


def _counts(text: str) -> list[int]:
    return _comma_list(text, int, "integers >= 0", lambda v: v >= 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["env", "latency", "dynamic", "all", "proxy", "finetune", "parallel",
                                            "scoring", "search"],
                        default="all", help="what to run (default: all: env, latency and dynamic; proxy, finetune, "
                                            "parallel, scoring and search run for minutes and only when named)")
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
                         help="CPU threads for every timing, and for all the work of proxy, finetune and scoring "
                              f"(default: the CPUs available, {_available_cpus()})")
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
    proxy = parser.add_argument_group("proxy, finetune and scoring (also use --model, --seed, --base-epochs, "
                                      "--threads; scoring: --dataset, --budgets, --candidates, --min-keep)")
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
    proxy.add_argument("--supernet-sampling", choices=SUPERNET_SAMPLING, default="uniform",
                       help="proxy: the supernet's random widths: uniform over every width, or candidates at the "
                            "budget (EagleEye's sampler; one supernet per budget) (default: uniform)")
    proxy.add_argument("--importance", choices=sorted(IMPORTANCES), default=None,
                       help="proxy and search: the order the supernet's channels are put in (default: train.py's, "
                            "group_l1; the tables of docs/search.md and docs/results.md marked filter-L1 order ran "
                            "with l1)")
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
    search = parser.add_argument_group("search (also uses --model, --dataset, --budgets, --supernet-epochs, "
                                       "--supernet-sampling, --importance, --min-keep, --base-epochs, --threads, "
                                       "--device)")
    search.add_argument("--searchers", type=lambda t: _comma_list(t, str, f"some of {','.join(SEARCHERS)}",
                                                                  lambda v: v in SEARCHERS),
                        default=["ppo", "random"],
                        help="the agents, and random search, to compare (default: ppo,random)")
    search.add_argument("--seeds", type=_counts, default=[0, 1, 2, 3, 4],
                        help="seeds of the base model, supernet and searchers (default: 0,1,2,3,4)")
    search.add_argument("--task-loss", choices=TASK_LOSSES, default=TrainConfig.task_loss,
                        help=f"the reward's task loss, as train.py's (default: {TrainConfig.task_loss})")
    search.add_argument("--search-timesteps", type=_positive_int, default=None,
                        help="each agent's timesteps (default: train.py's)")
    search.add_argument("--hyperparameters", type=json_dict, default={},
                        help="a JSON object of overrides of every agent's default hyper-parameters, as train.py's "
                             "(default: none)")
    parser.add_argument("--rounds", type=_positive_int, default=3,
                        help="rounds: dense and pruned models (interleaved call by call), or wrapped and bare env "
                             "(in alternating chunks), are timed this many times (default: 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("warmup_episodes", "warmup"):
        value = getattr(args, name)
        if value is not None and value < 0:
            print(f"error: --{name.replace('_', '-')} must be >= 0, got {value}", file=sys.stderr)
            return 2
    if args.what in ("proxy", "finetune", "scoring", "search"):  # they train and score in this process: its threads
        torch.set_num_threads(args.threads)
    figures: dict[str, Any] = {"machine": machine(), "keeps_freed_memory": keep_freed_memory()}
    m = figures["machine"]
    print(f"torch {m['torch']} on {m['platform']} ({m['processor']}); CPU count {m['cpu_count']}, "
          f"{m['cpus_available']} available; torch.get_num_threads() = {m['torch_num_threads']}; "
          f"load average (1 min) {m['load_average_1min']}"
          f"; freed memory kept (glibc mallopt): {figures['keeps_freed_memory']}")
    base_epochs = BASE_EPOCHS if args.base_epochs is None else args.base_epochs  # proxy, finetune, scoring
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
            figures["proxy"] = []
            for budget in args.budgets:
                print(f"\nproxy fidelity at FLOPs {budget:g}:")
                figures["proxy"].append(bench_proxy(
                    args.model, args.dataset, budget, args.candidates, args.seed, args.finetune_epochs,
                    args.finetune_lr, args.supernet_epochs, args.finetune_steps, args.min_keep, base_epochs,
                    args.device, args.finetune_seeds or [0, 1], args.cells, args.finetune_from,
                    args.supernet_sampling, args.importance or DEFAULT_IMPORTANCE["layer"]))
                print(format_proxy(figures["proxy"][-1]))
        if args.what == "scoring":
            figures["scoring"] = bench_scoring(args.model, args.dataset, args.budgets, args.candidates, args.seed,
                                               base_epochs, args.min_keep)
            print()
            print(format_scoring(figures["scoring"]))
        if args.what == "finetune":
            print("\nfine-tune length:")
            figures["finetune"] = bench_finetune(args.model, args.dataset, args.budgets[0], args.epochs_list,
                                                 args.finetune_seeds or [0, 1, 2], args.seed, args.finetune_lr,
                                                 base_epochs, args.device)
            print(format_finetune(figures["finetune"]))
        if args.what == "search":
            config = TrainConfig(model=args.model, dataset=args.dataset, task_loss=args.task_loss,
                                 supernet_epochs=args.supernet_epochs, supernet_sampling=args.supernet_sampling,
                                 min_keep=args.min_keep, base_epochs=base_epochs, threads=args.threads,
                                 timesteps=args.search_timesteps, device=args.device, importance=args.importance,
                                 hyperparameters=args.hyperparameters)
            figures["search"] = bench_search(config, args.budgets, args.searchers, args.seeds)
            print()
            print(format_search(figures["search"]))
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
