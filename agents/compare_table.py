"""The comparison's table from its cells: mean and spread over seeds, RL per-layer's paired
advantage over each method (in test accuracy, and in test loss: finer where a test image is a
quarter of a point; for the searches also in the reward they kept), the terminal and Markdown
tables, the Pareto plot and the TensorBoard hparams."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from prunegym.compression.checkpoint import atomic_path
from prunegym.compression.statistics import paired_difference

from .methods import METHODS

__all__ = ["summarize", "format_table", "markdown_table", "pareto_plot", "write_hparams"]


def _versus_rl(rows: list[dict[str, Any]], method: str, budget: float | None, key: str = "test_accuracy",
               scale: float = 100.0) -> dict[str, Any] | None:
    """RL per-layer's ``key`` (times ``scale``: accuracy in points) minus ``method``'s at ``budget``, paired
    over the seeds both have (same base model and split per seed): mean, 95% interval, seeds where RL's is
    higher (``won``) and lower (``lost``). None for a method without a budget, RL itself, or no such seed."""
    if budget is None or method == "rl_layer":
        return None
    rl = {r["seed"]: r[key] for r in rows if r["method"] == "rl_layer" and r["budget"] == budget and key in r}
    other = {r["seed"]: r[key] for r in rows if r["method"] == method and r["budget"] == budget and key in r}
    seeds = sorted(rl.keys() & other.keys())
    if not seeds:
        return None
    return paired_difference([scale * rl[s] for s in seeds], [scale * other[s] for s in seeds]).as_dict()


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, budget): mean ± std of accuracy over seeds, the mean test loss, means of the
    costs, and for every per-budget method RL per-layer's paired difference from it in test accuracy
    (``rl_minus_this``, points) and in test loss (``rl_minus_this_loss``: negative where RL's is lower);
    for a search (RL per-layer, random search) also the reward of the allocation it kept (``best_reward``),
    its seconds (``search_seconds``) and RL's paired difference in that reward (``rl_minus_this_reward``)."""
    table = []
    keys = []
    for r in rows:
        if (r["method"], r["budget"]) not in keys:
            keys.append((r["method"], r["budget"]))
    for method, budget in keys:
        group = [r for r in rows if r["method"] == method and r["budget"] == budget]
        acc = np.array([r["test_accuracy"] for r in group]) * 100
        entry = {"method": method, "label": METHODS[method].label, "budget": budget, "seeds": len(group),
                 "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                 "note": METHODS[method].note}
        for key in ("test_loss", "flops_ratio", "params", "bytes", "bytes_ratio", "latency_b1_ms", "latency_b64_ms",
                    "latency_ratio_b1", "latency_ratio_b64", "sparsity", "nonzero_flops_ratio", "best_reward",
                    "search_seconds"):
            if all(key in r for r in group):
                entry[key] = float(np.mean([r[key] for r in group]))
        versus = _versus_rl(rows, method, budget)
        if versus is not None:
            entry["rl_minus_this"] = versus
        versus_loss = _versus_rl(rows, method, budget, key="test_loss", scale=1.0)
        if versus_loss is not None:
            entry["rl_minus_this_loss"] = versus_loss
        versus_reward = _versus_rl(rows, method, budget, key="best_reward", scale=1.0)
        if versus_reward is not None:
            entry["rl_minus_this_reward"] = versus_reward
        table.append(entry)
    return table


# What RL per-layer's paired difference is taken in: the entry's key, its format, and which seeds are counted
# (won: RL's is the higher; lost: RL's is the lower, the better for a loss).
_VERSUS = {"accuracy": ("rl_minus_this", "+.2f", "won"), "loss": ("rl_minus_this_loss", "+.3f", "lost"),
           "reward": ("rl_minus_this_reward", "+.4f", "won")}


def _versus_text(entry: dict[str, Any], kind: str = "accuracy") -> str:
    """RL per-layer's paired difference as ``+1.23 [-0.40, +2.86] 4/5``: mean, 95% interval and the seeds RL
    won, in accuracy points; ``kind`` loss: in test loss (``-0.012 [-0.030, +0.006] 4/5``, the seeds where
    RL's loss is the lower); ``kind`` reward: in the search's reward (``+0.0312 [...] 5/5``, the seeds where
    RL's is the higher)."""
    key, f, counted = _VERSUS[kind]
    v = entry.get(key)
    if v is None:
        return "-"
    interval = "" if v["low"] is None else f" [{v['low']:{f}}, {v['high']:{f}}]"
    return f"{v['mean']:{f}}{interval} {v[counted]}/{v['n']}"


def _search_lines(table: list[dict[str, Any]], markdown: bool) -> list[str]:
    """The searches' own figures: the reward of the allocation each kept (mean over seeds), RL per-layer's
    minus it paired over the seeds, and the search's seconds. Whether the agent found better rewards than
    random search, before asking whether the fine-tune kept the difference."""
    rows = [(e["label"], _budget(e), f"{e['best_reward']:.4f}", _versus_text(e, "reward"),
             f"{e['search_seconds']:.0f}" if "search_seconds" in e else "-") for e in table if "best_reward" in e]
    if not rows:
        return []
    if markdown:
        return ["| search | budget | reward of the allocation kept | RL per-layer − this [95% CI], seeds RL higher "
                "| search seconds |", "|---|---:|---:|---:|---:|"] + [f"| {' | '.join(r)} |" for r in rows]
    header = f"{'search':<22}{'budget':>7}{'reward kept':>13}  {'RL - this [95% CI] RL higher':<36}{'seconds':>9}"
    return [header, "-" * len(header)] + [f"{a:<22}{b:>7}{c:>13}  {d:<36}{e:>9}" for a, b, c, d, e in rows]


def _loss(entry: dict[str, Any]) -> str:
    return f"{entry['test_loss']:.3f}" if "test_loss" in entry else "-"


def _budget(entry: dict[str, Any]) -> str:
    return "-" if entry["budget"] is None else f"{entry['budget']:g}"


def format_table(table: list[dict[str, Any]]) -> str:
    """The table for the terminal."""
    header = (f"{'method':<22}{'budget':>7}{'test acc %':>16}{'FLOPs':>7}{'params':>10}{'bytes':>10}"
              f"{'b1 ms':>8}{'b64 ms':>8}  {'RL - this [95% CI] RL won':<28}  RL - this, test loss [95% CI] RL lower")
    lines = [header, "-" * len(header)]
    for e in table:
        acc = f"{e['accuracy_mean']:.2f} ± {e['accuracy_std']:.2f}"
        lines.append(f"{e['label']:<22}{_budget(e):>7}{acc:>16}{e['flops_ratio']:>7.3f}{e['params']:>10,.0f}"
                     f"{e['bytes']:>10,.0f}{e['latency_b1_ms']:>8.3f}{e['latency_b64_ms']:>8.3f}  "
                     f"{_versus_text(e):<28}  {_versus_text(e, 'loss')}")
    search = _search_lines(table, markdown=False)
    return "\n".join(lines + ([""] + search if search else []))


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The table in Markdown."""
    lines = ["| method | budget | test accuracy % | RL per-layer − this, points [95% CI], seeds RL won | test loss "
             "| RL per-layer − this, test loss [95% CI], seeds RL lower | FLOPs ratio | params | bytes | b1 ms "
             "| b64 ms | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for e in table:
        note = e["note"]
        if "sparsity" in e:
            note += f"; sparsity {e['sparsity']:.2f}"
        lines.append(f"| {e['label']} | {_budget(e)} | {e['accuracy_mean']:.2f} ± {e['accuracy_std']:.2f} | "
                     f"{_versus_text(e)} | {_loss(e)} | {_versus_text(e, 'loss')} | {e['flops_ratio']:.3f} | "
                     f"{e['params']:,.0f} | {e['bytes']:,.0f} | "
                     f"{e['latency_b1_ms']:.3f} | {e['latency_b64_ms']:.3f} | {note} |")
    search = _search_lines(table, markdown=True)
    return "\n".join(lines + ([""] + search if search else []))


def pareto_plot(table: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy against FLOPs ratio, one marker per (method, budget), the Pareto front drawn through
    the non-dominated points. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    cmap = plt.get_cmap("tab20")
    markers = "osD^vP*Xh<>pd8H"
    points = []
    for i, method in enumerate(dict.fromkeys(e["method"] for e in table)):
        entries = [e for e in table if e["method"] == method]
        hollow = all("nonzero_flops_ratio" in e for e in entries)
        xs = [e.get("nonzero_flops_ratio", e["flops_ratio"]) for e in entries]
        ys = [e["accuracy_mean"] for e in entries]
        ax.errorbar(xs, ys, yerr=[e["accuracy_std"] for e in entries], fmt=markers[i % len(markers)], capsize=3,
                    color=cmap(i % 20), mfc="none" if hollow else cmap(i % 20), label=METHODS[method].label)
        if not hollow:
            points += list(zip(xs, ys, strict=True))
    front = sorted(points)
    best, line = -np.inf, []
    for x, y in front:
        if y > best:
            best = y
            line.append((x, y))
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="grey", lw=1, ls="--", label="Pareto front")
    ax.set_xlabel("FLOPs ratio (pruned / dense; hollow: nonzero FLOPs of unstructured sparsity)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_hparams(out: Path, table: list[dict[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(out / "tb", ignore_errors=True)  # a rerun writes the whole table again
    with SummaryWriter(str(out / "tb")) as writer:
        for e in table:
            metrics = {f"compare/{k}": e[k] for k in ("accuracy_mean", "accuracy_std", "test_loss", "flops_ratio",
                                                      "bytes", "latency_b1_ms", "latency_b64_ms") if k in e}
            writer.add_hparams({"method": e["method"], "budget": -1.0 if e["budget"] is None else e["budget"]},
                               metrics, run_name=f"{e['method']}__{_budget(e)}")
