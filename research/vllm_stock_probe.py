"""Does a SparQ engine slow a stock engine of the same process? Engines in one process, created in
the order given, timed interleaved (order rotated per repeat) as bench_vllm.py times them: ms per
decode step = (33-token time - 1-token time) / 32, 8K context, batch 1, fp32, eager, in-process
engine cores (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set).

Run in the vLLM venv: ``SPARQ_VLLM_MODEL=build/smollm2-135m .venv-vllm/bin/python -P
research/vllm_stock_probe.py stock,sparq,stock 5`` (engine kinds in creation order: stock, sparq, or
idle-sparq = built but never run; repeats). Comparing separate runs is unsafe on a shared VM (its
speed drifts by more than the effect); the within-process forms are:
ADD_ENGINE=stock|sparq: time the engines, build one more of that kind and decode on it, time them again.
CALL_OP=N: time the engines, call sparq_ext.paged_attention N times on random 8K data, time them again
(INSTEAD=sdpa: torch's SDPA on tensors of that size instead; INSTEAD=write: one serial page write).
Answer (no slowdown): docs/vllm.md ("Speed"); raw output: research/results/vllm_stock_probe.txt."""
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
    def call_op():  # no SparQ engine: call the operator itself (or INSTEAD) CALL_OP times
        import torch
        import sparq_ext
        q, kc = torch.randn(1, 9, 64), torch.randn(64, 3, 128, 64)
        table, lens = torch.arange(64, dtype=torch.int32)[None], torch.tensor([8192], dtype=torch.int32)
        for _ in range(int(os.environ["CALL_OP"])):
            if os.environ.get("INSTEAD") == "sdpa":  # a torch attention call of similar size instead
                torch.nn.functional.scaled_dot_product_attention(
                    torch.randn(1, 9, 1, 64), torch.randn(1, 9, 8192, 64), torch.randn(1, 9, 8192, 64))
            elif os.environ.get("INSTEAD") == "write":  # sparq_ext's serial page write (no OpenMP)
                sparq_ext.ops._C._write_page_regions(q[:, :3], q[:, :3], torch.tensor([5]), kc,
                                                     torch.zeros(64, 3, 64))
            else:
                sparq_ext.paged_attention(q, kc, kc, table, lens, r=8, k=512)
    def add_engine(kind):  # build one more engine in this process and decode on it once
        extra = LLM(model, dtype="float32", enforce_eager=True, max_model_len=ctx, enable_prefix_caching=True,
                    max_num_seqs=8, seed=0, additional_config=configs[kind])
        timed(extra, tokens + 1)
        return extra

    between = os.environ.get("CALL_OP") or os.environ.get("ADD_ENGINE")
    phases, added = (["before", "after"] if between else [""]), []
    for phase in phases:
        if phase == "after":
            if os.environ.get("CALL_OP"):
                call_op()
            if os.environ.get("ADD_ENGINE"):
                added.append(add_engine(os.environ["ADD_ENGINE"]))
        names, samples = list(engines), {n: [] for n in engines}
        for rep in range(repeats):
            for n in names[rep % len(names):] + names[:rep % len(names)]:
                base = timed(engines[n], 1)
                samples[n].append((timed(engines[n], tokens + 1) - base) / tokens * 1000)
        print(f"{phase} 8K batch 1, ms per step, median of {repeats}: " + ", ".join(
            f"{n} {statistics.median(v):.1f}" for n, v in samples.items()))
        print("samples", {n: [round(x, 1) for x in v] for n, v in samples.items()})


if __name__ == "__main__":  # vLLM may spawn engine processes that import this file
    main()
