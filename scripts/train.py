"""Train a pruning agent and report the pruned model beside the dense one and a uniform baseline.

With no arguments: the digits CNN on the distorted digits (made from scikit-learn's bundled ones), PPO,
at most 20% of the dense model's FLOPs, about a minute on a CPU. `--env input` learns a mask per input
instead (InputPruning-v0) and reports the gate baseline beside it. Results land in
runs/<env>__<model>__<dataset>__<seed>__<time>/; watch them with `tensorboard --logdir runs`.
Continue an interrupted run with `--run-dir DIR --resume`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

from prunegym.agents import ALGORITHMS, RunDirError, TrainConfig, train
from prunegym.agents.cli import train_setting
from prunegym.agents.config import ENVS, field_docs, resolve_given, resume_config
from prunegym.agents.factory import POLICY_STARTS
from prunegym.compression import IMPORTANCES
from prunegym.compression.metrics import keep_freed_memory
from prunegym.compression.supernet import SUPERNET_SAMPLING
from prunegym.envs import DENSITY_KINDS, REWARD_MODELS, TASK_LOSSES


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS if suppress_defaults else None)
    docs = field_docs(TrainConfig)
    choices = {"env": list(ENVS), "algo": sorted(ALGORITHMS), "density": list(DENSITY_KINDS),
               "importance": sorted(IMPORTANCES), "reward_model": list(REWARD_MODELS),
               "task_loss": list(TASK_LOSSES),
               "supernet_sampling": list(SUPERNET_SAMPLING), "policy_start": list(POLICY_STARTS)}
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = f"--{f.name.replace('_', '-')}"
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS if suppress_defaults else default, help=help_text)
            continue
        parser.add_argument(flag, type=functools.partial(train_setting, f.name), choices=choices.get(f.name),
                            default=argparse.SUPPRESS if suppress_defaults else default, help=help_text)
    parser.add_argument("--resume", action="store_true", default=argparse.SUPPRESS if suppress_defaults else False,
                        help="continue the run in --run-dir from its latest checkpoint (timesteps keep counting)")
    parser.add_argument("--trust-run", action="store_true", default=argparse.SUPPRESS if suppress_defaults else False,
                        help="with --resume: load the checkpoint's pickled parts as they are, even those that could "
                             "run code (only for a run directory from a source you trust)")
    parser.add_argument("--progress-bar", action=argparse.BooleanOptionalAction,
                        help="show SB3's progress bar (default: when the terminal is interactive)")
    return parser


_RESUME_FLAGS = {"run_dir", "timesteps", "device", "resume", "progress_bar", "trust_run"}


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # latency as a deployment sees it: freed buffers are not unmapped and faulted in again
    args = vars(build_parser().parse_args(argv))
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))  # only what the user typed
    resume = args.pop("resume")
    trust_run = args.pop("trust_run")
    progress = args.pop("progress_bar")
    progress = sys.stderr.isatty() if progress is None else progress
    config = None
    try:
        if resume:
            ignored = sorted(set(given) - _RESUME_FLAGS)
            if ignored:
                flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
                raise ValueError(f"--resume continues the run's saved configuration; {flags} cannot change it "
                                 "(only --timesteps, to extend the search, and --device may be given)")
            if "run_dir" not in given:
                raise ValueError("--resume needs --run-dir, the run to continue")
            config = resume_config(given["run_dir"], timesteps=given.get("timesteps"), device=given.get("device"))
        else:
            config = TrainConfig(**args)
            resolve_given(config, given)
        if trust_run and not resume:
            raise ValueError("--trust-run applies to the checkpoint --resume loads; it needs --resume")
        train(config, resume=resume, progress_bar=progress, trust_run=trust_run)
    except (ValueError, FileNotFoundError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        run_dir = Path(config.run_dir) if config is not None and config.run_dir else None
        if run_dir is not None and (run_dir / "checkpoints" / "state.json").is_file():
            print(f"\ninterrupted; the latest checkpoint is in {run_dir / 'checkpoints'}. Continue with:\n"
                  f"  python scripts/train.py --run-dir {run_dir} --resume", file=sys.stderr)
        else:
            print("\ninterrupted before the search saved a checkpoint; nothing to resume"
                  + (f" (remove {run_dir} to start again)" if run_dir is not None and run_dir.exists() else ""),
                  file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
