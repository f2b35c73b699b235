"""One training worker: DeepSpeed (ZeRO-3 by default) over the personalized LM, top to bottom.

setup (distributed, model under zero.Init, adapter, resume) -> train (micro-batches, accumulation,
logging, checkpoints) -> evaluate -> save. Knows nothing of Ray: `rank`, `world` and a `report`
callback come from the launcher (cluster/launch.py), so the same function runs under any launcher.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from configs.loader import validate
from recdata import storage
from recdata.metrics import ctr_metrics, ranking_metrics
from recdata.streams import Schedule, StreamReader, collate
from trainer import checkpoint as ckpt
from trainer.hybrid import HybridLM, use_hybrid
from trainer.lora import MixtureLoraConfig, build_personalized_model
from trainer.objective import answer_loss, candidate_scores, p_yes_from_logits
from trainer.prepare import worker_model_dir

OPT_KEYS = ("exp_avg", "exp_avg_sq")


def ds_config(t, use_gpu: bool, dtype: str, world: int) -> dict[str, Any]:
    accum = t.batch_size // (t.micro_batch_size * world)
    cfg: dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.zero_stage == 3:
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e7})
        if t.zero_hpz_partition_size > 1:
            cfg["zero_optimization"]["zero_hpz_partition_size"] = t.zero_hpz_partition_size
    if use_gpu and dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif use_gpu and dtype == "float16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling
    return cfg


def lr_lambda(t, total_steps: int) -> Callable[[int], float]:
    warm = int(round(t.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if t.schedule == "cosine":
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * (1 - progress)

    return f


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


def _setup_distributed(use_gpu: bool) -> None:
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # On CPU, DeepSpeed otherwise JIT-compiles a shared-memory comm op (about 2.5 minutes) at init.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def _all_gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    import torch.distributed as dist

    if not dist.is_initialized() or world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.cat(out)


def build_model(cfg, model_dir: str, ds_cfg: dict, use_gpu: bool, hybrid: dict | None = None):
    """Base model under zero.Init (via HfDeepSpeedConfig, kept alive by the caller), then the adapter."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_cfg) if ds_cfg["zero_optimization"]["stage"] == 3 else None
    dtype = getattr(torch, cfg.model.dtype) if use_gpu else torch.float32

    base = AutoModelForCausalLM.from_pretrained(worker_model_dir(model_dir), dtype=dtype)
    base.config.use_cache = False
    lo = cfg.trainer.lora
    mcfg = MixtureLoraConfig(
        mode=lo.mode,
        target_modules=list(lo.target_modules),
        r=lo.r,
        alpha=lo.alpha,
        dropout=lo.dropout,
        num_experts=lo.num_experts,
        temperature=lo.temperature,
        gate_hidden=lo.gate_hidden,
        gate_dropout=lo.gate_dropout,
        cond_dim=cfg.teacher.rep_dim,
        gate_lr_mult=lo.gate_lr_mult,
    )
    # Same seed on every rank: adapter initialisation must not depend on the number of workers.
    torch.manual_seed(cfg.run.seed)
    pm = build_personalized_model(base, mcfg, seed=cfg.run.seed)
    if cfg.trainer.activation_checkpointing:
        pm.activation_checkpointing_enable()
    if hybrid:
        from safetensors.torch import load as st_load

        fs, path = storage.get_fs(hybrid["item_emb_url"])
        with storage.storage_errors(hybrid["item_emb_url"]), fs.open(path, "rb") as f:
            table = st_load(f.read())
        pm = HybridLM(pm, table["item_ids"].numpy(), table["emb"], hybrid["slot_token_ids"], hybrid["text_token_id"])
    return pm, hf_ds


