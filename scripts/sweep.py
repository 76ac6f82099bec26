"""Run many train.py jobs with Ray Tune: a grid over its settings (λ, budgets, seeds, algorithms) or
an Optuna search over the agent's hyper-parameters, then one table and one plot of test accuracy
against FLOPs over all trials (the front that λ or the budget traces).

    python scripts/sweep.py --set flops_target=none --grid lam=0.5,1,2 --grid seed=0,1 --workers 2
    python scripts/sweep.py --set flops_target=0.2 --search learning_rate=loguniform:1e-4:3e-3 --trials 8

Each trial is a train.py run in <out>/runs/; run the same command again with --trust-sweep to continue
an interrupted sweep (finished trials are kept). Needs the distributed extra: pip install -e ".[distributed]".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prunegym.agents.cli import failure_status, interrupted_status, train_setting
from prunegym.agents.config import RunDirError, field_docs
from prunegym.agents.distributed import MissingExtraError
from prunegym.agents.sweep import DISTRIBUTIONS, SweepConfig, sweep


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip().replace("-", "_"), value.strip()


def _setting(text: str) -> tuple[str, object]:
    name, value = _pair(text)
    return name, train_setting(name, value)


def _grid(text: str) -> tuple[str, list]:
    name, values = _pair(text)
    return name, [train_setting(name, v) for v in values.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(SweepConfig)
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                        help=f"{docs['settings']}; repeat for more (names as train.py's flags: lam, flops_target, ...)")
    parser.add_argument("--grid", type=_grid, action="append", default=[], metavar="NAME=V1,V2,...",
                        help=f"{docs['grid']}; repeat for more")
    parser.add_argument("--search", type=_pair, action="append", default=[], metavar="NAME=DISTRIBUTION",
                        help=f"{docs['search']}: one of {', '.join(DISTRIBUTIONS)}, as loguniform:1e-4:1e-2 or "
                             "choice:64|128 (a name that is not a train.py setting is an agent hyper-parameter); "
                             "trials maximise the search's best reward")
    parser.add_argument("--trust-sweep", action="store_true",
                        help="continue the sweep already in --out: Tune's saved state is pickled and runs code as it "
                             "loads, so only for a sweep folder you made or trust")
    for name in ("trials", "out", "workers", "address", "threads"):
        default = getattr(SweepConfig, name) if name in SweepConfig.__dataclass_fields__ else None
        parser.add_argument(f"--{name}", type=type(default), default=default,
                            help=f"{docs[name]} (default: {default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = None
    try:
        for option in ("set", "grid", "search"):
            names = [name for name, _ in getattr(args, option)]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"--{option} names {repeated} more than once")
        config = SweepConfig(settings=dict(args.set), grid=dict(args.grid), search=dict(args.search),
                             trials=args.trials, out=args.out, workers=args.workers, address=args.address,
                             threads=args.threads)
        results = sweep(config, trust=args.trust_sweep)
    except (ValueError, FileNotFoundError, RunDirError, MissingExtraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = Path(config.out) if config is not None and config.out else None
        if out is None or not (out / "tune").is_dir():
            return interrupted_status(None, "trial", out)
        done = len(list((out / "runs").glob("*/report.json")))
        return interrupted_status(done, "trial", out / "runs", _continue(out), ", the others' checkpoints too")
    return failure_status(results["failed"], "trial", " " + _continue(Path(config.out)))


def _continue(out: Path) -> str:
    """What to add to the command to continue the sweep in ``out`` (its default --out is new every time)."""
    return f"with --out {out} --trust-sweep"


if __name__ == "__main__":
    sys.exit(main())
