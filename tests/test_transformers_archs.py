"""enable_sparq across the decoder families transformers ships (tiny random-weight configs: plumbing only).

No accuracy is claimed here (random weights); the checks are exact properties: with k beyond the
context SparQ decoding equals dense decoding token for token (greedy, a left-padded batch), the
decode step calls sparq_ext.attention on exactly the full-attention layers (sliding-window layers
stay on SDPA and transformers' own cache layers), and disable_sparq restores the model. Families
whose attention SparQ does not reproduce are refused naming the feature and the layer. Gemma 2
(logit softcapping) and gpt-oss (attention sinks) run SparQ with the operator's softcap / sinks.
Real-model accuracy is in test_transformers.py.
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparq_ext.integrations.transformers as integration  # noqa: E402
from sparq_ext import SparQCache, SparQCacheLayer, Split  # noqa: E402
from sparq_ext.integrations.transformers import (  # noqa: E402
    calibrate_split, disable_sparq, enable_sparq, hf_mask_to_bool, sparq_layers, sparq_settings)

S, F = "sliding_attention", "full_attention"
WINDOW = 8  # shorter than the prompts: sliding layers really drop positions
BIG_K = 1 << 20  # k beyond any context here: SparQ must equal dense attention

# family -> (config class, model class, config overrides, the layers that run SparQ)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, [0, 1, 2, 3]),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}, [0, 1, 2, 3]),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}, []),  # every layer
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, [0, 1, 2, 3]),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM",  # layers >= max_window_layers slide
                      {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2}, [0, 1]),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, [0, 1, 2, 3]),
    "qwen3-sliding": ("Qwen3Config", "Qwen3ForCausalLM",
                      {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 3}, [0, 1, 2]),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}, [0, 1, 2, 3]),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # logit softcapping; sliding and full alternate
               {"sliding_window": WINDOW}, [1, 3]),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM",  # attention sinks; sliding and full alternate
                {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2}, [1, 3]),
    "gemma3-text": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # Gemma 3's 5:1 pattern, shortened
                    {"sliding_window": WINDOW, "layer_types": [S, S, F, S]}, [2]),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, [0, 1, 2, 3]),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, [0, 1, 2, 3]),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}, [0, 1, 2, 3]),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {"sliding_window": WINDOW}, [3]),  # 3 sliding : 1 full
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}, [0, 1, 2, 3]),  # NoPE every 4th layer
}

# family -> (config class, model class, config overrides, what the refusal names)
REFUSED = {
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    {"head_dim": 8, "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8,
                     "qk_nope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
                     "moe_intermediate_size": 32, "n_group": 1, "topk_group": 1},
                    r"layer 0 uses multi-head latent attention \(kv_lora_rank=16\)"),
    "llama4-chunked": ("Llama4TextConfig", "Llama4ForCausalLM",
                       {"attention_chunk_size": WINDOW, "num_local_experts": 2, "intermediate_size_mlp": 128},
                       r"layer 0 uses chunked attention"),
    "qwen3-next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                   r"layer 0 uses linear attention"),
}


def _tiny(config_name, model_name, overrides, layers=4):
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)  # no eos: every row decodes every step
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def _family(name):
    config_name, model_name, overrides, _ = FAMILIES[name]
    return _tiny(config_name, model_name, overrides)


def _left_padded_batch(width=24, pad=5):
    ids = torch.randint(2, 128, (2, width), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def _greedy(model, ids, mask, n=8, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kwargs)


@pytest.fixture
def operator_calls(monkeypatch):
    """The cache layers sparq_ext.attention was called on, one entry per call."""
    calls = []
    real = integration.sparq_attention

    def counting(query, key, *args, **kwargs):
        calls.append(getattr(key, "_sparq_layer", None))
        return real(query, key, *args, **kwargs)

    monkeypatch.setattr(integration, "sparq_attention", counting)
    return calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_big_k_equals_dense_on_exactly_the_full_attention_layers(family, operator_calls):
    model = _family(family)
    expected = FAMILIES[family][3]
    previous_attn = model.config._attn_implementation
    ids, mask = _left_padded_batch()
    n = 8
    dense = _greedy(model, ids, mask, n)
    assert sparq_layers(model) == expected
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        enable_sparq(model, k=BIG_K)
    assert bool([w for w in warned if "no full-attention layer" in str(w.message)]) == (not expected)
    out = _greedy(model, ids, mask, n, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dense)
    cache = out.past_key_values
    assert isinstance(cache, SparQCache)
    assert [i for i, layer in enumerate(cache.layers) if isinstance(layer, SparQCacheLayer)] == expected
    assert all(type(layer).__name__ == "DynamicSlidingWindowLayer"  # transformers' own, as it is
               for i, layer in enumerate(cache.layers) if i not in expected)
    # every decode step (n - 1 after the prefill) calls the operator once per full-attention layer
    assert len(operator_calls) == (n - 1) * len(expected)
    assert sorted({cache.layers.index(layer) for layer in operator_calls}) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-full-attention-layer warning, checked above
        enable_sparq(model, ratio=4)
    assert _greedy(model, ids, mask, n).shape == dense.shape
    disable_sparq(model)
    assert model.config._attn_implementation == previous_attn
    assert not any(hasattr(m, "_sparq_settings") for m in model.modules())
    out = _greedy(model, ids, mask, n, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dense) and type(out.past_key_values).__name__ == "DynamicCache"


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_attention_sparq_does_not_reproduce_is_refused_naming_feature_and_layer(family):
    config_name, model_name, overrides, match = REFUSED[family]
    model = _tiny(config_name, model_name, overrides)
    previous_attn = model.config._attn_implementation
    for call in (enable_sparq, sparq_layers, calibrate_split):
        args = (torch.zeros(1, 64, dtype=torch.long),) if call is calibrate_split else ()
        with pytest.raises(ValueError, match=match):
            call(model, *args)
    assert model.config._attn_implementation == previous_attn and not hasattr(model, "_sparq_previous_attn")


def test_hybrid_sampling_equals_dense():
    model = _family("gemma3-text")
    ids, mask = _left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    dense = model.generate(ids, **kwargs)
    enable_sparq(model, ratio=4, k=BIG_K)
    torch.manual_seed(7)
    assert torch.equal(model.generate(ids, **kwargs), dense)


def test_hybrid_fixed_budget_row_decodes_as_alone():
    """Fixed r, k on the full layers, windows on the others: each left-padded row decodes as it does alone."""
    model = _family("cohere2")
    ids, mask = _left_padded_batch(width=40, pad=9)
    enable_sparq(model, r=4, k=12, local_window=4)
    together = _greedy(model, ids, mask, 6)
    for row in range(2):
        alone_ids = ids[row:row + 1, int((mask[row] == 0).sum()):]
        alone = _greedy(model, alone_ids, torch.ones_like(alone_ids), 6)
        assert torch.equal(together[row, 40:], alone[0, alone_ids.shape[1]:]), row


def test_hybrid_auto_split_calibrates_only_the_sparq_layers(monkeypatch, tmp_path):
    from sparq_ext import calibrate
    scored = []
    original = calibrate.choose_layer_split

    def counting(*args, **kwargs):
        scored.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(calibrate, "choose_layer_split", counting)
    config_name, model_name, overrides, _ = FAMILIES["gemma3-text"]
    model = _tiny(config_name, model_name, {**overrides, "layer_types": [S, F, S, S, F, S]}, layers=6)
    full = [1, 4]
    ids = torch.randint(2, 128, (1, 80), generator=torch.Generator().manual_seed(3))
    enable_sparq(model, ratio=8, split="auto")
    settings = sparq_settings(model)
    assert settings.calibrator is not None and settings.calibrator.n_layers == len(full)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert settings.calibrator is None and sorted(settings.split.at(80)) == full
    assert len(scored) == len(full)
    D = model.config.head_dim
    settings.split.check(D, layers=full)

    split = calibrate_split(model, ids, ratio=8, path=tmp_path / "split.json")
    assert sorted(split.at(80)) == full and len(scored) == 2 * len(full)
    enable_sparq(model, ratio=8, split="auto", split_file=tmp_path / "split.json")
    assert sparq_settings(model).split == split
    # a split for a sliding-window layer (or one spending the budget of layers that do not run SparQ)
    for bad in ({0: (2, 8.0)}, {1: (4, 4.0), 4: (4, 4.0)}):
        with pytest.raises(ValueError, match="does not run SparQ|spend"):
            enable_sparq(model, ratio=8, split="auto", split_file=Split(8.0, {80: bad}))
    disable_sparq(model)


def test_all_sliding_model_cannot_be_calibrated():
    model = _family("mistral-sliding")
    with pytest.raises(ValueError, match="no full-attention layer"):
        calibrate_split(model, torch.zeros(1, 64, dtype=torch.long))


@pytest.mark.parametrize("family", ["gemma2", "gpt-oss"])
def test_softcap_and_sinks_reach_the_operator(family, monkeypatch):
    """Gemma 2's attn_logit_softcapping and gpt-oss's sinks (transformers' softcap and s_aux
    keywords) are passed to sparq_ext.attention on every SparQ decode step, as the operator
    takes them."""
    model = _family(family)
    seen = []
    real = integration.sparq_attention

    def recording(query, key, *args, softcap=None, sinks=None, **kwargs):
        seen.append((softcap, sinks))
        return real(query, key, *args, softcap=softcap, sinks=sinks, **kwargs)

    monkeypatch.setattr(integration, "sparq_attention", recording)
    enable_sparq(model, ratio=4)
    ids, mask = _left_padded_batch()
    _greedy(model, ids, mask, 3)
    assert len(seen) == 2 * len(FAMILIES[family][3])
    modules = {m.layer_idx: m for m in integration._attention_modules(model)}
    for softcap, sinks in seen:
        if family == "gemma2":
            assert softcap == model.config.attn_logit_softcapping == 50.0 and sinks is None
        else:
            assert softcap is None and sinks.dtype == torch.float32
            assert any(torch.equal(sinks, modules[i].sinks.float()) for i in FAMILIES[family][3])


@pytest.mark.parametrize("family", ["gemma2", "gpt-oss"])
def test_softmax_variants_change_the_result(family):
    """The variants are not no-ops here: dropping them from the decode step changes its output."""
    model = _family(family)
    enable_sparq(model, k=BIG_K)
    layer = FAMILIES[family][3][0]
    module = next(m for m in integration._attention_modules(model) if m.layer_idx == layer)
    gen = torch.Generator().manual_seed(0)
    K, V = torch.randn(2, 1, 2, 30, 16, generator=gen)
    if family == "gemma2":  # logits of tens: a cap of 50 bends them
        q, kwargs = torch.randn(1, 4, 1, 16, generator=gen) * 20, dict(softcap=50.0)
    else:  # logits of about 1: a sink of 2 takes a real share
        q, kwargs = torch.randn(1, 4, 1, 16, generator=gen), dict(s_aux=module.sinks.detach() + 2)
    with torch.no_grad():
        out, _ = integration.sparq_attention_forward(module, q, K, V, None, scaling=0.25, **kwargs)
        plain, _ = integration.sparq_attention_forward(module, q, K, V, None, scaling=0.25)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_sparq_cache_for_a_hybrid_config():
    model = _family("gemma3-text")
    cache = SparQCache(config=model.config)
    assert [type(layer).__name__ for layer in cache.layers] == \
        ["DynamicSlidingWindowLayer", "DynamicSlidingWindowLayer", "SparQCacheLayer", "DynamicSlidingWindowLayer"]
    with pytest.raises(TypeError, match="layer 0 of this cache is a DynamicSlidingWindowLayer"):
        cache.attention(torch.zeros(1, 4, 1, 16), 0, r=2, k=4)


def test_mask_conversion():
    allowed = torch.tensor([[False, True, True]])
    bool_mask = allowed[:, None, None, :]
    float_mask = torch.zeros(1, 1, 1, 3).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(hf_mask_to_bool(bool_mask, 3), bool_mask)
    assert torch.equal(hf_mask_to_bool(float_mask, 3), bool_mask)
    assert hf_mask_to_bool(None, 3) is None
    with pytest.raises(ValueError, match="4D"):
        hf_mask_to_bool(allowed, 3)


def test_enable_sparq_rejections():
    model = _family("llama")
    for kwargs, match in (({"ratio": 0}, "ratio"), ({"k": 0}, "k must"), ({"r": 2.5}, "r must"),
                          ({"local_window": -1}, "local_window")):
        with pytest.raises(ValueError, match=match):
            enable_sparq(model, **kwargs)
    with pytest.raises(ValueError, match="no attention modules"):
        enable_sparq(torch.nn.Linear(2, 2))


# The accuracy benchmark's kit (sparq_ext.evaluation) on a hybrid model: every method changes the
# full-attention layers only, and one prefill serves every method.

@pytest.mark.parametrize("method", ["streaming", "h2o"])
def test_baselines_keep_the_sliding_layers_dense(method, monkeypatch):
    from sparq_ext.evaluation import baselines
    from sparq_ext.evaluation.methods import set_method

    model = _family("gemma3-text")
    decoded = []  # the layer of every baseline decode step (the masked attention it runs)
    real = baselines._masked_decode
    monkeypatch.setattr(baselines, "_masked_decode", lambda query, key, *args: decoded.append(key) or
                        real(query, key, *args))
    ids, mask = _left_padded_batch()
    set_method(model, method, 4)
    out = _greedy(model, ids, mask, 4, return_dict_in_generate=True)
    full = [out.past_key_values.layers[i] for i in FAMILIES["gemma3-text"][3]]
    assert len(decoded) == 3 * len(full)  # one per decode step and full-attention layer
    assert all(key._sparq_layer in full for key in decoded)


def test_prefilled_cache_restores_a_hybrid_cache():
    from sparq_ext.evaluation.decode import teacher_forced_decode
    from sparq_ext.evaluation.methods import PrefilledCache

    model = _family("gemma3-text")
    ids = torch.randint(2, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    pre = PrefilledCache(model, ids[:, :20], h2o_scores=False)  # longer than the window: it slides
    first = teacher_forced_decode(model, ids[:, 20:], pre.fresh())
    assert pre.cache.get_seq_length() == 30
    assert torch.equal(teacher_forced_decode(model, ids[:, 20:], pre.fresh()), first)
    enable_sparq(model, ratio=2)
    assert not torch.equal(teacher_forced_decode(model, ids[:, 20:], pre.fresh()), first)


def test_bytes_fraction_counts_the_dense_sliding_layers():
    from sparq_ext.budget import rk_for_ratio
    from sparq_ext.evaluation.methods import bytes_fraction

    D, seq_len, window = 64, 4096, 512
    r, k = rk_for_ratio(8, seq_len, D)
    sparq = seq_len * r + 2 * k * D + D  # elements one full-attention layer reads (docs/design.md)
    assert bytes_fraction("sparq", 8, seq_len, D, 1, [F] * 4) == pytest.approx(sparq / (2 * seq_len * D))
    hybrid = bytes_fraction("sparq", 8, seq_len, D, 1, [S] * 5 + [F], sliding_window=window)
    assert hybrid == pytest.approx((sparq + 5 * 2 * window * D) / (2 * seq_len * D + 5 * 2 * window * D))
    assert bytes_fraction("dense", 8, seq_len, D, 1, [S, F], sliding_window=window) == 1.0
    with pytest.raises(ValueError, match="layer 0 is 'sliding_attention'"):
        bytes_fraction("sparq", 8, seq_len, D, 1, [S, F])
