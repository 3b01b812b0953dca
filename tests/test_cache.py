"""SparQCache: storage invariants and its use with sparq_ext.attention (no model needed)."""

import pytest
import torch

import sparq_ext
from sparq_ext import SparQCache, SparQCacheLayer

B, HKV, HQ, D = 2, 3, 6, 16


def _kv(T, b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, HKV, T, D, generator=g), torch.randn(b, HKV, T, D, generator=g)


def _dense(q, k, v, valid=None):
    G = q.shape[1] // k.shape[1]
    mask = None if valid is None else valid[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)


def test_append_equals_concatenation_through_growth():
    layer = SparQCacheLayer()
    k, v = _kv(5)
    layer.update(k, v)
    capacities = {layer.capacity}
    for step in range(200):  # crosses several capacity doublings
        k1, v1 = _kv(1, seed=step + 1)
        keys, values = layer.update(k1, v1)
        k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        capacities.add(layer.capacity)
        assert keys.shape == k.shape
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert torch.equal(layer.key_t, k.transpose(-1, -2))
    assert layer.key_t.stride(-1) == 1  # a view of the buffer with a contiguous last dim
    torch.testing.assert_close(layer.value_sum, v.sum(2), rtol=1e-5, atol=1e-4)
    assert layer.get_seq_length() == 205
    # amortised growth: capacity at least doubles each time, so only a few reallocations
    caps = sorted(capacities)
    assert all(b >= 2 * a for a, b in zip(caps, caps[1:])) and len(caps) <= 4


def test_multi_token_update_and_value_mean():
    layer = SparQCacheLayer(capacity=8)
    k, v = _kv(30)
    layer.update(k[:, :, :17], v[:, :, :17])
    layer.update(k[:, :, 17:], v[:, :, 17:])
    assert torch.equal(layer.keys, k) and torch.equal(layer.key_t, k.transpose(-1, -2))
    torch.testing.assert_close(layer.value_mean(), v.mean(2, keepdim=True), rtol=1e-5, atol=1e-6)


def test_cache_attention_k_ge_s_is_dense_and_matches_op():
    cache = SparQCache()
    k, v = _kv(50)
    cache.update(k, v, 0)
    q = torch.randn(B, HQ, 1, D)
    with torch.no_grad():
        torch.testing.assert_close(cache.attention(q, 0, r=D, k=50), _dense(q, k, v), rtol=1e-5, atol=1e-5)
        expected = sparq_ext.attention(q, k, v, r=4, k=12, local_window=3)
        torch.testing.assert_close(cache.attention(q, 0, r=4, k=12, local_window=3), expected,
                                   rtol=1e-5, atol=1e-5)
        r, kk = sparq_ext.rk_for_ratio(4, 50, D)
        torch.testing.assert_close(cache.attention(q, 0, ratio=4),
                                   sparq_ext.attention(q, k, v, r=r, k=kk, local_window=kk // 4),
                                   rtol=1e-5, atol=1e-5)


def test_left_padding_valid_mask():
    k, v = _kv(20)
    valid = torch.ones(B, 20, dtype=torch.bool)
    valid[1, :7] = False  # row 1 is left-padded by 7
    layer = SparQCacheLayer()
    layer.prefill(k, v, valid=valid)
    for step in range(3):
        k1, v1 = _kv(1, seed=10 + step)
        layer.update(k1, v1)
        k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], 1)
    expected_mean = (v * valid[:, None, :, None]).sum(2) / valid.sum(1)[:, None, None]
    torch.testing.assert_close(layer.value_mean()[:, :, 0], expected_mean, rtol=1e-5, atol=1e-6)
    q = torch.randn(B, HQ, 1, D)
    with torch.no_grad():
        out = layer.attention(q, r=5, k=6, local_window=2)
        # the padded row gives what its unpadded part gives alone
        alone = sparq_ext.attention(q[1:], k[1:, :, 7:], v[1:, :, 7:], r=5, k=6, local_window=2)
        torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.attention(q, r=D, k=100), _dense(q, k, v, valid), rtol=1e-5, atol=1e-5)


