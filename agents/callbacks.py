"""Callbacks: ``pruning/*`` scalars for TensorBoard through SB3's logger, and resumable checkpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HParam

from prunegym.compression.checkpoint import interrupts_held, read_json, write_json

from .agent_files import save_agent, save_replay_buffer

__all__ = ["PruningCallback", "InputPruningCallback", "ResumableCheckpointCallback", "latest_checkpoint"]


def _record_hparams(logger: Any, hparams: dict[str, Any], reward_metric: str) -> None:
    """Log a search's hyper-parameters to TensorBoard's HParams tab (once, at the start), beside
    ``reward_metric`` and ``pruning/accuracy``; values TensorBoard cannot show are logged as text."""
    if not hparams:
        return
    shown = {k: (v if isinstance(v, bool | str | float | int) or v is None else str(v)) for k, v in hparams.items()}
    logger.record("hparams", HParam(shown, {reward_metric: 0.0, "pruning/accuracy": 0.0}),
                  exclude=("stdout", "log", "json", "csv"))


class PruningCallback(BaseCallback):
    """Logs every finished pruning episode and remembers the best one (AMC exports the best episode),
    and the ``top`` best distinct allocations, for a job that checks them against a measurement
    before it keeps one (a latency budget measured, not predicted).

    Scalars, averaged over the episodes between two dumps: ``pruning/episode_reward``,
    ``pruning/accuracy``, ``pruning/loss``, ``pruning/density``, ``pruning/flops_ratio``; and
    ``pruning/best_reward`` with ``pruning/best_keep_ratio/<group>`` for the best episode so far.
    ``hparams`` are logged once, at the start of training.
    """

    def __init__(self, group_names: list[str], hparams: dict[str, Any] | None = None, verbose: int = 0,
                 top: int = 10):
        super().__init__(verbose)
        if not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be an int >= 1, got {top!r}")
        self.group_names = group_names
        self.hparams = hparams or {}
        self.episodes = 0
        self.best: dict[str, Any] | None = None  # info of the best episode, with its reward
        self.keep = top
        self.top: list[dict[str, Any]] = []  # the best episodes of distinct keep counts, best first
        self.resumed_seconds = 0.0  # the search's seconds in the runs this one resumes, to their last checkpoint
        self._trained = 0.0  # this run's seconds of training that has ended
        self._started: float | None = None

    @property
    def seconds(self) -> float:
        """The search's seconds so far: this run's training and, resumed, the earlier runs' to their last checkpoint."""
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self.resumed_seconds + self._trained + running

    def _on_training_start(self) -> None:
        self._started = time.perf_counter()
        if self.episodes == 0:
            _record_hparams(self.logger, self.hparams, "pruning/best_reward")

    def _on_step(self) -> bool:
        rewards = self.locals.get("rewards")
        ended = False
        for i, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"], strict=True)):
            if not done or "keep_ratios" not in info:
                continue
            reward = float(np.asarray(rewards)[i])
            self.episodes += 1
            ended = True
            self.logger.record_mean("pruning/episode_reward", reward)
            for key in ("accuracy", "loss", "density", "flops_ratio"):
                self.logger.record_mean(f"pruning/{key}", float(info[key]))
            episode = {"reward": reward, "episode": self.episodes, "timestep": int(self.num_timesteps),
                       **{k: info[k] for k in ("accuracy", "loss", "density", "flops", "flops_ratio",
                                               "params", "keep_ratios", "keep_counts")},
                       **({"latency_ratio": info["latency_ratio"]} if "latency_ratio" in info else {})}
            if self.best is None or reward > self.best["reward"]:
                self.best = episode
            self._remember(episode)
        if ended:  # the best episode can only change when an episode ends
            self.logger.record("pruning/best_reward", self.best["reward"])
            self.logger.record("pruning/episodes", self.episodes)
            for t, (name, ratio) in enumerate(zip(self.group_names, self.best["keep_ratios"], strict=True)):
                self.logger.record(f"pruning/best_keep_ratio/{t:02d}_{name}", ratio)
        return True

    def _on_training_end(self) -> None:
        self._trained += time.perf_counter() - self._started
        self._started = None
        self.logger.dump(self.num_timesteps)

    def _remember(self, episode: dict[str, Any]) -> None:
        counts = list(episode["keep_counts"])
        same = next((i for i, e in enumerate(self.top) if list(e["keep_counts"]) == counts), None)
        if same is not None:
            if self.top[same]["reward"] >= episode["reward"]:
                return
            del self.top[same]
        self.top.append(episode)
        self.top.sort(key=lambda e: -e["reward"])  # stable: of equal rewards, the earlier first
        del self.top[self.keep:]

    def state_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "best": self.best, "top": self.top, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episodes = int(state["episodes"])
        self.best = state["best"]
        self.resumed_seconds = float(state.get("seconds", 0.0))  # a run saved before it was kept: unknown, 0
        # A run saved before the list was kept resumes with its best episode as the list.
        self.top = list(state.get("top", [] if self.best is None else [self.best]))


