"""Choose the next-item training budget on validation (issue #13): does the LLM learn to use the user at all?

    python bench/next_item_budget.py [--quick] [--tiny] [--n N] [--work DIR] [--reuse] [--settings NAME ...]

The full quality bench trains LastFM as iLoRA's paper does (lr 7e-4, batches of 16, one epoch of the Few2Many
subset). At N = 1,024 that left plain LoRA at chance (bench/results/quality.md): it learns the answer format
(ValidRatio ~0.9) and a per-title prior, and its candidate ranking is unrelated to SASRec's. Before iLoRA can be
compared with LoRA, the budget has to be one at which LoRA learns; this bench picks it on the validation split
only (the test split is never evaluated here), as demo_cpu.md and gate_dynamics_cpu.md did for CTR.

Rows: plain LoRA (configs/lastfm-ilora.yaml with trainer.lora.mode=plain, the full bench's LoRA row) on the same
N training samples, one row per setting (lr, batch, steps). Per row, on all validation rows: HR@1 and HR@5 by
candidate scoring with 95% bootstrap intervals, the paired HR@1 difference to the first setting, LLaRA's
generation ValidRatio and HR@1 over all rows, and whether the model uses the user (recdata.metrics.rank_agreement
with SASRec's candidate scores; recdata.metrics.title_prior). The chosen setting is the highest validation HR@1
(ties: the earlier setting). --quick: N = 64, 4 steps per setting and 32 validation rows (the machinery
on the real model, not the budget); --tiny: the random tiny Llama, 2 steps. Writes
bench/results/next_item_budget.md (not for --quick or --tiny); last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "bench"))
from quality import (  # noqa: E402
    COMMON,
    LASTFM,
    LFM_ROWS,
    N_BOOT,
    TINY_MODEL,
    Runner,
    candidate_rows,
    ci,
    eval_rows,
    fmt,
    hr1,
    md_table,
    paired,
    sasrec_candidate_scores,
)

from configs.loader import load_config  # noqa: E402
from recdata import metrics as M  # noqa: E402

RESULTS = REPO / "bench" / "results" / "next_item_budget.md"
# (lr, global batch, optimizer steps); the first is the paper's recipe at the bench's budget (the reference row)
SETTINGS = {
    "paper": (7e-4, 16, 64),
    "lr3e-3": (3e-3, 16, 64),
    "lr3e-3_b8x128": (3e-3, 8, 128),
    "lr7e-4_x3": (7e-4, 16, 192),  # three epochs: ~3x the others' time, so only when asked for (--settings)
}
DEFAULT = ["paper", "lr3e-3", "lr3e-3_b8x128"]
MICRO = 4


def overrides(lr: float, batch: int, steps: int, n: int) -> list[str]:
    epochs = max(1, round(steps * batch / n))
    return [
        f"trainer.lr={lr}",
        f"trainer.batch_size={batch}",
        f"trainer.micro_batch_size={min(MICRO, batch)}",
        f"trainer.epochs={epochs}",
        f"trainer.train_subset={n}",
        "trainer.eval_splits=[valid]",
        "trainer.zero_shot_eval=false",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N 64, 4 steps per setting, 32 validation rows")
    ap.add_argument("--tiny", action="store_true", help="the random tiny Llama (smoke run)")
    ap.add_argument("--n", type=int, default=None, help="Few2Many training samples (default 1024; --tiny 16)")
    ap.add_argument("--work", help="output folder (default: a new temporary one)")
    ap.add_argument("--reuse", action="store_true", help="take finished runs in --work as they are")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT)
    a = ap.parse_args()
    if not (LASTFM / "test_data.jsonl").is_file():
        print(f"skipped: LLaRA LastFM not found at {LASTFM}")
        return
    n = a.n or (16 if a.tiny else 64 if a.quick else 1024)
    settings = {k: SETTINGS[k] for k in a.settings}
    if a.tiny or a.quick:  # a few steps each: the machinery, not the budget
        settings = {k: (lr, b, 2 if a.tiny else 4) for k, (lr, b, _) in settings.items()}
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-next-item-budget-"))
    runner = Runner(work, reuse=a.reuse)
    base = [*COMMON, f"retrieval.max_eval_samples={32 if a.quick else 'null'}", *LFM_ROWS["lora"]]
    base += [*TINY_MODEL, "teacher.epochs=2"] if a.tiny else []
    t0 = time.perf_counter()
    runs = {
        name: runner.run(f"nib-{name}-n{n}", "lastfm-ilora", [*base, *overrides(*s, n)]) for name, s in settings.items()
    }
    first = next(iter(runs.values()))
    _, ref = eval_rows(first, "valid")
    ids = np.asarray(ref["sample_id"], dtype=np.int64)
    cfg = load_config("lastfm-ilora", [*base, f"run.output_dir={work / 'runs'}"])
    cands, cand_titles, target = candidate_rows(cfg, "valid", ids)
    targets = [t[i] for t, i in zip(cand_titles, target)]
    sasrec = sasrec_candidate_scores(cfg, work, "valid", ids)
    rows, scores = {}, {}
    for name, run in runs.items():
        _, f = eval_rows(run, "valid")
        if not np.array_equal(np.asarray(f["sample_id"], dtype=np.int64), ids):
            sys.exit(f"{run.name}: its validation rows differ from {first.name}'s")
        run.restore("valid", "target", target)
        s = scores[name] = np.asarray(f["scores"])
        flags = np.asarray(M.generation_flags(f["generated"], cand_titles, targets), dtype=float)
        rows[name] = {
            "hr@1": ci(hr1, s, target),
            "hr@5": ci(lambda a, t: M.hit_rate_at_k(a, t.astype(int), 5), s, target),
            "valid_ratio": float(flags[:, 0].mean()),
            "gen_hr1_all": float(flags[:, 1].mean()),
            "sasrec_rho": M.rank_agreement(s, sasrec),
            "title_prior": M.title_prior(s, cands),
        }
    ref_name = next(iter(runs))
    for name in runs:
        rows[name]["minus_ref"] = paired(hr1, scores[name], scores[ref_name], target)
    chosen = max(runs, key=lambda k: (rows[k]["hr@1"][0], -list(runs).index(k)))
    sasrec_hr1 = ci(hr1, sasrec, target)
    wall = time.perf_counter() - t0
    cli = f"{' --tiny' if a.tiny else ''}{' --quick' if a.quick else ''}"
    out = [
        f"# Next-item budget on validation ({'tiny' if a.tiny else 'SmolLM2-135M'}{', quick' if a.quick else ''}, N = {n})",
        "",
        f"Command: `python bench/next_item_budget.py{cli}`; wall {wall / 60:.1f} min. Plain "
        f"LoRA on LLaRA LastFM, {len(target)} validation rows, 20 candidates; 95% bootstrap CI ({N_BOOT} resamples); "
        f"SASRec on the same rows: HR@1 {fmt(sasrec_hr1)}; random ranking: HR@1 0.05.",
        "",
    ]
    out += md_table(
        ["setting (lr, batch, steps)", "HR@1", "HR@5", f"HR@1 - {ref_name}", "ValidRatio", "gen HR@1 (all)"]
        + ["Spearman with SASRec", "title prior"],
        [
            [f"{k} ({settings[k][0]:g}, {settings[k][1]}, {settings[k][2]})", fmt(r["hr@1"]), fmt(r["hr@5"])]
            + [fmt(r["minus_ref"]), f"{r['valid_ratio']:.3f}", f"{r['gen_hr1_all']:.3f}"]
            + [f"{r['sasrec_rho']:+.3f}", f"{r['title_prior']:+.3f}"]
            for k, r in rows.items()
        ],
    )
    out += ["", f"Chosen on validation HR@1: **{chosen}**."]
    text = "\n".join(out) + "\n"
    print(text)
    if not (a.tiny or a.quick):
        RESULTS.write_text(text)
    result = {
        "chosen": chosen,
        "n_train": n,
        "n_valid": len(target),
        "sasrec_hr1": sasrec_hr1[0],
        **{f"{k}_hr1": r["hr@1"][0] for k, r in rows.items()},
        **{f"{k}_sasrec_rho": r["sasrec_rho"] for k, r in rows.items()},
        "wall_s": round(wall, 1),
        "work": str(work),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
