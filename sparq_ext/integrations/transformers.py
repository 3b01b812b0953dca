"""One-call SparQ decoding for Hugging Face ``transformers`` models: :func:`enable_sparq`.

Supported: ``transformers >= 5.0, < 6`` (developed on 5.23, tested on 5.23 and 5.24), decoder models whose
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
import os
import time
import types

import torch

from ..budget import rk_for_ratio
from ..cache import SparQCache
from ..calibrate import (BUDGETS, CRITERIA, DEFAULT_BUDGET, DEFAULT_CRITERION, allocate_budget,
                         check_position_count, check_split, choose_layer_split, default_position_count,
                         k_on_budget, layer_ratio, load_length_splits, load_split, nearest_length, save_split)
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
    """What a decode step uses. ``r``/``k`` fixed if given, else from ``ratio`` and the length.

    ``split``: how the ratio's byte budget is shared between the two reads when ``r``/``k`` are
    not given. ``"even"``: the paper's ``r = D/ratio``, ``k = S/(2 ratio)``. ``"auto"``: per
    layer, ``r = layer_r[layer_idx]`` (calibrated, :mod:`sparq_ext.calibrate`) and ``k`` the
    rest of the layer's budget (:func:`sparq_ext.calibrate.k_on_budget`) at the layer's ratio
    ``layer_ratio.get(layer_idx, ratio)``; a layer not (yet) calibrated uses the even split.
    With ``length_splits`` (``{L: (layer_r, layer_ratio)}``, a split calibrated at several
    context lengths) a step uses the split of the calibration length nearest to its own.
    """

    ratio: float = 8.0
    r: int | None = None
    k: int | None = None
    local_window: int | None = None  # None: k // 4 (the paper's setting)
    min_k: int = 0  # floor on the ratio-derived k (short contexts); min_k >= S means dense
    split: str = "even"
    layer_r: dict = dataclasses.field(default_factory=dict)  # {layer_idx: r} for split="auto"
    layer_ratio: dict = dataclasses.field(default_factory=dict)  # {layer_idx: rho_l}; absent: ratio
    budget: str = DEFAULT_BUDGET  # calibration: "model" (layers share the budget) or "layer"
    n_layers: int = 0  # attention layers of the model (budget="model" allocates once all are scored)
    layer_options: dict = dataclasses.field(default_factory=dict)  # {layer_idx: choose_layer_split()}
    length_splits: dict = dataclasses.field(default_factory=dict)  # {L: (layer_r, layer_ratio)}
    calibration_positions: int | None = None  # sampled query positions per layer; None: by length
    calibration_criterion: str | None = None  # sparq_ext.calibrate.CRITERIA; None: the default
    calibration_seconds: float = 0.0  # time spent calibrating (all layers)

    def resolve(self, seq_len: int, head_dim: int, layer_idx: int | None = None) -> tuple[int, int, int]:
        r0, k0 = rk_for_ratio(self.ratio, seq_len, head_dim)
        layer_r, layer_ratios = self.layer_r, self.layer_ratio
        if self.length_splits:
            layer_r, layer_ratios = self.length_splits[nearest_length(self.length_splits, seq_len)]
        if self.split == "auto" and layer_idx in layer_r:
            r0 = layer_r[layer_idx]
            k0 = k_on_budget(layer_ratios.get(layer_idx, self.ratio), seq_len, head_dim, r0)
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
        settings = getattr(module, "_sparq_settings", None)
        if settings is not None and settings.split == "auto" and not module.training:
            _calibrate_layer(module, settings, query, key, value, attention_mask, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    settings = getattr(module, "_sparq_settings", None) or _DEFAULT_SETTINGS
    mask = hf_mask_to_bool(attention_mask, key.shape[2])
    if layer is not None and mask is not None:
        layer.set_last_valid(mask[:, 0, 0, -1])
    r, k, window = settings.resolve(key.shape[2], query.shape[-1], getattr(module, "layer_idx", None))
    with torch.no_grad():
        out = sparq_attention(
            query, key, value, r=r, k=k,
            key_t=layer.key_t if layer is not None else None,
            value_mean=layer.value_mean() if layer is not None else None,
            attn_mask=mask, local_window=window, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _calibrate_layer(module, settings, query, key, value, attention_mask, scaling):
    """Choose this layer's ``r`` from its prefill (once): batch row 0, or the longest row.

    With ``budget="model"`` the layer's options are kept until every layer has them (the end of
    the prefill); then :func:`sparq_ext.calibrate.allocate_budget` shares the budget out.
    """
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None or layer_idx in settings.layer_r or layer_idx in settings.layer_options \
            or settings.r is not None:
        return
    Q, S = query.shape[2], key.shape[2]
    if Q != S:  # a chunk of a longer prefill: its queries do not start at key position 0
        return
    row, start = 0, 0
    if attention_mask is not None and query.shape[0] > 1:
        valid = hf_mask_to_bool(attention_mask, S)[:, 0, 0, :]  # (B, S) of the last query
        counts = valid.sum(-1)
        row = int(counts.argmax())
        start = S - int(counts[row])  # left padding
    t0 = time.perf_counter()
    with torch.no_grad():
        choice = choose_layer_split(query[row, :, start:], key[row, :, start:], value[row, :, start:],
                                    settings.ratio, scale=scaling,
                                    positions=settings.calibration_positions,
                                    criterion=settings.calibration_criterion, budget=settings.budget,
                                    record=False)  # the choice only: no output error to keep
        # (a prefill too short to calibrate leaves the layer even; the next long one calibrates it)
        if choice["source"] == "auto" and settings.budget == "layer":
            settings.layer_r[layer_idx] = choice["r"]
        elif choice["source"] == "auto":  # budget="model": allocate once every layer is scored
            settings.layer_options[layer_idx] = choice["options"]
            if len(settings.layer_options) == settings.n_layers:
                shares = allocate_budget({layer: {share: o["score"] for share, o in options.items()}
                                          for layer, options in settings.layer_options.items()})
                for layer, share in shares.items():
                    settings.layer_r[layer] = settings.layer_options[layer][share]["r"]
                    settings.layer_ratio[layer] = layer_ratio(settings.ratio, share)
    settings.calibration_seconds += time.perf_counter() - t0


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
                model_kwargs[name] = SparQCache(config=self.config)
        return result

    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)


def enable_sparq(model, ratio: float = 8, local_window: int | None = None, r: int | None = None,
                 k: int | None = None, *, min_k: int = 0, split: str = "even", split_file: str | None = None,
                 budget: str = DEFAULT_BUDGET, attn_name: str = ATTN_NAME, attn_fn=None):
    """Run every one-token decode step of ``model`` with SparQ attention; returns ``model``.

    Args:
        ratio: compression ratio; ``r = D/ratio`` and ``k = S/(2·ratio)`` at the current length
            ``S`` (:func:`sparq_ext.rk_for_ratio`) unless ``r``/``k`` are given.
        local_window: positions always attended (inside ``k``); default ``k // 4``.
        r, k: fix the rank and the number of attended positions instead of following ``ratio``.
        min_k: floor on the ratio-derived ``k``: at short lengths ``S/(2·ratio)`` is a handful of
            positions and attention is cheap anyway (the CLI demo uses 64). ``min_k >= S`` is dense.
        split: ``"even"`` (the paper's rule, the default) or ``"auto"``: per layer, the ``r`` (and,
            with ``budget="model"``, the layer's share of the budget) whose selected positions
            keep the most exact attention mass (:data:`sparq_ext.calibrate.DEFAULT_CRITERION`;
            other criteria through :func:`calibrate_split`), chosen from the first prefill of at
            least 64 positions (or read from ``split_file``); ``k`` spends the rest of the
            layer's budget. Explicit ``r``/``k`` win over both.
        split_file: with ``split="auto"``, a JSON written by :func:`calibrate_split` (or
            :func:`sparq_ext.calibrate.save_split`); its ratio must equal ``ratio``, and its
            layers may not spend more than the ratio's budget (checked).
        budget: with ``split="auto"`` and no split file, how the first prefill calibrates:
            ``"model"`` (default: layers share the model's budget, some read more and others
            less, the total stays ``1/ratio`` of dense) or ``"layer"`` (every layer on its own
            budget line, only ``r`` chosen).
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
    if split not in ("even", "auto"):
        raise ValueError(f"split must be 'even' or 'auto', got {split!r}")
    if split_file is not None and split != "auto":
        raise ValueError("split_file needs split='auto'")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules using the attention interface")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    layer_r, ratios, length_splits = {}, {}, {}
    if split_file is not None and os.path.exists(split_file):
        file_ratio, layer_r, ratios = load_split(split_file)
        length_splits = load_length_splits(split_file)
        if file_ratio != float(ratio):
            raise ValueError(f"split_file {split_file} was calibrated for ratio {file_ratio:g}, "
                             f"not {ratio:g}")
        head_dim = getattr(modules[0], "head_dim", None)
        if head_dim is not None:
            for name, (lr, lq) in [("", (layer_r, ratios))] + [(f" (length {n})", v) for n, v in length_splits.items()]:
                check_split(float(ratio), lr, lq, head_dim, len(modules), f"split_file {split_file}{name}")
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"enable_sparq supports full-attention layers only, got layer_types {set(layer_types)}")
    register(attn_name, attn_fn or sparq_attention_forward)
    if not hasattr(model, "_sparq_previous_attn"):
        model._sparq_previous_attn = model.config._attn_implementation
        _wrap_cache_preparation(model)
    settings = SparQSettings(ratio=ratio, r=r, k=k, local_window=local_window, min_k=min_k, split=split,
                             layer_r=layer_r, layer_ratio=ratios, budget=budget, n_layers=len(modules),
                             length_splits=length_splits)
    for module in modules:
        module._sparq_settings = settings
    model.set_attn_implementation(attn_name)
    return model


