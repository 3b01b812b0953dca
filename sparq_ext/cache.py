"""A KV cache laid out for SparQ decoding: ``K``, ``K`` transposed, ``V`` and a running sum of ``V``.

SparQ step 1 reads ``r`` rows of ``Kᵀ`` over all ``S`` positions, so the cache keeps a second
copy of the keys, ``key_t`` ``(B, Hkv, D, capacity)``, written one column per appended token
and never re-transposed. Step 3 needs the mean of ``V``: a running fp32 sum per (row, KV head)
makes it ``D`` reads instead of ``S·D``. Buffers are preallocated and grow by doubling, so an
append is amortised O(1) copies; :meth:`SparQCacheLayer.attention_inputs` hands out views of the
used part (``key_t[..., :S]`` keeps a contiguous last dim, which is what step 1 wants).

``key_t_dtype=torch.int8`` keeps the 8-bit selection cache instead of the full-precision copy:
``key_t`` int8 and ``key_t_scale`` float32 ``(B, Hkv, capacity)``, each appended token quantized
on its own (:func:`sparq_ext.quantize_key_t`, one scale per position, so nothing already cached is
re-quantized). Step 1 then ranks from 8-bit keys; steps 2 and 3 still read ``K`` and ``V``
exactly. Per token and KV head the cache holds ``2*D*e + D + 4`` bytes instead of ``3*D*e``
(:meth:`SparQCache.memory_per_token`).

Once :meth:`SparQCacheLayer.key_std` is first asked for (``component_rule="key_std"``), a layer
also keeps running float64 sums of ``K`` and ``K²`` per (row, KV head, channel): the first call
reads the cached keys once, later ones ``2·D`` numbers, and until then no write pays for them.

Two ways to hold a ragged batch:

* left padding (what Hugging Face ``generate`` does): every row has the same width, padded
  positions are marked invalid with a ``valid`` mask at prefill (``attn_mask`` for the op);
* per-row lengths (right padding): ``prefill(..., seq_lens=)`` then :meth:`append` writes each
  row's new token at its own length; the op gets ``seq_lens``.

:class:`SparQCache` is a ``transformers.cache_utils.Cache`` whose layers are
:class:`SparQCacheLayer`, so ``model.generate`` can drive it (see
:mod:`sparq_ext.integrations.transformers`). Without ``transformers`` installed both classes
still work on their own with :func:`sparq_ext.attention`.
"""

from __future__ import annotations

import torch

from .budget import KEY_T_SCALE_BYTES, rk_for_ratio
from .ops import attention
from .reference import quantize_key_t

try:  # transformers is optional: subclass its cache classes when it is there
    from transformers.cache_utils import Cache as _HFCache
    from transformers.cache_utils import CacheLayerMixin as _HFLayer
except ImportError:  # pragma: no cover - exercised only without transformers
    _HFCache, _HFLayer = object, object

_MIN_CAPACITY = 64
COMPONENT_RULES = ("query", "key_std")


def check_component_rule(component_rule):
    """Step 1's component rule, checked: ``"query"`` (SparQ's largest ``|q|``) or ``"key_std"``
    (``|q|`` times each key channel's standard deviation over the cached positions)."""
    if component_rule not in COMPONENT_RULES:
        raise ValueError(f"component_rule must be one of {COMPONENT_RULES}, got {component_rule!r}")
    return component_rule


def _check_key_t_dtype(key_t_dtype):
    if key_t_dtype not in (None, torch.int8):
        raise ValueError("key_t_dtype must be None (a copy of the keys in their dtype) or torch.int8 "
                         f"(the 8-bit selection cache), got {key_t_dtype!r}")
    return key_t_dtype


def memory_per_token(kv_heads: int, head_dim: int, dtype) -> dict:
    """Bytes a decode cache holds per token and layer: ``"dense"`` (``K`` and ``V``),
    ``"sparq_full_key_t"`` (plus a copy of ``K``), ``"sparq_int8_key_t"`` (plus the 8-bit
    selection cache: ``D`` int8 and a float32 scale per KV head)."""
    e = torch.empty((), dtype=dtype).element_size()
    dense = 2 * kv_heads * head_dim * e
    return {"dense": dense, "sparq_full_key_t": dense + kv_heads * head_dim * e,
            "sparq_int8_key_t": dense + kv_heads * (head_dim + KEY_T_SCALE_BYTES)}


