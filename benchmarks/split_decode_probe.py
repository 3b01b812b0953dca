"""Issue 6 experiment: can a length-aware split be chosen by decode loss on a calibration text?

For each context-length bucket L and each of --windows windows of the calibration text
(offsets spread evenly over its first --span tokens), prefill L tokens densely, then
teacher-force --tokens tokens with every layer at the same candidate r (k on the byte budget,
sparq_ext.calibrate.k_on_budget) and record the NLL of the targets and the KL divergence from
dense decoding's next-token distribution. The r with the lowest mean NLL (or KL) over the
windows would be the bucket's r. Result and verdict: benchmarks/results/split_decode_probe.md.

Texts (neither is the GPL-3 evaluation text nor the Python reference used at 8K):
  eula       the NVIDIA CUDA EULA (sparq_ext.integrations.smollm2.calibration_text, ~14.8K tokens)
  PATH.html  an HTML file, tags stripped, <pre> code blocks dropped; the run in the results used
             the Rust book from the rustup toolchain docs
             (~/.rustup/toolchains/stable-*/share/doc/rust/html/book/print.html, from "Foreword")

    python benchmarks/split_decode_probe.py --text PATH/print.html --span 60000 --windows 8 \
        --tokens 32 --lengths 1024 2048 4096 --threads 2 --out rust_w8_t32.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparq_ext.calibrate import candidate_rs  # noqa: E402
from sparq_ext.integrations.evaluation import nll_and_top1, teacher_forced_decode  # noqa: E402
from sparq_ext.integrations.smollm2 import calibration_text, load_smollm2  # noqa: E402
from sparq_ext.integrations.transformers import disable_sparq, enable_sparq, sparq_settings  # noqa: E402

from eval_accuracy import PrefilledCache  # noqa: E402  (benchmarks/ is the script's directory)


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.out, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style", "nav", "pre")
        if tag in ("p", "h1", "h2", "h3", "li", "br", "div"):
            self.out.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style", "nav", "pre")
        if tag in ("p", "h1", "h2", "h3", "li"):
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def load_text(name: str) -> str:
    if name == "eula":
        return calibration_text()
    parser = _Text()
    parser.feed(Path(name).read_text(encoding="utf-8"))
    text = re.sub(r"\n\s*\n+", "\n\n", "".join(parser.out))
    start = text.find("Foreword")
    return text[start:] if start >= 0 else text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="eula")
    ap.add_argument("--span", type=int, default=0, help="use the first SPAN tokens (0: all)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[4, 8])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2(torch.float32)
    D = model.config.hidden_size // model.config.num_attention_heads
    layers = range(model.config.num_hidden_layers)
    ids = tok(load_text(args.text), return_tensors="pt").input_ids
    ids = ids[:, :args.span] if args.span else ids
    T, N = ids.shape[1], args.tokens
    results, t_start = {}, time.time()
    for L in args.lengths:
        span = T - L - N - 1
        offsets = [0] if args.windows == 1 else [j * span // (args.windows - 1) for j in range(args.windows)]
        for o in offsets:
            t0 = time.time()
            pre = PrefilledCache(model, ids[:, o:o + L])
            t_prefill = time.time() - t0
            disable_sparq(model)
            fresh = pre.fresh

            toks, targets = ids[:, o + L:o + L + N], ids[:, o + L + 1:o + L + N + 1]
            t0 = time.time()
            dense_logits = teacher_forced_decode(model, toks, fresh())
            t_decode = time.time() - t0
            dense_logp = torch.log_softmax(dense_logits, -1)
            ctx, scored = ids[0, o:o + L].tolist(), ids[0, o + L - 7:o + L + N + 1].tolist()
            grams = {tuple(ctx[i:i + 8]) for i in range(len(ctx) - 7)}
            overlap = sum(tuple(scored[i:i + 8]) in grams for i in range(len(scored) - 7)) / max(1, len(scored) - 7)
            row = {"dense": nll_and_top1(dense_logits, targets)["nll"], "overlap8": overlap,
                   "prefill_s": t_prefill, "dense_decode_s": t_decode}
            for ratio in args.ratios:
                for r in candidate_rs(ratio, D):
                    enable_sparq(model, ratio=ratio, split="auto")
                    sparq_settings(model).layer_r.update({layer: r for layer in layers})
                    logits = teacher_forced_decode(model, toks, fresh())
                    disable_sparq(model)
                    row[f"{ratio:g}/{r}"] = nll_and_top1(logits, targets)["nll"]
                    row[f"kl{ratio:g}/{r}"] = (dense_logp.exp() * (dense_logp - torch.log_softmax(logits, -1))
                                               ).sum(-1).mean().item()
            results[f"{L}@{o}"] = row
            print(f"L={L} offset={o} prefill {t_prefill:.1f}s dense nll {row['dense']:.3f} overlap8 {overlap:.2f} | "
                  + " ".join(f"{key}:{100 * (math.exp(v - row['dense']) - 1):+.1f}%" for key, v in row.items()
                             if "/" in key and not key.startswith("kl")), flush=True)
    summary = {}
    for L in args.lengths:
        rows = [v for key, v in results.items() if key.startswith(f"{L}@")]
        for ratio in args.ratios:
            rs = candidate_rs(ratio, D)
            nll = {r: sum(w[f"{ratio:g}/{r}"] - w["dense"] for w in rows) / len(rows) for r in rs}
            kl = {r: sum(w[f"kl{ratio:g}/{r}"] for w in rows) / len(rows) for r in rs}
            summary[f"{L}/{ratio:g}"] = {"dppl_pct": {r: 100 * (math.exp(v) - 1) for r, v in nll.items()},
                                         "kl": kl, "best_r_nll": min(nll, key=nll.get),
                                         "best_r_kl": min(kl, key=kl.get)}
            print(f"L={L} ratio {ratio:g}: mean Δppl " + " ".join(f"r{r}:{v:+.1f}%" for r, v in
                                                                   summary[f"{L}/{ratio:g}"]["dppl_pct"].items())
                  + f" -> r={summary[f'{L}/{ratio:g}']['best_r_nll']} | KL -> r={summary[f'{L}/{ratio:g}']['best_r_kl']}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "tokens_in_text": T, "seconds": time.time() - t_start,
                                          "threads": torch.get_num_threads(), "windows": results,
                                          "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
