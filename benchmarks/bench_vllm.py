"""vLLM decode throughput: its stock attention against SparQ (sparq_ext's vLLM backend).

Runs in the vLLM venv (``make bench-vllm``). All engines are started by this one process, each
with its engine core (model, KV cache, threads) in a process of its own (vLLM's default), so each
cell is measured stock and SparQ side by side, interleaved, with the order rotated per repeat;
the median is reported. (With engine cores inside this process, VLLM_ENABLE_V1_MULTIPROCESSING=0,
SparQ's step is faster at batch 1 on a 2-vCPU machine and its ratio to stock higher: docs/vllm.md.) Per context the same distinct prompts (slices
of the Python language reference) are prefilled once per engine; a cell then times
``max_tokens = N + 1`` against ``max_tokens = 1`` on the cached prompts, so the difference is
``N`` decode steps of the whole batch (tokens/s = batch · N / that time; time per output token =
that time / N). KV capacity (tokens per GiB of ``VLLM_CPU_KVCACHE_SPACE``) is read from each
engine.

Writes ``<out>.json`` and ``<out>.png`` (default ``benchmarks/results/vllm_<device>``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # an engine core per process
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("SPARQ_VLLM_MODEL", "build/smollm2-135m"),
                   help="a safetensors model folder (default: SmolLM2-135M, exported on first use)")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192],
                   help="tokens attended by the last decode step (prompt + generated)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--ratios", type=float, nargs="+", default=[4, 8])
    p.add_argument("--int8-ratios", type=float, nargs="*", default=[8],
                   help="ratios also run with the 8-bit selection cache (key_t_dtype 'int8')")
    p.add_argument("--key-std-ratios", type=float, nargs="*", default=[],
                   help="ratios also run with the 8-bit selection cache and component_rule 'key_std'")
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed per cell")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true",
                   help="vLLM's default compiled engine (torch.compile) instead of enforce_eager")
    p.add_argument("--threads-bind",
                   default=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}"),
                   help="VLLM_CPU_OMP_THREADS_BIND for every engine (CPU; default: every core)")
    p.add_argument("--out", default=None, help="output path without extension")
    p.add_argument("--quick", action="store_true", help="one small cell (a smoke run)")
    args = p.parse_args(argv)
    for name in ("contexts", "batches", "ratios", "int8_ratios", "key_std_ratios"):
        if any(v <= 0 for v in getattr(args, name)):
            p.error(f"--{name} values must be > 0")
    if args.tokens < 1 or args.repeats < 1:
        p.error("--tokens and --repeats must be >= 1")
    if min(args.contexts) <= args.tokens + 1:
        p.error("--contexts must exceed --tokens + 1 (the prompt is the rest)")
    if args.quick:
        args.contexts, args.batches, args.ratios, args.tokens, args.repeats = [1024], [1, 2], [8], 8, 1
    return args


def kv_bytes_per_token(model: str, dtype: str, extra: dict, block_size: int = 128) -> float:
    """KV bytes per token of the model (stock page, or with the region of SparQ's ``extra``
    settings), for sizing the cache."""
    import torch

    from sparq_ext.integrations.vllm import sparq_page_extra_bytes

    config = json.loads((Path(model) / "config.json").read_text())
    heads = config["num_key_value_heads"]
    D = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    torch_dtype = getattr(torch, dtype)
    page = heads * 2 * D * torch.empty((), dtype=torch_dtype).element_size() * block_size
    if extra:
        key_t_dtype = torch.int8 if extra["sparq"].get("key_t_dtype") == "int8" else None
        page += sparq_page_extra_bytes(heads, block_size, D, torch_dtype, key_t_dtype,
                                       extra["sparq"].get("component_rule", "query"))
    return page * config["num_hidden_layers"] / block_size


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.threads_bind
    import torch
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    import sparq_ext
    from sparq_ext.evaluation.models import export_smollm2
    from sparq_ext.evaluation.texts import python_reference_text
    from sparq_ext.evaluation.timing import device_name, git_commit, write_json

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = str(export_smollm2(args.model))
    max_batch, max_ctx = max(args.batches), max(args.contexts)
    modes = [("stock", {})] + [(f"sparq r{ratio:g}", {"sparq": {"ratio": ratio}}) for ratio in args.ratios] \
        + [(f"sparq r{ratio:g} int8", {"sparq": {"ratio": ratio, "key_t_dtype": "int8"}})
           for ratio in args.int8_ratios] \
        + [(f"sparq r{ratio:g} int8 key_std",
            {"sparq": {"ratio": ratio, "key_t_dtype": "int8", "component_rule": "key_std"}})
           for ratio in args.key_std_ratios]

    # Each engine must keep one context's prompts of the largest batch cached, with room to decode.
    need_tokens = max_batch * (max_ctx + 256)
    engines, capacity = {}, {}
    for name, extra in tqdm(modes, desc="starting engines", file=sys.stderr):
        bytes_per_token = kv_bytes_per_token(model, args.dtype, extra)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(need_tokens * bytes_per_token * 1.15 / 2**30)))
        llm = LLM(model, dtype=args.dtype, enforce_eager=not args.compile, max_model_len=max_ctx,
                  enable_prefix_caching=True, max_num_seqs=max(8, max_batch), seed=0,
                  additional_config=extra)
        cache = llm.llm_engine.vllm_config.cache_config
        gib = float(os.environ["VLLM_CPU_KVCACHE_SPACE"])
        capacity[name] = {"tokens": cache.num_gpu_blocks * cache.block_size, "kv_space_gib": gib,
                          "tokens_per_gib": cache.num_gpu_blocks * cache.block_size / gib,
                          "block_size": cache.block_size}
        engines[name] = llm

    tokenizer = engines["stock"].get_tokenizer()
    ids = tokenizer(python_reference_text())["input_ids"]
    if len(ids) < max_batch * max_ctx:
        raise SystemExit(f"the text has {len(ids)} tokens; {max_batch} x {max_ctx} are needed")

    def timed(llm, prompts, max_tokens) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    rows = []
    cells = len(args.contexts) * (len(modes) + args.repeats * len(args.batches) * len(modes))
    progress = tqdm(total=cells, desc="prefill + decode cells", file=sys.stderr)
    for ctx in args.contexts:
        # the context a cell reports is the length its last decode step attends over
        length = ctx - args.tokens - 1
        prompts = [{"prompt_token_ids": ids[i * ctx:i * ctx + length]} for i in range(max_batch)]
        prefill = {}
        for name, llm in engines.items():
            prefill[name] = timed(llm, prompts, 1)
            progress.update()
        samples = {(b, name): [] for b in args.batches for name in engines}
        for repeat in range(args.repeats):
            for b in args.batches:
                order = list(engines)[repeat % len(engines):] + list(engines)[:repeat % len(engines)]
                for name in order:
                    llm = engines[name]
                    base = timed(llm, prompts[:b], 1)
                    full = timed(llm, prompts[:b], args.tokens + 1)
                    samples[(b, name)].append(full - base)
                    progress.update()
        for b in args.batches:
            stock = statistics.median(samples[(b, "stock")])
            for name in engines:
                seconds = statistics.median(samples[(b, name)])
                rows.append({"context": ctx, "batch": b, "mode": name,
                             "decode_tok_s": b * args.tokens / seconds,
                             "ms_per_output_token": 1000 * seconds / args.tokens,
                             "speedup_vs_stock": stock / seconds,
                             "samples_s": samples[(b, name)],
                             "prefill_s_batch": prefill[name] if b == max_batch else None})
    progress.close()

    import vllm
    meta = {"device": device_name(torch.device(device)), "device_type": device,
            "cores": os.cpu_count(), "vllm": vllm.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "sparq_ext": sparq_ext.__version__,
            "commit": os.environ.get("SPARQ_COMMIT") or git_commit(str(Path(__file__).resolve().parents[1])),
            "model": Path(model).name, "dtype": args.dtype, "threads_bind": args.threads_bind,
            "tokens": args.tokens, "repeats": args.repeats, "enforce_eager": not args.compile,
            "engine_core_processes": os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"}
    out = args.out or f"benchmarks/results/vllm_{device}"
    write_json(out + ".json", {"meta": meta, "capacity": capacity, "rows": rows})
    print_table(rows, capacity, meta)
    plot(rows, meta, out + ".png")
    print(f"wrote {out}.json and {out}.png")
    for llm in list(engines.values()):
        del llm
    engines.clear()
    gc.collect()
    return 0


def print_table(rows, capacity, meta) -> None:
    from tabulate import tabulate

    print(f"\nvLLM {meta['vllm']} decode, {meta['model']} {meta['dtype']}, {meta['device']} "
          f"({meta['cores']} cores), commit {meta['commit']}, {meta['tokens']} tokens, median of {meta['repeats']}, "
          f"{'eager' if meta['enforce_eager'] else 'compiled'}")
    print(tabulate([[r["context"], r["batch"], r["mode"], f"{r['decode_tok_s']:.1f}",
                     f"{r['ms_per_output_token']:.1f}", f"{r['speedup_vs_stock']:.2f}x"] for r in rows],
                   headers=["context", "batch", "mode", "tok/s", "ms/token", "vs stock"]))
    print(tabulate([[name, c["tokens"], f"{c['tokens_per_gib']:.0f}"] for name, c in capacity.items()],
                   headers=["engine", "KV tokens", "tokens per GiB"]))


def plot(rows, meta, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    contexts = sorted({r["context"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    width = 0.8 / len(modes)
    for ax, b in zip(axes[0], batches):
        for i, mode in enumerate(modes):
            values = [next((r["decode_tok_s"] for r in rows if r["batch"] == b and r["context"] == c
                            and r["mode"] == mode), 0) for c in contexts]
            bars = ax.bar([j + i * width for j in range(len(contexts))], values, width, label=mode)
            if mode != "stock":
                for bar, c in zip(bars, contexts):
                    s = next(r["speedup_vs_stock"] for r in rows if r["batch"] == b and r["context"] == c
                             and r["mode"] == mode)
                    ax.annotate(f"{s:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(contexts))],
                      [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {b}")
        ax.legend(fontsize=8)
    fig.suptitle(f"vLLM {meta['vllm']} decode: stock vs SparQ — {meta['model']} {meta['dtype']}, "
                 f"{meta['device']}, {'eager' if meta['enforce_eager'] else 'compiled'}, commit {meta['commit']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
