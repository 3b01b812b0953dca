"""One-call SparQ decoding for Hugging Face ``transformers`` models: :func:`enable_sparq`.

Supported: ``transformers >= 5.0, < 6`` (developed on 5.23, tested on 5.23 and 5.24), decoder models whose
attention goes through the library's attention-function interface (Llama, Mistral, Qwen2/3, Gemma,
Gemma 3, Cohere 2, ... — anything calling ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)``).
Full-attention layers run SparQ; sliding-window layers of hybrid models stay on the library's SDPA
attention and cache layers (their cost is bounded by the window). Logit softcapping (Gemma 2) and
attention sinks (gpt-oss) are passed to the operator (``softcap``, ``sinks``); their dense steps
(prefill, sliding-window layers) run the model's own eager attention, since SDPA has neither.
Attention that SparQ does not reproduce (latent or chunked attention, non-softmax layers) is
refused by :func:`enable_sparq`, naming the feature and the layer (:data:`UNSUPPORTED_ATTENTION`).

How it plugs in, without patching model code:

* ``AttentionInterface.register("sparq", sparq_attention_forward)`` and
  ``AttentionMaskInterface.register("sparq", sdpa_mask)`` (so the model builds SDPA-style boolean
  masks for us), then ``model.set_attn_implementation("sparq")``.
* Prefill (more than one query position) runs the library's SDPA function unchanged. A decode
  step (one query position) of a full-attention layer asks the layer's :class:`SparQSettings` for
  ``(r, k, local_window)`` at the current length and runs :func:`sparq_ext.attention`; every step
  of a sliding-window layer runs SDPA.
* The auto split is calibrated in one explicit place: :func:`calibrate_split` (or, when
  ``enable_sparq(split="auto")`` gets no split, the first long enough prefill, through the one
  hook :meth:`SparQSettings.observe_prefill`).
* ``generate`` creates its cache in ``_prepare_cache_for_generation``; :func:`enable_sparq`
  wraps that method on this model instance (the one place where the library offers no hook) to
  hand out a :class:`sparq_ext.SparQCache` (``SparQCacheLayer`` for the full-attention layers, the
  library's own layers for the others) instead of a ``DynamicCache``. A cache passed by the
  caller is used as given: with a ``SparQCache`` the decode step reads its ``key_t`` and running
  value sum; with any other cache it still runs SparQ, computing those from ``K`` and ``V``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import types
import warnings

import torch

from ..budget import rk_for_ratio
from ..cache import SPARQ_LAYER_TYPE, SparQCache, attention_layer_types, check_component_rule
from ..calibrate import CRITERIA, MIN_CALIBRATION_POSITIONS, PrefillCalibrator, default_position_count
from ..ops import attention as sparq_attention
from ..reference import key_channel_std
from ..split import Split

try:
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
    """What a decode step reads: the one object asked for ``(r, k, local_window)`` per layer and length.

    ``r``/``k`` fixed when given; otherwise from ``ratio``: the paper's even split
    (:func:`sparq_ext.rk_for_ratio`), or, with a calibrated ``split``, the layer's ``r`` and ``k``
    on the layer's budget at the nearest calibration length (:meth:`sparq_ext.Split.layer_rk`;
    layers the split does not cover stay even). ``calibrator``: set while an auto split waits for
    its first long enough prefill (:meth:`observe_prefill`).
    """

    ratio: float = 8.0
    r: int | None = None
    k: int | None = None
    local_window: int | None = None  # None: k // 4 (the paper's setting)
    min_k: int = 0  # floor on the ratio-derived k (short contexts); min_k >= S means dense
    split: Split | None = None  # None: the even split
    calibrator: PrefillCalibrator | None = None
    key_t_dtype: torch.dtype | None = None  # an engine's selection cache (vLLM pages); None: full K
    component_rule: str = "query"  # step 1's components: "query" (largest |q|) or "key_std"

    def resolve(self, seq_len: int, head_dim: int, layer_idx: int | None = None, *, dtype=None,
                key_t_dtype=None) -> tuple[int, int, int]:
        """``(r, k, local_window)`` for ``layer_idx`` at ``seq_len`` positions. ``key_t_dtype``
        ``torch.int8`` (the layer's cache holds the 8-bit selection cache; ``dtype`` the cache's):
        the even split of those bytes (:func:`sparq_ext.rk_for_ratio`)."""
        r0, k0 = rk_for_ratio(self.ratio, seq_len, head_dim, dtype=dtype, key_t_dtype=key_t_dtype)
        if self.split is not None and layer_idx is not None:
            r0, k0 = self.split.layer_rk(layer_idx, seq_len, head_dim) or (r0, k0)
        r = min(self.r if self.r is not None else r0, head_dim)
        k = self.k if self.k is not None else max(k0, self.min_k)
        window = k // 4 if self.local_window is None else min(self.local_window, k)
        return r, k, window

    def observe_prefill(self, layer_idx, query, key, value, attention_mask, scaling) -> None:
        """The calibration hook: score this layer from its prefill (batch row 0, or the longest
        row of a left-padded batch); once every layer is scored, the split is in place."""
        if self.calibrator is None or layer_idx is None:
            return
        Q, S = query.shape[2], key.shape[2]
        if Q != S:  # a chunk of a longer prefill: its queries do not start at key position 0
            return
        row, start = 0, 0
        if attention_mask is not None and query.shape[0] > 1:
            counts = hf_mask_to_bool(attention_mask, S)[:, 0, 0, :].sum(-1)  # valid keys per row
            row = int(counts.argmax())
            start = S - int(counts[row])  # left padding
        self.calibrator.observe(layer_idx, query[row, :, start:], key[row, :, start:], value[row, :, start:],
                                scale=scaling)
        if self.calibrator.done:
            self.split = Split(self.ratio, {self.calibrator.seq_len: self.calibrator.layers},
                               {"criterion": self.calibrator.criterion or "mass",
                                "calibration_seconds": self.calibrator.seconds})
            self.calibrator = None


_DEFAULT_SETTINGS = SparQSettings()

# Layers that stay on the library's attention and cache: their cost is bounded by the window.
DENSE_LAYER_TYPES = ("sliding_attention",)


def _latent(module, config):  # DeepSeek V2/V3: keys and values decompressed from a shared latent
    rank = getattr(config, "kv_lora_rank", None)
    return None if rank is None else f"multi-head latent attention (kv_lora_rank={rank})"


# What a layer's attention may do beyond softmax(q·Kᵀ·scale)·V that SparQ does not reproduce yet:
# (probe of the layer's module and text config -> a description of what the layer uses, or None;
# the attention-interface keyword that carries it at run time, or None). enable_sparq refuses a model
# on which any probe finds something, and sparq_attention_forward refuses the keyword. Supporting a
# feature is one change here: delete its row and pass its value to sparq_ext.attention.
# (Logit softcapping, keyword `softcap`, and attention sinks, keyword `s_aux`, were rows here; the
# operator has both now: sparq_attention_forward passes them on.)
UNSUPPORTED_ATTENTION = (
    (_latent, None),
)

# Layer types other than full and sliding-window softmax attention over the layer's own cache.
_UNSUPPORTED_LAYER_TYPES = {
    "chunked_attention": "chunked attention (attention_chunk_size)",
    "linear_attention": "linear attention (no softmax; a recurrent state, not a KV cache)",
    "dummy": "no KV cache of its own (KV sharing across layers, or no attention)",
}


def _refusal(layer_idx, what):
    return ValueError(f"enable_sparq: layer {layer_idx} uses {what}, which sparq_ext does not reproduce yet "
                      "(full-attention layers run SparQ, sliding-window layers SDPA)")


def sparq_layers(model) -> list[int]:
    """The layers of ``model`` whose decode steps :func:`enable_sparq` runs with SparQ: its
    full-attention layers. Raises ``ValueError`` naming the layer and the feature when any attention
    layer does something SparQ does not reproduce (:data:`UNSUPPORTED_ATTENTION`, layer types other
    than full and sliding-window attention)."""
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules using the attention interface")
    config = model.config.get_text_config(decoder=True)
    layer_types = attention_layer_types(config)
    for layer_idx, layer_type in enumerate(layer_types):
        if layer_type != SPARQ_LAYER_TYPE and layer_type not in DENSE_LAYER_TYPES:
            raise _refusal(layer_idx, _UNSUPPORTED_LAYER_TYPES.get(layer_type, f"layer type {layer_type!r}"))
    for module in modules:
        if not 0 <= module.layer_idx < len(layer_types):
            raise ValueError(f"attention module {type(module).__name__} has layer_idx {module.layer_idx}, the "
                             f"config describes {len(layer_types)} layers")
    # the layers that would run SparQ first: their refusal is the one that matters most
    for module in sorted(modules, key=lambda m: (layer_types[m.layer_idx] != SPARQ_LAYER_TYPE, m.layer_idx)):
        for probe, _ in UNSUPPORTED_ATTENTION:
            what = probe(module, config)
            if what is not None:
                raise _refusal(module.layer_idx, what)
    return sorted({m.layer_idx for m in modules if layer_types[m.layer_idx] == SPARQ_LAYER_TYPE})


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


def _dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """A step enable_sparq keeps dense: the library's SDPA function, or, for a layer with logit
    softcapping or attention sinks (which SDPA does not have: it refuses ``softcap`` and drops
    ``s_aux``), the eager attention of the layer's own modeling module, on an additive mask."""
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"sparq_attention_forward: layer {getattr(module, 'layer_idx', '?')} passes softcap or "
                         f"s_aux, and {type(module).__module__} has no eager_attention_forward to run its dense "
                         "steps with")
    Q, S = query.shape[2], key.shape[2]
    if attention_mask is None:  # sdpa_mask leaves out a plain causal mask (SDPA's is_causal): build it
        allowed = torch.ones(Q, S, dtype=torch.bool, device=query.device).tril(S - Q)[None, None]
    else:
        allowed = attention_mask
    if allowed.dtype == torch.bool:  # eager attention adds the mask to the logits
        allowed = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, allowed, dropout=dropout, scaling=scaling, **kwargs)


