"""One-call SparQ decoding for Hugging Face ``transformers`` models: :func:`enable_sparq`.

Supported: ``transformers >= 5.0, < 6`` (developed and tested on 5.23), decoder models whose
attention goes through the library's attention-function interface (Llama, Mistral, Qwen2,
SmolLM, ... — anything calling ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)``)
with full (not sliding-window) attention layers.

How it plugs in, without patching model code:

* ``AttentionInterface.register("sparq", sparq_attention_forward)`` and
  ``AttentionMaskInterface.register("sparq", sdpa_mask)`` (so the model builds SDPA-style boolean
  masks for us), then ``model.set_attn_implementation("sparq")``.
* Prefill (more than one query position) runs the library's SDPA function unchanged. A decode
  step (one query position) runs :func:`sparq_ext.attention`.
* ``generate`` creates its cache in ``_prepare_cache_for_generation``; :func:`enable_sparq`
  wraps that method on this model instance (the one place where the library offers no hook) to
  hand out a :class:`sparq_ext.SparQCache` instead of a ``DynamicCache``. A cache passed by the
  caller is used as given: with a ``SparQCache`` the decode step reads its ``key_t`` and running
  value sum; with any other cache it still runs SparQ, computing those from ``K`` and ``V``.
"""

from __future__ import annotations

import dataclasses
import types

import torch

from ..budget import rk_for_ratio
from ..cache import SparQCache
from ..ops import attention as sparq_attention

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:  # pragma: no cover
    raise ImportError("sparq_ext.integrations.transformers needs transformers>=5.0 "
                      "(pip install 'transformers>=5,<6')") from error

SUPPORTED_TRANSFORMERS = ">=5.0,<6"
ATTN_NAME = "sparq"


@dataclasses.dataclass
class SparQSettings:
    """What a decode step uses. ``r``/``k`` fixed if given, else from ``ratio`` and the length."""

    ratio: float = 8.0
    r: int | None = None
    k: int | None = None
    local_window: int | None = None  # None: k // 4 (the paper's setting)
    min_k: int = 0  # floor on the ratio-derived k (short contexts); min_k >= S means dense

    def resolve(self, seq_len: int, head_dim: int) -> tuple[int, int, int]:
        r0, k0 = rk_for_ratio(self.ratio, seq_len, head_dim)
        r = min(self.r if self.r is not None else r0, head_dim)
        k = self.k if self.k is not None else max(k0, self.min_k)
        window = k // 4 if self.local_window is None else min(self.local_window, k)
        return r, k, window


_DEFAULT_SETTINGS = SparQSettings()


def hf_mask_to_bool(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """A 4D HF mask ``(B, 1, Q, S')`` (bool, or float additive) -> bool ``(B, 1, 1, S)`` of the last query."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"expected a 4D attention mask, got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, :1, -1:, :kv_len]
    if mask.shape[-1] != kv_len:
        raise ValueError(f"attention mask covers {mask.shape[-1]} keys, the cache holds {kv_len}")
    if mask.dtype != torch.bool:  # additive: 0 where allowed, a very negative number where not
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def sparq_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            **kwargs):
    """``AttentionInterface`` function: SDPA for prefill, SparQ for a one-token decode step.

    ``query`` ``(B, Hq, Q, D)``, ``key``/``value`` ``(B, Hkv, S, D)`` as returned by the cache;
    returns ``((B, Q, Hq, D), None)`` like the library's SDPA function.
    """
    layer = getattr(key, "_sparq_layer", None)  # set by SparQCacheLayer.update on the view it returns
    if query.shape[2] != 1 or module.training:
        if layer is not None and attention_mask is not None:
            # Padding (left, from generate) must not count in the running mean of V.
            layer.set_valid(hf_mask_to_bool(attention_mask, key.shape[2])[:, 0, 0, :])
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    settings = getattr(module, "_sparq_settings", None) or _DEFAULT_SETTINGS
    mask = hf_mask_to_bool(attention_mask, key.shape[2])
    if layer is not None and mask is not None:
        layer.set_last_valid(mask[:, 0, 0, -1])
    r, k, window = settings.resolve(key.shape[2], query.shape[-1])
    with torch.no_grad():
        out = sparq_attention(
            query, key, value, r=r, k=k,
            key_t=layer.key_t if layer is not None else None,
            value_mean=layer.value_mean() if layer is not None else None,
            attn_mask=mask, local_window=window, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = ATTN_NAME, fn=sparq_attention_forward) -> None:
    """Register an attention function (and SDPA-style masks for it) under ``name``."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def _attention_modules(model):
    """Modules that call the attention interface: they carry ``layer_idx`` and the model config."""
    return [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "config") and type(m).__name__.endswith("Attention")]


