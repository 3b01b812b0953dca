import pytest
import torch

# The operator is inference-only; tests make their own inputs without grad.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def make_inputs(B=2, Hq=4, Hkv=2, S=64, D=32, dtype=torch.float32, device="cpu", seed=0,
                with_key_t=False):
    """Fresh random decode-step inputs: query (B, Hq, 1, D), key/value (B, Hkv, S, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype=dtype, device=device)
    K = torch.randn(B, Hkv, S, D, generator=g).to(dtype=dtype, device=device)
    V = torch.randn(B, Hkv, S, D, generator=g).to(dtype=dtype, device=device)
    if with_key_t:
        return q, K, V, K.transpose(-1, -2).contiguous()
    return q, K, V


@pytest.fixture
def tolerances():
    return TOLERANCES