def sparq_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            **kwargs):
    """``AttentionInterface`` function: SDPA for prefill, SparQ for a one-token decode step.

    ``query`` ``(B, Hq, Q, D)``, ``key``/``value`` ``(B, Hkv, S, D)`` as returned by the cache;
    returns ``((B, Q, Hq, D), None)`` like the library's SDPA function. ``softcap`` (Gemma 2) and
    ``s_aux`` (gpt-oss's sinks) go to the operator as ``softcap`` and ``sinks``; dense steps with
    either run the model's eager attention (:func:`_dense_attention`).
    """
    settings = getattr(module, "_sparq_settings", _DEFAULT_SETTINGS)
    if settings is None or kwargs.get("sliding_window") is not None:
        # a layer enable_sparq keeps dense (a sliding window: its cost is bounded by the window)
        return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer = getattr(key, "_sparq_layer", None)  # set by SparQCacheLayer.update on the view it returns
    layer_idx = getattr(module, "layer_idx", None)
    if query.shape[2] != 1 or module.training:
        if layer is not None and attention_mask is not None:
            # Padding (left, from generate) must not count in the running mean of V.
            layer.set_valid(hf_mask_to_bool(attention_mask, key.shape[2])[:, 0, 0, :])
        if not module.training:
            settings.observe_prefill(layer_idx, query, key, value, attention_mask, scaling)
        return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    mask = hf_mask_to_bool(attention_mask, key.shape[2])
    if layer is not None and mask is not None:
        layer.set_last_valid(mask[:, 0, 0, -1])
    key_t_dtype = layer.key_t_dtype if layer is not None else None
    r, k, window = settings.resolve(key.shape[2], query.shape[-1], layer_idx, dtype=key.dtype,
                                    key_t_dtype=key_t_dtype)
    sinks = kwargs.get("s_aux")  # gpt-oss: the module's `sinks` parameter, in the model's dtype
    weights = None
    if settings.component_rule == "key_std":  # from the cache's running sums; else a full read
        valid = None if mask is None else mask.expand(key.shape[0], 1, 1, key.shape[2])[:, 0, 0, :]
        weights = layer.key_std() if layer is not None else key_channel_std(key, valid)
    with torch.no_grad():
        out = sparq_attention(
            query, key, value, r=r, k=k,
            key_t=layer.key_t if layer is not None else None,
            key_t_scale=layer.key_t_scale if layer is not None else None,
            value_mean=layer.value_mean() if layer is not None else None,
            attn_mask=mask, local_window=window, scale=scaling, softcap=kwargs.get("softcap"),
            sinks=None if sinks is None else sinks.detach().to(device=query.device, dtype=torch.float32),
            component_weights=weights)
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
        # transformers >= 5.24 keeps the cache under "cache", earlier 5.x under "past_key_values"
        for name in ("cache", "past_key_values"):
            cache = model_kwargs.get(name)
            if type(cache).__name__ == "DynamicCache" and not getattr(cache, "_is_user_defined", False) \
                    and cache.get_seq_length() == 0:
                model_kwargs[name] = SparQCache(config=self.config,
                                                key_t_dtype=getattr(self, "_sparq_key_t_dtype", None))
        return result

    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)


