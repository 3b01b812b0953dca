"""The evaluation kit's methods and the repetition task (a tiny random-weight Llama: plumbing only;
the real-model numbers are in docs/accuracy.md)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparq_ext import quantize_key_t  # noqa: E402
from sparq_ext.evaluation.methods import (PrefilledCache, bytes_fraction, method_key_t_dtype,  # noqa: E402
                                          set_method)
from sparq_ext.evaluation.repetition import passage_starts, run_repetition  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
@pytest.mark.parametrize("seq_len", [1024, 4096, 8000])
def test_sparq_int8_reads_the_bytes_sparq_reads_at_the_same_ratio(dtype, ratio, seq_len):
    """The 8-bit split spends the same bytes (r int8 rows + a 4-byte scale instead of r
    full-width rows), so the baselines' W, derived from the ratio, is fair to both."""
    layers = ["full_attention"] * 30
    full = bytes_fraction("sparq", ratio, seq_len, 64, 3, layers, dtype=dtype)
    int8 = bytes_fraction("sparq_int8", ratio, seq_len, 64, 3, layers, dtype=dtype)
    int8_k = bytes_fraction("sparq_int8_k", ratio, seq_len, 64, 3, layers, dtype=dtype)
    assert int8 == pytest.approx(full, rel=0.01) and int8_k == pytest.approx(full, rel=0.01)
    assert full == pytest.approx(1 / ratio, rel=0.02)


def test_method_key_t_dtype():
    assert method_key_t_dtype("sparq_int8") is torch.int8 and method_key_t_dtype("sparq_int8_k") is torch.int8
    assert all(method_key_t_dtype(m) is None for m in ("dense", "sparq", "streaming", "h2o"))


