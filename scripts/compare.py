"""Compare the learned pruning policies with every classic compression method on the same model,
data, FLOPs budgets and fine-tune, over seeds: one table (terminal, JSON, Markdown), one Pareto plot.

With no arguments: the digits CNN on scikit-learn's bundled digits, budgets 0.25 and 0.5 of the
dense FLOPs, seeds 0-4, 40 fine-tune epochs. Results land in runs/compare__<model>__<dataset>/
(or --out); run it again with the same --out to continue an interrupted comparison, or with
--table-only to print the table of the cells finished so far while it runs.
--workers N runs N cells at once on a Ray started in this process; --address auto runs them on a
running Ray cluster (`ray start --head` first); both need the distributed extra.
`tensorboard --logdir <out>` shows the table as hparams and each RL run's rewards.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from prunegym.agents.cli import failure_status, interrupted_status, json_dict, optional_int
from prunegym.agents.compare import CompareConfig, cells_dir, compare, finished_table
from prunegym.agents.config import RunDirError, field_docs
from prunegym.agents.distributed import MissingExtraError
from prunegym.agents.factory import ALGORITHMS, POLICY_STARTS
from prunegym.agents.methods import METHODS
from prunegym.compression.importance import IMPORTANCES
from prunegym.compression.metrics import keep_freed_memory
from prunegym.compression.supernet import SUPERNET_SAMPLING
from prunegym.envs import REWARD_MODELS, TASK_LOSSES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(CompareConfig)
    lists = {"budgets": float, "seeds": int, "methods": str}
    for f in dataclasses.fields(CompareConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = f"--{f.name.replace('_', '-')}"
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{docs.get(f.name, '')} (default: {shown})"
        if f.name in lists:
            parser.add_argument(flag, type=lists[f.name], nargs="+", default=default, help=help_text,
                                choices=list(METHODS) if f.name == "methods" else None,
                                metavar="METHOD" if f.name == "methods" else None)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = optional_int if f.name.endswith("_timesteps") else json_dict if isinstance(default, dict) \
                else type(default)
            parser.add_argument(flag, type=kind, default=default, help=help_text,
                                choices={"algo": sorted(ALGORITHMS), "reward_model": list(REWARD_MODELS),
                                         "task_loss": list(TASK_LOSSES), "importance": sorted(IMPORTANCES),
                                         "supernet_sampling": list(SUPERNET_SAMPLING),
                                         "policy_start": list(POLICY_STARTS)}.get(f.name))
    parser.add_argument("--progress-bar", action=argparse.BooleanOptionalAction,
                        help="show a progress bar over the cells (default: when the terminal is interactive)")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of the cells finished so far in --out (the default --out of --model "
                             "and --dataset when it is not given), with the folder's own settings, while the "
                             "comparison runs or after it stopped; compute and write nothing")
    return parser


def _table_only(parser: argparse.ArgumentParser, args: dict) -> int:
    """``--table-only``: the folder's settings decide the grid, so any other setting given is refused."""
    given = sorted(name for name, value in args.items()
                   if name not in ("out", "model", "dataset") and value != parser.get_default(name))
    if given:
        print(f"error: --table-only reads the settings of the comparison in --out; drop "
              f"{', '.join('--' + name.replace('_', '-') for name in given)}", file=sys.stderr)
        return 2
    out = args["out"] or CompareConfig(model=args["model"], dataset=args["dataset"]).default_out()
    try:
        finished_table(out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # latency as a deployment sees it: freed buffers are not unmapped and faulted in again
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    progress = args.pop("progress_bar")
    if args.pop("table_only"):
        return _table_only(parser, args)
    progress = sys.stderr.isatty() if progress is None else progress
    config = None
    try:
        config = CompareConfig(**args)
        results = compare(config, progress=progress)
    except (ValueError, FileNotFoundError, RunDirError, MissingExtraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        cells = cells_dir(config.out) if config is not None and config.out else None
        done = len(list(cells.glob("*.json"))) if cells is not None and cells.is_dir() else 0
        return interrupted_status(done or None, "cell", cells)
    return failure_status(results["failed"], "cell")


if __name__ == "__main__":
    sys.exit(main())
