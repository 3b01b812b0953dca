"""Pure-torch SparQ Attention: the readable reference and the fallback backend.

One decode step, written to be read against the paper (arXiv 2312.04985, Algorithm 1) and
docs/design.md. Vectorised over batch and heads; everything is computed in fp32 and the
result cast back to the query's dtype. No host-device synchronisation, so it also runs under
CUDA graphs and ``torch.compile``.

Shapes: query ``(B, Hq, 1, D)``, key/value ``(B, Hkv, S, D)``, ``G = Hq // Hkv`` query heads
share each KV head (and, as in the paper's GQA code, share the indices ``i1`` and ``i2``).
"""

from __future__ import annotations

import math

import torch

_TINY = 1e-30  # matches sparq::kTiny in csrc/include/sparq/math.h
_NAN_SCORE = torch.finfo(torch.float32).min  # matches sparq::kNaNScore


def valid_positions(batch: int, seq_len: int, seq_lens=None, attn_mask=None, device=None):
    """``(B, S)`` bool: positions that may be attended (inside ``seq_lens`` and ``attn_mask``)."""
    valid = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if seq_lens is not None:
        positions = torch.arange(seq_len, device=device)
        valid = valid & (positions[None, :] < seq_lens.to(device)[:, None])
    if attn_mask is not None:
        valid = valid & attn_mask.to(device).expand(batch, 1, 1, seq_len).reshape(batch, seq_len)
    return valid


