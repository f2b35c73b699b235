"""Experiment tracking: TensorBoard (default), MLflow and Weights & Biases behind one small interface.

`run.report_to` picks the trackers (the HF convention; docs/tracking.md). Rank 0 opens them
(`Trackers.from_config`); every other rank gets an empty `Trackers` whose calls do nothing, so the loop and the
evaluator call them unconditionally:

    trackers.log_metrics({"train/loss": 0.61, "gates/entropy": 1.2}, step)   # every trainer.log_every steps
    trackers.log_metrics({"valid/auc": 0.71}, step)                          # every evaluation (trainer.evaluate)
    trackers.log_hparams(key_hparams(cfg), final_metrics)                    # once, at the end
    trackers.flush(); trackers.close(failed=False)

Keys are `{group}/{name}`: `train/*` (the step record: loss, lr, grad_norm, tokens_per_s, samples_per_s,
padding_fraction, mfu, ...), `gates/entropy`, `gates/spread`, `gates/expert_load/{i}`, `{valid,test,zeroshot_test}/{metric}`.
TensorBoard event files are written locally and copied to `{run}/tensorboard/` (a local run folder is written in
place) every `run.tracking_flush_s` seconds by a background thread, at each checkpoint and at the end, a failed
end included. MLflow and W&B are optional packages (`pip install "reclora[tracking]"`), imported only when asked
for; credentials come from the environment only (MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD, WANDB_API_KEY)
and are never logged. A restarted worker continues the same MLflow and W&B runs (their ids are kept in
`{run}/logs/tracking.json`). A tracker that fails while logging is reported once and skipped; training goes on.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from configs.errors import RecloraError
from configs.logs import get_logger
from recdata import storage

log = get_logger(__name__)

# Optional trackers: the module imported, and what to install.
PACKAGES = {"mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}

# The resolved config's key hyperparameters (dotted config keys), logged as TensorBoard hparams, MLflow params
# and the W&B run config.
HPARAM_KEYS = (
    "run.seed",
    "data.task",
    "model.name_or_path",
    "model.dtype",
    "model.max_length",
    "retrieval.k_text",
    "retrieval.k_id",
    "retrieval.text_mode",
    "teacher.model",
    "teacher.rep_dim",
    "trainer.lora.mode",
    "trainer.lora.target_modules",
    "trainer.lora.r",
    "trainer.lora.alpha",
    "trainer.lora.dropout",
    "trainer.lora.num_experts",
    "trainer.lora.temperature",
    "trainer.lora.gate_hidden",
    "trainer.lora.gate_dropout",
    "trainer.lora.gate_lr_mult",
    "trainer.lora.gate_input",
    "trainer.hybrid_item_emb",
    "trainer.lr",
    "trainer.weight_decay",
    "trainer.schedule",
    "trainer.warmup_ratio",
    "trainer.min_lr_ratio",
    "trainer.grad_clip",
    "trainer.batch_size",
    "trainer.micro_batch_size",
    "trainer.epochs",
    "trainer.schedule_epochs",
    "trainer.max_steps",
    "trainer.train_subset",
    "trainer.num_workers",
    "trainer.zero_stage",
)
# Prefixes of the final metrics (metrics.json "final"), longest first: `zeroshot_test_auc` -> `zeroshot_test/auc`.
SPLITS = ("zeroshot_test", "valid", "test")


class TrackingError(RecloraError):
    """A tracker asked for in run.report_to cannot start (package missing, no tracking URI, refused login)."""


def key_hparams(cfg) -> dict[str, int | float | str | bool]:
    """HPARAM_KEYS of `cfg` as scalars: lists joined with commas, None as "none"."""
    out: dict[str, int | float | str | bool] = {}
    for key in HPARAM_KEYS:
        v: Any = cfg
        for part in key.split("."):
            v = getattr(v, part)
        out[key] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else "none" if v is None else v
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def train_scalars(rec: dict) -> dict[str, float]:
    """A step record (trainer.loop) as tracker keys: `train/*`, `gates/entropy`, `gates/spread`,
    `gates/expert_load/{i}`."""
    out = {}
    for k, v in rec.items():
        if k == "step" or not _number(v):
            continue
        if k in ("gate_entropy", "gate_spread"):
            out[f"gates/{k.removeprefix('gate_')}"] = float(v)
        elif k.startswith("expert_load_"):
            out[f"gates/expert_load/{k.removeprefix('expert_load_')}"] = float(v)
        else:
            out[f"train/{k}"] = float(v)
    return out


def metric_key(name: str) -> str:
    """`valid_auc` -> `valid/auc`, `zeroshot_test_hr@10` -> `zeroshot_test/hr@10` (other names unchanged)."""
    for split in SPLITS:
        if name.startswith(split + "_"):
            return f"{split}/{name[len(split) + 1 :]}"
    return name


def require(cfg) -> None:
    """Every rank, before any work: the optional packages that run.report_to asks for are importable, and MLflow
    has somewhere to write. The error is one line naming the package and the pip command."""
    for name in cfg.run.report_to:
        if name in PACKAGES:
            module, pip = PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise TrackingError(_missing(name, module, pip))
    if "mlflow" in cfg.run.report_to:
        mlflow_uri(cfg)


def _missing(name: str, module: str, pip: str) -> str:
    return (
        f"run.report_to has {name}, but the {module!r} package is not installed: "
        f'pip install "reclora[tracking]" (or pip install {pip}), or remove {name} from run.report_to'
    )


def _import(name: str):
    module, pip = PACKAGES.get(name, (name, name))
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackingError(_missing(name, module, pip)) from e


def mlflow_uri(cfg) -> str:
    """run.mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else a file store beside the runs (local output_dir)."""
    uri = cfg.run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if not storage.is_local(cfg.run.output_dir):
        raise TrackingError(
            "run.report_to has mlflow, but no tracking URI is set and run.output_dir is not local: set "
            "MLFLOW_TRACKING_URI or run.mlflow_tracking_uri (http(s)://server, databricks, or file:/local/path)"
        )
    return "file:" + os.path.abspath(cfg.run.output_dir.removeprefix("file://")) + "/mlruns"


def redact(uri: str) -> str:
    """A URI without user info, for log lines."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _ids_url(run_url: str) -> str:
    return storage.join(run_url, "logs", "tracking.json")


