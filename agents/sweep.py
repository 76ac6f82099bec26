"""Sweeps of the main job on Ray Tune (``scripts/sweep.py``): many ``train.py`` runs over a grid of
its settings (λ, budgets, seeds, algorithms) or a search over the agent's hyper-parameters, with
one table and one plot of test accuracy against FLOPs over all trials at the end.

Every trial is one run of the main job with its own run directory, ``<out>/runs/<trial>``, made
and kept as ``train.py`` makes it (``run_or_reuse``: a trial that runs again after an interruption
or a failure continues its run from the latest checkpoint, or reads back its finished report).
Tune keeps the sweep's own state in ``<out>/tune``; running the same sweep again with the same
``out`` and ``trust`` restores it (``Tuner.restore``, which unpickles): finished trials are kept,
the others continue. The output folder holds ``config.json`` (the settings, first), ``runs/``,
``tune/``, and, written last, ``results.json``, ``results.md`` and ``front.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prunegym.compression.checkpoint import atomic_path, read_json, write_json
from prunegym.compression.metrics import keep_freed_memory, num_threads

from .config import FIRST_DEFAULTS, TrainConfig, main_defaults, resolve_given
from .distributed import TASK_RETRIES, check_placement, connect, require_ray
from .job import claim_output
from .run import run_or_reuse

__all__ = ["SweepConfig", "SweepInterrupted", "DISTRIBUTIONS", "METRICS", "sweep", "trial_metrics", "front_plot"]

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
"""how ``search`` samples a setting: ``uniform:LOW:HIGH``, ``loguniform:LOW:HIGH``,
``randint:LOW:HIGH`` (HIGH excluded), ``choice:A|B|C``"""

METRICS = ("best_reward", "test_accuracy", "flops_ratio", "uniform_test_accuracy", "latency_ratio_b64")
"""what each trial reports; a search maximises ``best_reward`` (the search's own reward, on the reward
split: choosing hyper-parameters by test accuracy would fit them to the test split)"""


@dataclass
class SweepConfig:
    """Settings of a sweep, written once to ``config.json``."""

    settings: dict[str, Any] = field(default_factory=dict)
    """train.py settings every trial shares (``TrainConfig`` fields; the rest keep their defaults)"""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """train.py settings to sweep, each over its values: every combination is a trial"""
    search: dict[str, str] = field(default_factory=dict)
    """agent hyper-parameters (or train.py settings) to search with Optuna, each as a distribution"""
    trials: int = 8
    """with ``search``: how many trials Optuna proposes (each over the whole grid, if there is one)"""
    out: str = ""
    """the output folder; empty: ``runs/sweep__<time>``"""
    workers: int = 0
    """trials at once on a Ray started in this process (each with ``threads`` CPUs); 0: one at a time"""
    address: str = ""
    """a Ray cluster to run the trials on instead (``auto``, or ``HOST:PORT`` of its head)"""
    threads: int = 1
    """CPU threads of each trial (training and latency measurements)"""
    main_defaults: dict[str, Any] | None = None
    """the main job's defaults that differ from train.py's first ones, as they were when the sweep started
    (set by ``sweep``), so that a sweep continued after they change runs its trials as it began them.
    None: a sweep from before they changed, whose trials ran with the first ones"""

    def validate(self) -> None:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        for name in (*self.settings, *self.grid):
            if name not in known:
                raise ValueError(f"{name!r} is not a setting of train.py; expected one of {sorted(known)}")
        for name in ("run_dir", "threads"):
            if name in self.settings or name in self.grid or name in self.search:
                raise ValueError(f"{name} is set by the sweep for each trial (use the sweep's own --out and "
                                 f"--threads), not by {name}=...")
        for (first, a), (second, b) in itertools.combinations((("fixed settings", self.settings),
                                                                ("a grid", self.grid), ("a search", self.search)), 2):
            both = sorted(set(a) & set(b))
            if both:
                raise ValueError(f"{both} are given both as {first} and as {second}; give each once")
        for name, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid {name} needs one or more values, got {values!r}")
        if not self.grid and not self.search:
            raise ValueError("a sweep needs a grid (--grid NAME=V1,V2) or a search (--search NAME=DISTRIBUTION)")
        ends = {name: _ends(name, spec) for name, spec in self.search.items()}  # raises on a bad one
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        check_placement(workers=self.workers, threads=self.threads, address=self.address, what="trials")
        for trial in _grid_points(self.grid):  # every trial's settings are checked before any runs
            _train_config(self, trial, "").validate()
            for name, values in ends.items():  # with each searched setting at the ends of its range
                for value in values:
                    _train_config(self, {**trial, name: value}, "").validate()
        require_ray("sweep.py")

    def default_out(self) -> str:
        return str(Path("runs") / f"sweep__{time.strftime('%Y%m%d-%H%M%S')}")


def _grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values (one empty point for no grid)."""
    points: list[dict[str, Any]] = [{}]
    for name, values in grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


