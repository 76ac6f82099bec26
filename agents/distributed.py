"""Many jobs at once on Ray: a graph of tasks on a Ray started in this process or on a cluster.

Ray is an optional dependency (the ``distributed`` extra); everything that needs it asks for it
through ``require_ray``, which names the extra when Ray is missing. The comparison's cells
(``prunegym.agents.compare``) run through ``run_graph``: every task runs after the preparation of
its group (a seed's base model and supernet, trained once) and after the task it names as its
predecessor; results come back to this process, which records each as it arrives, so an
interrupted graph continues from what was recorded. A task that raises or whose worker dies is
retried; one that keeps failing is returned with its error, and the others still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

__all__ = ["MissingExtraError", "TASK_RETRIES", "require_ray", "check_placement", "connect", "run_graph"]

TASK_RETRIES = 2
"""times a failed task runs again (its worker died, its node was lost, or it raised) before it is
reported as failed"""


class MissingExtraError(ImportError):
    """An optional dependency that a requested feature needs is not installed."""


def require_ray(feature: str):
    """The ``ray`` module; a ``MissingExtraError`` that names the extra to install when it is missing."""
    try:
        import ray
    except ImportError as err:
        raise MissingExtraError(f"{feature} need Ray, which is not installed: "
                                "pip install -e '.[distributed]' (or pip install 'ray[tune]')") from err
    return ray


def check_placement(*, workers: int, threads: int, address: str, what: str) -> None:
    """Refuse settings of where jobs run that cannot hold: ``workers`` jobs at once of ``threads``
    CPUs each on a Ray started here (0: none started), or a cluster at ``address``, not both."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers and address:
        raise ValueError(f"workers={workers} sizes a Ray started here; with address={address!r} the cluster's CPUs "
                         f"decide how many {what} run at once: give one of the two")


def connect(*, workers: int, cpus: int, address: str):
    """Start a local Ray of ``workers`` x ``cpus`` CPUs, or join the cluster at ``address``; the ``ray`` module."""
    ray = require_ray("Ray tasks")
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:  # always a new local Ray, even where RAY_ADDRESS names a running one
        ray.init(address="local", num_cpus=max(workers, 1) * cpus, **quiet)
    return ray


def _run(run: Callable[[Any, Any, Any], Any], context: Any, prepared: Any, key: Any, *predecessor: Any) -> Any:
    return run(context, prepared, key)  # the predecessor's result only orders the tasks


def _reason(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")


def run_graph(keys: Sequence[Hashable], *, context: Any, prepare: Callable[[Any, Any], Any],
              group: Callable[[Hashable], Hashable], run: Callable[[Any, Any, Hashable], Any],
              after: Callable[[Hashable], Hashable | None],
              finished: Callable[[Hashable, Any], None], cpus: int = 1, workers: int = 0,
              address: str = "") -> dict[Hashable, str]:
    """Run ``run(context, prepare(context, group(key)), key)`` for every key as a Ray task of
    ``cpus`` CPUs.

    ``context`` goes to every task (once into Ray's object store). ``prepare`` runs once per
    group, before that group's tasks, and its result is passed to each of them (through the object
    store, so to other machines too). A key runs after the key ``after(key)`` names, when that one
    is in ``keys``. ``finished(key, result)`` is called here, in this process, as each task
    completes. ``workers``: the size of a Ray started here, in tasks at once; ``address``: a
    running cluster to join instead. ``prepare`` and ``run`` must be importable module-level
    functions. Returns the keys that failed after their retries, each with its error; the other
    keys are finished.
    """
    if not address and workers < 1:
        raise ValueError(f"workers must be >= 1 for a local Ray, got {workers}")
    ray = connect(workers=workers, cpus=cpus, address=address)
    try:
        options = {"num_cpus": cpus, "max_retries": TASK_RETRIES, "retry_exceptions": True}
        prepare_task = ray.remote(prepare).options(**options)
        run_task = ray.remote(_run).options(**options)
        wanted = set(keys)
        shared = ray.put(context)
        prepared: dict[Hashable, Any] = {}
        refs: dict[Hashable, Any] = {}

        def submit(key: Hashable) -> Any:
            if key not in refs:
                before = after(key)
                predecessor = [submit(before)] if before in wanted else []
                name = group(key)
                if name not in prepared:
                    prepared[name] = prepare_task.remote(shared, name)
                refs[key] = run_task.remote(run, shared, prepared[name], key, *predecessor)
            return refs[key]

        for key in keys:
            submit(key)
        pending = {ref: key for key, ref in refs.items()}
        failed: dict[Hashable, str] = {}
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready)
            try:
                result = ray.get(ready)
            except ray.exceptions.RayError as err:
                before = after(key)
                failed[key] = f"after {before} failed" if before in failed else _reason(err)
                continue
            finished(key, result)
        return failed
    finally:
        ray.shutdown()
