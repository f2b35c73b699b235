"""One training worker: DeepSpeed (ZeRO-3 by default) over the personalized LM, top to bottom.

setup (distributed, model under zero.Init, adapter, resume: trainer.engine) -> train (train_step per optimizer
step, step record: trainer.telemetry, TensorBoard / MLflow / W&B: trainer.tracking, checkpoints) -> evaluate
(trainer.evaluate) -> save. Knows nothing of Ray:
`rank`, `world` and a `report` callback come from the launcher (cluster/launch.py), so the same function runs
under any launcher.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from configs.loader import validate
from configs.logs import get_logger
from recdata import storage
from recdata.streams import Schedule, StreamReader, collate
from trainer import checkpoint as ckpt
from trainer import engine as eng
from trainer import telemetry, tracking
from trainer.evaluate import Evaluator
from trainer.hybrid import HybridLM, use_hybrid
from trainer.objective import answer_loss, gate_input
from trainer.telemetry import StepMeter, gate_stats, log_line
from trainer.tracking import Trackers, train_scalars

log = get_logger(__name__)


def fingerprint_parts(cfg) -> dict[str, Any]:
    """Settings that the trainable tensors depend on: a resume with other values is refused."""
    return {
        "model": cfg.model.name_or_path,
        "tiny": cfg.model.tiny.model_dump() if cfg.model.tiny else None,
        "task": cfg.data.task,
        "lora": {
            k: v
            for k, v in cfg.trainer.lora.model_dump().items()
            if k not in ("gate_lr_mult", "dropout", "gate_dropout")
        },
        "rep_dim": cfg.teacher.rep_dim,
        "hybrid_item_emb": cfg.trainer.hybrid_item_emb,
    }


@dataclass
class StepResult:
    """One rank's share of one optimizer step."""

    loss_sum: float = 0.0  # sum of the per-sample answer NLLs
    tokens: int = 0  # non-padding tokens
    padded_tokens: int = 0  # all tokens of the padded micro-batches (padding fraction = 1 - tokens / this)
    wait: float = 0.0  # seconds spent getting the micro-batches
    seq_len: int = 0  # padded length and LM-head positions of the last micro-batch
    head_positions: int = 1
    seq_sq: int = 0  # sum over sequences of (non-padding length)^2, and LM-head positions run (model FLOPs)
    head_tokens: int = 0
    gate_stats: dict[str, float] = field(default_factory=dict)


def train_step(
    engine, pm, micro_batches: Iterable[dict[str, torch.Tensor]], with_gate_stats: bool = False
) -> StepResult:
    """One optimizer step: forward and backward on every micro-batch (device tensors, recdata.streams.collate
    layout); DeepSpeed applies the optimizer at the accumulation boundary, the last micro-batch.
    Time spent in `micro_batches` (reading, collating, copying) is the step's data wait."""
    out, loss_sum, batches = StepResult(), torch.zeros(1), iter(micro_batches)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        out.wait += time.perf_counter() - t0
        if batch is None:
            break
        loss, per_sample, _ = answer_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        loss_sum += per_sample.sum().cpu()
        out.tokens += int(batch["attention_mask"].sum())
        out.padded_tokens += int(batch["attention_mask"].numel())
        out.seq_len, out.head_positions = int(batch["input_ids"].shape[1]), int(batch["answer_len"].max()) + 1
        out.seq_sq += int((batch["attention_mask"].sum(1) ** 2).sum())
        out.head_tokens += out.head_positions * int(batch["input_ids"].shape[0])
        if with_gate_stats and not out.gate_stats:
            out.gate_stats = gate_stats(pm, batch["cond"])
    out.loss_sum = loss_sum.item()
    return out


def micro_batches(
    reader: StreamReader, sched: Schedule, step: int, rank: int, pad_id: int, device, gate_source: str = "teacher"
) -> Iterator[dict]:
    """This rank's micro-batches of `step`: the step's global batch bucketed by length (Schedule.rank_rows),
    with the gates' input chosen by trainer.lora.gate_input."""
    lengths = reader.lengths_at(sched.global_rows(step))
    for rows in sched.rank_rows(step, rank, lengths):
        batch = gate_input(collate(reader.rows_at(rows), pad_id), gate_source)
        yield {k: v.to(device) for k, v in batch.items()}


