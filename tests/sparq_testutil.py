"""Helpers for comparing a SparQ backend with the reference on random data.

Exact equality of two implementations needs the same ``i1`` and ``i2``. Both are top-k
choices, and ties (or near-ties within fp32 round-off) at the r-th / k-th boundary may be
broken differently by two correct implementations, which moves whole positions in or out of
the attended set. Half-precision queries tie often (bf16 keeps 8 bits: among 256 components
the r-th and (r+1)-th largest |q| are often equal), so the tests draw inputs whose
boundaries are separated (``untie_query``, ``boundary_gaps``). Deliberate ties are tested
separately, with data for which every valid choice gives the same output.
"""

from __future__ import annotations

import torch

from sparq_ext.reference import local_window_positions, valid_positions


def query_gap(q: torch.Tensor, Hkv: int, r: int) -> float:
    """Smallest relative gap between the r-th and (r+1)-th largest sum_g |q_g| over rows."""
    B, Hq, _, D = q.shape
    if r >= D:
        return float("inf")
    a = q.float().abs().reshape(B, Hkv, Hq // Hkv, D).sum(2).sort(-1, descending=True).values
    gap = (a[..., r - 1] - a[..., r]) / a[..., r - 1].abs().clamp_min(1e-30)
    return gap.min().item()


def untie_query(q: torch.Tensor, Hkv: int, r: int, seed: int = 0, rel: float = 1e-4):
    """``q``, or a fresh random query of the same shape/dtype/device without a near-tie at
    the top-r boundary of sum_g |q_g|."""
    for attempt in range(200):
        if query_gap(q, Hkv, r) > rel:
            return q
        g = torch.Generator(device=q.device).manual_seed(1_000_003 * (seed + 1) + attempt)
        q = torch.randn(q.shape, generator=g, device=q.device).to(q.dtype)
    raise AssertionError("could not draw a query without ties at the top-r boundary")


def selection_gap(q, k, r, kk, key_t=None, seq_lens=None, attn_mask=None, local_window=0,
                  scale=None) -> float:
    """Smallest relative gap, over rows, between the k-th and (k+1)-th group-summed
    approximate logit (the reference's selection score); inf where k covers every valid
    position."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qf = q.float().reshape(B, Hkv, G, D)
    i1 = qf.abs().sum(2).topk(r, dim=-1).indices
    q_hat = qf.gather(-1, i1[:, :, None, :].expand(B, Hkv, G, r))
    src = k.float() if key_t is None else key_t.float().transpose(-1, -2)
    k_hat = src.gather(-1, i1[:, :, None, :].expand(B, Hkv, S, r))
    gamma = (q_hat.abs().sum(-1) / qf.abs().sum(-1).clamp_min(1e-30)).clamp_min(1e-30)
    logits = (q_hat @ k_hat.transpose(-1, -2)) * (scale / gamma.sqrt())[..., None]
    valid = valid_positions(B, S, seq_lens, attn_mask, q.device)[:, None, :]
    window = local_window_positions(valid[:, 0], local_window)[:, None, :]
    score = logits.sum(2).masked_fill(~valid, -torch.inf).masked_fill(window, torch.inf)
    k_eff = min(kk, S)
    if k_eff >= S:
        return float("inf")
    top = score.topk(k_eff + 1, dim=-1).values
    kth, nxt = top[..., k_eff - 1], top[..., k_eff]
    decided = torch.isinf(kth) | torch.isinf(nxt)  # window / invalid boundaries are exact
    gap = (kth - nxt) / score.masked_fill(torch.isinf(score), 0).abs().amax(-1).clamp_min(1e-30)
    gap = torch.where(decided, torch.full_like(gap, float("inf")), gap)
    return gap.min().item()


def separated_query(q, k, r, kk, *, key_t=None, seq_lens=None, attn_mask=None,
                    local_window=0, scale=None, seed=0, rel_r=1e-4, rel_k=2e-6):
    """``q``, or a fresh query of the same shape/dtype/device, such that neither the top-r
    nor the top-k boundary is a (near-)tie for these keys. The keys are kept as they are, so
    layout tests (strided, expanded, unaligned keys) keep their layouts."""
    Hkv = k.shape[1]
    for attempt in range(50):
        q = untie_query(q, Hkv, r, seed=seed + 7919 * attempt, rel=rel_r)
        if selection_gap(q, k, r, kk, key_t, seq_lens, attn_mask, local_window, scale) > rel_k:
            return q
        g = torch.Generator(device=q.device).manual_seed(2_000_003 * (seed + 1) + attempt)
        q = torch.randn(q.shape, generator=g, device=q.device).to(q.dtype)
    raise AssertionError("could not draw a query with separated top-r / top-k boundaries")
