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


# -- batches of conversations (`mmchat.engine`) --------------------------------------------
# A batch is one append-in-place cache whose rows are conversations of different lengths, aligned
# at the end (left padding): row i holds its positions in columns [starts[i], width) and every
# decode step appends one column for all rows. Joining and leaving copy the batch once; decode
# steps copy nothing. Padding columns hold zeros (never garbage: a masked NaN would still poison
# attention's weighted sum) and are masked out by `padding_mask`.


def _layer(keys: torch.Tensor, values: torch.Tensor, width: int) -> AppendInPlaceLayer:
    """A layer adopting buffers `keys`/`values` whose first `width` positions are filled."""
    layer = AppendInPlaceLayer()
    layer.lazy_initialization(keys[..., :0, :], values[..., :0, :])
    layer._key_buffer, layer._value_buffer = keys, values
    layer.keys, layer.values = keys[..., :width, :], values[..., :width, :]
    return layer


def _buffer_like(t: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    return t.new_zeros((rows, t.shape[1], width + GROW_BLOCK, t.shape[-1]))


def cache_width(cache: Cache) -> int:
    return cache.get_seq_length()


def join_row(batch: Cache, starts: list[int], row: Cache) -> tuple[Cache, list[int]]:
    """`batch` with the one-row cache `row` added as its last row, end-aligned with the others."""
    width, length = cache_width(batch), cache_width(row)
    new_width = max(width, length)
    shift = new_width - width  # the batch's rows move right when the newcomer is longer
    layers = []
    for old, new in zip(batch.layers, row.layers):
        rows = old.keys.shape[0]
        pair = []
        for have, add in ((old.keys, new.keys), (old.values, new.values)):
            buffer = _buffer_like(have, rows + 1, new_width)
            buffer[:rows, :, shift:new_width].copy_(have)
            buffer[rows, :, new_width - length:new_width].copy_(add[0])
            pair.append(buffer)
        layers.append(_layer(*pair, new_width))
    return Cache(layers=layers), [s + shift for s in starts] + [new_width - length]


def keep_rows(batch: Cache, keep: list[int], starts: list[int]) -> tuple[Cache, list[int]]:
    """`batch` with only rows `keep`, and the leading columns that only padding used dropped."""
    width, first = cache_width(batch), min(starts[i] for i in keep)
    index = torch.tensor(keep, device=batch.layers[0].keys.device)
    layers = []
    for old in batch.layers:
        pair = []
        for have in (old.keys, old.values):
            buffer = _buffer_like(have, len(keep), width - first)
            buffer[:, :, :width - first].copy_(have.index_select(0, index)[:, :, first:])
            pair.append(buffer)
        layers.append(_layer(*pair, width - first))
    return Cache(layers=layers), [starts[i] - first for i in keep]


def take_row(batch: Cache, i: int, start: int) -> Cache:
    """Row `i` of `batch` (its positions from `start`) as a one-row cache of its own."""
    width = cache_width(batch)
    layers = []
    for old in batch.layers:
        pair = []
        for have in (old.keys, old.values):
            buffer = _buffer_like(have, 1, width - start)
            buffer[:, :, :width - start].copy_(have[i:i + 1, :, start:])
            pair.append(buffer)
        layers.append(_layer(*pair, width - start))
    return Cache(layers=layers)


def padding_mask(starts: list[int], width: int, device) -> torch.Tensor | None:
    """The 2-D attention mask [rows, width + 1] for a decode step (None when no row is padded)."""
    if not any(starts):
        return None
    first = torch.tensor(starts, device=device).unsqueeze(1)
    return (torch.arange(width + 1, device=device).unsqueeze(0) >= first).long()
