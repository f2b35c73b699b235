"""One logging format for every process: level, timestamp, rank, module."""

from __future__ import annotations

import io
import logging
import re

from cluster.runtime import start_autoscaling_coordinator
from configs.logs import get_logger, progress_enabled, setup_logging


def test_format_has_time_level_rank_and_module(capsys):
    setup_logging("INFO", rank=3)
    get_logger("trainer.loop").info("step 1 loss 0.5")
    get_logger("trainer.loop").debug("hidden at INFO")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO \[rank 3\] trainer\.loop: step 1 loss 0\.5", err[0])
    setup_logging("INFO")  # a second call replaces the handler: lines are never printed twice
    get_logger("x").warning("once")
    assert capsys.readouterr().err.count("once") == 1
    logging.getLogger().handlers = [h for h in logging.getLogger().handlers if not getattr(h, "reclora", False)]


def test_progress_bars_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_enabled(Tty()) and not progress_enabled(io.StringIO())


def test_library_deprecations_are_silenced_and_other_warnings_are_not():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        setup_logging()
        # the message torch 2.13 raises from DeepSpeed's ZeRO-3 collectives on every step
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("a deprecation a user can act on", FutureWarning)
    assert [str(w.message) for w in seen] == ["a deprecation a user can act on"]


def test_ray_train_finds_its_autoscaling_coordinator_running(ray_local):
    # Without it, the first Ray Train controller of a busy machine timed out creating it (a GetTimeoutError
    # traceback in the demo's output). cluster.launch.run_training calls this before every Ray Train run; here it
    # also proves the Ray-internal module is still where the pinned Ray keeps it (else this is a silent no-op).
    start_autoscaling_coordinator(ray_local)
    coordinator = ray_local.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    assert ray_local.get(coordinator.cancel_request.remote(requester_id="test"), timeout=5) is None
