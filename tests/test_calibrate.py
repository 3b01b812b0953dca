"""The auto split: on the byte budget, deterministic, even split when data is too short; the
:class:`sparq_ext.Split` it produces, its files and the saved ones."""

import json

import pytest
import torch

import sparq_ext
from sparq_ext.budget import BUDGET_SHARES, MAX_LAYER_FRACTION, budget_shares, candidate_rs, k_on_budget, layer_ratio
from sparq_ext.calibrate import (CRITERIA, DEFAULT_CRITERION, MASS_CRITERIA, MIN_CALIBRATION_POSITIONS,
                                 PrefillCalibrator, allocate_budget, choose_layer_split, split_scores)
from sparq_ext.integrations.transformers import SparQSettings
from sparq_ext.split import Split, nearest_length, saved_splits


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
    assert a["scores"][str(a["r"])][DEFAULT_CRITERION] == min(s[DEFAULT_CRITERION] for s in a["scores"].values())


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_is_selectable_deterministic_and_minimised(criterion):
    Q, K, V = _prefill(512, seed=3)
    a = choose_layer_split(Q, K, V, ratio=4, criterion=criterion)
    b = choose_layer_split(Q.clone(), K.clone(), V.clone(), ratio=4, criterion=criterion)
    assert a == b and a["criterion"] == criterion
    assert a["r"] in candidate_rs(4, 32)
    errors = {r: s[criterion] for r, s in a["scores"].items()}
    best = min(errors.values())
    # the smallest score wins; among ties (6 decimals) the larger r
    assert a["r"] == max(int(r) for r, e in errors.items() if round(e, 6) == round(best, 6))


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
    errs = split_scores(Q[:, [10, 20]], K, V, [10, 20], ratio=0.5, candidates=[1])
    assert errs[1]["k"] >= 21 and errs[1]["rel_error"] < 1e-5  # k >= valid length: exact
    assert errs[1]["mass"] < 1e-6 and errs[1]["logmass"] < 1e-6 and errs[1]["retained_mass"] > 1 - 1e-6


@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
@pytest.mark.parametrize("S", [100, 1024, 4096, 8000])
def test_settings_resolve_with_a_uniform_split_respects_the_budget(ratio, S):
    D = 64
    for r in candidate_rs(ratio, D):
        settings = SparQSettings(ratio=ratio, split=Split.uniform(ratio, 2, r))
        r_used, k, window = settings.resolve(S, D, 1)
        assert r_used == r and k == k_on_budget(ratio, S, D, r) and window == k // 4
        t = sparq_ext.transfer_bytes(1, 3, S, D, r, k, dtype=torch.float32, query_heads=9)
        assert t["sparq"] <= t["dense"] / ratio + 3 * (D + 2 * 9 * D) * 4
        # a layer without an entry, and no split, use the paper's rule
        assert settings.resolve(S, D, 99)[:2] == sparq_ext.rk_for_ratio(ratio, S, D)
    assert SparQSettings(ratio=ratio).resolve(S, D, 0)[:2] == sparq_ext.rk_for_ratio(ratio, S, D)


# --- the layers share the model's budget ---------------------------------------------------

def test_budget_shares_stay_below_dense():
    for ratio in (2, 4, 8, 16):
        shares = budget_shares(ratio)
        assert 1.0 in shares and len(shares) > 1
        assert all(s / ratio <= MAX_LAYER_FRACTION for s in shares if s != 1.0)
    assert max(budget_shares(2)) == 1.5 and max(budget_shares(8)) == 3.0


def _brute_force_allocation(options):
    import itertools
    layers = sorted(options)
    best = None
    for combo in itertools.product(*(sorted(options[layer]) for layer in layers)):
        if sum(combo) > len(layers) + 1e-9:
            continue
        total = sum(options[layer][share] for layer, share in zip(layers, combo))
        if best is None or total < best[0] - 1e-9:
            best = (total, combo)
    return best[0]


