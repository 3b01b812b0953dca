"""Choose how to spend a byte budget between SparQ's two reads, per layer ("auto" split).

SparQ reads ``S*r`` elements in step 1 and ``2*k*D`` in step 2 (per KV head). The paper's
ports split a compression ratio ``rho`` evenly (``r = D/rho``, ``k = S/(2 rho)``), but any
point on the budget line ``S*r + 2*k*D = 2*S*D/rho`` reads the same bytes, and on small
models a smaller ``r`` with a larger ``k`` loses much less accuracy. Layers differ, so the
split is chosen per layer from data the user already has: queries, keys and values of a
prefill. For a few recent query positions we run SparQ at each candidate split and keep the
split that loses the least exact attention mass: the positions step 2 reads (top-k of the
approximate scores plus the local window) should hold as much of the exact softmax as
possible (criterion ``"mass"``, the default). The other criteria of :data:`CRITERIA` (the
relative L2 error of SparQ's output, the previous default ``"output"``; ``-log`` of the mass;
the output error over a whole layer) are computed in the same pass and can be chosen by name.
``benchmarks/split_criteria.py`` compares them with measured perplexity on SmolLM2-135M
(``benchmarks/results/split_criteria.md``): all rank uniform splits about equally well, and
the per-layer choice by mass decodes with the lowest perplexity in 3 of 4 (context, ratio)
cells at ratios 4 and 8 (``"logmass"`` ties it), so it is the default.

Two budgets (``budget=``):

* ``"layer"``: every layer on its own budget line, ``S*r + 2*k*D = 2*S*D/rho``; only ``r``
  is chosen per layer.
* ``"model"`` (the default): the layers share the model's budget. Each layer may read a
  multiple ("share") of the even per-layer budget, from :data:`BUDGET_SHARES`, as long as the
  shares average to 1: ``sum_l 1/rho_l = L/rho``, so a decode step reads no more bytes over
  all ``L`` layers than the even split. For each layer and share the best ``r`` is scored as
  above; a small dynamic programme (:func:`allocate_budget`) then picks the shares that
  minimise the criterion summed over the layers. On SmolLM2-135M some layers (the first,
  above all) lose far more attention mass than others at the same budget
  (``benchmarks/results/AUTO_SPLIT.md``).

A split is stored as ``r`` and the layer's ratio ``rho_l`` alone: ``k`` follows from the
budget at each length (:func:`k_on_budget`), so one calibration serves every context length.
"""

from __future__ import annotations

import json
import math
import os

import torch

from .budget import rk_for_ratio
from .reference import approximate_selection, sparq_attention_reference, valid_positions

MIN_CALIBRATION_POSITIONS = 64  # shorter prefills fall back to the even split

# Sampled query positions per layer: one per 64 positions of the prefill's last quarter, at
# least 8 (so 8 up to 2048 tokens, 16 at 4096, 32 at 8192). With 8 at 8192 tokens, 5 of
# SmolLM2's 30 layers chose another r than with 32, and the 8K windows decoded worse
# (benchmarks/results/AUTO_SPLIT.md, "Session 8": pooled 8K ratio 8 auto/even 0.68 -> 0.49).
MIN_SAMPLED_POSITIONS = 8
PREFILL_TOKENS_PER_SAMPLED_POSITION = 256

# budget="model": the multiples of the even per-layer budget a layer may read. Quarters, so that
# the allocation is an integer knapsack; up to 3x, and never more than MAX_LAYER_FRACTION of
# dense attention (k stays below S, so a share is never wasted on a clamped k).
BUDGET_SHARES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
MAX_LAYER_FRACTION = 0.75
BUDGETS = ("model", "layer")
DEFAULT_BUDGET = "model"  # evidence: benchmarks/results/AUTO_SPLIT.md


def k_on_budget(ratio: float, seq_len: int, head_dim: int, r: int) -> int:
    """The ``k`` that spends what ``r`` leaves of the budget ``2*S*D/ratio`` (at least 1).

    At the even split ``r = D/ratio`` this is ``S/(2*ratio)``, as :func:`rk_for_ratio` gives.
    """
    if r * ratio >= 2 * head_dim:
        raise ValueError(f"r={r} alone spends the whole budget of ratio {ratio} (head_dim {head_dim})")
    return max(1, math.floor(seq_len * (1.0 / ratio - r / (2.0 * head_dim)) + 1e-9))


