"""Every rejection of sparq_ext.attention: a clear exception that names the argument."""

import pytest
import torch

import sparq_ext
from sparq_testutil import make_inputs

B, Hq, Hkv, S, D = 2, 4, 2, 16, 8


def base():
    q, K, V, Kt = make_inputs(B, Hq, Hkv, S, D, with_key_t=True)
    return dict(query=q, key=K, value=V, r=2, k=4, key_t=Kt, value_mean=V.mean(2, keepdim=True),
                seq_lens=torch.tensor([S, 3]), attn_mask=torch.ones(B, 1, 1, S, dtype=torch.bool),
                local_window=1, reallocate=True, scale=None)


def _set(**changes):
    return changes


# (case id, changes to the valid call, exception type, words the message must contain)
REJECTIONS = [
    ("query not a tensor", _set(query=[1.0]), TypeError, "query must be a torch.Tensor"),
    ("query rank 3", _set(query=torch.zeros(B, Hq, D)), ValueError, "query must have 4 dims"),
    ("key rank 3", _set(key=torch.zeros(B, S, D)), ValueError, "key must have 4 dims"),
    ("value rank 5", _set(value=torch.zeros(B, Hkv, S, D, 1)), ValueError, "value must have 4 dims"),
    ("query int dtype", _set(query=torch.zeros(B, Hq, 1, D, dtype=torch.int32)), TypeError,
     "query must be float32"),
    ("query float64", _set(query=torch.zeros(B, Hq, 1, D, dtype=torch.float64)), TypeError,
     "query must be float32"),
    ("query two positions", _set(query=torch.zeros(B, Hq, 2, D)), ValueError,
     "one decode position"),
    ("batch mismatch", _set(key=torch.zeros(B + 1, Hkv, S, D)), ValueError, "key must be (B="),
    ("head_dim mismatch", _set(key=torch.zeros(B, Hkv, S, D + 1)), ValueError, "key must be"),
    ("value shape", _set(value=torch.zeros(B, Hkv, S + 1, D)), ValueError,
     "value must have key's shape"),
    ("Hq % Hkv", _set(key=torch.zeros(B, 3, S, D), value=torch.zeros(B, 3, S, D),
                      key_t=None, value_mean=None), ValueError, "must divide query heads"),
    ("empty cache", _set(key=torch.zeros(B, Hkv, 0, D), value=torch.zeros(B, Hkv, 0, D),
                         key_t=None, seq_lens=None, attn_mask=None), ValueError, "at least one position"),
    ("key dtype", _set(key=torch.zeros(B, Hkv, S, D, dtype=torch.float16),
                       value=torch.zeros(B, Hkv, S, D, dtype=torch.float16)), TypeError,
     "key must have the query's dtype"),
    ("value dtype", _set(value=torch.zeros(B, Hkv, S, D, dtype=torch.bfloat16)), TypeError,
     "value must have the query's dtype"),
    ("key_t shape", _set(key_t=torch.zeros(B, Hkv, S, D)), ValueError, "key_t must have shape"),
    ("key_t dtype", _set(key_t=torch.zeros(B, Hkv, D, S, dtype=torch.float16)), TypeError,
     "key_t must have the query's dtype"),
    ("key_t not tensor", _set(key_t="kt"), TypeError, "key_t must be a torch.Tensor or None"),
    ("value_mean shape", _set(value_mean=torch.zeros(B, Hkv, D)), ValueError,
     "value_mean must have shape"),
    ("value_mean dtype", _set(value_mean=torch.zeros(B, Hkv, 1, D, dtype=torch.float16)),
     TypeError, "value_mean must have the query's dtype"),
    ("r zero", _set(r=0), ValueError, "r must be an int in [1, head_dim=8]"),
    ("r above D", _set(r=D + 1), ValueError, "r must be an int in [1, head_dim=8]"),
    ("r float", _set(r=2.0), ValueError, "r must be an int"),
    ("r bool", _set(r=True), ValueError, "r must be an int"),
    ("k zero", _set(k=0), ValueError, "k must be an int >= 1"),
    ("k negative", _set(k=-3), ValueError, "k must be an int >= 1"),
    ("k tensor", _set(k=torch.tensor(4)), ValueError, "k must be an int >= 1"),
    ("window above k", _set(local_window=5), ValueError, "local_window must be an int in [0, k=4]"),
    ("window negative", _set(local_window=-1), ValueError, "local_window must be an int"),
    ("reallocate not bool", _set(reallocate=1), TypeError, "reallocate must be a bool"),
    ("scale nan", _set(scale=float("nan")), ValueError, "scale must be a finite float"),
    ("scale string", _set(scale="0.1"), ValueError, "scale must be a finite float"),
    ("seq_lens float", _set(seq_lens=torch.tensor([1.0, 2.0])), TypeError,
     "seq_lens must be int32 or int64"),
    ("seq_lens list", _set(seq_lens=[1, 2]), TypeError, "seq_lens must be a torch.Tensor"),
    ("seq_lens length", _set(seq_lens=torch.tensor([1, 2, 3])), ValueError,
     "seq_lens must have shape (B,)"),
    ("seq_lens 2-D", _set(seq_lens=torch.tensor([[1], [2]])), ValueError,
     "seq_lens must have shape (B,)"),
    ("seq_lens negative", _set(seq_lens=torch.tensor([-1, 2])), ValueError,
     "seq_lens must lie in [0, S=16]"),
    ("seq_lens above S", _set(seq_lens=torch.tensor([S + 1, 2])), ValueError,
     "seq_lens must lie in [0, S=16]"),
    ("mask float", _set(attn_mask=torch.zeros(B, 1, 1, S)), TypeError,
     "attn_mask must be a bool tensor"),
    ("mask wrong length", _set(attn_mask=torch.ones(B, 1, 1, S + 1, dtype=torch.bool)), ValueError,
     "attn_mask must be broadcastable to (B, 1, 1, S)"),
    ("mask per head", _set(attn_mask=torch.ones(B, Hq, 1, S, dtype=torch.bool)), ValueError,
     "attn_mask must be broadcastable"),
    ("mask (B, S)", _set(attn_mask=torch.ones(B, S, dtype=torch.bool)), ValueError,
     "attn_mask must be broadcastable"),
    ("mask rank 5", _set(attn_mask=torch.ones(1, B, 1, 1, S, dtype=torch.bool)), ValueError,
     "attn_mask must be broadcastable"),
    ("mask not tensor", _set(attn_mask=True), TypeError, "attn_mask must be a torch.Tensor"),
    ("device mismatch", _set(seq_lens=torch.tensor([S, 3], device="meta")), ValueError,
     "seq_lens must be on the query's device"),
    ("key on meta", _set(key=torch.zeros(B, Hkv, S, D, device="meta")), ValueError,
     "key must be on the query's device"),
    ("query requires grad", _set(query=torch.zeros(B, Hq, 1, D, requires_grad=True)), ValueError,
     "query requires grad"),
    ("value requires grad", _set(value=torch.zeros(B, Hkv, S, D, requires_grad=True)), ValueError,
     "value requires grad"),
]


