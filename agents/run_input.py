"""The per-input job (``scripts/train.py --env input``), readable top to bottom: base model -> dynamic
network -> RL search on the batched InputPruning env -> policy-gated network -> fine-tune with the
policy deciding -> the gate baseline trained at the same mean density -> report.

The run directory holds ``config.json``, ``checkpoints/``, ``tb/``, ``agent.zip``, ``model.pt``
(the policy-gated network), ``gate.pt`` (the gate baseline) and ``report.json``, written last.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecMonitor

from prunegym.compression.checkpoint import describe_architecture, save_checkpoint
from prunegym.compression.dynamic import DynamicNetwork, evaluate_dynamic
from prunegym.compression.fusion import inference_form
from prunegym.compression.gates import dynamic_inference, train_dynamic, train_gates
from prunegym.compression.importance import make_importance
from prunegym.compression.metrics import count_flops, count_params, measure_latency_rounds, model_bytes
from prunegym.compression.training import base_model, evaluate, resolve_device
from prunegym.envs.input_pruning import make_setup

from .callbacks import InputPruningCallback
from .config import env_kwargs
from .gated import PolicyDecider
from .job import add_ratios, batch_of_64, distillation, finish_report, results_table, search
from .vec_env import BatchedInputPruningVecEnv

__all__ = ["train_input", "format_input_report"]

LATENCY_INPUTS = 32  # test inputs the batch-1 latency is averaged over
REPORT_ROUNDS = 3  # the report's models take turns this many times at each latency measurement


def _latencies(models: dict[str, torch.nn.Module], x: torch.Tensor, threads: int) -> dict[str, dict[str, float]]:
    """Batch-1 (averaged over the first ``LATENCY_INPUTS`` inputs) and batch-64 latency of each model,
    the models timed interleaved call by call (``latency_rounds``)."""
    b1 = measure_latency_rounds(list(models.values()), x[:LATENCY_INPUTS], rounds=REPORT_ROUNDS, repeats=15,
                                warmup=2, threads=threads, per_input=True)
    b64 = measure_latency_rounds(list(models.values()), batch_of_64(x), rounds=REPORT_ROUNDS, repeats=30,
                                 warmup=3, threads=threads)
    return {name: {"latency_b1_ms": 1e3 * t1, "latency_b64_ms": 1e3 * t64}
            for name, t1, t64 in zip(models, b1, b64, strict=True)}


def _dynamic_result(net: DynamicNetwork, splits) -> dict[str, Any]:
    result = evaluate_dynamic(net, splits.test.x, splits.test.y)
    actions = result.pop("actions")
    densities = result.pop("densities")
    counts = np.array([layer.counts for layer in net.spec.layers])
    channels = np.array([layer.channels for layer in net.spec.layers])
    keep = counts[np.arange(len(channels)), actions] / channels
    return {"test_accuracy": result["accuracy"], "test_loss": result["loss"],
            "density_mean": result["density_mean"], "density_std": result["density_std"],
            "density_p10": float(np.percentile(densities, 10)), "density_p90": float(np.percentile(densities, 90)),
            "density_latency_inputs": float(densities[:LATENCY_INPUTS].mean()),
            "flops_mean": result["density_mean"] * net.spec.dense_flops,
            "keep_ratio_mean": keep.mean(axis=0).tolist(), "params": count_params(net)}


def _save_dynamic(path: Path, model: torch.nn.Module, net: DynamicNetwork, config, splits, extra: dict) -> None:
    arch = describe_architecture(model, config.model, splits.in_channels, splits.num_classes, splits.image_size)
    decider = net.decider
    save_checkpoint(path, model, arch, {
        "kind": "dynamic", "spec": net.spec.to_dict(),
        "decider": {"config": decider.config(),
                    "state_dict": {k: v.detach().cpu() for k, v in decider.state_dict().items()}},
        "kernels": net.kernels(), **extra})


def train_input(config, *, resume: bool = False, progress_bar: bool = False, log: Any = print,
                trust_run: bool = False) -> dict[str, Any]:
    """Run the per-input job for a validated ``TrainConfig`` with ``env="input"``; return the report."""
    device = resolve_device(config.device)
    started = time.perf_counter()

    # 1. Base model (cached), its dynamic network and the batched env, before the run directory.
    kwargs = env_kwargs(config)
    setup = make_setup(kwargs["model"], kwargs["dataset"], config.seed, config.groups, config.importance,
                       config.base_epochs, str(device))
    splits, spec = setup.splits, setup.spec
    vec = VecMonitor(BatchedInputPruningVecEnv(config.num_envs, config.lam, config.density, setup=setup))
    episode_length = len(spec.layers)
    log(f"base model {config.model}: {episode_length} gated layers {[layer.name for layer in spec.layers]}, "
        f"{config.groups} channel groups each, {spec.dense_flops / 1e6:.2f} MFLOPs dense")

    # 2. The RL search, resumable from the latest checkpoint.
    agent, pruning_cb, run_dir = search(
        config, vec, episode_length,
        lambda hp: InputPruningCallback([layer.name for layer in spec.layers], hparams=hp),
        device=device, resume=resume, progress_bar=progress_bar, log=log, trust_run=trust_run)
    search_seconds = time.perf_counter() - started

    # 3. The policy-gated network: the actor decides, only kept channels are computed.
    policy = PolicyDecider.from_agent(agent, setup.stats).to(device).requires_grad_(False)
    net = dynamic_inference(setup.model, spec, policy)
    searched = evaluate_dynamic(net, splits.reward.x, splits.reward.y)
    log(f"policy before fine-tuning: reward-split accuracy {searched['accuracy']:.4f}, "
        f"density {searched['density_mean']:.3f} ± {searched['density_std']:.3f}")

    # 4. Fine-tune the network with the (frozen) policy deciding, as long as the gates train below.
    model = setup.model
    base = base_model(config.model, splits, config.seed, epochs=config.base_epochs, device=device).eval()
    if config.finetune_epochs > 0:
        train_net = DynamicNetwork(model, spec, policy)  # frozen: only the network learns
        train_dynamic(train_net, splits.train, epochs=config.finetune_epochs, lr=config.finetune_lr,
                      seed=config.seed, device=device, distill=distillation(config, base))
        model.eval()
    rl_net = dynamic_inference(model, spec, policy)
    tuned = evaluate_dynamic(rl_net, splits.train.x, splits.train.y)

    # 5. The gate baseline from the same base model, towards the policy's mean density on the train split.
    target = float(np.clip(tuned["density_mean"], 1e-3, 1.0))
    log(f"gate baseline: training gates and network for {config.finetune_epochs} epochs towards density {target:.3f}")
    gate_net, gate_model, _, gate_summary = train_gates(
        base, splits, target_density=target, groups=config.groups, epochs=max(1, config.finetune_epochs),
        lr=config.finetune_lr, seed=config.seed, device=device, importance=make_importance(config.importance),
        distill=distillation(config, base))

    # 6. Report: test split only; latency on the CPU, batch 1 averaged over test inputs, batch 64.
    dense, folding = inference_form(base)
    loss, accuracy = evaluate(dense, splits.test, device=torch.device("cpu"))
    results = {"dense": {"test_accuracy": accuracy, "test_loss": loss, "density_mean": 1.0, "density_std": 0.0,
                         "density_latency_inputs": 1.0, "flops_mean": float(count_flops(dense, splits.test.x[:1])),
                         "params": count_params(dense), "bytes": model_bytes(dense)}}
    results["rl"] = _dynamic_result(rl_net, splits)
    results["gate"] = _dynamic_result(gate_net, splits)
    for name, latency in _latencies({"dense": dense, "rl": rl_net, "gate": gate_net}, splits.test.x,
                                    config.threads).items():
        results[name].update(latency)
    for name in ("rl", "gate"):
        r = results[name]
        add_ratios(r, results["dense"])
        # against the density of the inputs it was timed on
        r["latency_over_density_b1"] = r["latency_ratio_b1"] / r["density_latency_inputs"]
    results["dense"].update(latency_ratio_b1=1.0, latency_ratio_b64=1.0, latency_over_density_b1=1.0)
    _save_dynamic(run_dir / "model.pt", model.cpu(), rl_net, config, splits, {"run_dir": str(run_dir)})
    _save_dynamic(run_dir / "gate.pt", gate_model, gate_net, config, splits, {"target_density": target})
    for name in ("rl", "gate"):
        results[name]["bytes"] = (run_dir / ("model.pt" if name == "rl" else "gate.pt")).stat().st_size
    report = {
        "env": "input",
        "results": results,
        "search": {"episodes": pruning_cb.episodes, "timesteps": int(agent.num_timesteps),
                   "seconds": search_seconds, "reward_split_accuracy": searched["accuracy"],
                   "reward_split_density": searched["density_mean"],
                   "layers": [layer.name for layer in spec.layers], "groups": config.groups},
        "gate": {"target_density": target, **{k: v for k, v in gate_summary.items() if k != "history"}},
        "notes": f"Dense model in its inference form ({folding}); the gated models run BN-folded with only "
                 "the kept channels computed. density = FLOPs kept per input / dense FLOPs (2 per multiply-add), "
                 "mean ± std over the test split. Latency: median ms on the CPU, "
                 f"{config.threads} thread(s), the models timed interleaved call by call in {REPORT_ROUNDS} rounds; "
                 "batch 1 "
                 f"averaged over {LATENCY_INPUTS} test inputs, and b1/density is the b1 ratio over those inputs' "
                 "mean density. Both gated "
                 f"models trained {max(1, config.finetune_epochs)} epochs after the base model (the network "
                 "fine-tuned with the policy deciding; gates and network jointly)"
                 + (", distilled from the dense model." if config.distill else "."),
    }
    vec.close()
    return finish_report(run_dir, report, started, format_input_report, log)


def format_input_report(report: dict[str, Any]) -> str:
    """The per-input report as a table for the terminal."""
    lines = results_table(report["results"], [
        ("test acc", "test_accuracy", 10, ".4f"), ("density", "density_mean", 9, ".3f"),
        ("± std", "density_std", 8, ".3f"),
        ("b1 ms", "latency_b1_ms", 9, ".3f"), ("b1 ratio", "latency_ratio_b1", 10, ".3f"),
        ("b1/density", "latency_over_density_b1", 12, ".3f"), ("b64 ms", "latency_b64_ms", 9, ".3f"),
        ("b64 ratio", "latency_ratio_b64", 11, ".3f")])
    lines.append(report["notes"])
    return "\n".join(lines)
