"""One place that builds Stable-Baselines3 agents for the pruning environments."""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

__all__ = ["ALGORITHMS", "POLICY_STARTS", "check_hyperparameters", "check_policy_start", "make_agent",
           "default_hyperparameters", "start_policy_at"]

ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C, "sac": SAC, "td3": TD3, "ddpg": DDPG,
                                              "dqn": DQN}
_CONTINUOUS_ONLY = ("sac", "td3", "ddpg")
_DISCRETE_ONLY = ("dqn",)
POLICY_STARTS = ("middle", "uniform")
"""where a new per-layer search's first policy centres its actions: ``middle`` (action 0, the keep ratio
halfway between min_keep and 1) or ``uniform`` (the uniform widths' keep ratio at the FLOPs budget)"""
START_ALGORITHMS = ("ppo", "a2c")
"""the agents ``start_policy_at`` can centre: a Gaussian policy whose mean is its action net's output"""


def default_hyperparameters(algo: str, episode_length: int, action_dim: int | None,
                            num_envs: int = 1, batched: bool = False) -> dict[str, Any]:
    """Defaults for short, fixed-length episodes whose only reward comes at the last step.

    The discount is 1 (the episode is a single decision split into steps, as in AMC); on-policy
    rollouts hold whole episodes; off-policy agents explore at random for their first episodes
    (AMC's warm-up) and act with Gaussian noise after. PPO updates after every four episodes (one
    minibatch of them) from a Gaussian policy whose standard deviation starts at 0.37 (``log_std_init``
    -1), not 1, which on a [-1, 1] action clips a third of the draws to a bound: so set, it finds
    higher rewards than random sampling in as many episodes on ResNet-20, which PPO with the
    earlier rollouts of 16 episodes and std 1 did not (docs/search.md, docs/results.md).
    ``num_envs`` copies of one env stepping in parallel (``batched`` False) keep one env's rollout
    and update sizes: each holds its share of the rollout, and off-policy agents take a gradient step
    per timestep. A ``batched`` env (the
    per-input env, many inputs at once) gets rollouts of a few episodes of each input, and PPO a
    small entropy bonus: every input is a new situation, and the policy must not settle on one
    action early.
    """
    batched = batched and num_envs > 1
    copies = 1 if batched else num_envs  # parallel copies of one env share one env's rollout
    if algo == "ppo" and batched:
        n_steps = episode_length * 4
        return {"n_steps": n_steps, "batch_size": max(episode_length, n_steps * num_envs // 4), "n_epochs": 4,
                "gamma": 1.0, "gae_lambda": 0.95, "learning_rate": 3e-4, "ent_coef": 0.01}
    if algo == "ppo":
        n_steps = episode_length * max(1, 4 // copies)
        return {"n_steps": n_steps, "batch_size": n_steps * copies, "n_epochs": 10, "gamma": 1.0, "gae_lambda": 0.95,
                "learning_rate": 3e-4, "ent_coef": 0.0, "policy_kwargs": {"log_std_init": -1.0}}
    if algo == "a2c":
        n_steps = episode_length * (1 if batched else max(1, 4 // copies))
        return {"n_steps": n_steps, "gamma": 1.0, "learning_rate": 7e-4}
    hyper: dict[str, Any] = {"gamma": 1.0, "learning_starts": episode_length * 25, "buffer_size": 100_000,
                             "batch_size": 64, "learning_rate": 1e-3, "train_freq": 1, "gradient_steps": copies}
    if algo == "dqn":
        hyper.update({"learning_starts": episode_length * 25 * num_envs, "target_update_interval": 500,
                      "exploration_fraction": 0.3, "train_freq": max(1, episode_length // num_envs),
                      "gradient_steps": 1})
    if algo in ("td3", "ddpg") and action_dim is not None:
        hyper["action_noise"] = NormalActionNoise(np.zeros(action_dim), 0.3 * np.ones(action_dim))
    return hyper


def check_hyperparameters(algo: str, hyperparameters: Any) -> None:
    """Refuse, by name, ``hyperparameters`` that are not a dict of arguments of ``algo``'s class (their
    values are checked when the agent is built, by SB3)."""
    if not isinstance(hyperparameters, dict) or not all(isinstance(k, str) for k in hyperparameters):
        raise ValueError(f"hyperparameters must be a JSON object of argument names to values, got {hyperparameters!r}")
    accepted = set(inspect.signature(ALGORITHMS[algo].__init__).parameters) - {"self", "policy", "env"}
    unknown = sorted(set(hyperparameters) - accepted)
    if unknown:
        raise ValueError(f"hyperparameters {unknown} are not arguments of {ALGORITHMS[algo].__name__}")
    if not isinstance(hyperparameters.get("policy_kwargs", {}), dict):
        raise ValueError(f"hyperparameters' policy_kwargs must be a JSON object, "
                         f"got {hyperparameters['policy_kwargs']!r}")


def make_agent(algo: str, env: gym.Env, *, episode_length: int, seed: int = 0, device: str = "auto",
               tensorboard_log: str | None = None, verbose: int = 0,
               hyperparameters: dict[str, Any] | None = None) -> BaseAlgorithm:
    """An SB3 agent of kind ``algo`` (ppo, a2c, sac, td3, ddpg, dqn) with ``MlpPolicy`` on ``env``
    (a gymnasium env or an SB3 ``VecEnv``; on-policy rollouts then hold whole episodes of every env).

    ``hyperparameters`` override the defaults of ``default_hyperparameters``.
    """
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}; expected one of {sorted(ALGORITHMS)}")
    if episode_length < 1:
        raise ValueError(f"episode_length must be >= 1, got {episode_length}")
    space = env.action_space
    if algo in _CONTINUOUS_ONLY and not isinstance(space, gym.spaces.Box):
        raise ValueError(f"algo {algo!r} needs a continuous (Box) action space; the env has {space} "
                         "(drop action_levels, or use ppo or a2c)")
    if algo in _DISCRETE_ONLY and not isinstance(space, gym.spaces.Discrete):
        raise ValueError(f"algo {algo!r} needs a discrete action space; the env has {space} "
                         "(use action_levels, or ppo, a2c, sac, td3, ddpg)")
    action_dim = int(np.prod(space.shape)) if isinstance(space, gym.spaces.Box) else None
    num_envs = getattr(env, "num_envs", 1)
    batched = num_envs > 1 and not isinstance(env, DummyVecEnv | SubprocVecEnv)  # not copies of one env
    kwargs = default_hyperparameters(algo, episode_length, action_dim, num_envs, batched)
    check_hyperparameters(algo, hyperparameters or {})
    given = dict(hyperparameters or {})
    # every policy has two hidden layers of 64 unless told otherwise; a policy_kwargs given overrides the
    # defaults' keys it names, not the whole of them
    policy_kwargs = {"net_arch": [64, 64], **kwargs.pop("policy_kwargs", {}), **given.pop("policy_kwargs", {})}
    kwargs.update(given)
    try:
        return ALGORITHMS[algo]("MlpPolicy", env, seed=seed, device=device, verbose=verbose,
                                tensorboard_log=tensorboard_log, policy_kwargs=policy_kwargs, **kwargs)
    except (AssertionError, TypeError, ValueError) as err:
        if not hyperparameters:
            raise
        # SB3 checks its arguments with asserts and plain errors; name the values the user gave
        raise ValueError(f"{ALGORITHMS[algo].__name__} refused the hyperparameters {hyperparameters}: "
                         f"{type(err).__name__}: {err or 'a value is out of range'}") from err


def check_policy_start(policy_start: str, algo: str) -> None:
    """Refuse, by name, a ``policy_start`` not in ``POLICY_STARTS``, or ``uniform`` for an ``algo`` that
    ``start_policy_at`` cannot centre."""
    if policy_start not in POLICY_STARTS:
        raise ValueError(f"policy_start {policy_start!r} is unknown; expected one of {POLICY_STARTS}")
    if policy_start == "uniform" and algo not in START_ALGORITHMS:
        raise ValueError(f"policy_start 'uniform' centres the first policy on the uniform widths at the FLOPs budget; "
                         f"it needs algo one of {START_ALGORITHMS}, got {algo!r}")


def start_policy_at(agent: BaseAlgorithm, action: float) -> None:
    """Centre a new on-policy agent's first policy on the continuous ``action``: its Gaussian's mean is
    its action net's output, which SB3 initialises with weights of gain 0.01, so the net's bias sets it."""
    centred = tuple(ALGORITHMS[name] for name in START_ALGORITHMS)
    if not isinstance(agent, centred) or not isinstance(agent.action_space, gym.spaces.Box):
        raise ValueError(f"only a ppo or a2c agent with a continuous action can start at an action, got "
                         f"{type(agent).__name__} acting in {agent.action_space}")
    if not -1 <= action <= 1:
        raise ValueError(f"the starting action must be in [-1, 1], got {action}")
    with torch.no_grad():
        agent.policy.action_net.bias.fill_(float(action))