def calibrate_split(model, input_ids, ratio: float = 8, path: str | None = None, attention_mask=None,
                    positions: int | None = None, criterion: str | None = None, budget: str = DEFAULT_BUDGET,
                    lengths=None) -> dict:
    """Choose the auto split of every layer from one prefill of ``input_ids`` and optionally save it.

    Runs ``model(input_ids)`` once (SDPA prefill, no cache kept) with ``split="auto"``; the
    previous attention setup of ``model`` is restored afterwards. Returns ``{"ratio",
    "layer_r", "layer_ratio", "calibration_seconds", "prefill_seconds", ...}``; with ``path``
    also writes the JSON that ``enable_sparq(model, ratio, split="auto", split_file=path)`` reads. Use at least a few
    hundred tokens of text like the model's inputs (fewer than 64 leaves the even split).
    ``positions``: query positions sampled per layer (default: by the prefill's length,
    :func:`sparq_ext.calibrate.default_position_count`: 8 up to 2048 tokens, 32 at 8192).
    ``criterion``: what each layer's ``r`` minimises, one of :data:`sparq_ext.calibrate.CRITERIA`
    (default :data:`sparq_ext.calibrate.DEFAULT_CRITERION`). ``budget``: ``"model"`` (layers
    share the budget, the default) or ``"layer"`` (each layer on its own budget line).
    ``lengths``: calibrate once per context length ``L`` (a prefill of the first ``L`` tokens
    each, all ``<= input_ids.shape[-1]``); decoding then uses the split of the calibration
    length nearest to the current one (the best split moves with the length). The top-level
    ``layer_r``/``layer_ratio`` are then those of the longest length.
    """
    if criterion is not None and criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    check_position_count(positions)
    n_tokens = int(input_ids.shape[-1])
    if lengths is not None:
        lengths = sorted({int(n) for n in lengths})
        if not lengths or lengths[0] < 1 or lengths[-1] > n_tokens:
            raise ValueError(f"lengths must be between 1 and the {n_tokens} tokens of input_ids, got {lengths}")
    modules = _attention_modules(model)
    previous = [getattr(m, "_sparq_settings", None) for m in modules]
    was_enabled = hasattr(model, "_sparq_previous_attn")
    previous_attn = model.config._attn_implementation
    per_length, calibration, prefill = {}, 0.0, 0.0
    try:
        for length in lengths or [n_tokens]:
            enable_sparq(model, ratio=ratio, split="auto", budget=budget)
            settings = sparq_settings(model)
            settings.calibration_positions = positions
            settings.calibration_criterion = criterion
            t0 = time.perf_counter()
            with torch.no_grad():
                model(input_ids=input_ids[..., :length], use_cache=False,
                      attention_mask=None if attention_mask is None else attention_mask[..., :length])
            prefill += time.perf_counter() - t0 - settings.calibration_seconds
            calibration += settings.calibration_seconds
            per_length[length] = (dict(sorted(settings.layer_r.items())), dict(sorted(settings.layer_ratio.items())))
    finally:
        if was_enabled:
            for module, saved in zip(modules, previous):
                module._sparq_settings = saved
            model.set_attn_implementation(previous_attn)
        else:
            disable_sparq(model)
    layer_r, layer_ratios = per_length[max(per_length)]
    sampled = {length: positions or default_position_count(length) for length in per_length}
    result = {"ratio": float(ratio), "layer_r": layer_r, "layer_ratio": layer_ratios, "budget": budget,
              "criterion": criterion or DEFAULT_CRITERION,
              "positions": sampled if lengths is not None else sampled[n_tokens],
              "calibration_seconds": calibration, "prefill_seconds": prefill, "tokens": n_tokens}
    if lengths is not None:
        result["lengths"] = per_length
    if path is not None:
        save_split(path, layer_r, ratio, model=getattr(model.config, "_name_or_path", "") or type(model).__name__,
                   layer_ratio=layer_ratios, lengths=per_length if lengths is not None else None,
                   extra={k: result[k] for k in ("budget", "criterion", "positions", "calibration_seconds",
                                                 "prefill_seconds", "tokens")})
    return result


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


__all__ = ["SUPPORTED_TRANSFORMERS", "SparQSettings", "calibrate_split", "disable_sparq", "enable_sparq",
           "hf_mask_to_bool", "register", "sparq_attention_forward", "sparq_settings"]
