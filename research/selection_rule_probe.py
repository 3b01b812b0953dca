"""Does a better choice of step 1's components close more of SparQ's gap at the same bytes?

SparQ picks ``i1`` = the ``r`` largest components of ``|q|`` (summed over a KV head's query
heads). A component's share of the *ranking* of positions depends on how much ``q_i K[s, i]``
varies over ``s``, not on ``|q_i|`` alone: a channel whose key is large but nearly constant
(RoPE's slow channels) shifts every logit alike and ranks nothing. This probe ranks components
by ``|q_i| * w_i`` instead, with ``w_i`` a per-(KV head, channel) statistic of the cached keys a
cache could keep as running sums (``D`` or ``2D`` floats per head, no extra bytes per step):

    abs   w = 1                           (SparQ; the library's rule)
    std   w = std over positions of K[:, i]
    mean  w = mean over positions of |K[:, i]|

``gamma`` (step 3's temperature correction) uses the same weighted magnitudes. Step 2 and the
top-k are unchanged. All variants run through the pure-torch reference (patched), at the same
r and k, on benchmarks/eval_repetition.py's text-repetition task (python-reference text) and on
GPL-3 perplexity, SmolLM2-135M-Instruct fp32:

    python research/selection_rule_probe.py --context 4096 --ratio 8 --passages 8

Writes research/results/selection_rule_probe[_TAG].{json,md}. Conclusions: docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

import sparq_ext.integrations.transformers as hf
import sparq_ext.reference as ref
from sparq_ext.evaluation.decode import nll_and_top1, teacher_forced_decode
from sparq_ext.evaluation.methods import PrefilledCache, set_method
from sparq_ext.evaluation.models import load_smollm2
from sparq_ext.evaluation.repetition import passage_starts
from sparq_ext.evaluation.texts import real_text_ids
from sparq_ext.evaluation.timing import run_metadata
from sparq_ext.integrations.transformers import SparQSettings

HERE = Path(__file__).resolve().parent
RULE = {"name": "abs"}
_original_selection = ref.approximate_selection


def channel_weights(key, valid, rule):
    """``(B, Hkv, D)`` fp32 weights of the rule from the cached keys at the valid positions."""
    m = valid[:, None, :, None].to(torch.float32)
    k = key.float()
    n = m.sum(2).clamp_min(1)
    if rule == "mean":
        return (k.abs() * m).sum(2) / n
    mean = (k * m).sum(2) / n
    return ((k * k * m).sum(2) / n - mean * mean).clamp_min(0).sqrt()


def weighted_selection(q, key, r, k, valid, key_t=None, local_window=0, scale=1.0, softcap=None,
                       key_t_scale=None, component_weights=None):
    """reference.approximate_selection with i1 and gamma from |q| * w (RULE["name"]). (The
    library has the "std" rule since: component_weights, component_rule="key_std".)"""
    if RULE["name"] == "abs":
        return _original_selection(q, key, r, k, valid, key_t, local_window, scale, softcap, key_t_scale,
                                   component_weights)
    B, Hkv, G, D = q.shape
    S = key.shape[2]
    acc = q.dtype
    w = channel_weights(key, valid, RULE["name"])[:, :, None, :].to(acc)  # (B, Hkv, 1, D)
    magnitude = q.abs() * w  # (B, Hkv, G, D)
    i1 = magnitude.sum(2).topk(r, dim=-1).indices
    q_hat = q.gather(-1, i1[:, :, None, :].expand(B, Hkv, G, r))
    if key_t is not None:
        rows_b = torch.arange(B)[:, None, None]
        rows_h = torch.arange(Hkv)[None, :, None]
        K_hat_t = key_t[rows_b, rows_h, i1].to(acc)
        if key_t_scale is not None:
            K_hat_t = K_hat_t * key_t_scale.to(acc)[:, :, None, :]
    else:
        K_hat_t = key.gather(-1, i1[:, :, None, :].expand(B, Hkv, S, r)).to(acc).transpose(-1, -2)
    picked = magnitude.gather(-1, i1[:, :, None, :].expand(B, Hkv, G, r))
    gamma = (picked.sum(-1) / magnitude.sum(-1).clamp_min(ref._TINY)).clamp_min(ref._TINY)
    approx_logits = ref.softcap_logits((q_hat @ K_hat_t) * (scale / gamma.sqrt())[..., None], softcap)
    score = approx_logits.sum(2)
    score = torch.where(score.isnan(), ref._NAN_SCORE, score)
    score = score.masked_fill(~valid[:, None, :].expand(B, Hkv, S), -float("inf"))
    in_window = ref.local_window_positions(valid, local_window)[:, None, :].expand(B, Hkv, S)
    i2 = score.masked_fill(in_window, float("inf")).topk(min(k, S), dim=-1).indices
    return approx_logits, i2


def reference_attention(query, key, value, *, r, k, key_t=None, value_mean=None, seq_lens=None,
                        attn_mask=None, local_window=0, reallocate=True, scale=None, softcap=None,
                        sinks=None, key_t_scale=None):
    return ref.sparq_attention_reference(query, key, value, r, k, key_t, value_mean, seq_lens, attn_mask,
                                         local_window, reallocate, scale, softcap, sinks, key_t_scale)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=8)
    ap.add_argument("--rules", nargs="+", default=["abs", "std", "mean"])
    ap.add_argument("--caches", nargs="+", default=["full", "int8"], help="full: the full copy's even split; "
                    "int8: the 8-bit selection cache's split (the library's defaults at the ratio)")
    ap.add_argument("--passages", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--ppl-tokens", type=int, default=128, help="0: no perplexity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref.approximate_selection = weighted_selection
    hf.sparq_attention = reference_attention
    ratio = int(args.ratio) if float(args.ratio).is_integer() else args.ratio
    model, tok = load_smollm2(torch.float32)
    cfg = model.config
    D = cfg.hidden_size // cfg.num_attention_heads
    variants = ["dense"] + [(c, rule) for c in args.caches for rule in args.rules]
    meta = dict(run_metadata(torch.device("cpu"), root=str(HERE.parent)), args=vars(args),
                model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)", head_dim=D)

    def use(variant):
        if variant == "dense":
            set_method(model, "dense", ratio)
            return None
        RULE["name"] = variant[1]
        set_method(model, "sparq_int8" if variant[0] == "int8" else "sparq", ratio)
        return torch.int8 if variant[0] == "int8" else None

    def rk(variant, seq_len):
        if variant == "dense":
            return None, None
        key_t_dtype = torch.int8 if variant[0] == "int8" else None
        return SparQSettings(ratio=float(ratio)).resolve(seq_len, D, dtype=torch.float32, key_t_dtype=key_t_dtype)[:2]

    name = lambda v: v if isinstance(v, str) else f"{v[0]} {v[1]}"
    rows = []
    ids = real_text_ids(tok, text="python-reference")[:, :args.context]
    starts = passage_starts(args.context, args.passages, args.tokens)
    pre = PrefilledCache(model, ids, h2o_scores=False)
    bar = tqdm(total=len(starts) * len(variants) * args.tokens, desc="repetition", unit="step")
    for start in starts:
        passage = ids[:, start:start + args.tokens + 1]
        dense_logits = None
        for variant in variants:
            t0 = time.time()
            logits = teacher_forced_decode(model, passage[:, :-1], pre.fresh(use(variant)), bar)
            dense_logits = logits if variant == "dense" else dense_logits
            r, k = rk(variant, args.context + args.tokens // 2)
            rows.append(dict(task="repetition", start=start, variant=name(variant), r=r, k=k,
                             seconds=time.time() - t0, **nll_and_top1(logits, passage[:, 1:], dense_logits)))
    bar.close()
    if args.ppl_tokens:
        ids = real_text_ids(tok, text="gpl3")[:, :args.context + args.ppl_tokens + 1]
        pre = PrefilledCache(model, ids[:, :args.context], h2o_scores=False)
        for variant in tqdm(variants, desc="perplexity"):
            logits = teacher_forced_decode(model, ids[:, args.context:-1], pre.fresh(use(variant)))
            r, k = rk(variant, args.context + args.ppl_tokens // 2)
            rows.append(dict(task="perplexity", variant=name(variant), r=r, k=k,
                             **nll_and_top1(logits, ids[:, args.context + 1:])))
    set_method(model, "dense", ratio)

    rep = {v: [row for row in rows if row["task"] == "repetition" and row["variant"] == v] for v in map(name, variants)}
    acc = {v: sum(row["top1_acc"] for row in rs) / len(rs) for v, rs in rep.items()}
    ppl = {row["variant"]: row["ppl"] for row in rows if row["task"] == "perplexity"}
    baseline = "full abs" if "full abs" in acc else None
    summary = []
    for v in map(name, variants):
        gap = acc["dense"] - acc[baseline] if baseline else 0
        wins = None if v == "dense" or not baseline else sum(
            a["top1_acc"] > b["top1_acc"] for a, b in zip(rep[v], rep[baseline]))
        summary.append(dict(variant=v, r=rep[v][0]["r"], k=rep[v][0]["k"], top1=acc[v],
                            nll=sum(row["nll"] for row in rep[v]) / len(rep[v]),
                            gap_closed=None if v in ("dense", baseline) or gap <= 0 else (acc[v] - acc[baseline]) / gap,
                            passages_better=wins, ppl=ppl.get(v),
                            ppl_increase_pct=None if v not in ppl else 100 * (ppl[v] / ppl["dense"] - 1)))
    out = HERE / "results"
    stem = out / f"selection_rule_probe{'_' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    table = tabulate([[s["variant"], s["r"], s["k"], f"{s['top1']:.3f}", f"{s['nll']:.3f}",
                       "" if s["gap_closed"] is None else f"{s['gap_closed']:.2f}",
                       "" if s["passages_better"] is None else f"{s['passages_better']}/{len(starts)}",
                       "" if s["ppl"] is None else f"{s['ppl']:.3f}",
                       "" if s["ppl_increase_pct"] is None else f"{s['ppl_increase_pct']:+.1f}%"] for s in summary],
                     headers=["variant", "r", "k", "top-1", "NLL", "gap closed", "passages better", "ppl", "Δppl"],
                     tablefmt="github")
    stem.with_suffix(".md").write_text(
        f"# Step 1's component rule at equal bytes\n\n```\n{json.dumps(meta, indent=1)}\n```\n\n"
        f"Context {args.context}, ratio {ratio}, {len(starts)} passages of {args.tokens} tokens "
        f"(python-reference); perplexity: GPL-3, {args.ppl_tokens} tokens. gap closed: against "
        f"the full copy with SparQ's |q| rule.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
