"""sparq_ext: SparQ Attention (arXiv 2312.04985) as a PyTorch C++/CUDA extension.

``sparq_ext.attention(query, key, value, r=..., k=...)`` runs one bandwidth-efficient decode
step; ``sparq_ext.paged_attention`` the same over a paged KV cache (block table, as in vLLM).
The compiled kernels are used where built; otherwise a pure-torch implementation runs.
"""

from .budget import rk_for_ratio, transfer_bytes
from .cache import SparQCache, SparQCacheLayer
from .ops import (
    attention,
    check_attention_inputs,
    check_paged_attention_inputs,
    extension_error,
    has_native_kernel,
    paged_attention,
)
from .reference import (
    key_channel_std,
    paged_attention_reference,
    quantize_key_t,
    sparq_attention_reference,
)
from .split import Split, saved_splits

__version__ = "0.1.0"

__all__ = [
    "SparQCache",
    "SparQCacheLayer",
    "Split",
    "attention",
    "check_attention_inputs",
    "check_paged_attention_inputs",
    "extension_error",
    "has_native_kernel",
    "key_channel_std",
    "paged_attention",
    "paged_attention_reference",
    "quantize_key_t",
    "rk_for_ratio",
    "saved_splits",
    "sparq_attention_reference",
    "transfer_bytes",
]