def train_worker(params: dict[str, Any], rank: int, world: int, report: Callable[[dict], None]) -> dict[str, Any]:
    cfg = validate(params["config"])
    t = cfg.trainer
    tracking.require(cfg)  # every rank, before any work: a tracker's missing package is one line, at once
    use_gpu = t.use_gpu and torch.cuda.is_available()
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
    run_url = params["run_url"]
    # trainer.torch_threads, else this worker's share of its node's CPUs (the cluster layer's), else the CPUs Ray
    # reserved for it
    torch.set_num_threads(t.torch_threads or params.get("node_cpu_share") or max(1, int(t.cpus_per_worker)))

    # ---- setup
    t_setup = time.perf_counter()
    device = eng.setup_distributed(use_gpu)
    ds_cfg = eng.ds_config(t, use_gpu, cfg.model.dtype, world)
    pm, hf_ds = eng.build_model(cfg, params["model_dir"], ds_cfg, use_gpu, params.get("hybrid"))
    parts = fingerprint_parts(cfg)

    reader = StreamReader(params["streams"]["train"], timeout_s=params.get("feed_timeout_s", 3600.0))
    sched = Schedule(
        rows=reader.rows, global_batch=t.batch_size, world=world, micro=t.micro_batch_size, seed=cfg.run.seed
    )
    total_steps = t.max_steps or sched.steps_per_epoch * t.epochs
    schedule_steps = t.max_steps or sched.steps_per_epoch * (t.schedule_epochs or t.epochs)

    # The newest checkpoint whose checksums verify (a damaged one is skipped with a warning naming the file).
    resume_url, state = ckpt.load_latest(run_url, rank, world, parts, resume=params.get("resume"))
    if state is not None:
        eng.load_params_before_engine(pm, state.tensors)
    # run.report_to's trackers on rank 0 (no-ops elsewhere); an exception leaving the block marks their runs failed.
    with Trackers.from_config(cfg, run_url, rank, start_step=state.step if state is not None else 0) as trackers:
        engine, scheduler, lam = eng.build_engine(pm, ds_cfg, t, schedule_steps)
        start = 0
        if state is not None:
            start = eng.restore(engine, pm, scheduler, lam, state, rank, cfg.run.seed)
            if rank == 0:
                log.info(f"[train] resumed from {resume_url} at step {start}")
        else:
            torch.manual_seed(cfg.run.seed * 1000 + rank)

        log_path = storage.join(run_url, "logs", "train.jsonl")
        history: list[dict] = (
            storage.read_json(log_path + ".json") if (start and storage.exists(log_path + ".json")) else []
        )
        history = [h for h in history if h["step"] <= start]
        saver = Saver(engine, pm, run_url, rank, world, sched, reader, parts, t, trackers)
        # MFU: against the GPU's spec peak (trainer.peak_tflops overrides the table) and the measured matmul peak.
        peaks = telemetry.device_peaks(device, t.peak_tflops, params.get("peak_flops"))
        meter = StepMeter(engine, pm, sched, t.batch_size, world, device, peaks)
        bar = None
        if rank == 0 and params.get("interactive"):
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=start, desc="train", unit="step")
        engine.train()
        evaluate = Evaluator(engine, pm, params, rank, world, device, trackers)

        zero_shot = {}
        if start == 0 and params.get("eval_zero_shot") and "test" in params["streams"]:
            # B = 0 at step 0, so the personalized model is exactly the base LLM: its zero-shot score.
            zero_shot = {f"zeroshot_test_{k}": v for k, v in evaluate("test", step=0, tag="zeroshot_test").items()}
        elif state is not None:  # measured before step 1 of this run: every checkpoint carries it (metrics)
            zero_shot = {k: v for k, v in state.meta.get("metrics", {}).items() if k.startswith("zeroshot_")}

        # ---- train
        t_train = time.perf_counter()
        for step in range(start, total_steps):
            t_step, log_now = time.perf_counter(), (step + 1) % t.log_every == 0
            hybrid_step = curriculum(engine, pm, cfg.run.seed, step, total_steps)
            batches = micro_batches(reader, sched, step, rank, params["pad_id"], device, t.lora.gate_input)
            res = train_step(engine, pm, batches, with_gate_stats=log_now)
            rec = meter.record(step, res, t_step, hybrid_step)
            history.append(rec)
            if rank == 0 and log_now:
                log.info(log_line("train", rec))
                trackers.log_metrics(train_scalars(rec), rec["step"])
            report(dict(rec))
            if due(t.eval_every, step + 1, total_steps) and "valid" in params["streams"]:
                rec.update(evaluate_during_training(evaluate, step + 1, rank))
            progress(bar, rec)
            if due(t.checkpoint_every, step + 1, total_steps):
                saver.save(step + 1, history, metrics=zero_shot)
            maybe_fail(params.get("fail_at"), step + 1, rank)
            if params.get("pause_after_checkpoint") and t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                time.sleep(params["pause_after_checkpoint"])  # tests: a window in which to preempt a node

        if bar is not None:
            bar.close()
        train_seconds, wait_total = time.perf_counter() - t_train, meter.waited

        # ---- evaluate and save
        metrics = {}
        for split in ("valid", "test"):
            if split in params["streams"]:
                metrics.update({f"{split}_{k}": v for k, v in evaluate(split, step=total_steps).items()})
        metrics.update(zero_shot)
        if rank == 0 and metrics:
            log.info("[eval] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        trackers.log_hparams(tracking.key_hparams(cfg), metrics)
        final = saver.save(total_steps, history, metrics=metrics)
        export_adapter(pm, run_url, rank)
        if rank == 0:
            # Data wait: time the step loop spent on batches, including waiting for feed parts still being built.
            worker_seconds = time.perf_counter() - t_setup
            timing = {
                "setup_seconds": t_train - t_setup,
                "train_seconds": train_seconds,
                "data_wait_seconds": wait_total,
                "data_wait_fraction": wait_total / train_seconds if train_seconds > 0 else 0.0,
                "eval_wait_seconds": evaluate.waited,
                "worker_seconds": worker_seconds,
                # every wait for data (steps and evaluations) over the worker's whole life
                "total_wait_fraction": (wait_total + evaluate.waited) / worker_seconds,
                "steps_run": total_steps - start,
                "device": telemetry.device_name(device),
            }
            storage.write_json_atomic(
                storage.join(run_url, "metrics.json"),
                {"final": metrics, "steps": total_steps, "checkpoint": final, "timing": timing},
            )
        report({"step": total_steps, **metrics, "done": 1})
    reader.close()
    del hf_ds
    return {"metrics": metrics, "history": history if rank == 0 else []}


def evaluate_during_training(evaluate: Evaluator, step: int, rank: int) -> dict[str, float]:
    """The validation split at `step` (every rank: ZeRO-3 forwards are collective; rank 0 prints it, and the
    evaluator sends it to the trackers)."""
    ev = {f"valid_{k}": v for k, v in evaluate("valid", step=step).items()}
    if rank == 0:
        log.info(f"[eval] step {step} " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
    return ev


def due(every: int, step: int, total: int) -> bool:
    """An every-N-steps action (evaluation, checkpoint) at 1-based `step`; the last step has its own."""
    return bool(every) and step % every == 0 and step < total


def progress(bar, rec: dict) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")


def curriculum(engine, model, seed: int, step: int, total: int) -> bool | None:
    """LLaRA curriculum for hybrid prompts; text-only steps give the projector a learning rate of 0
    (the scheduler restores it at the next step)."""
    if not isinstance(model, HybridLM):
        return None
    model.hybrid = use_hybrid(seed, step, total)
    if not model.hybrid:
        for g in engine.optimizer.param_groups:
            if g.get("name") == "projector":
                g["lr"] = 0.0
    return model.hybrid


def maybe_fail(fail_at: dict | None, step: int, rank: int) -> None:
    """Fault injection for tests: SIGKILL this worker process once at a given step."""
    if not fail_at or fail_at["step"] != step or fail_at["rank"] != rank or os.path.exists(fail_at["marker"]):
        return
    Path(fail_at["marker"]).write_text(str(step))
    os.kill(os.getpid(), signal.SIGKILL)


class Saver:
    """Checkpoints of the run (trainer/checkpoint.py): every rank writes the full state of its share of the
    trainable tensors (round-robin by name); rank 0 adds the metadata and the logs, and flushes the trackers
    (TensorBoard files reach the run folder)."""

    def __init__(self, engine, pm, run_url, rank, world, sched, reader, parts, t, trackers):
        self.engine, self.pm, self.run_url, self.rank, self.world = engine, pm, run_url, rank, world
        self.sched, self.reader, self.parts, self.t, self.trackers = sched, reader, parts, t, trackers
        self.names = pm.trainable_parameter_names()
        self.my_names = {n for i, n in enumerate(self.names) if i % world == rank}

    def save(self, step: int, history: list[dict], metrics: dict | None = None) -> str:
        # Collective: every rank walks every parameter in the same order.
        full = eng.full_state(self.engine, self.pm, self.names)
        mine = {k: v for k, v in full.items() if k.split("::")[0] in self.my_names}
        cur = self.sched.cursor(min(step, self.sched.steps_per_epoch * 10**9))
        position = self.reader.position(cur["row"] % max(self.reader.rows, 1))
        rank_meta = {"rng": ckpt.rng_state(), "cursor": {**cur, **position}}
        meta = None
        if self.rank == 0:
            meta = {
                "fingerprint": ckpt.config_fingerprint(self.parts),
                "fingerprint_parts": self.parts,
                "optimizer_step": eng.optimizer_step_count(self.engine),
                "metrics": metrics or {},
                "trainable_names": self.names,
                "last_log": history[-1] if history else None,
            }
            storage.write_json_atomic(storage.join(self.run_url, "logs", "train.jsonl.json"), history)
            storage.write_bytes_atomic(
                storage.join(self.run_url, "logs", "train.jsonl"),
                "".join(json.dumps(h) + "\n" for h in history).encode(),
            )
            self.trackers.flush()
        url = ckpt.save(self.run_url, step, self.rank, self.world, mine, rank_meta, meta, eng.barrier)
        if self.rank == 0:
            ckpt.prune(self.run_url, self.t.keep_last)
        return url


def export_adapter(pm, run_url: str, rank: int) -> None:
    """Bank + gates as safetensors and a PEFT folder (collective gather; rank 0 uploads)."""
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_adapter(tmp)
        if rank == 0:
            for f in Path(tmp).iterdir():
                storage.write_bytes_atomic(storage.join(run_url, "adapter", f.name), f.read_bytes())
    eng.barrier()
