"""Running the main job: ``train`` (either env's job, from its settings) and ``run_or_reuse`` (a
run that may already be finished or stopped part way, as a comparison's cell or a sweep's trial)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prunegym.compression.checkpoint import read_json

from .callbacks import latest_checkpoint
from .config import RunDirError, TrainConfig, changed_settings, load_config
from .job import check_resumable, release_run_dir
from .run_input import train_input
from .run_layer import train_layer

__all__ = ["run_or_reuse", "train"]


def train(config: TrainConfig, *, resume: bool = False, progress_bar: bool = False,
          log: Any = print, trust_run: bool = False, baselines: bool = True) -> dict[str, Any]:
    """Run the whole job and return the report.

    With ``resume``, ``config`` is the run's own (``resume_config``): the search continues from the
    latest checkpoint in ``config.run_dir``, the timestep count going on from where it stopped. The
    checkpoint is read without running code from it unless ``trust_run`` (``agent_files``).
    ``baselines=False`` leaves the layer job's baselines (the uniform models, latency-greedy) out of
    the report, and their fine-tunes undone: what a comparison, which runs them as methods of its
    own, asks for. It changes nothing about the search or the RL model.
    """
    if resume:
        check_resumable(config)
    config.validate()
    config.run_dir = config.run_dir or config.default_run_dir()  # named once: the name holds the time
    try:
        if config.env == "input":
            return train_input(config, resume=resume, progress_bar=progress_bar, log=log, trust_run=trust_run)
        return train_layer(config, resume=resume, progress_bar=progress_bar, log=log, trust_run=trust_run,
                           baselines=baselines)
    finally:
        release_run_dir(config.run_dir)


def run_or_reuse(config: TrainConfig, *, log: Any = print, baselines: bool = True) -> dict[str, Any]:
    """The report of the job ``config`` describes, in ``config.run_dir``: read back when that run is
    complete (with these settings: others are refused), continued from its latest checkpoint when it
    stopped, run from the start otherwise (what a run left before its first checkpoint goes). What
    a job that runs runs many times over (a comparison's cell, a sweep's trial) calls, so that a
    retried or resumed job neither repeats finished work nor mixes settings. ``baselines`` as ``train``'s
    (a finished run is read back as it is, with or without them)."""
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
    return train(config, resume=resume, log=log, baselines=baselines)
