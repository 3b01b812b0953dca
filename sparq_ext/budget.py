"""The byte budget: how many bytes SparQ and dense attention read per decode step, and the ways
to spend it.

Per KV head, SparQ reads ``S*r`` elements in step 1 and ``2*k*D`` in step 2. At compression
ratio ``rho`` it may read ``2*S*D/rho``: any point on the budget line
``S*r + 2*k*D = 2*S*D/rho`` costs the same. The paper's even split is ``r = D/rho``,
``k = S/(2 rho)`` (:func:`rk_for_ratio`); the auto split (docs/auto-split.md) picks another point
per layer (:func:`candidate_rs`, :func:`k_on_budget`) and lets layers trade budget with each
other in shares of the even per-layer budget (:data:`BUDGET_SHARES`), the model's total staying
``1/rho`` of dense.
"""

from __future__ import annotations

import math

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

    Per (batch, KV head), in elements (docs/design.md, ``K`` also stored as ``key_t``):
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


def k_on_budget(ratio: float, seq_len: int, head_dim: int, r: int) -> int:
    """The ``k`` that spends what ``r`` leaves of the budget ``2*S*D/ratio`` (at least 1).

    At the even split ``r = D/ratio`` this is ``S/(2*ratio)``, as :func:`rk_for_ratio` gives.
    """
    if r * ratio >= 2 * head_dim:
        raise ValueError(f"r={r} alone spends the whole budget of ratio {ratio} (head_dim {head_dim})")
    return max(1, math.floor(seq_len * (1.0 / ratio - r / (2.0 * head_dim)) + 1e-9))


def candidate_rs(ratio: float, head_dim: int) -> list[int]:
    """The ``r`` an auto split may choose at ``ratio``: the powers of two below the budget's limit
    ``2D/ratio``, plus the even split's ``r``."""
    even_r, _ = rk_for_ratio(ratio, 1, head_dim)
    limit = 2 * head_dim / ratio
    rs = {even_r} | {1 << i for i in range(int(math.log2(head_dim)) + 1) if (1 << i) < limit}
    return sorted(r for r in rs if r < limit and r <= head_dim)


# The multiples of the even per-layer budget a layer may read. Quarters, so that sharing the budget
# between layers is an integer knapsack; up to 3x, and never more than MAX_LAYER_FRACTION of dense
# attention (so k stays below S and a share is never wasted on a clamped k).
BUDGET_SHARES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
MAX_LAYER_FRACTION = 0.75


def budget_shares(ratio: float) -> tuple[float, ...]:
    """The shares of the even per-layer budget a layer may take at ``ratio``."""
    return tuple(s for s in BUDGET_SHARES if s == 1.0 or s / ratio <= MAX_LAYER_FRACTION)


def layer_ratio(ratio: float, share: float) -> float:
    """The compression ratio of a layer that reads ``share`` times the even per-layer budget."""
    return ratio / share
