"""Next-item candidate scoring: cached shared prompt (trainer.objective.candidate_scores) vs one full sequence per
candidate (candidate_scores_full, the previous path), on SmolLM2-135M-sized shapes.

    python bench/candidate_scores.py [--rows 2] [--prompt 250] [--cands 20] [--mode reclora|ilora] [--device cpu]
                                     [--repeats 3] [--threads 1]

A random model at the full size of recdata/assets/smollm2-135m-instruct/config.json (the real weights are not
needed for timing), ~`--prompt`-token prompts, `--cands` candidates with 6..14-token titles, one batch of `--rows`
rows per call (evaluation's eval_batch_size), rounds alternating the order of the paths. Prints the median wall and
CPU seconds per row of each path (on a shared machine the CPU time of this process is the steadier measure), the
speed-ups and the largest score difference; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from trainer.hybrid import HybridLM  # noqa: E402
from trainer.lora import MixtureLoraConfig, build_personalized_model  # noqa: E402
from trainer.objective import candidate_scores, candidate_scores_full  # noqa: E402
from trainer.tiny import tiny_llama_config  # noqa: E402

ILORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COND = 64


def full_size_model(mode: str, device: str) -> torch.nn.Module:
    # tiny_llama_config with the source's own sizes = the full SmolLM2-135M config.
    config = tiny_llama_config(num_layers=30, hidden=576, intermediate=1536, num_heads=9, num_kv_heads=3)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).to(device).eval()
    if mode == "reclora":
        cfg = MixtureLoraConfig(
            mode="reclora", target_modules=["q_proj", "v_proj"], r=8, alpha=16, num_experts=8, cond_dim=COND
        )
    else:
        cfg = MixtureLoraConfig(mode="ilora", target_modules=ILORA_TARGETS, r=8, alpha=16, num_experts=4, cond_dim=COND)
    pm = build_personalized_model(lm, cfg)
    if mode == "reclora":
        return pm.eval()
    items = np.arange(1000, 1100)
    vocab = config.vocab_size
    return HybridLM(pm, items, torch.randn(len(items), COND), [vocab, vocab + 1], 100).to(device).eval()


def make_rows(n: int, prompt: int, cands: int, hybrid: bool, vocab: int) -> tuple[list[dict], dict[int, list[int]]]:
    rng = np.random.default_rng(0)
    titles = {
        i: [int(t) for t in rng.integers(10, vocab, size=int(rng.integers(6, 15)))] + [2] for i in range(1000, 1100)
    }
    rows = []
    for k in range(n):
        length = prompt + int(rng.integers(-10, 10))
        ids = [int(t) for t in rng.integers(10, vocab, size=length)]
        slots = []
        if hybrid:
            for pos in sorted(rng.choice(np.arange(1, length), size=10 + cands, replace=False)):
                ids[pos] = vocab
                slots.append(int(rng.integers(1000, 1100)))
        cand = [int(c) for c in rng.choice(np.arange(1000, 1100), size=cands, replace=False)]
        rows.append(
            {
                "input_ids": ids + titles[cand[0]],
                "prompt_len": length,
                "label": None,
                "item_id": cand[0],
                "candidates": cand,
                "rep": rng.standard_normal(COND).astype(np.float32).tolist(),
                "sample_id": k,
                "item_slots": slots if hybrid else None,
            }
        )
    return rows, titles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=250)
    ap.add_argument("--cands", type=int, default=20)
    ap.add_argument("--mode", choices=["reclora", "ilora"], default="reclora")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time is the work done)")
    ap.add_argument("--quick", action="store_true", help="one repeat (make bench-quick runs every bench with it)")
    a = ap.parse_args()
    if a.quick:
        a.repeats = 1
    torch.set_num_threads(a.threads)
    model = full_size_model(a.mode, a.device)
    vocab = 49152
    rows, titles = make_rows(a.rows, a.prompt, a.cands, a.mode == "ilora", vocab)
    cond = torch.tensor(np.stack([r["rep"] for r in rows]))

    def answer(c: int) -> list[int]:
        return titles[c]

    paths = {"cached": candidate_scores, "full": candidate_scores_full}
    times: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    scores = {}
    for rep in range(a.repeats + 1):  # the first round warms up
        for name in list(paths) if rep % 2 else list(paths)[::-1]:
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            scores[name] = paths[name](model, rows, 0, answer, cond, a.device)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:
                times[name].append((time.perf_counter() - t0) / a.rows)
                cpu[name].append((time.process_time() - c0) / a.rows)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    diff = float((scores["cached"] - scores["full"]).abs().max())
    print(
        f"mode={a.mode} device={a.device} threads={a.threads} rows={a.rows} prompt~{a.prompt} cands={a.cands} "
        f"repeats={a.repeats}"
    )
    print(f"{'path':<8} {'wall s/row':>11} {'CPU s/row':>10}   (medians; CPU = this process's CPU time, all threads)")
    for k in paths:
        print(f"{k:<8} {med[k]:>11.4f} {med_cpu[k]:>10.4f}")
    print(
        f"speed-up {med['full'] / med['cached']:.2f}x wall, {med_cpu['full'] / med_cpu['cached']:.2f}x CPU time; "
        f"max |score difference| {diff:.2e}"
    )
    print(
        json.dumps(
            {
                "mode": a.mode,
                "device": a.device,
                "threads": a.threads,
                "cached_s_per_row": med["cached"],
                "full_s_per_row": med["full"],
                "speedup": med["full"] / med["cached"],
                "cached_cpu_s_per_row": med_cpu["cached"],
                "full_cpu_s_per_row": med_cpu["full"],
                "speedup_cpu": med_cpu["full"] / med_cpu["cached"],
                "max_abs_diff": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