class SparQCacheLayer(_HFLayer):
    """One attention layer's cache. Shapes: ``(B, Hkv, S, D)`` for keys/values.

    Attributes (views of the used part, refreshed after every write):
        keys, values: ``(B, Hkv, S, D)``.
        key_t: ``(B, Hkv, D, S)`` view (last dim contiguous); int8 with ``key_t_dtype=torch.int8``.
        key_t_scale: ``(B, Hkv, S)`` float32 view of each position's scale (int8 ``key_t``), else
            ``None``.
        value_sum: ``(B, Hkv, D)`` fp32, sum of ``V`` over valid positions.
        key_sum, key_sq_sum: ``(B, Hkv, D)`` fp64, sums of ``K`` and ``K²`` over valid positions,
            kept from the first :meth:`key_std` on (``None`` before).
        valid: ``(B, S)`` bool, positions that may be attended.
        seq_lens: ``(B,)`` int64 per-row lengths in per-row mode, else ``None``.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = True

    def __init__(self, capacity: int = 0, key_t_dtype=None, **kwargs):
        if _HFLayer is not object:
            super().__init__()
        self.keys = self.values = None
        self.is_initialized = False
        self._initial_capacity = int(capacity)
        self.key_t_dtype = _check_key_t_dtype(key_t_dtype)
        self._reset_buffers()

    # ----------------------------------------------------------------- storage
    def _reset_buffers(self):
        self._k = self._kt = self._kt_scale = self._v = self._valid = None
        self.value_sum = self.key_sum = self.key_sq_sum = None
        self.seq_lens = None  # per-row lengths (right-padded mode) or None
        self._len = 0  # used width (max row length)
        self.keys = self.values = self.key_t = self.key_t_scale = self.valid = None
        self.is_initialized = False

    @property
    def quantized(self) -> bool:
        """Whether ``key_t`` is the 8-bit selection cache."""
        return self.key_t_dtype == torch.int8

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._allocate(B, H, D, max(self._initial_capacity, _MIN_CAPACITY))
        self.value_sum = torch.zeros(B, H, D, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def _allocate(self, B, H, D, capacity):
        kw = dict(dtype=self.dtype, device=self.device)
        old = (self._k, self._kt, self._v, self._valid, self._kt_scale)
        self._k = torch.zeros(B, H, capacity, D, **kw)
        self._kt = torch.zeros(B, H, D, capacity, dtype=self.key_t_dtype or self.dtype, device=self.device)
        self._v = torch.zeros(B, H, capacity, D, **kw)
        self._valid = torch.zeros(B, capacity, dtype=torch.bool, device=self.device)
        if self.quantized:
            self._kt_scale = torch.zeros(B, H, capacity, dtype=torch.float32, device=self.device)
        if old[0] is not None and self._len:
            n = self._len
            self._k[:, :, :n].copy_(old[0][:, :, :n])
            self._kt[..., :n].copy_(old[1][..., :n])
            self._v[:, :, :n].copy_(old[2][:, :, :n])
            self._valid[:, :n].copy_(old[3][:, :n])
            if self.quantized:
                self._kt_scale[..., :n].copy_(old[4][..., :n])

    def _reserve(self, needed: int):
        if needed > self.capacity:  # amortised growth: at least double
            B, H, _, D = self._k.shape
            self._allocate(B, H, D, max(needed, 2 * self.capacity))

    def _refresh_views(self):
        n = self._len
        self.keys = self._k[:, :, :n]
        self.values = self._v[:, :, :n]
        self.key_t = self._kt[..., :n]
        self.key_t_scale = self._kt_scale[..., :n] if self.quantized else None
        self.valid = self._valid[:, :n]

    def _check_new(self, key_states, value_states):
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise ValueError("key_states and value_states must both be (B, Hkv, T, D) with equal shapes, "
                             f"got {tuple(key_states.shape)} and {tuple(value_states.shape)}")
        if self.is_initialized:
            B, H, _, D = self._k.shape
            if (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != (B, H, D):
                raise ValueError(f"key_states must be (B={B}, Hkv={H}, T, D={D}), got {tuple(key_states.shape)}")
            if key_states.dtype != self.dtype:
                raise TypeError(f"key_states must have the cache dtype {self.dtype}, got {key_states.dtype}")

    def _accumulate(self, key_states, value_states, weight=None):
        """Add positions ``(B, Hkv, T, D)`` into the running sums (the key sums once kept), each
        times ``weight`` ``(B, T)`` (a mask, or +-1 to add or remove one; default 1)."""
        v32 = value_states.to(torch.float32)
        if weight is None:
            self.value_sum += v32.sum(2)
        else:
            self.value_sum += (v32 * weight.to(torch.float32)[:, None, :, None]).sum(2)
        if self.key_sum is not None:
            self._add_keys(key_states, weight)

    def _add_keys(self, key_states, weight=None):
        """The key sums' part of :meth:`_accumulate`."""
        k64 = key_states.to(torch.float64)
        k64_sq = k64.square()
        if weight is not None:
            w64 = weight.to(torch.float64)[:, None, :, None]
            k64, k64_sq = k64 * w64, k64_sq * w64
        self.key_sum += k64.sum(2)
        self.key_sq_sum += k64_sq.sum(2)

    # ------------------------------------------------------------------ writes
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, valid=None, **kwargs):
        """Append ``T`` positions to every row (same width for all rows); return ``(keys, values)``.

        ``valid``: optional ``(B, T)`` bool for the new positions (default: all valid), e.g. the
        left padding of a prompt. Per-row-length mode uses :meth:`append` instead.
        The returned tensors carry ``_sparq_layer`` (this layer) so an attention function that
        receives them can find ``key_t`` and the value sum.
        """
        self._check_new(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.seq_lens is not None:
            raise RuntimeError("this layer holds per-row lengths: append with append(), not update()")
        T = key_states.shape[2]
        start, end = self._len, self._len + T
        self._reserve(end)
        self._k[:, :, start:end].copy_(key_states)
        if self.quantized:
            key_t, key_t_scale = quantize_key_t(key_states)
            self._kt[..., start:end].copy_(key_t)
            self._kt_scale[..., start:end].copy_(key_t_scale)
        else:
            self._kt[..., start:end].copy_(key_states.transpose(-1, -2))
        self._v[:, :, start:end].copy_(value_states)
        if valid is None:
            self._valid[:, start:end] = True
        else:
            valid = valid.to(device=self.device, dtype=torch.bool).expand(key_states.shape[0], T)
            self._valid[:, start:end] = valid
        self._accumulate(key_states, value_states, valid)
        self._len = end
        self._refresh_views()
        keys, values = self.keys, self.values
        keys._sparq_layer = self  # plain attribute on a fresh view: how the attention fn finds us
        return keys, values

    def set_valid(self, valid: torch.Tensor) -> None:
        """Replace the validity of all ``S`` cached positions (``(B, S)`` bool) and recompute the sum.

        Costs ``S·D`` once; the Hugging Face integration calls it at prefill with the padding mask.
        """
        valid = valid.to(device=self.device, dtype=torch.bool)
        if tuple(valid.shape) != (self._k.shape[0], self._len):
            raise ValueError(f"valid must be (B, S) = {(self._k.shape[0], self._len)}, got {tuple(valid.shape)}")
        self._valid[:, : self._len] = valid
        self._refresh_views()
        for t in (self.value_sum, self.key_sum, self.key_sq_sum):
            if t is not None:
                t.zero_()
        self._accumulate(self.keys, self.values, valid)

    def set_last_valid(self, valid_last: torch.Tensor) -> None:
        """Validity ``(B,)`` of the newest position (D reads per row: no rescan of the cache)."""
        valid_last = valid_last.to(device=self.device, dtype=torch.bool)
        was = self._valid[:, self._len - 1]
        delta = valid_last.to(torch.float32) - was.to(torch.float32)  # +1, 0 or -1 per row
        last = slice(self._len - 1, self._len)
        self._accumulate(self._k[:, :, last], self._v[:, :, last], delta[:, None])
        self._valid[:, self._len - 1] = valid_last

    def prefill(self, key_states, value_states, *, seq_lens=None, valid=None):
        """Fill an empty layer with a (padded) prompt.

        ``seq_lens`` ``(B,)``: right padding, row ``b`` holds ``seq_lens[b]`` positions; later
        tokens go in with :meth:`append`. ``valid`` ``(B, S)``: left padding (or any mask).
        """
        if self.is_initialized and self._len:
            raise RuntimeError("prefill needs an empty layer (call reset() first)")
        if seq_lens is not None and valid is not None:
            raise ValueError("give seq_lens (right padding) or valid (any mask), not both")
        if seq_lens is None:
            return self.update(key_states, value_states, valid=valid)
        S = key_states.shape[2]
        seq_lens = seq_lens.to(device=key_states.device, dtype=torch.int64)
        if tuple(seq_lens.shape) != (key_states.shape[0],):
            raise ValueError(f"seq_lens must be (B,) = ({key_states.shape[0]},), got {tuple(seq_lens.shape)}")
        positions = torch.arange(S, device=key_states.device)
        valid = positions[None, :] < seq_lens[:, None]
        keys, values = self.update(key_states, value_states, valid=valid)
        self.seq_lens = seq_lens.clone()
        self._len = int(seq_lens.max()) if S else 0  # one sync, at prefill only
        self._refresh_views()
        return self.keys, self.values

    def append(self, key_states, value_states):
        """Append one token per row: at column ``seq_lens[b]`` in per-row mode, else at the end."""
        if self.seq_lens is None:
            return self.update(key_states, value_states)
        self._check_new(key_states, value_states)
        if key_states.shape[2] != 1:
            raise ValueError("append takes one position per row: (B, Hkv, 1, D)")
        B, H, _, D = self._k.shape
        # Rows grow independently; the used width grows by at most one, tracked on the host.
        self._reserve(self._len + 1)
        pos = self.seq_lens  # (B,)
        idx = pos[:, None, None, None].expand(B, H, 1, D)
        self._k.scatter_(2, idx, key_states)
        if self.quantized:
            key_t, key_t_scale = quantize_key_t(key_states)
            self._kt.scatter_(3, pos[:, None, None, None].expand(B, H, D, 1), key_t)
            self._kt_scale.scatter_(2, pos[:, None, None].expand(B, H, 1), key_t_scale)
        else:
            self._kt.scatter_(3, pos[:, None, None, None].expand(B, H, D, 1), key_states.transpose(-1, -2))
        self._v.scatter_(2, idx, value_states)
        self._valid.scatter_(1, pos[:, None], True)
        self._accumulate(key_states, value_states)
        self.seq_lens = pos + 1
        self._len += 1  # an upper bound on max(seq_lens); positions past a row's length are invalid
        self._refresh_views()
        return self.keys, self.values

    # ------------------------------------------------------------------- reads
    def value_mean(self) -> torch.Tensor:
        """``(B, Hkv, 1, D)`` mean of ``V`` over valid positions, in the cache dtype (D reads)."""
        count = self.valid.sum(-1).clamp_min(1).to(torch.float32) if self.seq_lens is None \
            else self.seq_lens.clamp_min(1).to(torch.float32)
        return (self.value_sum / count[:, None, None]).to(self.dtype)[:, :, None, :]

    def key_std(self) -> torch.Tensor:
        """``(B, Hkv, D)`` float32: each key channel's standard deviation over the valid
        positions (:func:`sparq_ext.key_channel_std` of the cache, from the running sums: ``2·D``
        reads; the first call sums the cached keys, ``S·D`` reads, and starts the sums); zeros for a
        row without valid positions."""
        if not self.is_initialized:
            raise RuntimeError("key_std needs an initialised layer (write to it first)")
        if self.key_sum is None:
            B, H, _, D = self._k.shape
            self.key_sum = torch.zeros(B, H, D, dtype=torch.float64, device=self.device)
            self.key_sq_sum = torch.zeros_like(self.key_sum)
            self._add_keys(self.keys, self.valid)
        count = self.valid.sum(-1) if self.seq_lens is None else self.seq_lens
        n = count.clamp_min(1).to(torch.float64)[:, None, None]
        mean = self.key_sum / n
        return (self.key_sq_sum / n - mean.square()).clamp_min(0).sqrt().to(torch.float32)

    def attention_inputs(self, component_rule: str = "query") -> dict:
        """Keyword arguments for :func:`sparq_ext.attention` besides ``query``, ``r`` and ``k``;
        with ``component_rule="key_std"`` step 1's ``component_weights`` are :meth:`key_std`."""
        out = dict(key=self.keys, value=self.values, key_t=self.key_t, value_mean=self.value_mean())
        if check_component_rule(component_rule) == "key_std":
            out["component_weights"] = self.key_std()
        if self.quantized:
            out["key_t_scale"] = self.key_t_scale
        if self.seq_lens is not None:
            out["seq_lens"] = self.seq_lens
        else:
            out["attn_mask"] = self.valid[:, None, None, :]
        return out

    def attention(self, query, *, r=None, k=None, ratio=None, local_window=None,
                  component_rule: str = "query", **kwargs):
        """SparQ attention of ``query`` ``(B, Hq, 1, D)`` over this layer's cache.

        Give ``r`` and ``k``, or a compression ``ratio`` (then ``r, k = rk_for_ratio``, for the
        8-bit selection cache its even split); ``local_window`` defaults to ``k // 4`` (the
        paper's setting). ``component_rule``: how step 1 picks its ``r`` components, ``"query"``
        (the largest ``|q|``, the paper) or ``"key_std"`` (the largest ``|q|`` times the key
        channel's standard deviation, :meth:`key_std`).
        """
        if (r is None or k is None) and ratio is None:
            raise ValueError("give r and k, or ratio")
        if ratio is not None:
            r0, k0 = rk_for_ratio(ratio, self._len, self._k.shape[-1], dtype=self.dtype,
                                  key_t_dtype=self.key_t_dtype)
            r, k = (r0 if r is None else r), (k0 if k is None else k)
        if local_window is None:
            local_window = k // 4
        return attention(query, r=r, k=k, local_window=min(local_window, k),
                         **self.attention_inputs(component_rule), **kwargs)

    def memory_per_token(self) -> dict:
        """Bytes per token this layer's configuration holds against the alternatives
        (:func:`memory_per_token`, plus ``"this"``); needs a first write (shapes and dtype)."""
        if not self.is_initialized:
            raise RuntimeError("memory_per_token needs an initialised layer (write to it first)")
        _, H, _, D = self._k.shape
        sizes = memory_per_token(H, D, self.dtype)
        sizes["this"] = sizes["sparq_int8_key_t" if self.quantized else "sparq_full_key_t"]
        return sizes

    # ------------------------------------------------- transformers bookkeeping
    def get_seq_length(self) -> int:
        return self._len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._reset_buffers()

    def offload(self):  # the transposed copy and sums would have to move too; not supported
        raise NotImplementedError("SparQCacheLayer does not support offloading")

    def prefetch(self):
        raise NotImplementedError("SparQCacheLayer does not support offloading")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        n = min(-tokens_to_remove, self._len)
        if n == 0 or not self.is_initialized:
            return
        if self.seq_lens is not None:
            raise NotImplementedError("crop is not supported in per-row-length mode")
        start = self._len - n
        removing = -self._valid[:, start:self._len].to(torch.float32)
        self._accumulate(self._k[:, :, start:self._len], self._v[:, :, start:self._len], removing)
        self._valid[:, start:self._len] = False
        self._len = start
        self._refresh_views()

    def _index_batch(self, fn):
        if not self.is_initialized:
            return
        self._k, self._kt, self._v, self._valid = (fn(t) for t in (self._k, self._kt, self._v, self._valid))
        if self.quantized:
            self._kt_scale = fn(self._kt_scale)
        self.value_sum, self.key_sum, self.key_sq_sum = (
            None if t is None else fn(t) for t in (self.value_sum, self.key_sum, self.key_sq_sum))
        if self.seq_lens is not None:
            self.seq_lens = fn(self.seq_lens)
        self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))


