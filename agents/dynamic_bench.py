"""Latency of per-input (dynamic) models against their mean FLOPs density: the benchmark behind
``scripts/bench.py --what dynamic``. It prints figures and asserts nothing.

A zoo model (ResNet-20 by default) with random weights at 32x32 as a ``DynamicNetwork`` (its gated
layers' channels in L1 order, BN folded), driven by a policy actor with random weights (the
architecture ``train.py --env input`` trains: obs -> 64 -> 64 -> G, tanh) and by the gate baseline
with random weights, each with its last bias shifted so that it keeps fewer or more groups, and by
fixed actions (the same groups for every input: the network's own cost, no decision); and the
policy-gated network as its TorchScript export (``script_dynamic``).

Batch 1: each model's latency is the mean over random inputs of each input's median. Batch 64: a
mixed batch (inputs that decide differently), from random per-input actions and from policy actors.
The dense model is the plain BN-folded model on the same inputs. All models of a batch size are
timed interleaved call by call (``latency_rounds``) in ``rounds`` rounds; the latency ratio is each
round's model/dense ratio, reported as the median over rounds with its lowest and highest. The
ideal latency ratio is the mean FLOPs density (of the network; the policy's own FLOPs are printed
beside); the last column is the median latency ratio / density.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch
from torch import nn

from prunegym.agents.job import results_table
from prunegym.compression.dynamic import build_dynamic
from prunegym.compression.dynamic_script import script_dynamic
from prunegym.compression.fusion import fold_batchnorm
from prunegym.compression.gates import GateDecider
from prunegym.compression.metrics import latency_rounds, randomize
from prunegym.compression.models import build_model

__all__ = ["bench_dynamic", "format_dynamic"]

IMAGE_SIZE = 32
BATCH = 64
BATCH_REPEATS = 10  # timed passes of the batch per model and round
MIXED_STRENGTH = 0.45  # the random actor's bias towards a quarter of the groups: a mixed batch at about half the FLOPs


def _policy_actor(obs_size: int, groups: int, preferred: int | None, generator: torch.Generator,
                  strength: float = 1.5) -> list[nn.Module]:
    layers = [nn.Linear(obs_size, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, groups)]
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.in_features ** 0.5)
                layer.bias.zero_()
        if preferred is not None:
            layers[-1].bias[preferred] = strength
    return layers


def _ratio_rows(rows: list[dict[str, Any]], rounds: list[list[float]], prefix: str) -> float:
    """Add to each row its latency (median over rounds) and its per-round latency ratio to the
    dense model (``rounds[0]``): median, lowest, highest, and the median over the mean density.
    Returns the dense model's latency in ms."""
    for row, times in zip(rows, rounds[1:], strict=True):
        ratios = [t / d for t, d in zip(times, rounds[0], strict=True)]
        row[f"{prefix}_ms"] = 1e3 * statistics.median(times)
        row[f"{prefix}_ratio"] = statistics.median(ratios)
        row[f"{prefix}_ratio_low"], row[f"{prefix}_ratio_high"] = min(ratios), max(ratios)
        row[f"{prefix}_ratio_over_density"] = row[f"{prefix}_ratio"] / row["density_mean"]
    return 1e3 * statistics.median(rounds[0])