@pytest.mark.parametrize("seed", range(6))
def test_allocate_budget_is_optimal_within_the_budget_and_deterministic(seed):
    g = torch.Generator().manual_seed(seed)
    layers = 4
    # lost mass falls with the share, faster in some layers than in others
    steep = torch.rand(layers, generator=g) * 2
    options = {layer: {s: float(torch.exp(-steep[layer] * s) + 0.01 * torch.rand((), generator=g))
                       for s in BUDGET_SHARES} for layer in range(layers)}
    shares = allocate_budget(options)
    assert sorted(shares) == list(range(layers))
    assert sum(shares.values()) <= layers + 1e-9  # the model's budget: shares average at most 1
    total = sum(options[layer][s] for layer, s in shares.items())
    assert total == pytest.approx(_brute_force_allocation(options), abs=1e-8)
    assert total <= sum(options[layer][1.0] for layer in range(layers)) + 1e-12  # never worse than even
    assert allocate_budget(dict(options)) == shares


def test_allocate_budget_prefers_even_on_ties_and_moves_budget_to_the_layer_that_needs_it():
    flat = {layer: {0.5: 0.2, 1.0: 0.2, 2.0: 0.2} for layer in range(3)}
    assert allocate_budget(flat) == {0: 1.0, 1: 1.0, 2: 1.0}
    # layer 0 loses a lot at small budgets, layers 1 and 2 almost nothing
    needy = {0: {0.5: 0.9, 1.0: 0.6, 2.0: 0.1}, 1: {0.5: 0.011, 1.0: 0.01, 2.0: 0.009},
             2: {0.5: 0.011, 1.0: 0.01, 2.0: 0.009}}
    assert allocate_budget(needy) == {0: 2.0, 1: 0.5, 2: 0.5}
    with pytest.raises(ValueError, match="share 1.0"):
        allocate_budget({0: {0.5: 0.1, 2.0: 0.0}})


def test_choice_offers_every_share_on_its_budget_line():
    Q, K, V = _prefill(512, seed=11)
    choice = choose_layer_split(Q, K, V, ratio=8)
    assert sorted(choice["options"]) == sorted(budget_shares(8))
    assert choice["options"][1.0]["r"] == choice["r"]
    for share, option in choice["options"].items():
        assert option["r"] in candidate_rs(layer_ratio(8, share), 32)
    # more budget keeps at least as much mass (the best r at each share)
    scores = [choice["options"][s]["score"] for s in sorted(choice["options"])]
    assert all(a >= b - 1e-6 for a, b in zip(scores, scores[1:])), scores
    short = choose_layer_split(*_prefill(MIN_CALIBRATION_POSITIONS - 1), ratio=8)
    assert short["source"].startswith("even") and "options" not in short


@pytest.mark.parametrize("criterion", CRITERIA)
def test_choice_with_the_record_is_the_same_choice(criterion):
    # record=True also scores every criterion at share 1 (for comparing criteria); the choice is unchanged
    Q, K, V = _prefill(768, seed=5)
    full = choose_layer_split(Q, K, V, ratio=8, criterion=criterion, positions=12, record=True)
    lean = choose_layer_split(Q, K, V, ratio=8, criterion=criterion, positions=12)
    assert lean["r"] == full["r"] and lean["options"] == full["options"]
    assert all(criterion in s for s in lean["scores"].values())
    if criterion in MASS_CRITERIA:  # SparQ's output (the costly part) is not computed
        assert not any("output" in s for s in lean["scores"].values())
    assert all(set(s) == set(CRITERIA) for s in full["scores"].values())


@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
@pytest.mark.parametrize("S", [100, 1024, 4096, 8000])
def test_a_model_budget_split_reads_at_most_the_ratios_bytes_over_all_layers(ratio, S):
    D, layers = 64, 6
    g = torch.Generator().manual_seed(ratio)
    options = {layer: {s: float(torch.rand((), generator=g)) / s for s in budget_shares(ratio)}
               for layer in range(layers)}
    shares = allocate_budget(options)
    assert any(s != 1.0 for s in shares.values())  # the test exercises a real reallocation
    layer_ratios = {layer: layer_ratio(ratio, s) for layer, s in shares.items()}
    layer_r = {layer: candidate_rs(rho, D)[layer % len(candidate_rs(rho, D))] for layer, rho in layer_ratios.items()}
    settings = SparQSettings(ratio=ratio, split=Split(ratio, {S: {layer: (layer_r[layer], layer_ratios[layer])
                                                                 for layer in range(layers)}}))
    sparq = dense = 0
    for layer in range(layers):
        r, k, window = settings.resolve(S, D, layer)
        assert r == layer_r[layer] and k == k_on_budget(layer_ratios[layer], S, D, r) and window == k // 4
        assert k < S or S < 4 * ratio  # a layer never reads all of K and V
        t = sparq_ext.transfer_bytes(1, 3, S, D, r, k, dtype=torch.float32, query_heads=9)
        sparq, dense = sparq + t["sparq"], dense + t["dense"]
    # within the ratio over the whole model, up to each layer's D-element mean and query reads
    assert sparq <= dense / ratio + layers * 3 * (D + 2 * 9 * D) * 4


