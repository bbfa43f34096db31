"""A KV cache that appends in place, for chat sessions that keep their cache for a whole conversation.

transformers' `DynamicLayer` appends a token with `torch.cat`, which copies every cached key and
value: at turn 10 of a chat about one image the cache holds over a thousand positions, and each
decoded token copies all of them again (the cost grows with the conversation; measured: 1% of
decode time over a 10-turn chat about one image on a 2-core CPU). Here each layer keeps its keys
and values in a buffer with room to spare, writes new positions into it, and hands attention a
view of the filled part; the buffer grows by a block when full. Cropping (undo, regenerate, edited history) only moves the end.
`transformers.StaticCache` avoids the copies too, but attends over its whole fixed length on every
step, which is slower on a CPU for chats shorter than the context.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

GROW_BLOCK = 256
"""Positions added when a buffer is full (or the new chunk's length, if longer): a whole
block so that growing (one copy) is rare, small so the spare room costs little memory."""


class AppendInPlaceLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys`/`values` are views of buffers with spare room at the end."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self._views_own_buffer():
            # First update, or `keys` replaced by DynamicLayer's own batch/beam methods: adopt it.
            self._key_buffer, self._value_buffer = self.keys, self.values
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self._key_buffer.numel() == 0 or end > self._key_buffer.shape[-2]:
            self._key_buffer = _grown(self._key_buffer, key_states, length, end)
            self._value_buffer = _grown(self._value_buffer, value_states, length, end)
        self._key_buffer[..., length:end, :].copy_(key_states)
        self._value_buffer[..., length:end, :].copy_(value_states)
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _views_own_buffer(self) -> bool:
        buffer = self._key_buffer
        return (buffer is not None and self.keys is not None and self.keys.numel() > 0
                and self.keys.data_ptr() == buffer.data_ptr() and self.keys.shape[:2] == buffer.shape[:2])

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def _grown(buffer: torch.Tensor, new: torch.Tensor, length: int, end: int) -> torch.Tensor:
    """A buffer shaped like `new` with room for `end` positions plus a block, holding `buffer`'s first `length`."""
    shape = (*new.shape[:-2], end + GROW_BLOCK, new.shape[-1])
    grown = new.new_empty(shape)
    if length:
        grown[..., :length, :].copy_(buffer[..., :length, :])
    return grown


def new_cache(llm_config) -> Cache | None:
    """An append-in-place cache for `llm_config`'s model, or None (the model's default cache) when
    its layers are not all plain full attention (sliding windows, linear attention)."""
    text = llm_config.get_text_config() if hasattr(llm_config, "get_text_config") else llm_config
    layer_types = getattr(text, "layer_types", None) or []
    if getattr(text, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return None
    return Cache(layer_class_to_replicate=AppendInPlaceLayer)
