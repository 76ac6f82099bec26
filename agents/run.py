"""The main job, readable top to bottom: base model -> RL search -> best policy -> hard prune ->
fine-tune -> report, everything in one run directory.

A run directory holds ``config.json`` (written first), ``checkpoints/`` (during the search),
``tb/`` (TensorBoard events), ``agent.zip``, ``model.pt`` (the pruned, fine-tuned model with its
architecture), ``uniform.pt`` (the uniform baseline; with a latency budget also ``latency_greedy.pt``,
the widest counts the latency table fits in the budgets) and ``report.json``, written last: a run is
complete exactly when ``report.json`` exists.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import math
import os
import platform
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import SubprocVecEnv

from prunegym.compression.channels import IMPORTANCES, prune_channels
from prunegym.compression.checkpoint import describe_architecture, read_json, save_checkpoint, write_json
from prunegym.compression.distillation import Distillation
from prunegym.compression.fusion import inference_form
from prunegym.compression.latency import widest_within
from prunegym.compression.locking import LOCK_NAME, DirectoryLock, DirectoryLocked
from prunegym.compression.metrics import count_flops, count_params, measure_latency_rounds, model_bytes
from prunegym.compression.models import MODELS
from prunegym.compression.sparsity import uniform_keep_counts
from prunegym.compression.training import BASE_EPOCHS, check_seed, evaluate, resolve_device, train_classifier
from prunegym.envs import DENSITY_KINDS, INPUT_DENSITY_KINDS, REWARD_MODELS, LayerPruningEnv
from prunegym.envs.reward import check_lam

from .agent_files import UntrustedFileError, load_agent_file, load_replay_buffer
from .callbacks import PruningCallback, ResumableCheckpointCallback, latest_checkpoint
from .factory import ALGORITHMS, make_agent

__all__ = ["ENVS", "DEFAULT_TIMESTEPS", "INPUT_ALGORITHMS", "FINAL_OUTPUTS", "TrainConfig", "train", "env_kwargs",
           "load_config", "resume_config", "format_report", "field_docs", "measure_model", "measure_models",
           "static_latency", "batch_of_64", "distillation", "RunDirError", "changed_settings", "run_or_reuse"]


ENVS = {"layer": "prunegym/LayerPruning-v0", "input": "prunegym/InputPruning-v0"}
DEFAULT_TIMESTEPS = {"layer": 6000, "input": 200_000}
REPORT_ROUNDS = 3  # the report's models take turns this many times at each latency measurement
CONFIG_FORMAT = 2  # config.json's layout; 2: num_envs applies to the layer env too
INPUT_ALGORITHMS = ("ppo", "a2c", "dqn")


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
    dataset: str = "digits"
    """``digits``, ``mnist:PATH``, ``cifar10:PATH`` or ``npz:PATH``"""
    algo: str = "ppo"
    """the SB3 algorithm: ppo, a2c, sac, td3, ddpg (layer env); ppo, a2c, dqn (input env)"""
    lam: float = 1.0
    """λ, the price of density in the reward ``-task_loss - λ·density``"""
    density: str = "flops"
    """what density measures: flops, params, channels, or latency (layer env: the pruned model's batch-64
    CPU latency at ``threads`` threads, predicted from a lookup table of its layers' timings); input
    env: flops or channels"""
    flops_target: float | None = None
    """budget mode (layer env): the largest FLOPs ratio the pruned model may have (the reward is then
    ``-task_loss``)"""
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
    reward_model: str = "supernet"
    """layer env with a supernet: which model the search's reward scores a candidate on, ``supernet`` (the
    sub-network it will be cut from) or ``dense`` (the trained dense model, soft-masked; the winner is
    still cut from the supernet)"""
    min_keep: float = 0.25
    """the smallest keep ratio the agent may choose for a group (AMC bounds it likewise: thinner layers
    score well before fine-tuning but recover badly after it)"""
    importance: str = "l1"
    """which channels stay inside a group: l1, l2 or bn_scale"""
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
        """Fill in what depends on the env (the timesteps), so config.json records the number used."""
        if self.timesteps is None:
            self.timesteps = DEFAULT_TIMESTEPS.get(self.env, DEFAULT_TIMESTEPS["layer"])
        if self.num_envs is None:
            self.num_envs = 64 if self.env == "input" else 1

    def validate(self) -> None:
        if self.env not in ENVS:
            raise ValueError(f"env {self.env!r} is unknown; expected one of {sorted(ENVS)}")
        self.resolve_defaults()
        if self.env == "input":
            defaults = TrainConfig()
            layer_only = [name for name in ("flops_target", "latency_target", "reward_finetune_steps", "min_keep",
                                            "channel_multiple", "supernet_epochs", "reward_model",
                                            "supernet_extremes")
                          if getattr(self, name) != getattr(defaults, name)]
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
        check_seed(self.seed)
        if self.run_dir and Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise RunDirError(f"--run-dir {self.run_dir} is a file, not a directory")
        if self.density not in DENSITY_KINDS:
            raise ValueError(f"density {self.density!r} is unknown; expected one of {DENSITY_KINDS}")
        check_lam(self.lam)
        if not 0 < self.min_keep <= 1:
            raise ValueError(f"min_keep must be in (0, 1], got {self.min_keep}")
        if not math.isfinite(self.finetune_lr) or self.finetune_lr <= 0:
            raise ValueError(f"finetune_lr must be a finite number > 0, got {self.finetune_lr}")
        if not 0 <= self.supernet_extremes <= 1:
            raise ValueError(f"supernet_extremes must be in [0, 1], got {self.supernet_extremes}")
        if self.supernet_extremes and not self.supernet_epochs:
            raise ValueError(f"supernet_extremes={self.supernet_extremes} shapes the supernet's training; "
                             "it needs supernet_epochs > 0")
        if self.reward_model not in REWARD_MODELS:
            raise ValueError(f"reward_model {self.reward_model!r} is unknown; expected one of {REWARD_MODELS}")
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
        for name in ("finetune_epochs", "base_epochs", "reward_finetune_steps", "supernet_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if ":" not in self.model and self.model not in MODELS:
            raise ValueError(f"model {self.model!r} is unknown; expected one of {sorted(MODELS)} "
                             "or 'package.module:factory'")

    def default_run_dir(self) -> str:
        dataset = self.dataset.split(":")[0]
        model = self.model.replace(":", ".").replace("/", "_")
        return os.path.join("runs", f"{self.env}__{model}__{dataset}__{self.seed}__{time.strftime('%Y%m%d-%H%M%S')}")


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
    """The keywords of the env (``ENVS[config.env]``) this config trains on."""
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
            **({"reward_model": config.reward_model} if config.reward_model != "supernet" else {})}


def _latency_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The latency table's keywords, only where the run prices or budgets latency (older runs' env
    keywords stay as they were)."""
    if config.density != "latency" and config.latency_target is None:
        return {}
    return {"latency_target": config.latency_target, "latency_threads": config.threads}


