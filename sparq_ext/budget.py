"""The byte budget: how many bytes SparQ and dense attention read per decode step."""

from __future__ import annotations

import torch


def rk_for_ratio(ratio: float, seq_len: int, head_dim: int) -> tuple[int, int]:
    """The paper's even split of a compression ``ratio``: ``r = D/ratio``, ``k = S/(2 ratio)``.

    Both are rounded and at least 1 (``r`` at most ``head_dim``). At this split SparQ reads
    about ``1/ratio`` of the bytes dense attention reads (see :func:`transfer_bytes`).
    """
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    r = min(head_dim, max(1, round(head_dim / ratio)))
    k = max(1, round(seq_len / (2 * ratio)))
    return r, k


def _element_size(dtype_or_size) -> int:
    if isinstance(dtype_or_size, torch.dtype):
        return torch.empty((), dtype=dtype_or_size).element_size()
    return int(dtype_or_size)


def transfer_bytes(batch: int, kv_heads: int, seq_len: int, head_dim: int, r: int, k: int,
                   dtype=torch.bfloat16, query_heads: int | None = None) -> dict:
    """Bytes read from the KV cache by one decode step, SparQ against dense attention.

    Per (batch, KV head), in elements (DESIGN.md section 1, ``K`` also stored as ``key_t``):
    SparQ reads ``S*r`` (``r`` rows of ``key_t``) ``+ 2*k*D`` (the selected ``K`` and ``V``
    rows) ``+ D`` (the mean of ``V``); dense reads ``2*S*D``. ``k`` is clamped to ``S``.
    The query and output (``2*Hq*D`` per batch row) are added to both; they are tiny.
    Returns ``{"sparq": bytes, "dense": bytes, "ideal_speedup": dense / sparq}``.
    """
    e = _element_size(dtype)
    k = min(k, seq_len)
    query_heads = kv_heads if query_heads is None else query_heads
    q_and_out = 2 * query_heads * head_dim
    sparq = batch * (kv_heads * (seq_len * r + 2 * k * head_dim + head_dim) + q_and_out) * e
    dense = batch * (kv_heads * 2 * seq_len * head_dim + q_and_out) * e
    return {"sparq": sparq, "dense": dense, "ideal_speedup": dense / sparq}