def _parse(name: str, spec: str) -> tuple[str, list[Any]]:
    """``spec``'s kind and values (``DISTRIBUTIONS``): a choice's values, or a range's LOW and HIGH."""
    kind, _, rest = spec.partition(":")
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"search {name}={spec!r}: the distribution must be one of {DISTRIBUTIONS}")
    if kind == "choice":
        values = [_number(v) for v in rest.split("|") if v]
        if not values:
            raise ValueError(f"search {name}={spec!r}: choice needs values, as choice:A|B|C")
        return kind, values
    parts = rest.split(":")
    try:
        low, high = (int(p) if kind == "randint" else float(p) for p in parts)
    except ValueError as err:
        raise ValueError(f"search {name}={spec!r}: expected {kind}:LOW:HIGH with two numbers") from err
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ValueError(f"search {name}={spec!r}: needs LOW < HIGH" + (", both > 0" if kind == "loguniform" else ""))
    return kind, [low, high]


def _ends(name: str, spec: str) -> list[Any]:
    """The values of ``spec`` that bound what it draws: a choice's every value, a range's two ends
    (randint's HIGH is not drawn)."""
    kind, values = _parse(name, spec)
    return [values[0], values[1] - 1] if kind == "randint" else values


def _distribution(name: str, spec: str):
    """The Tune sampler of ``spec`` (``DISTRIBUTIONS``)."""
    from ray import tune

    kind, values = _parse(name, spec)
    if kind == "choice":
        return tune.choice(values)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*values)


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _train_config(config: SweepConfig, params: dict[str, Any], run_dir: str) -> TrainConfig:
    """The main job's settings for a trial: the shared settings, the trial's grid values, and its
    searched values (a name that is not a train.py setting is an agent hyper-parameter)."""
    # A setting a sweep's record lacks had not changed when it started: it ran with the first default.
    first = {**FIRST_DEFAULTS, **(config.main_defaults or {})}
    settings = {**first, **config.settings, "threads": config.threads, "run_dir": run_dir}
    hyperparameters = dict(settings.get("hyperparameters", {}))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in params.items():
        if name in known:
            settings[name] = value
        elif value is not None:
            hyperparameters[name] = value
    settings["hyperparameters"] = hyperparameters
    train_config = TrainConfig(**settings)
    resolve_given(train_config, {*config.settings, *config.grid, *config.search})
    return train_config


def _saved_setting(out: Path, name: str) -> Any:
    """A setting of the sweep whose ``config.json`` is in ``out`` (None where it has none, or is not a
    sweep's: ``claim_output`` refuses such a folder by name)."""
    try:
        return read_json(out / "config.json")["config"].get(name)
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return None


def trial_metrics(report: dict[str, Any]) -> dict[str, float]:
    """What a trial reports from its run's ``report.json`` (``METRICS``; per-input runs give their mean
    FLOPs ratio and no uniform baseline)."""
    results = report["results"]
    rl, dense = results["rl"], results["dense"]
    flops = rl["flops_ratio"] if "flops_ratio" in rl else rl["flops_mean"] / dense["flops_mean"]
    metrics = {"test_accuracy": rl["test_accuracy"], "flops_ratio": flops,
               "latency_ratio_b64": rl["latency_ratio_b64"],
               "best_reward": report.get("search", {}).get("best_reward", math.nan)}
    if "uniform" in results:
        metrics["uniform_test_accuracy"] = results["uniform"]["test_accuracy"]
    return {k: float(v) for k, v in metrics.items()}


def _trial_name(params: dict[str, Any], trial_id: str) -> str:
    text = "__".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{text}__{trial_id}" if text else trial_id)[:150]


def _trial(params: dict[str, Any], *, config: SweepConfig, out: str) -> dict[str, float]:
    """A Tune trial: the main job at the trial's settings in its own run directory, its metrics."""
    from ray import tune

    keep_freed_memory()  # this worker times models for the trial's report, as train.py's own process does
    run_dir = str(Path(out) / "runs" / _trial_name(params, tune.get_context().get_trial_id()))
    with num_threads(config.threads):
        report = run_or_reuse(_train_config(config, params, run_dir), log=lambda text: None)
    metrics = {**trial_metrics(report), "run_dir": run_dir}
    tune.report(metrics)
    return metrics


class SweepInterrupted(KeyboardInterrupt):
    """Ray Tune stopped the sweep on a Ctrl-C before every trial ended (it saves its state first): the
    final outputs are not written, and the same sweep continued with ``trust`` picks up from there."""


