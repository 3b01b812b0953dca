"""The page upkeep of an engine's paged cache (the vLLM CPU backend's per-layer writes into SparQ's
page regions, and each row's key spread from per-block sums): the native one-call versions
(``sparq_ext._C``) against the pure-torch definitions in ``sparq_ext.reference``, and pages
written step by step against what their regions are defined to hold.
"""

from __future__ import annotations

import math

import pytest
import torch

import sparq_ext
from sparq_ext import reference
from sparq_testutil import page_table, to_pages

pytestmark = pytest.mark.skipif(not sparq_ext.has_native_kernel("cpu"),
                                reason="the native CPU kernel is not built")

NB, H, BS, D = 7, 3, 8, 16  # blocks, KV heads, block size, head dim
REGIONS = ("key_rows", "value_sums", "key_t_int8", "key_t_scale", "key_sums", "key_sq_sums")


def _native():
    from sparq_ext import _C
    return _C


def page_layout(dtype, int8=False, key_std=False):
    layout = [("key_rows", (H, BS, D), dtype), ("value_sums", (H, D), torch.float32)]
    if int8:
        layout += [("key_t_int8", (H, D, BS), torch.int8), ("key_t_scale", (H, BS), torch.float32)]
    if key_std:
        layout += [("key_sums", (H, D), torch.float32), ("key_sq_sums", (H, D), torch.float32)]
    return layout


def random_pages(layout, num_blocks=NB, seed=0):
    """A page storage (bytes) with 64 bytes of other data before SparQ's regions in every page,
    the float regions holding random values (earlier sums), the rest random bytes."""
    page = 64 + sum(math.prod(shape) * t.itemsize for _, shape, t in layout)
    page += -page % 8
    gen = torch.Generator().manual_seed(seed)
    storage = torch.randint(-100, 100, (num_blocks * page,), dtype=torch.int8, generator=gen)
    storage = storage.view(torch.uint8)
    for name, view in carve(storage, layout, num_blocks).items():
        if view.dtype.is_floating_point:
            view.copy_(torch.randn(view.shape, generator=gen))
    return storage


def carve(storage, layout, num_blocks=NB):
    """SparQ's regions of every page as strided views, as the backend carves them."""
    page = storage.numel() // num_blocks
    regions, at = {}, 64
    for name, shape, t in layout:
        size = math.prod(shape) * t.itemsize
        regions[name] = storage.as_strided((num_blocks, size), (page, 1), at).view(t).view(num_blocks, *shape)
        at += size
    return regions


def region_args(regions):
    return [regions.get(name) for name in REGIONS]


