"""A Stable-Baselines3 ``VecEnv`` that steps N per-input pruning episodes with one batched forward.

It gives the same transitions as ``DummyVecEnv`` over N ``InputPruningEnv`` seeded alike (SB3
seeds env i with ``seed + i``), at a fraction of the cost: every layer step is one forward of N
inputs instead of N forwards of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from prunegym.envs.input_pruning import InputPruningEngine, InputPruningEnv, InputPruningSetup, make_setup

__all__ = ["BatchedInputPruningVecEnv"]


class BatchedInputPruningVecEnv(VecEnv):
    """N ``prunegym/InputPruning-v0`` episodes in lockstep (all episodes have one step per gated layer).

    ``setup`` shares an ``InputPruningSetup``; otherwise the keywords build one as
    ``InputPruningEnv`` does (``model``, ``dataset``, ``seed``, ``groups``, ``importance``,
    ``base_epochs``, ``device``).
    """

    def __init__(self, num_envs: int, lam: float = 1.0, density: str = "flops",
                 setup: InputPruningSetup | None = None, **setup_kwargs: Any):
        self.setup = make_setup(**setup_kwargs) if setup is None else setup
        self.engine = InputPruningEngine(self.setup, num_envs, lam, density)
        # the spaces are the single env's, so a policy trained here runs on it and vice versa
        single = InputPruningEnv(lam=lam, density=density, setup=self.setup)
        self.render_mode = None
        super().__init__(num_envs, single.observation_space, single.action_space)
        self.lam, self.density = lam, density
        self._rngs: list[np.random.Generator] = [seeding.np_random(None)[0] for _ in range(num_envs)]
        self._actions: np.ndarray | None = None
        self._obs: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        for i, seed in enumerate(self._seeds):
            if seed is not None or self._obs is None:
                self._rngs[i] = seeding.np_random(seed)[0]
        self._reset_seeds()
        self._reset_options()
        self._obs = self.engine.reset(self._rngs)
        self.reset_infos = [{"layer": 0, "index": int(i)} for i in self.engine._indices]
        return self._obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = self.engine.check_actions(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("call step_async() before step_wait()")
        if self.engine._run is None:
            raise RuntimeError("call reset() before step()")
        obs, rewards, done, infos = self.engine.step(self._actions)
        self._actions = None
        dones = np.full(self.num_envs, done)
        for info in infos:
            info["TimeLimit.truncated"] = False
        if done:
            for info, final in zip(infos, obs, strict=True):
                info["terminal_observation"] = final
            obs = self.engine.reset(self._rngs)
            self.reset_infos = [{"layer": 0, "index": int(i)} for i in self.engine._indices]
        self._obs = obs
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.engine._run = None

    # ---- the rest of the VecEnv API: one engine stands for every env -----------------------------
    def _indices(self, indices: VecEnvIndices) -> list[int]:
        return list(self._get_indices(indices))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"{type(self).__name__} shares one engine between its envs; build a new one "
                             f"to change {attr_name!r}")

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None,
                   **method_kwargs) -> list[Any]:
        raise AttributeError(f"{type(self).__name__} has no per-env objects to call {method_name!r} on")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]
