"""How well the candidate evaluations a search can use rank allocations, and how long the fine-tune
after a search must be: the benchmarks behind ``scripts/bench.py --what proxy`` and ``--what finetune``.

``bench_proxy`` samples random allocations at a FLOPs budget (EagleEye's sampler), fine-tunes each
with the report's recipe, and scores each with every evaluation a search could reward (BN
recalibration on a few or all batches, a short-term fine-tune, the distillation loss; on the dense
model and on the supernet; the full fine-tune's own reward-split loss and accuracy); ``proxy_table``
gives each evaluation's Spearman rank correlation with the fine-tuned test accuracy and loss.
``allocation_headroom`` says how much any of the candidates fine-tunes better than the uniform widths,
fine-tuned beside them: what no search among them could exceed. ``bench_finetune`` measures one
allocation's test accuracy against the fine-tune's length over fine-tune seeds. ``bench_scoring``
times the search's reward (one candidate BN-recalibrated and scored) on the sliced sub-network and
soft-masked at full width. They print figures and assert nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunegym.compression.channels import ChannelGraph
from prunegym.compression.checkpoint import read_json, write_json
from prunegym.compression.importance import L1Importance
from prunegym.compression.supernet import SUPERNET_SAMPLING

from .config import DEFAULT_IMPORTANCE

__all__ = ["PROXY_SOURCES", "FINETUNED_MEASURES", "bench_proxy", "proxy_table", "proxy_reliability",
           "allocation_headroom", "format_proxy", "bench_finetune", "format_finetune", "bench_scoring",
           "format_scoring"]

PROXY_METRICS = (("loss", -1.0), ("accuracy", 1.0), ("distillation", -1.0))  # (metric, sign: higher is better)
PROXY_SOURCES = ("dense", "supernet")  # the models candidates are pruned from


def _named(source: str) -> str:
    """How a candidate evaluation's name says the model it prunes: nothing for the dense model."""
    return "" if source == "dense" else f"{source}, "


def _proxy_sources(model_name: str, dataset: str, seed: int, base_epochs: int, supernet_epochs: int,
                   min_keep: float, device: torch.device, supernet_budget: float | None, *,
                   importance: str) -> tuple[Any, dict[str, tuple[nn.Module, Any, list]]]:
    """The splits, and each model candidates are pruned from: its channel graph and ranking (the dense
    model's by L1 norm; the supernet's channels put in ``importance`` order before it trains, its widths
    sampled at ``supernet_budget``, when given)."""
    from prunegym.compression.data import load_dataset
    from prunegym.compression.importance import make_importance
    from prunegym.compression.supernet import prefix_kept, supernet_model
    from prunegym.compression.training import base_model

    splits = load_dataset(dataset, seed)
    example = splits.train.x[:1].to(device)
    dense = base_model(model_name, splits, seed, epochs=base_epochs, device=device).eval()
    graph = ChannelGraph(dense, example)
    sources = {"dense": (dense, graph, graph.rankings(L1Importance()))}
    if supernet_epochs:
        supernet, _ = supernet_model(model_name, dense, splits, seed, base_epochs=base_epochs, epochs=supernet_epochs,
                                     min_keep=min_keep, importance=make_importance(importance), budget=supernet_budget,
                                     device=device)
        supernet_graph = ChannelGraph(supernet, example)
        sources["supernet"] = (supernet, supernet_graph, prefix_kept(supernet_graph.num_channels))
    return splits, sources


FINETUNED_MEASURES = ("accuracy", "loss", "reward_accuracy", "reward_loss")
"""what each fine-tuned candidate is measured by: test accuracy and loss, and the same on the reward
split (what ``--finalists`` chooses the kept candidate by)"""


