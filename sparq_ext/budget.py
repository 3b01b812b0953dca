"""The byte budget: how many bytes SparQ and dense attention read per decode step, and the ways
to spend it.

Per KV head, SparQ reads ``S*r`` elements in step 1 and ``2*k*D`` in step 2. At compression
ratio ``rho`` it may read ``2*S*D/rho``: any point on the budget line
``S*r + 2*k*D = 2*S*D/rho`` costs the same. The paper's even split is ``r = D/rho``,
``k = S/(2 rho)`` (:func:`rk_for_ratio`); the auto split (docs/auto-split.md) picks another point
per layer (:func:`candidate_rs`, :func:`k_on_budget`) and lets layers trade budget with each
other in shares of the even per-layer budget (:data:`BUDGET_SHARES`), the model's total staying
``1/rho`` of dense.

With the 8-bit selection cache (``key_t_dtype=torch.int8``: an int8 ``key_t`` and one float32
scale per position, :func:`sparq_ext.quantize_key_t`) step 1 reads ``S*(r + 4)`` bytes instead of
``S*r*e`` (``e`` the key/value element size): every function here takes ``key_t_dtype`` and
counts those bytes, so ratio ``rho`` still reads ``1/rho`` of dense, now with a larger ``r``
and a larger ``k``. The 8-bit split gives half of what the 8-bit rows save at the full copy's
``r`` to more components and half to more selected rows: ``r = (D/rho)*(1 + e)/2 - 2``, ``k`` on
the budget (docs/design.md, "The 8-bit selection cache"; docs/accuracy.md for why not all to
``r``).
"""

from __future__ import annotations

import math

import torch


# Bytes of key_t_scale per position (and KV head) that the 8-bit selection cache adds to step 1.
KEY_T_SCALE_BYTES = 4


def _element_size(dtype_or_size) -> int:
    if isinstance(dtype_or_size, torch.dtype):
        return torch.empty((), dtype=dtype_or_size).element_size()
    return int(dtype_or_size)


def _selection_cache(dtype, key_t_dtype) -> tuple[int, int, int] | None:
    """``(e, e_t, c)`` for an 8-bit selection cache: the key/value element size, key_t's (1) and
    the scale's bytes per position; ``None`` for a key_t in the cache's dtype (today's count)."""
    if key_t_dtype is None:
        return None
    if key_t_dtype != torch.int8:
        if isinstance(key_t_dtype, torch.dtype) and key_t_dtype.is_floating_point:
            return None  # a full-precision copy: step 1 counted in cache elements, as before
        raise ValueError(f"key_t_dtype must be None, a floating dtype or torch.int8, got {key_t_dtype!r}")
    if dtype is None:
        raise ValueError("dtype (the key/value cache's) must be given with key_t_dtype=torch.int8: "
                         "the 8-bit selection cache's bytes are counted against it")
    return _element_size(dtype), 1, KEY_T_SCALE_BYTES


def _step1_elements(r: int, head_dim: int, dtype, key_t_dtype) -> float:
    """Step 1's bytes per position in key/value elements: ``r``, or ``(r + 4)/e`` with the 8-bit
    selection cache."""
    cache = _selection_cache(dtype, key_t_dtype)
    if cache is None:
        return float(r)
    e, e_t, c = cache
    return (r * e_t + c) / e


def rk_for_ratio(ratio: float, seq_len: int, head_dim: int, *, dtype=None,
                 key_t_dtype=None) -> tuple[int, int]:
    """The paper's even split of a compression ``ratio``: ``r = D/ratio``, ``k = S/(2 ratio)``.

    Both are rounded and at least 1 (``r`` at most ``head_dim``). At this split SparQ reads
    about ``1/ratio`` of the bytes dense attention reads (see :func:`transfer_bytes`).

    With the 8-bit selection cache (``key_t_dtype=torch.int8``; ``dtype`` the key/value
    cache's, ``e`` its element size) the 8-bit split: at the full copy's ``r0 = D/ratio`` the
    int8 rows and the 4-byte scale read ``r0 + 4`` bytes per position instead of ``e*r0``; half of
    that saving buys components, ``r = r0 + (e*r0 - r0 - 4)/2 = r0*(1 + e)/2 - 2`` (rounded,
    clamped to ``[1, D]``), and ``k`` spends the rest of the budget (:func:`k_on_budget`), so it
    grows too. fp32, ``D = 64``, ratio 8: ``r`` 18 and ``k`` about 0.082·S, against 8 and S/16.
    """
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    cache = _selection_cache(dtype, key_t_dtype)
    if cache is None:
        r = min(head_dim, max(1, round(head_dim / ratio)))
        k = max(1, round(seq_len / (2 * ratio)))
        return r, k
    e, e_t, c = cache
    r0 = head_dim / ratio  # the full copy's r, unrounded
    r = min(head_dim, max(1, round(r0 + (e * r0 - (r0 * e_t + c)) / (2 * e_t))))
    left = seq_len * (1.0 / ratio - _step1_elements(r, head_dim, dtype, key_t_dtype) / (2.0 * head_dim))
    return r, max(1, round(left))


