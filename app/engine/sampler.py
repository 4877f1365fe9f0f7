"""Next-token sampling that stays finite for every value the API accepts.

The steps and their order are vLLM's, so that both backends answer a request alike: penalties on the raw
logits (repetition over the prompt and the answer so far; frequency and presence over the answer), then
the temperature, then min_p, top_k and top_p on the probabilities.

A temperature is applied to logits shifted so that their maximum is 0: dividing by a tiny temperature
then sends every other logit towards -inf (probability 0) instead of sending the maximum to +inf, where
softmax computes inf - inf = NaN. Below GREEDY_TEMPERATURE sampling is greedy, as in vLLM (the
distribution is one-hot there anyway, to float precision); penalties still apply. A row whose logits hold
NaN or +inf cannot be sampled: it is reported as None, so that request alone fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from app.engine import SamplingParams, TokenLogprob

GREEDY_TEMPERATURE = 1e-5


class Row(Protocol):
    """What sampling needs of a request: its parameters, its random generator and the tokens so far."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    generated: list[int]


def sample(logits: torch.Tensor, rows: Sequence[Row]) -> list[int | None]:
    """One token per row of `logits` ([rows, vocab]), or None for a row that has no valid distribution."""
    logits = logits.float()
    penalised = [index for index, row in enumerate(rows) if row.params.penalises()]
    if penalised:
        logits = logits.clone()
        for index in penalised:
            _penalise(logits[index], rows[index])
    greedy = logits.argmax(dim=-1).tolist()
    finite = torch.isfinite(logits.amax(dim=-1)).tolist()
    tokens: list[int | None] = []
    for index, row in enumerate(rows):
        if not finite[index]:
            tokens.append(None)
        elif row.params.temperature < GREEDY_TEMPERATURE:
            tokens.append(int(greedy[index]))
        else:
            tokens.append(_sample_row(logits[index], row.params, row.generator))
    return tokens


def _penalise(logits: torch.Tensor, row: Row) -> None:
    """In place, on one row: vLLM's repetition, frequency and presence penalties."""
    params, vocab = row.params, logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in (*row.prompt_ids, *row.generated) if 0 <= t < vocab}), dtype=torch.long)
        if seen.numel():
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
    if row.generated and (params.frequency_penalty or params.presence_penalty):
        ids, counts = torch.unique(torch.tensor(row.generated, dtype=torch.long), return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int | None:
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1).cpu()
    if params.min_p > 0.0:
        probs[probs < params.min_p * probs.max()] = 0.0
    if 0 < params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k).values[-1]
        probs[probs < kth] = 0.0
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        total = float(cumulative[-1])
        # Keep the smallest prefix whose mass reaches top_p of what is left (always the most likely token).
        sorted_probs[(cumulative - sorted_probs) > params.top_p * total] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    total = float(probs.sum())
    if not total > 0.0 or total != total:  # NaN compares unequal to itself
        return None
    return int(torch.multinomial(probs, 1, generator=generator).item())


def logprobs_of(
    logits: torch.Tensor, rows: Sequence[Row], tokens: list[int | None], decode: Callable[[list[int]], str]
) -> list[TokenLogprob | None]:
    """For the rows that ask: the sampled token's log probability under the raw logits (as vLLM reports
    it, before penalties and temperature) and its likeliest alternatives, each token as its text."""
    found: list[TokenLogprob | None] = []
    for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
        alternatives = row.params.logprobs
        if alternatives is None or token is None:
            found.append(None)
            continue
        logprobs = torch.log_softmax(logits[index].float(), dim=-1)
        top: tuple[tuple[str, float], ...] = ()
        if alternatives > 0:
            values, ids = logprobs.topk(min(alternatives, logprobs.shape[-1]))
            top = tuple((decode([i]), value) for i, value in zip(ids.tolist(), values.tolist(), strict=True))
        found.append(TokenLogprob(decode([token]), float(logprobs[token]), top))
    return found