def local_window_positions(valid: torch.Tensor, local_window: int) -> torch.Tensor:
    """``(B, S)`` bool: the last ``local_window`` valid positions of each row."""
    if local_window <= 0:
        return torch.zeros_like(valid)
    valid_from_here = valid.flip(-1).cumsum(-1).flip(-1)  # valid positions at index >= s
    return valid & (valid_from_here <= local_window)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where ``mask``; rows with nothing valid give zeros, not NaN."""
    logits = logits.masked_fill(~mask, -math.inf)
    row_max = logits.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(logits - row_max)
    return weights / weights.sum(-1, keepdim=True).clamp_min(_TINY)


def softcap_logits(logits: torch.Tensor, softcap=None) -> torch.Tensor:
    """Logit softcapping (Gemma 2's ``attn_logit_softcapping``): ``softcap * tanh(logits /
    softcap)``; ``logits`` unchanged when ``softcap`` is None."""
    if softcap is None:
        return logits
    return torch.tanh(logits / softcap) * softcap


def approximate_selection(q, key, r, k, valid, key_t=None, local_window=0, scale=1.0,
                          softcap=None, key_t_scale=None, component_weights=None):
    """Steps 1 and 2's selection: ``(approx_logits, i2)`` for grouped fp32 queries ``q``
    ``(B, Hkv, G, D)`` and the ``(B, S)`` bool ``valid``.

    ``approx_logits`` ``(B, Hkv, G, S)``: ``q[i1] . K[:, i1] * scale / sqrt(gamma)`` with ``i1``
    the ``r`` largest components of ``sum_g |q_g|`` (softcapped when ``softcap`` is given, as
    the exact logits are); ``i2`` ``(B, Hkv, k)``: the top-``k`` of the group-summed approximate
    logits over valid positions, the last ``local_window`` forced in.

    With an int8 ``key_t`` (:func:`quantize_key_t`), ``key_t_scale`` ``(B, Hkv, S)`` holds each
    position's scale: the logit at ``s`` is ``scale[s] * (q[i1] . key_t[i1, s])``, the rest as
    above (the 8-bit selection cache of docs/design.md).

    With ``component_weights`` ``w`` ``(B, Hkv, D)``, component ``i``'s magnitude is
    ``w_i * sum_g |q_g,i|`` (so ``i1`` ranks by it) and ``gamma`` weighs ``|q_g,i|`` by ``w_i``
    alike; ``w = 1`` is the rule above.
    """
    B, Hkv, G, D = q.shape
    S = key.shape[2]
    acc = q.dtype  # the caller's compute dtype (float32, or float64 for an exact reference)
    valid_kv = valid[:, None, :].expand(B, Hkv, S)
    # Step 1: i1 = the r largest components of sum_g |q_g| (times w); approximate logits from them.
    magnitude = q.abs()  # (B, Hkv, G, D): |q_g,i|, times w_i with component_weights
    group_magnitude = magnitude.sum(2)  # (B, Hkv, D)
    if component_weights is not None:
        w = component_weights.to(acc)
        magnitude = magnitude * w[:, :, None, :]
        group_magnitude = group_magnitude * w  # w * sum_g |q_g|, the kernels' order of operations
    i1 = group_magnitude.topk(r, dim=-1).indices  # (B, Hkv, r)
    q_hat = q.gather(-1, i1[:, :, None, :].expand(B, Hkv, G, r))
    if key_t is not None:  # r contiguous rows of the transposed cache
        # r whole rows by indexing, not an element-wise gather: the same values, ~1.5x faster
        # when key_t is a stride-0 expand over B, as in calibration
        rows_b = torch.arange(B, device=i1.device)[:, None, None]
        rows_h = torch.arange(Hkv, device=i1.device)[None, :, None]
        K_hat_t = key_t[rows_b, rows_h, i1].to(acc)  # (B, Hkv, r, S)
        if key_t_scale is not None:  # int8 rows: each position's scale
            K_hat_t = K_hat_t * key_t_scale.to(acc)[:, :, None, :]
    else:
        K_hat_t = key.gather(-1, i1[:, :, None, :].expand(B, Hkv, S, r)).to(acc).transpose(-1, -2)
    picked = magnitude.gather(-1, i1[:, :, None, :].expand(B, Hkv, G, r))
    gamma = (picked.sum(-1) / magnitude.sum(-1).clamp_min(_TINY)).clamp_min(_TINY)
    approx_logits = (q_hat @ K_hat_t) * (scale / gamma.sqrt())[..., None]  # (B, Hkv, G, S)
    approx_logits = softcap_logits(approx_logits, softcap)

    # Step 2: i2 = top-k of the group-summed approximate logits, local window forced in.
    selection_score = approx_logits.sum(2)
    # The NaN rule all backends share (docs/cuda-pipeline.md): a NaN score ranks below every
    # other valid position (torch.topk alone would rank NaN first).
    selection_score = torch.where(selection_score.isnan(), _NAN_SCORE, selection_score)
    selection_score = selection_score.masked_fill(~valid_kv, -math.inf)
    in_window = local_window_positions(valid, local_window)[:, None, :].expand(B, Hkv, S)
    selection_score = selection_score.masked_fill(in_window, math.inf)
    i2 = selection_score.topk(min(k, S), dim=-1).indices  # (B, Hkv, k)
    return approx_logits, i2


def sparq_attention_reference(
    query, key, value, r, k, key_t=None, value_mean=None, seq_lens=None, attn_mask=None,
    local_window=0, reallocate=True, scale=None, softcap=None, sinks=None, key_t_scale=None,
    component_weights=None, return_selection=False,
):
    """SparQ attention for one query position; arguments as ``sparq_ext.attention``.

    An int8 ``key_t`` with its ``key_t_scale`` (:func:`quantize_key_t`) changes only the
    approximate logits (hence ``i2`` and ``alpha``); step 2 reads ``key`` and ``value``.
    ``softcap`` caps the approximate and the exact logits alike. A sink (``sinks[h]``, query
    head ``h``) is one more softmax entry with that logit and a zero value: always attended
    exactly (it joins the denominator of ``y``), and counted in step 3's ``alpha`` as selected
    mass, so ``k >=`` the valid length (``alpha = 1``) is dense attention with the sink
    (docs/design.md, section 1).

    Inputs are assumed validated (``sparq_ext.attention`` does that). With
    ``return_selection`` returns ``(out, i2)``, ``i2`` ``(B, Hkv, k)`` the positions step 2
    read (used by :mod:`sparq_ext.calibrate` to measure the attention mass they retain).
    """
    B, Hq, _, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    device = query.device
    # at least fp32 throughout; float64 inputs stay float64 (the tests' high-precision reference)
    acc = torch.promote_types(query.dtype, torch.float32)

    q = query.to(acc).reshape(B, Hkv, G, D)  # group the query heads of each KV head
    valid = valid_positions(B, S, seq_lens, attn_mask, device)  # (B, S)
    valid_kv = valid[:, None, :].expand(B, Hkv, S)

    # Steps 1 and 2a: approximate logits, and the positions i2 they select.
    approx_logits, i2 = approximate_selection(q, key, r, k, valid, key_t, local_window, scale,
                                              softcap, key_t_scale, component_weights)
    # The sink as a last softmax entry, valid (only where the row has a valid position: an
    # empty row attends to nothing and stays zeros) and always selected.
    sink = None if sinks is None else sinks.to(acc).reshape(1, Hkv, G, 1).expand(B, Hkv, G, 1)
    sink_valid = valid.any(-1)[:, None, None, None].expand(B, Hkv, G, 1)
    approx_valid = valid_kv[:, :, None, :].expand(B, Hkv, G, S)
    if sink is not None:
        approx_logits = torch.cat([approx_logits, sink], -1)
        approx_valid = torch.cat([approx_valid, sink_valid], -1)
    s_hat = _masked_softmax(approx_logits, approx_valid)

    # Step 2b: exact attention over the selected rows.
    # (gather in the cache's dtype, then widen: only the k selected rows are converted)
    K_sel = key.gather(2, i2[..., None].expand(*i2.shape, D)).to(acc)
    V_sel = value.gather(2, i2[..., None].expand(*i2.shape, D)).to(acc)
    selected_valid = valid_kv.gather(-1, i2)[:, :, None, :].expand(B, Hkv, G, i2.shape[-1])
    exact_logits = softcap_logits((q @ K_sel.transpose(-1, -2)) * scale, softcap)
    if sink is not None:  # the sink joins the denominator; its value is zero
        exact_logits = torch.cat([exact_logits, sink], -1)
        selected_valid = torch.cat([selected_valid, sink_valid], -1)
        V_sel = torch.cat([V_sel, V_sel.new_zeros(B, Hkv, 1, D)], 2)
    weights = _masked_softmax(exact_logits, selected_valid)
    y = weights @ V_sel  # (B, Hkv, G, D)

    if reallocate:
        # Step 3: alpha = approximate score mass of the top-k (and of the sink, always
        # selected); interpolate with mean(V) (the sink has no value: not in the mean).
        selected = i2 if sink is None else torch.cat([i2, i2.new_full((B, Hkv, 1), S)], -1)
        alpha = s_hat.gather(-1, selected[:, :, None, :].expand(B, Hkv, G, selected.shape[-1]))
        alpha = alpha.sum(-1, keepdim=True)
        if value_mean is None:
            n_valid = valid_kv.sum(-1, keepdim=True).clamp_min(1).to(acc)  # (B, Hkv, 1)
            v_sum = (value.to(acc) * valid_kv[..., None]).sum(2)
            v_mean = v_sum / n_valid  # (B, Hkv, D)
        else:
            v_mean = value_mean.to(acc).reshape(B, Hkv, D)
        y = alpha * y + (1 - alpha) * v_mean[:, :, None, :]
        # A row with no valid position attends to nothing: zeros, as y already is.
        y = y * valid.any(-1).to(acc)[:, None, None, None]
    out = y.reshape(B, Hq, 1, D).to(query.dtype)
    return (out, i2) if return_selection else out


def key_channel_std(key, valid=None):
    """``(B, Hkv, D)`` float32: the standard deviation over valid positions of each key channel,
    for ``component_weights`` (``key`` ``(B, Hkv, S, D)``, ``valid`` ``(B, S)`` bool or None).

    Why it helps step 1: a component ranks positions by how much ``q_i K[s, i]`` varies over
    ``s``; a channel whose keys are large but nearly constant (RoPE's slow channels) moves every
    logit alike and ranks nothing. Zeros for a row with no valid position.
    """
    k = key.float()
    if valid is None:
        valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    m = valid.to(device=k.device, dtype=torch.float32)[:, None, :, None]
    n = m.sum(2).clamp_min(1)
    mean = (k * m).sum(2, keepdim=True) / n[:, :, None]
    return ((k - mean).square() * m).sum(2).div(n).sqrt()


def quantize_key_t(key):
    """The 8-bit selection cache of ``key`` ``(B, Hkv, S, D)`` (or any ``(..., S, D)``):
    ``(key_t, key_t_scale)``, int8 ``(..., D, S)`` contiguous in ``S`` and float32 ``(..., S)``.

    One symmetric scale per position (and KV head): ``scale[s] = max_i |K[s, i]| / 127`` in
    fp32, ``key_t[i, s] = round(K[s, i] / scale[s])`` (round half to even, so in
    ``[-127, 127]``). Per position, so a token appended later never re-quantizes an earlier
    one. An all-zero row gets scale 0 and zeros. This is the rounding the kernels assume: they
    take step 1's logit at ``s`` as ``scale[s] * (q[i1] . key_t[i1, s])``.
    """
    k = key.float()
    scale = k.abs().amax(-1) / 127.0  # (..., S)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(k / divisor[..., None]).clamp_(-127, 127).to(torch.int8)
    return quantized.transpose(-1, -2).contiguous(), scale


def gather_pages(cache, block_table, seq_lens):
    """A paged ``cache`` ``(num_blocks, H, block_size, ...)`` laid out contiguously:
    ``(R, H, max_blocks * block_size, ...)``, position ``p`` of row ``i`` read from block
    ``block_table[i, p // block_size]`` at offset ``p % block_size``. Positions at or past
    ``seq_lens[i]`` are padding, zeros (their table entries need not be valid)."""
    block_size = cache.shape[2]
    positions = torch.arange(block_table.shape[1] * block_size, device=cache.device)
    blocks = block_table.to(device=cache.device, dtype=torch.long)[:, positions // block_size]
    in_row = positions[None, :] < seq_lens.to(cache.device)[:, None]
    blocks = torch.where(in_row, blocks, torch.zeros_like(blocks))  # (R, P)
    # advanced indices on dims 0 and 2 (separated by a slice) come first: (R, P, H, ...)
    gathered = cache[blocks, :, positions % block_size].transpose(1, 2)
    # padding as zeros: masked positions get weight 0, and 0 * NaN (an unwritten slot) is NaN
    in_row = in_row.reshape(*in_row.shape[:1], 1, in_row.shape[1], *([1] * (cache.dim() - 3)))
    return torch.where(in_row, gathered, torch.zeros((), dtype=cache.dtype, device=cache.device))


def paged_attention_reference(query, key_cache, value_cache, block_table, seq_lens, r, k,
                              key_t_cache=None, value_mean=None, local_window=0,
                              reallocate=True, scale=None, softcap=None, sinks=None,
                              key_t_scale=None, value_sums_cache=None, component_weights=None):
    """SparQ attention over a paged cache; arguments as ``sparq_ext.paged_attention``.

    The definition of the paged operator: the cache gathered into a contiguous one
    (:func:`gather_pages`, ``max_blocks * block_size`` positions per row, so correct but slow)
    and :func:`sparq_attention_reference` with ``seq_lens``. Also the fallback backend wherever
    no native paged kernel exists (the extension not built, or built without CUDA for a CUDA
    tensor). Inputs are assumed validated.
    """
    R, _, D = query.shape
    Hkv = key_cache.shape[1]
    if block_table.shape[1] == 0:  # no position at all: every row is empty
        return torch.zeros_like(query, memory_format=torch.contiguous_format)
    key = gather_pages(key_cache, block_table, seq_lens)
    value = gather_pages(value_cache, block_table, seq_lens)
    key_t = None
    if key_t_cache is not None:  # positions are its last dim
        key_t = gather_pages(key_t_cache.transpose(2, 3), block_table, seq_lens).transpose(2, 3)
    key_t_scale_rows = None
    if key_t_scale is not None:  # (num_blocks, Hkv, block_size) -> (R, Hkv, positions)
        key_t_scale_rows = gather_pages(key_t_scale, block_table, seq_lens)
    v_mean = None if value_mean is None else value_mean.reshape(R, Hkv, 1, D)
    if value_sums_cache is not None:
        block_size = key_cache.shape[2]
        v_mean = mean_from_block_sums(value_sums_cache, block_table, seq_lens, block_size)[:, :, None]
    out = sparq_attention_reference(query[:, :, None, :], key, value, r, k, key_t, v_mean,
                                    seq_lens, None, local_window, reallocate, scale, softcap,
                                    sinks, key_t_scale_rows, component_weights)
    return out[:, :, 0, :]


def mean_from_block_sums(value_sums_cache, block_table, seq_lens, block_size):
    """``v_mean`` ``(R, Hkv, D)`` from per-block value sums ``(num_blocks, Hkv, D)``: the sum
    over each row's ``ceil(len / block_size)`` blocks, divided by its length (zeros for an empty
    row); float32."""
    R, max_blocks = block_table.shape
    lens = seq_lens.long()
    used = torch.arange(max_blocks, device=lens.device)[None] * block_size < lens[:, None]
    total = torch.zeros(R, *value_sums_cache.shape[1:], dtype=torch.float32, device=lens.device)
    for i in range(R):  # a loop that reads like the definition; the reference is not fast
        total[i] = value_sums_cache[block_table[i][used[i]].long()].float().sum(0)
    return total / lens.clamp(min=1).float()[:, None, None]


def key_std_from_block_sums(key_sums, key_sq_sums, block_table, seq_lens, block_size):
    """``(R, H, D)`` float32: each paged row's key channel standard deviation over its
    ``seq_lens`` positions, from per-block sums of ``K`` and ``K²`` ``(num_blocks, H, D)``
    (:func:`write_page_regions`) over the ``ceil(len / block_size)`` blocks the row uses: the
    spread :func:`key_channel_std` computes from the keys themselves. Zeros for an empty row."""
    mean = mean_from_block_sums(key_sums, block_table, seq_lens, block_size)
    mean_sq = mean_from_block_sums(key_sq_sums, block_table, seq_lens, block_size)
    return (mean_sq - mean.square()).clamp_min_(0).sqrt_()


def write_page_regions(key, value, slot_mapping, key_rows, value_sums, key_t_int8=None,
                       key_t_scale=None, key_sums=None, key_sq_sums=None):
    """An engine step's writes into SparQ's regions of a paged cache (the vLLM backend's page,
    ``docs/vllm.md``), in place. Token ``t`` (the first ``len(slot_mapping)`` rows of ``key`` and
    ``value`` ``(tokens, H, D)``) goes to slot ``slot_mapping[t]`` = block ``slot // block_size``,
    offset ``slot % block_size``; a negative slot is padding. Its key row is written to
    ``key_rows`` ``(num_blocks, H, block_size, D)``, its value added to its block's float32 sum
    ``value_sums`` ``(num_blocks, H, D)``; with the 8-bit selection cache its
    :func:`quantize_key_t` codes and scale go to ``key_t_int8`` ``(num_blocks, H, D, block_size)``
    and ``key_t_scale`` ``(num_blocks, H, block_size)``; with the key spread its key and key²
    are added to ``key_sums`` and ``key_sq_sums``. A block's sums cover the positions written
    since its position 0 was (blocks fill in order; a reused block starts again at 0): writing
    position 0 resets them, before any of the call's additions."""
    block_size = key_rows.shape[2]
    slots = slot_mapping.long()
    kept = slots >= 0
    slots = slots[kept]
    key, value = key[:slot_mapping.shape[0]][kept], value[:slot_mapping.shape[0]][kept]
    blocks, offsets = slots // block_size, slots % block_size
    key_rows[blocks, :, offsets] = key.to(key_rows.dtype)
    sums = [(value_sums, value.float())]
    if key_sums is not None:
        key32 = key.float()
        sums += [(key_sums, key32), (key_sq_sums, key32.square())]
    reset = blocks[offsets == 0]
    for block_sums, added in sums:
        block_sums[reset] = 0
        block_sums.index_put_((blocks,), added, accumulate=True)
    if key_t_int8 is not None:  # each token quantized on its own: earlier ones never change
        codes, scale = quantize_key_t(key[:, :, None, :])  # (T, H, D, 1), (T, H, 1)
        key_t_int8[blocks, :, :, offsets] = codes[..., 0]
        key_t_scale[blocks, :, offsets] = scale[..., 0]


def dense_attention_reference(query, key, value, seq_lens=None, attn_mask=None, scale=None,
                              softcap=None, sinks=None):
    """Dense attention for one query position, with logit softcapping and attention sinks as
    Gemma 2 and gpt-oss define them (the operators' ``k >=`` valid length limit): the sink of
    query head ``h`` is a logit ``sinks[h]`` that joins the softmax's denominator and carries
    no value. Computed in at least fp32 (float64 inputs stay float64); rows with no valid
    position give zeros."""
    B, Hq, _, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    acc = torch.promote_types(query.dtype, torch.float32)
    q = query.to(acc).reshape(B, Hkv, G, D)
    valid = valid_positions(B, S, seq_lens, attn_mask, query.device)  # (B, S)
    logits = softcap_logits((q @ key.to(acc).transpose(-1, -2)) * scale, softcap)  # (B, Hkv, G, S)
    logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
    if sinks is not None:
        sink = sinks.to(acc).reshape(1, Hkv, G, 1).expand(B, Hkv, G, 1)
        logits = torch.cat([logits, sink], -1)
    weights = torch.softmax(logits, -1)[..., :S]
    y = weights @ value.to(acc)
    y = torch.where(valid.any(-1)[:, None, None, None], y, torch.zeros_like(y))
    return y.reshape(B, Hq, 1, D).to(query.dtype)