class SparQCache(_HFCache):
    """A per-layer list of :class:`SparQCacheLayer`; a ``transformers`` ``Cache`` when available.

    ``SparQCache()`` adds layers lazily as ``update(key, value, layer_idx)`` reaches them;
    ``SparQCache(num_layers=n)`` or ``SparQCache(config=model.config)`` creates them up front.
    With a ``config`` only the full-attention layers are :class:`SparQCacheLayer`; every other layer
    (a sliding window, ...) is the layer ``transformers``' own ``DynamicCache`` makes for it, since
    SparQ does not run there (:func:`attention_layer_types`).
    ``capacity`` preallocates that many positions per layer (it still grows past it).
    ``key_t_dtype=torch.int8``: every SparQ layer keeps the 8-bit selection cache instead of a
    full-precision copy of the keys (:class:`SparQCacheLayer`).
    """

    def __init__(self, num_layers: int | None = None, config=None, capacity: int = 0,
                 key_t_dtype=None):
        self._capacity = capacity
        self.key_t_dtype = _check_key_t_dtype(key_t_dtype)
        if config is not None and num_layers is None and _HFCache is not object:
            layers = _layers_for_config(config, capacity, key_t_dtype)
        elif config is not None and num_layers is None:
            text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            layers = [SparQCacheLayer(capacity, key_t_dtype) for _ in range(text_config.num_hidden_layers)]
        else:
            layers = ([SparQCacheLayer(capacity, key_t_dtype) for _ in range(num_layers)]
                      if num_layers is not None else None)
        if _HFCache is object:
            self.layers = layers or []
        else:
            super().__init__(layers=layers, layer_class_to_replicate=None if layers is not None
                             else _LayerFactory(capacity, key_t_dtype))

    def _layer(self, layer_idx: int) -> SparQCacheLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(SparQCacheLayer(self._capacity, self.key_t_dtype))
        layer = self.layers[layer_idx]
        if not isinstance(layer, SparQCacheLayer):
            raise TypeError(f"layer {layer_idx} of this cache is a {type(layer).__name__} (not a full-attention "
                            "layer): SparQ runs on full-attention layers only")
        return layer

    if _HFCache is object:  # minimal Cache surface without transformers
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return self._layer(layer_idx).update(key_states, value_states, *args, **kwargs)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

        def reset(self):
            for layer in self.layers:
                layer.reset()

        def __len__(self):
            return len(self.layers)

    def prefill(self, key_states, value_states, layer_idx: int, **kwargs):
        return self._layer(layer_idx).prefill(key_states, value_states, **kwargs)

    def append(self, key_states, value_states, layer_idx: int):
        return self._layer(layer_idx).append(key_states, value_states)

    def attention(self, query, layer_idx: int, **kwargs):
        """SparQ attention over layer ``layer_idx``; see :meth:`SparQCacheLayer.attention`."""
        return self._layer(layer_idx).attention(query, **kwargs)

    def memory_per_token(self) -> dict:
        """Bytes per token over the SparQ layers written so far: ``"dense"`` (``K`` and ``V``),
        ``"sparq_full_key_t"``, ``"sparq_int8_key_t"`` and ``"this"`` (this cache's choice).
        Other layers (sliding windows) hold what they hold either way and are not counted."""
        totals: dict = {}
        for layer in self.layers:
            if isinstance(layer, SparQCacheLayer) and layer.is_initialized:
                for name, n in layer.memory_per_token().items():
                    totals[name] = totals.get(name, 0) + n
        if not totals:
            raise RuntimeError("memory_per_token needs at least one written SparQ layer")
        return totals


