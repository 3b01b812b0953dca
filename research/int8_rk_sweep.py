"""How should the 8-bit selection cache spend the bytes it saves: on r, on k, or on both?

At ratio rho, the 8-bit selection cache reads r + 4 bytes per position in step 1 (int8 rows and
an fp32 scale) where the full copy reads r * e. Two ends of the same byte budget are library
methods: ``sparq_int8`` (then the 8-bit even split: r = e*D/rho - 4, the full copy's k; since this
probe, rk_for_ratio's 8-bit split lies between) and ``sparq_int8_k`` (the full copy's r = D/rho,
the rest on k). This probe runs the points between them, each at the
same bytes (k from ``sparq_ext.budget.k_on_budget``, local window k/4), beside dense and the full
copy, on benchmarks/eval_repetition.py's text-repetition task and on perplexity (teacher-forced
decode after a dense prefill, as benchmarks/eval_accuracy.py), SmolLM2-135M-Instruct fp32.

    python research/int8_rk_sweep.py --context 4096 --ratio 8 --rs 8 12 16 20 28 --passages 8
    python research/int8_rk_sweep.py --rs 18 --exact-rs 18 --passages 16   # what the rounding costs

Writes research/results/int8_rk_sweep[_TAG].{json,md}. Conclusions: docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

from sparq_ext.budget import k_on_budget
from sparq_ext.evaluation.decode import nll_and_top1, teacher_forced_decode
from sparq_ext.evaluation.methods import PrefilledCache, set_method
from sparq_ext.evaluation.models import load_smollm2
from sparq_ext.evaluation.repetition import passage_starts
from sparq_ext.evaluation.texts import real_text_ids
from sparq_ext.evaluation.timing import run_metadata
from sparq_ext.integrations.transformers import SparQSettings

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass
class RankOnBudget(SparQSettings):
    """A fixed ``r`` and the ``k`` that spends the rest of the ratio's bytes (local window k/4)."""

    rank: int = 8

    def resolve(self, seq_len, head_dim, layer_idx=None, *, dtype=None, key_t_dtype=None):
        k = k_on_budget(self.ratio, seq_len, head_dim, self.rank, dtype=dtype, key_t_dtype=key_t_dtype)
        return self.rank, k, k // 4


@dataclasses.dataclass
class ExactAtInt8Split(RankOnBudget):
    """The full-precision copy at the ``r`` and ``k`` an 8-bit cache would use at ``rank``: what
    that 8-bit point would score without its rounding (it reads more bytes than the budget)."""

    def resolve(self, seq_len, head_dim, layer_idx=None, *, dtype=None, key_t_dtype=None):
        return super().resolve(seq_len, head_dim, layer_idx, dtype=dtype, key_t_dtype=torch.int8)


def use(model, variant, ratio):
    """Switch the model to ``variant``: ``"dense"``, ``"sparq"`` (the full copy's even split) or
    ``("int8", r)`` or ``("exact", r)``. Returns the selection cache's dtype for
    :meth:`PrefilledCache.fresh`."""
    if variant in ("dense", "sparq"):
        set_method(model, variant, ratio)
        return None
    set_method(model, "sparq_int8" if variant[0] == "int8" else "sparq", ratio)
    settings = (RankOnBudget if variant[0] == "int8" else ExactAtInt8Split)(ratio=float(ratio), rank=variant[1])
    for module in model.modules():
        if getattr(module, "_sparq_settings", None) is not None:
            module._sparq_settings = settings
    return torch.int8 if variant[0] == "int8" else None


