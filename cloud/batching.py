"""One target forward for many sessions whose KV caches have different lengths.

Each served session keeps its own keys/values (`KVBuffer`, one growable buffer per layer) between
rounds, inside a `BatchedTargetSequence` (the cloud's `fedge.verifier_session.TargetSequence`);
rolling back a rejected draft is just lowering the buffer's length. For a batched round the
caches are copied into one left-padded `DynamicCache` and every session's new tokens (what its
cache lacks plus its draft, ragged) are left-padded to the widest row:

    row b:  [cache pad][cache of b (L_b)][new pad][new tokens of b (n_b)]

A 4D additive mask lets each real token see exactly the real tokens before it in its own row, and
position ids continue each row from L_b, so every row computes what a batch-of-one forward would
(up to float summation order). The new keys/values of each row are then appended to its buffer.

Copying the caches costs one pass over them per round, which a batch-of-one HF forward pays too
(DynamicCache grows by torch.cat); the forward itself reads the weights once for the whole batch.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


class KVBuffer:
    """Keys/values of one sequence for every layer: (heads, capacity, head_dim) buffers + a length."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-position cache to {length}")
        self.length = length  # the stale tail is overwritten by the next append

    def reserve(self, n: int, layers: int, heads: int, dim: int, dtype: torch.dtype) -> None:
        """Make room for n more positions: exactly what the first feed needs (rounded up to a block),
        then growth by a quarter (amortised O(1) per token), never to twice what the session holds."""
        if not self.keys:
            cap = _round_up(n)
            self.keys = [torch.empty(heads, cap, dim, dtype=dtype) for _ in range(layers)]
            self.values = [torch.empty(heads, cap, dim, dtype=dtype) for _ in range(layers)]
        elif self.length + n > self.keys[0].shape[1]:
            cap = _round_up(max(self.length + n, self.keys[0].shape[1] * 5 // 4))
            self.keys = [_grow(k, cap, self.length) for k in self.keys]
            self.values = [_grow(v, cap, self.length) for v in self.values]

    def append(self, layer_keys: list[torch.Tensor], layer_values: list[torch.Tensor]) -> None:
        """Append (heads, n, head_dim) keys/values for every layer."""
        heads, n, dim = layer_keys[0].shape
        self.reserve(n, len(layer_keys), heads, dim, layer_keys[0].dtype)
        end = self.length + n
        for buf, new in zip(self.keys, layer_keys, strict=True):
            buf[:, self.length:end] = new
        for buf, new in zip(self.values, layer_values, strict=True):
            buf[:, self.length:end] = new
        self.length = end

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


BLOCK = 16  # cache positions are allocated in blocks of this many


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def clip(text: str, limit: int = 64) -> str:
    """`text` quoted for an error detail, cut to `limit` characters: details never echo unbounded input."""
    return repr(text[:limit]) + (f"... ({len(text)} chars)" if len(text) > limit else "")


class FairLock:
    """A mutex granted in arrival order within each kind of work, alternating between kinds when
    both wait: a round step never waits for more than one prefill chunk, and a prefill still
    advances a chunk between steps. (A plain Lock lets the thread that just released it take it
    straight back, so a long chunked prefill would starve the rounds waiting between its chunks.)

        with lock:                  # a round step (the default kind)
        with lock.turn("prefill"):  # one prefill chunk
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[str, deque[object]] = {}
        self._held = False
        self._last = ""

    def _head(self) -> object | None:
        waiting = [kind for kind, q in self._queues.items() if q]
        if not waiting:
            return None
        others = [kind for kind in waiting if kind != self._last]
        return self._queues[(others or waiting)[0]][0]

    def acquire(self, kind: str = "round") -> None:
        me = object()
        with self._cond:
            self._queues.setdefault(kind, deque()).append(me)
            self._cond.wait_for(lambda: not self._held and self._head() is me)
            self._queues[kind].popleft()
            self._held, self._last = True, kind

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def turn(self, kind: str = "round"):
        self.acquire(kind)
        try:
            yield self
        finally:
            self.release()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def pack_rows(rows: list[Row], slack: float = 0.5, free: int = 4 * BLOCK) -> list[list[int]]:
    """Split a batch into groups (indices) whose padded size stays within (1 + slack) of what the
    rows hold plus `free` positions a row: a row is padded to its group's longest, never to the
    longest session in the batch (short sessions still share one forward)."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].kv.length + len(rows[i].feed))
    groups: list[list[int]] = []
    real = 0
    for i in order:
        size = rows[i].kv.length + len(rows[i].feed)
        group = groups[-1] if groups else None
        # sorted ascending: this row is the group's longest, so everything pads to `size`
        if group is not None and size * (len(group) + 1) <= (1 + slack) * (real + size) + free * (len(group) + 1):
            group.append(i)
            real += size
        else:
            groups.append([i])
            real = size
    return groups


def _grow(buf: torch.Tensor, cap: int, used: int) -> torch.Tensor:
    out = torch.empty(buf.shape[0], cap, buf.shape[2], dtype=buf.dtype)
    out[:, :used] = buf[:, :used]
    return out


class _BufferLayer(DynamicLayer):
    """A cache layer over a preallocated (B, heads, total, dim) buffer whose first `length`
    positions are filled: the forward's update writes in place instead of concatenating."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.buf_keys, self.buf_values, self.length = keys, values, length
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.buf_keys[:, :, self.length:end] = key_states
        self.buf_values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.buf_keys[:, :, :end], self.buf_values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class BatchedTargetSequence:
    """The target's tokens and KV buffer for one served session, fed by `batched_forward`.

    `row` says what the next forward must run for this session (what its cache lacks plus the
    draft); `accept` keeps the keys/values of the accepted draft prefix and drops the rest."""

    def __init__(self, prompt_ids: list[int]):
        self.tokens: list[int] = list(prompt_ids)
        self.kv = KVBuffer()
        self._draft: list[int] = []  # the draft fed by the last row, after `tokens`

    def prefill_rows(self, chunk: int):
        """All but the last prompt token, `chunk` at a time (each row runs after the previous one
        filled the cache), so the first round only feeds 1 + k positions."""
        end = len(self.tokens) - 1
        while self.kv.length < end:
            yield Row(self.kv, self.tokens[self.kv.length:min(end, self.kv.length + max(1, chunk))], 1)

    def row(self, draft_ids: list[int]) -> Row:
        pending = self.tokens[self.kv.length:]
        if not pending:  # the last token must be fed to get its logits
            self.kv.truncate(self.kv.length - 1)
            pending = self.tokens[-1:]
        self._draft = list(draft_ids)
        return Row(self.kv, pending + self._draft, len(self._draft) + 1)

    def accept(self, new_tokens: list[int]) -> None:
        kept = 0
        while kept < min(len(new_tokens), len(self._draft)) and new_tokens[kept] == self._draft[kept]:
            kept += 1
        # keys/values of the accepted draft tokens stay; the rejected tail is rolled back
        self.kv.truncate(min(self.kv.length, len(self.tokens) + kept))
        self.tokens.extend(new_tokens)
        self._draft = []


@dataclass
class Row:
    kv: KVBuffer
    feed: list[int]  # tokens to run, starting at position kv.length
    keep: int  # how many trailing positions' logits to return


def batched_forward(model: torch.nn.Module, rows: list[Row]) -> list[torch.Tensor]:
    """Run every row's `feed` after its cache in one forward; append the new keys/values to each
    row's cache and return each row's last `keep` logits (float32, (keep, V))."""
    if not rows:
        return []
    if any(not r.feed or not 1 <= r.keep <= len(r.feed) for r in rows):
        raise ValueError("every row needs a non-empty feed and 1 <= keep <= len(feed)")
    cache_len = max(r.kv.length for r in rows)
    width = max(len(r.feed) for r in rows)
    total = cache_len + width
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float32
    ids, positions, mask = _inputs(rows, cache_len, width, dtype)
    cache = Cache(layers=[_padded_layer(model, rows, layer, cache_len, total, dtype)
                          for layer in range(model.config.num_hidden_layers)])
    keep = max(r.keep for r in rows)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=keep)
    logits = out.logits.float()  # (B, keep, V), right-aligned like the feed
    results = []
    for b, r in enumerate(rows):
        n = len(r.feed)
        r.kv.append([layer.keys[b, :, total - n:] for layer in cache.layers],
                    [layer.values[b, :, total - n:] for layer in cache.layers])
        results.append(logits[b, keep - r.keep:])
    return results


def _inputs(rows: list[Row], cache_len: int, width: int, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, position ids continuing each row's cache, and the 4D additive mask."""
    batch, total = len(rows), cache_len + width
    ids = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    valid = torch.zeros(batch, total, dtype=torch.bool)  # which key positions hold real tokens
    for b, r in enumerate(rows):
        n, length = len(r.feed), r.kv.length
        ids[b, width - n:] = torch.tensor(r.feed, dtype=torch.long)
        positions[b, width - n:] = torch.arange(length, length + n)
        valid[b, cache_len - length:cache_len] = True
        valid[b, total - n:] = True
    # query i (absolute column cache_len + i) sees real keys at columns <= its own, and always
    # itself, so padding queries never get an all-masked row
    cols = torch.arange(total)
    q_cols = cache_len + torch.arange(width)
    allowed = valid[:, None, :] & (cols[None, None, :] <= q_cols[None, :, None])
    allowed |= cols[None, None, :] == q_cols[None, :, None]
    mask = torch.zeros(batch, 1, width, total, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return ids, positions, mask


def _padded_layer(model: torch.nn.Module, rows: list[Row], layer: int, cache_len: int, total: int,
                  dtype: torch.dtype) -> _BufferLayer:
    """One layer's buffer holding the left-padded caches and room for the new positions, so neither
    the assembly nor the forward's cache update re-allocates (DynamicCache would torch.cat)."""
    template = next((r.kv for r in rows if r.kv.length > 0), None)
    if template is None:
        cfg = model.config
        heads = cfg.num_key_value_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_dtype = dtype
    else:
        heads, _, dim = template.keys[layer].shape
        kv_dtype = template.keys[layer].dtype
    k = torch.empty(len(rows), heads, total, dim, dtype=kv_dtype)
    v = torch.empty_like(k)
    for b, r in enumerate(rows):
        pad = cache_len - r.kv.length
        if pad:  # masked, but must stay finite: a masked score still multiplies its value
            k[b, :, :pad] = 0
            v[b, :, :pad] = 0
        if r.kv.length:
            k[b, :, pad:cache_len] = r.kv.keys[layer][:, :r.kv.length]
            v[b, :, pad:cache_len] = r.kv.values[layer][:, :r.kv.length]
    return _BufferLayer(k, v, cache_len)
