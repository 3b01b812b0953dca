"""Choose an auto split from a prefill: per layer, how to spend its bytes between SparQ's two reads
and how much of the model's budget it gets (docs/auto-split.md has the method and its evidence).

Any point on a layer's budget line ``S*r + 2*k*D = 2*S*D/rho`` reads the same bytes, and on small
models a smaller ``r`` with a larger ``k`` often loses much less accuracy; layers also differ in
how much they lose at the same budget. So the split is chosen from data the user already has, the
queries, keys and values of a prefill: for a few recent query positions of each layer, SparQ's
selection is computed at every candidate ``r`` (:func:`sparq_ext.budget.candidate_rs`) and every
share of the even per-layer budget (:func:`sparq_ext.budget.budget_shares`), and scored by how
much exact attention mass the positions step 2 reads keep (criterion ``"mass"``, the default).
:func:`allocate_budget` then picks each layer's share so that the scores summed over the layers
are smallest while the model reads no more than ``1/rho`` of dense attention.

:class:`PrefillCalibrator` collects the layers of one prefill and builds the split; the model
integration (:func:`sparq_ext.integrations.transformers.calibrate_split`) drives it.
"""

from __future__ import annotations

import math
import time

import torch

from .budget import budget_shares, candidate_rs, k_on_budget, layer_ratio, rk_for_ratio
from .reference import approximate_selection, sparq_attention_reference, valid_positions

MIN_CALIBRATION_POSITIONS = 64  # shorter prefills cannot be calibrated on (the even split stays)

# Sampled query positions per layer: one per 256 positions of the prefill, at least 8 (so 8 up to
# 2048 tokens, 16 at 4096, 32 at 8192); fewer at 8K left several layers' choice to the sample
# (docs/auto-split.md).
MIN_SAMPLED_POSITIONS = 8
PREFILL_TOKENS_PER_SAMPLED_POSITION = 256


# Criteria for choosing r, each a per-layer score to minimise (mean over heads and positions):
#   "mass":    1 - the exact attention mass of the positions SparQ reads in step 2 (top-k of the
#              approximate scores plus the local window).
#   "logmass": -log of that retained mass (weighs heads that lose most of their mass harder).
#   "output":  relative L2 error of SparQ's output (with the mean-value reallocation) against
#              exact attention, per head.
#   "layer_output": the same error over all heads of the layer at once (heads with small outputs
#              weigh less than in "output").
CRITERIA = ("mass", "logmass", "output", "layer_output")
DEFAULT_CRITERION = "mass"  # evidence: docs/auto-split.md


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
                       local_window_frac=0.25, criterion: str | None = None, record: bool = False) -> dict:
    """Score one layer's split options from its prefill ``queries`` ``(Hq, S, D)``,
    ``keys``/``values`` ``(Hkv, S, D)``, minimising ``criterion`` (one of :data:`CRITERIA`, default
    :data:`DEFAULT_CRITERION`).

    For every share of :func:`sparq_ext.budget.budget_shares` (the layer's ratio ``ratio/share``)
    the best ``r`` on that budget line: ``"options"`` ``{share: {"r", "score"}}``, the input of
    :func:`allocate_budget`; ``"r"`` is the choice at share 1. Deterministic: ties (to 6
    decimals) go to the larger ``r``. A prefill shorter than ``MIN_CALIBRATION_POSITIONS`` gives
    ``{"source": "even ..."}`` and no options. ``positions``: query positions sampled from the
    prefill's last quarter (default :func:`default_position_count` of its length).
    ``record``: also score every criterion at share 1 (``"scores"``, for comparing criteria).
    """
    criterion = criterion or DEFAULT_CRITERION
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    S, D = keys.shape[1], keys.shape[2]
    even_r, _ = rk_for_ratio(ratio, S, D)
    if S < MIN_CALIBRATION_POSITIONS:
        return {"r": even_r, "source": f"even (calibration needs >= {MIN_CALIBRATION_POSITIONS} "
                                        f"positions, got {S})"}
    check_position_count(positions)
    pos = calibration_positions(S, positions or default_position_count(S))
    prefix = exact_prefix_attention(queries[:, pos], keys, values, pos, scale)
    options = {}
    for share in budget_shares(ratio):
        if not candidate_rs(layer_ratio(ratio, share), D):  # small head dims: not even r = 1 fits the share
            continue
        scores = split_scores(queries[:, pos], keys, values, pos, layer_ratio(ratio, share),
                              local_window_frac=local_window_frac, prefix=prefix,
                              criteria=CRITERIA if record and share == 1.0 else (criterion,))
        best = min(scores, key=lambda r: (round(scores[r][criterion], 6), -r))
        options[share] = {"r": best, "score": scores[best][criterion]}
        if share == 1.0:
            choice = {"r": best, "source": "auto", "seq_len": S, "criterion": criterion,
                      "scores": {str(r): {c: e[c] for c in CRITERIA if c in e} for r, e in scores.items()}}
    choice["options"] = options
    return choice


class PrefillCalibrator:
    """Builds one split entry from one prefill: :meth:`observe` each layer's queries, keys and
    values; once all ``n_layers`` are scored, :attr:`layers` is ``{layer: (r, rho_l)}`` with the
    model's budget shared out by :func:`allocate_budget`.

    A prefill shorter than ``MIN_CALIBRATION_POSITIONS`` scores nothing (the next one is tried).
    """

    def __init__(self, ratio: float, n_layers: int, positions: int | None = None,
                 criterion: str | None = None):
        if criterion is not None and criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        check_position_count(positions)
        self.ratio, self.n_layers = float(ratio), n_layers
        self.positions, self.criterion = positions, criterion
        self.options: dict[int, dict] = {}
        self.layers: dict[int, tuple[int, float]] | None = None
        self.seconds = 0.0  # time spent scoring, over all layers
        self.seq_len = 0

    @property
    def done(self) -> bool:
        return self.layers is not None

    @torch.no_grad()
    def observe(self, layer: int, queries, keys, values, scale=None) -> None:
        """Score ``layer`` from its prefill: ``queries`` ``(Hq, S, D)``, ``keys``/``values``
        ``(Hkv, S, D)``, query position ``t`` attending to ``[0, t]``."""
        if self.done or layer in self.options:
            return
        t0 = time.perf_counter()
        choice = choose_layer_split(queries, keys, values, self.ratio, scale=scale, positions=self.positions,
                                    criterion=self.criterion)
        if choice["source"] == "auto":
            self.options[layer] = choice["options"]
            self.seq_len = max(self.seq_len, keys.shape[1])
            if len(self.options) == self.n_layers:
                shares = allocate_budget({layer: {share: option["score"] for share, option in options.items()}
                                          for layer, options in self.options.items()})
                self.layers = {layer: (self.options[layer][share]["r"], layer_ratio(self.ratio, share))
                               for layer, share in sorted(shares.items())}
        self.seconds += time.perf_counter() - t0
