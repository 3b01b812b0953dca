"""The text-repetition task (SparQ paper, "text repetition"): copy a passage from far back.

A context of ``C`` tokens of real text is prefilled densely; then a passage from early in that
context (by default from its first quarter) is repeated, teacher-forced one decode step at a
time. Predicting the passage's next token is easy for a model that can find the passage again:
dense attention does, a sink + recent-window cache cannot (the passage is outside its window),
and SparQ does when its approximate scores rank the passage's positions into the top ``k``.

Scores per method: top-1 accuracy (the model's argmax is the passage's next token) and the mean
NLL of those tokens. Every method decodes from the same prefilled cache (:class:`PrefilledCache`).
"""

from __future__ import annotations

import torch

from .decode import nll_and_top1, teacher_forced_decode
from .methods import PrefilledCache, set_method


def passage_starts(context: int, passages: int, passage_tokens: int, region: float = 0.25) -> list[int]:
    """``passages`` start positions spread evenly over the first ``region`` of a ``context``-token
    prompt, each leaving room for ``passage_tokens + 1`` tokens inside the prompt."""
    if passages < 1:
        raise ValueError(f"passages must be >= 1, got {passages}")
    if not 0 < region <= 1:
        raise ValueError(f"region must be in (0, 1], got {region}")
    last = min(int(context * region), context - passage_tokens - 1)
    if last < 0:
        raise ValueError(f"a context of {context} tokens has no room for a passage of {passage_tokens + 1} tokens")
    if passages == 1:
        return [last // 2]
    return [round(i * last / (passages - 1)) for i in range(passages)]


@torch.no_grad()
def run_repetition(model, context_ids: torch.Tensor, starts, configs, passage_tokens: int = 96,
                   progress=None, prefilled: PrefilledCache | None = None) -> list[dict]:
    """Score the repetition of ``context_ids[:, s : s + passage_tokens + 1]`` after the whole
    ``context_ids`` ``(1, C)`` for each start ``s`` and each ``(method, ratio)`` in ``configs``
    (``("dense", None)`` for dense attention).

    Each passage token but the last is fed as one decode step; step ``i`` predicts token
    ``i + 1``, so ``passage_tokens`` tokens are scored. Returns one row per (start, method, ratio)
    with ``top1_acc``, ``nll``, ``correct`` (how many of the ``tokens`` were top-1) and, where
    ``("dense", None)`` is among ``configs``, ``top1_agreement`` with dense decoding.
    """
    if context_ids.dim() != 2 or context_ids.shape[0] != 1:
        raise ValueError(f"context_ids must be (1, C), got {tuple(context_ids.shape)}")
    configs = list(configs)
    if prefilled is None:
        prefilled = PrefilledCache(model, context_ids, h2o_scores=any(m == "h2o" for m, _ in configs))
    # dense first: the other methods' agreement is measured against it
    configs.sort(key=lambda config: config[0] != "dense")
    rows = []
    for start in starts:
        passage = context_ids[:, start:start + passage_tokens + 1]
        if passage.shape[1] != passage_tokens + 1:
            raise ValueError(f"start {start}: the context has no {passage_tokens + 1} tokens from there")
        dense_logits = None
        for method, ratio in configs:
            set_method(model, method, ratio or 8)
            logits = teacher_forced_decode(model, passage[:, :-1], prefilled.fresh(), progress)
            if method == "dense":
                dense_logits = logits
            metrics = nll_and_top1(logits, passage[:, 1:], dense_logits)
            rows.append(dict(start=start, method=method, ratio=ratio, tokens=passage_tokens,
                             correct=int((logits.argmax(-1) == passage[:, 1:]).sum()), **metrics))
    set_method(model, "dense", 8)
    return rows