def test_set_valid_and_set_last_valid_keep_the_sum():
    k, v = _kv(12)
    layer = SparQCacheLayer()
    layer.update(k, v)
    valid = torch.rand(B, 12, generator=torch.Generator().manual_seed(3)) > 0.3
    layer.set_valid(valid)
    torch.testing.assert_close(layer.value_sum, (v * valid[:, None, :, None]).sum(2), rtol=1e-5, atol=1e-5)
    k1, v1 = _kv(1, seed=4)
    layer.update(k1, v1)
    layer.set_last_valid(torch.tensor([True, False]))
    expected = (v * valid[:, None, :, None]).sum(2) + v1[:, :, 0] * torch.tensor([1.0, 0.0])[:, None, None]
    torch.testing.assert_close(layer.value_sum, expected, rtol=1e-5, atol=1e-5)
    assert layer.valid[:, -1].tolist() == [True, False]


def test_ragged_per_row_lengths():
    lengths = torch.tensor([9, 4])
    k, v = _kv(9)
    layer = SparQCacheLayer(capacity=4)
    layer.prefill(k, v, seq_lens=lengths)
    rows_k = [k[b, :, :n] for b, n in enumerate(lengths.tolist())]
    rows_v = [v[b, :, :n] for b, n in enumerate(lengths.tolist())]
    for step in range(70):  # grows past the capacity while rows have different lengths
        k1, v1 = _kv(1, seed=20 + step)
        layer.append(k1, v1)
        rows_k = [torch.cat([rk, k1[b]], 1) for b, rk in enumerate(rows_k)]
        rows_v = [torch.cat([rv, v1[b]], 1) for b, rv in enumerate(rows_v)]
    assert layer.seq_lens.tolist() == [79, 74]
    q = torch.randn(B, HQ, 1, D)
    with torch.no_grad():
        out = layer.attention(q, r=6, k=20, local_window=5)
        for b in range(B):
            n = int(layer.seq_lens[b])
            assert torch.equal(layer.keys[b, :, :n], rows_k[b])
            assert torch.equal(layer.key_t[b, :, :, :n], rows_k[b].transpose(-1, -2))
            torch.testing.assert_close(layer.value_sum[b], rows_v[b].sum(1), rtol=1e-5, atol=1e-4)
            alone = sparq_ext.attention(q[b:b + 1], rows_k[b][None], rows_v[b][None], r=6, k=20, local_window=5)
            torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-5, atol=1e-5)


def test_crop_select_reorder_reset():
    k, v = _kv(10)
    layer = SparQCacheLayer()
    layer.update(k, v)
    layer.crop(-3)
    assert layer.get_seq_length() == 7 and torch.equal(layer.keys, k[:, :, :7])
    torch.testing.assert_close(layer.value_sum, v[:, :, :7].sum(2), rtol=1e-5, atol=1e-5)
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.key_t, k[[1, 0], :, :7].transpose(-1, -2))
    layer.batch_select_indices(torch.tensor([0]))
    assert layer.keys.shape[0] == 1
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized


def test_rejections():
    layer = SparQCacheLayer()
    k, v = _kv(4)
    with pytest.raises(ValueError, match="equal shapes"):
        layer.update(k, v[:, :, :2])
    layer.update(k, v)
    with pytest.raises(ValueError, match="Hkv"):
        layer.update(torch.randn(B, HKV + 1, 1, D), torch.randn(B, HKV + 1, 1, D))
    with pytest.raises(TypeError, match="dtype"):
        layer.update(k.double(), v.double())
    with pytest.raises(RuntimeError, match="empty"):
        layer.prefill(k, v)
    with pytest.raises(ValueError, match="r and k, or ratio"):
        layer.attention(torch.randn(B, HQ, 1, D))


def test_is_a_transformers_cache():
    cache_utils = pytest.importorskip("transformers.cache_utils")
    cache = SparQCache(num_layers=2)
    assert isinstance(cache, cache_utils.Cache)
    assert all(isinstance(layer, cache_utils.CacheLayerMixin) for layer in cache.layers)
    k, v = _kv(3)
    keys, _ = cache.update(k, v, 1)
    assert keys._sparq_layer is cache.layers[1] and cache.get_seq_length(1) == 3


def test_unsupported_cache_features_refuse_clearly():
    """Offloading and crop of a right-padded (per-row length) cache are refused, not mishandled;
    crop of an ordinary cache still works."""
    layer = SparQCacheLayer()
    k, v = _kv(6)
    layer.prefill(k, v, seq_lens=torch.tensor([6, 4]))
    with pytest.raises(NotImplementedError, match="offloading"):
        layer.offload()
    with pytest.raises(NotImplementedError, match="offloading"):
        layer.prefetch()
    with pytest.raises(NotImplementedError, match="per-row-length"):
        layer.crop(-1)
    plain = SparQCacheLayer()
    plain.update(k, v)
    plain.crop(-2)
    assert plain.get_seq_length() == 4
    torch.testing.assert_close(plain.value_sum, v[:, :, :4].sum(2), rtol=1e-5, atol=1e-5)


