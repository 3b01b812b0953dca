"""The auto split against the even split over many windows of text (the evidence of docs/auto-split.md).

``benchmarks/eval_accuracy.py`` scores one 128-token window per context: too few to separate two
splits that are close. This scores W disjoint windows of a long text (default: the Python
language reference, ~92K tokens; the auto split is calibrated on a different text, the CUDA
EULA). Each window's first C tokens are prefilled densely, then its next N tokens are
teacher-forced one decode step at a time through dense attention, the even split (r = D/rho,
k = S/(2 rho), local window k/4: enable_sparq's default), the auto split (default: the saved
"smollm2-135m" split; --split-file or --recalibrate for another) and optionally every layer at one
uniform r (--uniform-r, k on the byte budget).

Loss of a method = exp(mean NLL - mean dense NLL) - 1, pooled over all windows' tokens. The 95%
interval of auto/even comes from a bootstrap over windows (tokens of one window are correlated),
2000 resamples; P(<= 0.5) is the share of resamples where auto loses at most half of even's loss.
Writes research/results/split_windows{_tag}.{json,md,png}.

    python research/eval_split_windows.py --threads 2                 # 1K/4K/8K x ratios 4, 8
    python research/eval_split_windows.py --contexts 1024 --windows 2 --tokens 16 --tag quick

--pool A.json B.json ... runs nothing: it pools earlier runs on different texts per (context,
ratio), with a bootstrap stratified by text, into split_windows_pooled{_tag}.{json,md}; only cells
that decoded with the same split entries in every run (each run records the split it decoded).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

from sparq_ext.evaluation.decode import teacher_forced_decode
from sparq_ext.evaluation.methods import DEFAULT_SPLIT, PrefilledCache, set_method
from sparq_ext.evaluation.models import load_smollm2
from sparq_ext.evaluation.texts import EVALUATION_TEXTS, calibration_text_ids, real_text_ids
from sparq_ext.evaluation.timing import git_commit
from sparq_ext.integrations.transformers import calibrate_split, disable_sparq, enable_sparq
from sparq_ext.split import Split, nearest_length

HERE = Path(__file__).resolve().parent
BOOTSTRAP = 2000
AUTO_METHODS = ("auto",)


def window_starts(total: int, need: int, windows: int) -> list[int]:
    """Start positions of `windows` disjoint spans of `need` tokens spread over `total` tokens."""
    if windows * need > total:
        raise ValueError(f"--windows {windows} disjoint windows of {need} tokens need {windows * need} "
                         f"tokens, the text has {total}")
    if windows == 1:
        return [0]
    stride = (total - need) // (windows - 1)  # >= need because windows * need <= total
    return [w * stride for w in range(windows)]


def loss_pct(nll: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Perplexity increase in % from per-window mean NLLs ``(..., W)`` (equal tokens per window)."""
    return 100 * (torch.exp(nll.mean(-1) - dense.mean(-1)) - 1)


def summarise(cell: dict | list[dict], generator: torch.Generator) -> dict:
    """Pooled losses and the bootstrap (over windows) of the auto split over even, for one
    (context, ratio): keys ``auto_over_even``, ``p_goal``, ... A list of cells (the same context and ratio on different texts) is pooled:
    losses over all their windows, the bootstrap resampling windows within each text
    (stratified), so every resample keeps each text's share of the tokens."""
    cells = [cell] if isinstance(cell, dict) else list(cell)
    names = [m for m in cells[0]["window_nll"] if all(m in c["window_nll"] for c in cells)]
    dense = torch.cat([torch.tensor(c["dense_window_nll"]) for c in cells])
    methods = {m: torch.cat([torch.tensor(c["window_nll"][m]) for c in cells]) for m in names}
    offsets, idx = 0, []
    for c in cells:  # one stratum per text; a single cell draws exactly as before pooling existed
        W = len(c["dense_window_nll"])
        idx.append(offsets + torch.randint(0, W, (BOOTSTRAP, W), generator=generator))
        offsets += W
    idx = torch.cat(idx, 1)
    out = {"loss_pct": {m: float(loss_pct(v, dense)) for m, v in methods.items()},
           "window_loss_pct": {m: [float(x) for x in 100 * (torch.exp(v - dense) - 1)] for m, v in methods.items()}}
    even = methods["even"]
    boot_even = loss_pct(even[idx], dense[idx])
    defined = boot_even > 0
    out["bootstrap_even_loss_positive"] = float(defined.float().mean())
    for name in AUTO_METHODS:
        if name not in methods:
            continue
        auto = methods[name]
        boot_auto = loss_pct(auto[idx], dense[idx])
        ratio = float(loss_pct(auto, dense) / loss_pct(even, dense)) if float(loss_pct(even, dense)) > 0 else None
        boot_ratio = boot_auto[defined] / boot_even[defined]
        out[f"{name}_over_even"] = ratio
        out[f"{name}_over_even_ci95"] = ([float(boot_ratio.quantile(0.025)), float(boot_ratio.quantile(0.975))]
                                         if defined.any() else None)
        out[f"p_goal_{name}" if name != "auto" else "p_goal"] = \
            float((boot_ratio <= 0.5).float().sum() / BOOTSTRAP)  # undefined resamples fail
        diff = (auto - even)[idx].mean(1)  # per-token mean NLL difference, auto - even
        out[f"nll_{name}_minus_even"] = float((auto - even).mean())
        out[f"nll_{name}_minus_even_ci95"] = [float(diff.quantile(0.025)), float(diff.quantile(0.975))]
    return out