def _finetune_cell(cells: Path | None, settings: dict[str, Any],
                   compute: Any) -> tuple[dict[str, float], float]:
    """``compute()`` (``FINETUNED_MEASURES`` by name) and the seconds it took, or what was saved for the
    same ``settings`` in ``cells`` (then saved there): an interrupted benchmark continues where it
    stopped. A cell saved with other settings is refused; one saved without every measure (before
    it was recorded) is measured again."""
    started = time.perf_counter()
    path = None
    if cells is not None:
        name = "__".join(f"{k}{v}" for k, v in settings.items()
                         if k in ("source", "budget", "candidate", "finetune_seed"))
        # several seeds share a folder; seed 0's cells keep the names they had before the seed was in them
        seed = settings["seed"]
        path = cells / f"{name}{'' if seed == 0 else f'__seed{seed}'}.json"
        if path.is_file():
            saved = read_json(path)
            if saved.get("settings") != settings:
                raise ValueError(f"{path} was measured with other settings ({saved.get('settings')}, not {settings}); "
                                 "pass another --cells folder")
            if all(m in saved for m in FINETUNED_MEASURES):
                return {m: float(saved[m]) for m in FINETUNED_MEASURES}, float(saved["seconds"])
    measured = {m: float(v) for m, v in compute().items()}
    seconds = time.perf_counter() - started
    if path is not None:
        write_json(path, {"settings": settings, **measured, "seconds": seconds})
    return measured, seconds