# --- The 8-bit selection cache (key_t_dtype=torch.int8) ----------------------------------------------

def test_int8_append_equals_quantizing_the_concatenation_through_growth():
    layer = SparQCacheLayer(key_t_dtype=torch.int8)
    k, v = _kv(5)
    layer.update(k, v)
    for step in range(100):  # crosses capacity doublings
        k1, v1 = _kv(1, seed=step + 1)
        layer.update(k1, v1)
        k, v = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
    key_t, key_t_scale = sparq_ext.quantize_key_t(k)
    assert layer.key_t.dtype == torch.int8 and torch.equal(layer.key_t, key_t)
    assert torch.equal(layer.key_t_scale, key_t_scale) and layer.key_t.stride(-1) == 1
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    inputs = layer.attention_inputs()
    assert inputs["key_t"] is layer.key_t and inputs["key_t_scale"] is layer.key_t_scale
    plain = SparQCacheLayer()
    plain.update(k, v)
    assert "key_t_scale" not in plain.attention_inputs() and plain.key_t_scale is None


def test_int8_k_ge_s_is_dense_and_the_selection_matches_the_op():
    cache = SparQCache(key_t_dtype=torch.int8)
    k, v = _kv(80)
    cache.update(k, v, 0)
    q = torch.randn(B, HQ, 1, D)
    key_t, key_t_scale = sparq_ext.quantize_key_t(k)
    with torch.no_grad():
        # step 2 reads the exact keys: k >= S is dense attention whatever step 1 ranked
        torch.testing.assert_close(cache.attention(q, 0, r=3, k=80), _dense(q, k, v), rtol=1e-5, atol=1e-5)
        expected = sparq_ext.attention(q, k, v, r=4, k=12, local_window=3, key_t=key_t,
                                       key_t_scale=key_t_scale)
        torch.testing.assert_close(cache.attention(q, 0, r=4, k=12, local_window=3), expected,
                                   rtol=1e-5, atol=1e-5)
        # ratio: the 8-bit split (fp32, D = 16, ratio 4: r = 4*(1 + 4)/2 - 2 = 8, k = 80*(1/4 - 12/128))
        r, kk = sparq_ext.rk_for_ratio(4, 80, D, dtype=torch.float32, key_t_dtype=torch.int8)
        assert r == 8 and kk == 12
        torch.testing.assert_close(cache.attention(q, 0, ratio=4),
                                   sparq_ext.attention(q, k, v, r=r, k=kk, local_window=kk // 4,
                                                       key_t=key_t, key_t_scale=key_t_scale),
                                   rtol=1e-5, atol=1e-5)


def test_int8_ragged_per_row_lengths_and_batch_ops():
    lengths = torch.tensor([9, 4])
    k, v = _kv(9)
    layer = SparQCacheLayer(capacity=4, key_t_dtype=torch.int8)
    layer.prefill(k, v, seq_lens=lengths)
    rows_k = [k[b, :, :n] for b, n in enumerate(lengths.tolist())]
    for step in range(70):
        k1, v1 = _kv(1, seed=20 + step)
        layer.append(k1, v1)
        rows_k = [torch.cat([rk, k1[b]], 1) for b, rk in enumerate(rows_k)]
    for b in range(B):
        n = int(layer.seq_lens[b])
        key_t, key_t_scale = sparq_ext.quantize_key_t(rows_k[b])
        assert torch.equal(layer.key_t[b, :, :, :n], key_t)
        assert torch.equal(layer.key_t_scale[b, :, :n], key_t_scale)
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.key_t_scale[0, :, :74], sparq_ext.quantize_key_t(rows_k[1])[1])
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.key_t_scale.shape[0] == 1 and layer.key_t.shape[0] == 1


