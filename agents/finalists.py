"""Multi-fidelity selection after a search: the reward ranks every candidate, a fine-tune the best few.

A search's reward is cheap and, once a network is pruned hard, a weak judge of what a candidate is
worth after the fine-tune (docs/search.md). With ``finalists=K`` (``train.py --finalists K``) the K best
distinct allocations by reward are each cut out and fine-tuned with the report's recipe, then scored
on the reward split by the env's task loss (its cross-entropy, or its error rate under
``task_loss="error"``); the one with the lowest is kept, fine-tuned model and all. The test split
stays unseen. Random search in the comparison chooses its answer the same way, so the two
searches differ only in the candidates they find.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from prunegym.compression.channels import prune_channels
from prunegym.compression.training import evaluate
from prunegym.envs import LayerPruningEnv

__all__ = ["choose_finalist"]


def choose_finalist(env: LayerPruningEnv, candidates: Sequence[tuple[str, float, dict[str, Any]]], k: int,
                    finetune: Callable[[nn.Module], nn.Module],
                    log: Callable[[str], None] = print) -> tuple[int, nn.Module, dict[str, Any]]:
    """Fine-tune the first ``k`` of ``candidates`` ((source, reward, info with ``keep_counts``), best
    reward first, distinct), each cut from ``env.model``, and score them on the reward split.

    Returns the index of the one with the lowest reward-split loss (of equal losses, the better
    reward), its fine-tuned model, and what the report keeps of every finalist."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"finalists must be an int >= 1, got {k!r}")
    if not candidates:
        raise ValueError("no candidates to choose a finalist from")
    started = time.perf_counter()
    best: tuple[tuple[float, ...], int, nn.Module] | None = None
    records = []
    for i, (source, reward, info) in enumerate(candidates[:k]):
        counts = np.asarray(info["keep_counts"], dtype=np.int64)
        model = finetune(prune_channels(env.model, env.graph, env.kept_channels(counts)))
        loss, accuracy = evaluate(model, env.splits.reward)
        records.append({"source": source, "reward": float(reward), "keep_counts": counts.tolist(),
                        "flops_ratio": float(env.graph.flops(counts)) / env.dense_flops,
                        "reward_split_loss": loss, "reward_split_accuracy": accuracy})
        key = (env.task_loss_of(loss, accuracy), loss)
        if best is None or key < best[0]:
            best = (key, i, model)
    _, chosen, model = best
    name = "loss" if env.task_loss == "cross_entropy" else "error rate"
    log(f"finalists: the {len(records)} best allocations by reward, fine-tuned, have reward-split {name} "
        + ", ".join(f"{env.task_loss_of(r['reward_split_loss'], r['reward_split_accuracy']):.4f}" for r in records)
        + f"; keeping #{chosen + 1}")
    return chosen, model, {"chosen": chosen, "seconds": time.perf_counter() - started, "candidates": records}
