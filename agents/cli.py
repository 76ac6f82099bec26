"""Argument types the command-line scripts share (``scripts/`` is never imported, so they live here)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["optional_int", "optional_float", "json_dict", "train_setting", "failure_status",
           "interrupted_status"]


def _optional(kind: type, name: str):
    def parse(text: str):
        if text.lower() in ("none", ""):
            return None
        try:
            return kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected {name} or 'none', got {text!r}") from err

    return parse


optional_int = _optional(int, "an integer")
optional_float = _optional(float, "a number")


def json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def train_setting(name: str, text: str):
    """A ``TrainConfig`` field's value from its command-line text, as ``train.py --NAME TEXT`` reads
    it; ``argparse.ArgumentTypeError`` naming the value when it is not one."""
    import dataclasses

    from .config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields:
        raise argparse.ArgumentTypeError(f"{name!r} is not a setting of train.py; expected one of {sorted(fields)}")
    f = fields[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind = {"flops_target": optional_float, "latency_target": optional_float, "timesteps": optional_int,
            "num_envs": optional_int, "importance": str, "hyperparameters": json_dict}.get(name, type(default))
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from err


def failure_status(failed: list, what: str, retry: str = "") -> int:
    """A grid's exit status: 0, or 1 with a line on stderr saying how many ``what`` failed and that the
    same command (with ``retry`` added) runs them again."""
    if not failed:
        return 0
    print(f"error: {len(failed)} {what}(s) failed (listed above); run the same command again{retry} to retry them",
          file=sys.stderr)
    return 1


def interrupted_status(done: int | None, what: str, where: object, how: str = "again", also: str = "") -> int:
    """A grid's exit status after Ctrl-C, 130, with a line on stderr saying how many finished ``what`` are kept in
    ``where`` (``also`` adds what else is kept there) and that the same command (``how``) continues from there;
    ``done`` None: nothing was kept to continue from."""
    if done is None:
        print(f"\ninterrupted before any {what} finished; nothing to continue from", file=sys.stderr)
        return 130
    kept = f"1 finished {what} is" if done == 1 else f"{done} finished {what}s are"
    print(f"\ninterrupted; {kept} kept in {where}{also}. Run the same command {how} to continue from there",
          file=sys.stderr)
    return 130