def test_check_rejects_splits_that_overspend_the_budget():
    D = 64
    Split(8, {1: {0: (4, 8 / 1.5), 1: (4, 16.0)}}).check(D, n_layers=3)  # 3/16 + 1/16 + 1/8 = 3/8: ok
    with pytest.raises(ValueError, match="spend"):
        Split(8, {1: {0: (4, 4.0)}}).check(D, n_layers=2)  # 1/4 + 1/8 > 2/8
    with pytest.raises(ValueError, match="not on the budget line"):
        Split(8, {1: {0: (16, 8.0)}}).check(D, n_layers=2)  # r = 16 spends all of ratio 8
    with pytest.raises(ValueError, match="of dense"):
        Split(2, {1: {0: (4, 1.0), 1: (4, 8.0)}}).check(D, n_layers=2)  # a layer reading all of dense
    with pytest.raises(ValueError, match="out of range"):
        Split(8, {1: {5: (4, 8.0)}}).check(D, n_layers=2)
    with pytest.raises(ValueError, match=r"length 4096"):  # every length is checked, and named
        Split(8, {1024: {0: (4, 8.0)}, 4096: {0: (16, 8.0)}}).check(D, n_layers=2)


def test_check_on_the_sparq_layers_of_a_hybrid_model():
    """Only the listed layers run SparQ (a hybrid model's full-attention layers): the budget is theirs."""
    D = 64
    Split(8, {1: {5: (4, 8 / 1.5), 11: (4, 16.0)}}).check(D, layers=[5, 11])  # 3/16 + 1/16 <= 2/8
    with pytest.raises(ValueError, match="spend"):
        Split(8, {1: {5: (4, 4.0)}}).check(D, layers=[5, 11])  # 1/4 + 1/8 > 2/8
    with pytest.raises(ValueError, match=r"layer 0 does not run SparQ \(the layers that do: \[5, 11\]\)"):
        Split(8, {1: {0: (4, 8.0)}}).check(D, layers=[5, 11])
    with pytest.raises(ValueError, match="not both"):
        Split(8, {1: {5: (4, 8.0)}}).check(D, n_layers=12, layers=[5, 11])


def test_split_file_round_trips_and_reads_single_length_files(tmp_path):
    path = tmp_path / "split.json"
    split = Split(8.0, {1024: {0: (8, 4.0), 1: (4, 16.0)}, 4096: {0: (2, 8.0), 1: (2, 8.0)}}, {"model": "m"})
    split.save(path)
    assert Split.load(path) == split and not (tmp_path / "split.json.tmp").exists()
    assert Split.load(str(path)) == split
    # a file with one split for every length, the ratio per layer optional (every layer at the ratio)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"ratio": 8, "model": "m", "layer_r": {"0": 4, "1": 2}, "layer_ratio": {"1": 16}}))
    single = Split.load(old)
    assert list(single.lengths.values()) == [{0: (4, 8.0), 1: (2, 16.0)}] and single.meta == {"model": "m"}
    for name, text in (("junk", "[1, 2]"), ("broken", "{"), ("empty", '{"ratio": 8}'),
                       ("none", '{"ratio": 8, "lengths": {}}'), ("typed", '{"ratio": "x", "layer_r": {}}')):
        (tmp_path / f"{name}.json").write_text(text)
        with pytest.raises(ValueError, match="not a sparq_ext split file"):
            Split.load(tmp_path / f"{name}.json")


