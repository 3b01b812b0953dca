"""The decode methods the accuracy benchmarks compare, all at the same bytes read per step.

``dense``        exact attention (SDPA).
``sparq``        SparQ at ``ratio``: the even split, local window k/4 (``enable_sparq``'s default).
``sparq_int8``   SparQ at ``ratio`` with the 8-bit selection cache (``key_t_dtype=torch.int8``): the
                 8-bit split of the same bytes (``rk_for_ratio``: ``r = (D/ρ)(1 + e)/2 − 2``
                 components, ``k`` on the budget).
``sparq_int8_k`` the 8-bit selection cache at the full copy's ``r = D/ρ``, the step-1 bytes it
                 saves spent on ``k`` (``k = S·(1/ρ − (r + 4)/(2·e·D))``): the same bytes again.
``sparq_keystd`` SparQ at ``ratio``, step 1 ranking components by ``|q|`` times each key channel's
                 standard deviation (``component_rule="key_std"``); the same bytes.
``sparq_int8_keystd`` the same with the 8-bit selection cache and its split.
``sparq_nowin``  the same without the local window.
``sparq_auto``   SparQ at ``ratio`` with a calibrated auto split (default: the saved
                 ``"smollm2-135m"`` split; docs/auto-split.md).
``streaming``    StreamingLLM: 4 sinks + a recent window of ``W`` positions, ``2·W·D`` = SparQ's bytes.
``h2o``          H2O heavy hitters (``W/2`` heavy + ``W/2`` recent), the same ``W``.

:class:`PrefilledCache` prefills a prompt once and hands every method the same cache (for
``sparq_int8`` the same keys and values with an 8-bit selection cache beside them).
"""

from __future__ import annotations

import dataclasses

import torch

from ..budget import k_on_budget, rk_for_ratio, transfer_bytes
from ..cache import SPARQ_LAYER_TYPE, SparQCache, SparQCacheLayer
from ..integrations.transformers import DENSE_LAYER_TYPES, SparQSettings, disable_sparq, enable_sparq
from ..split import Split
from .baselines import budget_positions, h2o_attention_forward, reset_h2o_state, streaming_attention_forward
from .decode import prefill

METHODS = ("sparq", "sparq_int8", "sparq_int8_k", "sparq_keystd", "sparq_int8_keystd", "sparq_nowin",
           "sparq_auto", "streaming", "h2o")
DEFAULT_SPLIT = "smollm2-135m"


@dataclasses.dataclass
class FullRankMoreK(SparQSettings):
    """``sparq_int8_k``'s settings: the full copy's even-split ``r`` (``D/ρ``) and the ``k`` that
    spends the rest of the ratio's budget on the layer's cache (:func:`sparq_ext.budget.k_on_budget`)."""

    def resolve(self, seq_len, head_dim, layer_idx=None, *, dtype=None, key_t_dtype=None):
        r, _ = rk_for_ratio(self.ratio, seq_len, head_dim)
        k = k_on_budget(self.ratio, seq_len, head_dim, r, dtype=dtype, key_t_dtype=key_t_dtype)
        return r, k, k // 4


def set_method(model, method: str, ratio: float, split_file=DEFAULT_SPLIT) -> None:
    """Switch ``model``'s decode step to ``method`` (``"dense"`` or one of :data:`METHODS`)."""
    if method == "dense":
        disable_sparq(model)
    elif method == "sparq":
        enable_sparq(model, ratio=ratio)
    elif method == "sparq_int8":
        enable_sparq(model, ratio=ratio, key_t_dtype=torch.int8)
    elif method == "sparq_int8_k":
        enable_sparq(model, ratio=ratio, key_t_dtype=torch.int8)
        settings = FullRankMoreK(ratio=float(ratio))
        for module in model.modules():
            if getattr(module, "_sparq_settings", None) is not None:
                module._sparq_settings = settings
    elif method == "sparq_keystd":
        enable_sparq(model, ratio=ratio, component_rule="key_std")
    elif method == "sparq_int8_keystd":
        enable_sparq(model, ratio=ratio, key_t_dtype=torch.int8, component_rule="key_std")
    elif method == "sparq_nowin":
        enable_sparq(model, ratio=ratio, local_window=0)
    elif method == "sparq_auto":
        enable_sparq(model, ratio=ratio, split="auto", split_file=split_file)
    elif method == "streaming":
        enable_sparq(model, ratio=ratio, attn_name="sparq_streaming", attn_fn=streaming_attention_forward)
    elif method == "h2o":
        enable_sparq(model, ratio=ratio, attn_name="sparq_h2o", attn_fn=h2o_attention_forward)
    else:
        raise ValueError(f"method must be 'dense' or one of {METHODS}, got {method!r}")


def method_settings(method: str, ratio: float, split_file=DEFAULT_SPLIT) -> SparQSettings:
    """The :class:`SparQSettings` ``method`` decodes with at ``ratio``."""
    if method == "sparq_int8_k":
        return FullRankMoreK(ratio=ratio)
    if method == "sparq_auto":
        split = split_file if isinstance(split_file, Split) else Split.load(split_file, ratio=ratio)
        return SparQSettings(ratio=ratio, split=split)
    return SparQSettings(ratio=ratio, local_window=0 if method == "sparq_nowin" else None,
                         component_rule="key_std" if method.endswith("_keystd") else "query")


def method_key_t_dtype(method: str):
    """The selection cache ``method`` reads: ``torch.int8`` for ``sparq_int8``, ``sparq_int8_k``
    and ``sparq_int8_keystd``, else ``None`` (a full-precision copy of K)."""
    return torch.int8 if method in ("sparq_int8", "sparq_int8_k", "sparq_int8_keystd") else None


