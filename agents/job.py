"""The machinery both jobs (per layer, per input) share: the run directory (claimed by one process,
``config.json`` first, ``report.json`` last), the RL search with its resumable checkpoints, and
measuring the report's models (accuracy, FLOPs, bytes, latency and the ratios to the dense model).

A run directory holds ``config.json`` (written first), ``checkpoints/`` (during the search),
``tb/`` (TensorBoard events), ``agent.zip``, the job's models and ``report.json``, written last: a
run is complete exactly when ``report.json`` exists.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunegym.compression.checkpoint import read_json, write_json
from prunegym.compression.distillation import Distillation
from prunegym.compression.fusion import inference_form
from prunegym.compression.locking import LOCK_NAME, DirectoryLock, DirectoryLocked
from prunegym.compression.metrics import count_flops, count_params, measure_latency, model_bytes, relative_latency
from prunegym.compression.training import evaluate

from .agent_files import UntrustedFileError, load_agent_file, load_replay_buffer, save_agent
from .callbacks import ResumableCheckpointCallback, latest_checkpoint
from .config import CONFIG_FORMAT, ENVS, RunDirError, TrainConfig, changed_settings, env_kwargs, load_config
from .factory import ALGORITHMS, make_agent, start_policy_at

__all__ = ["add_ratios", "claim_output", "FINAL_OUTPUTS", "RATIO_BLOCKS", "batch_of_64",
           "check_resumable", "distillation", "finish_report", "measure_model", "measure_models", "release_run_dir",
           "results_table", "search", "static_latency"]


# Each latency ratio of a static model to the dense one: at least this many blocks of four calls
# (relative_latency). On a noisy 2-core machine, about 25 blocks of ResNet-20 at batch 64 give a
# ratio with a standard deviation of about 2% (docs/latency.md).
RATIO_BLOCKS = 30


FINAL_OUTPUTS = ("report.json", "model.pt", "uniform.pt", "uniform_l1.pt", "latency_greedy.pt", "gate.pt", "agent.zip")


def distillation(config: Any, dense: torch.nn.Module) -> Distillation | None:
    """The fine-tune's teacher when ``config.distill`` (a ``TrainConfig`` or ``CompareConfig``): the
    dense model, a frozen copy."""
    return Distillation(copy.deepcopy(dense).eval().requires_grad_(False)) if config.distill else None


def batch_of_64(x: torch.Tensor) -> torch.Tensor:
    """64 inputs from ``x`` (repeated when it has fewer): the batch-64 latency input."""
    return x[:64].repeat(-(-64 // min(64, len(x))), 1, 1, 1)[:64]


def static_latency(models: list[torch.nn.Module], x: torch.Tensor, threads: int) -> list[dict[str, float]]:
    """Batch-1 and batch-64 latency (ms on the CPU) of each model, whose cost does not depend on the
    input. The first model's is the median of its passes (``measure_latency``); each other model's is
    the first's times its ratio to it, timed in alternating blocks of calls (``relative_latency``: at
    least ``RATIO_BLOCKS`` blocks, more while they take under 0.25 s), so that the ratios hold when
    the machine's speed drifts or jumps between calls."""
    per_batch = []
    for batch in (x[:1], batch_of_64(x)):
        first = measure_latency(models[0], batch, repeats=30, warmup=5, threads=threads, fill_seconds=0.25,
                                max_repeats=1000)
        per_batch.append([first] + [first * relative_latency(model, models[0], batch, blocks=RATIO_BLOCKS,
                                                             threads=threads, fill_seconds=0.25, max_blocks=1000)
                                    for model in models[1:]])
    return [{"latency_b1_ms": 1e3 * a, "latency_b64_ms": 1e3 * b} for a, b in zip(*per_batch, strict=True)]


def measure_models(models: dict[str, torch.nn.Module], splits, threads: int) -> dict[str, Any]:
    """Test accuracy, FLOPs, parameters, bytes and batch-1/batch-64 latency of static models in their
    inference form (CPU, eval mode, BN folded), the latencies relative to the first model's
    (``static_latency``)."""
    forms = {name: inference_form(model) for name, model in models.items()}
    latencies = static_latency([model for model, _ in forms.values()], splits.test.x, threads)
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


def add_ratios(result: dict[str, Any], dense: dict[str, Any]) -> None:
    """Add ``result``'s ratios to the ``dense`` model's: latency at batch 1 and 64, and FLOPs where
    both count them (``flops``); a ratio already in ``result`` is kept."""
    if "flops" in result and "flops" in dense:
        result.setdefault("flops_ratio", result["flops"] / dense["flops"])
    for b in ("b1", "b64"):
        result.setdefault(f"latency_ratio_{b}", result[f"latency_{b}_ms"] / dense[f"latency_{b}_ms"])


