"""Issue 6 with more power: the auto split against the even split over many windows of one text.

eval_accuracy.py scores one 128-token window per context. That is too few to decide the
issue's goal (at ratios 4 and 8, auto's perplexity loss at most half the even split's) where
the two are close: at 4K ratio 4 GPL-3 gave 0.53, and a bootstrap over its 128 tokens spans
about +-0.03 nats (split_decode_probe.md). This script scores W disjoint windows of the Python
language reference (pydoc_data.topics, each paragraph once, ~92K tokens; the auto split is
calibrated on a different text, the CUDA EULA). Each window's first C tokens are prefilled
densely, then its next N tokens are teacher-forced one decode step at a time through dense
attention, the even split (r = D/rho, k = S/(2 rho), local window k/4: enable_sparq's default)
and the auto split with each layer on its own budget line ("auto": the saved
benchmarks/results/split_smollm2_r{rho}.json, mass criterion) and with the layers sharing the
model's budget ("auto_model": split_smollm2_r{rho}_model.json, the library's default budget),
optionally also with every layer at one uniform r (--uniform-r).

Loss of a method = exp(mean NLL - mean dense NLL) - 1, pooled over all windows' tokens. The
95% interval of auto/even (and auto_model/even) comes from a bootstrap over windows (tokens of one window are
correlated), 2000 resamples; P(<= 0.5) is the share of resamples meeting the goal.
Writes benchmarks/results/split_windows.{json,md,png}.

    python benchmarks/eval_split_windows.py --threads 2                 # 1K/4K/8K x ratios 4, 8
    python benchmarks/eval_split_windows.py --contexts 1024 --windows 2 --tokens 16 --tag quick

--pool A.json B.json ... runs nothing: it pools earlier runs on different texts per (context,
ratio), with a bootstrap stratified by text, into split_windows_pooled{_tag}.{json,md}; only
cells that decoded with the same splits in every run (checked against the split files the runs
recorded, or git at their commits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparq_ext.calibrate import nearest_length  # noqa: E402
from sparq_ext.integrations.evaluation import teacher_forced_decode  # noqa: E402
from sparq_ext.integrations.smollm2 import EVALUATION_TEXTS, load_smollm2, real_text_ids  # noqa: E402
from sparq_ext.integrations.transformers import disable_sparq, enable_sparq, sparq_settings  # noqa: E402

import eval_accuracy  # noqa: E402  (benchmarks/ is the script's directory)
from common import git_commit  # noqa: E402
from eval_accuracy import PrefilledCache, prepare_run, set_method, split_file_for  # noqa: E402

BOOTSTRAP = 2000
AUTO_METHODS = ("auto", "auto_model")  # method -> split file budget: "layer", "model"


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
    """Pooled losses and the bootstrap (over windows) of each auto variant over even, for one
    (context, ratio): keys ``auto_over_even``... for "auto", ``auto_model_over_even``... for
    "auto_model". A list of cells (the same context and ratio on different texts) is pooled:
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


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_payloads(meta: dict) -> dict:
    """The split files a run decoded with, {"model/4": payload}: the files here when their sha256
    matches the one the run recorded, else (older runs) from git at the run's commit ("-dirty"
    stripped: the committed version)."""
    out = {}
    for key, rel in meta["split_files"].items():
        path = ROOT / rel
        if meta.get("split_sha256", {}).get(key) and path.is_file() and \
                file_sha256(path) == meta["split_sha256"][key]:
            out[key] = json.loads(path.read_text())
            continue
        commit = meta["commit"].removesuffix("-dirty")
        try:
            blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{rel}"], capture_output=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            raise SystemExit(f"cannot tell which {rel} the run at {meta['commit']} decoded with (neither a "
                             f"matching file nor that commit here); not pooled") from None
        out[key] = json.loads(blob)
    return out


