"""Baseline decode-step attention functions at SparQ's byte budget, for the accuracy benchmark.

Both are ``AttentionInterface`` functions in the style of
``sparq_ext.integrations.transformers.sparq_attention_forward`` (SDPA for prefill, the
baseline for a one-token decode step) and are installed with
``enable_sparq(model, ratio, attn_name=..., attn_fn=...)``. Each keeps ``W`` positions per KV
head, with ``2·W·D`` equal to SparQ's ``S·r + 2·k·D + D`` at the same ratio, so they read
the same bytes per step:

* :func:`streaming_attention_forward` — StreamingLLM: 4 attention sinks + the most recent
  ``W − 4`` positions.
* :func:`h2o_attention_forward` — H2O heavy hitters: the ``W/2`` most recent positions plus the
  ``W/2`` positions with the largest accumulated attention (summed over the query heads of the
  KV head's group); a position that drops out is evicted for good. Accumulation starts from the
  column sums of the dense prefill attention (computed in query chunks at prefill).

These simulate the selection with masks over the full cache (accuracy only, not speed). Layers
that ``enable_sparq`` keeps dense (the sliding-window layers of a hybrid model) stay dense here too.
Prefill-time score accumulation assumes no padding (batch 1 in the benchmark).
"""

from __future__ import annotations

import math

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..integrations.transformers import _DEFAULT_SETTINGS, _dense_attention, hf_mask_to_bool

N_SINKS = 4


def budget_positions(settings, seq_len: int, head_dim: int) -> int:
    """Positions ``W`` a baseline keeps so that it reads what SparQ reads at this length."""
    r, k, _ = settings.resolve(seq_len, head_dim)
    k = min(k, seq_len)
    return max(1, min(seq_len, round((seq_len * r + 2 * k * head_dim + head_dim) / (2 * head_dim))))


def _masked_decode(query, key, value, keep, scaling):
    """Attention of one query position over ``keep`` ``(B, Hkv, S)``; returns output and weights."""
    B, Hq, _, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    q = query.float().reshape(B, Hkv, G, D)
    logits = (q @ key.float().transpose(-1, -2)) * (D**-0.5 if scaling is None else scaling)
    logits = logits.masked_fill(~keep[:, :, None, :], -math.inf)
    weights = torch.softmax(logits, -1).nan_to_num(0.0)  # (B, Hkv, G, S)
    out = (weights @ value.float()).reshape(B, Hq, 1, D).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def _valid(attention_mask, key):
    mask = hf_mask_to_bool(attention_mask, key.shape[2])
    B, Hkv, S = key.shape[0], key.shape[1], key.shape[2]
    if mask is None:
        return torch.ones(B, Hkv, S, dtype=torch.bool, device=key.device)
    return mask[:, 0, 0, :][:, None, :].expand(B, Hkv, S)


def _kept_dense(module, kwargs) -> bool:
    """A layer enable_sparq keeps dense (a sliding window of a hybrid model): the baselines leave it
    dense too, so that every method changes the same layers."""
    return getattr(module, "_sparq_settings", _DEFAULT_SETTINGS) is None or kwargs.get("sliding_window") is not None


def streaming_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if _kept_dense(module, kwargs):
        return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    settings = getattr(module, "_sparq_settings", None) or _DEFAULT_SETTINGS
    S = key.shape[2]
    W = budget_positions(settings, S, query.shape[-1])
    sinks = min(N_SINKS, W)
    pos = torch.arange(S, device=key.device)
    keep = (pos < sinks) | (pos >= S - (W - sinks))
    keep = _valid(attention_mask, key) & keep
    return _masked_decode(query, key, value, keep, scaling)[0], None


def _prefill_column_sums(query, key, scaling, chunk=256):
    """``(B, Hkv, S)`` sum over query positions (and group heads) of causal dense attention."""
    B, Hq, Q, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scaling is None else scaling
    kf = key.float()
    acc = torch.zeros(B, Hkv, S, device=key.device)
    offset = S - Q  # query i sits at absolute position offset + i
    for start in range(0, Q, chunk):
        q = query[:, :, start:start + chunk].float().reshape(B, Hkv, G, -1, D)
        logits = (q @ kf[:, :, None].transpose(-1, -2)) * scale  # (B, Hkv, G, c, S)
        qpos = torch.arange(start, start + q.shape[3], device=key.device) + offset
        causal = torch.arange(S, device=key.device)[None, :] <= qpos[:, None]
        logits = logits.masked_fill(~causal, -math.inf)
        acc += torch.softmax(logits, -1).sum((2, 3))
    return acc


def h2o_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if _kept_dense(module, kwargs):
        return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer = getattr(key, "_sparq_layer", None)
    state_owner = layer if layer is not None else module
    if query.shape[2] != 1 or module.training:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, **kwargs)
        with torch.no_grad():
            state_owner._h2o_prefill = _prefill_column_sums(query, key, scaling)
        state_owner._h2o = None
        return out
    settings = getattr(module, "_sparq_settings", None) or _DEFAULT_SETTINGS
    B, Hkv, S = key.shape[0], key.shape[1], key.shape[2]
    state = getattr(state_owner, "_h2o", None)
    if state is None:  # first decode step after prefill
        prefill_acc = getattr(state_owner, "_h2o_prefill", None)
        acc = torch.zeros(B, Hkv, S, device=key.device)
        if prefill_acc is not None:
            acc[..., :prefill_acc.shape[-1]] = prefill_acc
        state = {"acc": acc, "evicted": torch.zeros(B, Hkv, S, dtype=torch.bool, device=key.device)}
    grow = S - state["acc"].shape[-1]
    if grow > 0:
        state["acc"] = torch.nn.functional.pad(state["acc"], (0, grow))
        state["evicted"] = torch.nn.functional.pad(state["evicted"], (0, grow), value=False)
    W = budget_positions(settings, S, query.shape[-1])
    recent = W // 2
    heavy = W - recent
    pos = torch.arange(S, device=key.device)
    is_recent = (pos >= S - recent)[None, None, :].expand(B, Hkv, S)
    valid = _valid(attention_mask, key)
    candidates = valid & ~is_recent & ~state["evicted"][..., :S]
    score = state["acc"][..., :S].masked_fill(~candidates, -math.inf)
    keep = is_recent & valid
    if heavy > 0:
        top = score.topk(min(heavy, S), -1)
        heavy_keep = torch.zeros_like(keep).scatter_(-1, top.indices, torch.isfinite(top.values))
        keep = keep | heavy_keep
    state["evicted"][..., :S] |= ~keep & valid
    out, weights = _masked_decode(query, key, value, keep, scaling)
    state["acc"][..., :S] += weights.sum(2)
    state_owner._h2o = state
    return out, None


def reset_h2o_state(cache_or_layers) -> None:
    """Forget decode-time H2O state (keep the prefill scores): start a new run from the prefill."""
    for layer in getattr(cache_or_layers, "layers", cache_or_layers):
        if hasattr(layer, "_h2o"):
            layer._h2o = None