@torch.no_grad()
def bench_dynamic(model_name: str, groups: int, threads: int, inputs: int, repeats: int, rounds: int,
                  seed: int, tune: bool, batch: int = BATCH, batch_repeats: int = BATCH_REPEATS) -> dict[str, Any]:
    from prunegym.agents.gated import PolicyDecider
    from prunegym.envs.input_pruning import observation_stats

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dense = randomize(build_model(model_name, 3, 10), seed)
    x = torch.randn(inputs, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    folded = fold_batchnorm(dense)
    base, _, spec = build_dynamic(dense, x[:1], groups)
    stats = observation_stats(base, torch.randn(64, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    obs_size = stats[0].shape[1] + len(spec.layers) + 1

    def policy(preferred: int | None, strength: float = 1.5) -> PolicyDecider:
        return PolicyDecider(_policy_actor(obs_size, groups, preferred, generator, strength), *stats)

    def network(decider: Any) -> Any:
        net, _, _ = build_dynamic(dense, x[:1], groups, decider=decider)
        net.eval()
        if tune:
            net.tune(x[:1])
        return net

    deciders: list[tuple[str, Any]] = []
    for preferred in (0, 1, 2, None):
        label = "rl (random actor)" + ("" if preferred is None else f", prefers {preferred + 1}/{groups}")
        deciders.append((label, policy(preferred)))
    for kept in range(groups):  # the network alone: every input keeps the same groups, nothing decides
        deciders.append((f"fixed {kept + 1}/{groups} (no decider)", lambda gate, features, spent, a=kept: a))
    for shift in (-1.0, 0.5, 2.0):
        gate = GateDecider(spec)
        for g in gate.gates:
            g.fc2.bias.fill_(shift)
        deciders.append((f"gate (random, bias {shift:+.1f})", gate.eval()))
    policy_flops = 2 * sum(m.in_features * m.out_features for m in deciders[0][1].actor if isinstance(m, nn.Linear))
    rows: list[dict[str, Any]] = []
    models: list[nn.Module] = [folded]
    for label, decider in deciders:
        models.append(network(decider))
        rows.append({"model": label, **_densities(models[-1], [x[i:i + 1] for i in range(inputs)])})
    half = min(1, groups - 1)  # the row of the policy preferring half the groups (or all, with fewer groups)
    models.append(script_dynamic(models[1 + half], x[:1]))
    rows.append({**rows[half], "model": f"{rows[half]['model']}, TorchScript export"})
    if tune:  # the fair dense reference runs the same kernels: the dynamic path keeping everything
        models[0] = network(lambda g, f, s: groups - 1)
    timed = latency_rounds(models, x, rounds=rounds, repeats=repeats, warmup=2, threads=threads, per_input=True)
    dense_b1 = _ratio_rows(rows, timed, "b1")

    # a mixed batch: inputs that decide differently at every gated layer
    xb = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    table = torch.randint(0, max(1, groups - 1), (batch, len(spec.layers)), generator=generator)
    batch_deciders = [
        (f"random actions, 1-{max(1, groups - 1)}/{groups} per input (no decider)",
         lambda gate, features, spent: table[: features.shape[0], gate]),
        ("rl (random actor), mixed around half", policy(0, MIXED_STRENGTH)),
        ("rl (random actor)", policy(None)),
        (f"fixed {min(2, groups)}/{groups} (no decider)", lambda gate, features, spent: min(1, groups - 1)),
    ]
    batch_rows: list[dict[str, Any]] = []
    batch_models: list[nn.Module] = [folded]
    for label, decider in batch_deciders:
        batch_models.append(network(decider))
        batch_rows.append({"model": label, **_densities(batch_models[-1], [xb])})
    timed = latency_rounds(batch_models, xb, rounds=rounds, repeats=batch_repeats, warmup=1, threads=threads)
    dense_batch = _ratio_rows(batch_rows, timed, f"b{batch}")
    return {"model": model_name, "image_size": IMAGE_SIZE, "groups": groups, "threads": threads,
            "inputs": inputs, "repeats": repeats, "rounds": rounds, "tuned_kernels": tune,
            "gated_layers": [layer.name for layer in spec.layers], "dense_flops": spec.dense_flops,
            "policy_flops_per_input": policy_flops * len(spec.layers), "dense_b1_ms": dense_b1, "rows": rows,
            "batch": batch, "dense_batch_ms": dense_batch, "batch_repeats": batch_repeats, "batch_rows": batch_rows}


def _densities(net: Any, batches: list[torch.Tensor]) -> dict[str, float]:
    """The mean and spread of the per-input FLOPs density of ``net`` over the inputs of ``batches``."""
    densities = []
    for xb in batches:
        net(xb)
        densities.append(np.broadcast_to(np.asarray(torch.as_tensor(net.last_density), dtype=np.float64), (len(xb),)))
    density = np.concatenate(densities)
    return {"density_mean": float(density.mean()), "density_std": float(density.std())}


def format_dynamic(r: dict[str, Any]) -> str:
    b = f"b{r['batch']}"
    lines = [f"per-input models, {r['model']} at {r['image_size']}x{r['image_size']}, {r['threads']} thread(s), "
             f"{r['groups']} groups per gated layer ({len(r['gated_layers'])} layers), "
             f"{'tuned' if r['tuned_kernels'] else 'ATen'} kernels, {r['dense_flops'] / 1e6:.1f} MFLOPs dense; "
             f"policy {r['policy_flops_per_input'] / 1e6:.3f} MFLOPs per input; latency ratio to the dense model: "
             f"median of {r['rounds']} interleaved rounds [lowest, highest]",
             f"batch 1 ({r['inputs']} inputs, each alone; dense {r['dense_b1_ms']:.3f} ms):"]
    columns = [("density", "density_mean", 9, ".3f"), ("± std", "density_std", 8, ".3f")]
    for prefix, table in (("b1", r["rows"]), (b, r["batch_rows"])):
        if prefix == b:
            lines += ["", f"batch {r['batch']}, one mixed batch (dense {r['dense_batch_ms']:.1f} ms):"]
        shown = {row["model"]: {**row, "spread": f"[{row[prefix + '_ratio_low']:.3f}, "
                                                 f"{row[prefix + '_ratio_high']:.3f}]"} for row in table}
        lines += results_table(shown, [*columns, (f"{prefix} ms", f"{prefix}_ms", 9, ".3f"),
                                       ("lat ratio", f"{prefix}_ratio", 11, ".3f"), ("spread", "spread", 16, "s"),
                                       ("ratio/density", f"{prefix}_ratio_over_density", 15, ".3f")], name_width=52)
    return "\n".join(lines)