def splits_used(payloads: dict, context: int, ratio: float, tokens: int) -> dict:
    """What decoding `tokens` steps after a `context`-token prefill used from each split file of
    `ratio`: the per-layer r and ratio of the calibration length nearest to each step's length."""
    out = {}
    for key, payload in payloads.items():
        if float(key.split("/")[1]) != ratio:
            continue
        lengths = {int(L): e for L, e in payload.get("lengths", {}).items()}
        if not lengths:
            out[key] = [(payload["layer_r"], payload.get("layer_ratio", {}))]
            continue
        used = sorted({nearest_length(lengths, n) for n in range(context, context + tokens + 1)})
        out[key] = [(lengths[L]["layer_r"], lengths[L].get("layer_ratio", {})) for L in used]
    return out


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
    payloads = [split_payloads(r["meta"]) for r in runs]
    for key in keys:  # the same splits must have been decoded in each run (files may differ elsewhere)
        c = runs[0]["cells"][key]
        used = [splits_used(pl, c["context"], c["ratio"], r["meta"]["args"]["tokens"])
                for pl, r in zip(payloads, runs)]
        shared = set.intersection(*(set(u) for u in used))  # split files of methods all runs decoded
        for p, u in zip(paths[1:], used[1:]):
            if any(u[f] != used[0][f] for f in shared):
                raise SystemExit(f"{p}: cell {key} decoded with other splits than in {paths[0]}; not pooled")
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
    meta = {"pooled": [{"file": os.path.relpath(Path(p).resolve(), ROOT), "text": r["meta"]["text"],
                        "commit": r["meta"]["commit"]} for p, r in zip(paths, runs)],
            "split_files": ref["split_files"], "commit": git_commit()}
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, cells=pooled), indent=1))
    stem.with_suffix(".md").write_text(
        "# Auto vs even split, pooled over texts\n\n"
        "Written by `benchmarks/eval_split_windows.py --pool` (bootstrap over windows, stratified by text; "
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
        for m, style in (("even", "o-"), ("auto", "s-"), ("auto_model", "^-")):
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
    ap.add_argument("--auto", nargs="+", choices=AUTO_METHODS, default=list(AUTO_METHODS),
                    help="auto splits to decode: per-layer budget lines (auto), model-wide budget (auto_model)")
    ap.add_argument("--uniform-r", type=int, nargs="*", default=[],
                    help="also decode with every layer at this r (k on the byte budget)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="calibrate the auto split again (CUDA EULA) instead of the saved files; the split "
                         "files go to --out")
    ap.add_argument("--calibration-tokens", type=int, default=2048,
                    help="with --recalibrate: tokens of the calibration text")
    ap.add_argument("--calibration-lengths", type=int, nargs="*", default=None,
                    help="with --recalibrate: calibrate auto_model at each of these lengths (nearest used)")
    ap.add_argument("--calibration-positions", type=int, default=None,
                    help="with --recalibrate: sampled query positions per layer (default: the library's, "
                         "by length: 8 up to 2048 tokens, 32 at 8192)")
    ap.add_argument("--split-dir", type=Path, default=ROOT / "benchmarks" / "results",
                    help="directory of the saved split files decoded without --recalibrate")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--pool", nargs="+", type=Path, metavar="JSON",
                    help="run nothing: pool these earlier results (one text each) into "
                         "split_windows_pooled{_tag}.{json,md} under --out")
    args = ap.parse_args()
    if args.pool:
        missing = [str(p) for p in args.pool if not p.is_file()]
        if missing:
            ap.error(f"--pool: no such file: {', '.join(missing)}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        print(pool_runs(args.pool, out / f"split_windows_pooled{'_' + args.tag if args.tag else ''}"))
        return
    if args.windows < 1 or args.tokens < 1:
        ap.error("--windows and --tokens must be >= 1")
    if args.calibration_positions is not None and args.calibration_positions < 1:
        ap.error("--calibration-positions must be >= 1")
    if args.recalibrate and Path(args.out).resolve() == (ROOT / "benchmarks" / "results").resolve():
        ap.error("--recalibrate writes split files to --out: give another directory than benchmarks/results, "
                 "whose saved split files it would overwrite")
    out, ratios = prepare_run(args)
    stem = out / f"split_windows{'_' + args.tag if args.tag else ''}"

    budgets = [{"auto": "layer", "auto_model": "model"}[m] for m in args.auto]
    if not args.recalibrate:  # before the model loads: a missing file fails at once
        for budget in budgets:
            for ratio in ratios:
                path = split_file_for(args.split_dir, ratio, budget)
                if not Path(path).exists():
                    raise SystemExit(f"no saved split for ratio {ratio:g} ({path}); give --split-dir or "
                                     f"run with --recalibrate")
                eval_accuracy.SPLIT_FILES[budget, ratio] = path
    model, tok = load_smollm2(torch.float32)
    if args.recalibrate:
        for budget in budgets:
            lengths = args.calibration_lengths if budget == "model" else None
            eval_accuracy.calibrate_auto_splits(model, tok, ratios, out, max([args.calibration_tokens, *(lengths or [])]),
                                                tqdm.write, budget=budget, lengths=lengths,
                                                positions=args.calibration_positions)
    ids = real_text_ids(tok, text=args.text)
    commit = git_commit()
    meta = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)", text=args.text,
                text_tokens=ids.shape[1], commit=commit, threads=torch.get_num_threads(), torch=torch.__version__,
                split_files={f"{b}/{r:g}": os.path.relpath(eval_accuracy.SPLIT_FILES[b, r], ROOT)
                             for b in budgets for r in ratios},
                split_sha256={f"{b}/{r:g}": file_sha256(eval_accuracy.SPLIT_FILES[b, r])
                              for b in budgets for r in ratios},
                args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    n_layers = model.config.num_hidden_layers
    N = args.tokens
    cells = {f"{C}/{ratio:g}": {"context": C, "ratio": ratio, "window_start": [], "dense_window_nll": [],
                                "window_nll": {}} for C in args.contexts for ratio in ratios}
    t_start = time.time()
    plan = [(C, s) for C in args.contexts for s in window_starts(ids.shape[1], C + N + 1, args.windows)]
    configs = [(m, ratio) for ratio in ratios for m in ("even", *args.auto, *(f"r={r}" for r in args.uniform_r))]
    bar = tqdm(total=len(plan) * (1 + len(configs)), desc="decodes", unit="decode")
    for C, start in plan:
        span = ids[:, start:start + C + N + 1]
        toks, targets = span[:, C:C + N], span[0, C + 1:C + N + 1]
        pre = PrefilledCache(model, span[:, :C], h2o_scores=False)  # no H2O here: skip its scores

        def window_nll(logits):
            return float(-torch.log_softmax(logits[0], -1).gather(-1, targets[:, None])[:, 0].mean())

        set_method(model, "dense", None)
        dense = window_nll(teacher_forced_decode(model, toks, pre.fresh()))
        for ratio in ratios:
            cells[f"{C}/{ratio:g}"]["window_start"].append(start)
            cells[f"{C}/{ratio:g}"]["dense_window_nll"].append(dense)
        bar.update(1)
        for method, ratio in configs:
            if method == "even":
                set_method(model, "sparq", ratio)
            elif method in AUTO_METHODS:
                set_method(model, {"auto": "sparq_auto", "auto_model": "sparq_auto_model"}[method], ratio)
            else:  # uniform r: the auto machinery with every layer set to one r
                enable_sparq(model, ratio=ratio, split="auto")
                sparq_settings(model).layer_r.update({layer: int(method[2:]) for layer in range(n_layers)})
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
        for name in args.auto:
            ci = s[f"{name}_over_even_ci95"]
            d_ci = s[f"nll_{name}_minus_even_ci95"]
            ratio = s[f"{name}_over_even"]
            rows.append([cell["context"], cell["ratio"], len(cell["window_start"]),
                         f"{math.exp(sum(cell['dense_window_nll']) / len(cell['dense_window_nll'])):.3f}",
                         f"{s['loss_pct']['even']:+.2f}%", name, f"{s['loss_pct'][name]:+.2f}%",
                         "n/a" if ratio is None else f"{ratio:.2f}",
                         "n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]",
                         f"{s['p_goal' if name == 'auto' else 'p_goal_' + name]:.2f}",
                         f"{s[f'nll_{name}_minus_even']:+.4f} [{d_ci[0]:+.4f}, {d_ci[1]:+.4f}]",
                         " ".join(f"{m} {v:+.1f}%" for m, v in s["loss_pct"].items() if m.startswith("r="))])
    headers = ["context", "ratio", "windows", "dense ppl", "even loss", "auto split", "its loss", "its loss / even's",
               "95% CI (windows)", "P(<= 0.5)", "NLL it - even [95% CI]", "uniform r"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, cells=cells), indent=1))
    stem.with_suffix(".md").write_text(
        f"# Auto vs even split over {args.windows} windows per context\n\n"
        f"Written by `benchmarks/eval_split_windows.py` (see its docstring for the method).\n\n"
        f"```\n{json.dumps(meta, indent=1)}\n```\n\n{table}\n")
    plot(cells, stem.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
