"""prunegym/InputPruning-v0: choose, for each input, how many channel groups of each gated layer to
compute (Runtime Neural Pruning's MDP), and a batched engine that steps many inputs at once.

One episode is one train input walking through the gated layers of a ``DynamicNetwork``. The
engine (``InputPruningEngine``) advances N such episodes together with one batched forward per
layer step; the single env is the engine with N = 1, so a batch of N gives the same transitions as
N single envs seeded alike. The Stable-Baselines3 ``VecEnv`` over the engine lives in
``prunegym.agents`` (this package does not import stable-baselines3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn

from prunegym.compression.data import Split, Splits, load_dataset
from prunegym.compression.deciders import FEATURE_CLIP, Observation
from prunegym.compression.dynamic import DynamicNetwork, build_dynamic
from prunegym.compression.gated_layers import DynamicSpec
from prunegym.compression.importance import make_importance
from prunegym.compression.training import BASE_EPOCHS, base_model, resolve_device

from .reward import check_lam

__all__ = ["FEATURE_CLIP", "InputPruningEnv", "InputPruningEngine", "InputPruningSetup", "make_setup",
           "INPUT_DENSITY_KINDS", "observation_size", "observation_stats"]

INPUT_DENSITY_KINDS = ("flops", "channels")
_STATS_INPUTS = 512  # train inputs the observation statistics are estimated on


@dataclass(eq=False)
class InputPruningSetup:
    """What every per-input env over one (model, dataset, seed) shares: the data, the dynamic network
    (eval mode, BN folded, channels in importance order), the reordered trained model it runs and the
    observation statistics."""

    splits: Splits
    net: DynamicNetwork
    model: nn.Module  # the reordered, unfolded trained model (fine-tune it, then rebuild the net)
    spec: DynamicSpec
    stats: tuple[torch.Tensor, torch.Tensor]  # [layers, F] mean and std of the pooled features
    device: torch.device


def observation_size(spec: DynamicSpec) -> int:
    """Pooled features (padded to the widest gated layer input), position one-hot, density spent."""
    return max(layer.in_channels for layer in spec.layers) + len(spec.layers) + 1


@torch.no_grad()
def observation_stats(net: DynamicNetwork, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per gated layer, the mean and std of each pooled input channel on ``x`` with every channel
    kept (padded with 0 and 1 to the widest layer)."""
    spec = net.spec
    width = max(layer.in_channels for layer in spec.layers)
    mean = torch.zeros(len(spec.layers), width)
    std = torch.ones(len(spec.layers), width)
    run = net.steps(x)
    try:
        gate, features, _ = next(run)
        while True:
            pooled = features.mean(dim=(2, 3)).cpu()
            mean[gate, : pooled.shape[1]] = pooled.mean(0)
            std[gate, : pooled.shape[1]] = pooled.std(0).clamp_min(1e-3)
            gate, features, _ = run.send(len(spec.layers[gate].counts) - 1)
    except StopIteration:
        pass
    return mean, std


def make_setup(model: str | nn.Module = "digits_cnn", dataset: str | Splits = "digits", seed: int = 0,
               groups: int = 4, importance: str = "l1", base_epochs: int = BASE_EPOCHS,
               device: str = "cpu") -> InputPruningSetup:
    """Load the data, the trained base model (cached) and build its dynamic network."""
    if not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(groups, int | np.integer) or groups < 2:
        raise ValueError(f"groups must be an int >= 2 (the action keeps 1..groups channel groups), got {groups!r}")
    torch_device = resolve_device(device)
    criterion = make_importance(importance)
    splits = load_dataset(dataset, seed) if isinstance(dataset, str) else dataset
    if not isinstance(splits, Splits):
        raise ValueError(f"dataset must be a spec string or Splits, got {type(dataset).__name__}")
    if isinstance(model, str):
        trained = base_model(model, splits, seed, epochs=base_epochs, device=torch_device)
    elif isinstance(model, nn.Module):
        trained = model
    else:
        raise ValueError(f"model must be a zoo name, an import path or an nn.Module, got {model!r}")
    trained = trained.eval().to(torch_device)
    net, reordered, spec = build_dynamic(trained, splits.train.x[:1].to(torch_device), int(groups), criterion)
    net.eval()
    stats = observation_stats(net, splits.train.x[:_STATS_INPUTS].to(torch_device))
    return InputPruningSetup(splits, net, reordered, spec, stats, torch_device)


