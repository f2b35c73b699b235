"""The generated DeepSpeed config: GPU defaults for a frozen base under ZeRO-3, the CPU settings the tests
rely on, and `trainer.deepspeed` merged over it (mapping or file), with the batch geometry kept the trainer's."""

from __future__ import annotations

import json

import pytest

from configs.loader import ConfigError, load_config
from trainer.engine import ds_config


def _t(*overrides: str):
    return load_config("tiny", list(overrides)).trainer


def test_gpu_zero3_defaults_keep_small_parameters_resident():
    z = ds_config(_t(), use_gpu=True, dtype="bfloat16", world=2)["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 1e6
    assert z["stage3_max_live_parameters"] == 1e9 and z["overlap_comm"] is True
    assert "zero_quantized_weights" not in z
    t = _t("trainer.zero_quantized_weights=true", "trainer.zero_hpz_partition_size=8", "trainer.batch_size=64")
    cfg = ds_config(t, True, "bfloat16", 16)
    assert cfg["zero_optimization"]["zero_quantized_weights"] is True
    assert cfg["zero_optimization"]["zero_hpz_partition_size"] == 8 and cfg["bf16"] == {"enabled": True}


@pytest.mark.parametrize("preset", ["ml1m-reclora-7b", "lastfm-ilora-7b"])
def test_multinode_presets_turn_on_hpz_with_gpus_per_node(preset):
    """The 7B presets run on 8-GPU nodes: ZeRO++ hpZ = 8 whenever the workers span nodes (the h100x8 overlay's
    16), left out on one node (8 workers, or bench's 1) where it would only add a secondary copy."""
    gpus_per_node = 8
    c = load_config(preset, ["trainer.num_workers=16"])
    assert c.trainer.use_gpu and c.model.dtype == "bfloat16"
    z = ds_config(c.trainer, True, c.model.dtype, 16)["zero_optimization"]
    assert z["stage"] == 3 and z["zero_hpz_partition_size"] == gpus_per_node
    assert "zero_quantized_weights" not in z  # qwZ is opt-in
    one_node = load_config(preset)
    assert one_node.trainer.num_workers == gpus_per_node
    for world in (1, gpus_per_node):
        assert (
            "zero_hpz_partition_size" not in ds_config(one_node.trainer, True, "bfloat16", world)["zero_optimization"]
        )
    q = load_config(preset, ["trainer.num_workers=16", "trainer.zero_quantized_weights=true"]).trainer
    assert ds_config(q, True, "bfloat16", 16)["zero_optimization"]["zero_quantized_weights"] is True


def test_hpz_must_divide_the_workers_it_spans():
    with pytest.raises(ConfigError, match=r"trainer.zero_hpz_partition_size: 8 .*num_workers=12"):
        load_config("ml1m-reclora-7b", ["trainer.num_workers=12", "trainer.batch_size=96"])
    t = load_config("tiny", ["trainer.zero_hpz_partition_size=4", "trainer.batch_size=24"]).trainer  # 2 workers
    with pytest.raises(ConfigError, match="does not divide the 6 workers"):
        ds_config(t, True, "bfloat16", 6)  # resumed on another worker count


def test_cpu_partitions_every_parameter():
    z = ds_config(_t(), use_gpu=False, dtype="float32", world=2)["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == 0 and "overlap_comm" not in z


def test_user_mapping_is_merged_recursively():
    t = _t("trainer.deepspeed={zero_optimization: {stage3_prefetch_bucket_size: 1000}, gradient_clipping: 0.5}")
    cfg = ds_config(t, use_gpu=True, dtype="bfloat16", world=2)
    z = cfg["zero_optimization"]
    assert z["stage3_prefetch_bucket_size"] == 1000 and z["stage"] == 3 and z["overlap_comm"] is True
    assert cfg["gradient_clipping"] == 0.5


def test_user_file_is_merged_and_batch_keys_are_refused(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}}))
    cfg = ds_config(_t(f"trainer.deepspeed={f}"), use_gpu=False, dtype="float32", world=1)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 123
    with pytest.raises(ConfigError, match="train_batch_size comes from trainer.batch_size"):
        ds_config(_t("trainer.deepspeed={train_batch_size: 64}"), use_gpu=False, dtype="float32", world=1)
    with pytest.raises(ConfigError, match="not found"):
        ds_config(_t(f"trainer.deepspeed={tmp_path / 'missing.json'}"), use_gpu=False, dtype="float32", world=1)