def finish_report(run_dir: Path, report: dict[str, Any], started: float, text: Any, log: Any) -> dict[str, Any]:
    """Complete a job: its wall time since ``started`` into ``report``, ``report.json`` written (last: a
    run is complete exactly when it exists), and ``text(report)``, the terminal table, logged."""
    report["seconds"] = time.perf_counter() - started
    write_json(run_dir / "report.json", report)
    log(text(report))
    return report


def results_table(results: dict[str, dict[str, Any]], columns: list[tuple[str, str, int, str]],
                  name_width: int = 8) -> list[str]:
    """A report's models as terminal lines: a header, a rule, one line per model. ``columns`` are
    (title, key in each result, width, format spec such as ``.3f``)."""
    header = f"{'model':<{name_width}}" + "".join(f"{title:>{width}}" for title, _, width, _ in columns)
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lines.append(f"{name:<{name_width}}" + "".join(f"{r[key]:>{width}{spec}}" for _, key, width, spec in columns))
    return lines


def _write_config(config: TrainConfig, run_dir: Path) -> None:
    write_json(run_dir / "config.json", {"config": dataclasses.asdict(config), "format": CONFIG_FORMAT,
                                         "env_id": ENVS[config.env], "env_kwargs": env_kwargs(config),
                                         "python": sys.version.split()[0], "torch": torch.__version__,
                                         "platform": platform.platform()})


def check_resumable(config: TrainConfig) -> None:
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


def claim_output(out: Path, *, kind: str, config: Any, free: tuple[str, ...],
                 outputs: tuple[str, ...], before_they_existed: dict[str, Any] | None = None) -> DirectoryLock:
    """Claim the output folder of a ``kind`` of job that many runs continue (a comparison, a sweep):
    one process at a time writes it; it must hold this job's settings (the dataclass ``config``, other
    than the ``free`` ones, which say where and how it runs) or nothing; its final ``outputs`` go
    (incomplete until written again) and ``config.json`` is written. A setting the folder's
    ``config.json`` lacks (one added since it was written) counts as its default, or as its value in
    ``before_they_existed`` where the default has changed since. The claim is returned, held."""
    settings, defaults = dataclasses.asdict(config), dataclasses.asdict(type(config)())
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the {kind}")
    if out.exists() and not (out / "config.json").is_file() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ValueError(f"{out} exists and is not a {kind} folder (no config.json); choose another --out")
    lock = DirectoryLock(out)
    try:
        lock.acquire()
    except DirectoryLocked as err:
        raise ValueError(f"{out} is in use by another {kind}; wait for it, or choose another --out") from err
    try:
        kept = {k: v for k, v in settings.items() if k not in free}
        if (out / "config.json").is_file():
            before = {**defaults, **(before_they_existed or {}), **read_json(out / "config.json")["config"]}
            before = {k: v for k, v in before.items() if k not in free}
            changed = sorted(k for k in kept if before.get(k) != kept[k])
            if changed:
                values = "; ".join(f"{k} {before.get(k)!r} there, {kept[k]!r} here" for k in changed)
                raise ValueError(f"{out} holds a {kind} with other settings ({changed}: {values}); give the settings "
                                 "it ran with to continue it, or choose another --out")
        for name in outputs:
            (out / name).unlink(missing_ok=True)
        write_json(out / "config.json", {"config": settings, "torch": torch.__version__})
    except BaseException:
        lock.release()
        raise
    return lock


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


def search(config: TrainConfig, env: Any, episode_length: int, make_callback: Any, *, device: torch.device,
           resume: bool, progress_bar: bool, log: Any, env_state: Any = None,
           trust_run: bool = False, start_action: float | None = None) -> tuple[Any, Any, Path]:
    """The RL search of either job: build the agent (or load the latest checkpoint when resuming),
    make the run directory, learn up to ``config.timesteps`` with the pruning callback
    (``make_callback(hparams)``) and checkpoints, and save ``agent.zip``. The agent is built before
    the run directory, so a bad setting leaves nothing behind. ``env_state``, an object with
    ``state_dict``/``load_state_dict`` (the env), is saved with each checkpoint and restored on resume.
    ``start_action``: a new agent's first policy is centred there (``start_policy_at``). Returns the
    agent, the callback and the run directory."""
    run_dir = Path(config.run_dir)
    agent_cls = ALGORITHMS[config.algo]
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume else None
    callback = make_callback({**dataclasses.asdict(config), "hyperparameters": str(config.hyperparameters)})
    if checkpoint is None:
        agent = make_agent(config.algo, env, episode_length=episode_length, seed=config.seed, device=str(device),
                           tensorboard_log=str(run_dir / "tb"), hyperparameters=config.hyperparameters)
        if start_action is not None:
            start_policy_at(agent, start_action)
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
    save_agent(agent, run_dir / "agent.zip")
    return agent, callback, run_dir