@pytest.mark.parametrize("case,changes,error,words", REJECTIONS, ids=[c[0] for c in REJECTIONS])
def test_rejection(case, changes, error, words):
    args = base()
    args.update(changes)
    with pytest.raises(error) as info:
        sparq_ext.attention(**args)
    assert words in str(info.value), str(info.value)


def test_valid_base_call_passes():
    args = base()
    out = sparq_ext.attention(**args)
    assert out.shape == (B, Hq, 1, D) and torch.isfinite(out).all()


# The C++ checks (direct torch.ops calls, no Python wrapper) use the same words.
CPP_REJECTIONS = [c for c in REJECTIONS
                  if c[0] in ("query rank 3", "batch mismatch", "Hq % Hkv", "key_t shape",
                              "value_mean dtype", "r above D", "k negative", "window above k",
                              "seq_lens float", "mask wrong length", "query two positions")]


@pytest.mark.skipif(sparq_ext.extension_error is not None,
                    reason="C++ checks need the compiled extension: " + str(sparq_ext.extension_error))
@pytest.mark.parametrize("case,changes,error,words", CPP_REJECTIONS, ids=[c[0] for c in CPP_REJECTIONS])
def test_cpp_checks_on_direct_op_calls(case, changes, error, words):
    if not sparq_ext.has_native_kernel("cpu"):
        pytest.skip("the CPU backend is the Python reference; its checks are the wrapper's")
    args = base()
    args.update(changes)
    q, K, V = args.pop("query"), args.pop("key"), args.pop("value")
    with pytest.raises(RuntimeError, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        torch.ops.sparq_ext.attention(q, K, V, **args)


class _ValuesUnreadable(torch.Tensor):
    """A tensor that reports ``device_type`` and fails any read of its values (``min``, ``max``,
    ``item``, ``int()``, comparisons, copies to the host): stands in for a CUDA ``seq_lens``,
    whose host read would synchronise the device, on a machine without a GPU."""

    device_type = "cpu"
    _READS = frozenset({torch.Tensor.min, torch.Tensor.max, torch.Tensor.aminmax, torch.Tensor.item,
              torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__,
              torch.Tensor.any, torch.Tensor.all, torch.Tensor.cpu, torch.Tensor.to,
              torch.Tensor.numpy, torch.Tensor.lt, torch.Tensor.gt, torch.Tensor.__lt__,
              torch.Tensor.__gt__, torch.Tensor.__le__, torch.Tensor.__ge__, torch.min, torch.max,
              torch.aminmax, torch.any, torch.all})

    @property
    def device(self):
        return torch.device(self.device_type)

    @property
    def is_cuda(self):
        return self.device_type == "cuda"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._READS:
            raise _HostRead(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


class _HostRead(AssertionError):
    pass


def _on(device_type, t):
    wrapped = t.as_subclass(_ValuesUnreadable)
    wrapped.device_type = device_type
    return wrapped


def test_seq_lens_of_a_gpu_tensor_are_not_read_on_the_host():
    # Out of range on purpose: only a host read could notice, and none may happen.
    args = {name: _on("cuda", t) if isinstance(t, torch.Tensor) else t for name, t in base().items()}
    args["seq_lens"] = _on("cuda", torch.tensor([S + 5, -1]))
    sparq_ext.check_attention_inputs(**args)


def test_seq_lens_of_a_cpu_tensor_are_read_and_checked():
    # The same stand-in on the CPU: the value check reads it (so the test above can fail) ...
    args = {name: _on("cpu", t) if isinstance(t, torch.Tensor) else t for name, t in base().items()}
    with pytest.raises(_HostRead):
        sparq_ext.check_attention_inputs(**args)
    # ... and plain CPU values out of range are rejected naming the argument.
    args = base()
    args["seq_lens"] = torch.tensor([S + 5, -1])
    with pytest.raises(ValueError, match=r"seq_lens must lie in \[0, S=16\]"):
        sparq_ext.check_attention_inputs(**args)
