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
from ..cache import SparQCache
from ..integrations.transformers import SparQSettings, disable_sparq, enable_sparq
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


def bytes_fraction(method: str, ratio: float, seq_len: int, head_dim: int, kv_heads: int, n_layers: int,
                   split_file=DEFAULT_SPLIT) -> float:
    """KV-cache bytes read per decode step relative to dense at ``seq_len`` (mean over layers)."""
    if method == "dense":
        return 1.0
    settings = method_settings(method, ratio, split_file)
    if not method.startswith("sparq"):
        return budget_positions(settings, seq_len, head_dim) / seq_len
    fractions = []
    for layer in range(n_layers):
        r, k, _ = settings.resolve(seq_len, head_dim, layer)
        tb = transfer_bytes(1, kv_heads, seq_len, head_dim, r, k, dtype=torch.float32, query_heads=kv_heads)
        query_and_output = 2 * kv_heads * head_dim * 4
        fractions.append((tb["sparq"] - query_and_output) / (tb["dense"] - query_and_output))
    return sum(fractions) / len(fractions)


class PrefilledCache:
    """One dense prefill reused by every method: :meth:`fresh` crops the cache back to the prompt
    and restores its V sums (and forgets H2O's decode state)."""

    def __init__(self, model, ids, h2o_scores: bool = True):
        # SDPA prefill; "h2o" also records H2O's prefill scores (a dense S x S softmax per layer:
        # most of the prefill's time at 8K), which only the H2O baseline reads
        set_method(model, "h2o" if h2o_scores else "dense", 8)
        self.cache = SparQCache(config=model.config)
        self.last_logits = prefill(model, ids, self.cache)
        self.length = ids.shape[1]
        self.sums = [layer.value_sum.clone() for layer in self.cache.layers]

    def fresh(self):
        for layer, saved in zip(self.cache.layers, self.sums):
            extra = layer.get_seq_length() - self.length
            if extra:
                layer.crop(-extra)
            layer.value_sum.copy_(saved)
        reset_h2o_state(self.cache)
        return self.cache