def sweep(config: SweepConfig, *, trust: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep, or continue the one in ``config.out`` (Tune's saved state is pickled and runs
    code as it loads: continuing needs ``trust``, for a folder you made or trust); return its results."""
    config.out = config.out or config.default_out()
    out = Path(config.out).resolve()
    if config.main_defaults is None:  # a sweep continued runs its trials as it began them
        config.main_defaults = _saved_setting(out, "main_defaults") if (out / "config.json").is_file() \
            else main_defaults()
    config.validate()
    if (out / "tune").exists() and not trust:
        raise ValueError(f"{out} holds a started sweep; Tune's saved state is pickled and runs code as it loads: "
                         "continue it with --trust-sweep (only for a sweep folder you made or trust)")
    lock = claim_output(out, kind="sweep", config=config, free=("out", "workers", "address"),
                        outputs=("results.json", "results.md", "front.png"))
    try:
        return _sweep(config, out, log)
    finally:
        lock.release()


def _sweep(config: SweepConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    ray = connect(workers=config.workers, cpus=config.threads, address=config.address)
    from ray import tune

    try:
        trainable = tune.with_resources(tune.with_parameters(_trial, config=config, out=str(out)),
                                        {"cpu": config.threads})
        path = out / "tune"
        if tune.Tuner.can_restore(str(path)):
            log(f"continuing the sweep in {out}")
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
        else:
            space: dict[str, Any] = {name: tune.grid_search(values) for name, values in config.grid.items()}
            search_alg = None
            if config.search:
                from ray.tune.search.optuna import OptunaSearch

                space.update({name: _distribution(name, spec) for name, spec in config.search.items()})
                search_alg = OptunaSearch(seed=int(config.settings.get("seed", 0)))
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(num_samples=config.trials if config.search else 1, search_alg=search_alg,
                                            metric="best_reward", mode="max"),
                run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=TASK_RETRIES)))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    # A trial ends with its report or an error; Tune stops on a Ctrl-C with others unfinished (or not begun).
    ended = [r for r in grid if r.error is not None or "test_accuracy" in (r.metrics or {})]
    planned = (config.trials if config.search else 1) * len(_grid_points(config.grid))
    if len(ended) < planned:
        raise SweepInterrupted(f"{len(ended)} of {planned} trials ended")

    trials, failed = [], []
    for result in ended:
        params = {k: v for k, v in (result.config or {}).items()}
        if result.error is not None:
            failed.append({"params": params, "error": f"{type(result.error).__name__}: {result.error}"})
            continue
        trials.append({"params": params, **{k: result.metrics[k] for k in (*METRICS, "run_dir")
                                            if k in result.metrics}})
    trials.sort(key=lambda t: (t["flops_ratio"], -t["test_accuracy"]))
    results = {"config": dataclasses.asdict(config), "trials": trials, "failed": failed,
               "seconds": time.perf_counter() - started}
    front_plot(trials, out / "front.png")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown_table(trials, failed) + "\n")
    write_json(out / "results.json", results)
    log(markdown_table(trials, failed))
    log(f"written to {out}/results.json, results.md, front.png")
    return results


def _front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials no other trial beats at once in test accuracy and FLOPs ratio."""
    front, best = [], -math.inf
    for t in sorted(trials, key=lambda t: (t["flops_ratio"], -t["test_accuracy"])):
        if t["test_accuracy"] > best:
            best = t["test_accuracy"]
            front.append(t)
    return front


def markdown_table(trials: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    """One row per trial, by FLOPs ratio; trials on the accuracy/FLOPs front marked."""
    on_front = {id(t) for t in _front(trials)}
    lines = ["| trial | test acc % | FLOPs ratio | b64 latency ratio | uniform at its FLOPs % | best reward | front |",
             "|---|---:|---:|---:|---:|---:|:-:|"]
    for t in trials:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(t["params"].items()))
        uniform = t.get("uniform_test_accuracy")
        lines.append(f"| {params} | {100 * t['test_accuracy']:.2f} | {t['flops_ratio']:.3f} | "
                     f"{t['latency_ratio_b64']:.3f} | {'-' if uniform is None else f'{100 * uniform:.2f}'} | "
                     f"{t['best_reward']:.4f} | {'*' if id(t) in on_front else ''} |")
    for f in failed:
        lines.append(f"\nFailed (run the sweep again to retry): {f['params']}: {f['error']}")
    return "\n".join(lines)


def front_plot(trials: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against FLOPs ratio, one point per trial, the front drawn through it. PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    xs = np.array([t["flops_ratio"] for t in trials])
    ys = np.array([100 * t["test_accuracy"] for t in trials])
    ax.scatter(xs, ys, color="tab:blue", label="trial (RL)")
    uniform = [(t["flops_ratio"], 100 * t["uniform_test_accuracy"]) for t in trials if "uniform_test_accuracy" in t]
    if uniform:
        ax.scatter(*zip(*uniform, strict=True), marker="x", color="tab:orange", label="uniform L1 at the trial's FLOPs")
    front = _front(trials)
    if front:
        ax.step([t["flops_ratio"] for t in front], [100 * t["test_accuracy"] for t in front], where="post",
                color="grey", ls="--", lw=1, label="front")
    ax.set_xlabel("FLOPs ratio (pruned / dense)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