def _full_state(engine, pm, names: list[str]) -> dict[str, torch.Tensor]:
    """Full fp32 value and Adam moments of every trainable parameter (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = pm.trainable_parameters()
    out = {}
    for n in names:
        p = params[n]
        out[f"{n}::param"] = (
            safe_get_full_fp32_param(p).detach().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        )
        for k in OPT_KEYS:
            v = safe_get_full_optimizer_state(p, k)
            if v is not None:
                out[f"{n}::{k}"] = v.detach().cpu().reshape(out[f"{n}::param"].shape)
    return out


def _optimizer_step_count(engine) -> int:
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    for st in inner.state.values():
        if "step" in st:
            return int(st["step"].item() if torch.is_tensor(st["step"]) else st["step"])
    return 0


def _set_optimizer_step_count(engine, step: int) -> None:
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    for st in inner.state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def _load_params_before_engine(pm, tensors: dict[str, torch.Tensor]) -> None:
    params = pm.trainable_parameters()
    with torch.no_grad():
        for n, p in params.items():
            key = f"{n}::param"
            if key not in tensors:
                raise ckpt.CheckpointError(f"checkpoint lacks trainable tensor {n}")
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise ckpt.CheckpointError(
                    f"checkpoint tensor {n} has shape {tuple(tensors[key].shape)}, model has {tuple(p.shape)}"
                )
            p.copy_(tensors[key].to(p.dtype))


def _load_optimizer_after_engine(engine, pm, tensors: dict[str, torch.Tensor], opt_step: int) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    if opt_step == 0:
        return
    # Adam state exists only after the first step: take one zero-lr step with zero grads to allocate it.
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    if not any(inner.state.values()):
        raise ckpt.CheckpointError("optimizer state not allocated before resume (internal ordering error)")
    for n, p in pm.trainable_parameters().items():
        for k in OPT_KEYS:
            if f"{n}::{k}" in tensors:
                safe_set_full_optimizer_state(p, tensors[f"{n}::{k}"].flatten().to(torch.float32), k)
    _set_optimizer_step_count(engine, opt_step)


def _prime_optimizer_state(engine) -> None:
    """Allocate Adam's moment buffers (lr 0, zero grads: parameters unchanged) so that a checkpoint's
    moments can be copied in. Torch's Adam creates its state lazily at the first step."""
    zero = engine.optimizer
    inner = zero.optimizer if hasattr(zero, "optimizer") else zero
    saved = [g["lr"] for g in inner.param_groups]
    for g in inner.param_groups:
        g["lr"] = 0.0
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3 swaps each flat sub-group into its param group
        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            gid = zero.sub_group_to_group_id[i]
            flat.grad = torch.zeros_like(flat)
            inner.param_groups[gid]["params"] = [flat]
            inner.step()
            inner.param_groups[gid]["params"] = []
            flat.grad = None
    else:
        for g in inner.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for g in inner.param_groups:
            for p in g["params"]:
                p.grad = None
    for g, lr in zip(inner.param_groups, saved):
        g["lr"] = lr


