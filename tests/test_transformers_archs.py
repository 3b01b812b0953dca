"""enable_sparq across Llama-family architectures (tiny random-weight configs: plumbing only).

No accuracy is claimed here (random weights); the checks are exact properties: with k >= the
context SparQ decoding equals dense decoding, the decode step really calls sparq_ext.attention,
and disable_sparq restores the model. Real-model accuracy is in test_transformers.py.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparq_ext import SparQCache  # noqa: E402
from sparq_ext.integrations.transformers import (  # noqa: E402
    disable_sparq, enable_sparq, hf_mask_to_bool)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def _tiny(arch):
    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    if hasattr(config, "sliding_window"):
        config.sliding_window = None
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_big_k_equals_dense_and_sparq_runs(arch, monkeypatch):
    model = _tiny(arch)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    dense = model.generate(ids, max_new_tokens=10, do_sample=False)
    enable_sparq(model, k=1 << 20)
    calls = []
    import sparq_ext.integrations.transformers as integration
    real = integration.sparq_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["key_t"] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "sparq_attention", counting)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dense)
    assert isinstance(out.past_key_values, SparQCache)
    assert len(calls) == 9 * model.config.num_hidden_layers and all(calls)  # every decode step, every layer
    enable_sparq(model, ratio=4)
    assert model.generate(ids, max_new_tokens=10, do_sample=False).shape == dense.shape
    disable_sparq(model)
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), dense)


def test_mask_conversion():
    allowed = torch.tensor([[False, True, True]])
    bool_mask = allowed[:, None, None, :]
    float_mask = torch.zeros(1, 1, 1, 3).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(hf_mask_to_bool(bool_mask, 3), bool_mask)
    assert torch.equal(hf_mask_to_bool(float_mask, 3), bool_mask)
    assert hf_mask_to_bool(None, 3) is None
    with pytest.raises(ValueError, match="4D"):
        hf_mask_to_bool(allowed, 3)


def test_enable_sparq_rejections():
    model = _tiny("llama")
    for kwargs, match in (({"ratio": 0}, "ratio"), ({"k": 0}, "k must"), ({"r": 2.5}, "r must"),
                          ({"local_window": -1}, "local_window")):
        with pytest.raises(ValueError, match=match):
            enable_sparq(model, **kwargs)
    with pytest.raises(ValueError, match="no attention modules"):
        enable_sparq(torch.nn.Linear(2, 2))
