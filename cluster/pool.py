"""Sharded actor pools: the Ray runner for plain-Python workers (recdata.runner.Runner).

A worker is any class with `run(task: dict) -> dict`. It knows nothing of Ray, so the same worker runs
in-process (recdata.runner.run_in_process) in unit tests and as an actor here. Tasks are handed out dynamically (a free actor takes the
next task), so uneven shards do not leave actors idle.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

from tqdm.auto import tqdm

from cluster.runtime import init_ray, setup_worker_logging
from configs.logs import progress_enabled


def run_sharded(
    worker_cls: type,
    worker_kwargs: dict[str, Any],
    tasks: list[dict[str, Any]],
    num_actors: int,
    num_cpus_per_actor: float = 1.0,
    num_gpus_per_actor: float = 0.0,
    desc: str = "",
    on_result: Callable[[int, dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `worker_cls(**worker_kwargs).run(task)` for every task on `num_actors` Ray actors.

    Results come back in task order. A failed task raises (with the worker's traceback) after the
    remaining actors are killed: a shard is either committed by its worker or redone on rerun.
    """
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if not tasks:
        return []
    ray = init_ray()
    actor_cls = ray.remote(num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor)(_Host)
    n = min(num_actors, len(tasks))
    # Where each actor ran (node, pid, GPUs), one JSON per actor: multi-node debugging and the placement tests.
    report = {"dir": os.path.join(_report_dir(), "actors"), "desc": desc} if _report_dir() else None
    actors = [actor_cls.remote(worker_cls, worker_kwargs, report) for _ in range(n)]
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    pending: dict[Any, tuple[int, Any]] = {}
    next_task = finished = 0
    bar = tqdm(
        total=len(tasks), desc=desc or worker_cls.__name__, unit="shard", disable=_quiet() or not progress_enabled()
    )
    try:
        for actor in actors:
            if next_task < len(tasks):
                pending[actor.run.remote(tasks[next_task])] = (next_task, actor)
                next_task += 1
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            idx, actor = pending.pop(ref)
            results[idx] = ray.get(ref)
            if on_result is not None:
                on_result(idx, results[idx])
            bar.update(1)
            finished += 1
            _maybe_die(desc, finished)
            if next_task < len(tasks):
                pending[actor.run.remote(tasks[next_task])] = (next_task, actor)
                next_task += 1
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return results  # type: ignore[return-value]


class _Host:
    """Actor shell that owns one worker instance for its lifetime (model loaded once per actor)."""

    def __init__(self, worker_cls: type, worker_kwargs: dict[str, Any], report: dict[str, str] | None = None):
        setup_worker_logging()
        if report:
            _write_actor_report(report["dir"], report["desc"] or worker_cls.__name__)
        self.worker = worker_cls(**worker_kwargs)

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        return self.worker.run(task)


def _write_actor_report(folder: str, desc: str) -> None:
    import json

    import ray

    os.makedirs(folder, exist_ok=True)
    name = "".join(ch if ch.isalnum() else "-" for ch in desc)
    info = {
        "desc": desc,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }
    with open(os.path.join(folder, f"actor-{name}-{os.getpid()}.json"), "w") as f:
        json.dump(info, f)


def _report_dir() -> str:
    return os.environ.get("RECLORA_NODE_REPORT_DIR", "")


def _quiet() -> bool:
    return os.environ.get("RECLORA_QUIET", "0") == "1"


def _maybe_die(desc: str, finished: int) -> None:
    """Fault injection for tests: RECLORA_KILL_AFTER=DESC:N kills this process (SIGKILL, no cleanup) once
    N tasks of the pool named DESC have finished, i.e. a crash in the middle of a sharded stage."""
    spec = os.environ.get("RECLORA_KILL_AFTER", "")
    if spec and spec.rpartition(":")[0] == desc and finished >= int(spec.rpartition(":")[2]):
        os.kill(os.getpid(), signal.SIGKILL)
