"""How a sharded stage runs its tasks. A worker is any class with `run(task: dict) -> dict`; a runner
builds workers and hands them tasks. The default runs everything in this process; `cluster.pool.run_sharded`
is the Ray runner with the same signature, supplied by the layer that owns Ray. Stages never import Ray."""

from __future__ import annotations

import sys
from typing import Any, Callable, Protocol

from tqdm.auto import tqdm


class Runner(Protocol):
    def __call__(
        self,
        worker_cls: type,
        worker_kwargs: dict[str, Any],
        tasks: list[dict[str, Any]],
        num_actors: int = 1,
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        desc: str = "",
        on_result: Callable[[int, dict], None] | None = None,
    ) -> list[dict[str, Any]]: ...


def run_in_process(
    worker_cls: type,
    worker_kwargs: dict[str, Any],
    tasks: list[dict[str, Any]],
    num_actors: int = 1,
    num_cpus_per_actor: float = 1.0,
    num_gpus_per_actor: float = 0.0,
    desc: str = "",
    on_result: Callable[[int, dict], None] | None = None,
) -> list[dict[str, Any]]:
    """One worker in this process takes every task in order; results come back in task order."""
    if not tasks:
        return []
    worker = worker_cls(**worker_kwargs)
    results = []
    bar = tqdm(tasks, desc=desc or worker_cls.__name__, unit="task", disable=None, file=sys.stderr)
    for i, task in enumerate(bar):
        results.append(worker.run(task))
        if on_result is not None:
            on_result(i, results[-1])
    return results


class Launcher(Protocol):
    """Runs `fn(params, rank, world, report) -> dict` on `num_workers` ranks with a torch.distributed group
    (cluster.launch.run_training: Ray Train workers). Data-parallel stages take one from the layer above."""

    def __call__(
        self,
        fn: Callable,
        params: dict[str, Any],
        *,
        num_workers: int,
        use_gpu: bool,
        cpus_per_worker: float,
        name: str,
        max_failures: int,
        **kwargs: Any,
    ) -> Any: ...
