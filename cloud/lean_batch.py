"""A lean batched target forward for the verifier: packed rows, attention in place over each cache.

Why: `fedge.cloud.batching.batched_forward` runs Hugging Face's modelling code over a left-padded
batch, so every row is padded to the widest one (eight cloud-only rows of one token next to one
verify row of nine cost nine positions each), every session's cache is copied into a fresh padded
buffer each round, and a 4D mask is built over all of it. Here the rows' new tokens are packed into
one (N, 1, hidden) stack, N = the positions the rows really feed, so the linear layers (where the
time goes) see no padding at all; each row's keys/values are written straight into its own
`KVBuffer` (preallocated, grown by a quarter), and its attention reads that buffer in place:

    x = embed(all rows' feeds, packed)                      # (N, 1, hidden): no padding
    per layer:  q, k, v = proj(norm(x))                      # one matmul for every row
                write row b's k, v at [L_b, L_b + n_b) of its buffer
                attn_b = sdpa(q_b, buffer_b[:L_b + n_b])     # causal over its own cache only
                x += o_proj(attn) ; x += mlp(norm(x))
    logits of each row's last `keep` positions only

Every row computes what a batch-of-one forward computes (the same modules on the same numbers; the
matmuls batch over independent rows), so greedy output is the target's own. Rollback stays the
buffer's length pointer. Models the lean path does not know (not Llama-like) use the HF path.
A multi-LoRA bank (`fedge.cloud.multi_lora`) picks adapters per batch row; here each packed token is
a row of its own, so the engine passes one adapter index per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedge.cloud.batching import Row
from fedge.static_decoder import supports


class LeanBatchForward:
    """The per-model runner: layer references and the rotary table, shared by every forward."""

    def __init__(self, model: torch.nn.Module):
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a Llama-architecture model")
        config = model.config
        self.model = model
        self.layers = list(model.model.layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.scaling = self.head_dim ** -0.5
        with torch.no_grad():  # the activations' dtype (a quantised draft's embedding has no float weight)
            self.dtype = model.model.embed_tokens(torch.zeros(1, 1, dtype=torch.long)).dtype
        self.table_len = 0
        self.cos = self.sin = torch.empty(0)
        self._rope_upto(1024)

    @staticmethod
    def available(model: torch.nn.Module) -> bool:
        return supports(model)

    def _rope_upto(self, length: int) -> None:
        if length <= self.table_len:
            return
        length = max(length, 2 * self.table_len)
        with torch.no_grad():
            cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=self.dtype), torch.arange(length)[None])
        self.cos, self.sin, self.table_len = cos[0], sin[0], length

    def __call__(self, rows: list[Row]) -> list[torch.Tensor]:
        """Run every row's `feed` after its cache; the rows' caches grow by their feeds; returns each
        row's last `keep` logits (float32, (keep, V)), as `batched_forward` does."""
        if not rows:
            return []
        if any(not r.feed or not 1 <= r.keep <= len(r.feed) for r in rows):
            raise ValueError("every row needs a non-empty feed and 1 <= keep <= len(feed)")
        starts = [r.kv.length for r in rows]
        lengths = [len(r.feed) for r in rows]
        for r, n in zip(rows, lengths, strict=True):
            r.kv.reserve(n, len(self.layers), self.n_kv, self.head_dim, self.dtype)
        self._rope_upto(max(s + n for s, n in zip(starts, lengths, strict=True)))
        ids = torch.tensor([t for r in rows for t in r.feed], dtype=torch.long)
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        with torch.inference_mode():
            hidden = self._layers(ids, pos, rows, starts, lengths)
            keep_at = torch.cat([torch.arange(e - r.keep, e) for r, e in
                                 zip(rows, torch.tensor(lengths).cumsum(0).tolist(), strict=True)])
            logits = self.model.lm_head(self.model.model.norm(hidden[keep_at]))[:, 0].float()
        for r, s, n in zip(rows, starts, lengths, strict=True):
            r.kv.length = s + n
        return list(logits.split([r.keep for r in rows]))

    def _layers(self, ids: torch.Tensor, pos: torch.Tensor, rows: list[Row], starts: list[int],
                lengths: list[int]) -> torch.Tensor:
        n_tok, d = len(ids), self.head_dim
        x = self.model.model.embed_tokens(ids)[:, None]  # (N, 1, hidden): each position a row of its own
        cos, sin = self.cos[pos][:, None].to(x.dtype), self.sin[pos][:, None].to(x.dtype)  # (N, 1, d)
        masks = [_causal(s, n) for s, n in zip(starts, lengths, strict=True)]
        bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
        attn_out = torch.empty(n_tok, self.n_heads * d, dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = _rope(attn.q_proj(h).view(n_tok, self.n_heads, d), cos, sin)
            k = _rope(attn.k_proj(h).view(n_tok, self.n_kv, d), cos, sin)
            v = attn.v_proj(h).view(n_tok, self.n_kv, d)
            for b, r in enumerate(rows):
                lo, hi, end = bounds[b], bounds[b + 1], starts[b] + lengths[b]
                keys, values = r.kv.keys[i], r.kv.values[i]  # (kv heads, capacity, d)
                keys[:, starts[b]:end] = k[lo:hi].transpose(0, 1)
                values[:, starts[b]:end] = v[lo:hi].transpose(0, 1)
                out = F.scaled_dot_product_attention(
                    q[lo:hi].transpose(0, 1)[None], keys[None, :, :end], values[None, :, :end],
                    attn_mask=masks[b], scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)
                attn_out[lo:hi] = out[0].transpose(0, 1).reshape(hi - lo, -1)
            x = x + attn.o_proj(attn_out[:, None])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _causal(start: int, n: int) -> torch.Tensor | None:
    """Row queries at positions start..start+n-1 see keys 0..their own; one query sees them all."""
    if n == 1:
        return None
    return torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]
