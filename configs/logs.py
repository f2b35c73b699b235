"""Console output of every entry point and worker: the standard `logging` module, one format.

`setup_logging()` once per process (entry points; Ray workers through their entry function) gives
`2026-11-30 16:52:01 INFO [rank 0] trainer.loop: step 3 ...` on stderr; modules log through
`get_logger(__name__)`. The rank comes from RANK (torchrun, DeepSpeed, Ray Train set it) unless given.
Progress bars are a separate matter: `progress_enabled()` is true only on a terminal, so `kubectl logs`
never holds one long carriage-return line.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
# Deprecations raised inside libraries on every call (DeepSpeed's ZeRO-3 collectives under torch 2.13 printed two lines
# per training step): nothing a user can act on. Silenced by exact message, so any other warning still shows.
LIBRARY_DEPRECATIONS = (
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`is_gradient_checkpointing` is deprecated",
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (a test's capture, a redirected stream), never to
    the stream that was current at setup and may be closed since."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _RankFilter(logging.Filter):
    def __init__(self, rank: str) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(level: str | int | None = None, rank: int | None = None) -> None:
    """Configure the root logger for this process (idempotent: a second call replaces the handler) and silence the
    libraries' per-call deprecation warnings (LIBRARY_DEPRECATIONS). Level: the argument, else RECLORA_LOG_LEVEL,
    else INFO."""
    level = level or os.environ.get("RECLORA_LOG_LEVEL") or "INFO"
    rank_text = str(rank if rank is not None else os.environ.get("RANK", "0"))
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.addFilter(_RankFilter(rank_text))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "reclora", False)]:
        root.removeHandler(old)
    handler.reclora = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else str(level).upper())
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def progress_enabled(stream=None) -> bool:
    """Progress bars only on an interactive terminal (tqdm's disable=None does the same test)."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())