def test_memory_per_token():
    cache = SparQCache(num_layers=2, key_t_dtype=torch.int8)
    k, v = _kv(3)
    cache.update(k, v, 0)
    cache.update(k, v, 1)
    sizes = cache.memory_per_token()
    e = 4  # fp32
    assert sizes["dense"] == 2 * (2 * HKV * D * e)
    assert sizes["sparq_full_key_t"] == 2 * (3 * HKV * D * e)
    assert sizes["sparq_int8_key_t"] == 2 * (2 * HKV * D * e + HKV * (D + 4))
    assert sizes["this"] == sizes["sparq_int8_key_t"]
    full = SparQCache(num_layers=1)
    full.update(k.bfloat16(), v.bfloat16(), 0)
    assert full.memory_per_token()["this"] == 3 * HKV * D * 2
    with pytest.raises(ValueError, match="key_t_dtype must be None .* or torch.int8"):
        SparQCacheLayer(key_t_dtype=torch.float16)
    with pytest.raises(RuntimeError, match="memory_per_token needs"):
        SparQCache(num_layers=1).memory_per_token()


# --- The key channels' spread (component_rule="key_std") ---------------------------------------

def _std(k, valid):
    return sparq_ext.key_channel_std(k, valid)


def test_key_std_follows_every_write():
    """key_std() from the running sums equals key_channel_std of the valid cached keys after
    each kind of write: update with a mask, set_valid, set_last_valid, crop, batch ops."""
    k, v = _kv(40)
    k = k * 2 + torch.arange(D) * 0.5  # channel means far from 0, as real keys have
    layer = SparQCacheLayer(capacity=8)
    with pytest.raises(RuntimeError, match="initialised"):
        layer.key_std()
    valid = torch.rand(B, 40, generator=torch.Generator().manual_seed(5)) > 0.3
    layer.update(k, v, valid=valid)
    assert layer.key_sum is None  # nothing kept (nor paid per write) until the spread is asked for
    torch.testing.assert_close(layer.key_std(), _std(k, valid), rtol=1e-5, atol=1e-6)
    assert layer.key_sum is not None
    valid = torch.rand(B, 40, generator=torch.Generator().manual_seed(6)) > 0.5
    layer.set_valid(valid)
    torch.testing.assert_close(layer.key_std(), _std(k, valid), rtol=1e-5, atol=1e-6)
    k1, v1 = _kv(1, seed=7)
    layer.update(k1, v1)
    layer.set_last_valid(torch.tensor([False, True]))
    keys, mask = torch.cat([k, k1], 2), torch.cat([valid, torch.tensor([[False], [True]])], 1)
    torch.testing.assert_close(layer.key_std(), _std(keys, mask), rtol=1e-5, atol=1e-6)
    layer.crop(-5)
    torch.testing.assert_close(layer.key_std(), _std(keys[:, :, :36], mask[:, :36]), rtol=1e-5, atol=1e-6)
    layer.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(layer.key_std(), _std(keys[[1, 0], :, :36], mask[[1, 0], :36]),
                               rtol=1e-5, atol=1e-6)
    layer.set_valid(torch.zeros(B, 36, dtype=torch.bool))
    assert (layer.key_std() == 0).all()  # no valid position: zeros
    # sums started late (after some appends) follow later writes as well
    late = SparQCacheLayer()
    late.update(k, v)
    late.update(k1, v1)
    late.key_std()
    late.update(*_kv(3, seed=8))
    late.crop(-2)
    keys = late.keys
    torch.testing.assert_close(late.key_std(), _std(keys, None), rtol=1e-5, atol=1e-6)


def test_key_std_per_row_lengths_and_the_rule_reaches_the_op():
    lengths = torch.tensor([30, 11])
    k, v = _kv(30)
    layer = SparQCacheLayer(key_t_dtype=torch.int8)
    layer.prefill(k, v, seq_lens=lengths)
    for step in range(5):
        layer.append(*_kv(1, seed=40 + step))
    rows = [layer.keys[b:b + 1, :, :n] for b, n in enumerate(layer.seq_lens.tolist())]
    want = torch.cat([_std(row, None) for row in rows])
    torch.testing.assert_close(layer.key_std(), want, rtol=1e-5, atol=1e-6)
    inputs = layer.attention_inputs("key_std")
    assert torch.equal(inputs["component_weights"], layer.key_std())
    assert "component_weights" not in layer.attention_inputs()
    q = torch.randn(B, HQ, 1, D)
    with torch.no_grad():
        got = layer.attention(q, r=3, k=8, component_rule="key_std")
        op = sparq_ext.attention(q, r=3, k=8, local_window=2, **inputs)
    torch.testing.assert_close(got, op)
    with pytest.raises(ValueError, match="component_rule must be one of"):
        layer.attention(q, r=3, k=8, component_rule="std")
