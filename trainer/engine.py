"""The DeepSpeed engine of one training worker and its state.

ds_config (ZeRO-3 by default) -> build_model (base under zero.Init, adapter, optional hybrid projector) ->
build_engine (AdamW + LR schedule in deepspeed.initialize, buffers on the engine's device) -> restore (a
checkpoint's parameters before the engine, Adam moments and step counters after it). Plus the ZeRO
optimizer-state surgery those need and the distributed setup. Knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import yaml
from torch import nn

from configs.loader import ConfigError
from recdata import storage
from recdata.model_source import load_kwargs
from trainer import checkpoint as ckpt
from trainer.hybrid import HybridLM
from trainer.lora import MixtureLoraConfig, build_personalized_model
from trainer.prepare import worker_model_dir

OPT_KEYS = ("exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------------------------------ distributed
def setup_distributed(use_gpu: bool) -> torch.device:
    """torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU); returns this worker's device."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # On CPU, DeepSpeed otherwise JIT-compiles a shared-memory comm op (about 2.5 minutes) at init.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------ config
def ds_config(t, use_gpu: bool, dtype: str, world: int) -> dict[str, Any]:
    """DeepSpeed config of the typed trainer config `t` (configs.schema.TrainerConfig) with `world` workers."""
    cfg: dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_iters(world),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.zero_stage == 3:
        z = cfg["zero_optimization"]
        if use_gpu:
            # DeepSpeed's documented ZeRO-3 settings for a large frozen base: small parameters stay resident
            # instead of being gathered per use (1e6 elements: at 7B every norm, LoRA factor bank (16 experts x
            # r 8 x 4096 = 524k) and the stacked gate MLP (983k) stays whole, every base linear (>= 16.7M) is
            # partitioned), a 50M-element prefetch bucket overlaps the next layer's all-gather with compute, and
            # 1e9 live/reused elements keep a 7B layer's weights resident through its forward and recomputation.
            z.update({"stage3_param_persistence_threshold": 1e6, "stage3_prefetch_bucket_size": 5e7,
                      "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                      "overlap_comm": True, "contiguous_gradients": True})  # fmt: skip
            if t.zero_quantized_weights:
                z["zero_quantized_weights"] = True
        else:
            # CPU (tests, laptops): every parameter partitioned, so multi-rank CPU runs exercise the gathers.
            z.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e7})
        hpz = t.zero_hpz_partition_size
        # ZeRO++ hpZ: a secondary weight partition inside each node (hpz = GPUs per node), so the per-layer
        # all-gathers stay on the node's NVLink. Only across nodes: with `world` <= hpz every rank is on one
        # node already and the secondary copy would only cost memory (bench and 1-node runs of a 7B preset).
        if hpz > 1 and world > hpz:
            if world % hpz:
                raise ConfigError(
                    f"trainer.zero_hpz_partition_size: {hpz} (GPUs per node) does not divide the {world} workers; "
                    f"use whole nodes, or set it to 1 to turn hierarchical partitioning off"
                )
            z["zero_hpz_partition_size"] = hpz
    if use_gpu and dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif use_gpu and dtype == "float16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling
    return merge_config(cfg, user_deepspeed_config(t.deepspeed))


def user_deepspeed_config(spec: dict | str | None) -> dict[str, Any]:
    """`trainer.deepspeed`: a mapping, or a JSON/YAML file (local or on storage)."""
    data = dict(spec or {}) if spec is None or isinstance(spec, dict) else read_deepspeed_file(spec)
    own = sorted(set(data) & set(OWN_KEYS))
    if own:
        raise ConfigError(f"trainer.deepspeed: {own[0]} comes from trainer.{OWN_KEYS[own[0]]}; set it there")
    return data


def read_deepspeed_file(spec: str) -> dict[str, Any]:
    if not storage.exists(spec):
        raise ConfigError(f"trainer.deepspeed: {spec} not found (give a mapping or a JSON/YAML file)")
    fs, path = storage.get_fs(spec)
    with storage.storage_errors(spec):
        data = yaml.safe_load(fs.cat_file(path).decode("utf-8"))  # YAML is a superset of JSON
    if not isinstance(data, dict):
        raise ConfigError(f"trainer.deepspeed: {spec} must hold a mapping, got {type(data).__name__}")
    return data


