"""Where the embed and teacher stages run, decided from what the Ray cluster offers, never from the driver.

Under `ray job submit` on KubeRay the driver runs on the head pod, which has no GPU: `torch.cuda.is_available()`
there says nothing about the workers. `place_stage` is the pure decision (the cluster's resources in, a
`Placement` out); `stage_placement` asks the running cluster (`ray.cluster_resources()`). A base model over
`LARGE_MODEL_PARAMS` parameters that would run in float32 on CPU is refused with a one-line error naming the
stage and the fix (`refuse_large_on_cpu`), unless `run.allow_large_on_cpu` is set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from configs.errors import RecloraError
from configs.logs import get_logger

log = get_logger(__name__)

LARGE_MODEL_PARAMS = 1_000_000_000  # above this, float32 on CPU takes hours for what a GPU does in minutes


class PlacementError(RecloraError, RuntimeError):
    """A stage would run where it cannot finish in reasonable time (a large model on CPU in float32)."""


@dataclass(frozen=True)
class Placement:
    stage: str
    use_gpu: bool
    num_workers: int  # Ray actors (embed) or Ray Train workers (teacher, train)
    gpus_per_worker: float
    dtype: str  # what the model is loaded in on the worker: the configured dtype on GPU, float32 on CPU
    cluster_gpus: float  # what the cluster offered when the decision was made

    def describe(self) -> str:
        where = f"{self.num_workers} GPU worker(s)" if self.use_gpu else f"{self.num_workers} CPU worker(s)"
        return f"[{self.stage}] on {where}, {self.dtype} (cluster GPUs: {self.cluster_gpus:g})"


def place_stage(
    stage: str, resources: Mapping[str, float], *, device: str = "auto", workers: int = 1, dtype: str = "float32"
) -> Placement:
    """The decision for `stage` ("embed" or "teacher") given the cluster's resources (`ray.cluster_resources()`).

    device: auto = GPU workers when the cluster has a GPU, else CPU; cuda = GPU workers even when none is there
    yet (GPU worker groups that autoscale from zero); cpu = never a GPU. On GPUs the embed stage gets one actor
    per GPU up to `workers` (each actor loads the model once, num_gpus=1) and the model in `dtype`; the teacher
    trains on `workers` Ray Train workers with a GPU each. On CPU everything is float32 (what CPUs compute fast).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    gpus = float(resources.get("GPU", 0.0) or 0.0)
    use_gpu = device == "cuda" or (device == "auto" and gpus >= 1)
    n = max(1, int(workers))
    if use_gpu and stage == "embed" and gpus >= 1:
        n = min(n, int(gpus))  # a GPU actor per GPU at most: more would wait for a GPU the others hold
    return Placement(
        stage=stage,
        use_gpu=use_gpu,
        num_workers=n,
        gpus_per_worker=1.0 if use_gpu else 0.0,
        dtype=dtype if use_gpu else "float32",
        cluster_gpus=gpus,
    )


def stage_placement(stage: str, *, device: str = "auto", workers: int = 1, dtype: str = "float32") -> Placement:
    """`place_stage` with the running Ray cluster's resources (joins or starts Ray). Asked only for auto."""
    resources: Mapping[str, float] = {}
    if device == "auto":
        from cluster.runtime import init_ray

        resources = init_ray().cluster_resources()
    return place_stage(stage, resources, device=device, workers=workers, dtype=dtype)


def estimate_params(config: Mapping[str, Any]) -> int | None:
    """Parameter count of a decoder-only transformer from its Hugging Face config.json (None when the config
    lacks the sizes): embeddings (tied or not) + per layer attention (grouped KV heads) and a gated MLP.
    Accurate to a few percent for Llama-family models, which is all a size threshold needs."""
    c = dict(config.get("text_config") or config)
    h = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
    layers = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
    vocab = c.get("vocab_size")
    if not (h and layers and vocab):
        return None
    heads = c.get("num_attention_heads") or c.get("n_head") or 1
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or h // heads
    inter = c.get("intermediate_size") or c.get("n_inner") or 4 * h
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o + k, v
    mlp = 3 * h * inter  # gate, up, down
    emb = vocab * h * (1 if c.get("tie_word_embeddings", config.get("tie_word_embeddings", False)) else 2)
    return int(layers * (attn + mlp) + emb)


def model_params(model_dir: str) -> int | None:
    """`estimate_params` of the config.json in a local model folder (None without one)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return estimate_params(json.load(f))


def refuse_large_on_cpu(placement: Placement, params: int | None, model: str, why: str, fix: str) -> None:
    """One-line PlacementError when a model over LARGE_MODEL_PARAMS would run in float32 on CPU."""
    if placement.use_gpu or params is None or params <= LARGE_MODEL_PARAMS or placement.dtype != "float32":
        return
    raise PlacementError(
        f"{placement.stage} stage: {model} has ~{params / 1e9:.1f}B parameters and would run in float32 on CPU "
        f"({why}); {fix}, use a smaller model.name_or_path, or set run.allow_large_on_cpu=true to run it anyway"
    )


def cpu_reason(placement: Placement, device: str) -> tuple[str, str]:
    """(why a stage landed on CPU, how to get it a GPU), for refuse_large_on_cpu's message."""
    if device == "cpu":
        return "run.stage_device=cpu", "set run.stage_device=auto on a Ray cluster with GPU workers"
    return (
        f"the Ray cluster has {placement.cluster_gpus:g} GPUs",
        "run it on a Ray cluster with GPU workers (run.stage_device=cuda when they autoscale from zero)",
    )


def base_model_params(model_ref: str, model_cfg: Any = None, tiny: bool = False) -> int | None:
    """Parameters of a model reference from its config.json alone (the driver fetches config and tokenizer,
    never the weights); None for a tiny random model, small by construction."""
    if tiny:
        return None
    from recdata.model_source import tokenizer_dir

    return model_params(tokenizer_dir(model_ref, model_cfg=model_cfg))


def place_embed(
    *, workers: int, dtype: str, model: str, model_cfg: Any = None, run_cfg: Any = None
) -> tuple[int, float, str]:
    """For `reclora embed` (retrieval.embed_items.main's `place`): (actors, GPUs per actor, dtype) from the Ray
    cluster, refusing a large model on CPU unless run.allow_large_on_cpu."""
    device = getattr(run_cfg, "stage_device", "auto")
    p = stage_placement("embed", device=device, workers=workers, dtype=dtype)
    log.info("%s", p.describe())
    if not p.use_gpu and not getattr(run_cfg, "allow_large_on_cpu", False):
        refuse_large_on_cpu(p, base_model_params(model, model_cfg), model, *cpu_reason(p, device))
    return p.num_workers, p.gpus_per_worker, p.dtype


def teacher_uses_gpu(device: str = "auto") -> bool:
    """For `reclora teacher` (teacher.train.main's `place`): whether its Ray Train workers get a GPU."""
    p = stage_placement("teacher", device=device)
    log.info("%s", p.describe())
    return p.use_gpu