def step_tokens(dtype, seed=0):
    """A mixed step's tokens: a 10-token prefill chunk starting a block (its position 0 resets the
    sums of that block, and it runs into the next), three decode tokens mid-block, padding (-1),
    and more key/value rows than slots; key and value are strided views of one qkv tensor."""
    slots = torch.tensor([3 * BS, 3 * BS + 1, 3 * BS + 2, 3 * BS + 3, 3 * BS + 4, 3 * BS + 5,
                          3 * BS + 6, 3 * BS + 7, 5 * BS + 0, 5 * BS + 1, 1 * BS + 5, -1,
                          6 * BS + 2, 0 * BS + 7], dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(slots.numel() + 2, 3, H, D, generator=gen) * 4).to(dtype)
    qkv[0, 1, 0, :] = 0  # an all-zero key row: scale 0, codes 0
    return qkv[:, 1], qkv[:, 2], slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("int8,key_std", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_native_writes_equal_the_reference(dtype, int8, key_std, slot_dtype):
    """Every region, every byte of every page: the native call equals the pure-torch writes (the
    float32 sums too: both add the tokens in order), except that the sums of K² may differ in
    their last bit (the compiler may fuse the square into the addition). Bytes outside the
    regions are untouched."""
    layout = page_layout(dtype, int8, key_std)
    key, value, slots = step_tokens(dtype)
    slots = slots.to(slot_dtype)
    native, torch_pages = random_pages(layout), random_pages(layout)
    assert torch.equal(native, torch_pages)
    before = native.clone()
    got, want = carve(native, layout), carve(torch_pages, layout)
    _native()._write_page_regions(key, value, slots, *region_args(got))
    reference.write_page_regions(key, value, slots, *region_args(want))
    if key_std:
        torch.testing.assert_close(got["key_sq_sums"], want["key_sq_sums"], rtol=1e-5, atol=1e-6)
        got["key_sq_sums"].copy_(want["key_sq_sums"])
    assert torch.equal(native, torch_pages)
    assert not torch.equal(native, before)
    page = native.numel() // NB
    other = torch.arange(native.numel()).remainder(page) < 64
    assert torch.equal(native[other], before[other])


@pytest.mark.parametrize("int8,key_std", [(False, False), (True, True)])
def test_pages_written_step_by_step_hold_their_definitions(int8, key_std):
    """Two requests written as an engine writes them (a prefill chunk, then one token per decode
    step, interleaved; a freed block reused by the second request): key_rows hold the keys,
    value_sums each block's sum of values, the 8-bit cache quantize_key_t of the keys, and the
    key spread from the sums is key_channel_std of each request's keys."""
    C = _native()
    layout = page_layout(torch.float32, int8, key_std)
    storage = random_pages(layout, seed=1)
    regions = carve(storage, layout)
    lens = torch.tensor([29, 19], dtype=torch.int32)
    table = torch.tensor([[4, 0, 6, 2], [5, 1, 3, 6]], dtype=torch.int32)  # row 1: 3 blocks used
    S = table.shape[1] * BS
    gen = torch.Generator().manual_seed(2)
    K = torch.randn(2, H, S, D, generator=gen) * 2 + 1
    V = torch.randn(2, H, S, D, generator=gen)

    def slot(row, p):
        return int(table[row, p // BS]) * BS + p % BS

    def write(row_positions):
        slots = torch.tensor([slot(i, p) for i, p in row_positions])
        key = torch.stack([K[i, :, p] for i, p in row_positions])
        value = torch.stack([V[i, :, p] for i, p in row_positions])
        C._write_page_regions(key, value, slots, *region_args(regions))

    # Block 0 held 6 tokens of a request that was then preempted (freed): row 0 reuses it.
    junk = torch.randn(6, H, D, generator=gen) * 50
    C._write_page_regions(junk, junk, torch.arange(6), *region_args(regions))
    write([(0, p) for p in range(12)])  # prefill chunk: block 4, then block 0 from position 0
    write([(0, p) for p in range(12, 20)] + [(1, p) for p in range(10)])  # chunk + prefill
    for p in range(10, 19):
        write([(0, p + 10), (1, p)])  # decode steps, both rows
    for i in range(2):
        n = int(lens[i])
        used = table[i, : -(-n // BS)].long()
        for j, b in enumerate(used.tolist()):
            positions = range(j * BS, min(n, (j + 1) * BS))
            rows = K[i, :, j * BS: j * BS + len(positions)]  # (H, n_j, D)
            assert torch.equal(regions["key_rows"][b, :, : len(positions)], rows)
            torch.testing.assert_close(regions["value_sums"][b],
                                       V[i, :, j * BS: j * BS + len(positions)].sum(1))
            if int8:
                codes, scale = reference.quantize_key_t(rows)
                assert torch.equal(regions["key_t_int8"][b, :, :, : len(positions)], codes)
                assert torch.equal(regions["key_t_scale"][b, :, : len(positions)], scale)
    if key_std:
        valid = torch.arange(S)[None] < lens[:, None]
        want = sparq_ext.key_channel_std(K, valid)
        got = C._key_std_from_block_sums(regions["key_sums"], regions["key_sq_sums"], table, lens, BS)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            reference.key_std_from_block_sums(regions["key_sums"], regions["key_sq_sums"], table,
                                              lens, BS), want, rtol=1e-4, atol=1e-4)


def test_native_key_std_equals_the_reference():
    """Shuffled and shared blocks, partial last blocks, an empty row, table entries past a row's
    end that name a NaN block or are out of range, strided sums (a region of a page)."""
    lens = torch.tensor([300, 0, 129, 40], dtype=torch.int32)
    table, num_blocks = page_table(lens, 16, shared_blocks=2, seed=3)
    K = torch.randn(4, 2, table.shape[1] * 16, 8) * 3 + 5
    K[1:, :, :32] = K[:1, :, :32]
    cache = to_pages(K, table, lens, num_blocks, 16).nan_to_num(nan=0.0)
    sums, sq_sums = cache.sum(2), cache.square().sum(2)
    page = torch.full((num_blocks, 5, *sums.shape[1:]), float("nan"))
    page[:, 1], page[:, 3] = sums, sq_sums
    spare = sorted(set(range(num_blocks)) - set(table[(table >= 0) & (table < num_blocks)].tolist()))
    page[spare[0]] = float("nan")
    want_table = table.clone()
    want_table[table >= num_blocks] = spare[0]
    got = _native()._key_std_from_block_sums(page[:, 1], page[:, 3], table, lens, 16)
    want = reference.key_std_from_block_sums(page[:, 1], page[:, 3], want_table, lens, 16)
    assert want[1].eq(0).all() and not want.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,match", [
    (dict(slots=torch.tensor([0, NB * BS])), r"slot_mapping\[1\] = 56 is past"),
    (dict(slots=torch.tensor([[0]])), "slot_mapping must be 1-D"),
    (dict(slots=torch.tensor([0.0])), "slot_mapping must be int32 or int64"),
    (dict(key=torch.zeros(2, H, D, dtype=torch.bfloat16)), "key must have key_rows' dtype"),
    (dict(value=torch.zeros(1, H, D)), r"value must have shape \(>= tokens, H, D\)"),
    (dict(key=torch.zeros(2, H + 1, D)), r"key must have shape \(>= tokens, H, D\)"),
    (dict(value_sums=torch.zeros(NB, H, D, dtype=torch.float64)), "value_sums must be Float"),
    (dict(value_sums=torch.zeros(NB, H, D + 1)), r"value_sums must have shape \(num_blocks, H, D\)"),
    (dict(key_t_int8=torch.zeros(NB, H, D, BS, dtype=torch.int8)), "key_t_int8 and key_t_scale come together"),
    (dict(key_t_int8=torch.zeros(NB, H, BS, D, dtype=torch.int8), key_t_scale=torch.zeros(NB, H, BS)),
     r"key_t_int8 must have shape \(num_blocks, H, D, block_size\)"),
    (dict(key_sq_sums=torch.zeros(NB, H, D)), "key_sums and key_sq_sums come together"),
])
def test_write_rejections_name_the_argument(change, match):
    args = dict(key=torch.zeros(2, H, D), value=torch.zeros(2, H, D), slots=torch.tensor([0, 1]),
                key_rows=torch.zeros(NB, H, BS, D), value_sums=torch.zeros(NB, H, D)) | change
    with pytest.raises(RuntimeError, match=match):
        _native()._write_page_regions(
            args["key"], args["value"], args["slots"], args["key_rows"], args["value_sums"],
            key_t_int8=args.get("key_t_int8"), key_t_scale=args.get("key_t_scale"),
            key_sums=args.get("key_sums"), key_sq_sums=args.get("key_sq_sums"))


def test_key_std_rejections_name_the_argument():
    sums, table, lens = torch.zeros(NB, H, D), torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    C = _native()
    with pytest.raises(RuntimeError, match=r"key_sq_sums must have shape"):
        C._key_std_from_block_sums(sums, torch.zeros(NB, H, D + 1), table, lens, BS)
    with pytest.raises(RuntimeError, match="block_table must be int32"):
        C._key_std_from_block_sums(sums, sums, table.long(), lens, BS)
    with pytest.raises(RuntimeError, match=r"seq_lens must be int32 \(R,\)"):
        C._key_std_from_block_sums(sums, sums, table, lens[:1], BS)
    with pytest.raises(RuntimeError, match="block_size must be >= 1"):
        C._key_std_from_block_sums(sums, sums, table, lens, 0)
