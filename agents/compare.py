"""The comparison harness (``scripts/compare.py``): every method on the same model, data, FLOPs
budget and fine-tune, over seeds, in one table and one plot.

For each seed: the dense model, int8 (PyTorch's per-channel post-training quantization), the
mean-centred weight-only int8, and the per-input job (RL per-input and the gate baseline, which
choose their own density through λ). For each seed and FLOPs budget: RL per-layer (budget mode),
RL per-layer + int8, uniform L1, global L1 and L2, network slimming, random channels at the RL
policy's per-layer counts, torch-pruning's magnitude pruner, unstructured magnitude pruning (AGP)
and a reduced-width student trained with knowledge distillation.

The output folder holds ``config.json`` (first), ``cells/`` (one JSON per method, budget and seed,
written as each finishes: a rerun with the same ``--out`` and settings picks up where it stopped),
``runs/`` (the RL run directories), ``tb/`` (TensorBoard hparams, one run per table row), and,
written last, ``results.json``, ``results.md`` and ``pareto.png``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunegym.compression.checkpoint import atomic_path, read_json, write_json
from prunegym.compression.importance import IMPORTANCES
from prunegym.compression.metrics import (
    keep_freed_memory,
    num_threads,
)
from prunegym.compression.models import MODELS
from prunegym.compression.supernet import SUPERNET_SAMPLING
from prunegym.compression.training import (
    BASE_EPOCHS,
    cache_dir,
    cache_key,
    check_seed,
    resolve_device,
)
from prunegym.envs import TASK_LOSSES

from .compare_table import format_table, markdown_table, pareto_plot, summarize, write_hparams
from .config import BEFORE_THEY_EXISTED
from .distributed import check_placement, require_ray, run_graph
from .factory import ALGORITHMS, check_hyperparameters, check_policy_start
from .job import add_ratios, claim_output
from .methods import METHODS, SeedState, check_row

__all__ = ["CompareConfig", "cells_dir", "compare", "finished_table"]


@dataclass
class CompareConfig:
    """Settings of a comparison, written once to ``config.json``."""

    model: str = "digits_cnn"
    """zoo name (digits_cnn, resnet20, resnet56, vgg_small) or ``package.module:factory``"""
    dataset: str = "digits"
    """``digits``, ``digits_distorted`` (built in, harder), ``mnist:PATH``, ``cifar10:PATH`` or ``npz:PATH``"""
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5])
    """FLOPs budgets, as fractions of the dense model's FLOPs"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """seeds of the data split, base model, agents and fine-tunes; the table gives mean ± std over them"""
    finetune_epochs: int = 40
    """fine-tune epochs after pruning, the same for every method (the KD student trains from scratch
    for the base model's epochs; slimming's sparsity training comes on top)"""
    finetune_lr: float = 5e-4
    """learning rate of every fine-tune"""
    out: str = ""
    """the output folder; empty: ``runs/compare__<model>__<dataset>``"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """which methods to run (dense always runs)"""
    algo: str = "ppo"
    """the SB3 algorithm of the RL per-layer search"""
    layer_timesteps: int | None = None
    """timesteps of each RL per-layer search (default: the main job's, 6000)"""
    layer_hyperparameters: dict[str, Any] = field(default_factory=dict)
    """overrides of the RL per-layer agent's default hyper-parameters (``train.py --hyperparameters``),
    as a JSON object"""
    input_timesteps: int | None = None
    """timesteps of each RL per-input search (default: the per-input job's, 200000)"""
    supernet_epochs: int = 20
    """RL per-layer, random search and uniform-from-supernet: epochs of the weight-sharing supernet they
    search and prune from (``train.py --supernet-epochs``); 0: the dense model (and no
    uniform_supernet row)"""
    reward_model: str = "supernet"
    """RL per-layer and random search: the model their reward scores candidates on, ``supernet`` or
    ``dense`` (``train.py --reward-model``)"""
    task_loss: str = "error"
    """RL per-layer and random search: the task loss of their reward, ``error`` (the reward split's error
    rate, ``train.py``'s default) or ``cross_entropy`` (``train.py --task-loss``)"""
    refit_head: bool = False
    """RL per-layer and random search: their reward re-fits each candidate's classifier to its features
    of the BN-recalibration batches first (``train.py --refit-head``)"""
    supernet_sampling: str = "uniform"
    """the supernet's widths (``train.py --supernet-sampling``): ``uniform``, one supernet per seed, or
    ``budget``, one per seed and budget, trained on the candidates at that budget"""
    importance: str = "group_l1"
    """RL per-layer, random search and uniform-from-supernet: the criterion that puts the channels in order
    before the supernet trains, or with ``supernet_epochs`` 0 ranks those RL and random search keep of the
    dense model (``train.py --importance``); the static methods keep their own"""
    min_keep: float = 0.25
    """RL per-layer, random search and the supernet: the smallest keep ratio of a group the search may choose,
    and the narrowest width the supernet trains (``train.py --min-keep``)"""
    policy_start: str = "middle"
    """RL per-layer: where its first policy centres its actions, ``middle`` or ``uniform`` (the uniform
    widths at the budget; ``train.py --policy-start``)"""
    finalists: int = 0
    """RL per-layer and random search: fine-tune the search's this many best allocations by reward and keep
    the lowest task loss on the reward split, the reward's (``train.py --finalists``); 0: keep the best reward"""
    input_lam: float = 2.0
    """λ of the per-input search: its density is the agent's choice, not a budget"""
    distill: bool = False
    """fine-tune every pruned model with knowledge distillation from the dense model"""
    slimming_strength: float = 1e-4
    """network slimming's L1 penalty on BN scales, per unit of |γ|"""
    base_epochs: int = BASE_EPOCHS
    """epochs of the dense base model (cached), and of the KD student"""
    device: str = "auto"
    """where training runs: auto, cpu, cuda; latency is always timed on the CPU"""
    threads: int = 1
    """CPU threads of each cell, for its training and its latency measurements (fixed, so that a cell's
    result does not depend on how many cells run at once; a Ray task asks for this many CPUs)"""
    workers: int = 0
    """cells at once, as tasks on a Ray started in this process (the ``distributed`` extra); 0: one
    after another in this process"""
    address: str = ""
    """a Ray cluster to run the cells on instead (``auto``, or ``HOST:PORT`` of its head); its CPUs
    set how many run at once"""

    def validate(self) -> None:
        if ":" not in self.model and self.model not in MODELS:
            raise ValueError(f"model {self.model!r} is unknown; expected one of {sorted(MODELS)} "
                             "or 'package.module:factory'")
        if not self.budgets:
            raise ValueError("budgets must name at least one FLOPs budget")
        for b in self.budgets:
            if not isinstance(b, int | float) or not 0 < b < 1:
                raise ValueError(f"budget {b!r} is not a FLOPs fraction in (0, 1)")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets {self.budgets} repeat a value")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be one or more distinct integers, got {self.seeds}")
        for seed in self.seeds:
            check_seed(seed, "seed")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; expected some of {list(METHODS)}")
        if self.task_loss not in TASK_LOSSES:
            raise ValueError(f"task_loss {self.task_loss!r} is unknown; expected one of {TASK_LOSSES}")
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo {self.algo!r} is unknown; expected one of {sorted(ALGORITHMS)}")
        check_hyperparameters(self.algo, self.layer_hyperparameters)
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance {self.importance!r} is unknown; expected one of {sorted(IMPORTANCES)}")
        if self.supernet_sampling not in SUPERNET_SAMPLING:
            raise ValueError(f"supernet_sampling {self.supernet_sampling!r} is unknown; expected one of "
                             f"{SUPERNET_SAMPLING}")
        if self.supernet_sampling == "budget" and not self.supernet_epochs:
            raise ValueError("supernet_sampling 'budget' trains a supernet per budget; it needs supernet_epochs > 0")
        if "uniform_supernet" in self.methods and not self.supernet_epochs:
            raise ValueError("method uniform_supernet prunes RL's supernet; it needs supernet_epochs > 0 "
                             "(or leave uniform_supernet out of the methods)")
        if not isinstance(self.min_keep, int | float) or not 0 < self.min_keep <= 1:
            raise ValueError(f"min_keep must be in (0, 1], got {self.min_keep!r}")
        check_policy_start(self.policy_start, self.algo)
        for name in ("finetune_epochs", "base_epochs", "supernet_epochs", "finalists"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("layer_timesteps", "input_timesteps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_placement(workers=self.workers, threads=self.threads, address=self.address, what="cells")
        if self.workers or self.address:
            require_ray("--workers and --address")
        for name in ("finetune_lr", "input_lam", "slimming_strength"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "finetune_lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'finetune_lr' else '>= 0'}, "
                                 f"got {value}")
        resolve_device(self.device)

    def default_out(self) -> str:
        model = self.model.replace(":", ".").replace("/", "_")
        return str(Path("runs") / f"compare__{model}__{self.dataset.split(':')[0]}")


# ---- the harness --------------------------------------------------------------------------------
def _cells(config: CompareConfig) -> list[tuple[str, float | None, int]]:
    methods = ["dense"] + [m for m in config.methods if m != "dense"]
    cells = []
    for seed in config.seeds:
        for method in methods:
            if METHODS[method].per_budget:
                cells += [(method, float(b), seed) for b in config.budgets]
            else:
                cells.append((method, None, seed))
    return cells


def cells_dir(out: str | Path) -> Path:
    """Where the comparison in ``out`` keeps its finished cells, one JSON file each."""
    return Path(out) / "cells"


def _cell_path(out: Path, method: str, budget: float | None, seed: int) -> Path:
    return cells_dir(out) / f"{method}__{'-' if budget is None else f'b{budget:g}'}__s{seed}.json"


def _read_cell(path: Path, method: str, budget: float | None, seed: int) -> dict[str, Any]:
    """A finished cell, checked: it must be this cell's result, with every measure in range."""
    row = read_json(path)
    hint = "; delete the file to compute the cell again"
    if not isinstance(row, dict):
        raise ValueError(f"{path} is not a cell (expected a JSON object){hint}")
    for key, expected in (("method", method), ("budget", budget), ("seed", seed)):
        if row.get(key) != expected:
            raise ValueError(f"{path} holds {key}={row.get(key)!r}, not this cell's {expected!r}{hint}")
    try:
        check_row(row, str(path))
    except ValueError as err:
        raise ValueError(f"{err}{hint}") from err
    return row


_HOW = ("out", "device", "workers", "address", "methods", "budgets", "seeds")
"""settings that say where and how the cells run, or which cells, not what a cell computes: a comparison
continues under others, and grows by methods, budgets or seeds with the cells it has"""


def compare(config: CompareConfig, *, progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``config`` (reusing cells already in ``config.out``); return the results."""
    config.validate()
    config.out = config.out or config.default_out()
    resolve_device(config.device)
    started = time.perf_counter()
    lock = claim_output(Path(config.out), kind="comparison", config=config, free=_HOW,
                        outputs=("results.json", "results.md", "pareto.png"), before_they_existed=BEFORE_THEY_EXISTED)
    try:
        return _compare(config, Path(config.out), started, progress=progress, log=log)
    finally:
        lock.release()


Cell = tuple[str, float | None, int]
"""(method, budget or None, seed)"""


def _after(config: CompareConfig, cell: Cell) -> Cell | None:
    """The cell whose run ``cell`` reuses, when its method is compared too (it must finish first)."""
    method, budget, seed = cell
    before = METHODS[method].after
    if before is None or before not in config.methods:
        return None
    return before, (budget if METHODS[before].per_budget else None), seed


def _prepare_seed(config: CompareConfig, seed: int) -> SeedState:
    """The seed's shared state, its base model trained (or read from the cache), and its supernet
    too when a compared method prunes from it, so that no two cells train them at once."""
    with num_threads(config.threads):
        state = SeedState(config, seed, resolve_device(config.device))
        if config.supernet_epochs and any(METHODS[m].supernet for m in config.methods):
            for budget in config.budgets:  # one supernet, or one per budget
                state.supernet(budget)
    return state


def _run_cell(config: CompareConfig, state: SeedState, out: Path, cell: Cell) -> dict[str, Any]:
    method, budget, seed = cell
    t0 = time.perf_counter()
    with num_threads(config.threads):
        result = METHODS[method].run(state, out, budget)
    return {"method": method, "budget": budget, "seed": seed, **result, "seconds": time.perf_counter() - t0}


def _cached_files(config: CompareConfig, state: SeedState) -> dict[str, bytes]:
    """The seed's base model and supernets as files of the model cache, relative to it."""
    root = cache_dir()
    key = cache_key(config.model, state.splits, state.seed, config.base_epochs)
    paths = [root / "base" / f"{key}.pt", *sorted((root / "supernet").glob(f"{key}__*.pt"))]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths if p.is_file()}


def _prepare_task(context: tuple[CompareConfig, str], seed: int) -> dict[str, bytes]:
    """A Ray task: train (or read) one seed's base model and supernet; return their cache files,
    which the seed's cells install where they run (another machine's cache, perhaps)."""
    config, _ = context
    return _cached_files(config, _prepare_seed(config, seed))


def _cell_task(context: tuple[CompareConfig, str], files: dict[str, bytes], cell: Cell) -> dict[str, Any]:
    """A Ray task: one cell, on the seed's base model and supernet from ``_prepare_task``."""
    config, out = context
    keep_freed_memory()  # this worker times models for the comparison, as compare.py's own process does
    root = cache_dir()
    for name, data in files.items():
        if not (root / name).is_file():
            with atomic_path(root / name) as tmp:
                Path(tmp).write_bytes(data)
    state = SeedState(config, cell[2], resolve_device(config.device))  # the supernet is read only if it is used
    return _run_cell(config, state, Path(out), cell)


def _compare(config: CompareConfig, out: Path, started: float, *, progress: bool,
             log: Callable[[str], None]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    cells = _cells(config)
    rows: dict[Cell, dict[str, Any]] = {}
    for cell in cells:
        if _cell_path(out, *cell).is_file():
            rows[cell] = _read_cell(_cell_path(out, *cell), *cell)
    todo = [cell for cell in cells if cell not in rows]
    bar = tqdm(total=len(cells), initial=len(rows), desc="compare", disable=not progress, unit="cell")

    def finished(cell: Cell, row: dict[str, Any]) -> None:
        write_json(_cell_path(out, *cell), row)
        rows[cell] = row
        bar.update()
        (bar.write if progress else log)(
            f"{METHODS[cell[0]].label:<22} budget {'-' if cell[1] is None else cell[1]:<5} seed {cell[2]}: "
            f"accuracy {row['test_accuracy']:.4f}, FLOPs {row['flops']:,.0f}, {row['seconds']:.1f} s")

    failed: dict[Cell, str] = {}
    if todo and (config.workers or config.address):
        failed = run_graph(todo, context=(config, str(out)), prepare=_prepare_task, group=lambda cell: cell[2],
                           run=_cell_task, after=lambda cell: _after(config, cell), finished=finished,
                           cpus=config.threads, workers=config.workers, address=config.address)
    else:
        state: SeedState | None = None
        for cell in todo:
            bar.set_postfix_str(f"{cell[0]} b={cell[1]} seed={cell[2]}")
            if state is None or state.seed != cell[2]:
                state = None  # one seed at a time: the previous seed's models can go
                state = _prepare_seed(config, cell[2])
            finished(cell, _run_cell(config, state, out, cell))
    bar.close()
    return _results(config, out, [rows[c] for c in cells if c in rows], failed, started, log)


def _with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the seeds whose dense cell is among them, each with its costs as ratios to that dense model."""
    dense_by_seed = {r["seed"]: r for r in rows if r["method"] == "dense"}
    rows = [r for r in rows if r["seed"] in dense_by_seed]  # the ratios need the seed's dense model
    for r in rows:
        d = dense_by_seed[r["seed"]]
        add_ratios(r, d)
        r["bytes_ratio"] = r["bytes"] / d["bytes"]
        if "nonzero_flops" in r:
            r["nonzero_flops_ratio"] = r["nonzero_flops"] / d["flops"]
    return rows


def _results(config: CompareConfig, out: Path, rows: list[dict[str, Any]], failed: dict[Cell, str],
             started: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The table, ``results.json``, ``results.md``, the Pareto plot and the hparams from the cells."""
    rows = _with_ratios(rows)
    table = summarize(rows)
    failures = [{"method": m, "budget": b, "seed": s, "error": error} for (m, b, s), error in failed.items()]
    notes = _notes(config) + "".join(
        f"\nFailed (run again to retry; its seed's rows are left out when it is dense): {f['method']} budget "
        f"{'-' if f['budget'] is None else f['budget']} seed {f['seed']}: {f['error']}" for f in failures)
    results = {"config": dataclasses.asdict(config), "table": table, "rows": rows, "failed": failures,
               "notes": notes, "seconds": time.perf_counter() - started}
    write_hparams(out, table)
    pareto_plot(table, out / "pareto.png", title=f"{config.model} on {config.dataset.split(':')[0]}")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown_table(table) + "\n\n" + notes + "\n")
    write_json(out / "results.json", results)
    log(format_table(table))
    log(f"{notes}\nwritten to {out}/results.json, results.md, pareto.png")
    return results


def finished_table(out: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The table of the cells the comparison in ``out`` has finished so far, as its final table would give
    them (``compare.py --table-only``): while it runs (no lock is taken) or after it stopped. Reads only;
    writes nothing. The grid is the one of the folder's ``config.json``; a seed whose dense cell has not
    finished is left out, as the ratios need it. Returns ``table``, ``rows``, ``finished`` and ``cells``
    (how many of the grid's cells are done)."""
    out = Path(out)
    if not (out / "config.json").is_file():
        raise FileNotFoundError(f"{out} holds no comparison (no config.json); give the --out of one")
    known = {f.name for f in dataclasses.fields(CompareConfig)}
    saved = read_json(out / "config.json")["config"]
    # a setting it lacks: what it ran with before the setting existed, else today's default
    config = CompareConfig(**{**BEFORE_THEY_EXISTED, **{k: v for k, v in saved.items() if k in known}})
    cells = _cells(config)
    finished = [_read_cell(_cell_path(out, *cell), *cell) for cell in cells if _cell_path(out, *cell).is_file()]
    rows = _with_ratios(finished)
    table = summarize(rows)
    waiting = sorted({r["seed"] for r in finished} - {r["seed"] for r in rows})
    log(format_table(table))
    log(f"{len(finished)} of {len(cells)} cells finished in {out}"
        + (f"; seeds {waiting} are left out until their dense cell finishes" if waiting else "")
        + ". RL - this pairs the seeds both rows have so far.")
    return {"table": table, "rows": rows, "finished": len(finished), "cells": len(cells)}


def _notes(config: CompareConfig) -> str:
    if config.supernet_epochs:
        training = (f"RL per-layer, random search and uniform-from-supernet are pruned from a supernet trained "
                    f"{config.supernet_epochs} epochs from the base model"
                    + f" (its channels first put in {config.importance} order)"
                    + f" and fine-tuned {config.finetune_epochs} "
                    f"epochs; every other pruned model is fine-tuned {config.finetune_epochs + config.supernet_epochs}"
                    f" epochs, as many since the base model (lr {config.finetune_lr}")
    else:
        training = (f"RL per-layer and random search keep channels in {config.importance} order; "
                    f"every pruned model fine-tuned {config.finetune_epochs} epochs (lr {config.finetune_lr}")
    return (f"Test split; mean ± std over seeds {config.seeds}; {training}"
            + (", distilled from the dense model" if config.distill else "") + "). "
            + ("RL per-layer and random search score an allocation by the "
               + ("supernet's " if config.supernet_epochs and config.reward_model == "supernet"
                  else "soft-masked dense model's ")
               + ("error rate" if config.task_loss == "error" else "cross-entropy") + " on the reward split"
               + (", its classifier first re-fitted to its features of the BN-recalibration batches"
                  if config.refit_head else "") + ". "
               if {"rl_layer", "rl_layer_int8", "random_search"} & set(config.methods) else "")
            + (f"RL per-layer and random search keep at least {config.min_keep:g} of every group"
               + (", the narrowest width the supernet trains" if config.supernet_epochs else "") + ". "
               if config.min_keep != CompareConfig.min_keep else "")
            + ("RL per-layer's first policy proposes the uniform widths at the budget. "
               if config.policy_start != CompareConfig.policy_start else "")
            + (f"RL per-layer and random search each keep, of their {config.finalists} best allocations by reward, "
               f"the one with the lowest reward-split {'error rate' if config.task_loss == 'error' else 'loss'} "
               "once fine-tuned (finalists). " if config.finalists else "")
            + "RL - this: RL per-layer's test accuracy minus the method's, in points, paired over the seeds (same "
            "base model and split), with its 95% confidence interval (Student's t) and the seeds RL won; "
            "RL - this, test loss: the same for the test cross-entropy (negative: RL's is lower), with the "
            "seeds where RL's is lower. "
            + ("Search: the reward of the allocation each search kept, RL per-layer's minus it paired over the "
               "seeds (same env and reward) with the seeds where RL's is higher, and the search's seconds. "
               if {"rl_layer", "random_search"} <= set(config.methods) else "")
            + "FLOPs count 2 per multiply-add (FlopCounterMode); per-input methods give their mean density. "
            f"Latency: median ms on the CPU, {config.threads} thread(s), models in their inference form "
            "(BN folded). Bytes: the state dict as torch.save writes it (int8: int8 weights; unstructured: "
            "nonzero values and a bitmask). Unstructured AGP keeps dense shapes: its FLOPs and latency are the "
            "dense model's; the plot places it at its nonzero FLOPs, hollow.")