def _wrap_cache_preparation(model):
    """Make ``generate`` create a :class:`SparQCache` where it would create a ``DynamicCache``."""
    original = model._prepare_cache_for_generation

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        result = original(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache).__name__ == "DynamicCache" and not getattr(cache, "_is_user_defined", False) \
                and cache.get_seq_length() == 0:
            model_kwargs["past_key_values"] = SparQCache(config=self.config)
        return result

    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)


def enable_sparq(model, ratio: float = 8, local_window: int | None = None, r: int | None = None,
                 k: int | None = None, *, min_k: int = 0, attn_name: str = ATTN_NAME, attn_fn=None):
    """Run every one-token decode step of ``model`` with SparQ attention; returns ``model``.

    Args:
        ratio: compression ratio; ``r = D/ratio`` and ``k = S/(2·ratio)`` at the current length
            ``S`` (:func:`sparq_ext.rk_for_ratio`) unless ``r``/``k`` are given.
        local_window: positions always attended (inside ``k``); default ``k // 4``.
        r, k: fix the rank and the number of attended positions instead of following ``ratio``.
        min_k: floor on the ratio-derived ``k``: at short lengths ``S/(2·ratio)`` is a handful of
            positions and attention is cheap anyway (the CLI demo uses 64). ``min_k >= S`` is dense.
        attn_name, attn_fn: register a different decode function under another name (the
            benchmarks use this for baselines); the default is SparQ.

    Prefill stays on SDPA. ``model.generate`` uses a :class:`sparq_ext.SparQCache` (unless a cache
    is passed in). :func:`disable_sparq` restores the previous attention implementation.
    """
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio!r}")
    for name, value in (("r", r), ("k", k), ("local_window", local_window), ("min_k", min_k)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < (0 if name in ("local_window", "min_k") else 1)):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules using the attention interface")
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"enable_sparq supports full-attention layers only, got layer_types {set(layer_types)}")
    register(attn_name, attn_fn or sparq_attention_forward)
    if not hasattr(model, "_sparq_previous_attn"):
        model._sparq_previous_attn = model.config._attn_implementation
        _wrap_cache_preparation(model)
    settings = SparQSettings(ratio=ratio, r=r, k=k, local_window=local_window, min_k=min_k)
    for module in modules:
        module._sparq_settings = settings
    model.set_attn_implementation(attn_name)
    return model


def disable_sparq(model):
    """Undo :func:`enable_sparq`: the previous attention implementation and ``generate``'s own cache."""
    previous = getattr(model, "_sparq_previous_attn", None)
    if previous is None:
        return model
    model.set_attn_implementation(previous)
    for module in _attention_modules(model):
        if hasattr(module, "_sparq_settings"):
            del module._sparq_settings
    if "_prepare_cache_for_generation" in vars(model):
        del model._prepare_cache_for_generation
    del model._sparq_previous_attn
    return model


def sparq_settings(model) -> SparQSettings | None:
    """The settings :func:`enable_sparq` installed on ``model``, or ``None``."""
    modules = _attention_modules(model)
    return getattr(modules[0], "_sparq_settings", None) if modules else None


__all__ = ["SUPPORTED_TRANSFORMERS", "SparQSettings", "disable_sparq", "enable_sparq",
           "hf_mask_to_bool", "register", "sparq_attention_forward", "sparq_settings"]
