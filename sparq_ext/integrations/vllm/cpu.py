"""SparQ in vLLM's CPU attention backend (see the package docstring for the design).

Imported by vLLM, not by the plugin entry point, so a process that never builds a CPU attention
layer never imports it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import sparq_ext.ops  # noqa: F401  (registers torch.ops.sparq_ext.paged_attention)
from sparq_ext import reference
from vllm.config import get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import FullAttentionSpec

from . import CONFIG_KEY, SUPPORTED_ISAS, current_settings, describe_settings, layer_index, settings_from_config, \
    sparq_page_extra_bytes

# Under vLLM's logger namespace so vLLM's log configuration (level, format) applies.
logger = init_logger("vllm.plugins.sparq_ext")


class PageRegions(NamedTuple):
    """One layer's KV cache, as the regions of its pages (views, never copies)."""

    key_t: torch.Tensor  # (num_blocks, H, D, block_size): the stock region, K transposed
    key_rows: torch.Tensor  # (num_blocks, H, block_size, D): SparQ's row-major copy of K
    values: torch.Tensor  # (num_blocks, H, block_size, D): the stock region
    value_sums: torch.Tensor  # (num_blocks, H, D) fp32: each block's sum of values
    key_t_int8: torch.Tensor | None  # (num_blocks, H, D, block_size): the 8-bit selection cache
    key_t_scale: torch.Tensor | None  # (num_blocks, H, block_size) fp32: its per-position scales
    key_sums: torch.Tensor | None = None  # (num_blocks, H, D) fp32: each block's sum of K (key_std)
    key_sq_sums: torch.Tensor | None = None  # (num_blocks, H, D) fp32: each block's sum of K²


def key_std_from_block_sums(key_sums, key_sq_sums, block_table, seq_lens, block_size) -> torch.Tensor:
    """Each row's key spread from its blocks' sums (``reference.key_std_from_block_sums``), in one
    native call where the extension is built."""
    if sparq_ext.ops._C is not None:
        return sparq_ext.ops._C._key_std_from_block_sums(key_sums, key_sq_sums, block_table, seq_lens,
                                                         block_size)
    return reference.key_std_from_block_sums(key_sums, key_sq_sums, block_table, seq_lens, block_size)


def write_page_regions(key, value, slot_mapping, page: "PageRegions") -> None:
    """A layer's writes into SparQ's page regions (``reference.write_page_regions``), in one native
    call where the extension is built: inside the engine each small torch op costs tens of us, and
    the pure-torch version is 4 (8-bit cache: 9; key spread: 5 more) of them per layer and step."""
    regions = (page.key_rows, page.value_sums, page.key_t_int8, page.key_t_scale, page.key_sums,
               page.key_sq_sums)
    if sparq_ext.ops._C is not None:
        sparq_ext.ops._C._write_page_regions(key, value, slot_mapping, *regions)
    else:
        reference.write_page_regions(key, value, slot_mapping, *regions)


@dataclasses.dataclass
class SparQDecodeMetadata:
    """The decode rows of a batch (the first ``num_decodes`` rows, one token each), shared by
    every layer of a step."""

    num_decodes: int
    seq_lens: torch.Tensor  # int32 (num_decodes,)
    block_table: torch.Tensor  # int32 (num_decodes, blocks of the longest row)
    # Rows by the length their r and k are chosen at (their own, rounded up to whole blocks, so
    # a row's result never depends on the other rows of the batch): [(length, rows or None = all)]
    groups: list[tuple[int, torch.Tensor | None]]


@dataclasses.dataclass
class SparQCPUMetadata:
    """A batch split in two: SparQ's decode rows, then the stock backend's metadata for the rest."""

    num_actual_tokens: int
    decode: SparQDecodeMetadata | None
    prefill: CPUAttentionMetadata | None  # the stock metadata of the rows after the decode rows


class SparQCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Builds :class:`SparQCPUMetadata`; with SparQ off, exactly the stock metadata."""

    reorder_batch_threshold = 1  # decode rows first, so the decode part is a prefix of the batch

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.sparq_settings = settings_from_config(vllm_config.additional_config)
        if self.sparq_settings is not None and not _runs_sparq(kv_cache_spec, vllm_config, layer_names):
            self.sparq_settings = None  # a sliding-window (or encoder) group: stock
        if self.sparq_settings is None:
            self.reorder_batch_threshold = None
            return
        if self.isa == "amx":
            # vLLM's AMX kernel (bf16 on Sapphire Rapids and later) packs K and V into tiles that no
            # strided view reads; its vec kernel runs on the same machines and keeps K transposed.
            # Prefill and the page writes follow the layers' ISA, so they switch with it.
            self.isa = "vec"
            self._set_isa_to_layers(layer_names)
        if self.isa not in SUPPORTED_ISAS:
            raise NotImplementedError(
                f"SparQ on vLLM's CPU backend supports the {SUPPORTED_ISAS} kernels (K stored "
                f"transposed), but this machine uses {self.isa!r} for dtype {self.dtype}, block "
                f"size {self.block_size}; run without additional_config['{CONFIG_KEY}']")
        else:
            logger.info_once("SparQ decode attention on (sparq_ext): %s", describe_settings(self.sparq_settings))

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        if self.sparq_settings is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        common = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = \
            split_decodes_and_prefills(common, decode_threshold=1)
        decode = prefill = None
        if num_decodes:
            seq_lens = common.seq_lens[:num_decodes]
            row_blocks = (seq_lens.long() + self.block_size - 1) // self.block_size
            blocks = int(row_blocks.max())
            table = common.block_table_tensor[:num_decodes, :blocks]
            lengths = sorted(set(row_blocks.tolist()))
            groups = [(lengths[0] * self.block_size, None)] if len(lengths) == 1 else [
                (n * self.block_size, torch.nonzero(row_blocks == n).flatten()) for n in lengths]
            decode = SparQDecodeMetadata(
                num_decodes=num_decodes, seq_lens=seq_lens, block_table=table, groups=groups)
        if num_prefills:
            prefill = super().build(common_prefix_len, _rows_after(common, num_decodes,
                                                                   num_decode_tokens), fast_build)
        return SparQCPUMetadata(num_actual_tokens=common.num_actual_tokens, decode=decode,
                                prefill=prefill)


def _runs_sparq(kv_cache_spec, vllm_config, layer_names) -> bool:
    """Whether a KV cache group runs SparQ: full causal attention in every layer. Sliding-window
    layers (Gemma 2/3, gpt-oss, ...) stay on the stock kernel, whose cost their window bounds;
    vLLM's hybrid KV cache manager keeps them in groups of their own."""
    if not isinstance(kv_cache_spec, FullAttentionSpec):
        return False
    impls = [layer.impl for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()]
    windowed = [impl for impl in impls if not _impl_runs_sparq(impl)]
    if windowed and len(windowed) < len(impls):
        raise NotImplementedError(
            "SparQ needs sliding-window and full-attention layers in separate KV cache groups "
            "(vLLM's hybrid KV cache manager); it was disabled (--disable-hybrid-kv-cache-manager?)")
    return not windowed


def _impl_runs_sparq(impl) -> bool:
    """Whether a layer runs SparQ when it is on: decoder self-attention without a window."""
    return getattr(impl, "sliding_window", -1) == -1 and \
        getattr(impl, "attn_type", AttentionType.DECODER) == AttentionType.DECODER


