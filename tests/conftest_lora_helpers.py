"""Shared helpers for the mixture-LoRA tests: straightforward reference formulations and tiny models.

Not a conftest (no fixtures); imported by tests/test_lora.py and tests/test_lora_deepspeed.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.tiny import build_tiny_llama, shared_config_missing_reason

ILORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECLORA_TARGETS = ["q_proj", "v_proj"]
SMALL_VOCAB = 512


def tiny_llama(**kwargs) -> nn.Module:
    """build_tiny_llama, or skip the test when ../shared (the source config) is absent."""
    if reason := shared_config_missing_reason():
        pytest.skip(reason)
    kwargs.setdefault("vocab_size", SMALL_VOCAB)
    return build_tiny_llama(**kwargs)


def ref_ilora_loop(x, w0, a, b, gate, scaling, num_experts):
    """iLoRA as written: y = W0 x + s * sum_k g_k B_k A_k x, one expert at a time."""
    r = a.shape[0] // num_experts
    y = x @ w0.T
    for k in range(num_experts):
        a_k, b_k = a[k * r : (k + 1) * r], b[:, k * r : (k + 1) * r]
        y = y + scaling * gate[:, k, None, None] * ((x @ a_k.T) @ b_k.T)
    return y


def ref_reclora_bmm(x, w0, a, b, gate, scaling, num_experts):
    """RecLoRA as written: materialized A_u = sum_k g_k A_k, B_u = sum_k g_k B_k, per-sample bmm."""
    r = a.shape[0] // num_experts
    a_u = torch.einsum("bn,nri->bri", gate, a.view(num_experts, r, -1))  # (B, r, d_in)
    b_u = torch.einsum("bn,onr->bor", gate, b.view(b.shape[0], num_experts, r))  # (B, d_out, r)
    return x @ w0.T + scaling * torch.bmm(torch.bmm(x, a_u.transpose(1, 2)), b_u.transpose(1, 2))


def randomize_bank(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every lora_B a non-zero value (B = 0 at init hides most bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name.split("."):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def batch(num: int = 3, length: int = 9, cond_dim: int = 12, vocab: int = SMALL_VOCAB, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num, length), generator=generator)
    cond = torch.randn(num, cond_dim, generator=generator)
    return ids, torch.ones_like(ids), cond


def launch_ranks(script: str, workdir: Path, world: int, timeout_s: int) -> list[int]:
    """Run `python script workdir` as `world` gloo ranks on 127.0.0.1 (one process each, logs in
    workdir/rank{r}.log); kill them all after timeout_s. Returns the exit codes in rank order."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    repo = Path(__file__).resolve().parents[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # fmt: skip
        env.setdefault("TORCH_EXTENSIONS_DIR", str(repo / ".cache" / "torch_extensions"))
        log = open(workdir / f"rank{rank}.log", "w")
        cmd = [sys.executable, script, str(workdir)]
        procs.append((subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for proc, _ in procs:
            proc.kill()
    finally:
        for proc, log in procs:
            proc.wait()
            log.close()
    return [proc.returncode for proc, _ in procs]
