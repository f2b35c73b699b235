"""Run a training function on Ray Train workers (TorchTrainer), with restarts on worker failure.

The function is plain Python: `fn(params, rank, world, report) -> dict`. It resumes from the latest
complete checkpoint on storage by itself, so a restarted worker group (FailureConfig) continues where
the last checkpoint left off, on a fresh cluster as well as on the same one.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

from cluster.runtime import init_ray, setup_worker_logging, start_autoscaling_coordinator
from configs.errors import RecloraError


def _entry(loop_config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    setup_worker_logging(rank=ctx.get_world_rank())
    if loop_config.get("node_report_dir"):  # which node each rank ran on (multi-node tests, debugging)
        import json as _json
        import os as _os

        _os.makedirs(loop_config["node_report_dir"], exist_ok=True)
        with open(_os.path.join(loop_config["node_report_dir"], f"rank-{ctx.get_world_rank()}.json"), "w") as f:
            _json.dump({"node_id": ray.get_runtime_context().get_node_id(), "pid": _os.getpid()}, f)
    fn, params = loop_config["fn"], loop_config["params"]
    if loop_config.get("share_node_cpus"):
        params = {**params, "node_cpu_share": node_cpu_share(ctx.get_local_world_size())}
    try:
        result = fn(params, ctx.get_world_rank(), ctx.get_world_size(), lambda m: ray.train.report(m))
    except RecloraError as e:
        if ctx.get_world_size() > 1:
            raise
        # One worker (the teacher by default): hand an error the user can act on back as a value, so the driver
        # prints its one line instead of Ray Train logging the worker's traceback and restarting the worker for
        # a data or config error that would only repeat.
        ray.get(ray.get_actor(loop_config["error_box"]).put.remote(e))
        return
    if ctx.get_world_rank() == 0 and loop_config.get("result_path"):
        import json

        with open(loop_config["result_path"], "w") as f:
            json.dump(result, f)


def node_cpu_share(local_workers: int) -> int:
    """CPU threads for one of the `local_workers` training workers on this Ray node: the node's CPUs as Ray counts
    them (on KubeRay, the pod's limit), split among those workers, and never more than this machine's cores split
    among the workers of every Ray node on it (test clusters run several nodes on one host)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    me = next(n for n in nodes if n["NodeID"] == here)
    on_host = sum(n["NodeManagerAddress"] == me["NodeManagerAddress"] for n in nodes)
    local = max(1, local_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(int(me["Resources"].get("CPU", 1) // local), cores // (local * on_host)))


def run_training(
    fn: Callable,
    params: dict[str, Any],
    *,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    name: str,
    max_failures: int,
    placement: str = "PACK",
    result_path: str | None = None,
    worker_resources: dict[str, float] | None = None,
    timeout_s: int = 600,
    node_report_dir: str | None = None,
    share_node_cpus: bool = False,
) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray = init_ray()
    start_autoscaling_coordinator(ray)
    box_name = f"reclora-errors-{uuid.uuid4().hex}"
    # The box lives on the driver's node: a preempted worker node must not take it (and the error it may hold)
    # down, which would turn a recovered run into an ActorDiedError at the end.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    box = ray.remote(num_cpus=0)(_ErrorBox).options(name=box_name, scheduling_strategy=here).remote()
    resources = {"CPU": cpus_per_worker, **(worker_resources or {})}
    if use_gpu:
        resources["GPU"] = 1
    storage_path = os.environ.get("RECLORA_RAY_RESULTS") or os.path.join(
        os.environ.get("RAY_TMPDIR", "/tmp"), "results"
    )
    trainer = TorchTrainer(
        _entry,
        train_loop_config={
            "fn": fn,
            "params": params,
            "result_path": result_path,
            "node_report_dir": node_report_dir,
            "error_box": box_name,
            # fn gets params["node_cpu_share"]: its threads when the config leaves them to the node
            "share_node_cpus": share_node_cpus,
        },
        # A dead peer must surface as an error (then a restart), not as a hang in a collective.
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=timeout_s),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy=placement
        ),
        run_config=RunConfig(
            name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=max_failures)
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        # An error the user can act on (a RecloraError raised by a worker: bad data, a refused checkpoint) comes
        # back as itself, so the pipeline and the CLIs print its one line instead of Ray Train's wrapping.
        cause = worker_error(e)
        if cause is not None:
            raise cause from e
        raise
    finally:
        error = ray.get(box.get.remote())
        ray.kill(box)
    if error is not None:
        raise error
    return result


class _ErrorBox:
    """Holds the RecloraError a one-worker run hands back (Ray Train keeps no return values)."""

    def __init__(self):
        self.error = None

    def put(self, error: BaseException) -> None:
        self.error = error

    def get(self) -> BaseException | None:
        return self.error


def worker_error(e: BaseException) -> RecloraError | None:
    """The first RecloraError a Ray Train failure carries (lowest rank first), unwrapped from Ray's wrappers."""
    found: list[BaseException] = []
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict):
        found += [failures[rank] for rank in sorted(failures)]
    found.append(e)
    seen: set[int] = set()
    for err in found:
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if isinstance(err, RecloraError):
                return err
            # RayTaskError.cause; Ray Train's UserExceptionWithTraceback keeps the worker's exception in _base_exc
            err = getattr(err, "cause", None) or getattr(err, "_base_exc", None) or err.__cause__
    return None