def measured_peak_flops(device, n: int = 8192, reps: int = 10) -> float:
    """bf16 matmul throughput of this GPU (the denominator of MFU), measured rather than looked up."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_token(config, seq_len: int, head_positions: int = 1) -> float:
    """Training FLOPs per token of LoRA fine-tuning: forward (2 FLOPs per weight) and activation gradients
    (another 2) through the frozen decoder linears, attention scores and values over the sequence
    (forward 4*L*S*d, backward twice that), and the LM head, which runs only on `head_positions` of every
    `seq_len` positions (trainer.objective uses logits_to_keep)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * h)
    kv = getattr(config, "num_key_value_heads", config.num_attention_heads) * (h // config.num_attention_heads)
    linears = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    attention = 12 * layers * seq_len * h
    head = 4 * config.vocab_size * h * head_positions / max(1, seq_len)
    return 4.0 * linears + attention + head


def gate_stats(pm, cond: torch.Tensor) -> dict[str, float]:
    """Mean gate entropy and per-expert load over the batch (averaged over layers)."""
    if getattr(pm, "gates", None) is None:
        return {}
    # Deterministic and side-effect free: gate dropout off, and no draw from the training RNG stream.
    was_training = pm.gates.training
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        pm.gates.eval()
        gates = pm.compute_gates(cond)
        pm.gates.train(was_training)
        g = torch.stack([v.float().reshape(v.shape[0], -1) for v in gates.values()])  # [layers, b, N]
        ent = -(g.clamp_min(1e-12).log() * g).sum(-1).mean().item()
        load = g.mean(dim=(0, 1))
    return {"gate_entropy": ent, **{f"expert_load_{i}": float(x) for i, x in enumerate(load)}}


def train_worker(params: dict[str, Any], rank: int, world: int, report: Callable[[dict], None]) -> dict[str, Any]:

    cfg = validate(params["config"])
    t = cfg.trainer
    use_gpu = t.use_gpu and torch.cuda.is_available()
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
    run_url = params["run_url"]
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))

    # ---- setup
    t_setup = time.perf_counter()
    _EVAL_WAIT[0] = 0.0
    _setup_distributed(use_gpu)
    import deepspeed

    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    ds_cfg = ds_config(t, use_gpu, cfg.model.dtype, world)
    pm, hf_ds = build_model(cfg, params["model_dir"], ds_cfg, use_gpu, params.get("hybrid"))
    names = pm.trainable_parameter_names()
    my_names = [n for i, n in enumerate(names) if i % world == rank]
    parts = fingerprint_parts(cfg)

    reader = StreamReader(params["streams"]["train"], timeout_s=params.get("feed_timeout_s", 3600.0))
    sched = Schedule(
        rows=reader.rows, global_batch=t.batch_size, world=world, micro=t.micro_batch_size, seed=cfg.run.seed
    )
    schedule_epochs = t.schedule_epochs or t.epochs
    total_steps = t.max_steps or sched.steps_per_epoch * t.epochs
    schedule_steps = t.max_steps or sched.steps_per_epoch * schedule_epochs

    resume_url = params.get("resume") or ckpt.latest_complete(run_url)
    state = ckpt.load(resume_url, rank, world, parts) if resume_url else None
    if state is not None:
        _load_params_before_engine(pm, state.tensors)

    optimizer = torch.optim.AdamW(
        pm.optimizer_param_groups(t.lr, t.weight_decay), lr=t.lr, betas=(0.9, 0.999), eps=1e-8
    )
    lam = lr_lambda(t, schedule_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=pm,
        optimizer=optimizer,
        config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, [lam] * len(opt.param_groups)),
    )
    start = 0
    if state is not None:
        _prime_optimizer_state(engine)
        _load_optimizer_after_engine(engine, pm, state.tensors, int(state.meta["optimizer_step"]))
        start = state.step
        # LambdaLR derives the rate from its step counter: set the counter, then the rates it implies.
        scheduler.last_epoch = start
        for g, base in zip(engine.optimizer.param_groups, scheduler.base_lrs):
            g["lr"] = base * lam(start)
        if state.rank_meta is not None:
            ckpt.set_rng_state(state.rank_meta["rng"])
        else:
            torch.manual_seed(cfg.run.seed * 1000 + rank + start)
        if rank == 0:
            print(f"[train] resumed from {resume_url} at step {start}", flush=True)
    else:
        torch.manual_seed(cfg.run.seed * 1000 + rank)

    pad_id = params["pad_id"]
    log_path = storage.join(run_url, "logs", "train.jsonl")
    history: list[dict] = (
        storage.read_json(log_path + ".json") if (start and storage.exists(log_path + ".json")) else []
    )
    history = [h for h in history if h["step"] <= start]
    tb = _TensorBoard(run_url) if rank == 0 else None
    if use_gpu and not params.get("peak_flops"):
        params["peak_flops"] = measured_peak_flops(device)
    bar = None
    if rank == 0 and params.get("interactive"):
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step")
    engine.train()
    tokens_seen = 0

    zero_shot = {}
    if start == 0 and params.get("eval_zero_shot") and "test" in params["streams"]:
        # B = 0 at step 0, so the personalized model is exactly the base LLM: its zero-shot score.
        zero_shot = {
            f"zeroshot_test_{k}": v for k, v in evaluate(engine, pm, params, "test", rank, world, device).items()
        }

    # ---- train
    t_train, wait_total = time.perf_counter(), 0.0
    for step in range(start, total_steps):
        t_step = time.perf_counter()
        wait = 0.0
        loss_sum = torch.zeros(1)
        tokens = 0
        gstats: dict[str, float] = {}
        hybrid_step = _curriculum(engine, pm, cfg.run.seed, step, total_steps)
        for micro_rows in sched.rank_rows(step, rank):
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in collate(reader.rows_at(micro_rows), pad_id).items()}
            wait += time.perf_counter() - t0
            loss, per_sample, _ = answer_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            loss_sum += per_sample.sum().cpu()
            tokens += int(batch["attention_mask"].sum())
            if not gstats and (step + 1) % t.log_every == 0:
                gstats = gate_stats(pm, batch["cond"])
        counts = _all_reduce_sum(torch.tensor([loss_sum.item(), float(tokens)], dtype=torch.float64))
        dt = time.perf_counter() - t_step
        wait_total += wait
        tokens_seen += int(counts[1])
        rec = {
            "step": step + 1,
            "epoch": sched.cursor(step)["epoch"],
            "loss": float(counts[0] / t.batch_size),
            "lr": float(engine.optimizer.param_groups[0]["lr"]),
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": float(counts[1] / dt),
            "samples_per_s": t.batch_size / dt,
            "data_wait_fraction": wait / dt,
            "step_seconds": dt,
            **gstats,
        }
        if hybrid_step is not None:
            rec["hybrid_prompt"] = float(hybrid_step)
        if use_gpu:
            fpt = flops_per_token(
                _base_config(pm), int(batch["input_ids"].shape[1]), int(batch["answer_len"].max()) + 1
            )
            rec["mfu"] = rec["tokens_per_s"] * fpt / (params["peak_flops"] * world)
        history.append(rec)
        if rank == 0 and (step + 1) % t.log_every == 0:
            print(
                "[train] "
                + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in rec.items()
                    if not k.startswith("expert_load")
                ),
                flush=True,
            )
            tb.add(rec)
        report({k: v for k, v in rec.items()})
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < total_steps and "valid" in params["streams"]:
            # Every rank evaluates (ZeRO-3 forwards are collective); rank 0 logs.
            ev = {f"valid_{k}": v for k, v in evaluate(engine, pm, params, "valid", rank, world, device).items()}
            rec.update(ev)
            if rank == 0:
                print(
                    "[eval] step " + str(step + 1) + " " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()), flush=True
                )
                tb.add({"step": rec["step"], **ev})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < total_steps:
            _save(engine, pm, names, my_names, run_url, step + 1, rank, world, sched, reader, parts, t, history, tb)
        _maybe_fail(params.get("fail_at"), step + 1, rank)
        if params.get("pause_after_checkpoint") and t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
            time.sleep(params["pause_after_checkpoint"])  # tests: a window in which to preempt a node

    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_train

    # ---- evaluate and save
    metrics = {}
    for split in ("valid", "test"):
        if split in params["streams"]:
            metrics.update(
                {f"{split}_{k}": v for k, v in evaluate(engine, pm, params, split, rank, world, device).items()}
            )
    metrics.update(zero_shot)
    if rank == 0 and metrics:
        print("[eval] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    final = _save(
        engine,
        pm,
        names,
        my_names,
        run_url,
        total_steps,
        rank,
        world,
        sched,
        reader,
        parts,
        t,
        history,
        tb,
        metrics=metrics,
    )
    _export_adapter(pm, run_url, rank)
    if rank == 0:
        # Data wait: time the step loop spent on batches, including waiting for feed parts still being built.
        worker_seconds = time.perf_counter() - t_setup
        timing = {
            "setup_seconds": t_train - t_setup,
            "train_seconds": train_seconds,
            "data_wait_seconds": wait_total,
            "data_wait_fraction": wait_total / train_seconds if train_seconds > 0 else 0.0,
            "eval_wait_seconds": _EVAL_WAIT[0],
            "worker_seconds": worker_seconds,
            # every wait for data (steps and evaluations) over the worker's whole life
            "total_wait_fraction": (wait_total + _EVAL_WAIT[0]) / worker_seconds,
            "steps_run": total_steps - start,
        }
        storage.write_json_atomic(
            storage.join(run_url, "metrics.json"),
            {"final": metrics, "steps": total_steps, "checkpoint": final, "timing": timing},
        )
        tb.close()
    report({"step": total_steps, **metrics, "done": 1})
    reader.close()
    del hf_ds
    return {"metrics": metrics, "history": history if rank == 0 else []}


