"""Why does stock vLLM run slower inside bench_vllm.py (75 ms per step at 8K, batch 1) than in a
process of stock engines alone (60-62 ms)? Engines in one process, created in the order given,
timed interleaved (order rotated per repeat) as bench_vllm.py times them: ms per decode step =
(33-token time - 1-token time) / 32, 8K context, batch 1, fp32, eager.

Run in the vLLM venv: ``SPARQ_VLLM_MODEL=build/smollm2-135m .venv-vllm/bin/python -P
research/vllm_stock_probe.py stock,sparq,stock 5`` (engine kinds in creation order: stock, sparq, or idle-sparq = built but never run; repeats).
Answer: docs/vllm.md ("Speed"); raw output: research/results/vllm_stock_probe.txt."""
import os, statistics, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("BIND", "0-1")
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
from vllm import LLM, SamplingParams
from sparq_ext.evaluation.texts import python_reference_text


def main():
    model, ctx, tokens = os.environ["SPARQ_VLLM_MODEL"], 8192, 32
    kinds, repeats = sys.argv[1].split(","), int(sys.argv[2])
    configs = {"stock": {}, "sparq": {"sparq": {"ratio": 8}}, "idle-sparq": {"sparq": {"ratio": 8}}}
    engines = {}
    for i, kind in enumerate(kinds):
        engines[f"{i}:{kind}"] = LLM(model, dtype="float32", enforce_eager=True, max_model_len=ctx,
                                     enable_prefix_caching=True, max_num_seqs=8, seed=0,
                                     additional_config=configs[kind])
    ids = next(iter(engines.values())).get_tokenizer()(python_reference_text())["input_ids"]
    prompts = [{"prompt_token_ids": ids[:ctx - tokens - 1]}]

    def timed(llm, n):
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    idle = [llm for n, llm in engines.items() if n.endswith("idle-sparq")]  # built, never run (kept:
    # an engine that is garbage-collected tears down the process's parallel groups)
    engines = {n: llm for n, llm in engines.items() if not n.endswith("idle-sparq")}
    for llm in engines.values():
        timed(llm, 1)  # prefill, cached for every cell after
    names, samples = list(engines), {n: [] for n in engines}
    for rep in range(repeats):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            base = timed(engines[n], 1)
            samples[n].append((timed(engines[n], tokens + 1) - base) / tokens * 1000)
    print(f"8K batch 1, ms per step, median of {repeats}: " + ", ".join(
        f"{n} {statistics.median(v):.1f}" for n, v in samples.items()))
    print("samples", {n: [round(x, 1) for x in v] for n, v in samples.items()})


if __name__ == "__main__":  # vLLM may spawn engine processes that import this file
    main()
