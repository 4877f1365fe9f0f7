"""Prefill for the transformers engine: prompts that fit the per-turn budget go through the model together
in padded groups, a longer prompt goes through a chunk at a time on top of its own KV so far."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from app.engine.kv import KVCache, buffers_of, cache_over, layers_of, stack_left_padded


@dataclass(eq=False)
class Prompt:
    """A prompt on its way into the KV cache."""

    ids: list[int]
    reused: int  # tokens whose KV comes from the prefix cache
    cached: KVCache
    # Chunked prefill of a long prompt: buffers sized to the prompt, filled up to `done`.
    buffers: KVCache | None = None
    done: int = 0

    @property
    def new_tokens(self) -> int:
        return len(self.ids) - max(self.reused, self.done)


class Prefiller:
    def __init__(self, model: Any, device: torch.device, budget: int) -> None:
        self._model = model
        self._device = device
        self.budget = budget
        # Prefill only needs the last position's logits; computing the rest costs a vocab-sized matmul per
        # prompt token. Older model classes lack the argument.
        self._kwargs: dict[str, int] = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )

    def fits(self, prompt: Prompt) -> bool:
        """Whether the prompt goes in one group pass rather than in chunks."""
        return prompt.buffers is None and prompt.new_tokens <= self.budget

    def groups(self, prompts: list[Prompt]) -> list[list[Prompt]]:
        """Split prompts that fit into groups that are prefilled in one forward pass each.

        A forward pass reads every weight once whatever its size, so on CPU sixteen 16-token prompts cost
        0.6 s together against 2.1 s one by one. But a group pads every prompt to its longest new part,
        so prompts only share a group while the padding stays under the real tokens, and within the
        budget."""
        groups: list[list[Prompt]] = []
        for prompt in sorted(prompts, key=lambda p: p.new_tokens):
            group = groups[-1] if groups else []
            padded = (len(group) + 1) * prompt.new_tokens
            real = sum(p.new_tokens for p in group) + prompt.new_tokens
            if group and padded <= 2 * real and padded <= self.budget:
                group.append(prompt)
            else:
                groups.append([prompt])
        return groups

    def group(self, group: list[Prompt]) -> tuple[torch.Tensor, list[KVCache]]:
        """One forward pass over the new tokens of every prompt in the group: the next-token logits of each
        row, and each prompt's own KV.

        Rows are left-padded so that every prompt ends in the last column: the cached prefixes fill the
        first `past` columns, the `width` input columns hold what is new (a row whose prefix is shorter
        than another's recomputes some cached tokens rather than leave a gap)."""
        width = max(p.new_tokens for p in group)
        past_lengths = [max(0, len(p.ids) - width) for p in group]
        past = max(past_lengths)
        total = past + width
        rows = len(group)
        cache = DynamicCache(config=self._model.config)
        if past:
            template = group[past_lengths.index(past)].cached
            # A row with nothing cached is all padding: a zero-length slice of another row's cache stands in.
            prefixes = [
                [(k[:, :, :length], v[:, :, :length]) for k, v in (prompt.cached if length else template)]
                for prompt, length in zip(group, past_lengths, strict=True)
            ]
            layers = [
                (
                    stack_left_padded([row[index][0] for row in prefixes], past, past),
                    stack_left_padded([row[index][1] for row in prefixes], past, past),
                )
                for index in range(len(template))
            ]
            cache = DynamicCache(ddp_cache_data=layers, config=self._model.config)
        ids = torch.zeros((rows, width), dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        mask = torch.zeros((rows, total), dtype=torch.long)
        for row, prompt in enumerate(group):
            fresh = min(len(prompt.ids), width)
            ids[row, width - fresh :] = torch.tensor(prompt.ids[len(prompt.ids) - fresh :])
            positions[row, width - fresh :] = torch.arange(len(prompt.ids) - fresh, len(prompt.ids))
            mask[row, total - len(prompt.ids) :] = 1
        out = self._model(
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device),
            past_key_values=cache,
            use_cache=True,
            **self._kwargs,
        )
        computed = layers_of(out.past_key_values)
        # Each prompt's own positions, copied out: padding stays behind, and the prefix cache holds no
        # reference to the whole group's tensors.
        own = [
            [
                (k[row : row + 1, :, total - len(p.ids) :].clone(), v[row : row + 1, :, total - len(p.ids) :].clone())
                for k, v in computed
            ]
            for row, p in enumerate(group)
        ]
        return out.logits[:, -1, :], own

    def chunk(self, prompt: Prompt, size: int) -> tuple[torch.Tensor, KVCache] | None:
        """The next `size` tokens of one long prompt; when they were its last, the next-token logits and
        the prompt's KV."""
        start, end = prompt.done, min(len(prompt.ids), prompt.done + size)
        if prompt.buffers is None and start > 0:
            prompt.buffers = [
                (
                    stack_left_padded([k[:, :, :start]], start, len(prompt.ids)),
                    stack_left_padded([v[:, :, :start]], start, len(prompt.ids)),
                )
                for k, v in prompt.cached
            ]
        past = (
            cache_over(prompt.buffers, start, self._model.config)
            if prompt.buffers is not None
            else DynamicCache(config=self._model.config)
        )
        out = self._model(
            input_ids=torch.tensor([prompt.ids[start:end]], dtype=torch.long, device=self._device),
            attention_mask=torch.ones((1, end), dtype=torch.long, device=self._device),
            position_ids=torch.arange(start, end, device=self._device).unsqueeze(0),
            past_key_values=past,
            use_cache=True,
            **self._kwargs,
        )
        if prompt.buffers is None:  # first chunk: from now on the prompt's KV is written in place
            prompt.buffers = [
                (stack_left_padded([k], end, len(prompt.ids)), stack_left_padded([v], end, len(prompt.ids)))
                for k, v in layers_of(out.past_key_values)
            ]
        else:
            prompt.buffers = buffers_of(out.past_key_values)
        prompt.done = end
        if end < len(prompt.ids):
            return None
        length = len(prompt.ids)
        return out.logits[:, -1, :], [(k[:, :, :length], v[:, :, :length]) for k, v in prompt.buffers]
