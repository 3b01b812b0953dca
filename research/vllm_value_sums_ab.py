"""A/B in one process: vLLM decode with SparQ's v̄ computed inside the operator from the pages'
block sums (``value_sums_cache``, "new", the backend since this probe) against the backend's
earlier Python v̄ (``index_select`` + ``bmm``, passed as ``value_mean``; "old", reproduced below
and patched into one engine's layers), with stock vLLM beside them. Three engines, interleaved,
the order rotated per repeat; ms per decode step = (33 tokens - 1 token) / 32.

Run in the vLLM venv: ``SPARQ_VLLM_MODEL=build/smollm2-135m KV_GIB=5 .venv-vllm/bin/python -P
research/vllm_value_sums_ab.py 8192 5 8,1`` (context, repeats, batches). KV_GIB must hold the
largest batch's prompts (5 GiB for 8 x 8K), or the prefix cache evicts them and cells re-prefill.
Answer and numbers: docs/vllm.md; raw output: research/results/vllm_value_sums_ab.txt."""
import os, sys, time, statistics, types
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("KV_GIB", "4")
import torch
from vllm import LLM, SamplingParams
from sparq_ext.evaluation.texts import python_reference_text
from sparq_ext.integrations.vllm import cpu as sc

model = os.environ["SPARQ_VLLM_MODEL"]
ctx, tokens, repeats = int(sys.argv[1]), 32, int(sys.argv[2])
batches = [int(b) for b in sys.argv[3].split(",")]

def old_decode(self, layer, query, kv_cache, decode):
    page = self._regions(kv_cache)
    cached = getattr(self, "_old_meta", None)
    if cached is None or cached[0] is not decode:
        seq_lens, table = decode.seq_lens, decode.block_table
        row_blocks = (seq_lens.long() + kv_cache.shape[2] - 1) // kv_cache.shape[2]
        in_row = torch.arange(table.shape[1]) < row_blocks[:, None]
        cached = self._old_meta = (decode, table.reshape(-1).long(), in_row.float() / seq_lens.clamp(min=1)[:, None].float())
    _, block_ids, mean_weights = cached
    n_rows, n_blocks = mean_weights.shape
    sums = page.value_sums.index_select(0, block_ids).view(n_rows, n_blocks, -1)
    value_mean = torch.bmm(mean_weights[:, None, :], sums).view(n_rows, *page.value_sums.shape[1:]).to(query.dtype)
    query = query.reshape(-1, self.num_heads, self.head_size)
    key_t_dtype = self.sparq_settings.key_t_dtype
    key_t = page.key_t if key_t_dtype is None else page.key_t_int8
    def run(length, rows):
        budget = self._budget.get(length)
        if budget is None:
            budget = self._budget[length] = self.sparq_settings.resolve(
                length, self.head_size, sc.layer_index(getattr(layer, "layer_name", "")),
                dtype=kv_cache.dtype, key_t_dtype=key_t_dtype)
        r, k, window = budget
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        return torch.ops.sparq_ext.paged_attention(
            pick(query), page.key_rows, page.values, pick(decode.block_table), pick(decode.seq_lens),
            r=r, k=k, key_t_cache=key_t, value_mean=pick(value_mean), local_window=window,
            reallocate=True, scale=self.scale, softcap=self.logits_soft_cap or None,
            key_t_scale=page.key_t_scale)
    if len(decode.groups) == 1:
        return run(*decode.groups[0])
    result = torch.empty_like(query)
    for length, rows in decode.groups:
        result.index_copy_(0, rows, run(length, rows))
    return result

def make(extra):
    return LLM(model, dtype="float32", enforce_eager=True, max_model_len=ctx, enable_prefix_caching=True,
               max_num_seqs=8, seed=0, additional_config=extra)

engines = {"stock": make({}), "new": make({"sparq": {"ratio": 8}}), "old": make({"sparq": {"ratio": 8}})}
def patch(model_):
    n = 0
    for m in model_.modules():
        impl = getattr(m, "impl", None)
        if isinstance(impl, sc.SparQCPUBackendImpl):
            impl._decode = types.MethodType(old_decode, impl); n += 1
    return n
print("patched layers:", engines["old"].apply_model(patch))
tok = engines["stock"].get_tokenizer()
ids = tok(python_reference_text())["input_ids"]
length = ctx - tokens - 1
prompts = [{"prompt_token_ids": ids[i * ctx:i * ctx + length]} for i in range(max(batches))]
def timed(llm, ps, n):
    t = time.perf_counter(); llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - t
for llm in engines.values(): timed(llm, prompts, 1)
names = list(engines)
for b in batches:
    samples = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % 3:] + names[:rep % 3]
        for n in order:
            base = timed(engines[n], prompts[:b], 1); full = timed(engines[n], prompts[:b], tokens + 1)
            samples[n].append((full - base) / tokens * 1000)
    med = {n: statistics.median(v) for n, v in samples.items()}
    print(f"ctx {ctx} batch {b}: ms/step " + ", ".join(f"{n} {med[n]:.1f}" for n in names)
          + f" | new/old time {med['new']/med['old']:.3f} | x stock: new {med['stock']/med['new']:.3f} old {med['stock']/med['old']:.3f}")
    print("   samples", {n: [round(x, 1) for x in v] for n, v in samples.items()})
