"""What a training worker reports about itself: the step record (`StepMeter`: throughput, model FLOPs and MFU,
gate statistics) and its log lines; trainer/tracking.py sends the records to TensorBoard, MLflow and W&B.

MFU (model FLOPs utilisation) = model FLOPs per second / peak FLOP/s of the devices. Two peaks are used:

* the **spec** peak (the headline `mfu`): the GPU's dense bf16 tensor-core figure from NVIDIA's spec sheet
  (`SPEC_PEAK_TFLOPS`, looked up by `torch.cuda.get_device_name`), or `trainer.peak_tflops` when set;
* the **measured** peak (`mfu_measured`): a matmul timed on the device (`measured_peak_flops`: bf16 8192^3 on a
  GPU, fp32 1024^3 on the CPU). On a CPU there is no spec, so the headline is against the measured peak.

Model FLOPs of a LoRA training step (`step_flops`) count what the model needs, not what the kernels do: the
frozen linears 4N per token (2N forward + 2N activation gradients, no weight gradients), the trainable
parameters 6N per token (forward, activation and weight gradients), attention over each sequence's real
(unpadded) length, and the frozen LM head on the positions it runs on. Padding and the recompute of
activation checkpointing are not model FLOPs.
"""

from __future__ import annotations

import math
import time

import torch

from trainer.evaluate import all_reduce_sum

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's spec sheets, matched as case-insensitive
# substrings of torch.cuda.get_device_name(); first match wins, so specific names come before general ones.
# A GPU not listed (or A10G, AWS's variant, which the sheets do not cover) has no spec peak: set
# trainer.peak_tflops (headline MFU then uses it) or read mfu_measured.
SPEC_PEAK_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # H200 SXM, GH200
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # SXM4 and PCIe, 40 and 80 GB
    ("A10G", None),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def spec_peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 spec peak (FLOP/s) of a GPU named `device_name`, or None when the table has no figure."""
    name = (device_name or "").lower()
    for key, tflops in SPEC_PEAK_TFLOPS:
        if key.lower() in name:
            return None if tflops is None else tflops * 1e12
    return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def device_peaks(device, peak_tflops: float | None = None, measured: float | None = None) -> dict[str, float | None]:
    """{"spec": FLOP/s or None, "measured": FLOP/s} of one device. `peak_tflops` (trainer.peak_tflops)
    overrides the spec table; `measured` (a figure the caller already has) skips the timing."""
    device = torch.device(device)
    spec = peak_tflops * 1e12 if peak_tflops else None
    if spec is None and device.type == "cuda":
        spec = spec_peak_flops(torch.cuda.get_device_name(device))
    return {"spec": spec, "measured": measured or measured_peak_flops(device)}


def measured_peak_flops(device, n: int | None = None, reps: int | None = None, dtype: torch.dtype | None = None):
    """Matmul throughput of this device (the denominator of `mfu_measured`), timed rather than looked up: bf16
    8192^3 on a GPU, fp32 1024^3 on the CPU (what the trainer computes in there)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = n or (8192 if gpu else 1024)
    reps = reps or (10 if gpu else 8)
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    # A private generator: drawing from the global one would shift the training RNG stream (gate dropout) and
    # break "a resumed run reproduces the uninterrupted one" (it runs after the seed or the restored RNG).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    for _ in range(2):
        a @ b
    sync()
    # The fastest of `reps` timed products: a peak is a best case, and on a shared machine (or a GPU still busy with
    # another kernel) an average over a contended interval understates it, which showed as CPU "MFU" near 100%.
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def frozen_linear_params(config) -> int:
    """Weights of the decoder's linears (q, k, v, o, gate, up, down) of an HF Llama-style config."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None) or 4 * h
    return layers * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * inter)


def step_flops(config, tokens: float, seq_sq: float, head_tokens: float, trainable_params: int = 0) -> float:
    """Model FLOPs of a LoRA training step over `tokens` real (non-padding) tokens, in sequences whose real
    lengths squared sum to `seq_sq`, with the LM head run on `head_tokens` positions in all:

        (4 N_frozen + 6 N_trainable) * tokens      frozen decoder linears: 2N forward + 2N activation gradients;
                                                   trainable (adapter, gates): forward + activation + weight grads
      + 12 L (H d_head) * sum(S_i^2)               attention scores QK^T and values PV: 4 L S^2 d forward,
                                                   8 L S^2 d backward; the full S x S (PaLM's convention)
      + 4 V d * head_tokens                        frozen LM head (trainer.objective: logits_to_keep)

    Gates run once per sample rather than per token; they are counted per token (a few % of the adapter at
    most). Padding and activation-checkpointing recompute are not counted (they are not model FLOPs)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    width = config.num_attention_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    linear = (4 * frozen_linear_params(config) + 6 * trainable_params) * tokens
    attention = 12 * layers * width * seq_sq
    head = 4 * config.vocab_size * h * head_tokens
    return float(linear + attention + head)


def flops_per_token(config, seq_len: int, head_positions: int = 1, trainable_params: int = 0) -> float:
    """`step_flops` per token of sequences that all have `seq_len` real tokens and `head_positions` LM-head
    positions each."""
    return step_flops(config, seq_len, seq_len**2, head_positions, trainable_params) / max(1, seq_len)


def mfu(flops_per_s: float, peak_flops: float | None, world: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s (all ranks together) over the peak of all `world`
    devices; None without a peak."""
    return flops_per_s / (peak_flops * world) if peak_flops else None


def trainable_count(pm) -> int:
    """Trainable parameters of a PersonalizedLM / HybridLM (full sizes under ZeRO-3)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in pm.trainable_parameters().values())


def base_config(pm):
    """The HF config of the frozen base model under a PersonalizedLM (or a HybridLM around one)."""
    inner = pm.pm if hasattr(pm, "pm") else pm
    return inner.lm.get_base_model().config


def gate_stats(pm, cond: torch.Tensor) -> dict[str, float]:
    """Mean gate entropy, gate spread and per-expert load over the batch (averaged over layers).

    Entropy near ln N says the mixtures are flat; it does not say whether users differ. Spread does: the mean
    total-variation distance of a sample's gate from the batch-mean gate (0 = every sample gets the same mixture,
    i.e. no personalization, at any entropy; 1 - 1/N at most)."""
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
        spread = 0.5 * (g - g.mean(1, keepdim=True)).abs().sum(-1).mean().item()
        load = g.mean(dim=(0, 1))
    return {"gate_entropy": ent, "gate_spread": spread, **{f"expert_load_{i}": float(x) for i, x in enumerate(load)}}


def log_line(tag: str, rec: dict) -> str:
    """`[tag] k=v ...` of a step record (per-expert loads left out)."""
    return f"[{tag}] " + " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in rec.items()
        if not k.startswith("expert_load")
    )


