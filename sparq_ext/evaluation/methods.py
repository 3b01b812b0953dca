"""The decode methods the accuracy benchmarks compare, all at the same bytes read per step.

``dense``        exact attention (SDPA).
``sparq``        SparQ at ``ratio``: the even split, local window k/4 (``enable_sparq``'s default).
``sparq_nowin``  the same without the local window.
``sparq_auto``   SparQ at ``ratio`` with a calibrated auto split (default: the saved
                 ``"smollm2-135m"`` split; docs/auto-split.md).
``streaming``    StreamingLLM: 4 sinks + a recent window of ``W`` positions, ``2·W·D`` = SparQ's bytes.
``h2o``          H2O heavy hitters (``W/2`` heavy + ``W/2`` recent), the same ``W``.

:class:`PrefilledCache` prefills a prompt once and hands every method the same cache.
"""

from __future__ import annotations

import torch

from ..budget import transfer_bytes
from ..cache import SPARQ_LAYER_TYPE, SparQCache, SparQCacheLayer
from ..integrations.transformers import DENSE_LAYER_TYPES, SparQSettings, disable_sparq, enable_sparq
from ..split import Split
from .baselines import budget_positions, h2o_attention_forward, reset_h2o_state, streaming_attention_forward
from .decode import prefill

METHODS = ("sparq", "sparq_nowin", "sparq_auto", "streaming", "h2o")
DEFAULT_SPLIT = "smollm2-135m"


def set_method(model, method: str, ratio: float, split_file=DEFAULT_SPLIT) -> None:
    """Switch ``model``'s decode step to ``method`` (``"dense"`` or one of :data:`METHODS`)."""
    if method == "dense":
        disable_sparq(model)
    elif method == "sparq":
        enable_sparq(model, ratio=ratio)
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
    if method == "sparq_auto":
        split = split_file if isinstance(split_file, Split) else Split.load(split_file, ratio=ratio)
        return SparQSettings(ratio=ratio, split=split)
    return SparQSettings(ratio=ratio, local_window=0 if method == "sparq_nowin" else None)


def bytes_fraction(method: str, ratio: float, seq_len: int, head_dim: int, kv_heads: int, layer_types,
                   split_file=DEFAULT_SPLIT, sliding_window: int | None = None) -> float:
    """KV-cache bytes the whole model reads per decode step relative to dense at ``seq_len``.

    ``layer_types``: each layer's attention type (:func:`sparq_ext.cache.attention_layer_types`).
    Full-attention layers run ``method``; sliding-window layers stay dense over
    ``min(seq_len, sliding_window)`` positions in every method, so they dilute the saving.
    """
    if method == "dense":
        return 1.0
    settings = method_settings(method, ratio, split_file)
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
        r, k, _ = settings.resolve(seq_len, head_dim, layer)
        tb = transfer_bytes(1, kv_heads, seq_len, head_dim, r, k, dtype=torch.float32, query_heads=kv_heads)
        query_and_output = 2 * kv_heads * head_dim * 4
        spent += (tb["sparq"] - query_and_output) / 4
    return spent / dense


class PrefilledCache:
    """One dense prefill reused by every method: :meth:`fresh` crops the cache back to the prompt
    and restores its V sums (and forgets H2O's decode state).

    The layers of a hybrid model that stay dense are transformers' own cache layers; a sliding
    window drops positions as it decodes, so cropping cannot undo a run. Those layers' attributes
    are kept as they were after the prefill instead: their ``update`` rebinds ``keys``/``values``
    to new tensors (``torch.cat``) and never writes into the old ones.
    """

    def __init__(self, model, ids, h2o_scores: bool = True):
        # SDPA prefill; "h2o" also records H2O's prefill scores (a dense S x S softmax per layer:
        # most of the prefill's time at 8K), which only the H2O baseline reads
        set_method(model, "h2o" if h2o_scores else "dense", 8)
        self.cache = SparQCache(config=model.config)
        self.last_logits = prefill(model, ids, self.cache)
        self.length = ids.shape[1]
        self.sums = {i: layer.value_sum.clone() for i, layer in enumerate(self.cache.layers)
                     if isinstance(layer, SparQCacheLayer)}
        self.dense_layers = {i: dict(vars(layer)) for i, layer in enumerate(self.cache.layers)
                             if not isinstance(layer, SparQCacheLayer)}

    def fresh(self):
        for i, layer in enumerate(self.cache.layers):
            if i in self.dense_layers:
                vars(layer).update(self.dense_layers[i])
                continue
            extra = layer.get_seq_length() - self.length
            if extra:
                layer.crop(-extra)
            layer.value_sum.copy_(self.sums[i])
        reset_h2o_state(self.cache)
        return self.cache
