"""trainer.lora.gathered under ZeRO-3 on 2 CPU ranks (gloo): many gather rounds, every tensor checked.

Issue #15 B: a single GatheredParameters over a list takes DeepSpeed's coalesced all-gather, which waits only
on the last handle; on gloo earlier transfers could still be writing inside the block (a 2-rank probe lost or
corrupted a tensor in 7 of 400 rounds), which made save_adapter / load_adapter_weights flaky. Each round here
(a) rank 0 writes new known values under gathered(modifier_rank=0) (the load_adapter_weights path), then
(b) every rank gathers read-only (the trainable_state_dict path) and compares every element with the known
values. Parameter sizes go from large to small so the last transfer finishes first, as in an adapter bank.
With the old coalesced path this test saw 6-12 bad rounds of 200-300 per rank on a 2-core machine; with
`gathered` none. About 50 s (most of it is two workers importing DeepSpeed).

Run a worker by hand with `--coalesced` to see the old path fail: `python tests/test_zero3_gather_stress.py
WORKDIR --coalesced` under the same RANK/WORLD_SIZE/MASTER_* environment.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # also when run as a worker
sys.path.insert(0, str(REPO / "tests"))
from conftest_lora_helpers import launch_ranks  # noqa: E402

from trainer.lora import gathered  # noqa: E402

WORLD_SIZE = 2
ROUNDS = 200
SIZES = [40_000, 25_000, 12_000, 6000, 3000, 1500, 700, 300, 120, 60, 24, 8, 3]
WORKER_TIMEOUT_S = 150


def expected(i: int, numel: int, rnd: int) -> torch.Tensor:
    """Exact float32 values, distinct per parameter, element and round."""
    return torch.arange(numel, dtype=torch.float32) * 0.5 + 1000.0 * i + 7.0 * rnd


def worker(workdir: Path, coalesced: bool) -> None:
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # known trap: ~2.5 min JIT build on CPU
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=WORKER_TIMEOUT_S))
    rank = torch.distributed.get_rank()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        module = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in SIZES])
    params = list(module)
    partitioned = all(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in params)

    def block(modifier_rank=None):
        if coalesced:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
        return gathered(params, modifier_rank=modifier_rank)

    bad_rounds, first_bad = 0, None
    with torch.no_grad():
        for rnd in range(ROUNDS):
            with block(modifier_rank=0):
                if rank == 0:
                    for i, p in enumerate(params):
                        p.copy_(expected(i, p.numel(), rnd))
            with block():
                got = [p.detach().clone() for p in params]
            wrong = [i for i, g in enumerate(got) if not torch.equal(g, expected(i, SIZES[i], rnd))]
            if wrong:
                bad_rounds += 1
                first_bad = first_bad or {"round": rnd, "params": wrong}
    out = {"rank": rank, "partitioned": partitioned, "bad_rounds": bad_rounds, "first_bad": first_bad}
    (workdir / f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()


@pytest.mark.timeout(WORKER_TIMEOUT_S + 60)
def test_gathered_is_exact_over_many_rounds_on_two_ranks(tmp_path):
    codes = launch_ranks(__file__, tmp_path, WORLD_SIZE, WORKER_TIMEOUT_S)
    if codes != [0] * WORLD_SIZE:
        pytest.fail(f"workers exited with {codes}; rank 0 log tail:\n{(tmp_path / 'rank0.log').read_text()[-4000:]}")
    for rank in range(WORLD_SIZE):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["partitioned"], result
        assert result["bad_rounds"] == 0, result


if __name__ == "__main__":
    worker(Path(sys.argv[1]), coalesced="--coalesced" in sys.argv[2:])