class StepMeter:
    """The step record of one optimizer step: the ranks' counts all-reduced (loss, real and padded tokens, the
    model-FLOPs terms), throughput, padding fraction, MFU against the spec and the measured peak, gate statistics.
    `waited` sums the steps' data wait."""

    def __init__(self, engine, pm, sched, batch_size: int, world: int, device, peaks: dict[str, float | None]):
        self.engine, self.sched, self.batch_size, self.world, self.device = engine, sched, batch_size, world, device
        self.config, self.trainable, self.peaks = base_config(pm), trainable_count(pm), peaks
        self.waited = 0.0

    def record(self, step: int, res, t_start: float, hybrid_step: bool | None = None) -> dict:
        """`res`: this rank's trainer.loop.StepResult of 0-based `step`, begun at `t_start` (perf_counter); the
        step's time includes the all-reduce of the counts (the ranks meet there)."""
        totals = torch.tensor(
            [res.loss_sum, res.tokens, res.padded_tokens, res.seq_sq, res.head_tokens], dtype=torch.float64
        )
        counts = all_reduce_sum(totals, self.device).cpu()
        seconds = time.perf_counter() - t_start
        self.waited += res.wait
        rec = {
            "step": step + 1,
            "epoch": self.sched.cursor(step)["epoch"],
            "loss": float(counts[0] / self.batch_size),
            "lr": float(self.engine.optimizer.param_groups[0]["lr"]),
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": float(counts[1] / seconds),
            "padding_fraction": float(1.0 - counts[1] / counts[2].clamp(min=1.0)),
            "samples_per_s": self.batch_size / seconds,
            "data_wait_fraction": res.wait / seconds,
            "step_seconds": seconds,
            **res.gate_stats,
        }
        if hybrid_step is not None:
            rec["hybrid_prompt"] = float(hybrid_step)
        flops_per_s = step_flops(self.config, *counts[[1, 3, 4]].tolist(), self.trainable) / seconds
        rec["mfu"] = mfu(flops_per_s, self.peaks["spec"] or self.peaks["measured"], self.world)
        rec["mfu_measured"] = mfu(flops_per_s, self.peaks["measured"], self.world)
        return rec
