"""Batch-1 latency of per-input (dynamic) models against their mean FLOPs density: the benchmark
behind ``scripts/bench.py --what dynamic``. It prints figures and asserts nothing.

A zoo model (ResNet-20 by default) with random weights at 32x32 as a ``DynamicNetwork`` (its gated
layers' channels in L1 order, BN folded), driven by a policy actor with random weights (the
architecture ``train.py --env input`` trains: obs -> 64 -> 64 -> G, tanh) and by the gate baseline
with random weights, each with its last bias shifted so that it keeps fewer or more groups, and by
fixed actions (the same groups for every input: the network's own cost, no decision). Batch-1
latency is the mean over random inputs of each input's median; the dense model is the plain
BN-folded model on the same inputs. The ideal latency ratio is the mean FLOPs density (of the
network; the policy's own FLOPs are printed beside); the last column is latency ratio / density.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from prunegym.agents.job import results_table
from prunegym.compression.dynamic import build_dynamic
from prunegym.compression.fusion import fold_batchnorm
from prunegym.compression.gates import GateDecider
from prunegym.compression.metrics import measure_latency_rounds, randomize
from prunegym.compression.models import build_model

__all__ = ["bench_dynamic", "format_dynamic"]

IMAGE_SIZE = 32


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
             f"{r['dense_flops'] / 1e6:.1f} MFLOPs; policy {r['policy_flops_per_input'] / 1e6:.3f} MFLOPs per input"]
    lines += results_table({row["model"]: row for row in r["rows"]}, [
        ("density", "density_mean", 9, ".3f"), ("± std", "density_std", 8, ".3f"), ("b1 ms", "latency_b1_ms", 9, ".3f"),
        ("lat ratio", "latency_ratio", 11, ".3f"), ("ratio/density", "ratio_over_density", 15, ".3f")], name_width=34)
    return "\n".join(lines)