def name(variant):
    return variant if isinstance(variant, str) else f"{variant[0]} r={variant[1]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=8)
    ap.add_argument("--rs", type=int, nargs="+", default=[8, 12, 16, 20, 28])
    ap.add_argument("--exact-rs", type=int, nargs="*", default=[],
                    help="also the full copy at these 8-bit points' r and k (no rounding, more bytes)")
    ap.add_argument("--passages", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--ppl-tokens", type=int, default=128, help="0: no perplexity")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ratio = int(args.ratio) if float(args.ratio).is_integer() else args.ratio
    model, tok = load_smollm2(torch.float32)
    cfg = model.config
    D = cfg.hidden_size // cfg.num_attention_heads
    variants = ["dense", "sparq"] + [("int8", r) for r in args.rs] + [("exact", r) for r in args.exact_rs]
    meta = dict(run_metadata(torch.device("cpu"), root=str(HERE.parent)), args=vars(args),
                model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)", head_dim=D)

    def rk(variant, seq_len):
        if variant == "dense":
            return None, None
        if variant == "sparq":
            return SparQSettings(ratio=float(ratio)).resolve(seq_len, D, dtype=torch.float32)[:2]
        # an "exact" point uses its 8-bit twin's r and k
        return RankOnBudget(ratio=float(ratio), rank=variant[1]).resolve(
            seq_len, D, dtype=torch.float32, key_t_dtype=torch.int8)[:2]

    rows = []
    # the repetition task (python-reference text, as benchmarks/eval_repetition.py)
    ids = real_text_ids(tok, text="python-reference")[:, :args.context]
    starts = passage_starts(args.context, args.passages, args.tokens)
    pre = PrefilledCache(model, ids, h2o_scores=False)
    bar = tqdm(total=len(starts) * len(variants) * args.tokens, desc="repetition", unit="step")
    for start in starts:
        passage = ids[:, start:start + args.tokens + 1]
        dense_logits = None
        for variant in variants:
            t0 = time.time()
            logits = teacher_forced_decode(model, passage[:, :-1], pre.fresh(use(model, variant, ratio)), bar)
            dense_logits = logits if variant == "dense" else dense_logits
            r, k = rk(variant, args.context + args.tokens // 2)
            rows.append(dict(task="repetition", start=start, variant=name(variant), r=r, k=k,
                             seconds=time.time() - t0, **nll_and_top1(logits, passage[:, 1:], dense_logits)))
    bar.close()
    # perplexity on GPL-3 after a dense prefill of the context
    if args.ppl_tokens:
        ids = real_text_ids(tok, text="gpl3")[:, :args.context + args.ppl_tokens + 1]
        pre = PrefilledCache(model, ids[:, :args.context], h2o_scores=False)
        dense_logits = None
        for variant in tqdm(variants, desc="perplexity"):
            logits = teacher_forced_decode(model, ids[:, args.context:-1], pre.fresh(use(model, variant, ratio)))
            dense_logits = logits if variant == "dense" else dense_logits
            r, k = rk(variant, args.context + args.ppl_tokens // 2)
            rows.append(dict(task="perplexity", variant=name(variant), r=r, k=k,
                             **nll_and_top1(logits, ids[:, args.context + 1:], dense_logits)))
    set_method(model, "dense", ratio)

    summary = []
    rep = {v: [row for row in rows if row["task"] == "repetition" and row["variant"] == v] for v in map(name, variants)}
    acc = {v: sum(row["top1_acc"] for row in rs) / len(rs) for v, rs in rep.items()}
    ppl = {row["variant"]: row["ppl"] for row in rows if row["task"] == "perplexity"}
    for variant in variants:
        v = name(variant)
        gap = acc["dense"] - acc["sparq"]
        summary.append(dict(variant=v, r=rep[v][0]["r"], k=rep[v][0]["k"], top1=acc[v],
                            nll=sum(row["nll"] for row in rep[v]) / len(rep[v]),
                            gap_closed=None if v in ("dense", "sparq") or gap <= 0 else (acc[v] - acc["sparq"]) / gap,
                            ppl=ppl.get(v),
                            ppl_increase_pct=None if v not in ppl else 100 * (ppl[v] / ppl["dense"] - 1)))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = out / f"int8_rk_sweep{'_' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    table = tabulate([[s["variant"], s["r"], s["k"], f"{s['top1']:.3f}", f"{s['nll']:.3f}",
                       "" if s["gap_closed"] is None else f"{s['gap_closed']:.2f}",
                       "" if s["ppl"] is None else f"{s['ppl']:.3f}",
                       "" if s["ppl_increase_pct"] is None else f"{s['ppl_increase_pct']:+.1f}%"] for s in summary],
                     headers=["variant", "r", "k", "top-1", "NLL", "gap closed", "ppl", "Δppl"], tablefmt="github")
    stem.with_suffix(".md").write_text(
        f"# 8-bit selection cache: r against k at equal bytes\n\n```\n{json.dumps(meta, indent=1)}\n```\n\n"
        f"Context {args.context}, ratio {ratio}, {len(starts)} passages of {args.tokens} tokens "
        f"(python-reference); perplexity: GPL-3, {args.ppl_tokens} tokens.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