class InputPruningEngine:
    """N per-input pruning episodes in lockstep: one batched forward per gated layer.

    Each episode draws its input from the train split with its own generator (``rngs[i]``), so
    episode i follows exactly the inputs a single env seeded like ``rngs[i]`` would draw.
    """

    def __init__(self, setup: InputPruningSetup, num_envs: int, lam: float = 1.0, density: str = "flops",
                 split: Split | None = None):
        if not isinstance(num_envs, int | np.integer) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        check_lam(lam)
        if density not in INPUT_DENSITY_KINDS:
            raise ValueError(f"density must be one of {INPUT_DENSITY_KINDS} for per-input pruning, got {density!r}")
        self.setup = setup
        self.num_envs = int(num_envs)
        self.lam = float(lam)
        self.density_kind = density
        self.split = setup.splits.train if split is None else split
        spec = setup.spec
        self.num_layers = len(spec.layers)
        self.num_actions = spec.groups
        self.obs_size = observation_size(spec)
        self._observe = Observation(*setup.stats).to(setup.device)
        self._channels = np.array([layer.channels for layer in spec.layers], dtype=np.float64)
        self._counts = np.array([layer.counts for layer in spec.layers], dtype=np.int64)
        self._run = None
        self._labels: torch.Tensor | None = None
        self._indices: np.ndarray | None = None
        self._gate: int | None = None

    # ---- observation -----------------------------------------------------------------------------
    def observation(self, gate: int, features: torch.Tensor, spent: Any) -> np.ndarray:
        """``[N, obs_size]`` float32: standardised pooled features, position one-hot, density spent."""
        return self._observe(gate, features, spent).cpu().numpy()

    def terminal_observation(self, density: np.ndarray) -> np.ndarray:
        """What follows the last layer (never acted on): no features, no position, the density spent."""
        obs = np.zeros((len(density), self.obs_size), dtype=np.float32)
        obs[:, -1] = density
        return obs

    # ---- stepping --------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self, rngs: list[np.random.Generator]) -> np.ndarray:
        """Start N new episodes, one input drawn by each generator; returns the first observations."""
        if len(rngs) != self.num_envs:
            raise ValueError(f"need {self.num_envs} generators, got {len(rngs)}")
        self._indices = np.array([int(rng.integers(len(self.split))) for rng in rngs], dtype=np.int64)
        index = torch.from_numpy(self._indices)
        x = self.split.x[index].to(self.setup.device)
        self._labels = self.split.y[index].to(self.setup.device)
        self._run = self.setup.net.steps(x)
        self._gate, features, spent = next(self._run)
        return self.observation(self._gate, features, spent)

    def check_actions(self, actions: Any) -> np.ndarray:
        a = np.asarray(actions).reshape(-1)
        if (a.shape != (self.num_envs,) or not np.issubdtype(a.dtype, np.integer)
                or a.min() < 0 or a.max() >= self.num_actions):
            raise ValueError(f"actions must be {self.num_envs} int(s) in [0, {self.num_actions}), got {actions!r}")
        return a.astype(np.int64)

    @torch.no_grad()
    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, bool, list[dict[str, Any]]]:
        """Apply one action per episode at the current layer. Returns observations, rewards, whether
        the episodes ended (all end together, at the last gated layer) and per-episode infos."""
        if self._run is None:
            raise RuntimeError("call reset() before step()")
        a = self.check_actions(actions)
        gate = self._gate
        try:
            self._gate, features, spent = self._run.send(torch.from_numpy(a).to(self.setup.device))
        except StopIteration as stop:
            self._run = None
            return self._finish(stop.value)
        infos = [{"layer": gate, "keep_count": int(self._counts[gate, a[i]])} for i in range(self.num_envs)]
        return self.observation(self._gate, features, spent), np.zeros(self.num_envs), False, infos

    def _finish(self, logits: torch.Tensor):
        net = self.setup.net
        actions = np.stack([np.asarray(a.cpu() if isinstance(a, torch.Tensor) else
                                       np.full(self.num_envs, a)).reshape(-1) for a in net.last_actions], axis=1)
        flops_density = np.asarray(self.setup.spec.density(actions), dtype=np.float64)
        counts = self._counts[np.arange(self.num_layers), actions]
        if self.density_kind == "flops":
            density = flops_density
        else:
            density = counts.sum(axis=1) / self._channels.sum()
        loss = F.cross_entropy(logits, self._labels, reduction="none").cpu().numpy().astype(np.float64)
        correct = (logits.argmax(1) == self._labels).cpu().numpy()
        rewards = -loss - self.lam * density
        dense_flops = self.setup.spec.dense_flops
        infos = [{
            "accuracy": float(correct[i]), "correct": bool(correct[i]), "loss": float(loss[i]),
            "density": float(density[i]), "flops": float(flops_density[i] * dense_flops),
            "flops_ratio": float(flops_density[i]), "actions": actions[i].tolist(),
            "keep_counts": counts[i].tolist(), "keep_ratios": (counts[i] / self._channels).tolist(),
            "index": int(self._indices[i]),
        } for i in range(self.num_envs)]
        return self.terminal_observation(density.astype(np.float32)), rewards, True, infos


