"""A key cache for decoding that writes in place: transformers' `DynamicCache` appends each step's keys and
values with `torch.cat`, which copies every layer's whole cache at every step (at batch 48 and a few
hundred positions, more bytes than the model's weights). `BufferLayer` keeps them in buffers grown a
chunk at a time and shows the filled part as a view: the same values, so attention gives the same
answers (tests/test_sample.py checks them against transformers' `generate`)."""

from __future__ import annotations

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers grown `CHUNK` positions at a time; `keys` and
    `values` are views of the filled part."""

    CHUNK = 256

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.buffers, self.length = None, 0

    def _show(self, length: int):
        self.length = length
        self.keys, self.values = (b[..., :length, :] for b in self.buffers)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            grown = []
            for old, new in zip(self.buffers or (None, None), (key_states, value_states)):
                buffer = new.new_empty(*new.shape[:-2], end + self.CHUNK, new.shape[-1])
                if old is not None:
                    buffer[..., :start, :] = old[..., :start, :]
                grown.append(buffer)
            self.buffers = grown
        self.buffers[0][..., start:end, :] = key_states
        self.buffers[1][..., start:end, :] = value_states
        self._show(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self.buffers, self.length = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # transformers' own rule: the count to remove is negative
            raise ValueError(f"crop({tokens_to_remove}): pass the number of positions to remove as a negative count")
        if tokens_to_remove and self.is_initialized and self.buffers is not None:
            self._show(max(self.length + tokens_to_remove, 0))

    def _rows(self, pick) -> None:
        if self.is_initialized and self.buffers is not None:
            self.buffers = [pick(b) for b in self.buffers]
            self._show(self.length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda b: b.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._rows(lambda b: b[indices, ...])

    def reorder_cache(self, beam_idx) -> None:
        self._rows(lambda b: b.index_select(0, beam_idx.to(b.device)))


def decoding_cache(model) -> DynamicCache:
    """transformers' `DynamicCache` for `model` with its full-attention layers `BufferLayer`s (sliding-window
    and other layers stay transformers' own)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [BufferLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if not cache.layers:
        cache.layer_class_to_replicate = BufferLayer
    return cache
