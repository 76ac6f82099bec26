"""prunegym/LayerPruning-v0: choose one keep ratio per prunable channel group (AMC-style)."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from prunegym.compression.channels import ChannelGraph, nearest_count
from prunegym.compression.data import Splits, load_dataset
from prunegym.compression.importance import make_importance
from prunegym.compression.latency import LatencyTable
from prunegym.compression.proxy import ProxyEvaluator, check_refit_head
from prunegym.compression.sparsity import uniform_keep_counts
from prunegym.compression.supernet import SUPERNET_SAMPLING, make_supernet, prefix_kept, supernet_model, width_choices
from prunegym.compression.training import BASE_EPOCHS, base_model, resolve_device

from .reward import check_lam

__all__ = ["LayerPruningEnv", "DENSITY_KINDS", "OBSERVATION_FEATURES", "REWARD_MODELS", "TASK_LOSSES"]

DENSITY_KINDS = ("flops", "params", "channels", "latency")
REWARD_MODELS = ("supernet", "dense")
TASK_LOSSES = ("cross_entropy", "error")  # the task_loss of the reward: its cross-entropy or error rate

OBSERVATION_FEATURES = (
    "position",  # step index / (number of groups - 1)
    "is_linear",  # 1 if the group's first producer is a linear layer, 0 for a conv
    "in_channels",  # of the first producer, / the largest over groups
    "out_channels",  # channels in the group, / the largest over groups
    "kernel_size",  # / the largest over groups
    "stride",  # / the largest over groups
    "flops",  # dense FLOPs of the layers producing this group / dense model FLOPs
    "flops_removed",  # FLOPs removed by the decisions so far / dense model FLOPs
    "flops_rest",  # dense FLOPs of the layers producing later groups / dense model FLOPs
    "previous_keep_ratio",  # the keep ratio chosen at the previous step (1 at the first)
    "max_keep_ratio",  # the largest keep ratio the FLOPs budget allows here (1 without a budget)
)
_COLUMN = {name: i for i, name in enumerate(OBSERVATION_FEATURES)}


class LayerPruningEnv(gym.Env):
    """Prune a trained CNN one channel group at a time; the reward comes when every group is decided.

    A channel group is a set of channels that must be pruned together (a conv's outputs, or all
    the outputs feeding one residual add). Within a group the importance criterion (L1 by default)
    decides which channels stay; the agent decides how many.

    ## Action Space
    ``Box(-1, 1, (1,), float32)``, mapped linearly to a keep ratio in ``[min_keep, 1]``; with
    ``action_levels=n``, ``Discrete(n)``: the n evenly spaced keep ratios from ``min_keep`` to 1.
    The kept channel count is the ratio times the group's channels, rounded to the nearest allowed
    count (at least one, at least ``min_keep``, a multiple of ``channel_multiple``).

    ## Observation Space
    ``Box(0, 1, (11,), float32)``: the group's embedding, each feature normalised to [0, 1]; see
    ``OBSERVATION_FEATURES`` for the list in order.

    ## Rewards
    Zero until the last step; then ``-task_loss - lam * density``, where ``task_loss`` is the mean
    cross-entropy of the soft-masked (not fine-tuned) model on the reward split, after batch-norm
    recalibration on ``recalibration_batches`` train batches (with ``finetune_steps``: of the pruned
    model after that short-term fine-tune), and ``density`` the kept fraction of
    the dense FLOPs (or parameters, channels, or predicted CPU latency: ``density=``). With a budget
    (``flops_target``, ``latency_target``) the reward is ``-task_loss + capacity_weight * flops_ratio``:
    the budget is enforced by the action clamp instead, and the capacity term (0 unless asked for)
    prefers, among candidates the task loss does not separate, the one that keeps more of the
    network's computation.

    ## Episode End
    The episode terminates after one step per channel group; it is never truncated. The final
    ``info`` holds ``accuracy``, ``loss``, ``density``, ``flops``, ``flops_ratio``, ``params``,
    ``keep_ratios`` and ``keep_counts``; with a latency table (``density="latency"`` or
    ``latency_target``) also ``latency_ratio``, the predicted latency over the dense model's.

    ## Arguments
    - ``model``: a zoo name (``digits_cnn``, ``resnet20``, ``resnet56``, ``vgg_small``), an import
      path ``package.module:factory`` (trained and cached as the base model), or a trained ``nn.Module``.
    - ``dataset``: ``digits``, ``digits_distorted``, ``mnist:PATH``, ``cifar10:PATH``, ``npz:PATH``, or loaded
      ``Splits``.
    - ``lam``: λ >= 0, the price of density in the reward.
    - ``density``: ``flops`` | ``params`` | ``channels`` | ``latency``. ``latency`` is the pruned
      model's CPU latency over the dense model's, predicted by a lookup table of its layers' timings
      (``prunegym.compression.latency.LatencyTable``) at batch ``latency_batch`` with ``latency_threads``
      threads; each (layer, channels) entry is timed on first use, so the early episodes are slower.
      The table is part of the env's state (``state_dict``), so a resumed search keeps its timings.
    - ``seed``: the data split (and base-model training) seed.
    - ``flops_target``: budget mode: the episode cannot end above this fraction of dense FLOPs
      (AMC's resource-constrained search). Each action is clamped so that, even if every later group
      kept only ``min_keep``, the model would fit.
    - ``min_keep``: the smallest keep ratio, in (0, 1].
    - ``action_levels``: ``None`` for a continuous action, or n >= 2 discrete keep ratios.
    - ``importance``: ``l1`` | ``l2`` | ``group_l1`` | ``bn_scale``, which channels stay inside a group
      (``prunegym.compression.importance``).
    - ``channel_multiple``: keep channel counts at multiples of this (a group may always keep all
      its channels); 16 suits AVX-512 fp32 kernels, 8 AVX2.
    - ``recalibration_batches``: train batches (of 128) for BN recalibration before the reward; 0: none.
    - ``device``: ``auto``, ``cpu``, ``cuda``...
    - ``latency_target``: budget mode in predicted latency: the episode cannot end above this
      fraction of the dense model's latency (as the latency table predicts it; see ``density``).
      With both targets, both hold.
    - ``latency_batch``, ``latency_threads``: the batch size and CPU threads the latency table
      times (with ``density="latency"`` or ``latency_target`` only).
    - ``finetune_steps``: 0, or a short-term fine-tune before every reward (NetAdapt's): the
      episode's model is pruned for real and trained this many batches of 64 on the train split
      (AdamW, learning rate ``finetune_lr``, cosine schedule, the same batches every episode), and
      the task loss is its loss after that. It costs a training run per episode, and pays where
      the loss before fine-tuning does not rank models as fine-tuning would (deep residual
      networks pruned by half or more are near chance before it, whatever their widths).
    - ``finetune_lr``: the short-term fine-tune's learning rate, > 0.
    - ``supernet_epochs``: 0, or first train the base model this many epochs as a weight-sharing
      supernet of its widths (``prunegym.compression.supernet``: channels in importance order, the sandwich
      rule with in-place distillation, widths from ``min_keep`` up). Each candidate is then the
      supernet's prefix sub-network, and what it scores before fine-tuning ranks it as fine-tuning
      would; the model a search exports is pruned from the supernet (``model``), the trained dense
      one stays as ``dense``. Trained once per setting and cached, for a zoo model or import path.
    - ``supernet_extremes``: how often the supernet's training puts a group at its narrowest or its
      widest (half each) instead of a uniformly drawn width (``sample_keep_counts``). Mixed shapes,
      one stage at its floor beside whole stages, are then trained, and score what they are worth.
    - ``supernet_sampling``: how the supernet draws its random widths: ``uniform`` (each group's
      width uniformly, every candidate of every budget alike) or ``budget`` (the candidates of this
      search: allocations at ``flops_target``, EagleEye's sampler; a supernet per budget, the
      narrowest width untrained): the supernet trains exactly the candidates the search compares,
      at the cost of a supernet per budget. Needs ``flops_target`` and no ``supernet_extremes``.
    - ``capacity_weight``: κ >= 0, with a budget only: the reward adds ``κ * flops_ratio``. Under a
      latency budget the same latency is met by a thin network or by a wider one whose widths the
      kernels run efficiently; the loss before fine-tuning barely separates them while fine-tuning
      recovers both alike, so the loss alone settles on whichever it finds first. The term asks for
      the most FLOPs the budgets allow (what the latency-greedy baseline maximises, HALP's objective).
    - ``reward_model``: with a supernet, which model scores a candidate: ``supernet`` (its prefix
      sub-network, the model the winner is cut from) or ``dense`` (the trained dense model
      soft-masked at its importance order, AMC's reward; the winner is still cut from the
      supernet, whose channels are in that order). ``dense`` needs ``supernet_epochs`` > 0.
    - ``task_loss``: the reward's task loss on the reward split, ``cross_entropy`` or ``error`` (the
      error rate, 1 - accuracy). On the digits CNN the supernet's cross-entropy ranks candidates'
      fine-tuned accuracy against it and its accuracy ranks it (docs/search.md).
    - ``refit_head``: before the task loss, re-fit the candidate's classifier (the model's last
      ``nn.Linear``) to its pooled features of the recalibration batches (a logistic regression,
      ``prunegym.compression.proxy``), as batch-norm recalibration re-estimates its statistics. A
      supernet's classifier, shared by every width, can score the candidates whose last layer it fits
      least well below what they fine-tune to: on the digits CNN the re-fit makes the reward rank
      them, on ResNet-20 it ranks worse (docs/search.md). Needs ``recalibration_batches`` >= 1 and no
      ``finetune_steps``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        model: str | nn.Module = "digits_cnn",
        dataset: str | Splits = "digits",
        lam: float = 1.0,
        density: str = "flops",
        seed: int = 0,
        flops_target: float | None = None,
        min_keep: float = 0.25,
        action_levels: int | None = None,
        importance: str = "l1",
        channel_multiple: int = 1,
        recalibration_batches: int = 2,
        base_epochs: int = BASE_EPOCHS,
        device: str = "cpu",
        latency_target: float | None = None,
        latency_batch: int = 64,
        latency_threads: int = 1,
        finetune_steps: int = 0,
        finetune_lr: float = 1e-3,
        supernet_epochs: int = 0,
        reward_model: str = "supernet",
        supernet_extremes: float = 0.0,
        capacity_weight: float = 0.0,
        supernet_sampling: str = "uniform",
        task_loss: str = "cross_entropy",
        refit_head: bool = False,
    ):
        check_lam(lam)
        check_lam(capacity_weight, "capacity_weight")
        if capacity_weight and flops_target is None and latency_target is None:
            raise ValueError(f"capacity_weight={capacity_weight!r} prices what a budget leaves unused; it needs "
                             "flops_target or latency_target (without a budget the reward prices density with lam)")
        if density not in DENSITY_KINDS:
            raise ValueError(f"density must be one of {DENSITY_KINDS}, got {density!r}")
        if not isinstance(min_keep, int | float) or not 0 < min_keep <= 1:
            raise ValueError(f"min_keep must be in (0, 1], got {min_keep!r}")
        if action_levels is not None and (not isinstance(action_levels, int) or action_levels < 2):
            raise ValueError(f"action_levels must be None or an int >= 2, got {action_levels!r}")
        for name, target in (("flops_target", flops_target), ("latency_target", latency_target)):
            if target is not None and (not isinstance(target, int | float) or not 0 < target <= 1):
                raise ValueError(f"{name} must be None or in (0, 1], got {target!r}")
        if not isinstance(recalibration_batches, int) or recalibration_batches < 0:
            raise ValueError(f"recalibration_batches must be an int >= 0, got {recalibration_batches!r}")
        if not isinstance(channel_multiple, int | np.integer) or channel_multiple < 1:
            raise ValueError(f"channel_multiple must be an int >= 1, got {channel_multiple!r}")
        if not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an int, got {seed!r}")
        for name, value in (("latency_batch", latency_batch), ("latency_threads", latency_threads)):
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(finetune_steps, int | np.integer) or finetune_steps < 0:
            raise ValueError(f"finetune_steps must be an int >= 0, got {finetune_steps!r}")
        if not isinstance(finetune_lr, int | float) or not math.isfinite(finetune_lr) or finetune_lr <= 0:
            raise ValueError(f"finetune_lr must be a finite number > 0, got {finetune_lr!r}")
        if not isinstance(supernet_epochs, int | np.integer) or supernet_epochs < 0:
            raise ValueError(f"supernet_epochs must be an int >= 0, got {supernet_epochs!r}")
        if not isinstance(supernet_extremes, int | float) or not 0 <= supernet_extremes <= 1:
            raise ValueError(f"supernet_extremes must be in [0, 1], got {supernet_extremes!r}")
        if reward_model not in REWARD_MODELS:
            raise ValueError(f"reward_model must be one of {REWARD_MODELS}, got {reward_model!r}")
        if task_loss not in TASK_LOSSES:
            raise ValueError(f"task_loss must be one of {TASK_LOSSES}, got {task_loss!r}")
        check_refit_head(refit_head, recalibration_batches, finetune_steps)
        if supernet_sampling not in SUPERNET_SAMPLING:
            raise ValueError(f"supernet_sampling must be one of {SUPERNET_SAMPLING}, got {supernet_sampling!r}")
        if supernet_sampling == "budget" and (flops_target is None or not supernet_epochs or supernet_extremes):
            raise ValueError("supernet_sampling='budget' trains the supernet on the candidates at flops_target; "
                             f"it needs flops_target (got {flops_target!r}), supernet_epochs > 0 "
                             f"(got {supernet_epochs!r}) and no supernet_extremes (got {supernet_extremes!r})")
        supernet_budget = flops_target if supernet_sampling == "budget" else None
        if reward_model == "dense" and not supernet_epochs:
            raise ValueError("reward_model='dense' scores candidates on the dense model instead of the supernet; "
                             f"it needs supernet_epochs > 0, got {supernet_epochs!r}")
        self.device = resolve_device(device)
        self.importance = make_importance(importance)

        self.splits = load_dataset(dataset, seed) if isinstance(dataset, str) else dataset
        if not isinstance(self.splits, Splits):
            raise ValueError(f"dataset must be a spec string or Splits, got {type(dataset).__name__}")
        if isinstance(model, str):
            self.model = base_model(model, self.splits, seed, epochs=base_epochs, device=self.device)
        elif isinstance(model, nn.Module):
            self.model = copy.deepcopy(model).to(self.device)  # hooks go on our copy, not the caller's
        else:
            raise ValueError(f"model must be a zoo name, an import path or an nn.Module, got {model!r}")
        self.model.eval()
        self.dense = self.model  # the trained dense model; what is pruned differs with a supernet
        self.supernet_epochs = int(supernet_epochs)
        self.supernet_seconds = 0.0  # what training the supernet took (when it was trained, if cached)
        if self.supernet_epochs:
            if isinstance(model, str):
                self.model, self.supernet_seconds = supernet_model(
                    model, self.dense, self.splits, seed, base_epochs=base_epochs, epochs=self.supernet_epochs,
                    min_keep=min_keep, importance=self.importance, extremes=supernet_extremes, budget=supernet_budget,
                    device=self.device)
            else:
                started = time.perf_counter()
                self.model = make_supernet(self.dense, self.splits.train.x[:1].to(self.device), self.splits.train,
                                           self.importance, epochs=self.supernet_epochs, min_keep=min_keep,
                                           extremes=supernet_extremes, budget=supernet_budget, seed=seed,
                                           device=self.device)
                self.supernet_seconds = time.perf_counter() - started

        self.lam = float(lam)
        self.density_kind = density
        self.flops_target = None if flops_target is None else float(flops_target)
        self.latency_target = None if latency_target is None else float(latency_target)
        self.budgeted = self.flops_target is not None or self.latency_target is not None
        self.capacity_weight = float(capacity_weight)
        self.min_keep = float(min_keep)
        self.action_levels = action_levels
        self.seed_value = int(seed)
        self.finetune_steps = int(finetune_steps)
        self.finetune_lr = float(finetune_lr)

        example = self.splits.train.x[:1].to(self.device)
        self.graph = ChannelGraph(self.model, example)
        self.num_groups = len(self.graph.groups)
        # A supernet's channels are in importance order already, and its widths are its prefixes.
        self.ranking = (prefix_kept(self.graph.num_channels) if self.supernet_epochs
                        else self.graph.rankings(self.importance))
        self.channel_multiple = int(channel_multiple)
        self.allowed = width_choices(self.graph, self.min_keep, self.channel_multiple)
        self.min_counts = np.array([a[0] for a in self.allowed], dtype=np.int64)
        self.dense_flops = float(self.graph.dense_flops)
        min_density = float(self.graph.flops(self.min_counts)) / self.dense_flops
        if self.flops_target is not None and self.flops_target < min_density - 1e-12:
            raise ValueError(
                f"flops_target={self.flops_target} is below the smallest reachable FLOPs ratio "
                f"{min_density:.4f} (every group at min_keep={self.min_keep})"
            )

        self.latency = None
        if density == "latency" or self.latency_target is not None:
            self.latency = LatencyTable(self.model, self.graph, example, batch_size=int(latency_batch),
                                        threads=int(latency_threads))
            min_latency = self.latency.density(self.min_counts)
            if self.latency_target is not None and self.latency_target < min_latency:
                raise ValueError(
                    f"latency_target={self.latency_target} is below the smallest reachable latency ratio "
                    f"{min_latency:.4f} (every group at min_keep={self.min_keep}, as the latency table predicts)"
                )
        self.reward_model = reward_model
        self.task_loss = task_loss
        self.supernet_sampling = supernet_sampling
        if reward_model == "dense":  # the same channels: the supernet's prefixes are the dense model's ranking
            dense_graph = ChannelGraph(self.dense, example)
            scored = (self.dense, dense_graph, dense_graph.rankings(self.importance))
        else:
            scored = (self.model, self.graph, self.ranking)
        self.proxy = ProxyEvaluator(*scored, self.splits.train,
                                    recalibration_batches=recalibration_batches, finetune_steps=self.finetune_steps,
                                    finetune_lr=self.finetune_lr, seed=self.seed_value, device=self.device,
                                    refit_head=refit_head)

        groups = self.graph.groups
        group_flops = np.zeros(self.num_groups)
        for layer in self.graph.layers:
            if layer.out_group is not None:
                group_flops[layer.out_group] += layer.flops
        # The observation's columns that do not depend on the decisions, one row per step.
        modules = dict(self.model.named_modules())
        relative = lambda values: np.asarray(values, dtype=np.float64) / max(values)  # noqa: E731
        static = {
            "position": np.arange(self.num_groups) / max(1, self.num_groups - 1),
            "is_linear": [isinstance(modules[g.name], nn.Linear) for g in groups],
            "in_channels": relative([g.in_channels for g in groups]),
            "out_channels": relative([g.num_channels for g in groups]),
            "kernel_size": relative([g.kernel_size for g in groups]),
            "stride": relative([g.stride for g in groups]),
            "flops": group_flops / self.dense_flops,
            "flops_rest": (np.cumsum(group_flops[::-1])[::-1] - group_flops) / self.dense_flops,
        }
        self._static = np.zeros((self.num_groups, len(OBSERVATION_FEATURES)), dtype=np.float64)
        for name, values in static.items():
            self._static[:, _COLUMN[name]] = values

        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(OBSERVATION_FEATURES),), dtype=np.float32)
        if action_levels is None:
            self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        else:
            self.action_space = spaces.Discrete(action_levels)
        self._step: int | None = None

    # ---- helpers ----------------------------------------------------------------------------------
    def keep_ratio_of(self, action: Any) -> float:
        """The keep ratio an action asks for, before rounding and the budget clamp."""
        if self.action_levels is None:
            try:
                a = np.asarray(action, dtype=np.float32).reshape(-1)
            except (TypeError, ValueError) as err:
                raise ValueError(f"action must be one number in [-1, 1], got {action!r}") from err
            if a.shape != (1,) or not self.action_space.contains(a):
                raise ValueError(f"action must be one number in [-1, 1], got {action!r}")
            return self.min_keep + (float(a[0]) + 1.0) / 2.0 * (1.0 - self.min_keep)
        a = np.asarray(action).reshape(-1)
        if a.shape != (1,) or not np.issubdtype(a.dtype, np.integer) or not self.action_space.contains(int(a[0])):
            raise ValueError(f"action must be an int in [0, {self.action_levels}), got {action!r}")
        return self.min_keep + int(a[0]) / (self.action_levels - 1) * (1.0 - self.min_keep)

    def uniform_action(self) -> float:
        """The continuous action whose keep ratio is the uniform widths' at the FLOPs budget (the mean
        keep ratio of ``uniform_keep_counts``, as rounded to channels): where a search that starts from
        the uniform rule centres its first policy."""
        if self.flops_target is None or self.action_levels is not None:
            raise ValueError("the uniform widths' action needs a FLOPs budget (flops_target) and a continuous "
                             f"action; got flops_target={self.flops_target}, action_levels={self.action_levels}")
        if self.min_keep >= 1:
            return 0.0  # every action keeps every channel
        counts = uniform_keep_counts(self.graph, self.flops_target, self.channel_multiple)
        ratio = float(np.mean(counts / self.graph.num_channels))
        return float(np.clip(2.0 * (ratio - self.min_keep) / (1.0 - self.min_keep) - 1.0, -1.0, 1.0))

    def _fitting(self, t: int) -> np.ndarray:
        """Which of group t's allowed counts meet the budget(s) if every later group kept only min_keep.

        The counts chosen so far passed the same test with this group at its minimum, so the minimum
        always fits: no sequence of actions can end over budget. Latency need not grow with channels
        (a conv with 4 output channels can take longer than one with 8, when the kernels oneDNN picks
        for them differ), so the fitting counts need not be a prefix of the allowed ones.
        """
        allowed = self.allowed[t]
        fits = np.ones(len(allowed), dtype=bool)
        if not self.budgeted:
            return fits
        candidates = np.repeat(np.concatenate([self._counts[:t], self.min_counts[t:]])[None], len(allowed), axis=0)
        candidates[:, t] = allowed
        if self.flops_target is not None:
            fits &= self.graph.flops(candidates) <= self.flops_target * self.dense_flops * (1 + 1e-9)
        if self.latency_target is not None:
            fits &= np.array([self.latency.density(c) for c in candidates]) <= self.latency_target * (1 + 1e-9)
        fits[0] = True  # the minimum fits by construction; this only guards against rounding
        return fits

    def _get_obs(self) -> np.ndarray:
        """The observation at the current step; ``self._fits_now`` must hold its fitting counts."""
        t = self._step
        obs = self._static[t].copy()
        decided = np.concatenate([self._counts[:t], self.graph.num_channels[t:]])
        obs[_COLUMN["flops_removed"]] = 1.0 - float(self.graph.flops(decided)) / self.dense_flops
        obs[_COLUMN["previous_keep_ratio"]] = self._prev_ratio
        obs[_COLUMN["max_keep_ratio"]] = self.allowed[t][self._fits_now][-1] / self.graph.num_channels[t]
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def density_of(self, counts: np.ndarray) -> float:
        if self.density_kind == "flops":
            return float(self.graph.flops(counts)) / self.dense_flops
        if self.density_kind == "params":
            return float(self.graph.params(counts)) / self.graph.dense_params
        if self.density_kind == "latency":
            return self.latency.density(counts)
        return float(counts.sum() / self.graph.num_channels.sum())

    def state_dict(self) -> dict[str, Any]:
        """What a resumed search needs besides the agent: the latency table's timings (if any)."""
        return {} if self.latency is None else {"latency_table": self.latency.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.latency is not None and "latency_table" in state:
            self.latency.load_state_dict(state["latency_table"])

    def kept_channels(self, counts: np.ndarray) -> list[torch.Tensor]:
        """The channels of ``model`` each group keeps: its ``counts[g]`` most important, ascending."""
        return self.graph.kept_channels(self.ranking, counts)

    def evaluate_counts(self, counts: np.ndarray, split: str = "reward") -> dict[str, Any]:
        """Loss, accuracy and costs of the model for these keep counts, as the reward sees them
        (``self.proxy``: soft-masked and BN-recalibrated, or with ``finetune_steps`` pruned and
        briefly fine-tuned)."""
        counts = np.asarray(counts, dtype=np.int64)
        scores = self.proxy(counts, getattr(self.splits, split))
        flops = float(self.graph.flops(counts))
        return {
            "loss": scores["loss"],
            "accuracy": scores["accuracy"],
            "density": self.density_of(counts),
            "flops": flops,
            "flops_ratio": flops / self.dense_flops,
            "params": float(self.graph.params(counts)),
            "keep_counts": counts.tolist(),
            "keep_ratios": (counts / self.graph.num_channels).tolist(),
            **({} if self.latency is None else {"latency_ratio": self.latency.density(counts)}),
        }

    def task_loss_of(self, loss: float, accuracy: float) -> float:
        """The reward's task loss of a model scored on the reward split: its cross-entropy ``loss``, or
        under ``task_loss="error"`` its error rate, ``1 - accuracy``."""
        return loss if self.task_loss == "cross_entropy" else 1.0 - accuracy

    def reward_of(self, metrics: dict[str, Any]) -> float:
        """An episode's reward from what ``evaluate_counts`` measured of its keep counts."""
        task = self.task_loss_of(metrics["loss"], metrics["accuracy"])
        if self.budgeted:
            return float(-task + self.capacity_weight * metrics["flops_ratio"])
        return float(-task - self.lam * metrics["density"])

    # ---- gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._step = 0
        self._counts = self.graph.num_channels.copy()
        self._prev_ratio = 1.0
        self._fits_now = self._fitting(0)  # what the observation shows and the next step is clamped to
        return self._get_obs(), {"step": 0}

    def step(self, action):
        if self.proxy.closed:
            raise RuntimeError("the env is closed; make a new one to step")
        if self._step is None:
            raise RuntimeError("call reset() before step()")
        if self._step >= self.num_groups:
            raise RuntimeError("the episode has ended; call reset() to start a new one")
        t = self._step
        ratio = self.keep_ratio_of(action)
        channels = int(self.graph.num_channels[t])
        asked = nearest_count(self.allowed[t], ratio * channels)
        count = int(self.allowed[t][self._fits_now & (self.allowed[t] <= asked)][-1])  # the most that fits
        self._counts[t] = count
        self._prev_ratio = count / channels
        self._step += 1
        info: dict[str, Any] = {"step": self._step, "keep_ratio": self._prev_ratio}
        if self._step < self.num_groups:
            self._fits_now = self._fitting(self._step)
            return self._get_obs(), 0.0, False, False, info
        metrics = self.evaluate_counts(self._counts)
        info.update(metrics)
        reward = self.reward_of(metrics)
        # The observation after the last step is never acted on; it repeats the last group's.
        self._step = self.num_groups
        obs = self._static[-1].astype(np.float32)
        return obs, float(reward), True, False, info

    def close(self):
        self.proxy.close()
