"""Next-token sampling that stays finite for every value the API accepts.

A temperature is applied to logits shifted so that their maximum is 0: dividing by a tiny temperature
then sends every other logit towards -inf (probability 0) instead of sending the maximum to +inf, where
softmax computes inf - inf = NaN. Below GREEDY_TEMPERATURE sampling is greedy, as in vLLM (the
distribution is one-hot there anyway, to float precision). A row whose logits hold NaN or +inf cannot be
sampled: it is reported as None, so that request alone fails.
"""

from __future__ import annotations

import torch

from app.engine import SamplingParams

GREEDY_TEMPERATURE = 1e-5


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int | None]:
    """One token per row of `logits` ([rows, vocab]), or None for a row that has no valid distribution."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()
    finite = torch.isfinite(logits.amax(dim=-1)).tolist()
    tokens: list[int | None] = []
    for row, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        if not finite[row]:
            tokens.append(None)
        elif row_params.temperature < GREEDY_TEMPERATURE:
            tokens.append(int(greedy[row]))
        else:
            tokens.append(_sample_row(logits[row], row_params, generator))
    return tokens


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int | None:
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1).cpu()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        sorted_probs[(cumulative - sorted_probs) > params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    total = float(probs.sum())
    if not total > 0.0 or total != total:  # NaN compares unequal to itself
        return None
    return int(torch.multinomial(probs, 1, generator=generator).item())