@pytest.fixture(scope="module")
def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=None)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(n, seed=0):
    return torch.randint(2, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_prefilled_cache_hands_sparq_int8_the_same_keys_with_an_8bit_selection_cache(tiny_llama):
    pre = PrefilledCache(tiny_llama, _ids(48))
    set_method(tiny_llama, "sparq", 4)
    full = pre.fresh()
    assert not any(layer.quantized for layer in full.layers)
    set_method(tiny_llama, "sparq_int8", 4)
    int8 = pre.fresh()
    assert int8 is not full and all(layer.quantized for layer in int8.layers)
    for a, b in zip(full.layers, int8.layers, strict=True):
        key_t, scale = quantize_key_t(a.keys)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert torch.equal(b.key_t, key_t) and torch.equal(b.key_t_scale, scale)
        assert torch.allclose(a.value_sum, b.value_sum)
    # decoding into the 8-bit cache and asking again crops it back to the prompt
    run_repetition(tiny_llama, _ids(48), [0], [("sparq_int8", 4)], passage_tokens=4, prefilled=pre)
    assert all(layer.get_seq_length() == 48 for layer in pre.fresh(torch.int8).layers)
    set_method(tiny_llama, "dense", 8)
    assert pre.fresh() is full


def test_repetition_scores_every_method_on_every_passage(tiny_llama):
    ids = _ids(64, seed=1)
    starts = passage_starts(64, 2, 8)
    assert starts == [0, 16]
    configs = [("dense", None), ("sparq", 4), ("sparq_int8", 4), ("sparq_int8_k", 4), ("streaming", 4), ("h2o", 4)]
    rows = run_repetition(tiny_llama, ids, starts, configs, passage_tokens=8)
    assert len(rows) == len(starts) * len(configs)
    assert [r["method"] for r in rows[:len(configs)]] == [m for m, _ in configs]
    for row in rows:
        assert 0 <= row["top1_acc"] <= 1 and row["correct"] == round(row["top1_acc"] * 8)
        assert row["nll"] > 0 and row["tokens"] == 8
    assert all(r["top1_agreement"] == 1.0 for r in rows if r["method"] == "dense")
    assert tiny_llama.config._attn_implementation != "sparq"  # left dense


def test_passage_starts_validate():
    assert passage_starts(4096, 1, 96) == [512]
    assert passage_starts(4096, 3, 96) == [0, 512, 1024]
    with pytest.raises(ValueError, match="passages"):
        passage_starts(4096, 0, 96)
    with pytest.raises(ValueError, match="room"):
        passage_starts(50, 2, 96)
    with pytest.raises(ValueError, match="must be .1, C."):
        run_repetition(None, torch.zeros(2, 8, dtype=torch.long), [0], [("dense", None)])


def test_repetition_summary_pools_passages_and_reports_the_gap_closed():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_repetition.py"
    spec = importlib.util.spec_from_file_location("eval_repetition", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def row(method, ratio, correct, nll, start):
        return dict(context=4096, method=method, ratio=ratio, start=start, tokens=10, correct=correct,
                    top1_acc=correct / 10, nll=nll, top1_agreement=1.0, r=None, k=None, W=None, bytes_fraction=0.5)

    rows = [row("dense", None, 9, 1.0, 0), row("dense", None, 7, 2.0, 8),
            row("sparq", 8, 5, 3.0, 0), row("sparq", 8, 3, 4.0, 8),
            row("sparq_int8", 8, 7, 2.0, 0), row("sparq_int8", 8, 5, 3.0, 8)]
    summary = {s["method"]: s for s in script.summarise(rows)}
    assert list(summary) == ["dense", "sparq", "sparq_int8"]
    assert summary["dense"]["top1_acc"] == pytest.approx(0.8) and summary["dense"]["nll"] == pytest.approx(1.5)
    assert summary["sparq"]["passages"] == 2 and summary["sparq"]["passage_acc"] == [0.5, 0.3]
    assert summary["sparq_int8"]["gap_closed"] == pytest.approx(0.5)  # (0.6 - 0.4) / (0.8 - 0.4)
    assert "gap_closed" not in summary["sparq"]


def test_sparq_int8_k_keeps_the_full_copys_r_and_spends_the_saved_bytes_on_k(tiny_llama):
    from sparq_ext.evaluation.methods import method_settings

    r, k, window = method_settings("sparq_int8_k", 8).resolve(4096, 64, dtype=torch.float32, key_t_dtype=torch.int8)
    assert (r, k, window) == (8, 416, 104)  # 4096 * (1/8 - 12/512); the full copy's k is 256
    set_method(tiny_llama, "sparq_int8_k", 4)
    assert {type(m._sparq_settings).__name__ for m in tiny_llama.modules()
            if getattr(m, "_sparq_settings", None) is not None} == {"FullRankMoreK"}
    set_method(tiny_llama, "dense", 8)


def test_accuracy_rows_report_the_split_each_method_decodes_with(tiny_llama):
    """benchmarks/eval_accuracy.py's rows carry each method's own r and k: the 8-bit selection
    cache's larger r for sparq_int8 (it used to report the full copy's)."""
    import importlib.util
    import types
    from pathlib import Path

    from sparq_ext.budget import rk_for_ratio

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_accuracy.py"
    spec = importlib.util.spec_from_file_location("eval_accuracy", path)
    eval_accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_accuracy)

    def tokenizer(text, return_tensors="pt"):  # characters as token ids, inside the tiny vocabulary
        return types.SimpleNamespace(input_ids=torch.tensor([[2 + ord(c) % 120 for c in text[:600]]]))

    context, tokens = 256, 8
    rows = eval_accuracy.run_accuracy(tiny_llama, tokenizer, [context], [4], ["sparq", "sparq_int8", "sparq_int8_k"],
                                      tokens, log=lambda msg: None)
    by_method = {row["method"]: row for row in rows}
    mid = context + tokens // 2
    assert (by_method["sparq"]["r"], by_method["sparq"]["k"]) == rk_for_ratio(4, mid, 16)
    assert (by_method["sparq_int8"]["r"], by_method["sparq_int8"]["k"]) == \
        rk_for_ratio(4, mid, 16, dtype=torch.float32, key_t_dtype=torch.int8)
    assert by_method["sparq_int8"]["r"] == 8 and by_method["sparq"]["r"] == 4
    assert by_method["sparq_int8_k"]["r"] == 4 and by_method["sparq_int8_k"]["k"] > by_method["sparq"]["k"]