def candidate_rs(ratio: float, head_dim: int) -> list[int]:
    """Powers of two below the budget's limit ``2D/ratio`` plus the even split's ``r``."""
    even_r, _ = rk_for_ratio(ratio, 1, head_dim)
    limit = 2 * head_dim / ratio
    rs = {even_r} | {1 << i for i in range(int(math.log2(head_dim)) + 1) if (1 << i) < limit}
    return sorted(r for r in rs if r < limit and r <= head_dim)


# Criteria for choosing r, each a per-layer score to minimise (mean over heads and positions):
#   "mass":    1 - the exact attention mass of the positions SparQ reads in step 2 (top-k of the
#              approximate scores plus the local window); the proposal.
#   "logmass": -log of that retained mass (weighs heads that lose most of their mass harder).
#   "output":  relative L2 error of SparQ's output (with the mean-value reallocation) against
#              exact attention, per head.
#   "layer_output": the same error over all heads of the layer at once (heads with small outputs
#              weigh less than in "output").
CRITERIA = ("mass", "logmass", "output", "layer_output")
DEFAULT_CRITERION = "mass"  # evidence: benchmarks/results/split_criteria.md


def exact_prefix_attention(queries, keys, values, positions, scale=None) -> dict:
    """What every candidate split is compared with: exact causal attention of the sampled
    prefill positions (computed once per layer, shared by all candidates and shares).

    ``queries`` ``(Hq, P, D)``, ``keys``/``values`` ``(Hkv, S, D)``; query position ``t``
    attends to ``[0, t]``. Returns fp32 tensors laid out as SparQ batch rows (one per position).
    """
    Hq, P, D = queries.shape
    Hkv, S, _ = keys.shape
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    f32 = torch.float32
    q = queries.to(f32).transpose(0, 1)[:, :, None, :]  # (P, Hq, 1, D): a batch row per position
    K, V = keys.to(f32), values.to(f32)
    lens = torch.as_tensor(positions, device=keys.device) + 1
    logits = torch.einsum("phd,hsd->phs", q[:, :, 0], K.repeat_interleave(G, 0)) * scale
    causal = torch.arange(S, device=keys.device)[None, :] < lens[:, None]  # (P, S)
    probs = torch.softmax(logits.masked_fill(~causal[:, None, :], -math.inf), -1)
    exact = torch.einsum("phs,hsd->phd", probs, V.repeat_interleave(G, 0))
    # mean of V over each prefix from one cumulative sum (not P passes over V)
    v_mean = (V.cumsum(1)[:, lens - 1] / lens[None, :, None]).transpose(0, 1)[:, :, None, :]
    # K twice, as the cache keeps it: step 1 then gathers r rows of key_t, not r columns of K
    key_t = K.transpose(1, 2).contiguous()
    return {"q": q, "K": K[None].expand(P, Hkv, S, D), "V": V[None].expand(P, Hkv, S, D),  # no copies
            "key_t": key_t[None].expand(P, Hkv, D, S), "lens": lens, "probs": probs, "exact": exact,
            "v_mean": v_mean, "scale": scale, "G": G}


MASS_CRITERIA = ("mass", "logmass")  # need only the selected positions, not SparQ's output


