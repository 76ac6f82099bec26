"""The settings of a run of the main job (``TrainConfig``, written once to ``config.json``), and
reading them back from a run directory."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunegym.compression.checkpoint import read_json
from prunegym.compression.importance import IMPORTANCES
from prunegym.compression.models import MODELS
from prunegym.compression.supernet import SUPERNET_SAMPLING
from prunegym.compression.training import BASE_EPOCHS, check_seed, resolve_device
from prunegym.envs import DENSITY_KINDS, INPUT_DENSITY_KINDS, REWARD_MODELS, TASK_LOSSES
from prunegym.envs.reward import check_lam

from .factory import ALGORITHMS, check_hyperparameters, check_policy_start

__all__ = ["BEFORE_THEY_EXISTED", "CONFIG_FORMAT", "DEFAULT_IMPORTANCE", "DEFAULT_TIMESTEPS", "ENVS",
           "FIRST_DEFAULTS", "INPUT_ALGORITHMS", "RunDirError", "TrainConfig", "changed_settings", "env_kwargs",
           "field_docs", "load_config", "main_defaults", "resolve_given", "resume_config"]


ENVS = {"layer": "prunegym/LayerPruning-v0", "input": "prunegym/InputPruning-v0"}


DEFAULT_TIMESTEPS = {"layer": 6000, "input": 200_000}
# group_l1 was measured against l1 for the layer env's supernet (docs/results.md); the input env's figures are l1's.
DEFAULT_IMPORTANCE = {"layer": "group_l1", "input": "l1"}


CONFIG_FORMAT = 2  # config.json's layout; 2: num_envs applies to the layer env too


INPUT_ALGORITHMS = ("ppo", "a2c", "dqn")


# Layer-env settings whose default the input env has no use for, and what an input run records instead.
_INPUT_NEUTRAL = {"flops_target": None, "task_loss": "cross_entropy"}


# The main job's defaults before they changed: before it moved to the distorted digits at a FLOPs budget
# of 0.2, and before the supernet's channels were put in group-L1 order.
FIRST_DEFAULTS = {"dataset": "digits", "flops_target": None, "task_loss": "cross_entropy", "importance": "l1"}


# What a config.json written before a setting existed ran with, where today's default differs (a run's,
# and a comparison's, which shares these settings).
BEFORE_THEY_EXISTED = {"task_loss": FIRST_DEFAULTS["task_loss"], "importance": FIRST_DEFAULTS["importance"]}


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, is incomplete, or is not a run)."""


