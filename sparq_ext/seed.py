"""The source article's SparQ code, reproduced verbatim (shared/seed, from arXiv 2312.04985).

Kept as the external oracle: the tests check ``sparq_ext.attention`` against it (MHA, no
mask, no window, reallocation on) and the benchmarks time it as "the seed's pure-torch
SparQ". Do not "improve" it: its value is that it is the paper's code, not ours.
Shapes: Q ``(B, H, 1, D)``, K/V ``(B, H, S, D)``, V_mean ``(B, H, 1, D)``, M additive mask
broadcastable to ``(B, H, 1, S)``.
"""

from torch import abs, softmax, sqrt, tensor, topk  # noqa: A004 (the seed shadows abs)


def gather(t, dim, i):
    dim += (dim < 0) * t.ndim
    return t.gather(dim, i.expand(*t.shape[:dim], i.shape[dim], *t.shape[dim + 1 :]))


def attn(Q, K, V, M):
    s = (Q @ K.transpose(-1, -2)) / sqrt(tensor(Q.shape[-1])) + M
    return softmax(s, dim=-1) @ V


def sparq_attn(Q, K, V, V_mean, M, r, k):
    # 1. Approximate attention scores using r largest components of Q
    i1 = topk(abs(Q), r, -1).indices
    Q_hat, K_hat = gather(Q, -1, i1), gather(K, -1, i1)
    scale = sqrt(
        Q.shape[-1]
        * abs(Q_hat).sum(dim=-1, keepdim=True)
        / abs(Q).sum(dim=-1, keepdim=True)
    )
    s_hat = softmax(Q_hat @ K_hat.transpose(-1, -2) / scale + M, dim=-1)
    # 2. Gather top k positions based on approximate attention scores & run attention
    i2 = topk(s_hat, k, -1).indices
    iKV = i2[..., 0, :, None]
    K, V, M = gather(K, -2, iKV), gather(V, -2, iKV), gather(M, -1, i2)
    y_ = attn(Q, K, V, M)
    # 3. Estimate the total score of the top k, and interpolate with V_mean
    alpha = gather(s_hat, -1, i2).sum(-1, keepdim=True)
    return alpha * y_ + (1 - alpha) * V_mean
