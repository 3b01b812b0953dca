"""``sparq_ext.attention``: validation at the boundary, then one dispatcher operator.

The operator ``torch.ops.sparq_ext.attention`` is defined once: by the compiled extension
(``csrc/ops.cpp``, ``TORCH_LIBRARY``) when it is built, else here from the same schema. Each
backend registers under its dispatch key; where no native kernel exists for a key, the
pure-torch reference (:mod:`sparq_ext.reference`) is registered in its place, so the operator
always works. A fake implementation makes it traceable by ``torch.compile`` and capturable in
CUDA graphs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import torch

from .reference import paged_attention_reference, sparq_attention_reference

# Must match the schema in csrc/ops.cpp (tests/test_registration.py checks it).
SCHEMA = (
    "attention(Tensor query, Tensor key, Tensor value, *, int r, int k, Tensor? key_t=None, "
    "Tensor? value_mean=None, Tensor? seq_lens=None, Tensor? attn_mask=None, "
    "int local_window=0, bool reallocate=True, float? scale=None, float? softcap=None, "
    "Tensor? sinks=None, Tensor? key_t_scale=None, Tensor? component_weights=None) -> Tensor"
)
QUALNAME = "sparq_ext::attention"
# Must match the paged schema in csrc/ops.cpp.
PAGED_SCHEMA = (
    "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_table, "
    "Tensor seq_lens, *, int r, int k, Tensor? key_t_cache=None, Tensor? value_mean=None, "
    "int local_window=0, bool reallocate=True, float? scale=None, float? softcap=None, "
    "Tensor? sinks=None, Tensor? key_t_scale=None, Tensor? value_sums_cache=None, "
    "Tensor? component_weights=None) -> Tensor"
)
PAGED_QUALNAME = "sparq_ext::paged_attention"

extension_error: str | None = None  # why the compiled extension is not in use, if it is not
_C = None
if os.environ.get("SPARQ_EXT_DISABLE", "") not in ("", "0"):
    extension_error = "disabled by SPARQ_EXT_DISABLE"
elif importlib.util.find_spec("sparq_ext._C") is None:
    extension_error = "the compiled extension sparq_ext._C was not built"
else:
    try:
        from . import _C  # noqa: F401  (registers the schema and the native kernels)
    except ImportError as error:  # built but broken (ABI, missing library): say so, keep working
        extension_error = f"{type(error).__name__}: {error}"
        warnings.warn(f"sparq_ext: compiled extension failed to load ({extension_error}); "
                      "using the pure-torch implementation", RuntimeWarning, stacklevel=2)

_libraries = []  # keep the torch.library handles alive
if _C is None:
    _def_lib = torch.library.Library("sparq_ext", "DEF")
    _def_lib.define(SCHEMA)
    _libraries.append(_def_lib)
if not hasattr(torch.ops.sparq_ext, "paged_attention"):  # no extension, or one built before it
    _paged_def_lib = torch.library.Library("sparq_ext", "FRAGMENT")
    _paged_def_lib.define(PAGED_SCHEMA)
    _libraries.append(_paged_def_lib)


def has_native_kernel(device_type: str, op: str = "attention") -> bool:
    """Whether the compiled extension provides ``op``'s kernel (``"attention"`` or
    ``"paged_attention"``) for ``"cpu"`` or ``"cuda"``; otherwise that device runs the
    pure-torch reference."""
    if op not in _native_device_types:
        raise ValueError(f"op must be one of {sorted(_native_device_types)}, got {op!r}")
    return device_type in _native_device_types[op]


# Read before the references below are registered: only the compiled extension's kernels count.
_native_device_types = {
    op: {device_type
         for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
         if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)}
    for op, qualname in (("attention", QUALNAME), ("paged_attention", PAGED_QUALNAME))
}


def _reference_kernel(query, key, value, *, r, k, key_t=None, value_mean=None, seq_lens=None,
                      attn_mask=None, local_window=0, reallocate=True, scale=None, softcap=None,
                      sinks=None, key_t_scale=None, component_weights=None):
    return sparq_attention_reference(query, key, value, r, k, key_t, value_mean, seq_lens,
                                     attn_mask, local_window, reallocate, scale, softcap, sinks,
                                     key_t_scale, component_weights)


_impl_lib = torch.library.Library("sparq_ext", "IMPL")
_libraries.append(_impl_lib)
for _key in ("CPU", "CUDA"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(QUALNAME, _key):
        _impl_lib.impl("attention", _reference_kernel, _key)


def _paged_reference_kernel(query, key_cache, value_cache, block_table, seq_lens, *, r, k,
                            key_t_cache=None, value_mean=None, local_window=0, reallocate=True,
                            scale=None, softcap=None, sinks=None, key_t_scale=None,
                            value_sums_cache=None, component_weights=None):
    return paged_attention_reference(query, key_cache, value_cache, block_table, seq_lens, r, k,
                                     key_t_cache, value_mean, local_window, reallocate, scale,
                                     softcap, sinks, key_t_scale, value_sums_cache,
                                     component_weights)


# Where the extension has no paged kernel for a key (not built, built without CUDA, or built
# before the paged operator existed), that key runs the reference (correct, not fast).
for _key in ("CPU", "CUDA"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(PAGED_QUALNAME, _key):
        _impl_lib.impl("paged_attention", _paged_reference_kernel, _key)


@torch.library.register_fake(PAGED_QUALNAME)
def _paged_attention_fake(query, key_cache, value_cache, block_table, seq_lens, *, r, k,
                          key_t_cache=None, value_mean=None, local_window=0, reallocate=True,
                          scale=None, softcap=None, sinks=None, key_t_scale=None,
                          value_sums_cache=None, component_weights=None):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.register_fake(QUALNAME)
def _attention_fake(query, key, value, *, r, k, key_t=None, value_mean=None, seq_lens=None,
                    attn_mask=None, local_window=0, reallocate=True, scale=None, softcap=None,
                    sinks=None, key_t_scale=None, component_weights=None):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _values_checkable(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values on the host: only for CPU tensors outside tracing.
    Reading a CUDA tensor would synchronise the device on every call (and fail under CUDA-graph
    capture); a traced or compiled tensor has no values to read."""
    if t.device.type != "cpu":
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def check_attention_inputs(query, key, value, r, k, key_t=None, value_mean=None, seq_lens=None,
                           attn_mask=None, local_window=0, reallocate=True, scale=None,
                           softcap=None, sinks=None, key_t_scale=None,
                           component_weights=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad argument of ``attention``."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, T, D), got shape {tuple(t.shape)}")
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"query must be float32, float16 or bfloat16, got {query.dtype}")
    B, Hq, T, D = query.shape
    if T != 1:
        raise ValueError(f"query must hold one decode position (B, Hq, 1, D), got T = {T}")
    if Hq < 1 or D < 1:
        raise ValueError(f"query must have at least one head and head_dim >= 1, got {tuple(query.shape)}")
    if key.shape[0] != B or key.shape[3] != D:
        raise ValueError(f"key must be (B={B}, Hkv, S, D={D}), got {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}")
    Hkv, S = key.shape[1], key.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"key heads ({Hkv}) must divide query heads ({Hq})")
    if S < 1:
        raise ValueError("key must hold at least one position (S >= 1)")

    key_t_like_query = key_t if not _is_int8(key_t) else None  # an int8 key_t: checked below
    optional = (("key_t", key_t_like_query, (B, Hkv, D, S)),
                ("value_mean", value_mean, (B, Hkv, 1, D)))
    _check_like_query(query, (("key", key, None), ("value", value, None)) + optional)
    _check_key_t_scale(query, "key_t", key_t, (B, Hkv, D, S), "key_t_scale", key_t_scale,
                       (B, Hkv, S), "(B, Hkv, S)")

    _check_budget(D, r, k, local_window, reallocate, scale)
    _check_softmax_variants(query, Hq, softcap, sinks)
    _check_component_weights(query, component_weights, (B, Hkv, D), "(B, Hkv, D)")

    if seq_lens is not None:
        if not isinstance(seq_lens, torch.Tensor):
            raise TypeError(f"seq_lens must be a torch.Tensor or None, got {type(seq_lens).__name__}")
        if seq_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"seq_lens must be int32 or int64, got {seq_lens.dtype}")
        if tuple(seq_lens.shape) != (B,):
            raise ValueError(f"seq_lens must have shape (B,) = ({B},), got {tuple(seq_lens.shape)}")
        if seq_lens.device != query.device:
            raise ValueError(f"seq_lens must be on the query's device {query.device}, got {seq_lens.device}")
        if _values_checkable(seq_lens) and B > 0:
            low, high = int(seq_lens.min()), int(seq_lens.max())
            if low < 0 or high > S:
                raise ValueError(f"seq_lens must lie in [0, S={S}], got values in [{low}, {high}]")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}")
        target = (B, 1, 1, S)
        try:
            broadcast_ok = torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            broadcast_ok = False
        if not broadcast_ok:
            raise ValueError(f"attn_mask must be broadcastable to (B, 1, 1, S) = {target}, "
                             f"got {tuple(attn_mask.shape)}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask must be on the query's device {query.device}, got {attn_mask.device}")

    if torch.is_grad_enabled():
        tensors = (("query", query), ("key", key), ("value", value), ("key_t", key_t),
                   ("value_mean", value_mean), ("sinks", sinks), ("key_t_scale", key_t_scale),
                   ("component_weights", component_weights))
        for name, t in tensors:
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad, but sparq_ext.attention is inference-only "
                                 "(no backward): call it under torch.no_grad() or torch.inference_mode()")