def split_scores(queries, keys, values, positions, ratio, candidates=None, local_window_frac=0.25,
                 scale=None, prefix: dict | None = None, criteria=CRITERIA) -> dict[int, dict]:
    """Per candidate ``r``: ``k`` on the budget and the criteria ``criteria`` (default: all of
    :data:`CRITERIA`).

    ``queries`` ``(Hq, P, D)``: the queries of the prefill positions ``positions`` (``P``
    ints); ``keys``/``values`` ``(Hkv, S, D)``; query position ``t`` attends to ``[0, t]``
    (causal), with the local window ``k * local_window_frac`` as in decoding. ``prefix``: the
    :func:`exact_prefix_attention` of the same inputs, when the caller scores several ratios.
    Returns ``{r: {"k", "retained_mass", *criteria}}`` (plus ``rel_error`` = ``output``). With
    only :data:`MASS_CRITERIA` SparQ's output is not computed (the cost of step 2's gathers).
    """
    D = queries.shape[-1]
    candidates = candidates or candidate_rs(ratio, D)
    if prefix is None:
        prefix = exact_prefix_attention(queries, keys, values, positions, scale)
    q, lens, probs, exact, G = prefix["q"], prefix["lens"], prefix["probs"], prefix["exact"], prefix["G"]
    mean_len = int(lens.float().mean().item())
    need_output = any(c not in MASS_CRITERIA for c in criteria)
    results = {}
    for r in candidates:
        k = k_on_budget(ratio, mean_len, D, r)
        window = int(k * local_window_frac)
        if need_output:
            out, i2 = sparq_attention_reference(q, prefix["K"], prefix["V"], r, k, key_t=prefix["key_t"],
                                                value_mean=prefix["v_mean"], seq_lens=lens, local_window=window,
                                                scale=prefix["scale"], return_selection=True)
        else:
            P, Hq = q.shape[0], q.shape[1]
            valid = valid_positions(P, prefix["K"].shape[2], lens, device=q.device)
            _, i2 = approximate_selection(q.reshape(P, Hq // G, G, D), prefix["K"], r, k, valid,
                                          prefix["key_t"], window, prefix["scale"])
        # positions past a row's prefix carry zero probability, so they add no mass
        mass = probs.gather(-1, i2.repeat_interleave(G, 1)).sum(-1).clamp(1e-12, 1.0)  # (P, Hq)
        results[r] = {"k": k, "mass": (1 - mass).mean().item(), "logmass": (-mass.log()).mean().item(),
                      "retained_mass": mass.mean().item()}
        if need_output:
            diff = out[:, :, 0] - exact  # (P, Hq, D)
            err = diff.norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)
            layer_err = diff.flatten(1).norm(dim=-1) / exact.flatten(1).norm(dim=-1).clamp_min(1e-12)
            results[r].update(output=err.mean().item(), rel_error=err.mean().item(),
                              layer_output=layer_err.mean().item())
    return results


def split_errors(queries, keys, values, positions, ratio, candidates=None, local_window_frac=0.25,
                 scale=None) -> dict[int, dict]:
    """:func:`split_scores` (kept under its earlier name; ``rel_error`` is the output error)."""
    return split_scores(queries, keys, values, positions, ratio, candidates, local_window_frac, scale)


