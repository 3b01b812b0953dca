"""What paging costs: ``sparq_ext.paged_attention`` on a paged cache against ``sparq_ext.attention``
on the same keys and values laid out contiguously, one shape, eager, median time per call.

The paged cache is held as an engine holds it: ``(num_blocks, block_size, Hkv, D)`` passed as its
``transpose(1, 2)``, blocks shuffled over the whole cache; ``key_t_cache`` a contiguous
``(num_blocks, Hkv, D, block_size)``, ``value_mean`` given to both (as at the standard shape: no
dense pass over V). Prints one line per operator and their ratio.

    python benchmarks/bench_paged.py                       # CUDA: B=8, Hq=32, Hkv=8, D=128, S=32K
    python benchmarks/bench_paged.py --device cpu --batch 1 --seq 2048 --iters 3
"""

from __future__ import annotations

import argparse

import torch

import sparq_ext
from sparq_ext.evaluation import timing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--query-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=32768, help="positions per row")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--k-ratio", type=int, default=16, help="k = seq / k-ratio")
    parser.add_argument("--iters", type=int, default=50)
    return parser.parse_args(argv)


def paged_inputs(B, Hq, Hkv, S, D, block_size, dtype, device, seed=0):
    """Contiguous (query, K, V, key_t, value_mean) and the same data as a shuffled paged cache."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=gen, device=device).to(dtype)
    K = torch.randn(B, Hkv, S, D, generator=gen, device=device).to(dtype)
    V = torch.randn(B, Hkv, S, D, generator=gen, device=device).to(dtype)
    per_row = -(-S // block_size)
    num_blocks = B * per_row
    order = torch.randperm(num_blocks, generator=gen, device=device)
    table = order.view(B, per_row).to(torch.int32)

    def to_pages(x):  # (B, Hkv, S, D) -> engine storage (num_blocks, block_size, Hkv, D)
        padded = torch.nn.functional.pad(x, (0, 0, 0, per_row * block_size - S))
        blocks = padded.view(B, Hkv, per_row, block_size, D).permute(0, 2, 3, 1, 4)
        storage = torch.empty(num_blocks, block_size, Hkv, D, dtype=dtype, device=device)
        storage[order] = blocks.reshape(num_blocks, block_size, Hkv, D)
        return storage.transpose(1, 2)

    key_cache, value_cache = to_pages(K), to_pages(V)
    key_t_cache = key_cache.transpose(2, 3).contiguous()
    value_mean = V.float().mean(2).to(dtype)
    lens = torch.full((B,), S, dtype=torch.int32, device=device)
    contiguous = (q, K, V, K.transpose(-1, -2).contiguous(), value_mean[:, :, None], lens)
    paged = (q[:, :, 0].contiguous(), key_cache, value_cache, table, lens, key_t_cache, value_mean)
    return contiguous, paged


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    S, k = args.seq, max(1, args.seq // args.k_ratio)
    (q, K, V, Kt, vm, lens), (pq, kc, vc, table, plens, ktc, pvm) = paged_inputs(
        args.batch, args.query_heads, args.kv_heads, S, args.head_dim, args.block_size, dtype,
        device)
    common = dict(r=args.r, k=k, local_window=k // 8)

    def contiguous(_):
        return sparq_ext.attention(q, K, V, key_t=Kt, value_mean=vm, seq_lens=lens, **common)

    def paged(_):
        return sparq_ext.paged_attention(pq, kc, vc, table, plens, key_t_cache=ktc,
                                         value_mean=pvm, **common)

    print(f"device {device} ({'native' if sparq_ext.has_native_kernel(device.type, 'paged_attention') else 'reference'} "
          f"paged kernel) B={args.batch} Hq={args.query_heads} Hkv={args.kv_heads} "
          f"D={args.head_dim} S={S} block_size={args.block_size} {args.dtype} r={args.r} k={k}")
    with torch.no_grad():
        diff = (paged(0).float() - contiguous(0)[:, :, 0].float()).abs().max().item()
        times = {name: timing.time_call(fn, device, warmup=3, repeats=args.iters)
                 for name, fn in (("contiguous", contiguous), ("paged", paged))}
    for name, seconds in times.items():
        print(f"{name:>10}: {seconds * 1e6:9.1f} us/call")
    print(f"paged / contiguous: {times['paged'] / times['contiguous']:.2f}x "
          f"(max |paged - contiguous| = {diff:.3g})")


if __name__ == "__main__":
    main()
