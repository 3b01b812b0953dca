"""The auto split: on the byte budget, deterministic, even split when data is too short."""

import pytest
import torch

import sparq_ext
from sparq_ext.calibrate import (MIN_CALIBRATION_POSITIONS, candidate_rs, choose_layer_split,
                                 k_on_budget, load_split, save_split, split_errors)


@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S", [1024, 4096, 8192])
def test_every_candidate_respects_the_byte_budget(ratio, D, S):
    for r in candidate_rs(ratio, D):
        k = k_on_budget(ratio, S, D, r)
        t = sparq_ext.transfer_bytes(1, 3, S, D, r, k, dtype=torch.float32, query_heads=9)
        # within the ratio: no more than dense/ratio, up to the D-element mean read per head
        assert t["sparq"] <= t["dense"] / ratio + 3 * (D + 2 * 9 * D) * 4, (r, k)
        assert k >= 1


def test_even_split_is_a_candidate_and_matches_rk_for_ratio():
    for ratio, D, S in [(8, 64, 4096), (4, 128, 1000), (16, 64, 8192)]:
        r, k = sparq_ext.rk_for_ratio(ratio, S, D)
        assert r in candidate_rs(ratio, D)
        assert abs(k_on_budget(ratio, S, D, r) - k) <= 1


def test_k_on_budget_rejects_r_that_spends_everything():
    with pytest.raises(ValueError, match="whole budget"):
        k_on_budget(8, 4096, 64, 16)


def _prefill(S, Hq=6, Hkv=2, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # keys with a few heavy directions, like real attention: some positions dominate
    K = torch.randn(Hkv, S, D, generator=g)
    K[:, :, :4] *= 4
    return torch.randn(Hq, S, D, generator=g), K, torch.randn(Hkv, S, D, generator=g)


def test_choice_is_deterministic_and_on_the_candidate_list():
    Q, K, V = _prefill(512)
    a = choose_layer_split(Q, K, V, ratio=4)
    b = choose_layer_split(Q.clone(), K.clone(), V.clone(), ratio=4)
    assert a == b
    assert a["source"] == "auto" and a["r"] in candidate_rs(4, 32)
    assert a["errors"][str(a["r"])] == min(a["errors"].values())


def test_short_calibration_data_falls_back_to_the_even_split():
    Q, K, V = _prefill(MIN_CALIBRATION_POSITIONS - 1)
    choice = choose_layer_split(Q, K, V, ratio=8)
    assert choice["r"] == sparq_ext.rk_for_ratio(8, MIN_CALIBRATION_POSITIONS - 1, 32)[0]
    assert choice["source"].startswith("even")


def test_split_errors_vanish_when_k_covers_the_prefix():
    Q, K, V = _prefill(200)
    errs = split_errors(Q[:, [10, 20]], K, V, [10, 20], ratio=0.5, candidates=[1])
    assert errs[1]["k"] >= 21 and errs[1]["rel_error"] < 1e-5  # k >= valid length: exact


def test_save_and_load_round_trip(tmp_path):
    path = str(tmp_path / "split.json")
    save_split(path, {0: 2, 3: 8, 1: 4}, ratio=8, model="m")
    assert load_split(path) == (8.0, {0: 2, 1: 4, 3: 8})
    (tmp_path / "bad.json").write_text('{"ratio": 8}')
    with pytest.raises(ValueError, match="not a sparq_ext split file"):
        load_split(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
@pytest.mark.parametrize("S", [100, 1024, 4096, 8000])
def test_settings_resolve_with_a_layer_split_respects_the_budget(ratio, S):
    from sparq_ext.integrations.transformers import SparQSettings
    D = 64
    layer_r = dict(enumerate(candidate_rs(ratio, D)))
    settings = SparQSettings(ratio=ratio, split="auto", layer_r=layer_r)
    for layer, r in layer_r.items():
        r_used, k, window = settings.resolve(S, D, layer)
        assert r_used == r and k == k_on_budget(ratio, S, D, r) and window == k // 4
        t = sparq_ext.transfer_bytes(1, 3, S, D, r, k, dtype=torch.float32, query_heads=9)
        assert t["sparq"] <= t["dense"] / ratio + 3 * (D + 2 * 9 * D) * 4
    # a layer without an entry, and split="even", use the paper's rule
    assert settings.resolve(S, D, 99)[:2] == sparq_ext.rk_for_ratio(ratio, S, D)
    assert SparQSettings(ratio=ratio, layer_r=layer_r).resolve(S, D, 0)[:2] == sparq_ext.rk_for_ratio(ratio, S, D)