def distillation(config: Any, dense: torch.nn.Module) -> Distillation | None:
    """The fine-tune's teacher when ``config.distill`` (a ``TrainConfig`` or ``CompareConfig``): the
    dense model, a frozen copy."""
    return Distillation(copy.deepcopy(dense).eval().requires_grad_(False)) if config.distill else None


def batch_of_64(x: torch.Tensor) -> torch.Tensor:
    """64 inputs from ``x`` (repeated when it has fewer): the batch-64 latency input."""
    return x[:64].repeat(-(-64 // min(64, len(x))), 1, 1, 1)[:64]


def static_latency(models: list[torch.nn.Module], x: torch.Tensor, threads: int,
                   rounds: int = 1) -> list[dict[str, float]]:
    """Batch-1 and batch-64 latency (median ms on the CPU) of each model, whose cost does not depend
    on the input; with several models and ``rounds`` > 1 timed in alternating rounds
    (``measure_latency_rounds``), so that their ratios hold when the machine has a slow spell."""
    b1 = measure_latency_rounds(models, x[:1], rounds=rounds, repeats=200, warmup=20, threads=threads)
    b64 = measure_latency_rounds(models, batch_of_64(x), rounds=rounds, repeats=50, warmup=5, threads=threads)
    return [{"latency_b1_ms": 1e3 * a, "latency_b64_ms": 1e3 * b} for a, b in zip(b1, b64, strict=True)]


def measure_models(models: dict[str, torch.nn.Module], splits, threads: int, rounds: int = 1) -> dict[str, Any]:
    """Test accuracy, FLOPs, parameters, bytes and batch-1/batch-64 latency of static models in their
    inference form (CPU, eval mode, BN folded), the latencies timed together (``static_latency``)."""
    forms = {name: inference_form(model) for name, model in models.items()}
    latencies = static_latency([model for model, _ in forms.values()], splits.test.x, threads, rounds)
    results = {}
    for (name, (model, folding)), latency in zip(forms.items(), latencies, strict=True):
        loss, accuracy = evaluate(model, splits.test, device=torch.device("cpu"))
        results[name] = {"test_accuracy": accuracy, "test_loss": loss, "flops": count_flops(model, splits.test.x[:1]),
                         "params": count_params(model), "bytes": model_bytes(model), **latency,
                         "inference_form": folding}
    return results


def measure_model(model: torch.nn.Module, splits, threads: int) -> dict[str, Any]:
    """``measure_models`` of one model."""
    return measure_models({"model": model}, splits, threads)["model"]


def _write_config(config: TrainConfig, run_dir: Path) -> None:
    write_json(run_dir / "config.json", {"config": dataclasses.asdict(config), "format": CONFIG_FORMAT,
                                         "env_id": ENVS[config.env], "env_kwargs": env_kwargs(config),
                                         "python": sys.version.split()[0], "torch": torch.__version__,
                                         "platform": platform.platform()})


FINAL_OUTPUTS = ("report.json", "model.pt", "uniform.pt", "latency_greedy.pt", "gate.pt", "agent.zip")


def changed_settings(saved: TrainConfig, config: TrainConfig,
                     free: tuple[str, ...] = ("device", "run_dir")) -> list[str]:
    """The fields of ``config`` that differ from those a run was ``saved`` with, other than ``free``."""
    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.name not in free and getattr(saved, f.name) != getattr(config, f.name)]


def _check_resumable(config: TrainConfig) -> None:
    """A resumed run must exist and keep its saved settings (only timesteps and device may change)."""
    if not config.run_dir:
        raise RunDirError("resuming needs the run directory to continue (--run-dir)")
    saved = load_config(config.run_dir)
    changed = changed_settings(saved, config, free=("timesteps", "device", "run_dir"))
    if changed:
        raise ValueError(f"cannot resume {config.run_dir} with other settings than it was started with: {changed}")
    if config.timesteps < saved.timesteps:
        raise ValueError(f"timesteps={config.timesteps} is below the run's own total {saved.timesteps}; "
                         "a resumed run can only be extended")


_CLAIMS: dict[Path, DirectoryLock] = {}  # run directories this process is writing, locked until it is done


def _prepare_run_dir(config: TrainConfig, resume: bool) -> Path:
    """Claim the run directory (one process at a time: ``DirectoryLock``), check it may be used as asked,
    and write ``config.json``. ``release_run_dir`` gives the claim back."""
    run_dir = Path(config.run_dir)  # not a file: TrainConfig.validate refused that
    lock = DirectoryLock(run_dir)
    try:
        lock.acquire()
    except DirectoryLocked as err:
        raise RunDirError(f"run directory {run_dir} is in use by another prunegym process; wait for it to "
                          "finish, or choose another --run-dir") from err
    except OSError as err:
        raise RunDirError(f"cannot write to run directory {run_dir} ({err.strerror or err})") from err
    try:
        if resume:
            # The run is incomplete again until the new report is written; the outputs of the last
            # finish go too, so nothing outdated can be loaded from it meanwhile.
            for name in FINAL_OUTPUTS:
                (run_dir / name).unlink(missing_ok=True)
        elif any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            raise RunDirError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                              "or choose another --run-dir")
        _write_config(config, run_dir)
    except BaseException:
        lock.release()
        raise
    _CLAIMS[run_dir.resolve()] = lock
    return run_dir