def _saved_id(run_url: str, name: str) -> str | None:
    url = _ids_url(run_url)
    return storage.read_json(url).get(name) if storage.exists(url) else None


def _save_id(run_url: str, name: str, value: str) -> None:
    url = _ids_url(run_url)
    ids = storage.read_json(url) if storage.exists(url) else {}
    storage.write_json_atomic(url, {**ids, name: value})


def _local_path(url: str) -> str:
    return storage.get_fs(url)[1]


def _upload_tree(local: Path, url: str, done: dict[str, int] | None = None) -> None:
    """Copy the files under `local` to `url` (same relative names); with `done`, only files whose size changed."""
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        size = f.stat().st_size
        if done is not None and done.get(rel) == size:
            continue
        storage.upload_file_atomic(str(f), storage.join(url, rel))
        if done is not None:
            done[rel] = size


class TensorBoard:
    """torch.utils.tensorboard event files in {run}/tensorboard: written in place for a local run folder;
    otherwise in a local folder copied there at each flush (object stores cannot append)."""

    def __init__(self, cfg, run_url: str, start_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrackingError(_missing("tensorboard", "tensorboard", "tensorboard")) from e
        self.url = storage.join(run_url, "tensorboard")
        self.remote = not storage.is_local(run_url)
        self.dir = tempfile.mkdtemp(prefix="reclora-tb-") if self.remote else _local_path(self.url)
        self.uploaded: dict[str, int] = {}
        # A resumed run drops what an earlier attempt logged from the resumed step on (TensorBoard's purge).
        self.writer = SummaryWriter(self.dir, purge_step=start_step or None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, metrics):
            self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            _upload_tree(Path(self.dir), self.url, self.uploaded)

    def close(self, failed: bool = False) -> None:
        self.writer.close()
        if self.remote:
            _upload_tree(Path(self.dir), self.url, self.uploaded)
            shutil.rmtree(self.dir, ignore_errors=True)


class MLflow:
    """One MLflow run per reclora run (experiment: run.mlflow_experiment, MLFLOW_EXPERIMENT_NAME or run.name)."""

    def __init__(self, cfg, run_url: str, start_step: int = 0):
        _import("mlflow")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(cfg)
        if urlsplit(uri).scheme in ("", "file"):
            # MLflow 3 keeps its file store only on request; it is the store that needs no server and no SQL stack.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        name = cfg.run.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.run.name
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            self.run_id = _saved_id(run_url, "mlflow_run_id")
            if self.run_id:  # a restarted worker: the same MLflow run, running again
                try:
                    self.client.update_run(self.run_id, status="RUNNING")
                except MlflowException:
                    self.run_id = None  # another tracking server: a new run there
            if not self.run_id:
                run = self.client.create_run(exp_id, run_name=cfg.run.name, tags={"reclora.run_url": run_url})
                self.run_id = run.info.run_id
                _save_id(run_url, "mlflow_run_id", self.run_id)
        except MlflowException as e:
            raise TrackingError(f"mlflow at {redact(uri)}: {_first_line(e)}") from None
        try:
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in key_hparams(cfg).items()])
        except MlflowException as e:  # a resume with another learning rate: MLflow keeps the first value
            log.warning("tracking: mlflow params not updated: %s", _first_line(e))
        self.logged: set[str] = set()
        self.last_step = 0
        log.info("mlflow run %s in experiment %r at %s", self.run_id, name, redact(uri))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), ts, step) for k, v in metrics.items()]
        self.logged.update(m.key for m in batch)
        self.last_step = max(self.last_step, step)
        self.client.log_batch(self.run_id, metrics=batch)

    def log_hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        # Params went in at the start; final metrics not logged during the run (none, normally) go in now.
        new = {k: v for k, v in metrics.items() if mlflow_key(k) not in self.logged}
        if new:
            self.log_metrics(new, self.last_step)

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def mlflow_key(name: str) -> str:
    """MLflow names allow letters, digits, `_-. :/` only: `test/hr@10` -> `test/hr_at_10`."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_at_" if c == "@" else "_" for c in name)


class Wandb:
    """One W&B run per reclora run (project: run.wandb_project, WANDB_PROJECT or reclora); WANDB_MODE=offline
    writes it locally (`wandb sync` uploads it later)."""

    def __init__(self, cfg, run_url: str, start_step: int = 0):
        wandb = _import("wandb")
        self.url = storage.join(run_url, "wandb")
        self.remote = not storage.is_local(run_url)
        self.tmp = tempfile.mkdtemp(prefix="reclora-wandb-") if self.remote else None
        wdir = os.environ.get("WANDB_DIR") or self.tmp or _local_path(run_url)
        os.makedirs(wdir, exist_ok=True)
        run_id = _saved_id(run_url, "wandb_run_id") or uuid.uuid4().hex[:12]
        project = cfg.run.wandb_project or os.environ.get("WANDB_PROJECT") or "reclora"
        try:
            self.run = wandb.init(
                project=project,
                name=cfg.run.name,
                id=run_id,
                resume="allow",
                dir=wdir,
                config=key_hparams(cfg),
                settings=wandb.Settings(console="off"),  # Ray already forwards the worker's output
            )
        except Exception as e:  # wandb.errors.UsageError / CommError: no API key, refused login, unreachable
            raise TrackingError(
                f"wandb: {_first_line(e)} (set WANDB_API_KEY, or WANDB_MODE=offline to write the run locally)"
            ) from None
        _save_id(run_url, "wandb_run_id", run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        self.run.config.update(hparams, allow_val_change=True)
        self.run.summary.update(metrics)

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        offline, files = self.run.offline, Path(self.run.dir).parent
        self.run.finish(exit_code=1 if failed else 0)
        if offline and self.remote:  # an offline run folder beside the run, for `wandb sync`
            _upload_tree(files, storage.join(self.url, files.name))
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


class Trackers:
    """The trackers of one worker: empty (every call a no-op) except on rank 0. A context manager: closing on an
    exception marks the runs failed after a last flush."""

    def __init__(self, backends: list | None = None, flush_s: float = 0.0):
        self.backends = list(backends or [])
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.warned: set[tuple[str, str]] = set()
        self.closed = False
        self.thread = None
        if flush_s and any(isinstance(b, TensorBoard) for b in self.backends):
            self.thread = threading.Thread(target=self._flush_every, args=(flush_s,), daemon=True, name="tb-flush")
            self.thread.start()

    @classmethod
    def from_config(cls, cfg, run_url: str, rank: int, start_step: int = 0) -> Trackers:
        """run.report_to's trackers on rank 0 (a resumed run passes the step it resumes at); none elsewhere."""
        require(cfg)
        if rank != 0:
            return cls()
        backends = []
        try:
            for name in cfg.run.report_to:
                backends.append(BACKENDS[name](cfg, run_url, start_step))
        except BaseException:
            for b in backends:
                b.close(failed=True)
            raise
        return cls(backends, cfg.run.tracking_flush_s)

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _call(self, method: str, *args) -> None:
        with self.lock:
            for b in self.backends:
                try:
                    getattr(b, method)(*args)
                except Exception as e:  # a tracker's hiccup must not stop training: said once, then skipped
                    key = (type(b).__name__, method)
                    if key not in self.warned:
                        self.warned.add(key)
                        log.warning("tracking: %s.%s failed: %s", key[0], method, _first_line(e))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if _number(v)}
        if self.backends and clean:
            self._call("log_metrics", clean, int(step))

    def log_hparams(self, hparams: dict, metrics: dict[str, Any]) -> None:
        """Hyperparameters with the final metrics (`valid_auc`-style names become `valid/auc`)."""
        if self.backends:
            self._call(
                "log_hparams", dict(hparams), {metric_key(k): float(v) for k, v in metrics.items() if _number(v)}
            )

    def flush(self) -> None:
        if self.backends:
            self._call("flush")

    def _flush_every(self, seconds: float) -> None:
        while not self.stop.wait(seconds):
            self.flush()

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
        self._call("close", failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
