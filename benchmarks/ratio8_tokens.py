"""Why ratio 8 at 4K differs from the team's note: how much Δppl depends on which tokens are scored.

Prefills 4K tokens of the GPL-3 text, teacher-forces 256 tokens with dense, SparQ (window k/4)
and SparQ without window at ratio 8, and reports the perplexity increase over the first 128,
the second 128 and all 256 tokens, plus the share of the NLL increase carried by the worst 5
tokens. Writes benchmarks/results/ratio8_tokens.json.
"""

import json
import math
import sys
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval_accuracy import PrefilledCache, set_method  # noqa: E402

from sparq_ext.integrations.evaluation import teacher_forced_decode  # noqa: E402
from sparq_ext.integrations.smollm2 import load_smollm2, real_text_ids  # noqa: E402

torch.set_num_threads(1)
C, N, RATIO = 4096, 256, 8
model, tok = load_smollm2(torch.float32)
ids = real_text_ids(tok, C + N + 1)
targets = ids[0, C + 1:]
pre = PrefilledCache(model, ids[:, :C])
nll = {}
for method in ("dense", "sparq", "sparq_nowin"):
    set_method(model, method, RATIO)
    logits = teacher_forced_decode(model, ids[:, C:C + N], pre.fresh())[0]
    nll[method] = -torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
rows, out = [], {}
for method in ("sparq", "sparq_nowin"):
    d = nll[method] - nll["dense"]
    res = {}
    for name, sl in (("first128", slice(0, 128)), ("second128", slice(128, 256)), ("all256", slice(0, 256))):
        res[name] = 100 * (math.exp(nll[method][sl].mean()) / math.exp(nll["dense"][sl].mean()) - 1)
    res["worst5_share"] = (d.topk(5).values.sum() / d.sum()).item()
    out[method] = res
    rows.append([method, *(f"{res[k]:+.1f}%" for k in ("first128", "second128", "all256")), f"{res['worst5_share']:.2f}"])
table = tabulate(rows, headers=["ratio 8, 4K", "Δppl tokens 1-128", "129-256", "1-256", "worst-5 share of ΔNLL"],
                 tablefmt="github")
print(table)
(ROOT / "benchmarks" / "results" / "ratio8_tokens.json").write_text(json.dumps(
    dict(context=C, tokens=N, ratio=RATIO, results=out,
         nll={k: v.tolist() for k, v in nll.items()}), indent=1))
