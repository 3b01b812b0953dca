"""Shared test helpers: inputs, tolerances, the backends under test, and tie-free queries.

Backends: ``"reference"`` (the pure-torch reference, :func:`sparq_ext.sparq_attention_reference`),
``"cpu"`` and ``"cuda"`` (``sparq_ext.attention`` on that device, which dispatches to the native
kernel). A native backend that is not built (or has no device) is skipped, except where
``SPARQ_EXT_REQUIRE_NATIVE`` names it (``make test`` sets ``cpu``): then its absence fails.

Exact equality of two implementations needs the same ``i1`` and ``i2``. Both are top-k
choices, and ties (or near-ties within fp32 round-off) at the r-th / k-th boundary may be
broken differently by two correct implementations, which moves whole positions in or out of
the attended set. Half-precision queries tie often (bf16 keeps 8 bits: among 256 components
the r-th and (r+1)-th largest |q| are often equal), so the tests draw inputs whose
boundaries are separated (``untie_query``, ``boundary_gaps``). Deliberate ties are tested
separately, with data for which every valid choice gives the same output.
"""

from __future__ import annotations

import os

import pytest
import torch

import sparq_ext
from sparq_ext.reference import local_window_positions, softcap_logits, valid_positions

BACKENDS = ("reference", "cpu", "cuda")
NATIVE_BACKENDS = ("cpu", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Output tolerances against the fp32 reference computed on the same (rounded) inputs: fp32 is a
# few ulps of fp32 accumulation in another order; half types are rounded to 11 / 8 mantissa bits
# at the output. CUDA's fp32 sums run in a different order again (warp shuffles, partitions).
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
CUDA_FP32_TOLERANCE = dict(rtol=2e-4, atol=2e-4)


def tolerance(dtype: torch.dtype, backend: str = "reference") -> dict:
    return CUDA_FP32_TOLERANCE if backend == "cuda" and dtype == torch.float32 else TOLERANCES[dtype]


def required_native_backends() -> set[str]:
    """Native backends whose absence must fail the run (``SPARQ_EXT_REQUIRE_NATIVE``, e.g. "cpu")."""
    names = {n.strip() for n in os.environ.get("SPARQ_EXT_REQUIRE_NATIVE", "").split(",") if n.strip()}
    unknown = names - set(NATIVE_BACKENDS)
    if unknown:
        raise ValueError(f"SPARQ_EXT_REQUIRE_NATIVE: unknown backends {sorted(unknown)} (use {NATIVE_BACKENDS})")
    return names


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None."""
    if backend == "reference":
        return None
    if backend == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if not sparq_ext.has_native_kernel(backend):
        return (f"the native {backend} kernel is not built "
                f"({sparq_ext.extension_error or 'extension built without it'})")
    return None


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def attention(backend: str, query, key, value, **kwargs):
    """SparQ attention through ``backend``; inputs (CPU tensors or views) are moved to its device
    keeping their strides where they are views, and the output comes back to the CPU."""
    if backend == "reference":
        with torch.no_grad():
            return sparq_ext.sparq_attention_reference(query, key, value, **kwargs)
    device = device_of(backend)
    moved = {name: _to(t, device) for name, t in kwargs.items()}
    with torch.no_grad():
        out = sparq_ext.attention(_to(query, device), _to(key, device), _to(value, device), **moved)
    assert out.device.type == device
    return out.cpu()


def _to(t, device):
    """``t`` on ``device`` with its layout: a view is re-made over a copy of its whole base, so
    strided, offset and expanded (stride-0) inputs reach the backend as they are."""
    if not isinstance(t, torch.Tensor) or t.device.type == device:
        return t
    base = t if t._base is None else t._base
    moved = torch.empty_strided(base.size(), base.stride(), dtype=base.dtype, device=device).copy_(base)
    return moved.as_strided(t.size(), t.stride(), t.storage_offset() - base.storage_offset())


def make_inputs(B=2, Hq=4, Hkv=2, S=64, D=32, dtype=torch.float32, seed=0, with_key_t=False):
    """Fresh random decode-step inputs on the CPU: query ``(B, Hq, 1, D)``, key/value
    ``(B, Hkv, S, D)`` (and ``key_t`` ``(B, Hkv, D, S)``). Half-precision queries are drawn
    without ties in ``sum_g |q_g|`` (:func:`untied_query`), so that every backend picks the same
    ``i1`` as the fp32 reference."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=gen).to(dtype)
    if dtype != torch.float32:
        q = untied_query(B, Hq, Hkv, D, dtype, gen)
    K = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    V = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    if with_key_t:
        return q, K, V, K.transpose(-1, -2).contiguous()
    return q, K, V


def assert_both_operators_refuse(error, match, kwargs, paged_kwargs=None):
    """``attention`` on a small cache (B 1, Hq 4, Hkv 2, S 16, D 8) and ``paged_attention`` on the
    same cache as one block both raise ``error`` matching ``match`` given these keyword
    arguments (``paged_kwargs``: the paged operator's, when its names differ)."""
    q, K, V = make_inputs(1, 4, 2, 16, 8)
    with pytest.raises(error, match=match):
        sparq_ext.attention(q, K, V, r=2, k=4, **kwargs)
    table = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.tensor([16], dtype=torch.int32)
    with pytest.raises(error, match=match):
        sparq_ext.paged_attention(q[:, :, 0], K, V, table, lens, r=2, k=4,
                                  **(kwargs if paged_kwargs is None else paged_kwargs))


def untied_query(B, Hq, Hkv, D, dtype, gen):
    """A query whose group sums of |q| have no ties (exact in bf16/fp16), random signs.

    Rounded to 8 or 11 bits, random queries often tie at the r-th largest |q| component, and
    ties may be broken either way (docs/design.md), which changes i1 and the whole result. The
    magnitudes here are distinct powers-of-two multiples of 1 + j/128, the same pattern
    scaled by 2^-(g % 3) in each head of a group, so every sum is exact and distinct.
    """
    G = Hq // Hkv
    j = torch.stack([torch.randperm(D, generator=gen) for _ in range(B * Hkv)]).reshape(B, Hkv, 1, D)
    mags = 2.0 ** (j // 128) * (1 + (j % 128) / 128)
    head_scale = (2.0 ** -(torch.arange(G) % 3)).reshape(1, 1, G, 1)
    signs = torch.randint(0, 2, (B, Hkv, G, D), generator=gen) * 2 - 1
    return (mags * head_scale * signs).reshape(B, Hq, 1, D).to(dtype)


def query_gap(q: torch.Tensor, Hkv: int, r: int, component_weights=None) -> float:
    """Smallest relative gap between the r-th and (r+1)-th largest sum_g |q_g| (times
    ``component_weights``) over rows."""
    B, Hq, _, D = q.shape
    if r >= D:
        return float("inf")
    a = q.float().abs().reshape(B, Hkv, Hq // Hkv, D).sum(2)
    if component_weights is not None:
        a = a * component_weights.float()
    a = a.sort(-1, descending=True).values
    gap = (a[..., r - 1] - a[..., r]) / a[..., r - 1].abs().clamp_min(1e-30)
    return gap.min().item()


def untie_query(q: torch.Tensor, Hkv: int, r: int, seed: int = 0, rel: float = 1e-4,
                component_weights=None):
    """``q``, or a fresh random query of the same shape/dtype/device without a near-tie at
    the top-r boundary of sum_g |q_g| (times ``component_weights``)."""
    for attempt in range(200):
        if query_gap(q, Hkv, r, component_weights) > rel:
            return q
        g = torch.Generator(device=q.device).manual_seed(1_000_003 * (seed + 1) + attempt)
        q = torch.randn(q.shape, generator=g, device=q.device).to(q.dtype)
    raise AssertionError("could not draw a query without ties at the top-r boundary")


def selection_gap(q, k, r, kk, key_t=None, seq_lens=None, attn_mask=None, local_window=0,
                  scale=None, softcap=None, key_t_scale=None, component_weights=None) -> float:
    """Smallest relative gap, over rows, between the k-th and (k+1)-th group-summed
    approximate logit (the reference's selection score: softcapped per head with ``softcap``,
    an int8 ``key_t`` times ``key_t_scale``); inf where k covers every valid position."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qf = q.float().reshape(B, Hkv, G, D)
    w = torch.ones(B, Hkv, 1, D) if component_weights is None else component_weights.float()[:, :, None]
    i1 = (qf.abs().sum(2) * w[:, :, 0]).topk(r, dim=-1).indices
    q_hat = qf.gather(-1, i1[:, :, None, :].expand(B, Hkv, G, r))
    w_hat = w.expand(B, Hkv, G, D).gather(-1, i1[:, :, None, :].expand(B, Hkv, G, r))
    src = k.float() if key_t is None else key_t.float().transpose(-1, -2)
    k_hat = src.gather(-1, i1[:, :, None, :].expand(B, Hkv, S, r))
    if key_t_scale is not None:  # the 8-bit selection cache: each position's scale
        k_hat = k_hat * key_t_scale.float()[..., None]
    gamma = ((q_hat.abs() * w_hat).sum(-1) / (qf.abs() * w).sum(-1).clamp_min(1e-30)).clamp_min(1e-30)
    logits = (q_hat @ k_hat.transpose(-1, -2)) * (scale / gamma.sqrt())[..., None]
    logits = softcap_logits(logits, softcap)
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
                    local_window=0, scale=None, softcap=None, key_t_scale=None, seed=0,
                    rel_r=1e-4, rel_k=2e-6, component_weights=None):
    """``q``, or a fresh query of the same shape/dtype/device, such that neither the top-r
    nor the top-k boundary is a (near-)tie for these keys. The keys are kept as they are, so
    layout tests (strided, expanded, unaligned keys) keep their layouts."""
    Hkv = k.shape[1]
    for attempt in range(50):
        q = untie_query(q, Hkv, r, seed=seed + 7919 * attempt, rel=rel_r,
                        component_weights=component_weights)
        if selection_gap(q, k, r, kk, key_t, seq_lens, attn_mask, local_window, scale, softcap,
                         key_t_scale, component_weights) > rel_k:
            return q
        g = torch.Generator(device=q.device).manual_seed(2_000_003 * (seed + 1) + attempt)
        q = torch.randn(q.shape, generator=g, device=q.device).to(q.dtype)
    raise AssertionError("could not draw a query with separated top-r / top-k boundaries")


# --- Paged caches (sparq_ext.paged_attention) ---------------------------------------------------
# A contiguous (R, H, S, D) cache scattered into shuffled blocks, so that the paged operator can
# be compared with ``attention`` on the cache it came from.

UNUSED_BLOCK = 1 << 30  # table entries past a row's last block: never read, so never valid


def paged_attention(backend: str, query, key_cache, value_cache, block_table, seq_lens, **kwargs):
    """``sparq_ext.paged_attention`` through ``backend`` (as :func:`attention`: inputs moved to
    its device with their strides, output back on the CPU)."""
    if backend == "reference":
        with torch.no_grad():
            return sparq_ext.paged_attention_reference(query, key_cache, value_cache, block_table,
                                                       seq_lens, **kwargs)
    device = device_of(backend)
    moved = {name: _to(t, device) for name, t in kwargs.items()}
    with torch.no_grad():
        out = sparq_ext.paged_attention(*(_to(t, device) for t in (
            query, key_cache, value_cache, block_table, seq_lens)), **moved)
    assert out.device.type == device
    return out.cpu()


def page_table(seq_lens, block_size, *, shared_blocks=0, spare_blocks=3, extra_columns=1, seed=0):
    """``(block_table, num_blocks)``: int32 ``(R, max_blocks)`` of shuffled block ids for rows of
    ``seq_lens`` positions; rows after the first reuse its first ``shared_blocks`` blocks (a shared
    prefix: their caches must agree there); entries past a row's last block are UNUSED_BLOCK.
    ``max_blocks`` covers the longest row plus ``extra_columns``."""
    gen = torch.Generator().manual_seed(seed)
    R = len(seq_lens)
    used = [-(-int(n) // block_size) for n in seq_lens]
    max_blocks = max(used, default=0) + extra_columns
    own = [max(0, n - shared_blocks) if i > 0 else n for i, n in enumerate(used)]
    num_blocks = sum(own) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((R, max_blocks), UNUSED_BLOCK, dtype=torch.int32)
    for i, n in enumerate(used):
        for j in range(n):
            table[i, j] = table[0, j] if i > 0 and j < shared_blocks else ids.pop()
    return table, num_blocks


def to_pages(x, block_table, seq_lens, num_blocks, block_size, *, storage_order=(0, 1, 2, 3)):
    """``x`` ``(R, H, S, D)`` written into a paged cache ``(num_blocks, H, block_size, D)`` by
    ``block_table``, its storage holding the dims in ``storage_order`` (e.g. ``(0, 2, 1, 3)``:
    an engine's ``(num_blocks, block_size, H, D)`` seen through a transpose). Slots no row
    writes are NaN (an integer type's minimum), so a kernel that reads one is caught."""
    _, H, S, D = x.shape
    shape = (num_blocks, H, block_size, D)
    fill = float("nan") if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
    storage = torch.full([shape[i] for i in storage_order], fill, dtype=x.dtype)
    cache = storage.permute(*[storage_order.index(i) for i in range(4)])
    rows, positions = (torch.arange(S)[None, :] < seq_lens[:, None].long()).nonzero(as_tuple=True)
    blocks = block_table[rows, positions // block_size].long()
    cache[blocks, :, positions % block_size] = x.transpose(1, 2)[rows, positions]
    return cache