def splits_used(meta: dict, context: int, ratio: float, tokens: int) -> list:
    """The split entries that decoding ``tokens`` steps after a ``context``-token prefill used at
    ``ratio`` (the calibration length nearest to each step's length), from the run's metadata."""
    split = Split.from_json(meta["splits"][f"{ratio:g}"])
    used = sorted({nearest_length(split.lengths, n) for n in range(context, context + tokens + 1)})
    return [sorted(split.lengths[length].items()) for length in used]


def pool_runs(paths: list[Path], stem: Path) -> str:
    """Pool the cells of several runs (one text each) per (context, ratio); returns the table.

    Every pooled cell must have decoded with the same splits in each run (the calibration
    lengths it used may be equal in files that differ elsewhere): pooling different calibrations
    would mix two methods."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if len(runs) < 2:
        raise SystemExit("--pool needs at least two result files")
    ref = runs[0]["meta"]
    keys = [k for k in runs[0]["cells"] if all(k in r["cells"] for r in runs)]
    if not keys:
        raise SystemExit("the runs share no (context, ratio) cell")
    for run, path in zip(runs, paths):
        if "splits" not in run["meta"]:
            raise SystemExit(f"{path} records no split (written by an older version of this script); not pooled")
    for key in keys:  # every run must have decoded the same split entries (files may differ elsewhere)
        c = runs[0]["cells"][key]
        used = [splits_used(r["meta"], c["context"], c["ratio"], r["meta"]["args"]["tokens"]) for r in runs]
        for p, u in zip(paths[1:], used[1:]):
            if u != used[0]:
                raise SystemExit(f"{p}: cell {key} decoded with another split than in {paths[0]}; not pooled")
    gen = torch.Generator().manual_seed(0)
    pooled, rows = {}, []
    for key in keys:
        cells = [r["cells"][key] for r in runs]
        summary = summarise(cells, gen)
        pooled[key] = {"context": cells[0]["context"], "ratio": cells[0]["ratio"], "summary": summary,
                       "windows": [len(c["dense_window_nll"]) for c in cells]}
        for name in (m for m in AUTO_METHODS if f"{m}_over_even" in summary):
            per_text = [r["cells"][key]["summary"].get(f"{name}_over_even") for r in runs]
            ci, d_ci = summary[f"{name}_over_even_ci95"], summary[f"nll_{name}_minus_even_ci95"]
            ratio = summary[f"{name}_over_even"]
            rows.append([cells[0]["context"], cells[0]["ratio"],
                         " + ".join(f"{r['meta']['text']} {len(c['dense_window_nll'])}" for r, c in zip(runs, cells)),
                         f"{summary['loss_pct']['even']:+.2f}%", name, f"{summary['loss_pct'][name]:+.2f}%",
                         "n/a" if ratio is None else f"{ratio:.2f}",
                         "n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]",
                         f"{summary['p_goal' if name == 'auto' else 'p_goal_' + name]:.2f}",
                         f"{summary[f'nll_{name}_minus_even']:+.4f} [{d_ci[0]:+.4f}, {d_ci[1]:+.4f}]",
                         " / ".join("n/a" if v is None else f"{v:.2f}" for v in per_text)])
    headers = ["context", "ratio", "texts (windows)", "even loss", "auto split", "its loss", "its loss / even's",
               "95% CI (stratified)", "P(<= 0.5)", "NLL it - even [95% CI]", "per text"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    meta = {"pooled": [{"file": Path(p).name, "text": r["meta"]["text"], "commit": r["meta"]["commit"]}
                       for p, r in zip(paths, runs)],
            "splits": ref["splits"], "commit": git_commit(str(HERE))}
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, cells=pooled), indent=1))
    stem.with_suffix(".md").write_text(
        "# Auto vs even split, pooled over texts\n\n"
        "Written by `research/eval_split_windows.py --pool` (bootstrap over windows, stratified by text; "
        "losses over all windows of all texts).\n\n"
        f"```\n{json.dumps(meta, indent=1)}\n```\n\n{table}\n")
    return table


def plot(cells: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({c["context"] for c in cells.values()})
    ratios = sorted({c["ratio"] for c in cells.values()})
    fig, axes = plt.subplots(len(ratios), len(contexts), figsize=(max(4.6 * len(contexts), 8), 3.6 * len(ratios)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for key, cell in cells.items():
        ax = axes[ratios.index(cell["ratio"])][contexts.index(cell["context"])]
        ax.set_visible(True)
        s = cell["summary"]
        for m, style in (("even", "o-"), ("auto", "s-")):
            if m in s["window_loss_pct"]:
                ax.plot(s["window_loss_pct"][m], style, label=f"{m}: pooled {s['loss_pct'][m]:+.1f}%", alpha=0.8)
        for m, v in s["window_loss_pct"].items():
            if m.startswith("r="):
                ax.plot(v, ":", label=f"uniform {m}: {s['loss_pct'][m]:+.1f}%", alpha=0.6)
        ax.axhline(0, color="grey", lw=0.8)
        title = key.replace('/', ', ratio ')
        for name in AUTO_METHODS:
            if f"{name}_over_even" in s:
                ratio, ci = s[f"{name}_over_even"], s[f"{name}_over_even_ci95"]
                title += f"\n{name}/even " + (f"{ratio:.2f}" if ratio is not None else "n/a")
                if ci:
                    title += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
        ax.set_title(f"context {title}", fontsize=9)
        ax.set_xlabel("window")
        ax.set_ylabel("perplexity increase vs dense (%)")
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, decode-mode teacher forcing: per-window loss of the even and auto splits",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8000])
    ap.add_argument("--ratios", type=float, nargs="+", default=[4, 8])
    ap.add_argument("--windows", type=int, default=10, help="disjoint windows per context")
    ap.add_argument("--tokens", type=int, default=128, help="teacher-forced decode steps per window")
    ap.add_argument("--text", choices=sorted(EVALUATION_TEXTS), default="python-reference")
    ap.add_argument("--uniform-r", type=int, nargs="*", default=[],
                    help="also decode with every layer at this r (k on the byte budget)")
    ap.add_argument("--split-file", default=DEFAULT_SPLIT,
                    help="the auto split: a saved split's name, or a JSON written by sparq_ext.Split.save "
                         "(its file name with _r<ratio> per ratio: give the name of a saved split)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="calibrate the auto split again on the CUDA EULA instead (written to --out)")
    ap.add_argument("--calibration-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                    help="with --recalibrate: calibrate at each of these lengths (decoding uses the nearest)")
    ap.add_argument("--calibration-positions", type=int, default=None,
                    help="with --recalibrate: sampled query positions per layer (default: by length)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--pool", nargs="+", type=Path, metavar="JSON",
                    help="run nothing: pool these earlier results (one text each) into "
                         "split_windows_pooled{_tag}.{json,md} under --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pool:
        missing = [str(p) for p in args.pool if not p.is_file()]
        if missing:
            ap.error(f"--pool: no such file: {', '.join(missing)}")
        print(pool_runs(args.pool, out / f"split_windows_pooled{'_' + args.tag if args.tag else ''}"))
        return
    if args.windows < 1 or args.tokens < 1:
        ap.error("--windows and --tokens must be >= 1")
    if args.calibration_positions is not None and args.calibration_positions < 1:
        ap.error("--calibration-positions must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [int(r) if float(r).is_integer() else r for r in args.ratios]
    stem = out / f"split_windows{'_' + args.tag if args.tag else ''}"
    splits = {} if args.recalibrate else {ratio: Split.load(args.split_file, ratio=ratio) for ratio in ratios}
    model, tok = load_smollm2(torch.float32)
    if args.recalibrate:
        ids = calibration_text_ids(tok, max(args.calibration_lengths))
        for ratio in ratios:
            splits[ratio] = calibrate_split(model, ids, ratio, path=out / f"split_r{ratio:g}.json",
                                            lengths=args.calibration_lengths, positions=args.calibration_positions)
            tqdm.write(f"calibrated ratio {ratio:g}: {splits[ratio].meta['calibration_seconds']:.1f} s")
    ids = real_text_ids(tok, text=args.text)
    meta = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)", text=args.text,
                text_tokens=ids.shape[1], commit=git_commit(str(HERE)), threads=torch.get_num_threads(),
                torch=torch.__version__, splits={f"{r:g}": split.to_json() for r, split in splits.items()},
                args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    n_layers = model.config.num_hidden_layers
    N = args.tokens
    cells = {f"{C}/{ratio:g}": {"context": C, "ratio": ratio, "window_start": [], "dense_window_nll": [],
                                "window_nll": {}} for C in args.contexts for ratio in ratios}
    t_start = time.time()
    plan = [(C, s) for C in args.contexts for s in window_starts(ids.shape[1], C + N + 1, args.windows)]
    configs = [(m, ratio) for ratio in ratios for m in ("even", "auto", *(f"r={r}" for r in args.uniform_r))]
    bar = tqdm(total=len(plan) * (1 + len(configs)), desc="decodes", unit="decode")
    for C, start in plan:
        span = ids[:, start:start + C + N + 1]
        toks, targets = span[:, C:C + N], span[0, C + 1:C + N + 1]
        pre = PrefilledCache(model, span[:, :C], h2o_scores=False)  # no H2O here: skip its scores

        def window_nll(logits):
            return float(-torch.log_softmax(logits[0], -1).gather(-1, targets[:, None])[:, 0].mean())

        set_method(model, "dense", 8)
        dense = window_nll(teacher_forced_decode(model, toks, pre.fresh()))
        for ratio in ratios:
            cells[f"{C}/{ratio:g}"]["window_start"].append(start)
            cells[f"{C}/{ratio:g}"]["dense_window_nll"].append(dense)
        bar.update(1)
        for method, ratio in configs:
            if method == "even":
                enable_sparq(model, ratio=ratio)
            elif method == "auto":
                enable_sparq(model, ratio=ratio, split="auto", split_file=splits[ratio])
            else:  # uniform r: every layer at one r, k on the layer's even budget
                enable_sparq(model, ratio=ratio, split="auto",
                             split_file=Split.uniform(ratio, n_layers, int(method[2:])))
            nll = window_nll(teacher_forced_decode(model, toks, pre.fresh()))
            disable_sparq(model)
            cells[f"{C}/{ratio:g}"]["window_nll"].setdefault(method, []).append(nll)
            bar.update(1)
    bar.close()
    meta["seconds"] = time.time() - t_start

    gen = torch.Generator().manual_seed(0)
    rows = []
    for key, cell in cells.items():
        cell["summary"] = s = summarise(cell, gen)
        ci, d_ci, ratio = s["auto_over_even_ci95"], s["nll_auto_minus_even_ci95"], s["auto_over_even"]
        rows.append([cell["context"], cell["ratio"], len(cell["window_start"]),
                     f"{math.exp(sum(cell['dense_window_nll']) / len(cell['dense_window_nll'])):.3f}",
                     f"{s['loss_pct']['even']:+.2f}%", f"{s['loss_pct']['auto']:+.2f}%",
                     "n/a" if ratio is None else f"{ratio:.2f}",
                     "n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]", f"{s['p_goal']:.2f}",
                     f"{s['nll_auto_minus_even']:+.4f} [{d_ci[0]:+.4f}, {d_ci[1]:+.4f}]",
                     " ".join(f"{m} {v:+.1f}%" for m, v in s["loss_pct"].items() if m.startswith("r="))])
    headers = ["context", "ratio", "windows", "dense ppl", "even loss", "auto loss", "auto / even",
               "95% CI (windows)", "P(<= 0.5)", "NLL auto - even [95% CI]", "uniform r"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, cells=cells), indent=1))
    stem.with_suffix(".md").write_text(
        f"# Auto vs even split over {args.windows} windows per context\n\n"
        f"Written by `research/eval_split_windows.py` (see its docstring for the method).\n\n"
        f"```\n{json.dumps(meta, indent=1)}\n```\n\n{table}\n")
    plot(cells, stem.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