@dataclass
class TrainConfig:
    """Everything a run needs, written once to ``config.json``."""

    env: str = "layer"
    """which environment: ``layer`` (per-layer static masks, LayerPruning-v0) or ``input`` (a mask per
    input, InputPruning-v0, with the gate baseline beside it)"""
    model: str = "digits_cnn"
    """zoo name (digits_cnn, resnet20, resnet56, vgg_small) or ``package.module:factory``"""
    dataset: str = "digits_distorted"
    """``digits``, ``digits_distorted`` (built in, harder), ``mnist:PATH``, ``cifar10:PATH`` or ``npz:PATH``"""
    algo: str = "ppo"
    """the SB3 algorithm: ppo, a2c, sac, td3, ddpg (layer env); ppo, a2c, dqn (input env)"""
    lam: float = 1.0
    """λ, the price of density in the reward ``-task_loss - λ·density``"""
    density: str = "flops"
    """what density measures: flops, params, channels, or latency (layer env: the pruned model's batch-64
    CPU latency at ``threads`` threads, predicted from a lookup table of its layers' timings); input
    env: flops or channels"""
    flops_target: float | None = 0.2
    """budget mode (layer env): the largest FLOPs ratio the pruned model may have (the reward is then
    ``-task_loss``); none: no budget, the reward prices density with λ. train.py and sweeps drop it when
    --latency-target is given alone"""
    latency_target: float | None = None
    """budget mode (layer env) in latency: the largest batch-64 latency ratio the pruned model may have,
    as a lookup table of its layers' timings at ``threads`` threads predicts it (the reward is then
    ``-task_loss``); with --flops-target too, both hold"""
    reward_finetune_steps: int = 0
    """layer env: a short-term fine-tune before every search reward, this many batches of 64 (0: none,
    the reward model is only soft-masked and BN-recalibrated); about 0.06 s a batch for ResNet-20 at
    32x32 on two cores. Worth it where pruning by half or more leaves every candidate near chance
    before fine-tuning (ResNet-20): then only a fine-tuned loss tells good widths from bad"""
    supernet_epochs: int = 20
    """layer env: first train the base model this many epochs as a weight-sharing supernet of its widths
    (the sandwich rule with in-place distillation; cached per model, dataset and seed), so that every
    candidate the search scores is already trained at its widths; the RL and the uniform model are then
    pruned from the supernet's weights. 0: search and prune the dense model as it is"""
    supernet_extremes: float = 0.0
    """layer env with a supernet: how often its training puts a group at its narrowest or widest width
    instead of a uniform draw, so that mixed shapes (one stage thin beside whole ones, what a latency
    budget favours) are trained and scored as they deserve"""
    supernet_sampling: str = "uniform"
    """layer env with a supernet and --flops-target: ``uniform`` trains every width alike; ``budget`` trains
    the candidates at the FLOPs budget (EagleEye's sampler; one supernet per budget), so that the
    candidates the search compares, and the model cut for the winner, are the ones trained"""
    capacity_weight: float = 0.0
    """layer env in budget mode: κ, the reward becomes ``-task_loss + κ·flops_ratio``, so that among
    candidates the loss before fine-tuning does not separate the search keeps the most computation the
    budgets allow; under --latency-target that is the shape the kernels run efficiently"""
    reward_model: str = "supernet"
    """layer env with a supernet: which model the search's reward scores a candidate on, ``supernet`` (the
    sub-network it will be cut from) or ``dense`` (the trained dense model, soft-masked; the winner is
    still cut from the supernet)"""
    task_loss: str = "error"
    """layer env: the task loss of the search's reward on the reward split, ``cross_entropy`` or ``error``
    (the error rate, 1 - accuracy)"""
    refit_head: bool = False
    """layer env: before the search's reward, re-fit each candidate's classifier to its features of the
    BN-recalibration batches, as BN recalibration re-estimates its statistics. On the digits CNN a
    supernet's shared classifier undervalues the candidates with a thin last conv, and the re-fit makes
    the reward rank them; on ResNet-20 it ranks worse (docs/search.md). About 0.1 s more a candidate on
    the CNN. Not with --reward-finetune-steps"""
    finalists: int = 0
    """layer env: fine-tune the search's this many best distinct allocations by reward with the report's
    recipe and keep the one with the lowest task loss on the reward split (multi-fidelity: the reward ranks
    every candidate, the fine-tune the best few; costs this many fine-tunes). 0: keep the best reward"""
    min_keep: float = 0.25
    """the smallest keep ratio the agent may choose for a group (AMC bounds it likewise: thinner layers
    score well before fine-tuning but recover badly after it)"""
    policy_start: str = "middle"
    """layer env: where the search's first policy centres its actions, ``middle`` (the keep ratio halfway
    between min_keep and 1) or ``uniform`` (the uniform widths' keep ratio at --flops-target; ppo and a2c).
    ``uniform`` keeps a search at a small budget from first spending it on the first layers, where the
    budget's clamp forces the later ones to min_keep and every draw scores alike (docs/results.md)"""
    importance: str | None = None
    """which channels stay inside a group: group_l1 (DepGraph's group magnitude: a channel's filter, BN scale
    and the next layers' weights that read it), l1, l2 or bn_scale; with a supernet, the order its channels
    are put in before it trains. Default group_l1 for the layer env, l1 for the input env"""
    channel_multiple: int = 1
    """keep channel counts at multiples of this, for the RL and the uniform model alike (16 suits
    AVX-512 fp32 kernels, 8 AVX2); a group may always keep all its channels"""
    timesteps: int | None = None
    """environment steps of the search (one step per channel group, or per gated layer and input);
    default 6000 for the layer env, 200000 for the input env"""
    seed: int = 0
    """seed of the data split, the base model, the agent and the fine-tune"""
    base_epochs: int = BASE_EPOCHS
    """epochs to train the dense base model (cached per model, dataset, seed and epochs)"""
    finetune_epochs: int = 40
    """epochs of fine-tuning after pruning, the same for the RL-pruned and the uniform model; 40 is where
    test accuracy stops moving on the zoo's digits models (docs/search.md)"""
    finetune_lr: float = 5e-4
    """learning rate of the fine-tune"""
    distill: bool = False
    """fine-tune every pruned model with knowledge distillation from the dense model (Hinton's loss,
    T = 4, α = 0.9) instead of the labels alone"""
    device: str = "auto"
    """where the search and the fine-tune run: auto, cpu, cuda; latency is always timed on the CPU"""
    threads: int = 1
    """CPU threads for the latency measurements"""
    checkpoint_freq: int = 1000
    """save a resumable checkpoint every this many timesteps"""
    run_dir: str = ""
    """the run directory; empty: ``runs/<env>__<model>__<dataset>__<seed>__<time>``"""
    groups: int = 4
    """input env: channel groups per gated layer; the agent keeps the first 1..groups of them"""
    num_envs: int | None = None
    """how many envs the agent steps at once: layer env, copies of the env in as many processes, each
    scoring its own candidates (default 1; the agent's rollouts and updates keep one env's sizes);
    input env, inputs stepped together by the batched env in this process (default 64)"""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    """overrides of the agent's default hyper-parameters"""

    def resolve_defaults(self) -> None:
        """Fill in what depends on the env (the timesteps, the number of envs, the importance; for the input
        env, no budget and its own task loss where the layer env's defaults stand), so config.json records
        what is used."""
        if self.timesteps is None:
            self.timesteps = DEFAULT_TIMESTEPS.get(self.env, DEFAULT_TIMESTEPS["layer"])
        if self.num_envs is None:
            self.num_envs = 64 if self.env == "input" else 1
        if self.importance is None:
            self.importance = DEFAULT_IMPORTANCE.get(self.env, DEFAULT_IMPORTANCE["layer"])
        if self.env == "input":
            defaults = TrainConfig()
            for name, neutral in _INPUT_NEUTRAL.items():
                if getattr(self, name) == getattr(defaults, name):
                    setattr(self, name, neutral)

    def validate(self) -> None:
        if self.env not in ENVS:
            raise ValueError(f"env {self.env!r} is unknown; expected one of {sorted(ENVS)}")
        self.resolve_defaults()
        if self.env == "input":
            neutral = {**dataclasses.asdict(TrainConfig()), **_INPUT_NEUTRAL}
            layer_only = [name for name in ("flops_target", "latency_target", "reward_finetune_steps", "min_keep",
                                            "channel_multiple", "supernet_epochs", "reward_model",
                                            "supernet_extremes", "supernet_sampling", "capacity_weight", "finalists",
                                            "task_loss", "refit_head", "policy_start")
                          if getattr(self, name) != neutral[name]]
            if layer_only:
                raise ValueError(f"{layer_only} apply to the layer env only, not to --env input")
            if self.algo not in INPUT_ALGORITHMS:
                raise ValueError(f"algo {self.algo!r} cannot act in the input env (a discrete action); "
                                 f"expected one of {INPUT_ALGORITHMS}")
            if self.density not in INPUT_DENSITY_KINDS:
                raise ValueError(f"density {self.density!r} is not available per input; expected one of "
                                 f"{INPUT_DENSITY_KINDS}")
            if self.groups < 2:
                raise ValueError(f"groups must be >= 2, got {self.groups}")
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo {self.algo!r} is unknown; expected one of {sorted(ALGORITHMS)}")
        check_hyperparameters(self.algo, self.hyperparameters)
        check_seed(self.seed)
        if self.run_dir and Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise RunDirError(f"--run-dir {self.run_dir} is a file, not a directory")
        if self.density not in DENSITY_KINDS:
            raise ValueError(f"density {self.density!r} is unknown; expected one of {DENSITY_KINDS}")
        check_lam(self.lam)
        if not 0 < self.min_keep <= 1:
            raise ValueError(f"min_keep must be in (0, 1], got {self.min_keep}")
        check_policy_start(self.policy_start, self.algo)
        if self.policy_start == "uniform" and self.flops_target is None:
            raise ValueError("policy_start 'uniform' centres the first policy on the uniform widths at the FLOPs "
                             f"budget; it needs --flops-target (got {self.flops_target})")
        if not math.isfinite(self.finetune_lr) or self.finetune_lr <= 0:
            raise ValueError(f"finetune_lr must be a finite number > 0, got {self.finetune_lr}")
        if not 0 <= self.supernet_extremes <= 1:
            raise ValueError(f"supernet_extremes must be in [0, 1], got {self.supernet_extremes}")
        if self.supernet_extremes and not self.supernet_epochs:
            raise ValueError(f"supernet_extremes={self.supernet_extremes} shapes the supernet's training; "
                             "it needs supernet_epochs > 0")
        if self.supernet_sampling not in SUPERNET_SAMPLING:
            raise ValueError(f"supernet_sampling {self.supernet_sampling!r} is unknown; expected one of "
                             f"{SUPERNET_SAMPLING}")
        if self.supernet_sampling == "budget" and (self.flops_target is None or not self.supernet_epochs
                                                   or self.supernet_extremes):
            raise ValueError("supernet_sampling 'budget' trains the supernet on the candidates at the FLOPs budget; it "
                             f"needs --flops-target (got {self.flops_target}), --supernet-epochs > 0 (got "
                             f"{self.supernet_epochs}) and no --supernet-extremes (got {self.supernet_extremes})")
        check_lam(self.capacity_weight, "capacity_weight")
        if self.capacity_weight and self.flops_target is None and self.latency_target is None:
            raise ValueError(f"capacity_weight={self.capacity_weight} prices what a budget leaves unused; it needs "
                             "--flops-target or --latency-target")
        if self.reward_model not in REWARD_MODELS:
            raise ValueError(f"reward_model {self.reward_model!r} is unknown; expected one of {REWARD_MODELS}")
        if self.task_loss not in TASK_LOSSES:
            raise ValueError(f"task_loss {self.task_loss!r} is unknown; expected one of {TASK_LOSSES}")
        if self.refit_head and self.reward_finetune_steps:
            raise ValueError("refit_head re-fits the classifier of a BN-recalibrated candidate; with "
                             f"reward_finetune_steps={self.reward_finetune_steps} the candidate is fine-tuned "
                             "instead: give one of the two")
        if self.reward_model == "dense" and self.env == "layer" and not self.supernet_epochs:
            raise ValueError("reward_model 'dense' scores candidates on the dense model instead of the supernet; "
                             "it needs supernet_epochs > 0")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance {self.importance!r} is unknown; expected one of {sorted(IMPORTANCES)}")
        resolve_device(self.device)
        for name in ("flops_target", "latency_target"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.num_envs > 1 and (self.density == "latency" or self.latency_target is not None):
            raise ValueError(f"num_envs={self.num_envs}: a latency-priced search times its layers as it goes, and "
                             "timings taken beside other envs' work would be wrong; use num_envs=1")
        for name in ("timesteps", "checkpoint_freq", "threads", "channel_multiple", "num_envs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.finalists and self.latency_target is not None:
            raise ValueError(f"finalists={self.finalists} chooses by fine-tuned loss; under --latency-target the "
                             "job chooses by measured latency instead: give one of the two")
        for name in ("finetune_epochs", "base_epochs", "reward_finetune_steps", "supernet_epochs", "finalists"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if ":" not in self.model and self.model not in MODELS:
            raise ValueError(f"model {self.model!r} is unknown; expected one of {sorted(MODELS)} "
                             "or 'package.module:factory'")

    def default_run_dir(self) -> str:
        dataset = self.dataset.split(":")[0]
        model = self.model.replace(":", ".").replace("/", "_")
        return os.path.join("runs", f"{self.env}__{model}__{dataset}__{self.seed}__{time.strftime('%Y%m%d-%H%M%S')}")


def main_defaults() -> dict[str, Any]:
    """Today's values of the main job's settings whose defaults changed (``FIRST_DEFAULTS``)."""
    defaults = TrainConfig()
    return {name: getattr(defaults, name) for name in FIRST_DEFAULTS}


def resolve_given(config: TrainConfig, given: Iterable[str]) -> None:
    """Settle what depends on which settings the user gave (``given``, their names), as the main job
    reads them: a latency budget given without a FLOPs budget has none of the default one; a setting
    the run would not use is refused by name (the layer env's budget or task loss in an input run,
    whose defaults are the layer env's; λ or the density kind where a budget makes the reward
    ``-task_loss``)."""
    given = set(given)
    if config.env == "input":
        unused = sorted(given & set(_INPUT_NEUTRAL))
        if unused:
            raise ValueError(f"{unused} apply to the layer env only, not to --env input")
        return
    if "latency_target" in given and "flops_target" not in given:
        config.flops_target = None
    budgeted = config.flops_target is not None or config.latency_target is not None
    unused = sorted(given & {"lam", "density"}) if budgeted else []
    if unused:
        raise ValueError(f"{unused} price density only without a budget; with flops_target={config.flops_target} "
                         f"and latency_target={config.latency_target} the reward is -task_loss (give flops_target "
                         "none to price density instead)")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source), as plain text for
    a ``--help`` line: reStructuredText's double backquotes dropped."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value.replace("``", "")
    return docs


def env_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The keywords of the env (``ENVS[config.env]``) this config trains on (its defaults that depend on
    the env resolved first)."""
    config.resolve_defaults()
    if config.env == "input":
        return {"model": config.model, "dataset": config.dataset, "lam": config.lam, "density": config.density,
                "seed": config.seed, "groups": config.groups, "importance": config.importance,
                "base_epochs": config.base_epochs}
    return {"model": config.model, "dataset": config.dataset, "lam": config.lam, "density": config.density,
            "seed": config.seed, "flops_target": config.flops_target, "min_keep": config.min_keep,
            "importance": config.importance, "channel_multiple": config.channel_multiple,
            "base_epochs": config.base_epochs, **_latency_kwargs(config),
            **({"finetune_steps": config.reward_finetune_steps} if config.reward_finetune_steps else {}),
            **({"supernet_epochs": config.supernet_epochs} if config.supernet_epochs else {}),
            **({"supernet_extremes": config.supernet_extremes} if config.supernet_extremes else {}),
            **({"supernet_sampling": config.supernet_sampling} if config.supernet_sampling != "uniform" else {}),
            **({"capacity_weight": config.capacity_weight} if config.capacity_weight else {}),
            **({"reward_model": config.reward_model} if config.reward_model != "supernet" else {}),
            **({"task_loss": config.task_loss} if config.task_loss != "cross_entropy" else {}),
            **({"refit_head": True} if config.refit_head else {})}


def _latency_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The latency table's keywords, only where the run prices or budgets latency (older runs' env
    keywords stay as they were)."""
    if config.density != "latency" and config.latency_target is None:
        return {}
    return {"latency_target": config.latency_target, "latency_threads": config.threads}


def changed_settings(saved: TrainConfig, config: TrainConfig,
                     free: tuple[str, ...] = ("device", "run_dir")) -> list[str]:
    """The fields of ``config`` that differ from those a run was ``saved`` with, other than ``free``."""
    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.name not in free and getattr(saved, f.name) != getattr(config, f.name)]


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The ``TrainConfig`` a run directory was started with."""
    if not (Path(run_dir) / "config.json").is_file():
        raise RunDirError(f"{run_dir} is not a prunegym run directory (no config.json)")
    data = read_json(Path(run_dir) / "config.json")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{**BEFORE_THEY_EXISTED, **{k: v for k, v in data["config"].items() if k in known}})
    if data.get("format", 1) < 2 and config.env == "layer":
        config.num_envs = 1  # runs from before num_envs applied to the layer env recorded the input env's 64
    return config


def resume_config(run_dir: str | os.PathLike, *, timesteps: int | None = None,
                  device: str | None = None) -> TrainConfig:
    """The saved config of ``run_dir``, where it is now, optionally with more timesteps or another device."""
    config = load_config(run_dir)
    config.run_dir = str(run_dir)  # the run may have moved since it was started
    if timesteps is not None:
        config.timesteps = timesteps  # train() refuses fewer than the run's own total
    if device is not None:
        config.device = device
    return config
