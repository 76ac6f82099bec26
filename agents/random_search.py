"""Random search in the per-layer env: the ablation that says what the agent adds.

The same env, reward and budget as the agent's search, and as many reward evaluations (episodes);
every action is drawn uniformly from the action space (and clamped to the budget by the env, as
the agent's are). The best episode by reward is the search's answer, as it is the agent's.
"""

from __future__ import annotations

import time
from typing import Any

from prunegym.envs import LayerPruningEnv

__all__ = ["random_search"]


def random_search(env: LayerPruningEnv, episodes: int, seed: int = 0, top: int = 1) -> dict[str, Any]:
    """Play ``episodes`` episodes of uniformly random actions; return the best episode's final
    ``info`` with its ``reward`` (``best``), the ``top`` best of distinct keep counts, best first (of
    equal rewards, the earlier), how many keep counts it played (``distinct``), and the search's
    ``episodes`` and ``seconds``."""
    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an int >= 1, got {episodes!r}")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1, got {top!r}")
    started = time.perf_counter()
    env.action_space.seed(seed)
    env.reset(seed=seed)
    by_counts: dict[tuple[int, ...], dict[str, Any]] = {}  # keep counts -> its best episode
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, reward, done, _, info = env.step(env.action_space.sample())
        counts = tuple(int(k) for k in info["keep_counts"])
        if counts not in by_counts or reward > by_counts[counts]["reward"]:
            by_counts[counts] = {"reward": float(reward), **info}
    ranked = sorted(by_counts.values(), key=lambda e: -e["reward"])[:top]  # stable: of equal rewards, the earlier
    return {"best": ranked[0], "top": ranked, "episodes": episodes, "distinct": len(by_counts),
            "seconds": time.perf_counter() - started}