class InputPruningEnv(gym.Env):
    """Prune a trained CNN per input: one episode walks one train input through the gated layers.

    A gated layer is a conv whose output channels no residual add ties to another layer (the inner
    conv of a residual block; every conv of a plain CNN). Its channels are ordered by importance
    once and split into ``groups`` equal groups; the agent keeps the first ``a + 1`` of them, so the
    network computes a contiguous prefix of channels and nothing else.

    ## Action Space
    ``Discrete(groups)``: action ``a`` keeps channel groups ``1..a+1`` of the current layer.

    ## Observation Space
    ``Box(-10, 10, (F + L + 1,), float32)``, in order: the features entering the layer, average
    pooled per channel, standardised by their train mean and std with every channel kept and
    clipped to [-10, 10] (channels an earlier decision dropped enter as zeros), padded to ``F``, the widest
    gated layer input; a one-hot of the layer's position among the ``L`` gated layers; the FLOPs
    density spent before this layer (FLOPs of the layers already run / dense FLOPs).

    ## Rewards
    Zero until the last gated layer; then ``-CE(x, y) - lam * density(x)``: the cross-entropy of
    this input's logits and the kept fraction of the dense FLOPs (or of the gated channels:
    ``density="channels"``).

    ## Episode End
    Terminates after one step per gated layer; never truncated. The final ``info`` holds
    ``accuracy`` (1 if the prediction is right), ``correct``, ``loss``, ``density``, ``flops``,
    ``flops_ratio``, ``actions``, ``keep_counts``, ``keep_ratios`` and ``index`` (of the input).

    ## Arguments
    ``model``, ``dataset``, ``lam``, ``density``, ``seed``, ``importance``, ``base_epochs``,
    ``device`` as for ``prunegym/LayerPruning-v0``; ``groups``: G >= 2 channel groups per layer;
    ``setup``: an ``InputPruningSetup`` to share (then model, dataset, seed, groups, importance and
    base_epochs are not used).
    """

    metadata = {"render_modes": []}

    def __init__(self, model: str | nn.Module = "digits_cnn", dataset: str | Splits = "digits", lam: float = 1.0,
                 density: str = "flops", seed: int = 0, groups: int = 4, importance: str = "l1",
                 base_epochs: int = BASE_EPOCHS, device: str = "cpu", setup: InputPruningSetup | None = None):
        if setup is None:
            setup = make_setup(model, dataset, seed, groups, importance, base_epochs, device)
        self.setup = setup
        self.engine = InputPruningEngine(setup, 1, lam, density)
        self.num_layers = self.engine.num_layers
        self.observation_space = spaces.Box(-FEATURE_CLIP, FEATURE_CLIP, shape=(self.engine.obs_size,),
                                            dtype=np.float32)
        self.action_space = spaces.Discrete(self.engine.num_actions)
        self._started = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        obs = self.engine.reset([self.np_random])
        self._started = True
        return obs[0], {"layer": 0, "index": int(self.engine._indices[0])}

    def step(self, action):
        if self.engine._run is None:
            raise RuntimeError("the episode has ended; call reset() to start a new one" if self._started
                               else "call reset() before step()")
        a = np.asarray(action).reshape(-1)
        if a.shape != (1,) or not np.issubdtype(a.dtype, np.integer) or not self.action_space.contains(int(a[0])):
            raise ValueError(f"action must be an int in [0, {self.action_space.n}), got {action!r}")
        obs, rewards, done, infos = self.engine.step(a)
        return obs[0], float(rewards[0]), done, False, infos[0]