def test_saved_splits_load_by_name_and_respect_their_budget():
    assert saved_splits() == {"smollm2-135m": [2.0, 4.0, 8.0, 16.0]}
    for ratio in (2, 4, 8, 16):
        split = Split.load("smollm2-135m", ratio=ratio)
        assert split.ratio == ratio and sorted(split.lengths) == [1024, 2048, 4096, 8192]
        split.check(64, 30)  # SmolLM2-135M: D = 64, 30 layers
    with pytest.raises(ValueError, match="exists for ratios"):
        Split.load("smollm2-135m", ratio=3)
    with pytest.raises(ValueError, match="neither a file nor a saved split"):
        Split.load("no-such-model", ratio=8)
    with pytest.raises(ValueError, match="no such file"):
        Split.load("/no/such/dir/split.json")


# --- splits calibrated at several context lengths --------------------------------------------

def test_nearest_length_is_nearest_on_a_log_scale_ties_to_the_longer():
    lengths = [1024, 4096]
    assert nearest_length(lengths, 100) == 1024 and nearest_length(lengths, 1500) == 1024
    assert nearest_length(lengths, 2048) == 4096  # log2 distance 1 to both: the longer
    assert nearest_length(lengths, 3000) == 4096 and nearest_length(lengths, 100_000) == 4096
    assert nearest_length([2048], 1) == 2048


def test_settings_use_the_split_of_the_nearest_calibration_length():
    D = 64
    settings = SparQSettings(ratio=8, split=Split(8, {1024: {0: (8, 4.0), 1: (4, 16.0)},
                                                      4096: {0: (2, 8.0), 1: (2, 8.0)}}))
    assert settings.resolve(1000, D, 0)[:2] == (8, k_on_budget(4.0, 1000, D, 8))
    assert settings.resolve(1000, D, 1)[:2] == (4, k_on_budget(16.0, 1000, D, 4))
    assert settings.resolve(5000, D, 0)[:2] == (2, k_on_budget(8, 5000, D, 2))
    assert settings.resolve(5000, D, 7)[:2] == sparq_ext.rk_for_ratio(8, 5000, D)  # not in the split
    # explicit r / k win over the split
    fixed = SparQSettings(ratio=8, r=16, k=100, split=settings.split)
    assert fixed.resolve(1000, D, 0) == (16, 100, 25)


def test_prefill_calibrator_shares_the_budget_once_every_layer_is_scored():
    layers = 3
    calibrator = PrefillCalibrator(8, layers)
    calibrator.observe(0, *_prefill(MIN_CALIBRATION_POSITIONS - 1))  # too short: nothing scored
    assert calibrator.options == {} and not calibrator.done
    prefills = [_prefill(512, seed=layer) for layer in range(layers)]
    for layer in range(layers):
        assert not calibrator.done
        calibrator.observe(layer, *prefills[layer])
        calibrator.observe(layer, *prefills[(layer + 1) % layers])  # a layer is scored once
    assert calibrator.done and sorted(calibrator.layers) == list(range(layers))
    assert calibrator.seq_len == 512 and calibrator.seconds > 0
    Split(8, {512: calibrator.layers}).check(32, layers)
    expected = allocate_budget({layer: {share: o["score"] for share, o in
                                        choose_layer_split(*prefills[layer], ratio=8)["options"].items()}
                                for layer in range(layers)})
    assert {layer: rho for layer, (_, rho) in calibrator.layers.items()} == \
        {layer: layer_ratio(8, share) for layer, share in expected.items()}
    for bad in ({"criterion": "vibes"}, {"positions": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PrefillCalibrator(8, layers, **bad)


def test_sampled_positions_grow_with_the_prefill():
    from sparq_ext.calibrate import calibration_positions, default_position_count
    assert [default_position_count(n) for n in (64, 1024, 2048, 4096, 8192, 16384)] == [8, 8, 8, 16, 32, 64]
    for n in (64, 1024, 8192):
        pos = calibration_positions(n, default_position_count(n))
        assert len(pos) == default_position_count(n) and pos[-1] == n - 1 and pos[0] >= n - n // 4
    # None means the rule; an explicit count overrides it; bad counts name the argument
    Q, K, V = _prefill(4096, seed=2)
    assert choose_layer_split(Q, K, V, ratio=8) == choose_layer_split(Q, K, V, ratio=8, positions=16)
    assert choose_layer_split(Q, K, V, ratio=8, positions=8) != choose_layer_split(Q, K, V, ratio=8, positions=16)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positions"):
            choose_layer_split(Q, K, V, ratio=8, positions=bad)
