"""KV-cache plumbing of the transformers engine: left-padded batch buffers written in place, and a cache of
recent prompts' KV for prefix reuse."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, cast

import torch
from transformers import DynamicCache, DynamicLayer

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
# Room a batch's KV buffers keep for positions still to come; growing past it costs one copy.
SPARE_POSITIONS = 128


class PrefixCache:
    """KV caches of recent prompts, so a new prompt that shares their beginning (the chat template's system
    prompt, a conversation's earlier turns) only prefills what is new. Prefill is the expensive,
    compute-bound part on CPUs: 60 prompt tokens cost about four decode steps of a 16-sequence batch.

    Bounded by entries and by bytes: one 8k-token prompt of a small model already holds hundreds of MB."""

    MIN_SHARED_TOKENS = 8

    def __init__(self, capacity: int, max_bytes: int) -> None:
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[KVCache, int]] = OrderedDict()
        self._bytes = 0

    def lookup(self, prompt: list[int]) -> tuple[int, KVCache]:
        best, best_cache = 0, []
        for key, (cache, _) in self._entries.items():
            shared = shared_prefix_length(key, prompt)
            if shared > best:
                best, best_cache = shared, cache
        if best < self.MIN_SHARED_TOKENS:
            return 0, []
        return best, best_cache

    def store(self, prompt: list[int], cache: KVCache) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache)
        if self._capacity == 0 or size > self._max_bytes:
            return
        key = tuple(prompt)
        if key in self._entries:
            self._bytes -= self._entries.pop(key)[1]
        self._entries[key] = (cache, size)
        self._bytes += size
        while len(self._entries) > self._capacity or self._bytes > self._max_bytes:
            self._bytes -= self._entries.popitem(last=False)[1][1]


class InPlaceLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # transformers' hook is untyped
    """A full-attention cache layer over buffers with spare positions: `update` writes the new positions
    into them and exposes the filled part as views, growing (one copy) only when the spare room runs out.
    The buffers belong to one batch (or one prompt being prefilled in chunks) alone, so prompt caches kept
    for prefix reuse are never written to."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self._expose()

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            capacity = end + SPARE_POSITIONS
            keys, values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]
            self.key_buffer = stack_left_padded([keys], self.length, capacity)
            self.value_buffer = stack_left_padded([values], self.length, capacity)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        return self._expose()


def stack_left_padded(blocks: list[torch.Tensor], width: int, capacity: int) -> torch.Tensor:
    """Stack K or V blocks ([rows, heads, length, dim]) along the batch axis into a new tensor of
    `capacity` positions, each block ending at column `width` (left padding before it, spare room after).

    Zeros, not empty memory: padding positions are masked, but NaN bit patterns would still poison the
    attention sum."""
    first = blocks[0]
    rows = sum(block.shape[0] for block in blocks)
    stacked = torch.zeros((rows, first.shape[1], capacity, first.shape[3]), dtype=first.dtype, device=first.device)
    row = 0
    for block in blocks:
        stacked[row : row + block.shape[0], :, width - block.shape[-2] : width] = block
        row += block.shape[0]
    return stacked


def cache_over(buffers: KVCache, length: int, config: Any) -> DynamicCache:
    """A cache whose full-attention layers write into `buffers` in place (the first `length` positions
    filled)."""
    cache = DynamicCache(config=config)
    for index, (layer, (k, v)) in enumerate(zip(cache.layers, buffers, strict=True)):
        if type(layer) is DynamicLayer:
            cache.layers[index] = InPlaceLayer(k, v, length)
        else:  # sliding-window and other layer kinds keep their own bookkeeping
            cast(DynamicLayer, layer).update(k[:, :, :length], v[:, :, :length])
    return cache


def layers_of(cache: DynamicCache) -> KVCache:
    # Attention-only models: batching pads K/V along the sequence axis, which recurrent-state layers lack.
    layers: KVCache = []
    for layer in cast(list[DynamicLayer], cache.layers):
        if layer.keys is None or layer.values is None:
            raise RuntimeError("a KV cache layer was never filled")
        layers.append((layer.keys, layer.values))
    return layers


def buffers_of(cache: DynamicCache) -> KVCache:
    """Each layer's K/V with any spare positions after the filled part."""
    return [
        (layer.key_buffer, layer.value_buffer) if isinstance(layer, InPlaceLayer) else pair
        for layer, pair in zip(cache.layers, layers_of(cache), strict=True)
    ]


def shared_prefix_length(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
