"""What a training worker reports about itself: the step record (throughput, FLOPs per token and MFU, gate
statistics), its log lines and TensorBoard event files."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from recdata import storage


def measured_peak_flops(device, n: int | None = None, reps: int | None = None, dtype: torch.dtype | None = None):
    """Matmul throughput of this device (the denominator of MFU), measured rather than looked up: bf16 8192^3
    on a GPU, fp32 1024^3 on the CPU (what the trainer computes in there)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = n or (8192 if gpu else 1024)
    reps = reps or (10 if gpu else 3)
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    for _ in range(2):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
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


def mfu(tokens_per_s: float, config, seq_len: int, head_positions: int, peak_flops: float, world: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOPs over the peak of all `world` devices."""
    return tokens_per_s * flops_per_token(config, seq_len, head_positions) / (peak_flops * world)


def base_config(pm):
    """The HF config of the frozen base model under a PersonalizedLM (or a HybridLM around one)."""
    inner = pm.pm if hasattr(pm, "pm") else pm
    return inner.lm.get_base_model().config


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


def log_line(tag: str, rec: dict) -> str:
    """`[tag] k=v ...` of a step record (per-expert loads left out)."""
    return f"[{tag}] " + " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in rec.items()
        if not k.startswith("expert_load")
    )


class TensorBoard:
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
