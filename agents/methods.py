"""The comparison's methods: what each does with one seed's base model at a FLOPs budget, and the
table of them (``METHODS``: label, note, runner, and what each needs before it).

Every runner takes the seed's shared state (``SeedState``: splits, dense model, channel graph,
supernet) and returns its result: test accuracy and costs of the model in its inference form.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunegym.compression.channels import ChannelGraph, prune_channels
from prunegym.compression.data import load_dataset
from prunegym.compression.distillation import Distillation, student_model
from prunegym.compression.fusion import inference_form
from prunegym.compression.importance import BNScaleImportance, L1Importance, L2Importance, make_importance
from prunegym.compression.metrics import (
    count_flops,
    count_layer_flops,
    count_params,
    saved_bytes,
)
from prunegym.compression.quantization import int8_bytes, mean_centred_int8, quantize_int8
from prunegym.compression.sparsity import (
    MagnitudePruner,
    global_keep_counts,
    random_kept,
    slimming_penalty,
    sparse_bytes,
    torch_pruning_magnitude,
    uniform_keep_counts,
    weight_sparsity,
)
from prunegym.compression.supernet import prefix_kept, supernet_model
from prunegym.compression.training import (
    base_model,
    evaluate,
    train_classifier,
)
from prunegym.envs import LayerPruningEnv

from .config import DEFAULT_TIMESTEPS, TrainConfig, env_kwargs
from .finalists import choose_finalist
from .job import distillation, measure_model, static_latency
from .loading import load_inference_model
from .random_search import random_search
from .run import run_or_reuse

__all__ = ["METHODS", "Method", "SeedState", "check_row"]


# ---- one seed's shared state ------------------------------------------------------------------
class SeedState:
    """What every method of one seed shares: splits, dense model, channel graph, calibration data;
    ``config`` is the comparison's settings (a ``CompareConfig``)."""

    def __init__(self, config: Any, seed: int, device: torch.device):
        self.config, self.seed, self.device = config, seed, device
        self.splits = load_dataset(config.dataset, seed)
        self.dense = base_model(config.model, self.splits, seed, epochs=config.base_epochs, device=device).eval()
        self.graph = ChannelGraph(self.dense, self.splits.train.x[:1].to(device))
        self.calibration = [self.splits.train.x[i:i + 64] for i in range(0, min(512, len(self.splits.train)), 64)]
        self.teacher = distillation(config, self.dense)  # None unless config.distill
        self._supernets: dict[float | None, nn.Module] = {}

    def _train_config(self, **overrides: Any):
        c = self.config
        return TrainConfig(model=c.model, dataset=c.dataset, seed=self.seed, finetune_epochs=c.finetune_epochs,
                           finetune_lr=c.finetune_lr, distill=c.distill, base_epochs=c.base_epochs, device=c.device,
                           threads=c.threads, **overrides)

    def layer_search_config(self, budget: float, **overrides: Any):
        """The per-layer search's settings at ``budget``: RL per-layer's run and random search share them."""
        c = self.config
        return self._train_config(env="layer", algo=c.algo, flops_target=budget,
                                  timesteps=c.layer_timesteps or DEFAULT_TIMESTEPS["layer"],
                                  supernet_epochs=c.supernet_epochs, reward_model=c.reward_model,
                                  task_loss=c.task_loss, refit_head=c.refit_head,
                                  supernet_sampling=c.supernet_sampling,
                                  finalists=c.finalists, importance=c.importance, min_keep=c.min_keep,
                                  hyperparameters=c.layer_hyperparameters, **overrides)

    def finetune(self, model: nn.Module, *, from_supernet: bool = False, **kwargs: Any) -> nn.Module:
        """Fine-tune a pruned model. One pruned from the dense model trains ``supernet_epochs`` more
        than one pruned from the supernet, so that every pruned model has trained as many epochs
        since the base model (the supernet's, then the fine-tune's)."""
        epochs = self.config.finetune_epochs + (0 if from_supernet else self.config.supernet_epochs)
        return train_classifier(model, self.splits.train, epochs=epochs, lr=self.config.finetune_lr, seed=self.seed,
                                device=self.device, distill=self.teacher, **kwargs)

    def supernet(self, budget: float) -> nn.Module:
        """The supernet RL per-layer searches at ``budget`` (``supernet_epochs``; the same cached one its
        env trains): with ``supernet_sampling`` ``budget``, one per budget."""
        trained_for = budget if self.config.supernet_sampling == "budget" else None
        if trained_for not in self._supernets:
            defaults = TrainConfig()
            self._supernets[trained_for], _ = supernet_model(
                self.config.model, self.dense, self.splits, self.seed, base_epochs=self.config.base_epochs,
                epochs=self.config.supernet_epochs, min_keep=self.config.min_keep,
                importance=make_importance(self.config.importance), extremes=defaults.supernet_extremes,
                budget=trained_for, device=self.device)
        return self._supernets[trained_for]

    def pruned(self, kept: list[torch.Tensor], source: nn.Module | None = None) -> nn.Module:
        return self.finetune(prune_channels(self.dense if source is None else source, self.graph, kept))

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """Test accuracy and costs of a model in its inference form (``measure_model``)."""
        return measure_model(model, self.splits, self.config.threads)

    def measure_int8(self, qmodel: nn.Module, source: nn.Module, flops: int) -> dict[str, Any]:
        """A quantized model: accuracy, latency and int8 bytes measured on it; FLOPs and parameters
        are those of the fp32 ``source`` (FlopCounterMode does not see quantized kernels)."""
        loss, accuracy = evaluate(qmodel, self.splits.test, device=torch.device("cpu"))
        return {"test_accuracy": accuracy, "test_loss": loss, "flops": flops, "params": count_params(source),
                "bytes": int8_bytes(qmodel), **static_latency([qmodel], self.splits.test.x, self.config.threads)[0]}

    def counts_result(self, counts: np.ndarray) -> dict[str, Any]:
        return {"keep_ratios": (np.asarray(counts) / self.graph.num_channels).round(4).tolist()}