def bench_proxy(model_name: str, dataset: str, budget: float, candidates: int, seed: int, finetune_epochs: int,
                finetune_lr: float, supernet_epochs: int, finetune_steps: list[int], min_keep: float,
                base_epochs: int, device: str, finetune_seeds: list[int], cells: Path | None = None,
                finetune_from: Sequence[str] = PROXY_SOURCES, supernet_sampling: str = "uniform",
                importance: str = DEFAULT_IMPORTANCE["layer"], log: Any = print) -> dict[str, Any]:
    """Sample ``candidates`` random allocations at ``budget`` (EagleEye's sampler), fine-tune each
    with the report's recipe once per fine-tune seed (pruned from each model in ``finetune_from``:
    the dense model, the supernet, whose channels are put in ``importance`` order and whose widths are
    sampled as ``supernet_sampling`` says: ``"uniform"`` or at the ``"budget"``), and score each with
    every candidate evaluation a search can use; returns every score and the fine-tuned accuracies.
    The uniform widths at the budget (uniform L1's keep counts) are fine-tuned alike, as the reference
    ``allocation_headroom`` measures the candidates against. With ``cells``, each fine-tuned accuracy
    is saved there as it is measured and read back by a rerun with the same settings."""
    import math

    from prunegym.compression.channels import prune_channels as prune
    from prunegym.compression.importance import IMPORTANCES
    from prunegym.compression.proxy import RECALIBRATION_BATCH, ProxyEvaluator
    from prunegym.compression.sparsity import random_keep_counts, uniform_keep_counts
    from prunegym.compression.supernet import width_choices
    from prunegym.compression.training import evaluate, resolve_device, train_classifier

    unknown = [s for s in finetune_from if s not in PROXY_SOURCES]
    if unknown or not finetune_from:
        raise ValueError(f"finetune_from must name some of {PROXY_SOURCES}, got {list(finetune_from)!r}")
    if "supernet" in finetune_from and not supernet_epochs:
        raise ValueError("fine-tuning candidates cut from the supernet needs supernet_epochs > 0")
    if supernet_sampling not in SUPERNET_SAMPLING:
        raise ValueError(f"supernet_sampling must be one of {SUPERNET_SAMPLING}, got {supernet_sampling!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {sorted(IMPORTANCES)}, got {importance!r}")
    device = resolve_device(device)
    splits, sources = _proxy_sources(model_name, dataset, seed, base_epochs, supernet_epochs, min_keep, device,
                                     budget if supernet_sampling == "budget" else None, importance=importance)
    _, graph, _ = sources["dense"]
    rng = np.random.default_rng([seed, round(budget * 1e6)])
    choices = width_choices(graph, min_keep)
    allocations = [random_keep_counts(graph, budget, choices, rng) for _ in range(candidates)]
    all_batches = math.ceil(len(splits.train) / RECALIBRATION_BATCH)
    proxies = []
    for source in sources:
        prefix = _named(source)
        proxies += [(f"{prefix}BN 2 batches", source, {"recalibration_batches": 2}),
                    (f"{prefix}BN {all_batches} batches (adaptive BN)", source,
                     {"recalibration_batches": all_batches}),
                    (f"{prefix}BN 2 batches, head re-fitted", source, {"recalibration_batches": 2, "refit_head": True})]
        proxies += [(f"{prefix}fine-tune {n} steps", source, {"recalibration_batches": 0, "finetune_steps": n})
                    for n in finetune_steps]

    def finetuned(model: nn.Module, graph: ChannelGraph, kept: list[torch.Tensor],
                  finetune_seed: int) -> dict[str, float]:
        pruned = train_classifier(prune(model, graph, kept), splits.train, epochs=finetune_epochs, lr=finetune_lr,
                                  seed=finetune_seed, device=device)
        loss, accuracy = evaluate(pruned, splits.test, device=device)
        reward_loss, reward_accuracy = evaluate(pruned, splits.reward, device=device)
        return {"accuracy": accuracy, "loss": loss, "reward_accuracy": reward_accuracy, "reward_loss": reward_loss}

    # measure -> source -> per candidate, its value after each fine-tune seed; candidate by candidate,
    # every source in turn, so that an interrupted run (--cells) leaves the same candidates for each source
    fine_tuned = [source for source in sources if source in finetune_from]
    truth: dict[str, dict[str, list[list[float]]]] = {m: {source: [] for source in fine_tuned}
                                                      for m in FINETUNED_MEASURES}
    spent: dict[str, list[float]] = {source: [] for source in fine_tuned}
    uniform = uniform_keep_counts(graph, budget)
    reference: dict[str, dict[str, list[float]]] = {m: {} for m in FINETUNED_MEASURES}

    def finetuned_seeds(source: str, candidate: int | str, counts: np.ndarray) -> dict[str, list[float]]:
        """``counts`` pruned from ``source`` and fine-tuned once per fine-tune seed (or read from ``cells``):
        each measure, per fine-tune seed."""
        model, source_graph, ranking = sources[source]
        kept = source_graph.kept_channels(ranking, counts)
        per_seed: dict[str, list[float]] = {m: [] for m in FINETUNED_MEASURES}
        for s in finetune_seeds:
            settings = {"model": model_name, "dataset": dataset, "seed": seed, "base_epochs": base_epochs,
                        "supernet_epochs": supernet_epochs if source == "supernet" else 0, "min_keep": min_keep,
                        "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr, "source": source,
                        "budget": budget, "candidate": candidate, "finetune_seed": s, "keep_counts": counts.tolist()}
            # settings at their first values stay unnamed, so that cells measured before them stay valid
            if source == "supernet" and supernet_sampling != "uniform":
                settings["supernet_sampling"] = supernet_sampling
            if source == "supernet" and importance != "l1":
                settings["importance"] = importance
            measured, seconds = _finetune_cell(cells, settings, partial(finetuned, model, source_graph, kept, s))
            for m in FINETUNED_MEASURES:
                per_seed[m].append(measured[m])
            spent[source].append(seconds)
        return per_seed

    for source in fine_tuned:  # the reference first: an interrupted run has it for every source
        for m, values in finetuned_seeds(source, "uniform", uniform).items():
            reference[m][source] = values
        log(f"  {source} uniform widths: fine-tuned test accuracy "
            f"{np.round(reference['accuracy'][source], 4).tolist()}")
    for i, counts in enumerate(allocations):
        for source in fine_tuned:
            for m, values in finetuned_seeds(source, i, counts).items():
                truth[m][source].append(values)
            log(f"  {source} candidate {i + 1}/{candidates}: fine-tuned test accuracy "
                f"{np.round(truth['accuracy'][source][-1], 4).tolist()}")
    truth_seconds = {source: float(np.mean(seconds)) for source, seconds in spent.items()}  # as measured
    rows = []
    for name, source, kwargs in proxies:
        model, source_graph, ranking = sources[source]
        evaluator = ProxyEvaluator(model, source_graph, ranking, splits.train, finetune_lr=1e-3, seed=seed,
                                   device=device, **kwargs)
        scores, started = [], time.perf_counter()
        for counts in allocations:
            scores.append(evaluator(counts, splits.reward))
        seconds = (time.perf_counter() - started) / candidates
        evaluator.close()
        log(f"  {name}: {seconds:.3f} s per candidate")
        rows.append({"proxy": name, "source": source, "seconds": seconds, "scores": scores})
    return {"model": model_name, "dataset": dataset, "budget": budget, "candidates": candidates, "seed": seed,
            "min_keep": min_keep, "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr,
            "supernet_epochs": supernet_epochs, "supernet_sampling": supernet_sampling, "importance": importance,
            "finetune_seeds": finetune_seeds,
            "keep_counts": [c.tolist() for c in allocations],
            "flops_ratios": [float(graph.flops(c)) / graph.dense_flops for c in allocations],
            **{f"finetuned_{m}": truth[m] for m in FINETUNED_MEASURES}, "finetune_seconds": truth_seconds,
            "uniform": {"keep_counts": uniform.tolist(), "flops_ratio": float(graph.flops(uniform)) / graph.dense_flops,
                        **{f"finetuned_{m}": reference[m] for m in FINETUNED_MEASURES}},
            "proxies": rows}


