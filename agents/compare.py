"""The comparison harness (``scripts/compare.py``): every method on the same model, data, FLOPs
budget and fine-tune, over seeds, in one table and one plot.

For each seed: the dense model, int8 (PyTorch's per-channel post-training quantization), the
mean-centred weight-only int8, and the per-input job (RL per-input and the gate baseline, which
choose their own density through λ). For each seed and FLOPs budget: RL per-layer (budget mode),
RL per-layer + int8, uniform L1, global L1 and L2, network slimming, random channels at the RL
policy's per-layer counts, torch-pruning's magnitude pruner, unstructured magnitude pruning (AGP)
and a reduced-width student trained with knowledge distillation.

The output folder holds ``config.json`` (first), ``cells/`` (one JSON per method, budget and seed,
written as each finishes: a rerun with the same ``--out`` and settings picks up where it stopped),
``runs/`` (the RL run directories), ``tb/`` (TensorBoard hparams, one run per table row), and,
written last, ``results.json``, ``results.md`` and ``pareto.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunegym.compression.channels import (
    BNScaleImportance,
    ChannelGraph,
    L1Importance,
    L2Importance,
    make_importance,
    prune_channels,
)
from prunegym.compression.checkpoint import atomic_path, read_json, write_json
from prunegym.compression.data import load_dataset
from prunegym.compression.distillation import Distillation, student_model
from prunegym.compression.fusion import inference_form
from prunegym.compression.locking import LOCK_NAME, DirectoryLock, DirectoryLocked
from prunegym.compression.metrics import (
    count_flops,
    count_layer_flops,
    count_params,
    keep_freed_memory,
    num_threads,
    saved_bytes,
)
from prunegym.compression.models import MODELS
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
from prunegym.compression.statistics import paired_difference
from prunegym.compression.supernet import prefix_kept, supernet_model
from prunegym.compression.training import (
    BASE_EPOCHS,
    base_model,
    cache_dir,
    cache_key,
    check_seed,
    evaluate,
    resolve_device,
    train_classifier,
)
from prunegym.envs import LayerPruningEnv

from .config import DEFAULT_TIMESTEPS, TrainConfig, env_kwargs
from .distributed import check_placement, require_ray, run_graph
from .job import add_ratios, distillation, measure_model, static_latency
from .loading import load_inference_model
from .random_search import random_search
from .run import run_or_reuse

__all__ = ["CompareConfig", "METHODS", "compare", "summarize", "format_table", "markdown_table", "pareto_plot"]


@dataclass
class CompareConfig:
    """Settings of a comparison, written once to ``config.json``."""

    model: str = "digits_cnn"
    """zoo name (digits_cnn, resnet20, resnet56, vgg_small) or ``package.module:factory``"""
    dataset: str = "digits"
    """``digits``, ``mnist:PATH``, ``cifar10:PATH`` or ``npz:PATH``"""
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5])
    """FLOPs budgets, as fractions of the dense model's FLOPs"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """seeds of the data split, base model, agents and fine-tunes; the table gives mean ± std over them"""
    finetune_epochs: int = 40
    """fine-tune epochs after pruning, the same for every method (the KD student trains from scratch
    for the base model's epochs; slimming's sparsity training comes on top)"""
    finetune_lr: float = 5e-4
    """learning rate of every fine-tune"""
    out: str = ""
    """the output folder; empty: ``runs/compare__<model>__<dataset>``"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """which methods to run (dense always runs)"""
    algo: str = "ppo"
    """the SB3 algorithm of the RL per-layer search"""
    layer_timesteps: int | None = None
    """timesteps of each RL per-layer search (default: the main job's, 6000)"""
    input_timesteps: int | None = None
    """timesteps of each RL per-input search (default: the per-input job's, 200000)"""
    supernet_epochs: int = 20
    """RL per-layer, random search and uniform-from-supernet: epochs of the weight-sharing supernet they
    search and prune from (``train.py --supernet-epochs``); 0: the dense model (and no
    uniform_supernet row)"""
    reward_model: str = "supernet"
    """RL per-layer and random search: the model their reward scores candidates on, ``supernet`` or
    ``dense`` (``train.py --reward-model``)"""
    input_lam: float = 2.0
    """λ of the per-input search: its density is the agent's choice, not a budget"""
    distill: bool = False
    """fine-tune every pruned model with knowledge distillation from the dense model"""
    slimming_strength: float = 1e-4
    """network slimming's L1 penalty on BN scales, per unit of |γ|"""
    base_epochs: int = BASE_EPOCHS
    """epochs of the dense base model (cached), and of the KD student"""
    device: str = "auto"
    """where training runs: auto, cpu, cuda; latency is always timed on the CPU"""
    threads: int = 1
    """CPU threads of each cell, for its training and its latency measurements (fixed, so that a cell's
    result does not depend on how many cells run at once; a Ray task asks for this many CPUs)"""
    workers: int = 0
    """cells at once, as tasks on a Ray started in this process (the ``distributed`` extra); 0: one
    after another in this process"""
    address: str = ""
    """a Ray cluster to run the cells on instead (``auto``, or ``HOST:PORT`` of its head); its CPUs
    set how many run at once"""

    def validate(self) -> None:
        if ":" not in self.model and self.model not in MODELS:
            raise ValueError(f"model {self.model!r} is unknown; expected one of {sorted(MODELS)} "
                             "or 'package.module:factory'")
        if not self.budgets:
            raise ValueError("budgets must name at least one FLOPs budget")
        for b in self.budgets:
            if not isinstance(b, int | float) or not 0 < b < 1:
                raise ValueError(f"budget {b!r} is not a FLOPs fraction in (0, 1)")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets {self.budgets} repeat a value")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be one or more distinct integers, got {self.seeds}")
        for seed in self.seeds:
            check_seed(seed, "seed")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; expected some of {list(METHODS)}")
        if "uniform_supernet" in self.methods and not self.supernet_epochs:
            raise ValueError("method uniform_supernet prunes RL's supernet; it needs supernet_epochs > 0 "
                             "(or leave uniform_supernet out of the methods)")
        for name in ("finetune_epochs", "base_epochs", "supernet_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("layer_timesteps", "input_timesteps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_placement(workers=self.workers, threads=self.threads, address=self.address, what="cells")
        if self.workers or self.address:
            require_ray("--workers and --address")
        for name in ("finetune_lr", "input_lam", "slimming_strength"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "finetune_lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'finetune_lr' else '>= 0'}, "
                                 f"got {value}")
        resolve_device(self.device)

    def default_out(self) -> str:
        model = self.model.replace(":", ".").replace("/", "_")
        return str(Path("runs") / f"compare__{model}__{self.dataset.split(':')[0]}")


# ---- measuring ----------------------------------------------------------------------------------
# ---- one seed's shared state ------------------------------------------------------------------
class _Seed:
    """What every method of one seed shares: splits, dense model, channel graph, calibration data."""

    def __init__(self, config: CompareConfig, seed: int, device: torch.device):
        self.config, self.seed, self.device = config, seed, device
        self.splits = load_dataset(config.dataset, seed)
        self.dense = base_model(config.model, self.splits, seed, epochs=config.base_epochs, device=device).eval()
        self.graph = ChannelGraph(self.dense, self.splits.train.x[:1].to(device))
        self.calibration = [self.splits.train.x[i:i + 64] for i in range(0, min(512, len(self.splits.train)), 64)]
        self.teacher = distillation(config, self.dense)  # None unless config.distill
        self._supernet: nn.Module | None = None

    def _train_config(self, **overrides: Any):
        c = self.config
        return TrainConfig(model=c.model, dataset=c.dataset, seed=self.seed, finetune_epochs=c.finetune_epochs,
                           finetune_lr=c.finetune_lr, distill=c.distill, base_epochs=c.base_epochs, device=c.device,
                           threads=c.threads, **overrides)

    def finetune(self, model: nn.Module, *, from_supernet: bool = False, **kwargs: Any) -> nn.Module:
        """Fine-tune a pruned model. One pruned from the dense model trains ``supernet_epochs`` more
        than one pruned from the supernet, so that every pruned model has trained as many epochs
        since the base model (the supernet's, then the fine-tune's)."""
        epochs = self.config.finetune_epochs + (0 if from_supernet else self.config.supernet_epochs)
        return train_classifier(model, self.splits.train, epochs=epochs, lr=self.config.finetune_lr, seed=self.seed,
                                device=self.device, distill=self.teacher, **kwargs)

    def supernet(self) -> nn.Module:
        """The supernet RL per-layer searches (``supernet_epochs``; the same cached one its env trains)."""
        if self._supernet is None:
            defaults = TrainConfig()
            self._supernet, _ = supernet_model(self.config.model, self.dense, self.splits, self.seed,
                                               base_epochs=self.config.base_epochs,
                                               epochs=self.config.supernet_epochs, min_keep=defaults.min_keep,
                                               importance=make_importance(defaults.importance),
                                               extremes=defaults.supernet_extremes, device=self.device)
        return self._supernet

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
def _rl_run(state: _Seed, out: Path, env: str, budget: float | None) -> tuple[dict, Path]:
    """Run (or resume, or reuse) the main job of ``env`` for this seed and budget; its report and run dir."""
    c = state.config
    if env == "layer":
        run_dir = out / "runs" / f"layer__b{budget:g}__s{state.seed}"
        config = state._train_config(env="layer", algo=c.algo, flops_target=budget,
                                     timesteps=c.layer_timesteps or DEFAULT_TIMESTEPS["layer"],
                                     supernet_epochs=c.supernet_epochs, reward_model=c.reward_model,
                                     run_dir=str(run_dir))
    else:
        run_dir = out / "runs" / f"input__s{state.seed}"
        config = state._train_config(env="input", lam=c.input_lam,
                                     timesteps=c.input_timesteps or DEFAULT_TIMESTEPS["input"], run_dir=str(run_dir))
    report = run_or_reuse(config, log=lambda text: None)
    if env == "layer":  # its RL row becomes a cell as it is
        _check_row(report.get("results", {}).get("rl") if isinstance(report, dict) else None,
                   f"{run_dir / 'report.json'} (results.rl)")
    return report, run_dir


def _rl_layer(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
    report, run_dir = _rl_run(state, out, "layer", budget)
    row = dict(report["results"]["rl"])
    row["run_dir"] = str(run_dir)
    return row


def _rl_layer_int8(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
    report, run_dir = _rl_run(state, out, "layer", budget)
    model = load_inference_model(run_dir, fold_bn=False, trust_factory=state.config.model)
    q = quantize_int8(model, state.calibration)
    return {**state.measure_int8(q, model, report["results"]["rl"]["flops"]), "run_dir": str(run_dir)}


def _rl_counts(state: _Seed, out: Path, budget: float) -> np.ndarray:
    report, _ = _rl_run(state, out, "layer", budget)
    ratios = np.asarray(report["results"]["rl"]["keep_ratios"])
    return np.rint(ratios * state.graph.num_channels).astype(np.int64)


def _static(counts_of: Callable[[_Seed, float], np.ndarray], importance) -> Callable:
    """A structured baseline: keep counts from ``counts_of(state, budget)``, the channels the
    importance criterion ranks first, hard-pruned and fine-tuned."""
    def run(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
        counts = counts_of(state, budget)
        model = state.pruned(state.graph.kept_channels(importance, counts))
        return {**state.measure(model), **state.counts_result(counts)}

    return run


def _global(importance) -> Callable:
    return _static(lambda state, budget: global_keep_counts(state.graph, importance, budget), importance)


def _slimming(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
    slim = copy.deepcopy(state.dense)
    train_classifier(slim, state.splits.train, epochs=state.config.finetune_epochs, lr=state.config.finetune_lr,
                     seed=state.seed, device=state.device, penalty=slimming_penalty(state.config.slimming_strength))
    importance = BNScaleImportance()
    counts = global_keep_counts(state.graph, importance, budget, normalize=False, model=slim)
    kept = state.graph.kept_channels(state.graph.rankings(importance, model=slim), counts)
    model = state.pruned(kept, source=slim)
    return {**state.measure(model), **state.counts_result(counts)}


def _random(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
    counts = _rl_counts(state, out, budget) if "rl_layer" in state.config.methods \
        else uniform_keep_counts(state.graph, budget)
    model = state.pruned(random_kept(state.graph, counts, seed=state.seed))
    return {**state.measure(model), **state.counts_result(counts)}


def _torch_pruning(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
    model = torch_pruning_magnitude(state.dense, state.splits.train.x[:1], budget, p=1)
    return state.measure(state.finetune(model.to(state.device)))


def _magnitude_agp(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
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


def _kd_student(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
    student = student_model(state.dense, state.graph, budget, seed=state.seed)
    train_classifier(student, state.splits.train, epochs=state.config.base_epochs, seed=state.seed,
                     device=state.device, distill=Distillation(state.dense))
    return state.measure(student)


def _dense(state: _Seed, out: Path, budget: None) -> dict[str, Any]:
    return state.measure(state.dense)


def _int8(state: _Seed, out: Path, budget: None) -> dict[str, Any]:
    q = quantize_int8(state.dense, state.calibration)
    return state.measure_int8(q, state.dense, count_flops(state.dense.cpu(), state.splits.test.x[:1]))


def _int8_mean_centred(state: _Seed, out: Path, budget: None) -> dict[str, Any]:
    model, stored = mean_centred_int8(state.dense)
    return {**state.measure(model), "bytes": saved_bytes(stored)}


def _dynamic(name: str) -> Callable:
    def run(state: _Seed, out: Path, budget: None) -> dict[str, Any]:
        report, run_dir = _rl_run(state, out, "input", None)
        r = report["results"][name]
        dense = report["results"]["dense"]
        return {"test_accuracy": r["test_accuracy"], "test_loss": r["test_loss"], "flops": r["flops_mean"],
                "flops_ratio": r["flops_mean"] / dense["flops_mean"], "density_std": r["density_std"],
                "params": r["params"], "bytes": r["bytes"], "latency_b1_ms": r["latency_b1_ms"],
                "latency_b64_ms": r["latency_b64_ms"], "latency_ratio_b1": r["latency_ratio_b1"],
                "latency_ratio_b64": r["latency_ratio_b64"], "run_dir": str(run_dir)}

    return run


def _random_search(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
    """Random search in RL per-layer's env (same reward, budget and number of episodes as its
    search), the best episode pruned and fine-tuned as the agent's is."""
    c = state.config
    config = state._train_config(env="layer", algo=c.algo, flops_target=budget,
                                 timesteps=c.layer_timesteps or DEFAULT_TIMESTEPS["layer"],
                                 supernet_epochs=c.supernet_epochs, reward_model=c.reward_model)
    env = LayerPruningEnv(**env_kwargs(config), device=str(state.device))
    try:
        if "rl_layer" in c.methods:  # exactly as many reward evaluations as the agent's search made
            episodes = int(_rl_run(state, out, "layer", budget)[0]["search"]["episodes"])
        else:
            episodes = -(-config.timesteps // env.num_groups)
        search = random_search(env, episodes, seed=state.seed)
        counts = np.asarray(search["best"]["keep_counts"], dtype=np.int64)
        model = state.finetune(prune_channels(env.model, env.graph, env.kept_channels(counts)),
                               from_supernet=bool(c.supernet_epochs))
    finally:
        env.close()
    return {**state.measure(model), **state.counts_result(counts), "search_episodes": episodes,
            "search_seconds": search["seconds"], "best_reward": search["best"]["reward"]}


def _uniform_supernet(state: _Seed, out: Path, budget: float) -> dict[str, Any]:
    """Uniform L1's keep counts, taken from the supernet RL per-layer searches (its channels are in
    L1 order, so a prefix): the same weights as RL's, another allocation."""
    counts = uniform_keep_counts(state.graph, budget)
    model = state.finetune(prune_channels(state.supernet(), state.graph, prefix_kept(counts)), from_supernet=True)
    return {**state.measure(model), **state.counts_result(counts)}


@dataclass(frozen=True)
class Method:
    """One row of the comparison: its label, whether it runs per FLOPs budget, a note, its runner,
    the method whose run it reuses (it runs after that one's cell when both are compared), and
    whether it prunes from the supernet."""

    label: str
    per_budget: bool
    note: str
    run: Callable[[_Seed, Path, float | None], dict[str, Any]]
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
    "torch_pruning": Method("torch-pruning L1", True, "torch-pruning's MagnitudePruner, one ratio per layer",
                            _torch_pruning),
    "magnitude_agp": Method("unstructured AGP", True, "sparsity 1 - budget; dense kernels run every FLOP",
                            _magnitude_agp),
    "kd_student": Method("KD student", True, "reduced width at the budget, trained from scratch with KD",
                         _kd_student),
}


# ---- the harness --------------------------------------------------------------------------------
def _cells(config: CompareConfig) -> list[tuple[str, float | None, int]]:
    methods = ["dense"] + [m for m in config.methods if m != "dense"]
    cells = []
    for seed in config.seeds:
        for method in methods:
            if METHODS[method].per_budget:
                cells += [(method, float(b), seed) for b in config.budgets]
            else:
                cells.append((method, None, seed))
    return cells


def _cell_path(out: Path, method: str, budget: float | None, seed: int) -> Path:
    return out / "cells" / f"{method}__{'-' if budget is None else f'b{budget:g}'}__s{seed}.json"


_POSITIVE_MEASURES = ("flops", "params", "bytes", "latency_b1_ms", "latency_b64_ms")


def _check_row(row: Any, where: str) -> None:
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


def _read_cell(path: Path, method: str, budget: float | None, seed: int) -> dict[str, Any]:
    """A finished cell, checked: it must be this cell's result, with every measure in range."""
    row = read_json(path)
    hint = "; delete the file to compute the cell again"
    if not isinstance(row, dict):
        raise ValueError(f"{path} is not a cell (expected a JSON object){hint}")
    for key, expected in (("method", method), ("budget", budget), ("seed", seed)):
        if row.get(key) != expected:
            raise ValueError(f"{path} holds {key}={row.get(key)!r}, not this cell's {expected!r}{hint}")
    try:
        _check_row(row, str(path))
    except ValueError as err:
        raise ValueError(f"{err}{hint}") from err
    return row


_HOW = ("out", "device", "workers", "address")
"""settings that say where and how the cells run, not what they compute: a comparison continues under others"""


def _prepare_out(config: CompareConfig) -> DirectoryLock:
    """Claim the output folder (one comparison at a time writes it), check that it holds this
    comparison or nothing, and write ``config.json``; the claim is returned, held."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the comparison")
    if out.exists() and not (out / "config.json").is_file() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ValueError(f"{out} exists and is not a comparison folder (no config.json); choose another --out")
    lock = DirectoryLock(out)
    try:
        lock.acquire()
    except DirectoryLocked as err:
        raise ValueError(f"{out} is in use by another comparison; wait for it, or choose another --out") from err
    try:
        saved = {k: v for k, v in dataclasses.asdict(config).items() if k not in _HOW}
        if (out / "config.json").is_file():
            before = {k: v for k, v in read_json(out / "config.json")["config"].items() if k not in _HOW}
            changed = sorted(k for k in saved if before.get(k) != saved[k])
            if changed:
                raise ValueError(f"{out} holds a comparison with other settings ({changed}); choose another --out")
        for name in ("results.json", "results.md", "pareto.png"):
            (out / name).unlink(missing_ok=True)  # incomplete until they are written again
        write_json(out / "config.json", {"config": dataclasses.asdict(config), "torch": torch.__version__})
    except BaseException:
        lock.release()
        raise
    return lock


def compare(config: CompareConfig, *, progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``config`` (reusing cells already in ``config.out``); return the results."""
    config.validate()
    config.out = config.out or config.default_out()
    device = resolve_device(config.device)
    started = time.perf_counter()
    lock = _prepare_out(config)
    try:
        return _compare(config, Path(config.out), device, started, progress=progress, log=log)
    finally:
        lock.release()


Cell = tuple[str, float | None, int]
"""(method, budget or None, seed)"""


def _after(config: CompareConfig, cell: Cell) -> Cell | None:
    """The cell whose run ``cell`` reuses, when its method is compared too (it must finish first)."""
    method, budget, seed = cell
    before = METHODS[method].after
    if before is None or before not in config.methods:
        return None
    return before, (budget if METHODS[before].per_budget else None), seed


def _prepare_seed(config: CompareConfig, seed: int) -> _Seed:
    """The seed's shared state, its base model trained (or read from the cache), and its supernet
    too when a compared method prunes from it, so that no two cells train them at once."""
    with num_threads(config.threads):
        state = _Seed(config, seed, resolve_device(config.device))
        if config.supernet_epochs and any(METHODS[m].supernet for m in config.methods):
            state.supernet()
    return state


def _run_cell(config: CompareConfig, state: _Seed, out: Path, cell: Cell) -> dict[str, Any]:
    method, budget, seed = cell
    t0 = time.perf_counter()
    with num_threads(config.threads):
        result = METHODS[method].run(state, out, budget)
    return {"method": method, "budget": budget, "seed": seed, **result, "seconds": time.perf_counter() - t0}


def _cached_files(config: CompareConfig, state: _Seed) -> dict[str, bytes]:
    """The seed's base model and supernets as files of the model cache, relative to it."""
    root = cache_dir()
    key = cache_key(config.model, state.splits, state.seed, config.base_epochs)
    paths = [root / "base" / f"{key}.pt", *sorted((root / "supernet").glob(f"{key}__*.pt"))]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths if p.is_file()}


def _prepare_task(context: tuple[CompareConfig, str], seed: int) -> dict[str, bytes]:
    """A Ray task: train (or read) one seed's base model and supernet; return their cache files,
    which the seed's cells install where they run (another machine's cache, perhaps)."""
    config, _ = context
    return _cached_files(config, _prepare_seed(config, seed))


def _cell_task(context: tuple[CompareConfig, str], files: dict[str, bytes], cell: Cell) -> dict[str, Any]:
    """A Ray task: one cell, on the seed's base model and supernet from ``_prepare_task``."""
    config, out = context
    keep_freed_memory()  # this worker times models for the comparison, as compare.py's own process does
    root = cache_dir()
    for name, data in files.items():
        if not (root / name).is_file():
            with atomic_path(root / name) as tmp:
                Path(tmp).write_bytes(data)
    return _run_cell(config, _prepare_seed(config, cell[2]), Path(out), cell)


def _compare(config: CompareConfig, out: Path, device: torch.device, started: float, *, progress: bool,
             log: Callable[[str], None]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    cells = _cells(config)
    rows: dict[Cell, dict[str, Any]] = {}
    for cell in cells:
        if _cell_path(out, *cell).is_file():
            rows[cell] = _read_cell(_cell_path(out, *cell), *cell)
    todo = [cell for cell in cells if cell not in rows]
    bar = tqdm(total=len(cells), initial=len(rows), desc="compare", disable=not progress, unit="cell")

    def finished(cell: Cell, row: dict[str, Any]) -> None:
        write_json(_cell_path(out, *cell), row)
        rows[cell] = row
        bar.update()
        (bar.write if progress else log)(
            f"{METHODS[cell[0]].label:<22} budget {'-' if cell[1] is None else cell[1]:<5} seed {cell[2]}: "
            f"accuracy {row['test_accuracy']:.4f}, FLOPs {row['flops']:,.0f}, {row['seconds']:.1f} s")

    failed: dict[Cell, str] = {}
    if todo and (config.workers or config.address):
        failed = run_graph(todo, context=(config, str(out)), prepare=_prepare_task, group=lambda cell: cell[2],
                           run=_cell_task, after=lambda cell: _after(config, cell), finished=finished,
                           cpus=config.threads, workers=config.workers, address=config.address)
    else:
        state: _Seed | None = None
        for cell in todo:
            bar.set_postfix_str(f"{cell[0]} b={cell[1]} seed={cell[2]}")
            if state is None or state.seed != cell[2]:
                state = None  # one seed at a time: the previous seed's models can go
                state = _prepare_seed(config, cell[2])
            finished(cell, _run_cell(config, state, out, cell))
    bar.close()
    return _results(config, out, [rows[c] for c in cells if c in rows], failed, started, log)


def _results(config: CompareConfig, out: Path, rows: list[dict[str, Any]], failed: dict[Cell, str],
             started: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The table, ``results.json``, ``results.md``, the Pareto plot and the hparams from the cells."""
    dense_by_seed = {r["seed"]: r for r in rows if r["method"] == "dense"}
    rows = [r for r in rows if r["seed"] in dense_by_seed]  # the ratios need the seed's dense model
    for r in rows:
        d = dense_by_seed[r["seed"]]
        add_ratios(r, d)
        r["bytes_ratio"] = r["bytes"] / d["bytes"]
        if "nonzero_flops" in r:
            r["nonzero_flops_ratio"] = r["nonzero_flops"] / d["flops"]
    table = summarize(rows)
    failures = [{"method": m, "budget": b, "seed": s, "error": error} for (m, b, s), error in failed.items()]
    notes = _notes(config) + "".join(
        f"\nFailed (run again to retry; its seed's rows are left out when it is dense): {f['method']} budget "
        f"{'-' if f['budget'] is None else f['budget']} seed {f['seed']}: {f['error']}" for f in failures)
    results = {"config": dataclasses.asdict(config), "table": table, "rows": rows, "failed": failures,
               "notes": notes, "seconds": time.perf_counter() - started}
    _hparams(out, table)
    pareto_plot(table, out / "pareto.png", title=f"{config.model} on {config.dataset.split(':')[0]}")
    (out / "results.md").write_text(markdown_table(table) + "\n\n" + notes + "\n")
    write_json(out / "results.json", results)
    log(format_table(table))
    log(f"{notes}\nwritten to {out}/results.json, results.md, pareto.png")
    return results


def _notes(config: CompareConfig) -> str:
    if config.supernet_epochs:
        training = (f"RL per-layer, random search and uniform-from-supernet are pruned from a supernet trained "
                    f"{config.supernet_epochs} epochs from the base model and fine-tuned {config.finetune_epochs} "
                    f"epochs; every other pruned model is fine-tuned {config.finetune_epochs + config.supernet_epochs}"
                    f" epochs, as many since the base model (lr {config.finetune_lr}")
    else:
        training = f"every pruned model fine-tuned {config.finetune_epochs} epochs (lr {config.finetune_lr}"
    return (f"Test split; mean ± std over seeds {config.seeds}; {training}"
            + (", distilled from the dense model" if config.distill else "") + "). "
            "RL - this: RL per-layer's test accuracy minus the method's, in points, paired over the seeds (same "
            "base model and split), with its 95% confidence interval (Student's t) and the seeds RL won. "
            "FLOPs count 2 per multiply-add (FlopCounterMode); per-input methods give their mean density. "
            f"Latency: median ms on the CPU, {config.threads} thread(s), models in their inference form "
            "(BN folded). Bytes: the state dict as torch.save writes it (int8: int8 weights; unstructured: "
            "nonzero values and a bitmask). Unstructured AGP keeps dense shapes: its FLOPs and latency are the "
            "dense model's; the plot places it at its nonzero FLOPs, hollow.")


def _versus_rl(rows: list[dict[str, Any]], method: str, budget: float | None) -> dict[str, Any] | None:
    """RL per-layer's test accuracy minus ``method``'s at ``budget``, in points, paired over the seeds
    both have (same base model and split per seed): mean, 95% interval, seeds won and lost by RL."""
    if budget is None or method == "rl_layer":
        return None
    rl = {r["seed"]: r["test_accuracy"] for r in rows if r["method"] == "rl_layer" and r["budget"] == budget}
    other = {r["seed"]: r["test_accuracy"] for r in rows if r["method"] == method and r["budget"] == budget}
    seeds = sorted(rl.keys() & other.keys())
    if not seeds:
        return None
    return paired_difference([100 * rl[s] for s in seeds], [100 * other[s] for s in seeds]).as_dict()


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, budget): mean ± std of accuracy over seeds, means of the costs, and for
    every per-budget method RL per-layer's paired advantage over it (``rl_minus_this``)."""
    table = []
    keys = []
    for r in rows:
        if (r["method"], r["budget"]) not in keys:
            keys.append((r["method"], r["budget"]))
    for method, budget in keys:
        group = [r for r in rows if r["method"] == method and r["budget"] == budget]
        acc = np.array([r["test_accuracy"] for r in group]) * 100
        entry = {"method": method, "label": METHODS[method].label, "budget": budget, "seeds": len(group),
                 "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                 "note": METHODS[method].note}
        for key in ("flops_ratio", "params", "bytes", "bytes_ratio", "latency_b1_ms", "latency_b64_ms",
                    "latency_ratio_b1", "latency_ratio_b64", "sparsity", "nonzero_flops_ratio"):
            if all(key in r for r in group):
                entry[key] = float(np.mean([r[key] for r in group]))
        versus = _versus_rl(rows, method, budget)
        if versus is not None:
            entry["rl_minus_this"] = versus
        table.append(entry)
    return table


def _versus_text(entry: dict[str, Any]) -> str:
    """RL per-layer's paired advantage as ``+1.23 [-0.40, 2.86] 4/5`` (mean, 95% interval, seeds RL won)."""
    v = entry.get("rl_minus_this")
    if v is None:
        return "-"
    interval = "" if v["low"] is None else f" [{v['low']:+.2f}, {v['high']:+.2f}]"
    return f"{v['mean']:+.2f}{interval} {v['won']}/{v['n']}"


def _budget(entry: dict[str, Any]) -> str:
    return "-" if entry["budget"] is None else f"{entry['budget']:g}"


def format_table(table: list[dict[str, Any]]) -> str:
    """The table for the terminal."""
    header = (f"{'method':<22}{'budget':>7}{'test acc %':>16}{'FLOPs':>7}{'params':>10}{'bytes':>10}"
              f"{'b1 ms':>8}{'b64 ms':>8}  {'RL - this [95% CI] RL won':<28}")
    lines = [header, "-" * len(header)]
    for e in table:
        acc = f"{e['accuracy_mean']:.2f} ± {e['accuracy_std']:.2f}"
        lines.append(f"{e['label']:<22}{_budget(e):>7}{acc:>16}{e['flops_ratio']:>7.3f}{e['params']:>10,.0f}"
                     f"{e['bytes']:>10,.0f}{e['latency_b1_ms']:>8.3f}{e['latency_b64_ms']:>8.3f}  {_versus_text(e)}")
    return "\n".join(lines)


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The table in Markdown."""
    lines = ["| method | budget | test accuracy % | RL per-layer − this, points [95% CI], seeds RL won | FLOPs ratio "
             "| params | bytes | b1 ms | b64 ms | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for e in table:
        note = e["note"]
        if "sparsity" in e:
            note += f"; sparsity {e['sparsity']:.2f}"
        lines.append(f"| {e['label']} | {_budget(e)} | {e['accuracy_mean']:.2f} ± {e['accuracy_std']:.2f} | "
                     f"{_versus_text(e)} | {e['flops_ratio']:.3f} | {e['params']:,.0f} | {e['bytes']:,.0f} | "
                     f"{e['latency_b1_ms']:.3f} | {e['latency_b64_ms']:.3f} | {note} |")
    return "\n".join(lines)


def pareto_plot(table: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy against FLOPs ratio, one marker per (method, budget), the Pareto front drawn through
    the non-dominated points. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    cmap = plt.get_cmap("tab20")
    markers = "osD^vP*Xh<>pd8H"
    points = []
    for i, method in enumerate(dict.fromkeys(e["method"] for e in table)):
        entries = [e for e in table if e["method"] == method]
        hollow = all("nonzero_flops_ratio" in e for e in entries)
        xs = [e.get("nonzero_flops_ratio", e["flops_ratio"]) for e in entries]
        ys = [e["accuracy_mean"] for e in entries]
        ax.errorbar(xs, ys, yerr=[e["accuracy_std"] for e in entries], fmt=markers[i % len(markers)], capsize=3,
                    color=cmap(i % 20), mfc="none" if hollow else cmap(i % 20), label=METHODS[method].label)
        if not hollow:
            points += list(zip(xs, ys, strict=True))
    front = sorted(points)
    best, line = -np.inf, []
    for x, y in front:
        if y > best:
            best = y
            line.append((x, y))
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="grey", lw=1, ls="--", label="Pareto front")
    ax.set_xlabel("FLOPs ratio (pruned / dense; hollow: nonzero FLOPs of unstructured sparsity)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _hparams(out: Path, table: list[dict[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(out / "tb", ignore_errors=True)  # a rerun writes the whole table again
    with SummaryWriter(str(out / "tb")) as writer:
        for e in table:
            metrics = {f"compare/{k}": e[k] for k in ("accuracy_mean", "accuracy_std", "flops_ratio", "bytes",
                                                      "latency_b1_ms", "latency_b64_ms") if k in e}
            writer.add_hparams({"method": e["method"], "budget": -1.0 if e["budget"] is None else e["budget"]},
                               metrics, run_name=f"{e['method']}__{_budget(e)}")
