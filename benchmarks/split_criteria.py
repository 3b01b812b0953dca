"""Which calibration criterion predicts perplexity? Evidence for the auto split's default (issue 6).

For SmolLM2-135M-Instruct at ratios 4 and 8:
1. one dense prefill of the calibration text (first 2048 tokens of the NVIDIA CUDA EULA, as
   ``eval_accuracy.py`` calibrates) records every layer's queries/keys/values; for each
   candidate ``r`` (same ``r`` in every layer, ``k`` on the budget) each criterion of
   :data:`sparq_ext.calibrate.CRITERIA` is averaged over the 30 layers, at 8 and 32 positions;
2. decode-mode perplexity of the same uniform splits on the evaluation text (GPL-3, contexts
   1K/4K, 128 teacher-forced tokens), and of the per-layer split each criterion chooses.
A criterion is good when it ranks the uniform splits like perplexity does (Spearman rho over
the candidates, and whether its best ``r`` is perplexity's best) and its per-layer choice
decodes well.

    python benchmarks/split_criteria.py --threads 1
Writes benchmarks/results/split_criteria.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sparq_ext.calibrate import CRITERIA, calibration_positions, candidate_rs, k_on_budget, split_scores  # noqa: E402
from sparq_ext.integrations.evaluation import nll_and_top1, teacher_forced_decode  # noqa: E402
from sparq_ext.integrations.smollm2 import calibration_text_ids, load_smollm2, real_text_ids  # noqa: E402
from sparq_ext.integrations.transformers import disable_sparq, enable_sparq, sparq_settings  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402


def capture_qkv(model, ids):
    """{layer: (query (Hq,S,D), key (Hkv,S,D), value, scaling)} from one dense prefill."""
    store = {}

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        store[module.layer_idx] = (query[0].clone(), key[0].clone(), value[0].clone(), scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)

    enable_sparq(model, ratio=8, attn_name="sparq_capture", attn_fn=capture)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    disable_sparq(model)
    return store


def spearman(a, b):
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--calibration-tokens", type=int, default=2048)
    ap.add_argument("--positions", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from eval_accuracy import PrefilledCache  # noqa: E402  (benchmarks/ on sys.path)

    model, tok = load_smollm2(torch.float32)
    D = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    t0 = time.time()
    qkv = capture_qkv(model, calibration_text_ids(tok, args.calibration_tokens))
    layers = sorted(qkv)
    print(f"captured {len(layers)} layers in {time.time() - t0:.1f}s", flush=True)

    # 1. criteria per layer and candidate r (calibration text)
    scores = {}  # (ratio, positions) -> {layer: {r: {...}}}
    for ratio in args.ratios:
        for npos in args.positions:
            per_layer = {}
            for layer in layers:
                Q, K, V, scaling = qkv[layer]
                pos = calibration_positions(K.shape[1], npos)
                with torch.no_grad():
                    per_layer[layer] = split_scores(Q[:, pos], K, V, pos, ratio, scale=scaling)
            scores[(ratio, npos)] = per_layer
    del qkv

    def layer_choice(ratio, npos, criterion):
        return {layer: min(s, key=lambda r: (round(s[r][criterion], 6), -r))
                for layer, s in scores[(ratio, npos)].items()}

    # 2. perplexity: uniform r, and each criterion's per-layer choice
    rows, auto_rows = [], []
    total = real_text_ids(tok)
    for context in args.contexts:
        ids = total[:, :context + args.tokens + 1]
        targets = ids[:, context + 1:]
        pre = PrefilledCache(model, ids[:, :context])
        disable_sparq(model)
        dense_logits = teacher_forced_decode(model, ids[:, context:context + args.tokens], pre.fresh())
        dense = nll_and_top1(dense_logits, targets)["ppl"]

        def ppl_with(ratio, layer_r):
            enable_sparq(model, ratio=ratio, split="auto")
            sparq_settings(model).layer_r.update(layer_r)
            logits = teacher_forced_decode(model, ids[:, context:context + args.tokens], pre.fresh())
            disable_sparq(model)
            return 100 * (nll_and_top1(logits, targets)["ppl"] / dense - 1)

        for ratio in args.ratios:
            for r in candidate_rs(ratio, D):
                t0 = time.time()
                dppl = ppl_with(ratio, {layer: r for layer in layers})
                row = dict(context=context, ratio=ratio, r=r, k=k_on_budget(ratio, context, D, r),
                           dense_ppl=dense, ppl_increase_pct=dppl)
                for (rat, npos), per_layer in scores.items():
                    if rat == ratio:
                        for c in CRITERIA:
                            row[f"{c}@{npos}"] = sum(s[r][c] for s in per_layer.values()) / len(per_layer)
                rows.append(row)
                print(f"ctx {context} ratio {ratio} uniform r {r}: {dppl:+.1f}% ({time.time() - t0:.0f}s)", flush=True)
            for c in CRITERIA:
                for npos in args.positions[:1]:
                    choice = layer_choice(ratio, npos, c)
                    dppl = ppl_with(ratio, choice)
                    counts = {r: list(choice.values()).count(r) for r in sorted(set(choice.values()))}
                    auto_rows.append(dict(context=context, ratio=ratio, criterion=c, positions=npos,
                                          ppl_increase_pct=dppl, r_counts=counts))
                    print(f"ctx {context} ratio {ratio} auto[{c}@{npos}]: {dppl:+.1f}% r counts {counts}", flush=True)
            write(args, rows, auto_rows)
    write(args, rows, auto_rows)


def write(args, rows, auto_rows):
    out = Path(args.out)
    summary = []
    keys = [k for k in (rows[0] if rows else {}) if "@" in k]
    for context in sorted({r["context"] for r in rows}):
        for ratio in sorted({r["ratio"] for r in rows}):
            sub = [r for r in rows if r["context"] == context and r["ratio"] == ratio]
            if not sub:
                continue
            ppl = [r["ppl_increase_pct"] for r in sub]
            best = sub[min(range(len(sub)), key=lambda i: ppl[i])]["r"]
            for key in keys:
                vals = [r[key] for r in sub]
                summary.append(dict(context=context, ratio=ratio, criterion=key, spearman=spearman(vals, ppl),
                                    criterion_best_r=sub[min(range(len(sub)), key=lambda i: vals[i])]["r"],
                                    ppl_best_r=best))
    (out / "split_criteria.json").write_text(json.dumps(dict(args=vars(args), uniform=rows, auto=auto_rows,
                                                             summary=summary), indent=1))
    t1 = tabulate([[r["context"], r["ratio"], r["r"], r["k"], f"{r['ppl_increase_pct']:+.1f}%"] +
                   [f"{r[k]:.4f}" for k in keys] for r in rows],
                  headers=["context", "ratio", "r", "k", "Δppl"] + keys, tablefmt="github")
    t2 = tabulate([[s["context"], s["ratio"], s["criterion"], f"{s['spearman']:+.2f}", s["criterion_best_r"],
                    s["ppl_best_r"]] for s in summary],
                  headers=["context", "ratio", "criterion", "Spearman vs Δppl", "criterion's best r",
                           "Δppl's best r"], tablefmt="github")
    t3 = tabulate([[a["context"], a["ratio"], f"{a['criterion']}@{a['positions']}", f"{a['ppl_increase_pct']:+.1f}%",
                    a["r_counts"]] for a in auto_rows],
                  headers=["context", "ratio", "per-layer criterion", "Δppl", "layers per r"], tablefmt="github")
    (out / "split_criteria.md").write_text(
        "# Which criterion predicts perplexity (benchmarks/split_criteria.py)\n\n"
        "Criteria: layer means on the calibration text (CUDA EULA, first "
        f"{args.calibration_tokens} tokens), at 8 or 32 recent positions; Δppl: decode-mode teacher "
        f"forcing on GPL-3, {args.tokens} tokens, every layer the same r.\n\n"
        f"## Uniform splits\n\n{t1}\n\n## Rank agreement\n\n{t2}\n\n## Per-layer choice of each criterion\n\n{t3}\n")


if __name__ == "__main__":
    main()