def bytes_fraction(method: str, ratio: float, seq_len: int, head_dim: int, kv_heads: int, layer_types,
                   split_file=DEFAULT_SPLIT, sliding_window: int | None = None, dtype=torch.float32) -> float:
    """KV-cache bytes the whole model reads per decode step relative to dense at ``seq_len``, for a
    cache of ``dtype`` (the 8-bit selection cache's bytes for ``sparq_int8`` and ``sparq_int8_k``).

    ``layer_types``: each layer's attention type (:func:`sparq_ext.cache.attention_layer_types`).
    Full-attention layers run ``method``; sliding-window layers stay dense over
    ``min(seq_len, sliding_window)`` positions in every method, so they dilute the saving.
    """
    if method == "dense":
        return 1.0
    settings = method_settings(method, ratio, split_file)
    key_t_dtype = method_key_t_dtype(method)
    e = torch.empty((), dtype=dtype).element_size()
    per_position = 2 * kv_heads * head_dim  # elements of K and V per position, dense
    dense = spent = 0.0
    for layer, layer_type in enumerate(layer_types):
        if layer_type != SPARQ_LAYER_TYPE:
            if layer_type not in DENSE_LAYER_TYPES or sliding_window is None:
                raise ValueError(f"layer {layer} is {layer_type!r}: bytes_fraction knows full-attention layers "
                                 "and sliding-window layers with a sliding_window")
            positions = min(seq_len, sliding_window)
            dense += positions * per_position
            spent += positions * per_position
            continue
        dense += seq_len * per_position
        if not method.startswith("sparq"):
            spent += budget_positions(settings, seq_len, head_dim) * per_position
            continue
        r, k, _ = settings.resolve(seq_len, head_dim, layer, dtype=dtype, key_t_dtype=key_t_dtype)
        tb = transfer_bytes(1, kv_heads, seq_len, head_dim, r, k, dtype=dtype, query_heads=kv_heads,
                            key_t_dtype=key_t_dtype)
        query_and_output = 2 * kv_heads * head_dim * e
        spent += (tb["sparq"] - query_and_output) / e
    return spent / dense


_RUNNING_SUMS = ("value_sum", "key_sum", "key_sq_sum")


def _running_sums(layer):
    """Copies of a SparQ layer's running sums (restored exactly, not by cropping's subtraction;
    the key sums are None until a method asks for the keys' spread)."""
    return tuple(None if getattr(layer, name) is None else getattr(layer, name).clone()
                 for name in _RUNNING_SUMS)


class PrefilledCache:
    """One dense prefill reused by every method: :meth:`fresh` crops the cache back to the prompt
    and restores its running sums (and forgets H2O's decode state).

    After ``set_method(model, "sparq_int8", ...)`` :meth:`fresh` hands out a second cache with
    the same prefilled keys and values and an 8-bit selection cache instead of the full copy
    (built once from the first: the keys are quantized per position, so it holds what a prefill
    into ``SparQCache(key_t_dtype=torch.int8)`` would).

    The layers of a hybrid model that stay dense are transformers' own cache layers; a sliding
    window drops positions as it decodes, so cropping cannot undo a run. Those layers' attributes
    are kept as they were after the prefill instead: their ``update`` rebinds ``keys``/``values``
    to new tensors (``torch.cat``) and never writes into the old ones. Both caches share them.
    """

    def __init__(self, model, ids, h2o_scores: bool = True):
        # SDPA prefill; "h2o" also records H2O's prefill scores (a dense S x S softmax per layer:
        # most of the prefill's time at 8K), which only the H2O baseline reads
        set_method(model, "h2o" if h2o_scores else "dense", 8)
        self.model = model
        self.cache = SparQCache(config=model.config)
        self.last_logits = prefill(model, ids, self.cache)
        self.length = ids.shape[1]
        self.sums = {i: _running_sums(layer) for i, layer in enumerate(self.cache.layers)
                     if isinstance(layer, SparQCacheLayer)}
        self.dense_layers = {i: dict(vars(layer)) for i, layer in enumerate(self.cache.layers)
                             if not isinstance(layer, SparQCacheLayer)}
        self._int8 = None

    def _int8_cache(self) -> SparQCache:
        if self._int8 is None:
            self.fresh(torch.float32)  # crop the full cache back to the prompt first
            cache = SparQCache(config=self.model.config, key_t_dtype=torch.int8)
            for i, source in enumerate(self.cache.layers):
                if i in self.dense_layers:
                    cache.layers[i] = source
                else:
                    cache.layers[i].update(source.keys, source.values, valid=source.valid)
            self._int8 = (cache, {i: _running_sums(cache.layers[i]) for i in self.sums})
        return self._int8[0]

    def fresh(self, key_t_dtype=None):
        """The prefilled cache, cropped back to the prompt, for the method the model decodes
        with now: with the 8-bit selection cache after ``enable_sparq(..., key_t_dtype=torch.int8)``
        (``key_t_dtype`` overrides: ``torch.int8``, or any float dtype for the full copy)."""
        if key_t_dtype is None:
            key_t_dtype = getattr(self.model, "_sparq_key_t_dtype", None)
        if key_t_dtype == torch.int8:
            cache, sums = self._int8_cache(), self._int8[1]
        else:
            cache, sums = self.cache, self.sums
        for i, layer in enumerate(cache.layers):
            if i in self.dense_layers:
                vars(layer).update(self.dense_layers[i])
                continue
            extra = layer.get_seq_length() - self.length
            if extra:
                layer.crop(-extra)
            for name, then in zip(_RUNNING_SUMS, sums[i]):
                setattr(layer, name, None if then is None else then.clone())
        reset_h2o_state(cache)
        return cache