def release_run_dir(run_dir: str | os.PathLike) -> None:
    """Give back this process's claim on ``run_dir`` (nothing if it holds none)."""
    lock = _CLAIMS.pop(Path(run_dir).resolve(), None) if run_dir else None
    if lock is not None:
        lock.release()


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The ``TrainConfig`` a run directory was started with."""
    if not (Path(run_dir) / "config.json").is_file():
        raise RunDirError(f"{run_dir} is not a prunegym run directory (no config.json)")
    data = read_json(Path(run_dir) / "config.json")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in data["config"].items() if k in known})
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


def search(config: TrainConfig, env: Any, episode_length: int, make_callback: Any, *, device: torch.device,
           resume: bool, progress_bar: bool, log: Any, env_state: Any = None,
           trust_run: bool = False) -> tuple[Any, Any, Path]:
    """The RL search of either job: build the agent (or load the latest checkpoint when resuming),
    make the run directory, learn up to ``config.timesteps`` with the pruning callback
    (``make_callback(hparams)``) and checkpoints, and save ``agent.zip``. The agent is built before
    the run directory, so a bad setting leaves nothing behind. ``env_state``, an object with
    ``state_dict``/``load_state_dict`` (the env), is saved with each checkpoint and restored on resume.
    Returns the agent, the callback and the run directory."""
    run_dir = Path(config.run_dir)
    agent_cls = ALGORITHMS[config.algo]
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume else None
    callback = make_callback({**dataclasses.asdict(config), "hyperparameters": str(config.hyperparameters)})
    if checkpoint is None:
        agent = make_agent(config.algo, env, episode_length=episode_length, seed=config.seed, device=str(device),
                           tensorboard_log=str(run_dir / "tb"), hyperparameters=config.hyperparameters)
    else:  # everything the checkpoint holds is read before anything in the run directory is touched
        path, state = checkpoint
        try:
            agent = load_agent_file(agent_cls, path, trust=trust_run, env=env, device=device,
                                    tensorboard_log=str(run_dir / "tb"))
            if "replay_buffer" in state:
                load_replay_buffer(agent, run_dir / "checkpoints" / state["replay_buffer"], trust=trust_run)
            callback.load_state_dict(state["callback"])
            if env_state is not None and "env" in state:
                env_state.load_state_dict(state["env"])
        except UntrustedFileError:
            raise
        except Exception as err:  # a damaged file fails in many ways; none of them may cost the run its results
            raise RunDirError(f"cannot resume {run_dir}: its latest checkpoint ({path.name}) does not load "
                              f"({type(err).__name__}: {err}); the run directory was left as it was") from err
    run_dir = _prepare_run_dir(config, resume)
    log(f"run directory: {run_dir}")
    ckpt_cb = ResumableCheckpointCallback(run_dir / "checkpoints", config.checkpoint_freq, callback,
                                          env_state=env_state)
    if checkpoint is not None:
        log(f"resuming from {checkpoint[0]} at timestep {agent.num_timesteps}")
    remaining = config.timesteps - agent.num_timesteps
    if remaining > 0:
        agent.learn(remaining, callback=[callback, ckpt_cb], tb_log_name=config.algo,
                    reset_num_timesteps=checkpoint is None, progress_bar=progress_bar)
    agent.save(run_dir / "agent.zip")
    return agent, callback, run_dir


def train(config: TrainConfig, *, resume: bool = False, progress_bar: bool = False,
          log: Any = print, trust_run: bool = False) -> dict[str, Any]:
    """Run the whole job and return the report.

    With ``resume``, ``config`` is the run's own (``resume_config``): the search continues from the
    latest checkpoint in ``config.run_dir``, the timestep count going on from where it stopped. The
    checkpoint is read without running code from it unless ``trust_run`` (``agent_files``).
    """
    if resume:
        _check_resumable(config)
    config.validate()
    config.run_dir = config.run_dir or config.default_run_dir()  # named once: the name holds the time
    try:
        if config.env == "input":
            from .run_input import train_input

            return train_input(config, resume=resume, progress_bar=progress_bar, log=log, trust_run=trust_run)
        return _train_layer(config, resume=resume, progress_bar=progress_bar, log=log, trust_run=trust_run)
    finally:
        release_run_dir(config.run_dir)


def run_or_reuse(config: TrainConfig, *, log: Any = print) -> dict[str, Any]:
    """The report of the job ``config`` describes, in ``config.run_dir``: read back when that run is
    complete (with these settings: others are refused), continued from its latest checkpoint when it
    stopped, run from the start otherwise (what a run left before its first checkpoint goes). What
    a job that runs runs many times over (a comparison's cell, a sweep's trial) calls, so that a
    retried or resumed job neither repeats finished work nor mixes settings."""
    if not config.run_dir:
        raise RunDirError("run_or_reuse needs config.run_dir, the run directory to use")
    config.resolve_defaults()
    run_dir = Path(config.run_dir)
    if (run_dir / "report.json").is_file():
        changed = changed_settings(load_config(run_dir), config)
        if changed:
            raise ValueError(f"{run_dir} holds a run with other settings ({changed}); remove it to run it again")
        return read_json(run_dir / "report.json")
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to keep
    return train(config, resume=resume, log=log)


def _layer_env(kwargs: dict[str, Any], device: str, threads: int) -> Monitor:
    torch.set_num_threads(threads)
    return Monitor(LayerPruningEnv(**kwargs, device=device))


def parallel_envs(kwargs: dict[str, Any], n: int, device: torch.device) -> SubprocVecEnv:
    """``n`` copies of ``LayerPruningEnv(**kwargs)``, each in its own process with an equal share of
    the CPUs, stepped together (SB3's ``SubprocVecEnv``; SB3 seeds copy i with the agent's seed + i)."""
    threads = max(1, (os.cpu_count() or 1) // n)
    return SubprocVecEnv([functools.partial(_layer_env, kwargs, str(device), threads) for _ in range(n)])


def _train_layer(config: TrainConfig, *, resume: bool, progress_bar: bool, log: Any, trust_run: bool) -> dict[str, Any]:
    """The per-layer job of ``train``."""
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
        agent, pruning_cb, run_dir = search(
            config, searched, env.num_groups,
            lambda hp: PruningCallback([g.name for g in env.graph.groups], hparams=hp), device=device, resume=resume,
            progress_bar=progress_bar, log=log, env_state=env if config.num_envs == 1 else None, trust_run=trust_run)
    finally:
        if config.num_envs > 1:
            searched.close()
    search_seconds = time.perf_counter() - search_started

    # 3. The best policy found: the best episode of the search, or the final deterministic policy.
    obs, _ = env.reset()
    done = False
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        obs, reward, done, _, info = env.step(action)
    candidates = [("final deterministic policy", float(reward), info)]
    if pruning_cb.best is not None:
        candidates.append(("best search episode", pruning_cb.best["reward"], pruning_cb.best))
    source, best_reward, best = max(candidates, key=lambda c: c[1])
    counts = np.asarray(best["keep_counts"], dtype=np.int64)
    log(f"best policy ({source}): reward {best_reward:.4f}, FLOPs ratio {best['flops_ratio']:.3f}, "
        f"keep ratios {np.round(best['keep_ratios'], 3).tolist()}")

    # 4. Hard prune and fine-tune the RL choice and the uniform L1 baseline at the same FLOPs; under a
    # latency budget also the latency-greedy baseline (the widest counts the table fits in the budgets).
    uniform = uniform_keep_counts(env.graph, float(env.graph.flops(counts)) / env.graph.dense_flops,
                                  env.channel_multiple)
    allocations = {"rl": counts, "uniform": uniform}
    if env.latency_target is not None:
        allocations["latency_greedy"] = widest_within(env.latency, env.allowed, flops_target=env.flops_target,
                                                      latency_target=env.latency_target)
    models = {"dense": env.dense}  # the trained base model (env.model is the supernet, when there is one)
    teacher = distillation(config, env.dense)
    for name, keep in allocations.items():
        pruned = prune_channels(env.model, env.graph, env.kept_channels(keep))
        train_classifier(pruned, splits.train, epochs=config.finetune_epochs, lr=config.finetune_lr,
                         seed=config.seed, device=device, distill=teacher)
        models[name] = pruned

    # 5. Report: test split only, latency on the CPU with fixed threads, all models in one process.
    results = measure_models(models, splits, config.threads, rounds=REPORT_ROUNDS)
    for name, keep in allocations.items():
        results[name]["keep_ratios"] = (keep / env.graph.num_channels).tolist()
    for result in results.values():
        result["flops_ratio"] = result["flops"] / results["dense"]["flops"]
        for b in ("b1", "b64"):
            result[f"latency_ratio_{b}"] = result[f"latency_{b}_ms"] / results["dense"][f"latency_{b}_ms"]
    arch_of = lambda m: describe_architecture(m, config.model, splits.in_channels, splits.num_classes,  # noqa: E731
                                              splits.image_size)
    save_checkpoint(run_dir / "model.pt", models["rl"], arch_of(models["rl"]),
                    {"kind": "static", "keep_ratios": results["rl"]["keep_ratios"], "run_dir": str(run_dir)})
    for name in ("uniform", "latency_greedy"):
        if name in models:
            save_checkpoint(run_dir / f"{name}.pt", models[name], arch_of(models[name]),
                            {"kind": "static", "keep_ratios": results[name]["keep_ratios"]})
    report = {
        "results": results,
        "search": {"source": source, "best_reward": best_reward, "episodes": pruning_cb.episodes,
                   "timesteps": int(agent.num_timesteps), "seconds": search_seconds,
                   "supernet_seconds": env.supernet_seconds,
                   "reward_split_accuracy": best["accuracy"], "groups": [g.name for g in env.graph.groups]},
        "notes": "Every model measured in its inference form (BN folded into the convs where torch.fx can "
                 "trace it). FLOPs count 2 per multiply-add (FlopCounterMode). Latency: median ms on the CPU, "
                 f"{config.threads} thread(s), the models timed in {REPORT_ROUNDS} alternating rounds; accuracy "
                 f"on the test split after {config.finetune_epochs} fine-tune epochs for every pruned model"
                 + (" (distilled from the dense model)." if config.distill else "."),
        "seconds": time.perf_counter() - started,
    }
    write_json(run_dir / "report.json", report)
    log(format_report(report))
    env.close()
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for the terminal."""
    width = max(10, *(len(name) + 2 for name in report["results"]))
    header = (f"{'model':<{width}}{'test acc':>10}{'FLOPs':>12}{'ratio':>8}{'params':>10}{'bytes':>10}"
              f"{'b1 ms':>9}{'b64 ms':>9}{'b64 ratio':>11}")
    lines = [header, "-" * len(header)]
    for name, r in report["results"].items():
        lines.append(f"{name:<{width}}{r['test_accuracy']:>10.4f}{r['flops']:>12,}{r['flops_ratio']:>8.3f}"
                     f"{r['params']:>10,}{r['bytes']:>10,}{r['latency_b1_ms']:>9.3f}{r['latency_b64_ms']:>9.3f}"
                     f"{r['latency_ratio_b64']:>11.3f}")
    search = report.get("search", {})
    if "seconds" in search:
        supernet = search.get("supernet_seconds") or 0.0
        lines.append(f"search: {search['episodes']} episodes in {search['seconds']:.1f} s"
                     + (f" (its supernet took {supernet:.1f} s to train, once per model and seed)" if supernet else ""))
    lines.append(report["notes"])
    return "\n".join(lines)
