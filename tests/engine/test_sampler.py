"""The transformers backend's sampler on hand-made logits: each of vLLM's steps does what vLLM's does, and
stays finite at the bounds the API accepts (the API suite checks the same parameters on both backends)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from app.api.protocol import ChatCompletionRequest
from app.engine import SamplingParams
from app.engine.sampler import _penalise, sample


@dataclass
class Row:
    params: SamplingParams
    prompt_ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(7))


def params(**options: float | int) -> SamplingParams:
    return SamplingParams(max_tokens=8, **options)  # type: ignore[arg-type]


def test_penalties_move_the_logits_as_vllm_defines_them():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    row = Row(params(repetition_penalty=2.0), prompt_ids=[0, 1], generated=[2, 2, 3])
    _penalise(logits, row)
    # Repetition over prompt and answer: positive logits halved, negative doubled; token 4 never seen.
    assert logits.tolist() == [1.0, -4.0, 0.5, 0.25, 3.0]
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    _penalise(logits, Row(params(frequency_penalty=0.5, presence_penalty=0.25), prompt_ids=[0], generated=[2, 2, 3]))
    # Over the answer only: 0.5 per occurrence plus 0.25 once; the prompt's token 0 is untouched.
    assert logits.tolist() == [2.0, -2.0, 1.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25, 3.0]


def test_a_greedy_answer_is_penalised_too():
    logits = torch.tensor([[0.0, 5.0, 4.0]])
    assert sample(logits, [Row(params(temperature=0.0))]) == [1]
    assert sample(logits, [Row(params(temperature=0.0, presence_penalty=2.0), generated=[1])]) == [2]
    # A row without penalties in the same batch is left alone.
    batch = torch.tensor([[0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    rows = [Row(params(temperature=0.0, frequency_penalty=2.0), generated=[1]), Row(params(temperature=0.0))]
    assert sample(batch, rows) == [2, 1]


@pytest.mark.parametrize("option", [{"top_k": 1}, {"min_p": 1.0}, {"top_k": 2, "top_p": 0.01}])
def test_top_k_and_min_p_leave_only_the_likeliest_when_set_to_their_tightest(option):
    logits = torch.tensor([[1.0, 1.5, 1.4, 0.2]])
    for seed in range(20):
        row = Row(params(temperature=1.0, **option), generator=torch.Generator().manual_seed(seed))
        assert sample(logits, [row]) == [1]


def test_top_k_and_min_p_keep_what_they_should():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn_k = {
        sample(logits, [Row(params(top_k=2), generator=torch.Generator().manual_seed(s))])[0] for s in range(200)
    }
    assert drawn_k == {0, 1}
    # min_p 0.2: kept are the tokens with at least 0.2 x 0.5 = 0.1.
    drawn_p = {
        sample(logits, [Row(params(min_p=0.2), generator=torch.Generator().manual_seed(s))])[0] for s in range(300)
    }
    assert drawn_p == {0, 1, 2}


@pytest.mark.parametrize(
    "option",
    [
        {"repetition_penalty": 0.01},
        {"repetition_penalty": 10.0},
        {"frequency_penalty": -2.0, "presence_penalty": -2.0},
        {"frequency_penalty": 2.0, "presence_penalty": 2.0},
        {"temperature": 2.0, "min_p": 1.0, "top_k": 1},
    ],
)
def test_the_bounds_the_api_accepts_stay_finite(option):
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], **option}
    )
    assert body.model_dump(exclude_unset=True).keys() >= option.keys()
    logits = torch.tensor([[30.0, -30.0, 0.0, 1e-3] * 8])
    row = Row(params(**option), prompt_ids=list(range(32)), generated=[0, 1, 2, 3] * 500)
    assert sample(logits, [row])[0] is not None