def _mean_truth(r: dict[str, Any], measure: str = "accuracy") -> dict[str, np.ndarray]:
    """Each source's fine-tuned test accuracy (or loss) per candidate, averaged over the fine-tune
    seeds; no loss in results measured before it was recorded."""
    return {source: np.asarray(v).mean(axis=1) for source, v in r.get(f"finetuned_{measure}", {}).items()}


def proxy_reliability(r: dict[str, Any]) -> dict[str, float]:
    """Per source, Spearman between the candidates' accuracies after two fine-tune seeds (the first
    two): how well the fine-tuned accuracy ranks candidates itself, the ceiling for any proxy."""
    from prunegym.compression.statistics import spearman

    return {source: spearman(np.asarray(acc)[:, 0], np.asarray(acc)[:, 1])
            for source, acc in r["finetuned_accuracy"].items() if np.asarray(acc).shape[1] > 1}


def allocation_headroom(r: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per source, how much any of the sampled allocations fine-tunes better than the uniform widths:
    what no better search could exceed among these candidates. Accuracy figures are fractions, losses
    nats; every difference is candidate minus uniform widths, per fine-tune seed, so positive
    accuracy and negative loss favour the candidates.

    ``between_std``: the spread of the candidates' fine-tuned accuracy with the fine-tune seeds'
    noise taken out (the square root of the variance of their means less the mean within-candidate
    variance over the number of seeds; 0 when the noise explains all of it). ``oracle``: the candidate
    best by test accuracy after one fine-tune seed, read after another, minus the uniform widths
    after that one, averaged over the ordered pairs of seeds (``oracle_loss`` likewise by test loss):
    what choosing by the fine-tuned outcome itself gains once its luck is not counted. Needs the
    uniform reference (results measured before it lack it: ``{}``); the oracle needs two fine-tune
    seeds or more (NaN otherwise)."""
    if "uniform" not in r:
        return {}
    out = {}
    for source, per_seed in r["finetuned_accuracy"].items():
        acc, loss = np.asarray(per_seed, dtype=float), np.asarray(r["finetuned_loss"][source], dtype=float)
        ref_acc = np.asarray(r["uniform"]["finetuned_accuracy"][source], dtype=float)
        ref_loss = np.asarray(r["uniform"]["finetuned_loss"][source], dtype=float)
        seeds = acc.shape[1]
        within = acc.var(axis=1, ddof=1).mean() if seeds > 1 else 0.0
        between = acc.mean(axis=1).var(ddof=1) - within / seeds if len(acc) > 1 else float("nan")
        pairs = [(a, b) for a in range(seeds) for b in range(seeds) if a != b]
        oracle = [acc[np.argmax(acc[:, a]), b] - ref_acc[b] for a, b in pairs]
        oracle_loss = [loss[np.argmin(loss[:, a]), b] - ref_loss[b] for a, b in pairs]
        out[source] = {
            "uniform_accuracy": float(ref_acc.mean()), "uniform_loss": float(ref_loss.mean()),
            "candidates_accuracy": float(acc.mean()), "candidates_loss": float(loss.mean()),
            "best_accuracy": float(acc.mean(axis=1).max()),
            "share_above": float((acc.mean(axis=1) > ref_acc.mean()).mean()),
            "seed_std": float(np.sqrt(within)) if seeds > 1 else float("nan"),
            "between_std": float(np.sqrt(max(between, 0.0))) if np.isfinite(between) else float("nan"),
            "oracle": float(np.mean(oracle)) if pairs else float("nan"),
            "oracle_loss": float(np.mean(oracle_loss)) if pairs else float("nan"),
        }
    return out


def _finetuned_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The full fine-tune as a candidate evaluation, one row per fine-tuned source: each candidate's
    reward-split loss and accuracy once fine-tuned (means over the fine-tune seeds), the score
    ``--finalists`` keeps a candidate by; none in results measured before they were recorded."""
    return [{"proxy": f"{_named(source)}fine-tune {r['finetune_epochs']} epochs (finalists)", "source": source,
             "seconds": r["finetune_seconds"][source],
             "scores": [{"loss": float(np.mean(loss)), "accuracy": float(np.mean(accuracy))}
                        for loss, accuracy in zip(r["finetuned_reward_loss"][source],
                                                  r["finetuned_reward_accuracy"][source], strict=True)]}
            for source in r.get("finetuned_reward_loss", {})]


def proxy_table(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Per proxy and metric: Spearman with each source's fine-tuned test accuracy and with its
    negated test loss (means over the fine-tune seeds; the loss ranks candidates whose accuracies tie
    on a small test split), and the fine-tuned accuracy of the candidate it ranks first (and that minus
    the uniform widths', when they were measured)."""
    from prunegym.compression.statistics import spearman

    truth, truth_loss, headroom = _mean_truth(r), _mean_truth(r, "loss"), allocation_headroom(r)
    table = []
    for row in r["proxies"] + _finetuned_rows(r):
        for metric, sign in PROXY_METRICS:
            if metric not in row["scores"][0]:
                continue
            score = [sign * s[metric] for s in row["scores"]]
            entry = {"proxy": row["proxy"], "metric": metric, "source": row["source"], "seconds": row["seconds"]}
            for source, accuracy in truth.items():
                entry[f"spearman_{source}"] = spearman(score, accuracy)
            for source, loss in truth_loss.items():
                entry[f"spearman_{source}_loss"] = spearman(score, -loss)
            entry["top1_accuracy"] = (float(truth[row["source"]][int(np.argmax(score))]) if row["source"] in truth
                                      else float("nan"))  # its own model's candidates were not fine-tuned
            if row["source"] in headroom:
                entry["top1_over_uniform"] = entry["top1_accuracy"] - headroom[row["source"]]["uniform_accuracy"]
            table.append(entry)
    return table


def format_proxy(r: dict[str, Any]) -> str:
    sources = list(r["finetuned_accuracy"])
    columns = [(f"ρ {s}", f"spearman_{s}") for s in sources] + [(f"ρ {s} loss", f"spearman_{s}_loss")
                                                                 for s in r.get("finetuned_loss", {})]
    truth, reliability, headroom = _mean_truth(r), proxy_reliability(r), allocation_headroom(r)
    lines = [f"proxy fidelity: {r['model']} on {r['dataset']}, {r['candidates']} random allocations at FLOPs "
             f"{r['budget']:g} (ratios {min(r['flops_ratios']):.3f}-{max(r['flops_ratios']):.3f}), seed {r['seed']}, "
             f"min_keep {r['min_keep']:g}; each fine-tuned {r['finetune_epochs']} epochs at lr {r['finetune_lr']:g} "
             f"with fine-tune seeds {r['finetune_seeds']}"
             + (f"; supernet trained {r['supernet_epochs']} epochs in {r.get('importance', 'l1')} order, widths "
                "sampled " + ("at the budget" if r.get("supernet_sampling") == "budget" else "uniformly")
                if r["supernet_epochs"] else "")]
    for source in sources:
        acc = 100 * truth[source]
        spread = 100 * np.sqrt(np.asarray(r["finetuned_accuracy"][source]).var(axis=1, ddof=1).mean()) \
            if len(r["finetune_seeds"]) > 1 else float("nan")  # pooled over the candidates
        lines.append(f"fine-tuned from {source}: test accuracy over candidates {acc.mean():.2f} ± {acc.std(ddof=1):.2f}"
                     f" (min {acc.min():.2f}, max {acc.max():.2f}); over fine-tune seeds ± {spread:.2f}; "
                     f"ρ between two fine-tune seeds {reliability.get(source, float('nan')):.2f}; "
                     f"{r['finetune_seconds'][source]:.1f} s per fine-tune")
        if source in headroom:
            h = headroom[source]
            ref = h["uniform_accuracy"]
            lines.append(
                f"  against the uniform widths (FLOPs {r['uniform']['flops_ratio']:.3f}: {100 * ref:.2f}%, loss "
                f"{h['uniform_loss']:.4f}): candidates' mean {100 * (h['candidates_accuracy'] - ref):+.2f}, best "
                f"{100 * (h['best_accuracy'] - ref):+.2f}, {h['share_above']:.0%} above; spread between candidates "
                f"± {100 * h['between_std']:.2f} beyond the fine-tune seeds';"
                f" oracle (best after one fine-tune seed, read after another) {100 * h['oracle']:+.2f} points,"
                f" by loss {h['oracle_loss']:+.4f}")
    top1_over = any(source in headroom for source in sources)
    header = f"{'candidate evaluation':<40}{'score':>14}" + "".join(f"{c:>17}" for c, _ in columns) + \
        f"{'top-1 acc':>11}" + (f"{'− uniform':>11}" if top1_over else "") + f"{'s/eval':>9}"
    lines += [header, "-" * len(header)]
    for e in proxy_table(r):
        score = ("-" if e["metric"] != "accuracy" else "") + e["metric"]
        lines.append(f"{e['proxy']:<40}{score:>14}" + "".join(f"{e[key]:>17.2f}" for _, key in columns)
                     + f"{100 * e['top1_accuracy']:>11.2f}"
                     + (f"{100 * e.get('top1_over_uniform', float('nan')):>+11.2f}" if top1_over else "")
                     + f"{e['seconds']:>9.3f}")
    lines.append("ρ: Spearman rank correlation of the score with the test accuracy (ρ ... loss: the negated test "
                 "loss) after the fine-tune, for candidates "
                 "pruned from that model; top-1 acc: the fine-tuned accuracy of the candidate the score ranks first "
                 "(from the model the evaluation prunes)" + (", − uniform: that minus the uniform widths'" if top1_over
                                                              else "") + "; scores on the reward split.")
    return "\n".join(lines)


# ---- fine-tune length: where test accuracy stops moving ------------------------------------------
def bench_finetune(model_name: str, dataset: str, budget: float, epochs: list[int], finetune_seeds: list[int],
                   seed: int, finetune_lr: float, base_epochs: int, device: str, log: Any = print) -> dict[str, Any]:
    """Test accuracy of one allocation (uniform L1 at ``budget``) after fine-tunes of each length in
    ``epochs``, for each fine-tune seed (the order of the batches; base model and split fixed by ``seed``)."""
    from prunegym.compression.channels import prune_channels as prune
    from prunegym.compression.data import load_dataset
    from prunegym.compression.sparsity import uniform_keep_counts
    from prunegym.compression.training import base_model, evaluate, resolve_device, train_classifier

    device = resolve_device(device)
    splits = load_dataset(dataset, seed)
    dense = base_model(model_name, splits, seed, epochs=base_epochs, device=device).eval()
    graph = ChannelGraph(dense, splits.train.x[:1].to(device))
    counts = uniform_keep_counts(graph, budget)
    kept = graph.kept_channels(L1Importance(), counts)
    rows = []
    for n in epochs:
        accuracies, started = [], time.perf_counter()
        for s in finetune_seeds:
            pruned = train_classifier(prune(dense, graph, kept), splits.train, epochs=n, lr=finetune_lr, seed=s,
                                      device=device)
            accuracies.append(evaluate(pruned, splits.test, device=device)[1])
        rows.append({"epochs": n, "accuracies": accuracies,
                     "seconds": (time.perf_counter() - started) / len(finetune_seeds)})
        log(f"  {n} epochs: {np.round(100 * np.asarray(accuracies), 2).tolist()}")
    return {"model": model_name, "dataset": dataset, "budget": budget, "seed": seed, "finetune_lr": finetune_lr,
            "finetune_seeds": finetune_seeds, "keep_counts": counts.tolist(),
            "flops_ratio": float(graph.flops(counts)) / graph.dense_flops, "rows": rows}


def format_finetune(r: dict[str, Any]) -> str:
    lines = [f"fine-tune length: {r['model']} on {r['dataset']} (seed {r['seed']}), uniform L1 at FLOPs "
             f"{r['flops_ratio']:.3f}, lr {r['finetune_lr']:g}, fine-tune seeds {r['finetune_seeds']}",
             f"{'epochs':>7}{'test acc %':>16}{'min':>8}{'max':>8}{'s/fine-tune':>13}"]
    for row in r["rows"]:
        acc = 100 * np.asarray(row["accuracies"])
        std = acc.std(ddof=1) if len(acc) > 1 else 0.0
        lines.append(f"{row['epochs']:>7}{f'{acc.mean():.2f} ± {std:.2f}':>16}{acc.min():>8.2f}{acc.max():>8.2f}"
                     f"{row['seconds']:>13.1f}")
    return "\n".join(lines)


def bench_scoring(model_name: str, dataset: str, budgets: Sequence[float], candidates: int, seed: int,
                  base_epochs: int, min_keep: float) -> dict[str, Any]:
    """Seconds to score one candidate the way the layer env's reward does (BN statistics re-estimated
    on 2 train batches, then the reward split), on its sliced sub-network and soft-masked at full
    width, for ``candidates`` random allocations per FLOPs budget (EagleEye's sampler) of the base
    model; the two ways timed candidate by candidate, in alternating order. Also the largest
    difference between their losses (the two compute the same network)."""
    from prunegym.compression.data import load_dataset
    from prunegym.compression.proxy import ProxyEvaluator
    from prunegym.compression.sparsity import random_keep_counts
    from prunegym.compression.supernet import width_choices
    from prunegym.compression.training import base_model

    splits = load_dataset(dataset, seed)
    dense = base_model(model_name, splits, seed, epochs=base_epochs).eval()
    graph = ChannelGraph(dense, splits.train.x[:1])
    ranking = graph.rankings(L1Importance())
    ways = {"sliced": True, "soft-masked": False}
    choices = width_choices(graph, min_keep)
    rows = []
    for budget in budgets:
        rng = np.random.default_rng([seed, round(budget * 1e6)])
        evaluators = {name: ProxyEvaluator(dense, graph, ranking, splits.train, seed=seed, sliced=sliced)
                      for name, sliced in ways.items()}
        for evaluator in evaluators.values():
            evaluator(graph.num_channels, splits.reward)  # the full model's predictions, untimed
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        gap = 0.0
        for i in range(candidates):
            counts = random_keep_counts(graph, budget, choices, rng)
            losses = {}
            for name in list(ways) if i % 2 == 0 else list(ways)[::-1]:
                started = time.perf_counter()
                losses[name] = evaluators[name](counts, splits.reward)["loss"]
                seconds[name].append(time.perf_counter() - started)
            gap = max(gap, abs(losses["sliced"] - losses["soft-masked"]))
        for evaluator in evaluators.values():
            evaluator.close()
        rows.append({"budget": budget, "max_loss_difference": gap,
                     **{f"{name}_ms": 1e3 * float(np.median(s)) for name, s in seconds.items()}})
    return {"model": model_name, "dataset": dataset, "candidates": candidates, "threads": torch.get_num_threads(),
            "rows": rows}


def format_scoring(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} on {r['dataset']}: one candidate scored as the search's reward, median over "
             f"{r['candidates']} random allocations per budget, {r['threads']} thread(s)",
             f"{'FLOPs budget':<14}{'sliced ms':>11}{'soft-masked ms':>16}{'speed-up':>10}{'max loss diff':>15}"]
    for row in r["rows"]:
        lines.append(f"{row['budget']:<14g}{row['sliced_ms']:>11.1f}{row['soft-masked_ms']:>16.1f}"
                     f"{row['soft-masked_ms'] / row['sliced_ms']:>9.2f}x{row['max_loss_difference']:>15.2e}")
    return "\n".join(lines)