SPARQ_LAYER_TYPE = "full_attention"  # the one layer type whose cache is a SparQCacheLayer


def attention_layer_types(config) -> list[str]:
    """Each decoder layer's attention type as ``transformers``' caches see it: ``"full_attention"``,
    ``"sliding_attention"``, ``"chunked_attention"``, ``"linear_attention"``, ..."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # transformers without it: its layer_types, else a window set means every layer slides
        layer_types = getattr(text_config, "layer_types", None)
        if layer_types:
            return list(layer_types)
        sliding = getattr(text_config, "sliding_window", None) is not None
        return ["sliding_attention" if sliding else "full_attention"] * text_config.num_hidden_layers
    return list(get_layer_types_and_kwargs(text_config)[0])


def _layers_for_config(config, capacity, key_t_dtype=None):
    """``DynamicCache(config=config)``'s layers with the full-attention ones replaced by ours."""
    from transformers.cache_utils import DynamicCache

    layer_types = attention_layer_types(config)
    theirs = DynamicCache(config=config).layers
    if len(theirs) != len(layer_types):
        raise ValueError(f"cannot map the {len(layer_types)} layer types of {type(config).__name__} onto "
                         f"the {len(theirs)} layers of its DynamicCache")
    return [SparQCacheLayer(capacity, key_t_dtype) if layer_type == SPARQ_LAYER_TYPE else layer
            for layer_type, layer in zip(layer_types, theirs)]


class _LayerFactory:
    """``layer_class_to_replicate`` for lazily created layers with a preallocated capacity."""

    def __init__(self, capacity, key_t_dtype=None):
        self.capacity = capacity
        self.key_t_dtype = key_t_dtype

    def __call__(self):
        return SparQCacheLayer(self.capacity, self.key_t_dtype)
