"""End-to-end decode throughput (tokens/s), dense vs SparQ, same model, cache class and prompt.

Default: the real SmolLM2-135M-Instruct on the GPL-3 text, contexts up to 8K. Both runs use a
``SparQCache`` (dense decoding reads its ``keys``/``values`` with SDPA; SparQ reads ``key_t``,
the selected rows and the running V sum through ``sparq_ext.attention``). The prompt is
prefilled once (SDPA) and each run decodes from it (the cache is cropped back in between);
tokens/s counts greedy decode steps only. Dense and SparQ alternate per repeat and
the median is reported, so drift on a shared machine hits both.

``--llama7b-shape`` (CUDA): a Llama-2-7B-shaped model (32 layers, 32 heads, D = 128, MHA) with
RANDOM weights — speed only, its outputs mean nothing — in fp16/bf16.

Writes benchmarks/results/generate_<device>[_<tag>].json and prints a tabulate table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

import sparq_ext
from sparq_ext import SparQCache
from sparq_ext.evaluation.decode import cache_kwargs
from sparq_ext.evaluation.timing import git_commit
from sparq_ext.integrations.transformers import disable_sparq, enable_sparq

HERE = Path(__file__).resolve().parent


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model, prompt, new_tokens, device):
    """Prefill ``prompt`` into a SparQCache sized for the run; returns (cache, logits, seconds)."""
    cache = SparQCache(config=model.config, capacity=prompt.shape[1] + new_tokens)
    sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1]
    sync(device)
    sums = [layer.value_sum.clone() for layer in cache.layers]
    return (cache, logits, sums), time.perf_counter() - t0


@torch.no_grad()
def decode_run(model, prefilled, new_tokens, device):
    """Greedy-decode ``new_tokens`` from a prefilled cache (cropped back to the prompt afterwards)."""
    cache, logits, sums = prefilled
    length = cache.get_seq_length()
    sync(device)
    t0 = time.perf_counter()
    tokens = []
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
    sync(device)
    seconds = time.perf_counter() - t0
    for layer, saved in zip(cache.layers, sums):  # back to the prompt for the next run
        layer.crop(length - layer.get_seq_length())
        layer.value_sum.copy_(saved)
    return dict(decode_s=seconds, tokens=torch.cat(tokens, 1).cpu())


def llama7b_shaped(device, dtype, layers):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # random weights: speed only
    return model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8000])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama7b-shape", action="store_true",
                    help="Llama-2-7B-shaped model with random weights (CUDA; speed only)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the --llama7b-shape model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="contexts 1024 2048, 16 tokens, 1 repeat")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.new_tokens, args.repeats = [1024, 2048], 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))

    if args.llama7b_shape:
        if device.type != "cuda":
            print("warning: --llama7b-shape is meant for CUDA; on CPU use --layers to keep it small")
        model = llama7b_shaped(device, dtype, args.layers)
        model_name = f"Llama-2-7B-shaped, {args.layers} layers, RANDOM weights (speed only)"
        g = torch.Generator().manual_seed(0)
        text = torch.randint(0, model.config.vocab_size, (1, max(args.contexts)), generator=g)
    else:
        from sparq_ext.evaluation.models import load_smollm2
        from sparq_ext.evaluation.texts import real_text_ids
        model, tok = load_smollm2(dtype, device)
        model_name = "SmolLM2-135M-Instruct (real weights)"
        text = real_text_ids(tok)
    backend = sparq_ext.has_native_kernel(device.type)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"dtype {dtype}, threads {torch.get_num_threads()}, "
          f"SparQ backend: {'native ' + device.type + ' kernel' if backend else 'pure-torch reference'} "
          f"(sparq_ext.has_native_kernel({device.type!r}) = {backend})")

    rows = []
    for context in args.contexts:
        if context > text.shape[1]:
            print(f"skip context {context}: only {text.shape[1]} tokens of text")
            continue
        prompt = text[:, :context].repeat(args.batch, 1).to(device)
        runs = {"dense": [], "sparq": []}
        disable_sparq(model)
        prefilled, prefill_s = prefill(model, prompt, args.new_tokens, device)  # SDPA in both modes
        for rep in tqdm(range(args.repeats + 1), desc=f"context {context}", leave=False):
            for method in ("dense", "sparq"):
                if method == "dense":
                    disable_sparq(model)
                else:
                    enable_sparq(model, ratio=args.ratio)
                run = decode_run(model, prefilled, args.new_tokens if rep else 2, device)
                if rep:  # repeat 0 is a warm-up
                    runs[method].append(run)
        disable_sparq(model)
        agree = (runs["dense"][0]["tokens"] == runs["sparq"][0]["tokens"]).float().mean().item()
        row = dict(context=context, batch=args.batch, new_tokens=args.new_tokens, ratio=args.ratio,
                   prefill_s=prefill_s)
        for method, rs in runs.items():
            dec = statistics.median(r["decode_s"] for r in rs)
            row[f"{method}_tok_s"] = args.batch * args.new_tokens / dec
            row[f"{method}_ms_per_step"] = 1000 * dec / args.new_tokens
        row["speedup"] = row["sparq_tok_s"] / row["dense_tok_s"]
        row["greedy_token_agreement"] = agree
        rows.append(row)
        tqdm.write(f"context {context}: dense {row['dense_tok_s']:.2f} tok/s, sparq {row['sparq_tok_s']:.2f} tok/s "
                   f"(x{row['speedup']:.2f})")

    table = tabulate([[r["context"], r["batch"], r["new_tokens"], f"{r['dense_tok_s']:.2f}", f"{r['sparq_tok_s']:.2f}",
                       f"{r['speedup']:.2f}", f"{r['dense_ms_per_step']:.1f}", f"{r['sparq_ms_per_step']:.1f}",
                       f"{r['greedy_token_agreement']:.2f}"] for r in rows],
                     headers=["context", "batch", "new tokens", "dense tok/s", "SparQ tok/s", "speedup",
                              "dense ms/step", "SparQ ms/step", "greedy agreement"], tablefmt="github")
    print(table)
    commit = git_commit(str(HERE))
    meta = dict(model=model_name, device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
                dtype=str(dtype), threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=__import__("transformers").__version__, commit=commit,
                native_kernel=backend, ratio=args.ratio, args=vars(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"generate_{device.type}{'_llama7b' if args.llama7b_shape else ''}{'_' + args.tag if args.tag else ''}.json"
    (out / name).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
