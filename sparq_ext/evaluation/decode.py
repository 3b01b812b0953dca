"""Decode-mode evaluation: prefill densely, then teacher-force tokens one at a time.

Every scored token is predicted by a one-token decode step, so it goes through whatever
attention function the model's decode step uses (SparQ after :func:`enable_sparq`).
"""

from __future__ import annotations

import inspect
import math

import torch


def cache_kwargs(model, cache) -> dict:
    """``{"cache": cache}`` for models whose ``forward`` takes ``cache`` (transformers >= 5.24,
    which deprecates ``past_key_values`` and removes it in 5.40), else ``{"past_key_values": cache}``."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run ``ids`` ``(B, C)`` through ``model`` into ``cache``; returns the last position's logits."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    return out.logits[:, -1].float()


@torch.no_grad()
def teacher_forced_decode(model, tokens: torch.Tensor, cache, progress=None) -> torch.Tensor:
    """Feed ``tokens`` ``(B, N)`` one decode step at a time; returns logits ``(B, N, V)`` (fp32).

    ``logits[:, i]`` predicts the token after ``tokens[:, i]``.
    """
    steps = []
    for i in range(tokens.shape[1]):
        out = model(input_ids=tokens[:, i:i + 1], use_cache=True, **cache_kwargs(model, cache))
        steps.append(out.logits[:, -1].float())
        if progress is not None:
            progress.update(1)
    return torch.stack(steps, 1)


def nll_and_top1(logits: torch.Tensor, targets: torch.Tensor, reference_logits: torch.Tensor | None = None):
    """Mean negative log-likelihood of ``targets`` and, with ``reference_logits``, top-1 agreement."""
    logp = torch.log_softmax(logits.float(), -1)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    result = {"nll": nll.mean().item(), "ppl": math.exp(nll.mean().item()),
              "top1_acc": (logits.argmax(-1) == targets).float().mean().item()}
    if reference_logits is not None:
        result["top1_agreement"] = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    return result


def distinct_ngram_fraction(tokens, n: int = 4) -> float:
    """Distinct ``n``-grams / all ``n``-grams of a token list: low values mean degenerate repetition."""
    tokens = list(tokens)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(1, len(grams))