def attention(query, key, value, *, r, k, key_t=None, value_mean=None, seq_lens=None,
              attn_mask=None, local_window=0, reallocate=True, scale=None, softcap=None,
              sinks=None, key_t_scale=None, component_weights=None):
    """SparQ Attention for one decode step (arXiv 2312.04985), SDPA-like.

    Args:
        query: ``(B, Hq, 1, D)``, float32 / float16 / bfloat16.
        key, value: ``(B, Hkv, S, D)``, ``Hq % Hkv == 0`` (MHA, GQA, MQA). Query heads of a
            group share the selected indices, so each KV head is read once.
        r: query components used for the approximate scores, ``1 <= r <= D``.
        k: positions attended exactly, ``k >= 1``; clamped to the number of valid positions
            (``k >=`` valid length gives exact dense attention).
        key_t: optional ``(B, Hkv, D, S)`` transposed copy of ``key`` (step 1 then reads ``r``
            contiguous rows): in the query's dtype, or int8 with ``key_t_scale`` (the 8-bit
            selection cache, :func:`sparq_ext.quantize_key_t`).
        value_mean: optional ``(B, Hkv, 1, D)`` mean of ``value``; default: computed over valid
            positions.
        seq_lens: optional int32/int64 ``(B,)``; positions ``>= seq_lens[b]`` are padding.
        attn_mask: optional bool, broadcastable to ``(B, 1, 1, S)``; ``True`` = may attend.
        local_window: the last ``local_window`` valid positions are always attended (counted
            inside ``k``; ``local_window <= k``).
        reallocate: interpolate with the mean of ``value`` by the approximate score mass of the
            top-k (step 3); ``False`` returns the top-k attention alone.
        scale: logit scale, default ``1/sqrt(D)``.
        softcap: optional logit softcapping (Gemma 2's ``attn_logit_softcapping``), a finite
            float > 0: every logit ``x`` (scaled, approximate and exact alike) becomes
            ``softcap * tanh(x / softcap)``.
        sinks: optional float32 ``(Hq,)`` attention sinks (gpt-oss; transformers' ``s_aux``):
            query head ``h`` has one more softmax entry, logit ``sinks[h]``, that carries no
            value. Step 3 counts it as attended (docs/design.md), so ``k >=`` the valid length
            is still dense attention exactly.
        key_t_scale: float32 ``(B, Hkv, S)``, given exactly when ``key_t`` is int8: position
            ``s``'s scale, step 1's logit being ``key_t_scale[s] * (q[i1] . key_t[i1, s])``
            (times the logit scale, then softcapped). Only the approximate logits (the
            selection and ``alpha``) change; step 2 reads ``key`` and ``value`` exactly.
        component_weights: optional float32 ``(B, Hkv, D)``, finite and ``>= 0``: step 1 ranks
            component ``i`` by ``w_i * sum_g |q_g,i|`` instead of ``sum_g |q_g,i|`` (and step 3's
            ``gamma`` weighs ``|q_g,i|`` by ``w_i`` alike). Pass each key channel's standard
            deviation over the cached positions (:func:`sparq_ext.key_channel_std`; a
            :class:`sparq_ext.SparQCache` keeps it as running sums) to rank components by how
            much they move the logits: a better selection at the same bytes (docs/accuracy.md).
            ``None`` is the paper's rule.

    Returns:
        ``(B, Hq, 1, D)`` in the query's dtype. A batch row with no valid position gives zeros.

    Backends: native CPU and CUDA kernels, every argument above included (the CUDA kernels:
    compiled with nvcc 13.0, tested through the emulator; never run on a GPU), and the
    pure-torch reference wherever the extension is not built; ``sparq_ext.has_native_kernel``
    says which runs.

    Inference-only: inputs that require grad are rejected unless grad mode is off.
    ``seq_lens`` values are checked only for CPU tensors in eager mode. On a GPU they are
    never read on the host (that would synchronise the device on every decode step): the kernel
    clamps each value to ``[0, S]``, as the reference's masking does. Under ``torch.compile``
    or tracing they are not checked either.
    """
    check_attention_inputs(query, key, value, r, k, key_t, value_mean, seq_lens, attn_mask,
                           local_window, reallocate, scale, softcap, sinks, key_t_scale,
                           component_weights)
    scale = None if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    return torch.ops.sparq_ext.attention(
        query, key, value, r=r, k=k, key_t=key_t, value_mean=value_mean, seq_lens=seq_lens,
        attn_mask=attn_mask, local_window=local_window, reallocate=reallocate, scale=scale,
        softcap=softcap, sinks=sinks, key_t_scale=key_t_scale, component_weights=component_weights)