def _rows_after(common, num_rows: int, num_tokens: int):
    """``common`` without its first ``num_rows`` requests (their ``num_tokens`` tokens)."""
    if num_rows == 0:
        return common
    qsl = common.query_start_loc[num_rows:] - num_tokens
    qsl_cpu = common.query_start_loc_cpu[num_rows:] - num_tokens
    sliced = {name: value[num_rows:] for name in ("seq_lens_cpu_upper_bound", "is_prefilling",
                                                  "dcp_local_seq_lens", "req_idx")
              if (value := getattr(common, name, None)) is not None}
    positions = common.positions[num_tokens:] if common.positions is not None else None
    return dataclasses.replace(
        common, query_start_loc=qsl, query_start_loc_cpu=qsl_cpu,
        seq_lens=common.seq_lens[num_rows:], num_reqs=common.num_reqs - num_rows,
        num_actual_tokens=common.num_actual_tokens - num_tokens,
        block_table_tensor=common.block_table_tensor[num_rows:],
        slot_mapping=common.slot_mapping[num_tokens:], positions=positions, **sliced)


class SparQCPUBackendImpl(CPUAttentionBackendImpl):
    """The stock CPU implementation, plus SparQ's page region and SparQ for decode rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = current_settings()
        # vLLM sizes the pages (customize_spec) after building the model and outside the config's
        # context: the layers built last in this process tell it whether SparQ's region is needed
        # (in every layer's page, sliding ones too: the hybrid manager needs one page size).
        SparQCPUBackend.settings_of_built_model = settings
        self.sparq_settings = settings if _impl_runs_sparq(self) else None
        if self.sparq_settings is not None:
            unsupported = [name for name, used in (
                ("sinks", self.sinks is not None), ("alibi_slopes", self.alibi_slopes is not None),
                ("kv_cache_dtype", self.kv_cache_dtype != "auto")) if used]
            if unsupported:
                raise NotImplementedError(f"SparQ in vLLM does not reproduce {unsupported} yet; "
                                          f"run this model without additional_config['{CONFIG_KEY}']")
        self._page = None  # (the kv_cache's address, shape and strides, its PageRegions)
        self._budget = {}  # length -> (r, k, local_window): at most max_model_len / block_size entries

    # The page, per layer: kv_cache (num_blocks, Hkv, block_size, 2·D) is a view whose block
    # stride also covers SparQ's region (see SparQCPUBackend.customize_spec).
    def _regions(self, kv_cache: torch.Tensor) -> "PageRegions":
        # Built once per layer: the same cache comes back every step, and building the views
        # costs ~20 us, twice per layer and step (a few percent of a decode step at batch 1).
        where = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride())
        if self._page is None or self._page[0] != where:
            self._page = (where, self._build_regions(kv_cache))
        return self._page[1]

    def _build_regions(self, kv_cache: torch.Tensor) -> "PageRegions":
        num_blocks, heads, block_size, width = kv_cache.shape
        D = width // 2
        halves = kv_cache.view(num_blocks, heads, 2 * block_size, D)
        key_t = halves[:, :, :block_size].reshape(num_blocks, heads, D, block_size)  # a view
        values = halves[:, :, block_size:]
        page = kv_cache.stride(0)
        base = kv_cache.storage_offset() + heads * block_size * width  # where SparQ's region starts
        key_rows = kv_cache.as_strided((num_blocks, heads, block_size, D),
                                       (page, block_size * D, D, 1), base)
        # The rest is addressed in bytes: fp32 value sums, then the 8-bit selection cache (int8
        # key_t, fp32 scales), whatever the cache's dtype.
        e = kv_cache.element_size()
        storage, at = kv_cache.view(torch.uint8), (base + heads * block_size * D) * e

        def region(shape, dtype):  # the next (num_blocks, *shape) of every page
            nonlocal at
            size = math.prod(shape) * dtype.itemsize
            view = storage.as_strided((num_blocks, size), (page * e, 1), at).view(dtype)
            at += size
            return view.view(num_blocks, *shape)

        value_sums = region((heads, D), torch.float32)
        key_t_int8 = key_t_scale = None
        if self.sparq_settings is not None and self.sparq_settings.key_t_dtype is not None:
            key_t_int8 = region((heads, D, block_size), torch.int8)
            key_t_scale = region((heads, block_size), torch.float32)
        key_sums = key_sq_sums = None
        if self.sparq_settings is not None and self.sparq_settings.component_rule == "key_std":
            key_sums = region((heads, D), torch.float32)
            key_sq_sums = region((heads, D), torch.float32)
        return PageRegions(key_t, key_rows, values, value_sums, key_t_int8, key_t_scale,
                           key_sums, key_sq_sums)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.sparq_settings is None or slot_mapping.numel() == 0:
            return
        write_page_regions(key, value, slot_mapping, self._regions(kv_cache))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if not isinstance(attn_metadata, SparQCPUMetadata):  # SparQ off, or warm-up (None)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        decode = attn_metadata.decode
        num_decode = decode.num_decodes if decode is not None else 0
        if attn_metadata.prefill is not None:
            super().forward(layer, query[num_decode:], key[num_decode:], value[num_decode:],
                            kv_cache, attn_metadata.prefill, output[num_decode:],
                            output_scale, output_block_scale)
        if decode is not None:
            result = self._decode(layer, query[:num_decode], kv_cache, decode)
            output[:num_decode].view(num_decode, self.num_heads, self.head_size).copy_(result)
        return output

    def _decode(self, layer, query, kv_cache, decode: SparQDecodeMetadata) -> torch.Tensor:
        page = self._regions(kv_cache)
        query = query.reshape(-1, self.num_heads, self.head_size)
        key_t_dtype = self.sparq_settings.key_t_dtype
        key_t = page.key_t if key_t_dtype is None else page.key_t_int8

        def run(length, rows):
            budget = self._budget.get(length)
            if budget is None:  # once per length: in the engine each Python call costs tens of us
                budget = self._budget[length] = self.sparq_settings.resolve(
                    length, self.head_size, layer_index(getattr(layer, "layer_name", "")),
                    dtype=kv_cache.dtype, key_t_dtype=key_t_dtype)
            r, k, window = budget
            pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
            weights = None
            if page.key_sums is not None:  # each row's key spread from its blocks' sums
                weights = key_std_from_block_sums(page.key_sums, page.key_sq_sums,
                                                  pick(decode.block_table), pick(decode.seq_lens),
                                                  kv_cache.shape[2])
            # The operator's own (C++) checks run; sparq_ext.paged_attention's Python checks would
            # re-read the block ids vLLM produced on every layer of every step.
            return torch.ops.sparq_ext.paged_attention(
                pick(query), page.key_rows, page.values, pick(decode.block_table), pick(decode.seq_lens),
                r=r, k=k, key_t_cache=key_t, local_window=window, reallocate=True,
                scale=self.scale, softcap=self.logits_soft_cap or None,
                key_t_scale=page.key_t_scale,
                # v̄ inside the operator from the row's blocks' sums: ceil(S/block_size)·D reads
                value_sums_cache=page.value_sums, component_weights=weights)

        if len(decode.groups) == 1:
            return run(*decode.groups[0])
        result = torch.empty_like(query)
        for length, rows in decode.groups:
            result.index_copy_(0, rows, run(length, rows))
        return result


class SparQCPUBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with SparQ decode (when asked for; stock otherwise)."""

    settings_of_built_model = None  # set by SparQCPUBackendImpl.__init__

    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        if cls.settings_of_built_model is None:
            return spec
        settings = cls.settings_of_built_model
        extra = sparq_page_extra_bytes(spec.num_kv_heads, spec.block_size, spec.head_size, spec.dtype,
                                       settings.key_t_dtype, settings.component_rule)
        return dataclasses.replace(spec, page_size_padded=spec.page_size_bytes + extra)

    @staticmethod
    def get_impl_cls():
        return SparQCPUBackendImpl

    @staticmethod
    def get_builder_cls():
        return SparQCPUMetadataBuilder
