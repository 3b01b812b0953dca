"""The operators are registered the way PyTorch intends: one schema each, fake impl, opcheck,
compile (the paged operator's opcheck and compile tests: tests/test_paged.py)."""

import pytest
import torch

import sparq_ext
from sparq_ext.ops import PAGED_SCHEMA, SCHEMA
from sparq_testutil import NATIVE_BACKENDS, make_inputs, required_native_backends, tolerance


def test_schema_is_the_documented_one():
    schema = str(torch.ops.sparq_ext.attention.default._schema)
    assert schema == "sparq_ext::" + SCHEMA


def test_paged_schema_is_the_documented_one():
    schema = str(torch.ops.sparq_ext.paged_attention.default._schema)
    assert schema == "sparq_ext::" + PAGED_SCHEMA


@pytest.mark.parametrize("op", ["attention", "paged_attention"])
def test_every_device_has_a_kernel(op):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparq_ext::{op}", key)


def test_has_native_kernel_per_op():
    """Each native backend serves both operators (one set of kernels per backend)."""
    for device in ("cpu", "cuda"):
        assert (sparq_ext.has_native_kernel(device, "paged_attention")
                == sparq_ext.has_native_kernel(device))
    with pytest.raises(ValueError, match="op must be one of"):
        sparq_ext.has_native_kernel("cpu", "paged")


def test_required_native_kernels_are_loaded():
    """Never skipped: where SPARQ_EXT_REQUIRE_NATIVE names a backend (make test: cpu), its native
    kernel must be registered, so a build that fell back to pure torch cannot pass."""
    for name in required_native_backends():
        assert sparq_ext.extension_error is None, sparq_ext.extension_error
        assert sparq_ext.has_native_kernel(name), f"the native {name} kernel is not registered"
        assert sparq_ext.has_native_kernel(name, "paged_attention")
    assert set(required_native_backends()) <= set(NATIVE_BACKENDS)


def test_extension_state_is_reported():
    # Either the extension loaded (and then the schema came from C++), or we say why not.
    if sparq_ext.extension_error is None:
        from sparq_ext import _C

        assert isinstance(_C.with_cuda, bool)
    else:
        assert "sparq_ext._C" in sparq_ext.extension_error or "Error" in sparq_ext.extension_error


def _opcheck_cases():
    q, K, V, Kt = make_inputs(2, 4, 2, 32, 16, with_key_t=True)
    mask = torch.ones(2, 1, 1, 32, dtype=torch.bool)
    mask[0, ..., :5] = False
    return [
        ((q, K, V), dict(r=4, k=8)),
        ((q, K, V), dict(r=4, k=8, key_t=Kt, value_mean=V.mean(2, keepdim=True),
                         seq_lens=torch.tensor([32, 20]), attn_mask=mask, local_window=2,
                         reallocate=False, scale=0.2)),
        ((q.bfloat16(), K.bfloat16(), V.bfloat16()), dict(r=16, k=100)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(torch.ops.sparq_ext.attention.default, args, kwargs)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 8, 1, 64, dtype=torch.bfloat16)
        K = torch.empty(3, 2, 1000, 64, dtype=torch.bfloat16)
        out = torch.ops.sparq_ext.attention(q, K, K, r=8, k=64)
    assert out.shape == (3, 8, 1, 64) and out.dtype == torch.bfloat16


def test_torch_compile_fullgraph_cpu():
    q, K, V, Kt = make_inputs(2, 8, 2, 256, 32, with_key_t=True)
    lens = torch.tensor([256, 100])

    def step(q, K, V, Kt, lens):
        return sparq_ext.attention(q * 2, K, V, r=4, k=32, key_t=Kt, seq_lens=lens,
                                   local_window=8) + 1

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, K, V, Kt, lens), step(q, K, V, Kt, lens),
                               **tolerance(torch.float32))


def test_direct_op_call_matches_wrapper():
    q, K, V = make_inputs(1, 4, 4, 64, 16, seed=3)
    torch.testing.assert_close(torch.ops.sparq_ext.attention(q, K, V, r=4, k=8),
                               sparq_ext.attention(q, K, V, r=4, k=8))


def test_pure_torch_path_without_the_extension():
    """With the extension absent (here: disabled), the package runs on the reference."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, sparq_ext\n"
        "assert sparq_ext.extension_error == 'disabled by SPARQ_EXT_DISABLE'\n"
        "assert not sparq_ext.has_native_kernel('cpu')\n"
        "assert not sparq_ext.has_native_kernel('cpu', 'paged_attention')\n"
        "q, K = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16)\n"
        "out = sparq_ext.attention(q, K, K, r=4, k=40)\n"
        "dense = torch.nn.functional.scaled_dot_product_attention(q, K, K, enable_gqa=True)\n"
        "torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)\n"
        "table, lens = torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([40], dtype=torch.int32)\n"
        "cache = torch.cat([K[:, :, 20:], K[:, :, :20]])  # (2 blocks, 2, 20, 16)\n"
        "paged = sparq_ext.paged_attention(q[:, :, 0], cache, cache, table, lens, r=4, k=40)\n"
        "torch.testing.assert_close(paged, dense[:, :, 0], rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "SPARQ_EXT_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