def budget_shares(ratio: float, budget: str = DEFAULT_BUDGET) -> tuple[float, ...]:
    """The shares of the even per-layer budget a layer may take (``(1.0,)`` for ``"layer"``)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if budget == "layer":
        return (1.0,)
    return tuple(s for s in BUDGET_SHARES if s == 1.0 or s / ratio <= MAX_LAYER_FRACTION)


def layer_ratio(ratio: float, share: float) -> float:
    """The compression ratio of a layer that reads ``share`` times the even per-layer budget."""
    return ratio / share


def allocate_budget(layer_options: dict[int, dict[float, float]]) -> dict[int, float]:
    """Shares per layer that minimise the summed score with the shares averaging at most 1.

    ``layer_options``: ``{layer: {share: score}}`` (lower is better; every layer must offer
    share 1.0, so the even allocation is always feasible). Exact (a knapsack over quarter
    units, ``O(L^2 * shares)``) and deterministic: among equal sums (to 9 decimals) the
    allocation closest to the even one (sum of ``|share - 1|``) wins, then the first layers'
    smaller shares.
    """
    layers = sorted(layer_options)
    unit = 4  # shares are multiples of 1/4
    cap = unit * len(layers)
    best = {0: (0.0, 0.0, ())}  # used units -> (summed score, distance from even, shares so far)
    for layer in layers:
        options = layer_options[layer]
        if 1.0 not in options:
            raise ValueError(f"layer {layer} has no share 1.0 (the even budget)")
        step = {}
        for used, (total, distance, shares) in sorted(best.items()):
            for share in sorted(options):
                units = round(share * unit)
                if abs(units - share * unit) > 1e-9:
                    raise ValueError(f"share {share} of layer {layer} is not a multiple of 1/{unit}")
                if used + units > cap:
                    continue
                candidate = (round(total + options[share], 9), distance + abs(share - 1.0), shares + (share,))
                if used + units not in step or candidate < step[used + units]:
                    step[used + units] = candidate
        best = step
    return dict(zip(layers, min(best.values())[2]))


def check_position_count(positions) -> None:
    """Raise ``ValueError`` unless ``positions`` is ``None`` (by length) or a positive int."""
    if positions is not None and (isinstance(positions, bool) or not isinstance(positions, int) or positions < 1):
        raise ValueError(f"positions must be a positive int or None, got {positions!r}")


def default_position_count(seq_len: int) -> int:
    """How many query positions a layer's calibration samples from a ``seq_len``-token prefill."""
    return max(MIN_SAMPLED_POSITIONS, seq_len // PREFILL_TOKENS_PER_SAMPLED_POSITION)


def calibration_positions(seq_len: int, count: int = 16) -> list[int]:
    """Evenly spaced query positions in the last quarter of a prefill (recent, not adjacent)."""
    start = seq_len - max(1, seq_len // 4)
    return sorted({start + (i * (seq_len - 1 - start)) // max(1, count - 1) for i in range(count)})


def choose_layer_split(queries, keys, values, ratio, scale=None, positions: int | None = None,
                       local_window_frac=0.25, criterion: str | None = None,
                       budget: str = "layer", record: bool = True) -> dict:
    """Pick ``r`` on the budget line for one layer from its prefill ``queries`` ``(Hq, S, D)``,
    ``keys``/``values`` ``(Hkv, S, D)``, minimising ``criterion`` (one of :data:`CRITERIA`,
    default :data:`DEFAULT_CRITERION`). Deterministic: ties (to 6 decimals) go to the larger
    ``r``. Falls back to the even split when the prefill is shorter than
    ``MIN_CALIBRATION_POSITIONS``. ``positions``: query positions sampled from the prefill's last
    quarter (default :func:`default_position_count` of its length).

    With ``budget="model"`` the same choice is also made at every share of
    :func:`budget_shares` (the layer's ratio ``ratio / share``): ``"options"`` maps each share
    to its best ``{"r", "score"}``, the input of :func:`allocate_budget`. ``"r"`` stays the
    choice at share 1.

    ``record``: also score every criterion at share 1 (``"scores"``, for comparing criteria).
    Without it only ``criterion`` is scored, the same choice at a fraction of the cost when it is
    one of :data:`MASS_CRITERIA` (SparQ's output is then never computed).
    """
    criterion = criterion or DEFAULT_CRITERION
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    shares = budget_shares(ratio, budget)
    S, D = keys.shape[1], keys.shape[2]
    even_r, _ = rk_for_ratio(ratio, S, D)
    if S < MIN_CALIBRATION_POSITIONS:
        return {"r": even_r, "source": f"even (calibration needs >= {MIN_CALIBRATION_POSITIONS} "
                                        f"positions, got {S})"}
    check_position_count(positions)
    pos = calibration_positions(S, positions or default_position_count(S))
    prefix = exact_prefix_attention(queries[:, pos], keys, values, pos, scale)
    options = {}
    for share in shares:
        # with record, every criterion at the layer's own budget; elsewhere only the one chosen
        scores = split_scores(queries[:, pos], keys, values, pos, layer_ratio(ratio, share),
                              local_window_frac=local_window_frac, prefix=prefix,
                              criteria=CRITERIA if record and share == 1.0 else (criterion,))
        best = min(scores, key=lambda r: (round(scores[r][criterion], 6), -r))
        options[share] = {"r": best, "score": scores[best][criterion]}
        if share == 1.0:
            choice = {"r": best, "source": "auto", "seq_len": S, "criterion": criterion,
                      "errors": {str(r): e[criterion] for r, e in scores.items()},
                      "scores": {str(r): {c: e[c] for c in CRITERIA if c in e} for r, e in scores.items()}}
    if budget == "model":
        choice["options"] = options
    return choice


def save_split(path: str, layer_r: dict[int, int], ratio: float, model: str = "", extra=None,
               layer_ratio: dict[int, float] | None = None, lengths: dict | None = None) -> None:
    """Write a per-layer split as JSON (``{"ratio", "model", "layer_r": {layer: r}}``, plus
    ``"layer_ratio": {layer: rho_l}`` for a model-wide budget, and ``"lengths": {L: {"layer_r",
    "layer_ratio"}}`` for a split calibrated at several context lengths ``L``)."""
    payload = {"ratio": ratio, "model": model,
               "layer_r": {str(layer): int(r) for layer, r in sorted(layer_r.items())}}
    if layer_ratio:
        payload["layer_ratio"] = {str(layer): float(v) for layer, v in sorted(layer_ratio.items())}
    if lengths:
        payload["lengths"] = {str(length): {"layer_r": {str(a): int(b) for a, b in sorted(lr.items())},
                                            "layer_ratio": {str(a): float(b) for a, b in sorted(lq.items())}}
                              for length, (lr, lq) in sorted(lengths.items())}
    payload.update(extra or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)


def load_split(path: str) -> tuple[float, dict[int, int], dict[int, float]]:
    """Read a JSON written by :func:`save_split`: ``(ratio, {layer: r}, {layer: rho_l})``; the
    last is empty for a split with every layer on its own budget line (``budget="layer"``)."""
    payload = _read_split(path)
    try:
        return (float(payload["ratio"]), {int(k): int(v) for k, v in payload["layer_r"].items()},
                {int(k): float(v) for k, v in payload.get("layer_ratio", {}).items()})
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path} is not a sparq_ext split file: {error}") from error


def load_length_splits(path: str) -> dict[int, tuple[dict[int, int], dict[int, float]]]:
    """The per-length splits of a split file: ``{L: ({layer: r}, {layer: rho_l})}``, empty when
    the file holds one split for every length."""
    payload = _read_split(path)
    try:
        return {int(length): ({int(k): int(v) for k, v in entry["layer_r"].items()},
                              {int(k): float(v) for k, v in entry.get("layer_ratio", {}).items()})
                for length, entry in payload.get("lengths", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path} is not a sparq_ext split file: {error}") from error


def _read_split(path: str) -> dict:
    with open(path) as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a sparq_ext split file: {error}") from error
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a sparq_ext split file: not a JSON object")
    return payload


def nearest_length(lengths, seq_len: int) -> int:
    """The calibration length closest to ``seq_len`` on a log scale (ties: the longer one)."""
    return min(lengths, key=lambda length: (abs(math.log2(length) - math.log2(max(seq_len, 1))), -length))


def check_split(ratio: float, layer_r: dict[int, int], layer_ratio: dict[int, float], head_dim: int,
                n_layers: int, source: str = "split") -> None:
    """Raise ``ValueError`` unless the split reads at most the budget of ``ratio``: every ``r``
    on its layer's budget line, every layer below :data:`MAX_LAYER_FRACTION` of dense (or at
    ``ratio``), and ``sum_l 1/rho_l <= n_layers/ratio`` over all ``n_layers`` layers."""
    for layer, rho in layer_ratio.items():
        if not (0 <= layer < n_layers):
            raise ValueError(f"{source}: layer {layer} out of range (the model has {n_layers})")
        if not (rho == ratio or 1.0 / rho <= MAX_LAYER_FRACTION + 1e-9):
            raise ValueError(f"{source}: layer {layer} ratio {rho:g} reads more than "
                             f"{MAX_LAYER_FRACTION:g} of dense attention")
    bad = {layer: r for layer, r in layer_r.items()
           if r not in candidate_rs(layer_ratio.get(layer, ratio), head_dim)}
    if bad:
        raise ValueError(f"{source}: r {bad} not on the budget line of the layer's ratio")
    spent = sum(1.0 / layer_ratio.get(layer, ratio) for layer in range(n_layers))
    if spent > n_layers / ratio * (1 + 1e-9):
        raise ValueError(f"{source}: the layers' ratios spend {spent:.4g} layer budgets, more than "
                         f"ratio {ratio:g} allows ({n_layers / ratio:.4g})")
