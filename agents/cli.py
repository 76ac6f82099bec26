"""Argument types the command-line scripts share (``scripts/`` is never imported, so they live here)."""

from __future__ import annotations

import argparse
import json

__all__ = ["optional_int", "optional_float", "json_dict"]


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