# Batch geometry is the trainer's (its Schedule decides which rows each rank reads): not overridable.
OWN_KEYS = {"train_batch_size": "batch_size", "train_micro_batch_size_per_gpu": "micro_batch_size",
            "gradient_accumulation_steps": "batch_size / micro_batch_size"}  # fmt: skip


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, mappings recursively (the user's keys win)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_scheduler(optimizer: torch.optim.Optimizer, t, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule from transformers.get_scheduler (what HF Trainer, LLaMA-Factory and axolotl users know):
    linear warmup over `warmup_ratio` of the steps, then linear / cosine decay to `min_lr_ratio` x lr over
    `total_steps` (RecLoRA stretches it over `schedule_epochs`), or constant. Linear decay to a floor above 0 is
    transformers' warmup-stable-decay schedule with no stable phase."""
    from transformers import get_scheduler

    warm = int(round(t.warmup_ratio * total_steps))
    if t.schedule == "constant":
        name, extra = "constant_with_warmup", {}
    elif t.schedule == "cosine":
        name, extra = "cosine_with_min_lr", {"min_lr_rate": t.min_lr_ratio}
    elif t.min_lr_ratio > 0:
        name = "warmup_stable_decay"
        extra = {"num_decay_steps": max(1, total_steps - warm), "decay_type": "linear", "min_lr_ratio": t.min_lr_ratio}
    else:
        name, extra = "linear", {}
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warm,
        num_training_steps=max(1, total_steps),
        scheduler_specific_kwargs=extra,
    )


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg, model_dir: str | None, ds_cfg: dict, use_gpu: bool, hybrid: dict | None = None, base_config=None):
    """Base model under zero.Init (via HfDeepSpeedConfig, kept alive by the caller), then the adapter.

    The base comes from `model_dir` (a prepared HF folder), or, given `base_config` (a transformers config),
    is built with random weights (benchmarks); without ZeRO-3 that one is built on the GPU directly.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_cfg["zero_optimization"]["stage"] == 3
    hf_ds = HfDeepSpeedConfig(ds_cfg) if zero3 else None
    dtype = getattr(torch, cfg.model.dtype) if use_gpu else torch.float32
    if base_config is None:
        base = AutoModelForCausalLM.from_pretrained(
            worker_model_dir(model_dir, cfg.model), dtype=dtype, **load_kwargs(cfg.model)
        )
    else:
        torch.manual_seed(cfg.run.seed)
        # zero.Init places (and partitions) ZeRO-3 parameters itself; otherwise build on the GPU directly.
        gpu = use_gpu and not zero3
        with torch.device("cuda", torch.cuda.current_device()) if gpu else contextlib.nullcontext():
            base = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    base.config.use_cache = False
    # Same seed on every rank: adapter initialisation must not depend on the number of workers.
    torch.manual_seed(cfg.run.seed)
    pm = build_personalized_model(base, MixtureLoraConfig.from_config(cfg), seed=cfg.run.seed)
    if cfg.trainer.activation_checkpointing:
        pm.activation_checkpointing_enable()
    if hybrid:
        from safetensors.torch import load as st_load

        fs, path = storage.get_fs(hybrid["item_emb_url"])
        with storage.storage_errors(hybrid["item_emb_url"]), fs.open(path, "rb") as f:
            table = st_load(f.read())
        pm = HybridLM(pm, table["item_ids"].numpy(), table["emb"], hybrid["slot_token_ids"], hybrid["text_token_id"])
    return pm, hf_ds


def build_engine(pm: nn.Module, ds_cfg: dict, t, schedule_steps: int):
    """AdamW over the model's parameter groups and the LR schedule in deepspeed.initialize.

    Returns (engine, scheduler, lam) with lam the schedule's multiplier of step. Buffers the forward reads
    (the hybrid model's item table) are moved to the engine's device: deepspeed.initialize moves only
    parameters when the model was built under zero.Init.
    """
    import deepspeed

    optimizer = torch.optim.AdamW(
        # trainer.weight_decay decays the router/gates and the projector only; the LoRA bank never (both papers'
        # code: iLoRA decays projector and router, RecLoRA nothing).
        pm.optimizer_param_groups(t.lr, weight_decay=0.0, gate_weight_decay=t.weight_decay),
        lr=t.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=pm, optimizer=optimizer, config=ds_cfg, lr_scheduler=lambda opt: lr_scheduler(opt, t, schedule_steps)
    )
    move_buffers(pm, engine.device)
    return engine, scheduler, scheduler.lr_lambdas[0]


def move_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Every buffer of the model on `device` (in place: the module keeps the same objects' names)."""
    device = torch.device(device)
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                setattr(module, name, buf.to(device))


# ------------------------------------------------------------------------------------------------ resume
def restore(engine, pm, scheduler, lam, state, rank: int, seed: int) -> int:
    """Bring a freshly built engine to the checkpoint `state` (parameters already loaded with
    load_params_before_engine): Adam moments, step counters, learning rates, RNG. Returns the start step."""
    prime_optimizer_state(engine)
    load_optimizer_after_engine(engine, pm, state.tensors, int(state.meta["optimizer_step"]))
    start = state.step
    # LambdaLR derives the rate from its step counter: set the counter, then the rates it implies.
    scheduler.last_epoch = start
    for g, base in zip(engine.optimizer.param_groups, scheduler.base_lrs):
        g["lr"] = base * lam(start)
    if state.rank_meta is not None:
        ckpt.set_rng_state(state.rank_meta["rng"])
    else:
        torch.manual_seed(seed * 1000 + rank + start)
    return start


def inner_optimizer(engine):
    return engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer


def full_state(engine, pm, names: list[str]) -> dict[str, torch.Tensor]:
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


def optimizer_step_count(engine) -> int:
    for st in inner_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"].item() if torch.is_tensor(st["step"]) else st["step"])
    return 0


def set_optimizer_step_count(engine, step: int) -> None:
    for st in inner_optimizer(engine).state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def load_params_before_engine(pm, tensors: dict[str, torch.Tensor]) -> None:
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


def load_optimizer_after_engine(engine, pm, tensors: dict[str, torch.Tensor], opt_step: int) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    if opt_step == 0:
        return
    # Adam state exists only after the first step: prime_optimizer_state allocated it.
    if not any(inner_optimizer(engine).state.values()):
        raise ckpt.CheckpointError("optimizer state not allocated before resume (internal ordering error)")
    for n, p in pm.trainable_parameters().items():
        for k in OPT_KEYS:
            if f"{n}::{k}" in tensors:
                safe_set_full_optimizer_state(p, tensors[f"{n}::{k}"].flatten().to(torch.float32), k)
    set_optimizer_step_count(engine, opt_step)


def prime_optimizer_state(engine) -> None:
    """Allocate Adam's moment buffers (lr 0, zero grads: parameters unchanged) so that a checkpoint's
    moments can be copied in. Torch's Adam creates its state lazily at the first step."""
    zero = engine.optimizer
    inner = inner_optimizer(engine)
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