def _check_like_query(query, tensors) -> None:
    """Each (name, tensor or None, expected shape or None): a tensor with the query's dtype and device."""
    for name, t, shape in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must have the query's dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} must be on the query's device {query.device}, got {t.device}")


def _is_int8(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.int8


def _check_key_t_scale(query, key_t_name, key_t, key_t_shape, name, key_t_scale, shape,
                       shape_words) -> None:
    """An int8 selection cache and its scale (``attention``'s ``key_t``/``key_t_scale``, the
    paged operator's ``key_t_cache``/``key_t_scale``): both or neither, as
    :func:`sparq_ext.quantize_key_t` makes them. A ``key_t`` in the query's dtype is checked
    by the caller."""
    if _is_int8(key_t):
        if tuple(key_t.shape) != key_t_shape:
            raise ValueError(f"{key_t_name} must have shape {key_t_shape}, got {tuple(key_t.shape)}")
        if key_t.device != query.device:
            raise ValueError(f"{key_t_name} must be on the query's device {query.device}, "
                             f"got {key_t.device}")
        if key_t_scale is None:
            raise ValueError(f"{key_t_name} is int8, so {name} (float32 {shape_words}, one scale "
                             "per position) must be given: see sparq_ext.quantize_key_t")
    if key_t_scale is None:
        return
    if not isinstance(key_t_scale, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(key_t_scale).__name__}")
    if key_t is None:
        raise ValueError(f"{name} is given without {key_t_name}: it is the scale of an int8 "
                         f"{key_t_name}")
    if not _is_int8(key_t):
        raise TypeError(f"{name} is only for an int8 {key_t_name}, got {key_t_name} of dtype "
                        f"{key_t.dtype}")
    if tuple(key_t_scale.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_words} = {shape}, "
                         f"got {tuple(key_t_scale.shape)}")
    if key_t_scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {key_t_scale.dtype}")
    if key_t_scale.device != query.device:
        raise ValueError(f"{name} must be on the query's device {query.device}, "
                         f"got {key_t_scale.device}")


