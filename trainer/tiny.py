"""Tiny random Llama for tests and benchmarks, shrunk from the shared SmolLM2 config (offline, fp32)."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recdata.model_source import ASSETS

# The SmolLM2 config vendored in the repository (recdata/assets), the same file as ../shared's copy.
TINY_SOURCE_CONFIG = ASSETS / "config.json"


def shared_config_missing_reason() -> str | None:
    """None when the shared config exists, else a message suitable for pytest.skip."""
    if TINY_SOURCE_CONFIG.is_file():
        return None
    return f"model config not found at {TINY_SOURCE_CONFIG} (recdata/assets is incomplete in this checkout)"


def tiny_llama_config(
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int | None = None,
) -> LlamaConfig:
    """The shared SmolLM2 config with the sizes shrunk; vocab_size=None keeps the real 49152."""
    if reason := shared_config_missing_reason():
        raise FileNotFoundError(reason)
    if hidden % num_heads:
        raise ValueError(f"hidden={hidden} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    raw = json.loads(TINY_SOURCE_CONFIG.read_text())
    raw.update(
        num_hidden_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        # The source pins head_dim=64 for 576/9; it must follow the shrunk hidden size.
        head_dim=hidden // num_heads,
        dtype="float32",
    )
    if vocab_size is not None:
        raw["vocab_size"] = vocab_size
        # Special ids must stay inside a shrunk vocabulary.
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            if isinstance(raw.get(key), int) and raw[key] >= vocab_size:
                raw[key] = 0
    raw.pop("architectures", None)
    raw.pop("transformers_version", None)
    return LlamaConfig(**raw)


def build_tiny_llama(
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random fp32 LlamaForCausalLM, deterministic in `seed`, in eval mode (no dropout anyway)."""
    config = tiny_llama_config(num_layers, hidden, intermediate, num_heads, num_kv_heads, vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model.eval()
