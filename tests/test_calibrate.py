"""The auto split: on the byte budget, deterministic, even split when data is too short."""

import pytest
import torch

import sparq_ext
from sparq_ext.calibrate import (CRITERIA, DEFAULT_CRITERION, MIN_CALIBRATION_POSITIONS, candidate_rs,
                                 choose_layer_split, k_on_budget, load_split, save_split, split_errors,
                                 split_scores)


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


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_is_selectable_deterministic_and_minimised(criterion):
    Q, K, V = _prefill(512, seed=3)
    a = choose_layer_split(Q, K, V, ratio=4, criterion=criterion)
    b = choose_layer_split(Q.clone(), K.clone(), V.clone(), ratio=4, criterion=criterion)
    assert a == b and a["criterion"] == criterion
    assert a["r"] in candidate_rs(4, 32)
    assert a["errors"] == {r: s[criterion] for r, s in a["scores"].items()}
    best = min(a["errors"].values())
    # the smallest score wins; among ties (6 decimals) the larger r
    assert a["r"] == max(int(r) for r, e in a["errors"].items() if round(e, 6) == round(best, 6))


def test_default_criterion_is_used_and_unknown_criteria_raise():
    assert DEFAULT_CRITERION in CRITERIA
    Q, K, V = _prefill(256)
    assert choose_layer_split(Q, K, V, ratio=8)["criterion"] == DEFAULT_CRITERION
    assert choose_layer_split(Q, K, V, ratio=8) == choose_layer_split(Q, K, V, ratio=8, criterion=DEFAULT_CRITERION)
    with pytest.raises(ValueError, match="criterion"):
        choose_layer_split(Q, K, V, ratio=8, criterion="vibes")


def test_retained_mass_is_the_exact_top_k_mass_when_step_1_is_exact():
    # r = D makes the approximate scores exact; one query head per KV head and no local window:
    # step 2 reads the top-k positions of the exact scores, whose probability mass is known.
    Q, K, V = _prefill(300, Hq=2, Hkv=2, seed=5)
    pos = [150, 299]
    ratio, D = 1.5, 32
    scores = split_scores(Q[:, pos], K, V, pos, ratio, candidates=[D], local_window_frac=0.0)[D]
    k = scores["k"]
    assert k == k_on_budget(ratio, (151 + 300) // 2, D, D)
    kept = []
    for p in pos:
        probs = torch.softmax((Q[:, p] [:, None, :] * K[:, :p + 1]).sum(-1) / D**0.5, -1)  # (H, p+1)
        kept.append(probs.topk(min(k, p + 1), -1).values.sum(-1))
    kept = torch.stack(kept)
    assert scores["retained_mass"] == pytest.approx(kept.mean().item(), rel=1e-5)
    assert scores["mass"] == pytest.approx(1 - kept.mean().item(), abs=1e-6)
    assert scores["logmass"] == pytest.approx((-kept.log()).mean().item(), rel=1e-5)
    assert 0 < scores["mass"] < 1


def test_less_selection_keeps_less_mass():
    # the same r with a smaller budget (larger ratio: smaller k) cannot retain more mass
    Q, K, V = _prefill(512, seed=7)
    pos = list(range(400, 512, 16))
    masses = [split_scores(Q[:, pos], K, V, pos, ratio, candidates=[2])[2]["retained_mass"]
              for ratio in (2, 4, 8, 16)]
    assert all(a >= b - 1e-7 for a, b in zip(masses, masses[1:])), masses


@pytest.mark.parametrize("criterion", CRITERIA)
def test_short_calibration_data_falls_back_to_the_even_split(criterion):
    Q, K, V = _prefill(MIN_CALIBRATION_POSITIONS - 1)
    choice = choose_layer_split(Q, K, V, ratio=8, criterion=criterion)
    assert choice["r"] == sparq_ext.rk_for_ratio(8, MIN_CALIBRATION_POSITIONS - 1, 32)[0]
    assert choice["source"].startswith("even")


def test_split_errors_vanish_when_k_covers_the_prefix():
    Q, K, V = _prefill(200)
    errs = split_errors(Q[:, [10, 20]], K, V, [10, 20], ratio=0.5, candidates=[1])
    assert errs[1]["k"] >= 21 and errs[1]["rel_error"] < 1e-5  # k >= valid length: exact
    assert errs[1]["mass"] < 1e-6 and errs[1]["logmass"] < 1e-6 and errs[1]["retained_mass"] > 1 - 1e-6


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
