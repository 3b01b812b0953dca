"""Side check for split_criteria.py: the criteria computed at 1K/2K/4K/8K prefix lengths of the
calibration text (one 8192-token prefill of the CUDA EULA), uniform-r layer means and per-layer
picks. Writes benchmarks/results/split_criteria_lengths.json. Run from the repository root:
    PYTHONPATH=. python benchmarks/split_criteria_lengths.py
(The committed JSON was written before the "layer_output" criterion existed: three criteria.)
"""
import sys, torch, json, time
sys.path.insert(0, 'benchmarks'); torch.set_num_threads(1)
from split_criteria import capture_qkv
from sparq_ext.calibrate import split_scores, calibration_positions, candidate_rs, CRITERIA
from sparq_ext.integrations.smollm2 import load_smollm2, calibration_text_ids
model, tok = load_smollm2(torch.float32)
t0=time.time()
qkv = capture_qkv(model, calibration_text_ids(tok, 8192))
print('capture', time.time()-t0, flush=True)
res={}
for L in (1024, 2048, 4096, 8192):
    for ratio in (4, 8):
        pos = calibration_positions(L, 8)
        agg = {}
        per_layer = {}
        for layer,(Q,K,V,sc) in qkv.items():
            s = split_scores(Q[:, pos], K[:, :L], V[:, :L], pos, ratio, scale=sc)
            per_layer[layer] = s
            for r, d in s.items():
                for c in CRITERIA:
                    agg.setdefault(r, {}).setdefault(c, 0.0)
                    agg[r][c] += d[c] / len(qkv)
        picks = {c: {} for c in CRITERIA}
        for c in CRITERIA:
            for layer, s in per_layer.items():
                b = min(s, key=lambda r: (round(s[r][c], 6), -r)); picks[c][b] = picks[c].get(b, 0) + 1
        print(L, ratio, {r: {c: round(v, 4) for c, v in d.items()} for r, d in agg.items()}, picks, flush=True)
        res[f"{L}_{ratio}"] = dict(agg={str(r): d for r, d in agg.items()}, picks={c: {str(k): v for k, v in p.items()} for c, p in picks.items()})
json.dump(res, open('benchmarks/results/split_criteria_lengths.json', 'w'), indent=1)
