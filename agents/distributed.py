"""Many jobs at once on Ray: a graph of tasks on a Ray started in this process or on a cluster.

Ray is an optional dependency (the ``distributed`` extra); everything that needs it asks for it
through ``require_ray``, which names the extra when Ray is missing. The comparison's cells
(``prunegym.agents.compare``) run through ``run_graph``: every task runs after the preparation of
its group (a seed's base model and supernet, trained once) and after the task it names as its
predecessor; tasks go to Ray as CPUs free up, in the order of the keys, and results come back to
this process, which records each as it arrives, so an interrupted graph has its first groups
whole and continues from what was recorded. A task that raises or whose worker dies is
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
    is in ``keys``. Tasks go to Ray only as CPUs free up, the first runnable ones in the order of
    ``keys`` (and a group's preparation when its first key comes up), so the keys finish about in
    that order: a long graph stopped halfway has its first groups whole. ``finished(key, result)`` is
    called here, in this process, as each task completes. ``workers``: the size of a Ray started
    here, in tasks at once; ``address``: a running cluster to join instead, whose CPUs say how many
    run at once. ``prepare`` and ``run`` must be importable module-level functions. Returns the keys
    that failed after their retries, each with its error; the other keys are finished.
    """
    if not address and workers < 1:
        raise ValueError(f"workers must be >= 1 for a local Ray, got {workers}")
    ray = connect(workers=workers, cpus=cpus, address=address)
    try:
        options = {"num_cpus": cpus, "max_retries": TASK_RETRIES, "retry_exceptions": True}
        prepare_task = ray.remote(prepare).options(**options)
        run_task = ray.remote(run).options(**options)
        shared = ray.put(context)
        wanted = set(keys)
        preparations: dict[Hashable, Any] = {}  # group -> the ref of its preparation, once submitted
        prepared: set[Hashable] = set()  # the groups whose preparation finished
        done: set[Hashable] = set()
        failed: dict[Hashable, str] = {}
        group_failed: dict[Hashable, str] = {}
        pending: dict[Any, tuple[str, Hashable]] = {}  # ref -> ("prepare", group) or ("run", key)
        waiting = list(keys)

        def slots() -> int:
            return max(1, int(ray.cluster_resources().get("CPU", 0)) // cpus)

        def fill() -> None:
            """Submit the first runnable keys (and preparations) in order until every slot is taken."""
            limit = slots()
            for key in list(waiting):
                if len(pending) >= limit:
                    return
                name, before = group(key), after(key)
                if name in group_failed:
                    failed[key] = group_failed[name]
                elif before in failed:
                    failed[key] = f"after {before} failed"
                elif name not in prepared:
                    if name not in preparations:
                        preparations[name] = prepare_task.remote(shared, name)
                        pending[preparations[name]] = ("prepare", name)
                    continue
                elif before in wanted and before not in done:
                    continue
                else:
                    # the preparation's ref: each task reads its result from the object store
                    pending[run_task.remote(shared, preparations[name], key)] = ("run", key)
                waiting.remove(key)

        fill()
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            kind, name = pending.pop(ready)
            try:
                result = ray.get(ready)
            except ray.exceptions.RayError as err:
                (group_failed if kind == "prepare" else failed)[name] = _reason(err)
            else:
                if kind == "prepare":
                    prepared.add(name)
                else:
                    done.add(name)
                    finished(name, result)
            fill()
        for key in waiting:  # none: some waiting key is runnable whenever nothing runs
            failed[key] = "never ran: its predecessor did not finish"
        return failed
    finally:
        ray.shutdown()