class InputPruningCallback(BaseCallback):
    """Logs the per-input episodes of ``prunegym/InputPruning-v0`` (many end at once in the batched env).

    Scalars, averaged over the episodes between two dumps: ``pruning/episode_reward``,
    ``pruning/accuracy``, ``pruning/loss``, ``pruning/density`` (the mean per-input density),
    ``pruning/density_std`` (its spread over those inputs) and ``pruning/keep_ratio/<layer>``
    (each gated layer's mean kept fraction). ``hparams`` are logged once.
    """

    def __init__(self, layer_names: list[str], hparams: dict[str, Any] | None = None, verbose: int = 0):
        super().__init__(verbose)
        self.layer_names = layer_names
        self.hparams = hparams or {}
        self.episodes = 0

    def _on_training_start(self) -> None:
        if self.episodes == 0:
            _record_hparams(self.logger, self.hparams, "pruning/episode_reward")

    def _on_step(self) -> bool:
        finished = [(i, info) for i, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"],
                                                                  strict=True)) if done and "keep_ratios" in info]
        if not finished:
            return True
        rewards = np.asarray(self.locals["rewards"])[[i for i, _ in finished]]
        infos = [info for _, info in finished]
        density = np.array([info["density"] for info in infos])
        self.episodes += len(infos)
        # record_mean weighs each call alike: one call per finished episode keeps the mean per episode
        for i, info in enumerate(infos):
            self.logger.record_mean("pruning/episode_reward", float(rewards[i]))
            for key in ("accuracy", "loss", "density"):
                self.logger.record_mean(f"pruning/{key}", float(info[key]))
        self.logger.record("pruning/density_std", float(density.std()))
        keep = np.array([info["keep_ratios"] for info in infos]).mean(axis=0)
        for t, (name, ratio) in enumerate(zip(self.layer_names, keep, strict=True)):
            self.logger.record(f"pruning/keep_ratio/{t:02d}_{name}", float(ratio))
        self.logger.record("pruning/episodes", self.episodes)
        return True

    def _on_training_end(self) -> None:
        self.logger.dump(self.num_timesteps)

    def state_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episodes = int(state["episodes"])


def latest_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint in ``directory``: (agent zip, its state), or None."""
    state_path = Path(directory) / "state.json"
    if not state_path.is_file():
        return None
    state = read_json(state_path)
    agent = Path(directory) / state["agent"]
    if not agent.is_file():
        raise FileNotFoundError(f"{state_path} names {agent}, which is missing: the checkpoint is damaged")
    return agent, state


class ResumableCheckpointCallback(BaseCallback):
    """Every ``save_freq`` timesteps and at the end: the agent zip, the replay buffer (off-policy agents)
    and ``state.json`` (timesteps, the pruning callback's best episode, and ``env_state.state_dict()``
    when given: what the env learned that its rewards depend on). ``state.json`` is written last
    and atomically, so it only ever names a complete checkpoint."""

    def __init__(self, directory: str | Path, save_freq: int, pruning: PruningCallback | InputPruningCallback,
                 keep: int = 2, env_state: Any = None):
        super().__init__()
        if save_freq < 1:
            raise ValueError(f"save_freq must be >= 1, got {save_freq}")
        self.directory = Path(directory)
        self.save_freq = save_freq
        self.pruning = pruning
        self.keep = keep
        self.env_state = env_state
        self._last_saved = -1
        self._period = 0

    def _save(self) -> None:
        if self.num_timesteps == self._last_saved:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"agent_{self.num_timesteps}_steps"
        with interrupts_held():  # a Ctrl-C now stops the run once this checkpoint is whole
            save_agent(self.model, self.directory / f"{name}.zip")
            state = {"agent": f"{name}.zip", "num_timesteps": int(self.num_timesteps),
                     "callback": self.pruning.state_dict()}
            if self.env_state is not None:
                state["env"] = self.env_state.state_dict()
            if hasattr(self.model, "replay_buffer") and self.model.replay_buffer is not None:
                save_replay_buffer(self.model, self.directory / f"{name}_replay_buffer.pkl")
                state["replay_buffer"] = f"{name}_replay_buffer.pkl"
            write_json(self.directory / "state.json", state)
            self._last_saved = self.num_timesteps
            old = sorted(self.directory.glob("agent_*_steps.zip"), key=lambda p: int(p.stem.split("_")[1]))
            for path in old[: -self.keep]:
                path.unlink(missing_ok=True)
                (self.directory / f"{path.stem}_replay_buffer.pkl").unlink(missing_ok=True)

    def _on_training_start(self) -> None:
        self._period = self.num_timesteps // self.save_freq

    def _on_step(self) -> bool:
        # by timesteps, not calls: a vector env advances num_envs timesteps per call
        if self.num_timesteps // self.save_freq > self._period:
            self._period = self.num_timesteps // self.save_freq
            self._save()
        return True

    def _on_training_end(self) -> None:
        self._save()