def _check_count(name, value, minimum):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ValueError(f"{name} must be an int >= {minimum} or None, got {value!r}")


def enable_sparq(model, ratio: float = 8, local_window: int | None = None, r: int | None = None,
                 k: int | None = None, *, min_k: int = 0, split: str = "even",
                 split_file: str | os.PathLike | Split | None = None, key_t_dtype=None,
                 component_rule: str = "query", attn_name: str = ATTN_NAME, attn_fn=None):
    """Run every one-token decode step of ``model`` with SparQ attention; returns ``model``.

    Args:
        ratio: compression ratio: a decode step reads about ``1/ratio`` of dense attention's bytes.
        local_window: positions always attended (inside ``k``); default ``k // 4``.
        r, k: fix the rank and the number of attended positions instead of following ``ratio``
            (they win over any split).
        min_k: floor on the ratio-derived ``k``: at short lengths ``S/(2·ratio)`` is a handful of
            positions and attention is cheap anyway (the CLI demo uses 64). ``min_k >= S`` is dense.
        split: how the ratio's bytes are spent between SparQ's two reads. ``"even"`` (the default):
            the paper's ``r = D/ratio``, ``k = S/(2·ratio)`` in every layer. ``"auto"``: a calibrated
            per-layer split (docs/auto-split.md) from ``split_file``; without one, the first
            prefill of at least 64 positions calibrates it (slower prefill, and the split depends
            on that prompt: prefer a saved split or :func:`calibrate_split`).
        split_file: with ``split="auto"``: the name of a saved split (:func:`sparq_ext.saved_splits`,
            e.g. ``"smollm2-135m"``), the path of a JSON written by :meth:`sparq_ext.Split.save`, or
            the :class:`sparq_ext.Split` that :func:`calibrate_split` returned. Its ratio must equal
            ``ratio``, and its layers may not spend more than the ratio's budget (checked).
        key_t_dtype: ``torch.int8``: the :class:`sparq_ext.SparQCache` that ``generate`` makes keeps
            the 8-bit selection cache (``D + 4`` bytes per token and KV head instead of a second
            copy of the keys), and the even split spends the ratio's bytes on it (a larger ``r``,
            docs/design.md); ``None`` (the default): a copy in the model's dtype. Not with
            ``split="auto"`` (the splits are calibrated for a full-precision copy).
        component_rule: how step 1 picks its ``r`` query components. ``"query"`` (the default,
            the paper's rule): the largest ``|q_i|``. ``"key_std"``: the largest ``|q_i|`` times
            key channel ``i``'s standard deviation over the cached positions (which the
            :class:`sparq_ext.SparQCache` keeps as running sums, no extra reads per position):
            a channel whose keys are large but nearly constant moves every logit alike and ranks
            nothing. Same bytes per step; docs/accuracy.md has what it buys.
        attn_name, attn_fn: register a different decode function under another name (the accuracy
            benchmark's baselines use this); the default is SparQ.

    Prefill stays on SDPA, and so do sliding-window layers (:func:`sparq_layers` lists the layers that
    run SparQ; the ratio's budget and an auto split cover those); on layers with logit softcapping or
    attention sinks (Gemma 2, gpt-oss), which SDPA lacks, those dense steps run the model's eager
    attention. Models whose attention SparQ does
    not reproduce raise ``ValueError`` naming the feature and the layer. ``model.generate`` uses a
    :class:`sparq_ext.SparQCache` (unless a cache is passed in). :func:`disable_sparq` restores the
    previous attention implementation.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(f"ratio must be a number > 0, got {ratio!r}")
    _check_count("r", r, 1)
    _check_count("k", k, 1)
    _check_count("local_window", local_window, 0)
    _check_count("min_k", min_k, 0)
    if split not in ("even", "auto"):
        raise ValueError(f"split must be 'even' or 'auto', got {split!r}")
    if split_file is not None and split != "auto":
        raise ValueError("split_file needs split='auto'")
    if key_t_dtype not in (None, torch.int8):
        raise ValueError(f"key_t_dtype must be None or torch.int8, got {key_t_dtype!r}")
    check_component_rule(component_rule)
    if key_t_dtype is not None and split == "auto":
        raise ValueError("key_t_dtype=torch.int8 is not calibrated for split='auto' (a split's r and k "
                         "are on a full-precision copy's budget): use split='even'")
    layers = sparq_layers(model)
    modules = _attention_modules(model)
    if not layers:
        warnings.warn(f"{type(model).__name__} has no full-attention layer (all its layers use a sliding "
                      "window): enable_sparq changes nothing", stacklevel=2)
    settings = SparQSettings(ratio=float(ratio), r=r, k=k, local_window=local_window, min_k=min_k,
                             component_rule=component_rule)
    if split == "auto" and split_file is not None:
        settings.split = split_file if isinstance(split_file, Split) else Split.load(split_file, ratio=ratio)
        where = f"split_file {split_file if not isinstance(split_file, Split) else '(Split)'}"
        if settings.split.ratio != float(ratio):
            raise ValueError(f"{where} was calibrated for ratio {settings.split.ratio:g}, not {ratio:g}")
        head_dim = getattr(modules[0], "head_dim", None)
        if head_dim is not None:
            settings.split.check(head_dim, source=where, layers=layers)
    elif split == "auto" and r is None and layers:
        settings.calibrator = PrefillCalibrator(ratio, len(layers))  # scores the SparQ layers only
    register(attn_name, attn_fn or sparq_attention_forward)
    if not hasattr(model, "_sparq_previous_attn"):
        model._sparq_previous_attn = model.config._attn_implementation
        _wrap_cache_preparation(model)
    model._sparq_key_t_dtype = key_t_dtype  # read by the wrapped cache preparation
    for module in modules:  # None: the layer stays on SDPA
        module._sparq_settings = settings if module.layer_idx in layers else None
    model.set_attn_implementation(attn_name)
    return model


def calibrate_split(model, input_ids, ratio: float = 8, path: str | os.PathLike | None = None,
                    attention_mask=None, lengths=None, positions: int | None = None,
                    criterion: str | None = None) -> Split:
    """Calibrate an auto split of ``model``'s SparQ layers (:func:`sparq_layers`: the full-attention
    ones) at ``ratio`` from prefills of ``input_ids``; returns it (and writes it to ``path`` when
    given) for ``enable_sparq(model, ratio, split="auto", split_file=...)``.

    ``lengths``: calibrate once per context length ``L`` (a prefill of the first ``L`` tokens each,
    all ``<= input_ids.shape[-1]``; default: one prefill of all of them); decoding uses the entry of
    the calibration length nearest to its own, because the best split moves with the length. Use a
    few thousand tokens of text like the model's inputs. ``positions``: query positions sampled per
    layer (default by length: :func:`sparq_ext.calibrate.default_position_count`); ``criterion``: what
    the split minimises (:data:`sparq_ext.calibrate.CRITERIA`, default ``"mass"``). Each prefill runs
    on SDPA without a cache; ``model``'s attention setup is restored afterwards. The split's
    ``meta`` records the calibration and prefill seconds.
    """
    if criterion is not None and criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    n_tokens = int(input_ids.shape[-1])
    lengths = sorted({int(n) for n in lengths}) if lengths is not None else [n_tokens]
    if not lengths or lengths[0] < MIN_CALIBRATION_POSITIONS or lengths[-1] > n_tokens:
        raise ValueError(f"lengths must lie in [{MIN_CALIBRATION_POSITIONS}, {n_tokens}] (the tokens of "
                         f"input_ids), got {lengths}")
    layers = sparq_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no full-attention layer to calibrate")
    modules = _attention_modules(model)
    previous = [getattr(m, "_sparq_settings", None) for m in modules]
    was_enabled = hasattr(model, "_sparq_previous_attn")
    previous_attn = model.config._attn_implementation
    entries, calibration, prefill = {}, 0.0, 0.0
    try:
        for length in lengths:
            enable_sparq(model, ratio=ratio, split="auto")
            calibrator = PrefillCalibrator(ratio, len(layers), positions=positions, criterion=criterion)
            sparq_settings(model).calibrator = calibrator  # the settings object all SparQ layers share
            t0 = time.perf_counter()
            with torch.no_grad():
                model(input_ids=input_ids[..., :length], use_cache=False,
                      attention_mask=None if attention_mask is None else attention_mask[..., :length])
            prefill += time.perf_counter() - t0 - calibrator.seconds
            calibration += calibrator.seconds
            entries[length] = calibrator.layers
    finally:
        if was_enabled:
            for module, saved in zip(modules, previous):
                module._sparq_settings = saved
            model.set_attn_implementation(previous_attn)
        else:
            disable_sparq(model)
    missing = [length for length, layers in entries.items() if layers is None]
    if missing:
        raise RuntimeError(f"calibration did not reach every full-attention layer at lengths {missing}")
    meta = {"model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "criterion": criterion or "mass",
            "positions": {str(length): positions or default_position_count(length) for length in entries},
            "calibration_seconds": calibration, "prefill_seconds": prefill}
    split = Split(float(ratio), entries, meta)
    if path is not None:
        split.save(path)
    return split


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
    if hasattr(model, "_sparq_key_t_dtype"):
        del model._sparq_key_t_dtype
    return model


def sparq_settings(model) -> SparQSettings | None:
    """The settings :func:`enable_sparq` installed on ``model`` (shared by all its SparQ layers), or ``None``."""
    return next((m._sparq_settings for m in _attention_modules(model)
                 if getattr(m, "_sparq_settings", None) is not None), None)


__all__ = ["DENSE_LAYER_TYPES", "SUPPORTED_TRANSFORMERS", "UNSUPPORTED_ATTENTION", "SparQSettings", "calibrate_split",
           "disable_sparq", "enable_sparq", "hf_mask_to_bool", "register", "sparq_attention_forward", "sparq_layers",
           "sparq_settings"]