def _check_float32(query, name, t, shape, shape_words) -> None:
    """An optional float32 side input (``component_weights``, ``value_sums_cache``): a tensor
    of ``shape`` on the query's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_words} = {shape}, got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.device != query.device:
        raise ValueError(f"{name} must be on the query's device {query.device}, got {t.device}")


def _check_component_weights(query, component_weights, shape, shape_words) -> None:
    """Step 1's per-component weights: float32 ``shape``, and (where its values can be read
    without a device sync) finite and ``>= 0``: a negative or NaN weight would rank nothing."""
    if component_weights is None:
        return
    _check_float32(query, "component_weights", component_weights, shape, shape_words)
    if _values_checkable(component_weights) and component_weights.numel():
        bad = ~torch.isfinite(component_weights) | (component_weights < 0)
        if bool(bad.any()):
            raise ValueError("component_weights must be finite and >= 0 (e.g. each key channel's "
                             "standard deviation, sparq_ext.key_channel_std), got "
                             f"{component_weights[bad].flatten()[0].item()!r}")


def _check_budget(D, r, k, local_window, reallocate, scale) -> None:
    """The selection budget and options, as ``check_attention_inputs`` checks them."""
    if not _is_int(r) or not 1 <= r <= D:
        raise ValueError(f"r must be an int in [1, head_dim={D}], got {r!r}")
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not _is_int(local_window) or not 0 <= local_window <= k:
        raise ValueError(f"local_window must be an int in [0, k={k}], got {local_window!r}")
    if not isinstance(reallocate, bool):
        raise TypeError(f"reallocate must be a bool, got {type(reallocate).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")


def _check_softmax_variants(query, Hq, softcap, sinks) -> None:
    """``softcap`` and ``sinks``, as both operators check them."""
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be a finite float > 0 or None, got {softcap!r}")
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor or None, got {type(sinks).__name__}")
    if tuple(sinks.shape) != (Hq,):
        raise ValueError(f"sinks must have shape (Hq,) = ({Hq},), got {tuple(sinks.shape)}")
    if sinks.dtype != torch.float32:
        raise TypeError(f"sinks must be float32, got {sinks.dtype}")
    if sinks.device != query.device:
        raise ValueError(f"sinks must be on the query's device {query.device}, got {sinks.device}")


def check_paged_attention_inputs(query, key_cache, value_cache, block_table, seq_lens, r, k,
                                 key_t_cache=None, value_mean=None, local_window=0,
                                 reallocate=True, scale=None, softcap=None, sinks=None,
                                 key_t_scale=None, value_sums_cache=None,
                                 component_weights=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad argument of ``paged_attention``.

    Shapes, dtypes and devices always; the values of ``seq_lens`` and ``block_table`` (each
    row's length within the table, the block ids it uses within the cache) where they can be
    read without a device sync (not under ``torch.compile`` or CUDA-graph capture).
    """
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    if query.dim() != 3:
        raise ValueError(f"query must have 3 dims (R, Hq, D), got shape {tuple(query.shape)}")
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"query must be float32, float16 or bfloat16, got {query.dtype}")
    R, Hq, D = query.shape
    if Hq < 1 or D < 1:
        raise ValueError(f"query must have at least one head and head_dim >= 1, got {tuple(query.shape)}")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (num_blocks, Hkv, block_size, D), "
                             f"got shape {tuple(t.shape)}")
    num_blocks, Hkv, block_size, cache_D = key_cache.shape
    if cache_D != D:
        raise ValueError(f"key_cache must be (num_blocks, Hkv, block_size, D={D}), "
                         f"got {tuple(key_cache.shape)}")
    if num_blocks < 1 or block_size < 1:
        raise ValueError("key_cache must hold at least one block of at least one position, "
                         f"got {tuple(key_cache.shape)}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"key_cache heads ({Hkv}) must divide query heads ({Hq})")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache must have key_cache's shape {tuple(key_cache.shape)}, "
                         f"got {tuple(value_cache.shape)}")
    key_t_like_query = key_t_cache if not _is_int8(key_t_cache) else None  # int8: below
    optional = (("key_t_cache", key_t_like_query, (num_blocks, Hkv, D, block_size)),
                ("value_mean", value_mean, (R, Hkv, D)))
    _check_like_query(query, (("key_cache", key_cache, None), ("value_cache", value_cache, None)) + optional)
    _check_key_t_scale(query, "key_t_cache", key_t_cache, (num_blocks, Hkv, D, block_size),
                       "key_t_scale", key_t_scale, (num_blocks, Hkv, block_size),
                       "(num_blocks, Hkv, block_size)")
    if value_sums_cache is not None:
        if value_mean is not None:
            raise ValueError("value_mean and value_sums_cache are two ways to give v_mean: "
                             "pass at most one")
        _check_float32(query, "value_sums_cache", value_sums_cache, (num_blocks, Hkv, D),
                       "(num_blocks, Hkv, D)")

    for name, t, dims, shape in (("block_table", block_table, 2, "(R, max_blocks)"),
                                 ("seq_lens", seq_lens, 1, "(R,)")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != dims or t.shape[0] != R:
            raise ValueError(f"{name} must have shape {shape} with R={R}, got {tuple(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"{name} must be on the query's device {query.device}, got {t.device}")
    _check_budget(D, r, k, local_window, reallocate, scale)
    _check_softmax_variants(query, Hq, softcap, sinks)
    _check_component_weights(query, component_weights, (R, Hkv, D), "(R, Hkv, D)")

    if R > 0 and _values_checkable(seq_lens) and _values_checkable(block_table):
        capacity = block_table.shape[1] * block_size
        low, high = int(seq_lens.min()), int(seq_lens.max())
        if low < 0 or high > capacity:
            raise ValueError(f"seq_lens must lie in [0, max_blocks * block_size = {capacity}], "
                             f"got values in [{low}, {high}]")
        blocks_used = (seq_lens.long() + block_size - 1) // block_size  # (R,)
        in_use = torch.arange(block_table.shape[1], device=block_table.device) < blocks_used[:, None]
        used = block_table[in_use]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
            raise ValueError(f"block_table must hold block ids in [0, num_blocks={num_blocks}) "
                             f"for the blocks within seq_lens, got values in "
                             f"[{int(used.min())}, {int(used.max())}]")

    if torch.is_grad_enabled():
        tensors = (("query", query), ("key_cache", key_cache), ("value_cache", value_cache),
                   ("key_t_cache", key_t_cache), ("value_mean", value_mean), ("sinks", sinks),
                   ("key_t_scale", key_t_scale), ("value_sums_cache", value_sums_cache),
                   ("component_weights", component_weights))
        for name, t in tensors:
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad, but sparq_ext.paged_attention is "
                                 "inference-only (no backward): call it under torch.no_grad() "
                                 "or torch.inference_mode()")


def paged_attention(query, key_cache, value_cache, block_table, seq_lens, *, r, k,
                    key_t_cache=None, value_mean=None, local_window=0, reallocate=True,
                    scale=None, softcap=None, sinks=None, key_t_scale=None,
                    value_sums_cache=None, component_weights=None):
    """SparQ Attention for one decode step over a paged KV cache (as in vLLM).

    The same result as :func:`attention` on the cache laid out contiguously with ``seq_lens``
    (GQA index sharing, local window, step 3, zeros for an empty row); work is bounded by each
    row's length, not by the table's capacity.

    Args:
        query: ``(R, Hq, D)``, one decode token per request row; float32 / float16 / bfloat16.
        key_cache, value_cache: ``(num_blocks, Hkv, block_size, D)``, any strides (an engine's
            ``(num_blocks, block_size, Hkv, D)`` cache is passed as its ``transpose(1, 2)``,
            a view, never copied; rows of ``D`` contiguous elements are read in place).
        block_table: int32 ``(R, max_blocks)``: row ``i``'s position ``p`` lives in block
            ``block_table[i, p // block_size]`` at offset ``p % block_size``. Entries past a
            row's last block are never read.
        seq_lens: int32 ``(R,)``, each row's length, at most ``max_blocks * block_size``.
        r, k, local_window, reallocate, scale, softcap, sinks: as :func:`attention`.
        key_t_cache: optional ``(num_blocks, Hkv, D, block_size)`` transposed copy of the keys,
            any strides: in the query's dtype, or int8 with ``key_t_scale``.
        key_t_scale: float32 ``(num_blocks, Hkv, block_size)``, any strides, given exactly when
            ``key_t_cache`` is int8: each position's scale, as :func:`attention`'s.
        value_mean: optional ``(R, Hkv, D)`` mean of each row's values; default: computed over
            the row's positions (which reads all of them).
        value_sums_cache: optional float32 ``(num_blocks, Hkv, D)``, any strides: the sum of the
            values in each block, which an engine keeps up to date as it writes positions. Then
            ``v_mean`` of row ``i`` is the sum over its ``ceil(seq_lens[i] / block_size)``
            blocks divided by ``seq_lens[i]`` (``ceil(S / block_size)·D`` reads instead of
            ``S·D``), which is the mean when each block's sum covers exactly the positions the
            row reads there (positions written in order, a block's sum reset when its first
            position is written). At most one of ``value_mean`` and ``value_sums_cache``.
        component_weights: optional float32 ``(R, Hkv, D)``: each row's step-1 component
            weights, as :func:`attention`'s.

    Returns:
        ``(R, Hq, D)`` in the query's dtype.

    Backends: native CPU and CUDA kernels, each the same kernels as :func:`attention`'s with
    the block table as their addressing, every argument above included (the CUDA kernels:
    compiled with nvcc 13.0, tested through the emulator; never run on a GPU; on CUDA, ``D``
    must be a multiple of 8); wherever the extension is not built (or built without CUDA),
    the pure-torch :func:`paged_attention_reference`, which is correct but gathers the whole
    table into a contiguous cache first (slow).
    ``sparq_ext.has_native_kernel(device, "paged_attention")`` says which runs.
    Inference-only; ``seq_lens`` and ``block_table`` values are checked
    eagerly for CPU tensors, not under ``torch.compile`` or CUDA-graph capture; the CUDA
    kernel never reads them on the host (CUDA graphs work): it clamps each length to
    ``[0, max_blocks * block_size]`` and each block id it follows into ``[0, num_blocks)``.
    """
    check_paged_attention_inputs(query, key_cache, value_cache, block_table, seq_lens, r, k,
                                 key_t_cache, value_mean, local_window, reallocate, scale,
                                 softcap, sinks, key_t_scale, value_sums_cache,
                                 component_weights)
    scale = None if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    return torch.ops.sparq_ext.paged_attention(
        query, key_cache, value_cache, block_table, seq_lens, r=r, k=k, key_t_cache=key_t_cache,
        value_mean=value_mean, local_window=local_window, reallocate=reallocate, scale=scale,
        softcap=softcap, sinks=sinks, key_t_scale=key_t_scale, value_sums_cache=value_sums_cache,
        component_weights=component_weights)
