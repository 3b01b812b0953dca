"""Issue 6: is the "best uniform r" on the evaluation itself resolved by its 128 tokens?

GPL-3, contexts 1K/4K, 128 teacher-forced tokens (the eval_accuracy.py windows), every layer at
the same r (k on the budget), ratios 4 and 8. Per-token NLLs are saved; a bootstrap over the
128 tokens gives the 95% interval of each r's mean NLL difference to the best r and how often
each r comes out best. Result: benchmarks/results/split_decode_probe.md.

    python benchmarks/split_gpl3_paired.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparq_ext.calibrate import candidate_rs  # noqa: E402
from sparq_ext.integrations.evaluation import teacher_forced_decode  # noqa: E402
from sparq_ext.integrations.smollm2 import load_smollm2, real_text_ids  # noqa: E402
from sparq_ext.integrations.transformers import disable_sparq, enable_sparq, sparq_settings  # noqa: E402

from eval_accuracy import PrefilledCache  # noqa: E402  (benchmarks/ is the script's directory)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--ratios", type=float, nargs="+", default=[4, 8])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "split_gpl3_paired.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2(torch.float32)
    D = model.config.hidden_size // model.config.num_attention_heads
    ids, N, out = real_text_ids(tok), args.tokens, {"args": vars(args), "cells": {}}
    for C in args.contexts:
        pre = PrefilledCache(model, ids[:, :C])
        disable_sparq(model)
        fresh = pre.fresh

        toks, targets = ids[:, C:C + N], ids[0, C + 1:C + N + 1]

        def token_nll(logits):
            return -torch.log_softmax(logits[0], -1).gather(-1, targets[:, None])[:, 0]

        dense = token_nll(teacher_forced_decode(model, toks, fresh()))
        for ratio in args.ratios:
            per = {}
            for r in candidate_rs(ratio, D):
                enable_sparq(model, ratio=ratio, split="auto")
                sparq_settings(model).layer_r.update({layer: r for layer in range(model.config.num_hidden_layers)})
                per[r] = token_nll(teacher_forced_decode(model, toks, fresh()))
                disable_sparq(model)
            idx = torch.randint(0, N, (2000, N), generator=torch.Generator().manual_seed(0))
            best = min(per, key=lambda r: per[r].mean())
            means = torch.stack([per[r][idx].mean(1) for r in per])  # (candidates, bootstrap)
            p_best = {r: float((means.argmin(0) == j).float().mean()) for j, r in enumerate(per)}
            cell = {"dense_ppl": math.exp(dense.mean()), "best_r": best, "p_best": p_best, "r": {}}
            for r, v in per.items():
                d = (v - per[best])[idx].mean(1)
                cell["r"][r] = {"dppl_pct": 100 * (math.exp((v - dense).mean()) - 1),
                                "nll_minus_best": float((v - per[best]).mean()),
                                "ci95": [float(d.quantile(0.025)), float(d.quantile(0.975))],
                                "token_nll": v.tolist()}
            cell["dense_token_nll"] = dense.tolist()
            out["cells"][f"{C}/{ratio:g}"] = cell
            print(f"C={C} ratio {ratio:g}: " + "; ".join(
                f"r{r} {c['dppl_pct']:+.1f}% (Δ vs r{best} {c['nll_minus_best']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}],"
                f" P(best) {p_best[r]:.2f})" for r, c in cell["r"].items()), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