def transfer_bytes(batch: int, kv_heads: int, seq_len: int, head_dim: int, r: int, k: int,
                   dtype=torch.bfloat16, query_heads: int | None = None, key_t_dtype=None) -> dict:
    """Bytes read from the KV cache by one decode step, SparQ against dense attention.

    Per (batch, KV head), in elements (docs/design.md, ``K`` also stored as ``key_t``):
    SparQ reads ``S*r`` (``r`` rows of ``key_t``) ``+ 2*k*D`` (the selected ``K`` and ``V``
    rows) ``+ D`` (the mean of ``V``); dense reads ``2*S*D``. ``k`` is clamped to ``S``.
    With ``key_t_dtype=torch.int8`` (the 8-bit selection cache) step 1 reads ``S*(r + 4)``
    bytes: ``r`` int8 rows and a float32 scale per position.
    The query and output (``2*Hq*D`` per batch row) are added to both; they are tiny.
    Returns ``{"sparq": bytes, "dense": bytes, "ideal_speedup": dense / sparq}``.
    """
    e = _element_size(dtype)
    k = min(k, seq_len)
    query_heads = kv_heads if query_heads is None else query_heads
    q_and_out = 2 * query_heads * head_dim
    cache = _selection_cache(dtype, key_t_dtype)
    step1 = seq_len * r * e if cache is None else seq_len * (r * cache[1] + cache[2])
    sparq = batch * (kv_heads * (step1 + (2 * k * head_dim + head_dim) * e) + q_and_out * e)
    dense = batch * (kv_heads * 2 * seq_len * head_dim + q_and_out) * e
    return {"sparq": sparq, "dense": dense, "ideal_speedup": dense / sparq}


def k_on_budget(ratio: float, seq_len: int, head_dim: int, r: int, *, dtype=None,
                key_t_dtype=None) -> int:
    """The ``k`` that spends what ``r`` leaves of the budget ``2*S*D/ratio`` (at least 1).

    At the even split ``r = D/ratio`` this is ``S/(2*ratio)``, as :func:`rk_for_ratio` gives.
    With ``key_t_dtype=torch.int8`` step 1 costs ``(r + 4)/e`` elements per position
    (``e`` ``dtype``'s element size), as :func:`transfer_bytes` counts it.
    """
    step1 = _step1_elements(r, head_dim, dtype, key_t_dtype)
    if step1 * ratio >= 2 * head_dim:
        raise ValueError(f"r={r} alone spends the whole budget of ratio {ratio} (head_dim {head_dim})")
    return max(1, math.floor(seq_len * (1.0 / ratio - step1 / (2.0 * head_dim)) + 1e-9))


def candidate_rs(ratio: float, head_dim: int, *, dtype=None, key_t_dtype=None) -> list[int]:
    """The ``r`` an auto split may choose at ``ratio``: the powers of two below the budget's limit
    ``2D/ratio`` (with the 8-bit selection cache: ``r + 4 < 2*e*D/ratio`` bytes), plus the even
    split's ``r``."""
    even_r, _ = rk_for_ratio(ratio, 1, head_dim, dtype=dtype, key_t_dtype=key_t_dtype)

    def fits(r):
        return _step1_elements(r, head_dim, dtype, key_t_dtype) < 2 * head_dim / ratio

    rs = {even_r} | {1 << i for i in range(int(math.log2(head_dim)) + 1)}
    return sorted(r for r in rs if fits(r) and r <= head_dim)


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
