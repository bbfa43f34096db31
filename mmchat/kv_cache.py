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
class BatchCache(Cache):
    """The KV caches of several conversations decoding together, one row each.

    Row r holds its conversation's positions in columns [0, lens[r]) of one buffer per layer
    (right padding); a decode step writes each row's new key and value at its own length, and
    attention sees columns [0, max(lens)] with each row's padding masked (`step_inputs`). Joining
    copies one row in and leaving copies one row out (the last row moves into the gap), so a
    conversation's cost does not grow with the batch; the buffers grow by blocks, rarely.
    Padding columns hold zeros, never garbage: a masked NaN would still poison attention's sum.
    """

    def __init__(self, first: Cache, max_rows: int):
        self.max_rows = max_rows
        self.lens: list[int] = [first.get_seq_length()]
        self._at = None
        """Where this step writes when rows differ in length: (row indices, their lengths); set by `step_inputs`."""
        # The first conversation's own buffers become the batch's (one row, no copy): a user alone
        # decodes exactly as a chat session does. More rows grow them (`_reserve`).
        layers = [_own_buffers(layer) for layer in first.layers]
        self._keys = [keys for keys, _ in layers]
        self._values = [values for _, values in layers]
        for store in (self._keys, self._values):
            for buffer in store:
                buffer[:, :, self.lens[0]:].zero_()  # spare room: garbage there would be read, masked
        super().__init__(layers=[_BatchLayer(self, i) for i in range(len(layers))])

    @property
    def rows(self) -> int:
        return len(self.lens)

    @property
    def width(self) -> int:
        return max(self.lens)

    def add(self, cache: Cache) -> int:
        """Copy a one-row cache in as the last row; returns its row."""
        length = cache.get_seq_length()
        self._reserve(self.rows + 1, length + 1)
        for layer, keys, values in zip(cache.layers, self._keys, self._values):
            keys[self.rows, :, :length].copy_(layer.keys[0])
            values[self.rows, :, :length].copy_(layer.values[0])
            keys[self.rows, :, length:].zero_()  # what a row that left here wrote
            values[self.rows, :, length:].zero_()
        self.lens.append(length)
        return self.rows - 1

    def remove(self, row: int) -> Cache:
        """Take row `row` out as a one-row append-in-place cache; the last row moves into its place."""
        length, last = self.lens[row], self.rows - 1
        if self.rows == 1 and self._keys[0].shape[0] == 1:  # the only row of one-row buffers: hand them over
            self.lens.pop()
            return Cache(layers=[_adopting(k, v, length) for k, v in zip(self._keys, self._values)])
        out = Cache(layer_class_to_replicate=AppendInPlaceLayer)
        for i, (keys, values) in enumerate(zip(self._keys, self._values)):
            out.update(keys[row:row + 1, :, :length], values[row:row + 1, :, :length], i)
            if row != last:
                n = self.lens[last]
                keys[row, :, :n].copy_(keys[last, :, :n])
                values[row, :, :n].copy_(values[last, :, :n])
                keys[row, :, n:length].zero_()
                values[row, :, n:length].zero_()
        self.lens[row] = self.lens[last]
        self.lens.pop()
        return out

    def step_inputs(self, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(attention mask [rows, width + 1], position ids [rows, 1]) for a decode step; both None
        when every row has the same length (nothing to mask: the plain single-sequence path)."""
        self._reserve(self.rows, self.width + 1)
        if len(set(self.lens)) == 1:
            self._at = None  # every row writes the same column: a plain slice copy
            return None, None
        lens = torch.tensor(self.lens, device=device)
        self._at = (torch.arange(self.rows, device=device), lens)
        return (torch.arange(self.width + 1, device=device).unsqueeze(0) <= lens.unsqueeze(1)).long(), lens.unsqueeze(1)

    def advance(self) -> None:
        """After a decode step: every row is one position longer."""
        self.lens = [n + 1 for n in self.lens]

    def _reserve(self, rows: int, width: int) -> None:
        have_rows, have_cap = self._keys[0].shape[0], self._keys[0].shape[2]
        if rows <= have_rows and width <= have_cap:
            return
        new_rows = have_rows if rows <= have_rows else min(self.max_rows, max(rows, 2 * have_rows))
        new_cap = have_cap if width <= have_cap else width + GROW_BLOCK
        for store in (self._keys, self._values):
            for i, old in enumerate(store):
                grown = old.new_zeros((new_rows, old.shape[1], new_cap, old.shape[-1]))
                grown[:have_rows, :, :have_cap].copy_(old)
                store[i] = grown


def _own_buffers(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-row layer's key and value buffers with room to spare: an append-in-place layer's own,
    else copies of any other layer's tensors."""
    if isinstance(layer, AppendInPlaceLayer) and layer._views_own_buffer():
        return layer._key_buffer, layer._value_buffer
    length = layer.keys.shape[-2]
    pair = []
    for have in (layer.keys, layer.values):
        buffer = have.new_zeros((1, have.shape[1], length + GROW_BLOCK, have.shape[-1]))
        buffer[:, :, :length].copy_(have)
        pair.append(buffer)
    return pair[0], pair[1]


def _adopting(keys: torch.Tensor, values: torch.Tensor, width: int) -> AppendInPlaceLayer:
    """An append-in-place layer over buffers `keys`/`values` whose first `width` positions are filled."""
    layer = AppendInPlaceLayer()
    layer.lazy_initialization(keys[..., :0, :], values[..., :0, :])
    layer._key_buffer, layer._value_buffer = keys, values
    layer.keys, layer.values = keys[..., :width, :], values[..., :width, :]
    return layer


class _BatchLayer(DynamicLayer):
    """One layer of a `BatchCache`: writes each row's new position at that row's own length."""

    def __init__(self, batch: BatchCache, index: int):
        super().__init__()
        self.batch, self.index = batch, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise ValueError("a BatchCache takes one new position per row (decode steps); prefill each row alone")
        batch = self.batch
        rows, width = batch.rows, batch.width
        keys, values = batch._keys[self.index], batch._values[self.index]
        if batch._at is None:
            keys[:rows, :, width:width + 1].copy_(key_states)
            values[:rows, :, width:width + 1].copy_(value_states)
        else:
            keys[batch._at[0], :, batch._at[1]] = key_states[:, :, 0]
            values[batch._at[0], :, batch._at[1]] = value_states[:, :, 0]
        self.keys, self.values = keys[:rows, :, :width + 1], values[:rows, :, :width + 1]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.batch.width
