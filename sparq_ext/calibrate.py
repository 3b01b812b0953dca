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

A split is stored as ``r`` alone: ``k`` follows from the budget at each length
(:func:`k_on_budget`), so one calibration serves every context length.
"""

from __future__ import annotations

import json
import math
import os

import torch

from .budget import rk_for_ratio
from .reference import sparq_attention_reference

MIN_CALIBRATION_POSITIONS = 64  # shorter prefills fall back to the even split


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


def split_scores(queries, keys, values, positions, ratio, candidates=None, local_window_frac=0.25,
                 scale=None) -> dict[int, dict]:
    """Per candidate ``r``: ``k`` on the budget and every criterion of :data:`CRITERIA`.

    ``queries`` ``(Hq, P, D)``: the queries of the prefill positions ``positions`` (``P``
    ints); ``keys``/``values`` ``(Hkv, S, D)``; query position ``t`` attends to ``[0, t]``
    (causal), with the local window ``k * local_window_frac`` as in decoding. Returns
    ``{r: {"k", "mass", "logmass", "output", "layer_output", "retained_mass"}}``
    (``rel_error`` = ``output``).
    """
    Hq, P, D = queries.shape
    Hkv, S, _ = keys.shape
    G = Hq // Hkv
    candidates = candidates or candidate_rs(ratio, D)
    scale = D**-0.5 if scale is None else scale
    f32 = torch.float32
    q = queries.to(f32).transpose(0, 1)[:, :, None, :]  # (P, Hq, 1, D): a batch row per position
    K, V = keys.to(f32), values.to(f32)
    lens = torch.as_tensor(positions, device=keys.device) + 1

    # exact attention of each sampled position over its causal prefix
    logits = torch.einsum("phd,hsd->phs", q[:, :, 0], K.repeat_interleave(G, 0)) * scale
    causal = torch.arange(S, device=keys.device)[None, :] < lens[:, None]  # (P, S)
    probs = torch.softmax(logits.masked_fill(~causal[:, None, :], -math.inf), -1)
    exact = torch.einsum("phs,hsd->phd", probs, V.repeat_interleave(G, 0))
    # mean of V over each prefix from one cumulative sum (not P passes over V)
    v_mean = (V.cumsum(1)[:, lens - 1] / lens[None, :, None]).transpose(0, 1)[:, :, None, :]

    K_rows, V_rows = K[None].expand(P, Hkv, S, D), V[None].expand(P, Hkv, S, D)  # no copies
    mean_len = int(lens.float().mean().item())
    results = {}
    for r in candidates:
        k = k_on_budget(ratio, mean_len, D, r)
        out, i2 = sparq_attention_reference(q, K_rows, V_rows, r, k, value_mean=v_mean, seq_lens=lens,
                                            local_window=int(k * local_window_frac), scale=scale,
                                            return_selection=True)
        diff = out[:, :, 0] - exact  # (P, Hq, D)
        err = diff.norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)
        layer_err = diff.flatten(1).norm(dim=-1) / exact.flatten(1).norm(dim=-1).clamp_min(1e-12)
        # positions past a row's prefix carry zero probability, so they add no mass
        mass = probs.gather(-1, i2.repeat_interleave(G, 1)).sum(-1).clamp(1e-12, 1.0)  # (P, Hq)
        results[r] = {"k": k, "output": err.mean().item(), "rel_error": err.mean().item(),
                      "layer_output": layer_err.mean().item(),
                      "mass": (1 - mass).mean().item(), "logmass": (-mass.log()).mean().item(),
                      "retained_mass": mass.mean().item()}
    return results


def split_errors(queries, keys, values, positions, ratio, candidates=None, local_window_frac=0.25,
                 scale=None) -> dict[int, dict]:
    """:func:`split_scores` (kept under its earlier name; ``rel_error`` is the output error)."""
    return split_scores(queries, keys, values, positions, ratio, candidates, local_window_frac, scale)


def calibration_positions(seq_len: int, count: int = 16) -> list[int]:
    """Evenly spaced query positions in the last quarter of a prefill (recent, not adjacent)."""
    start = seq_len - max(1, seq_len // 4)
    return sorted({start + (i * (seq_len - 1 - start)) // max(1, count - 1) for i in range(count)})


def choose_layer_split(queries, keys, values, ratio, scale=None, positions=16,
                       local_window_frac=0.25, criterion: str | None = None) -> dict:
    """Pick ``r`` on the budget line for one layer from its prefill ``queries`` ``(Hq, S, D)``,
    ``keys``/``values`` ``(Hkv, S, D)``, minimising ``criterion`` (one of :data:`CRITERIA`,
    default :data:`DEFAULT_CRITERION`). Deterministic: ties (to 6 decimals) go to the larger
    ``r``. Falls back to the even split when the prefill is shorter than
    ``MIN_CALIBRATION_POSITIONS``.
    """
    criterion = criterion or DEFAULT_CRITERION
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    S, D = keys.shape[1], keys.shape[2]
    even_r, _ = rk_for_ratio(ratio, S, D)
    if S < MIN_CALIBRATION_POSITIONS:
        return {"r": even_r, "source": f"even (calibration needs >= {MIN_CALIBRATION_POSITIONS} "
                                        f"positions, got {S})"}
    pos = calibration_positions(S, positions)
    scores = split_scores(queries[:, pos], keys, values, pos, ratio, scale=scale,
                          local_window_frac=local_window_frac)
    best = min(scores, key=lambda r: (round(scores[r][criterion], 6), -r))
    return {"r": best, "source": "auto", "seq_len": S, "criterion": criterion,
            "errors": {str(r): e[criterion] for r, e in scores.items()},
            "scores": {str(r): {c: e[c] for c in CRITERIA} for r, e in scores.items()}}


def save_split(path: str, layer_r: dict[int, int], ratio: float, model: str = "", extra=None) -> None:
    """Write a per-layer split as JSON (``{"ratio", "model", "layer_r": {layer: r}}``)."""
    payload = {"ratio": ratio, "model": model,
               "layer_r": {str(layer): int(r) for layer, r in sorted(layer_r.items())}}
    payload.update(extra or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)


def load_split(path: str) -> tuple[float, dict[int, int]]:
    """Read a JSON written by :func:`save_split`: ``(ratio, {layer: r})``."""
    with open(path) as f:
        payload = json.load(f)
    try:
        return float(payload["ratio"]), {int(k): int(v) for k, v in payload["layer_r"].items()}
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a sparq_ext split file: {error}") from error