def _base_config(pm):
    inner = pm.pm if hasattr(pm, "pm") else pm
    return inner.lm.get_base_model().config


def _curriculum(engine, model, seed: int, step: int, total: int) -> bool | None:
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


def _maybe_fail(fail_at: dict | None, step: int, rank: int) -> None:
    """Fault injection for tests: SIGKILL this worker process once at a given step."""
    if not fail_at or fail_at["step"] != step or fail_at["rank"] != rank or os.path.exists(fail_at["marker"]):
        return
    Path(fail_at["marker"]).write_text(str(step))
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _save(
    engine, pm, names, my_names, run_url, step, rank, world, sched, reader, parts, t, history, tb, metrics=None
) -> str:
    full = _full_state(engine, pm, names)  # collective: every rank walks every parameter in the same order
    mine = {k: v for k, v in full.items() if k.split("::")[0] in set(my_names)}
    cur = sched.cursor(min(step, sched.steps_per_epoch * 10**9))
    rank_meta = {"rng": ckpt.rng_state(), "cursor": {**cur, **reader.position(cur["row"] % max(reader.rows, 1))}}
    meta = None
    if rank == 0:
        meta = {
            "fingerprint": ckpt.config_fingerprint(parts),
            "fingerprint_parts": parts,
            "optimizer_step": _optimizer_step_count(engine),
            "metrics": metrics or {},
            "trainable_names": names,
            "last_log": history[-1] if history else None,
        }
        storage.write_json_atomic(storage.join(run_url, "logs", "train.jsonl.json"), history)
        storage.write_bytes_atomic(
            storage.join(run_url, "logs", "train.jsonl"), "".join(json.dumps(h) + "\n" for h in history).encode()
        )
        tb.flush_to(run_url)
    url = ckpt.save(run_url, step, rank, world, mine, rank_meta, meta, _barrier)
    if rank == 0:
        ckpt.prune(run_url, t.keep_last)
    return url