# ---- the methods ------------------------------------------------------------------------------
def _rl_run(state: SeedState, out: Path, env: str, budget: float | None) -> tuple[dict, Path]:
    """Run (or resume, or reuse) the main job of ``env`` for this seed and budget; its report and run dir."""
    c = state.config
    if env == "layer":
        run_dir = out / "runs" / f"layer__b{budget:g}__s{state.seed}"
        config = state.layer_search_config(budget, run_dir=str(run_dir), policy_start=c.policy_start)
    else:
        run_dir = out / "runs" / f"input__s{state.seed}"
        config = state._train_config(env="input", lam=c.input_lam,
                                     timesteps=c.input_timesteps or DEFAULT_TIMESTEPS["input"], run_dir=str(run_dir))
    # a layer run's own uniform baselines are left out: the comparison runs them as methods of its own
    report = run_or_reuse(config, log=lambda text: None, baselines=env == "input")
    if env == "layer":  # its RL row becomes a cell as it is
        check_row(report.get("results", {}).get("rl") if isinstance(report, dict) else None,
                   f"{run_dir / 'report.json'} (results.rl)")
    return report, run_dir


def _rl_layer(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
    report, run_dir = _rl_run(state, out, "layer", budget)
    search = report["search"]
    return {**report["results"]["rl"], "search_episodes": search["episodes"], "search_seconds": search["seconds"],
            "best_reward": search["best_reward"], "run_dir": str(run_dir)}


def _rl_layer_int8(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
    report, run_dir = _rl_run(state, out, "layer", budget)
    model = load_inference_model(run_dir, fold_bn=False, trust_factory=state.config.model)
    q = quantize_int8(model, state.calibration)
    return {**state.measure_int8(q, model, report["results"]["rl"]["flops"]), "run_dir": str(run_dir)}


def _rl_counts(state: SeedState, out: Path, budget: float) -> np.ndarray:
    report, _ = _rl_run(state, out, "layer", budget)
    ratios = np.asarray(report["results"]["rl"]["keep_ratios"])
    return np.rint(ratios * state.graph.num_channels).astype(np.int64)


def _static(counts_of: Callable[[SeedState, float], np.ndarray], importance) -> Callable:
    """A structured baseline: keep counts from ``counts_of(state, budget)``, the channels the
    importance criterion ranks first, hard-pruned and fine-tuned."""
    def run(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
        counts = counts_of(state, budget)
        model = state.pruned(state.graph.kept_channels(importance, counts))
        return {**state.measure(model), **state.counts_result(counts)}

    return run


def _global(importance) -> Callable:
    return _static(lambda state, budget: global_keep_counts(state.graph, importance, budget), importance)


def _slimming(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
    slim = copy.deepcopy(state.dense)
    train_classifier(slim, state.splits.train, epochs=state.config.finetune_epochs, lr=state.config.finetune_lr,
                     seed=state.seed, device=state.device, penalty=slimming_penalty(state.config.slimming_strength))
    importance = BNScaleImportance()
    counts = global_keep_counts(state.graph, importance, budget, normalize=False, model=slim)
    kept = state.graph.kept_channels(state.graph.rankings(importance, model=slim), counts)
    model = state.pruned(kept, source=slim)
    return {**state.measure(model), **state.counts_result(counts)}


def _random(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
    counts = _rl_counts(state, out, budget) if "rl_layer" in state.config.methods \
        else uniform_keep_counts(state.graph, budget)
    model = state.pruned(random_kept(state.graph, counts, seed=state.seed))
    return {**state.measure(model), **state.counts_result(counts)}


def _torch_pruning(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
    model = torch_pruning_magnitude(state.dense, state.splits.train.x[:1], budget, p=1)
    return state.measure(state.finetune(model.to(state.device)))


def _magnitude_agp(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
    model = copy.deepcopy(state.dense)
    pruner = MagnitudePruner(model)
    final = 1.0 - budget
    state.finetune(model, after_step=pruner.hook(final))
    if pruner.sparsity < final:
        pruner.update(final)  # a run too short to reach the end of the ramp still ends at the target
    deployed = inference_form(model)[0]
    x1 = state.splits.test.x[:1]
    layer_flops = count_layer_flops(deployed, x1)
    modules = dict(deployed.named_modules())  # every layer that counts FLOPs is a conv or a linear
    nonzero = sum(f * float((modules[n].weight != 0).float().mean()) for n, f in layer_flops.items())
    result = state.measure(model)
    result.update(bytes=sparse_bytes(deployed), sparsity=weight_sparsity(deployed),
                  nonzero_flops=float(nonzero))
    return result


def _kd_student(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
    student = student_model(state.dense, state.graph, budget, seed=state.seed)
    train_classifier(student, state.splits.train, epochs=state.config.base_epochs, seed=state.seed,
                     device=state.device, distill=Distillation(state.dense))
    return state.measure(student)


def _dense(state: SeedState, out: Path, budget: None) -> dict[str, Any]:
    return state.measure(state.dense)


def _int8(state: SeedState, out: Path, budget: None) -> dict[str, Any]:
    q = quantize_int8(state.dense, state.calibration)
    return state.measure_int8(q, state.dense, count_flops(state.dense.cpu(), state.splits.test.x[:1]))


def _int8_mean_centred(state: SeedState, out: Path, budget: None) -> dict[str, Any]:
    model, stored = mean_centred_int8(state.dense)
    return {**state.measure(model), "bytes": saved_bytes(stored)}


def _dynamic(name: str) -> Callable:
    def run(state: SeedState, out: Path, budget: None) -> dict[str, Any]:
        report, run_dir = _rl_run(state, out, "input", None)
        r = report["results"][name]
        dense = report["results"]["dense"]
        return {"test_accuracy": r["test_accuracy"], "test_loss": r["test_loss"], "flops": r["flops_mean"],
                "flops_ratio": r["flops_mean"] / dense["flops_mean"], "density_std": r["density_std"],
                "params": r["params"], "bytes": r["bytes"], "latency_b1_ms": r["latency_b1_ms"],
                "latency_b64_ms": r["latency_b64_ms"], "latency_ratio_b1": r["latency_ratio_b1"],
                "latency_ratio_b64": r["latency_ratio_b64"], "run_dir": str(run_dir)}

    return run


def _random_search(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
    """Random search in RL per-layer's env (same reward, budget and number of episodes as its
    search), the best episode pruned and fine-tuned as the agent's is."""
    c = state.config
    config = state.layer_search_config(budget)
    env = LayerPruningEnv(**env_kwargs(config), device=str(state.device))
    try:
        if "rl_layer" in c.methods:  # exactly as many reward evaluations as the agent's search made
            episodes = int(_rl_run(state, out, "layer", budget)[0]["search"]["episodes"])
        else:
            episodes = -(-config.timesteps // env.num_groups)
        search = random_search(env, episodes, seed=state.seed, top=max(c.finalists, 1))
        finetune = functools.partial(state.finetune, from_supernet=bool(c.supernet_epochs))
        if c.finalists:  # chosen as RL per-layer's answer is: the lowest fine-tuned loss of its best few
            candidates = [(f"random episode #{i + 1} by reward", e["reward"], e) for i, e in enumerate(search["top"])]
            chosen, model, finalists = choose_finalist(env, candidates, c.finalists, finetune, log=lambda text: None)
            extra = {"finalists": finalists}
        else:
            chosen, extra = 0, {}
            best = np.asarray(search["best"]["keep_counts"], dtype=np.int64)
            model = finetune(prune_channels(env.model, env.graph, env.kept_channels(best)))
        counts = np.asarray(search["top"][chosen]["keep_counts"], dtype=np.int64)
    finally:
        env.close()
    return {**state.measure(model), **state.counts_result(counts), "search_episodes": episodes,
            "search_seconds": search["seconds"], "best_reward": search["top"][chosen]["reward"], **extra}


def _uniform_supernet(state: SeedState, out: Path, budget: float) -> dict[str, Any]:
    """Uniform L1's keep counts, taken from the supernet RL per-layer searches (its channels are in
    importance order, so a prefix): the same weights as RL's, another allocation."""
    counts = uniform_keep_counts(state.graph, budget)
    model = state.finetune(prune_channels(state.supernet(budget), state.graph, prefix_kept(counts)),
                           from_supernet=True)
    return {**state.measure(model), **state.counts_result(counts)}


@dataclass(frozen=True)
class Method:
    """One row of the comparison: its label, whether it runs per FLOPs budget, a note, its runner,
    the method whose run it reuses (it runs after that one's cell when both are compared), and
    whether it prunes from the supernet."""

    label: str
    per_budget: bool
    note: str
    run: Callable[[SeedState, Path, float | None], dict[str, Any]]
    after: str | None = None
    supernet: bool = False


METHODS: dict[str, Method] = {
    "dense": Method("dense", False, "the base model", _dense),
    "int8": Method("int8 (PTQ)", False, "per-channel symmetric weights, calibrated activations; int8 kernels",
                   _int8),
    "int8_mean_centred": Method("int8 mean-centred", False, "weights q·α+μ per channel, weight-only; fp32 kernels",
                                _int8_mean_centred),
    "rl_input": Method("RL per-input", False, "mean per-input density; λ sets it", _dynamic("rl")),
    "gate": Method("gate", False, "mean per-input density, trained to RL per-input's", _dynamic("gate"),
                   after="rl_input"),
    "rl_layer": Method("RL per-layer", True, "budget mode", _rl_layer, supernet=True),
    "rl_layer_int8": Method("RL per-layer + int8", True, "the RL model quantized; int8 kernels", _rl_layer_int8,
                            after="rl_layer", supernet=True),
    "random_search": Method("random search", True, "best of as many random episodes as RL's search, same env",
                            _random_search, after="rl_layer", supernet=True),
    "uniform_l1": Method("uniform L1", True, "Li et al. 2017",
                         _static(lambda state, budget: uniform_keep_counts(state.graph, budget), L1Importance())),
    "uniform_supernet": Method("uniform, supernet", True, "uniform L1's counts from RL's supernet: its weights, "
                               "another allocation", _uniform_supernet, supernet=True),
    "global_l1": Method("global L1", True, "scores normalised per layer", _global(L1Importance())),
    "global_l2": Method("global L2", True, "scores normalised per layer", _global(L2Importance())),
    "slimming": Method("network slimming", True, "L1 on BN scales, then global BN-scale ranking", _slimming),
    "random": Method("random channels", True, "RL per-layer's channel counts, random channels", _random,
                     after="rl_layer"),
    "torch_pruning": Method("torch-pruning L1", True, "torch-pruning's MagnitudePruner: one ratio per layer, group L1",
                            _torch_pruning),
    "magnitude_agp": Method("unstructured AGP", True, "sparsity 1 - budget; dense kernels run every FLOP",
                            _magnitude_agp),
    "kd_student": Method("KD student", True, "reduced width at the budget, trained from scratch with KD",
                         _kd_student),
}


_POSITIVE_MEASURES = ("flops", "params", "bytes", "latency_b1_ms", "latency_b64_ms")


def check_row(row: Any, where: str) -> None:
    """A result read back from disk has every measure the table needs: an accuracy in [0, 1] and
    positive costs."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not a result (expected a JSON object)")
    for key in ("test_accuracy", *_POSITIVE_MEASURES):
        value = row.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and (0 <= value <= 1 if key == "test_accuracy" else value > 0)):
            raise ValueError(f"{where}: {key} is {value!r}, not a number in "
                             f"{'[0, 1]' if key == 'test_accuracy' else '(0, inf)'}")
