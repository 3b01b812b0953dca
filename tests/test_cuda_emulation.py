"""The CUDA kernels, executed on the CPU: csrc/cuda/*.cu compiled as host code against a small
emulator of the CUDA execution model (tests/cuda_emu/emu.h: blocks run concurrently on worker
threads, so inter-block atomics and last-block-done counters really race; the threads of a
block are fibers with real barriers, warp intrinsics as rendezvous of the lanes in their mask;
the 48 KiB dynamic shared-memory limit is enforced), driven by the same launch sequence the
CUDA backend uses (csrc/include/sparq/cuda_pipeline.h), and compared with the pure-torch
reference: outputs, and the selected index sets exactly. This covers the kernels' indexing,
synchronisation, radix select and softmax merging in CI, where there is no GPU; it says
nothing about speed, and fp32 rounding differs from the GPU's fast-math intrinsics in the
last bits.

Needs g++ (C++20) and the CUDA toolkit's headers; skipped otherwise. The build (about a
minute) is cached per source hash under the system temp dir.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from sparq_ext import key_channel_std, quantize_key_t, sparq_attention_reference
from sparq_ext.reference import dense_attention_reference, valid_positions
from sparq_testutil import page_table, separated_query, to_pages

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["prep.cu", "approx_logits.cu", "topk.cu", "attend.cu"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_include():
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = Path(nvcc).resolve().parents[1] / "include"
        if (inc / "cuda_runtime.h").exists():
            return inc
    return None


def _build() -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("needs g++ and the CUDA toolkit headers to build the CPU emulation")
    files = [ROOT / "csrc" / "cuda" / f for f in SOURCES]
    files += sorted((ROOT / "csrc" / "include" / "sparq").glob("*"))
    files += [ROOT / "tests" / "cuda_emu" / "emu.h", ROOT / "tests" / "cuda_emu" / "driver.cpp"]
    files.append(Path(__file__))  # the build flags live here
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"sparq_emu_{digest}"
    lib = out_dir / "libsparq_emu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / "probe.cpp"  # the emulator needs C++20 <barrier> (GCC >= 11)
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); }\n")
    if subprocess.run([cxx, "-std=c++20", "-fsyntax-only", str(probe)],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{cxx} lacks C++20 <barrier>, needed by the CUDA emulator")
    # -fno-strict-aliasing: the kernels read 16-byte vectors through reinterpret_cast, as CUDA
    # code does; host compilers may not assume those accesses do not alias.
    common = [cxx, "-std=c++20", "-O2", "-fno-strict-aliasing", "-fPIC", "-Wall",
              "-Wno-unknown-pragmas",
              f"-I{ROOT / 'csrc' / 'include'}", f"-I{inc}"]
    objects = []
    for src in SOURCES:
        obj = out_dir / (src + ".o")
        subprocess.run(common + ["-x", "c++", "-include", str(ROOT / "tests/cuda_emu/emu.h"),
                                 "-DSPARQ_CUDA_EMULATION", "-c", str(ROOT / "csrc/cuda" / src),
                                 "-o", str(obj)], check=True, capture_output=True, text=True)
        objects.append(str(obj))
    drv = out_dir / "driver.o"
    subprocess.run(common + ["-c", str(ROOT / "tests/cuda_emu/driver.cpp"), "-o", str(drv)],
                   check=True, capture_output=True, text=True)
    tmp = out_dir / f"lib.{os.getpid()}.so"
    subprocess.run([cxx, "-shared", "-o", str(tmp), *objects, str(drv), "-lpthread"],
                   check=True, capture_output=True, text=True)
    tmp.replace(lib)
    return lib


TOPK_BLOCKS = {"from_sm_count": 0, "seven_blocks": 7}  # topk blocks per row (0: the plan's)


@pytest.fixture(params=list(TOPK_BLOCKS))
def topk_blocks(request):
    """Runs a test with the plan's topk block count and with rows split over 7 blocks (at the
    small S of these tests the plan would mostly take one)."""
    return TOPK_BLOCKS[request.param]


@pytest.fixture(scope="module")
def emu():
    try:
        lib = ctypes.CDLL(str(_build()))
    except subprocess.CalledProcessError as error:
        pytest.fail(f"emulation build failed:\n{error.stderr[-4000:]}")
    i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.sparq_emu_attention.restype = i32
    f32 = ctypes.c_float
    lib.sparq_emu_attention.argtypes = [i32, i64, i64, i64, i64, i64, i64, i64, i64, i32,
                                        f32, f32, vp, i64, i64] + [vp] * 14 + [i32, vp]
    lib.sparq_emu_paged_attention.restype = i32
    lib.sparq_emu_paged_attention.argtypes = [i32] + [i64] * 10 + [i32, f32, f32, vp, i64, i64] \
        + [vp] * 13 + [i64, vp, vp, i32, vp]
    lib.sparq_emu_plan.restype = None
    lib.sparq_emu_plan.argtypes = [i32, i64, i64, i64, i64, i64, i64, i64, vp, vp]
    lib.sparq_emu_set_smem_optin.argtypes = [i32]
    lib.sparq_emu_attribute_calls.restype = i32
    lib.sparq_emu_probe_smem_launch.restype = i32
    lib.sparq_emu_probe_smem_launch.argtypes = [i32, i32]
    return lib


def plan(lib, dtype, B, Hq, Hkv, S, D, k, sm_count=132):
    """(partitions, topk blocks per row) of the launch plan."""
    splits, blocks = ctypes.c_int64(), ctypes.c_int64()
    lib.sparq_emu_plan(DTYPE_CODE[dtype], B, Hq, Hkv, S, D, k, sm_count,
                       ctypes.byref(splits), ctypes.byref(blocks))
    return splits.value, blocks.value


def _ptr(t):
    return None if t is None else t.data_ptr()


def _strides(t):
    return None if t is None else torch.tensor(t.stride(), dtype=torch.int64)


def run_emulated(lib, q, k, v, r, kk, key_t=None, value_mean=None, seq_lens=None,
                 attn_mask=None, local_window=0, reallocate=True, scale=None, softcap=None,
                 sinks=None, key_t_scale=None, sm_count=132, topk_blocks=0, repeats=1,
                 return_topk=False, component_weights=None):
    """The emulated CUDA pipeline. ``q`` may sit at any storage offset (it must be contiguous,
    as the host glue makes it); ``k``/``v``/``key_t`` keep their strides (key_t needs a unit
    S-stride; int8 with ``key_t_scale``, any strides); ``sinks`` fp32 ``(Hq,)``. With
    ``return_topk`` also returns the selected positions, ``(B, Hkv, k_eff)`` int32 (-1 past each
    row's min(k, valid count))."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    assert q.is_contiguous() and (key_t is None or key_t.stride(-1) == 1 or S == 1)
    out = torch.full_like(q, float("nan"))
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(B, 1, 1, S).reshape(B, S).contiguous().to(torch.uint8)
    lens = None if seq_lens is None else seq_lens.to(torch.int64).contiguous()
    scale = D**-0.5 if scale is None else scale
    topk = torch.full((B, Hkv, min(kk, S)), -1, dtype=torch.int32)
    strides = [_strides(t) for t in (k, v, key_t, key_t_scale)]
    sinks = None if sinks is None else sinks.float().contiguous()
    weights = None if component_weights is None else component_weights.float().contiguous()
    err = lib.sparq_emu_attention(
        DTYPE_CODE[q.dtype], B, Hq, Hkv, S, D, r, kk, local_window, int(reallocate), scale,
        softcap or 0.0, _ptr(sinks), sm_count, topk_blocks, _ptr(q), _ptr(k), _ptr(strides[0]),
        _ptr(v), _ptr(strides[1]), _ptr(key_t), _ptr(strides[2]), _ptr(key_t_scale),
        _ptr(strides[3]), _ptr(value_mean), _ptr(lens), _ptr(mask), _ptr(out),
        _ptr(topk), repeats, _ptr(weights))
    assert err == 0, f"launch error {err}"
    return (out, topk) if return_topk else out


def assert_same_selection(topk, i2, valid_count):
    """The emulated topk's index sets equal the reference's exactly (rows of B x Hkv; only
    the first min(k, valid count) entries of a row are selections)."""
    B, Hkv, _ = topk.shape
    for b in range(B):
        n = int(min(topk.shape[-1], valid_count[b]))
        for h in range(Hkv):
            got = sorted(topk[b, h, :n].tolist())
            want = sorted(i2[b, h, :n].tolist())
            assert got == want, f"row (b={b}, h={h}): selected sets differ"
            assert (topk[b, h, n:] == -1).all()


def check(lib, q, k, v, r, kk, *, with_key_t=True, int8_key_t=False, atol=None,
          exact_choice=True, **kw):
    """The emulated pipeline against the reference: selected sets exactly (unless
    ``exact_choice`` is off), outputs within the dtype's tolerance. ``int8_key_t``: the 8-bit
    selection cache (``sparq_ext.quantize_key_t``) as key_t."""
    key_t = k.transpose(-1, -2).contiguous() if with_key_t else None
    if int8_key_t:
        key_t, kw["key_t_scale"] = quantize_key_t(k)
    if exact_choice:  # no ties at the top-r / top-k boundaries (see sparq_testutil)
        q = separated_query(q, k, r, kk, key_t=key_t, seq_lens=kw.get("seq_lens"),
                            attn_mask=kw.get("attn_mask"),
                            local_window=kw.get("local_window", 0), scale=kw.get("scale"),
                            softcap=kw.get("softcap"), key_t_scale=kw.get("key_t_scale"),
                            component_weights=kw.get("component_weights"))
    got, topk = run_emulated(lib, q, k, v, r, kk, key_t=key_t, return_topk=True, **kw)
    ref, i2 = sparq_attention_reference(q, k, v, r, kk, key_t, kw.get("value_mean"),
                                        kw.get("seq_lens"), kw.get("attn_mask"),
                                        kw.get("local_window", 0), kw.get("reallocate", True),
                                        kw.get("scale"), kw.get("softcap"), kw.get("sinks"),
                                        kw.get("key_t_scale"), kw.get("component_weights"),
                                        return_selection=True)
    assert torch.isfinite(got).all(), "NaN/inf in the emulated output (unwritten or bad math)"
    if exact_choice:
        valid = valid_positions(q.shape[0], k.shape[2], kw.get("seq_lens"), kw.get("attn_mask"))
        assert_same_selection(topk, i2, valid.sum(-1))
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[q.dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol or tol, rtol=atol or tol)
    return got


def inputs(B, Hq, Hkv, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_basic_gqa(emu, dtype):
    q, k, v = inputs(1, 4, 1, 700, 64, dtype, 0)
    check(emu, q, k, v, 8, 60)


@pytest.mark.parametrize("D", [64, 128, 256])
def test_head_dims(emu, D):
    q, k, v = inputs(1, 2, 2, 300, D, torch.bfloat16, D)
    check(emu, q, k, v, D // 4, 40, local_window=5)


def test_no_key_t_mask_window_seq_lens(emu, topk_blocks):
    B, S = 3, 900
    q, k, v = inputs(B, 2, 1, S, 64, torch.float32, 1)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[1, ..., :400] = False
    seq_lens = torch.tensor([900, 850, 0])
    check(emu, q, k, v, 16, 70, with_key_t=False, attn_mask=mask, seq_lens=seq_lens,
          local_window=30, topk_blocks=topk_blocks)


@pytest.mark.parametrize("reallocate", [True, False])
def test_value_mean_and_reallocate(emu, reallocate):
    q, k, v = inputs(2, 2, 2, 500, 64, torch.float32, 3)
    vm = torch.randn(2, 2, 1, 64)
    check(emu, q, k, v, 8, 50, value_mean=vm, reallocate=reallocate, scale=0.3)


def test_group_chunks_and_splits(emu):
    # G = 12 -> two group chunks of 8; k = 1000 over several flash-decoding splits.
    q, k, v = inputs(1, 12, 1, 2100, 64, torch.float16, 4)
    assert plan(emu, torch.float16, 1, 12, 1, 2100, 64, 1000)[0] > 1
    check(emu, q, k, v, 8, 1000, local_window=100)


def test_k_covers_everything(emu):
    q, k, v = inputs(1, 2, 1, 200, 64, torch.float32, 5)
    check(emu, q, k, v, 64, 500, local_window=500)  # k > S, window = all: dense
    check(emu, q, k, v, 3, 200)  # k = S


@pytest.mark.parametrize("kk", [10, 25, 37, 50, 190])
def test_ties_any_choice_is_right(emu, kk, topk_blocks):
    # Keys and values constant within 4 groups of positions (sizes 10, 15, 25, 150), so every
    # approximate score ties inside its group and the k-th often falls inside one: the radix
    # select must take exactly the right number from the tied group, and any choice among
    # equal rows gives the same output.
    S, D = 200, 64
    g = torch.Generator().manual_seed(kk)
    group = torch.repeat_interleave(torch.arange(4), torch.tensor([10, 15, 25, 150]))
    group = group[torch.randperm(S, generator=g)]
    rows_k = torch.randn(4, D, generator=g)
    rows_k[1:] *= torch.tensor([0.7, 0.4, 0.1])[:, None]  # ordered approximate scores
    q = (rows_k[0] * 3).view(1, 1, 1, D).expand(1, 2, 1, D).contiguous()
    k = rows_k[group].view(1, 1, S, D)
    v = torch.randn(4, D, generator=g)[group].view(1, 1, S, D)
    check(emu, q, k, v, 64, kk, exact_choice=False, topk_blocks=topk_blocks)
    check(emu, q, k, v, 64, kk, exact_choice=False, reallocate=False, topk_blocks=topk_blocks)


def test_multiple_topk_blocks(emu, topk_blocks):
    # S > 4096 keys: several topk blocks per row when forced (candidates gathered from all of
    # them, refined by the last one to finish).
    q, k, v = inputs(1, 1, 1, 9000, 64, torch.bfloat16, 6)
    check(emu, q, k, v, 4, 700, seq_lens=torch.tensor([8999]), local_window=10,
          topk_blocks=topk_blocks)


@pytest.mark.parametrize("D,dtype", [(32, torch.float32), (80, torch.float16),
                                     (200, torch.bfloat16), (256, torch.float32),
                                     (128, torch.float32), (64, torch.float16)])
def test_head_dims_inside_buckets(emu, D, dtype):
    # D below its instantiated bucket (lanes without components), and fp32 rows that take
    # two 16-byte loads per lane (D = 256).
    q, k, v = inputs(2, 4, 2, 400, D, dtype, D + 1)
    check(emu, q, k, v, max(1, D // 8), 64, local_window=4, seq_lens=torch.tensor([400, 333]))


def test_window_only_and_single_position(emu):
    q, k, v = inputs(1, 2, 1, 1, 64, torch.float32, 7)
    check(emu, q, k, v, 8, 1, local_window=1)
    q, k, v = inputs(1, 2, 1, 50, 64, torch.float32, 8)
    check(emu, q, k, v, 8, 20, local_window=20)  # the whole top-k is the window


@pytest.mark.parametrize("case", range(int(os.environ.get("SPARQ_EMU_CASES", "12"))))
def test_randomised_options(emu, case):
    # Hypothesis-style sweep with a fixed seed per case: shapes, dtypes and every option.
    g = torch.Generator().manual_seed(1000 + case)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    B, Hkv, G = pick([1, 2, 3]), pick([1, 2]), pick([1, 2, 4, 5, 8, 9])
    D = pick([32, 64, 72, 128, 256])
    S = int(torch.randint(1, 2500, (1,), generator=g))
    dtype = pick([torch.float32, torch.float16, torch.bfloat16])
    r = int(torch.randint(1, D + 1, (1,), generator=g))
    kk = int(torch.randint(1, S + 50, (1,), generator=g))
    window = pick([0, 0, int(torch.randint(0, kk + 1, (1,), generator=g))])
    q, k, v = inputs(B, G * Hkv, Hkv, S, D, dtype, 2000 + case)
    kw = dict(local_window=window, reallocate=pick([True, True, False]))
    if case % 2:  # odd cases split each row's topk over several blocks
        kw["topk_blocks"] = pick([2, 3, 5, 16])
    if pick([False, True]):
        kw["seq_lens"] = torch.randint(0, S + 1, (B,), generator=g)
    if pick([False, True]):
        mask = torch.rand(B, 1, 1, S, generator=g) > pick([0.1, 0.5, 0.9])
        kw["attn_mask"] = mask
    if pick([False, True]):
        kw["value_mean"] = torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
    if pick([False, True]):
        kw["scale"] = float(torch.rand(1, generator=g)) + 0.01
    with_key_t = pick([True, False])
    if pick([False, False, True]):
        kw["softcap"] = pick([1.0, 5.0, 30.0])
    if pick([False, False, True]):
        kw["sinks"] = torch.randn(G * Hkv, generator=g) * 2 + 3
    int8_key_t = with_key_t and pick([False, False, True])
    check(emu, q, k, v, r, kk, with_key_t=with_key_t, int8_key_t=int8_key_t, **kw)


# ---- long rows: the selected sets exactly, with topk split over blocks from the SM count ----

@pytest.mark.parametrize("S", [12000, 12288, 32768, 32769, 70000])
def test_long_rows_select_exactly_the_reference_set(emu, S):
    # Around 12K the old one-block top-k overran its shared memory; 32K was its limit. At
    # B * Hkv = 2 the plan splits each row's topk over many blocks.
    q, k, v = inputs(1, 8, 2, S, 64, torch.bfloat16, S)
    assert plan(emu, torch.bfloat16, 1, 8, 2, S, 64, S // 16)[1] > 1
    check(emu, q, k, v, 16, S // 16, local_window=S // 64, seq_lens=torch.tensor([S - 5]))


def test_no_launch_needs_more_than_48k_shared_memory(emu):
    # An sm_86/89/120-like device (99 KiB opt-in): every kernel fits the default 48 KiB, so
    # no launch opts in, whatever S.
    emu.sparq_emu_set_smem_optin(99 * 1024)
    try:
        before = emu.sparq_emu_attribute_calls()
        q, k, v = inputs(1, 4, 1, 12288, 64, torch.float32, 12)
        check(emu, q, k, v, 8, 1000)
        assert emu.sparq_emu_attribute_calls() == before
    finally:
        emu.sparq_emu_set_smem_optin(227 * 1024)


def test_emulator_enforces_the_dynamic_shared_memory_limit(emu):
    assert emu.sparq_emu_probe_smem_launch(48 * 1024, 0) == 0
    assert emu.sparq_emu_probe_smem_launch(48 * 1024 + 16, 0) != 0  # no opt-in: refused
    assert emu.sparq_emu_probe_smem_launch(64 * 1024, 64 * 1024) == 0
    assert emu.sparq_emu_probe_smem_launch(300 * 1024, 300 * 1024) != 0  # above the device's


# ---- structure: layouts, ragged rows, replays; fp32 too (exact choice, tight tolerance) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unaligned_and_offset_inputs(emu, dtype):
    B, Hq, Hkv, S, D = 2, 4, 2, 700, 64
    q0, k0, v0 = inputs(B, Hq, Hkv, S, D, dtype, 21)
    # query one element past an aligned start: contiguous but not 16-byte aligned
    buf = torch.empty(q0.numel() + 1, dtype=dtype)
    q = buf[1:].view_as(q0).copy_(q0)
    assert q.data_ptr() % 16 != 0
    # key rows strided (a slice of wider rows), value at an odd storage offset (copied, as the
    # host glue does), key_t with a component stride that breaks 16-byte rows (scalar loads)
    k = torch.zeros(B, Hkv, S, D + 8, dtype=dtype)[..., :D].copy_(k0)
    vbuf = torch.empty(v0.numel() + 1, dtype=dtype)
    v = vbuf[1:].view_as(v0).copy_(v0)
    kt = torch.zeros(B, Hkv, D, S + 3, dtype=dtype)[..., :S].copy_(k0.transpose(-1, -2))
    q_sep = separated_query(q0, k0, 8, 60)
    q.copy_(q_sep)
    got, topk = run_emulated(emu, q, k, v, 8, 60, key_t=kt, return_topk=True)
    ref, i2 = sparq_attention_reference(q_sep, k0, v0, 8, 60, return_selection=True)
    assert_same_selection(topk, i2, torch.full((B,), S))
    tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ragged_rows(emu, dtype, topk_blocks):
    q, k, v = inputs(4, 6, 2, 3000, 64, dtype, 22)
    check(emu, q, k, v, 12, 300, seq_lens=torch.tensor([3000, 1, 0, 2047]), local_window=20,
          topk_blocks=topk_blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_replay_on_a_dirty_workspace(emu, dtype):
    # A CUDA graph replays the same kernels on the same workspace: prep must clear every
    # counter and histogram, or the second run selects and merges garbage.
    q, k, v = inputs(2, 4, 2, 2500, 64, dtype, 23)
    q = separated_query(q, k, 8, 200)
    once = run_emulated(emu, q, k, v, 8, 200, topk_blocks=3)
    thrice, topk = run_emulated(emu, q, k, v, 8, 200, topk_blocks=3, repeats=3,
                                return_topk=True)
    # Not bit-equal: concurrent topk blocks claim output slots in a different order each run,
    # so attend sums the same rows in another order (rounding only).
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(thrice, once, atol=tol, rtol=tol)
    _, i2 = sparq_attention_reference(q, k, v, 8, 200, return_selection=True)
    assert_same_selection(topk, i2, torch.full((2,), 2500))


def test_nan_rule(emu):
    # docs/cuda-pipeline.md's NaN rule, as tests/test_semantics.py checks it on the other
    # backends: a NaN approximate logit ranks below every other valid position.
    S, D = 120, 16
    q, k, v = inputs(1, 4, 2, S, D, torch.float32, 11)
    top = q[0, :2, 0].abs().sum(0).argmax()
    q[0, :2, 0, top] += 5.0 * torch.sign(q[0, :2, 0, top])
    k[0, 0, 37, top] = float("nan")
    got, topk = run_emulated(emu, q, k, v, 4, 10, reallocate=False, return_topk=True)
    assert torch.isfinite(got).all() and 37 not in topk[0, 0].tolist()
    _, i2 = sparq_attention_reference(q, k, v, 4, 10, reallocate=False, return_selection=True)
    assert_same_selection(topk, i2, torch.tensor([S]))
    got, topk = run_emulated(emu, q, k, v, 4, S - 1, reallocate=False, return_topk=True)
    assert torch.isfinite(got).all() and 37 not in topk[0, 0].tolist()
    got = run_emulated(emu, q, k, v, 4, S, reallocate=False)
    assert torch.isnan(got[0, :2]).all() and torch.isfinite(got[0, 2:]).all()
    got = run_emulated(emu, q, k, v, 4, 10)  # alpha of the NaN group is NaN
    assert torch.isnan(got[0, :2]).all() and torch.isfinite(got[0, 2:]).all()


# ---- softcap (Gemma 2) and sinks (gpt-oss): docs/design.md section 1's softmax variants ----

def sink_logits(Hq, seed, loc):
    """fp32 sink logits around ``loc`` (near the logsumexp of a test's logits, so that each
    sink takes a real share of its head's softmax and dropping it shows)."""
    g = torch.Generator().manual_seed(seed + 101)
    return torch.randn(Hq, generator=g) * 2 + loc


SOFTMAX_VARIANTS = {"softcap": (4.0, False), "sinks": (None, True), "softcap_sinks": (4.0, True)}


@pytest.mark.parametrize("variant", list(SOFTMAX_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# MHA; GQA in one group chunk; G = 12, two chunks of 8 heads (with softcap one block forms
# both: the selection score sums every head's capped logit)
@pytest.mark.parametrize("G", [1, 4, 12])
def test_softcap_and_sinks(emu, variant, dtype, G):
    softcap, with_sinks = SOFTMAX_VARIANTS[variant]
    B, Hkv, S = 3, 2, 700
    q, k, v = inputs(B, G * Hkv, Hkv, S, 64, dtype, 50 + G)
    q = (q.float() * 3).to(dtype)  # logits of a few units (std 3): the cap bends them
    g = torch.Generator().manual_seed(51)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.2
    mask[1, ..., :300] = False
    seq_lens = torch.tensor([700, 650, 0])  # an empty row: zeros, with a sink too
    sinks = sink_logits(G * Hkv, G, loc=9.0) if with_sinks else None
    for reallocate in (True, False):
        got = check(emu, q, k, v, 12, 60, attn_mask=mask, seq_lens=seq_lens, local_window=8,
                    softcap=softcap, sinks=sinks, reallocate=reallocate, topk_blocks=3)
        assert not got[2].any(), "a row without valid positions gives zeros"


@pytest.mark.parametrize("G", [1, 12])
def test_softcap_and_sinks_dense_limit(emu, G):
    # k >= the valid length: alpha = 1 exactly with the sink counted as selected, so the output
    # is dense attention with the cap and the sink (float64 reference written independently).
    q, k, v = inputs(2, G * 2, 2, 300, 64, torch.float32, 60 + G)
    q = q * 3
    sinks = sink_logits(G * 2, G, loc=7.0)
    lens = torch.tensor([300, 117])
    got = check(emu, q, k, v, 8, 400, seq_lens=lens, local_window=5, softcap=4.0, sinks=sinks)
    dense = dense_attention_reference(q.double(), k.double(), v.double(), seq_lens=lens,
                                      softcap=4.0, sinks=sinks)
    torch.testing.assert_close(got.double(), dense, atol=2e-5, rtol=2e-5)


# ---- the 8-bit selection cache: int8 key_t with key_t_scale (docs/design.md) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("G", [1, 4, 12])
def test_int8_key_t(emu, dtype, G):
    # S = 704: whole runs of 4 / 8 positions, so approx_logits reads key_t with 4- or 8-byte
    # loads; alpha comes from key_t's column at each selected position, not from K.
    B, Hkv, S = 3, 2, 704
    q, k, v = inputs(B, G * Hkv, Hkv, S, 64, dtype, 70 + G)
    g = torch.Generator().manual_seed(71)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.2
    mask[1, ..., :300] = False
    seq_lens = torch.tensor([704, 650, 0])
    for reallocate in (True, False):
        got = check(emu, q, k, v, 12, 60, int8_key_t=True, attn_mask=mask, seq_lens=seq_lens,
                    local_window=8, reallocate=reallocate, topk_blocks=3)
        assert not got[2].any(), "a row without valid positions gives zeros"
    # k beyond every row: dense attention whatever the 8-bit keys rank
    got = check(emu, q, k, v, 12, 1000, int8_key_t=True, attn_mask=mask, seq_lens=seq_lens)
    dense = sparq_attention_reference(q, k, v, 64, 1000, seq_lens=seq_lens, attn_mask=mask)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), dense.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("G", [1, 12])
def test_int8_key_t_with_softcap_and_sinks(emu, dtype, G):
    q, k, v = inputs(2, G * 2, 2, 1500, 128, dtype, 80 + G)
    q = (q.float() * 3).to(dtype)
    sinks = sink_logits(G * 2, G, loc=9.0)
    for reallocate in (True, False):
        check(emu, q, k, v, 28, 100, int8_key_t=True, seq_lens=torch.tensor([1500, 999]),
              local_window=25, softcap=4.0, sinks=sinks, reallocate=reallocate)


@pytest.mark.parametrize("D,dtype", [(32, torch.float32), (80, torch.float16),
                                     (256, torch.float32), (256, torch.bfloat16)])
def test_int8_key_t_head_dims(emu, D, dtype):
    # every lane layout of attend (4 or 8 components per lane, lanes without components)
    q, k, v = inputs(2, 4, 2, 400, D, dtype, D + 3)
    check(emu, q, k, v, max(1, D // 4), 64, int8_key_t=True, local_window=4,
          seq_lens=torch.tensor([400, 333]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_key_t_strided_and_unaligned(emu, dtype):
    # S = 701: rows that are not whole runs (elementwise loads); key_t a view of a wider cache
    # (rows at an odd stride), key_t_scale a strided view (positions outer to heads).
    B, Hkv, S, D = 2, 2, 701, 64
    q, k, v = inputs(B, 4, Hkv, S, D, dtype, 90)
    kt8, scale = quantize_key_t(k)
    key_t = torch.zeros(B, Hkv, D, S + 5, dtype=torch.int8)[..., :S].copy_(kt8)
    key_t_scale = torch.zeros(B, S, Hkv).transpose(1, 2).copy_(scale)
    assert key_t_scale.stride(-1) != 1 and key_t.stride(2) % 4 != 0
    q = separated_query(q, k, 12, 60, key_t=kt8, key_t_scale=scale, local_window=3)
    got, topk = run_emulated(emu, q, k, v, 12, 60, key_t=key_t, key_t_scale=key_t_scale,
                             local_window=3, return_topk=True)
    ref, i2 = sparq_attention_reference(q, k, v, 12, 60, kt8, local_window=3, key_t_scale=scale,
                                        return_selection=True)
    assert_same_selection(topk, i2, torch.full((B,), S))
    tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


# ---- component_weights: step 1 ranks w * sum_g |q_g| (prep) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("int8_key_t", [False, True], ids=["key_t", "int8_key_t"])
def test_component_weights(emu, dtype, G, int8_key_t):
    # weights from the keys' channel std (the library's rule), a zero weight among them, and
    # D = 72 (not a multiple of 8 would be padded by the host glue; 72 is, with 9 lanes of 8)
    B, Hkv, S, D = 2, 2, 600, 72
    q, k, v = inputs(B, G * Hkv, Hkv, S, D, dtype, 110 + G)
    seq_lens = torch.tensor([600, 333])
    w = key_channel_std(k, valid_positions(B, S, seq_lens))
    w[0, 1, 5] = 0.0
    for reallocate in (True, False):
        check(emu, q, k, v, 10, 50, int8_key_t=int8_key_t, seq_lens=seq_lens, local_window=6,
              reallocate=reallocate, component_weights=w)
    # unit weights are the paper's rule: bit for bit the call without them
    plain = run_emulated(emu, q, k, v, 10, 50, seq_lens=seq_lens)
    unit = run_emulated(emu, q, k, v, 10, 50, seq_lens=seq_lens,
                        component_weights=torch.ones(B, Hkv, D))
    assert torch.equal(plain, unit)


# ---- paged_attention: the same kernels with the block table as their position policy ----

def run_emulated_paged(lib, q, key_cache, value_cache, block_table, seq_lens, r, kk,
                       key_t_cache=None, value_mean=None, local_window=0, reallocate=True,
                       scale=None, softcap=None, sinks=None, key_t_scale=None, sm_count=132,
                       topk_blocks=0, repeats=1, component_weights=None):
    """The emulated pipeline on a paged cache, as paged_attention_cuda calls it: ``q``
    ``(R, Hq, D)`` contiguous; caches, table, lengths and ``key_t_scale`` (with an int8
    ``key_t_cache``) keep their strides. Returns the output
    and the selected positions ``(R, Hkv, min(k, max_blocks * block_size))`` (-1 past each
    row's min(k, length))."""
    R, Hq, D = q.shape
    num_blocks, Hkv, block_size, _ = key_cache.shape
    max_blocks = block_table.shape[1]
    assert q.is_contiguous() and block_table.dtype == seq_lens.dtype == torch.int32
    out = torch.full_like(q, float("nan"))
    topk = torch.full((R, Hkv, min(kk, max_blocks * block_size)), -1, dtype=torch.int32)
    strides = [_strides(t) for t in (key_cache, value_cache, key_t_cache, block_table,
                                     key_t_scale)]
    vm = None if value_mean is None else value_mean.contiguous()
    sinks = None if sinks is None else sinks.float().contiguous()
    weights = None if component_weights is None else component_weights.float().contiguous()
    err = lib.sparq_emu_paged_attention(
        DTYPE_CODE[q.dtype], R, Hq, Hkv, num_blocks, block_size, max_blocks, D, r, kk,
        local_window, int(reallocate), D**-0.5 if scale is None else scale, softcap or 0.0,
        _ptr(sinks), sm_count, topk_blocks, _ptr(q), _ptr(key_cache), _ptr(strides[0]),
        _ptr(value_cache), _ptr(strides[1]), _ptr(key_t_cache), _ptr(strides[2]),
        _ptr(key_t_scale), _ptr(strides[4]), _ptr(vm), _ptr(block_table), _ptr(strides[3]),
        _ptr(seq_lens), seq_lens.stride(0), _ptr(out), _ptr(topk), repeats, _ptr(weights))
    assert err == 0, f"launch error {err}"
    return out, topk


ENGINE_LAYOUT = (0, 2, 1, 3)  # (num_blocks, block_size, Hkv, D) storage seen through transpose(1, 2)


def check_paged(lib, *, seq_lens, block_size, dtype=torch.float32, R_G_Hkv_D=(None, 4, 2, 64),
                r=8, kk=40, local_window=8, key_t="contiguous", storage_order=(0, 1, 2, 3),
                shared_blocks=2, value_mean=False, reallocate=True, scale=None, softcap=None,
                sinks=None, int8_key_t=False, topk_blocks=0, repeats=1, seed=0,
                component_weights=False):
    """paged_attention on the emulator against attention on the de-paged contiguous cache:
    the emulated contiguous pipeline (same selection exactly, outputs up to summation order)
    and the reference (same selection exactly, outputs within the dtype's tolerance).
    ``key_t``: None, "contiguous" (a contiguous (num_blocks, Hkv, D, block_size) cache) or a
    storage order of the keys whose transpose(2, 3) view is passed (any strides). With
    ``int8_key_t`` it is the 8-bit selection cache, its scales paged in the same storage order
    (an engine layout gives a strided ``key_t_scale`` view). ``component_weights``: step 1 ranks
    by each row's key channel std."""
    _, G, Hkv, D = R_G_Hkv_D
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    R = len(seq_lens)
    table, num_blocks = page_table(lens, block_size, shared_blocks=shared_blocks, seed=seed)
    S = table.shape[1] * block_size
    q, K, V = inputs(R, G * Hkv, Hkv, S, D, dtype, seed)
    shared = min(shared_blocks * block_size, S)
    K[1:, :, :shared] = K[:1, :, :shared]  # rows sharing blocks share those positions
    V[1:, :, :shared] = V[:1, :, :shared]
    K_t, kt_scale = K.transpose(-1, -2).contiguous(), None
    if int8_key_t:
        K_t, kt_scale = quantize_key_t(K)
    weights = None
    if component_weights:
        weights = key_channel_std(K, valid_positions(R, S, lens))
        weights[lens == 0] = 1.0  # an empty row's are zeros: every component would tie
    q = separated_query(q, K, r, kk, key_t=K_t, seq_lens=lens, local_window=local_window,
                        scale=scale, softcap=softcap, key_t_scale=kt_scale, seed=seed,
                        component_weights=weights)
    key_cache = to_pages(K, table, lens, num_blocks, block_size, storage_order=storage_order)
    value_cache = to_pages(V, table, lens, num_blocks, block_size, storage_order=storage_order)
    key_t_rows = K_t.transpose(-1, -2)  # (R, Hkv, S, D) in key_t's dtype
    key_t_cache = scale_cache = None
    if key_t == "contiguous":
        key_t_cache = to_pages(key_t_rows, table, lens, num_blocks,
                               block_size).transpose(2, 3).contiguous()
    elif key_t is not None:
        key_t_cache = to_pages(key_t_rows, table, lens, num_blocks, block_size,
                               storage_order=key_t).transpose(2, 3)
    if int8_key_t:  # (num_blocks, Hkv, block_size), stored in key_t's order
        order = key_t if isinstance(key_t, tuple) else (0, 1, 2, 3)
        scale_cache = to_pages(kt_scale[..., None], table, lens, num_blocks, block_size,
                               storage_order=order)[..., 0]
    vm = None
    if value_mean:  # any (R, Hkv, D) values
        vm = torch.randn(R, Hkv, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    kw = dict(local_window=local_window, reallocate=reallocate, scale=scale, softcap=softcap,
              sinks=sinks, topk_blocks=topk_blocks, component_weights=weights)
    got, topk = run_emulated_paged(lib, q[:, :, 0].contiguous(), key_cache, value_cache, table,
                                   lens, r, kk, key_t_cache=key_t_cache, value_mean=vm,
                                   key_t_scale=scale_cache, repeats=repeats, **kw)
    vm4 = None if vm is None else vm[:, :, None]
    contiguous, topk_c = run_emulated(lib, q, K, V, r, kk, key_t=K_t if key_t else None,
                                      value_mean=vm4, seq_lens=lens, key_t_scale=kt_scale,
                                      return_topk=True, **kw)
    ref, i2 = sparq_attention_reference(q, K, V, r, kk, K_t if key_t else None, vm4, lens, None,
                                        local_window, reallocate, scale, softcap, sinks, kt_scale,
                                        weights, return_selection=True)
    assert torch.isfinite(got).all(), "NaN/inf in the paged output (an unowned slot read?)"
    assert_same_selection(topk, i2, lens)
    assert_same_selection(topk, topk_c.long(), lens)
    tight = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got, contiguous[:, :, 0], atol=tight, rtol=tight)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), ref[:, :, 0].float(), atol=tol, rtol=tol)
    for i, n in enumerate(seq_lens):
        if n == 0:
            assert not got[i].any(), f"row {i} has no positions: zeros"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 48, 128, 20])
@pytest.mark.parametrize("key_t", [None, "contiguous"], ids=["no_key_t", "key_t"])
def test_paged_matches_contiguous(emu, dtype, block_size, key_t):
    # Shuffled blocks, two shared between rows, partial last blocks, an empty row; block
    # size 48 (a multiple of the vector width, not a power of two) and 20 (not a multiple of
    # bf16's 8 positions per 16-byte load: runs straddle blocks, key_t read elementwise).
    check_paged(emu, seq_lens=(300, 0, 129, 7), block_size=block_size, dtype=dtype,
                key_t=key_t, seed=block_size)


@pytest.mark.parametrize("key_t", [ENGINE_LAYOUT, (1, 0, 3, 2)], ids=["key_t_engine_layout",
                                                                      "key_t_heads_outer"])
def test_paged_strided_views(emu, key_t, topk_blocks):
    # An engine's (num_blocks, block_size, Hkv, D) caches through transpose(1, 2), read in
    # place; key_t_cache as a transposed view whose positions are not consecutive in memory.
    check_paged(emu, seq_lens=(200, 77, 16, 1), block_size=16, storage_order=ENGINE_LAYOUT,
                key_t=key_t, kk=24, local_window=4, topk_blocks=topk_blocks, seed=5)


def test_paged_copied_rows_and_strided_table(emu):
    # K / V rows that are not contiguous in D (copied by the host glue), a block table and
    # lengths that are strided views of larger tensors.
    check_paged(emu, seq_lens=(70, 33, 5), block_size=16, storage_order=(0, 1, 3, 2),
                key_t=None, kk=12, local_window=2, seed=11)
    lens = torch.tensor([70, 0, 33, 0, 5, 0], dtype=torch.int32)[::2]
    table, num_blocks = page_table(lens, 16, seed=11)
    wide = torch.full((3, 2 * table.shape[1]), 1 << 30, dtype=torch.int32)
    wide[:, ::2] = table
    q, K, V = inputs(3, 4, 2, table.shape[1] * 16, 64, torch.float32, 11)
    q = separated_query(q, K, 8, 12, seq_lens=lens, local_window=2)
    caches = [to_pages(x, table, lens, num_blocks, 16) for x in (K, V)]
    got, topk = run_emulated_paged(emu, q[:, :, 0].contiguous(), *caches, wide[:, ::2], lens,
                                   8, 12, local_window=2)
    ref, i2 = sparq_attention_reference(q, K, V, 8, 12, seq_lens=lens, local_window=2,
                                        return_selection=True)
    assert_same_selection(topk, i2, lens)
    torch.testing.assert_close(got, ref[:, :, 0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("value_mean", [True, False], ids=["value_mean", "mean_none"])
@pytest.mark.parametrize("reallocate", [True, False])
def test_paged_options(emu, value_mean, reallocate):
    check_paged(emu, seq_lens=(37, 12, 64), block_size=16, R_G_Hkv_D=(None, 2, 2, 128),
                kk=9, local_window=3, shared_blocks=1, value_mean=value_mean,
                reallocate=reallocate, scale=0.3, dtype=torch.float16, seed=3)


@pytest.mark.parametrize("int8_key_t", [False, True], ids=["key_t", "int8_key_t"])
def test_paged_component_weights(emu, int8_key_t):
    check_paged(emu, seq_lens=(300, 0, 129, 7), block_size=16, key_t="contiguous",
                int8_key_t=int8_key_t, component_weights=True, seed=5)


def test_paged_every_row_empty(emu):
    q = torch.randn(2, 4, 64)
    cache = torch.full((3, 2, 16, 64), float("nan"))
    table = torch.full((2, 2), 1 << 30, dtype=torch.int32)
    got, topk = run_emulated_paged(emu, q, cache, cache, table,
                                   torch.zeros(2, dtype=torch.int32), 8, 10)
    assert torch.equal(got, torch.zeros_like(got)) and (topk == -1).all()


def test_paged_replay_on_a_dirty_workspace(emu):
    check_paged(emu, seq_lens=(1000, 333), block_size=16, dtype=torch.bfloat16, kk=100,
                topk_blocks=3, repeats=3, seed=23)


def test_paged_long_row_multi_block_topk(emu):
    # 40000 positions in blocks of 128: approx_logits over many tiles and topk over several
    # blocks per row (from the SM count), one row beside a short one.
    S, block_size = 40000, 128
    assert plan(emu, torch.bfloat16, 2, 8, 2, -(-S // block_size + 1) * block_size, 64,
                S // 16)[1] > 1
    check_paged(emu, seq_lens=(S, 1000), block_size=block_size, dtype=torch.bfloat16,
                R_G_Hkv_D=(None, 4, 2, 64), r=16, kk=S // 16, local_window=S // 64, seed=40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size,G", [(16, 4), (20, 9)])  # G = 9: two group chunks
def test_paged_softcap_and_sinks(emu, dtype, block_size, G):
    # logits of std 1 here: softcap 1 bends them; sinks near their logsumexp
    check_paged(emu, seq_lens=(300, 0, 129, 7), block_size=block_size, dtype=dtype,
                R_G_Hkv_D=(None, G, 2, 64), softcap=1.0, sinks=sink_logits(2 * G, G, loc=5.0),
                key_t=ENGINE_LAYOUT, seed=block_size)
    check_paged(emu, seq_lens=(300, 0, 129, 7), block_size=block_size, dtype=dtype,
                R_G_Hkv_D=(None, G, 2, 64), sinks=sink_logits(2 * G, G, loc=5.0),
                reallocate=False, seed=block_size + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size,key_t", [(16, "contiguous"), (20, "contiguous"),
                                              (16, ENGINE_LAYOUT)],
                         ids=["vector_loads", "elementwise", "engine_layout"])
def test_paged_int8_key_t(emu, dtype, block_size, key_t):
    # block size 16: whole runs per block (4- / 8-byte loads); 20: not for bf16's 8 positions;
    # the engine layout: key_t_cache and key_t_scale as strided views, read in place.
    check_paged(emu, seq_lens=(300, 0, 129, 7), block_size=block_size, dtype=dtype,
                key_t=key_t, int8_key_t=True, kk=40, seed=block_size + 100)
    check_paged(emu, seq_lens=(200, 77), block_size=block_size, dtype=dtype, key_t=key_t,
                R_G_Hkv_D=(None, 9, 2, 64), int8_key_t=True, softcap=1.0,
                sinks=sink_logits(18, 9, loc=5.0), kk=24, local_window=4, seed=block_size + 101)