def _export_adapter(pm, run_url: str, rank: int) -> None:
    """Bank + gates as safetensors and a PEFT folder (collective gather; rank 0 uploads)."""
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_adapter(tmp)
        if rank == 0:
            for f in Path(tmp).iterdir():
                storage.write_bytes_atomic(storage.join(run_url, "adapter", f.name), f.read_bytes())
    _barrier()


def evaluate(engine, pm, params, split: str, rank: int, world: int, device) -> dict[str, float]:
    """Score the whole split; every rank runs the same number of forwards (ZeRO-3 forwards are collective)."""
    reader = StreamReader(params["streams"][split], timeout_s=params.get("feed_timeout_s", 3600.0))
    try:
        return _evaluate(engine, pm, params, split, rank, world, device, reader)
    finally:
        _EVAL_WAIT[0] += reader.waited  # time the evaluation spent waiting for feed parts


# Seconds evaluations of this worker spent waiting for feed parts (zero-shot evaluation may run while the
# feed is still building the test split).
_EVAL_WAIT = [0.0]


def _evaluate(engine, pm, params, split: str, rank: int, world: int, device, reader) -> dict[str, float]:

    n = reader.rows
    per_rank = -(-n // world)
    idx = np.arange(rank, per_rank * world, world)  # padded: indices >= n repeat row 0 and are dropped
    valid = idx < n
    idx = np.where(valid, idx, 0)
    bs = params["eval_batch_size"]
    if hasattr(pm, "hybrid"):
        pm.hybrid = True  # evaluate with the full hybrid prompt
    engine.eval()
    rows_out = []
    with torch.no_grad():
        for s in range(0, len(idx), bs):
            rows = reader.rows_at(idx[s : s + bs])
            batch = {k: v.to(device) for k, v in collate(rows, params["pad_id"]).items()}
            if params["task"] == "ctr":
                _, nll, logits = answer_loss(engine, batch)
                p = p_yes_from_logits(logits, batch["answer_len"], params["yes_id"], params["no_id"])
                rows_out.append(torch.stack([batch["label"].double().cpu(), p.double().cpu(), nll.double().cpu()], 1))
            else:
                sc = candidate_scores(
                    engine, rows, params["pad_id"], lambda c: params["answer_ids"][str(c)], batch["cond"], device
                )
                target = torch.tensor([r["candidates"].index(r["item_id"]) for r in rows], dtype=torch.float64)
                rows_out.append(torch.cat([target.unsqueeze(1), sc.double().cpu()], 1))
    engine.train()
    reader.close()
    mine = torch.cat(rows_out) if rows_out else torch.zeros(0, 3, dtype=torch.float64)
    mine = torch.cat([torch.from_numpy(valid.astype(np.float64)).unsqueeze(1), mine], 1)
    allrows = _all_gather_rows(mine, world)
    allrows = allrows[allrows[:, 0] > 0][:, 1:].numpy()
    if params["task"] == "ctr":
        out = ctr_metrics(allrows[:, 0].astype(int), allrows[:, 1])
        out["answer_nll"] = float(allrows[:, 2].mean())
    else:
        out = ranking_metrics(allrows[:, 1:], allrows[:, 0].astype(int))
    out["n"] = float(len(allrows))
    return out


class _TensorBoard:
    """Event files written locally and uploaded beside the run (object stores cannot append)."""

    def __init__(self, run_url: str):
        from tensorboardX import SummaryWriter

        self.dir = tempfile.mkdtemp(prefix="reclora-tb-")
        self.writer = SummaryWriter(self.dir)

    def add(self, rec: dict) -> None:
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"train/{k}", v, rec["step"])

    def flush_to(self, run_url: str) -> None:
        self.writer.flush()
        for f in Path(self.dir).iterdir():
            storage.write_bytes_atomic(storage.join(run_url, "tensorboard", f.name), f.read_bytes())

    def close(self) -> None:
        self.writer.close()
        shutil.rmtree(self.dir, ignore_errors=True)  # its files are already uploaded beside the run
