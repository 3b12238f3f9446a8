"""A lean decode runner (gpt-fast style) for Llama-architecture models: static KV cache, fixed shapes.

Why: at batch one on a CPU, a 135M model's forward through Hugging Face's modelling code spends
most of its time in Python and framework overhead (mask building, cache objects, per-layer
dispatch), not in reading the weights. `LeanDecoder` runs the same arithmetic over the model's own
modules (its projections may be the draft's int4/int8 packed layers or LoRA side paths) with a
preallocated cache and, where `torch.compile` works, a compiled step per padded width
(1, 2, 4, 8, 16 positions), so a draft step or a verify forward is one fused graph.

`StaticSequence` is a drop-in for `fedge.cached_sequence.CachedSequence`: same `tokens`/`fed`
bookkeeping, same API, and rollback only moves the length pointer (`fed`); positions past it are
overwritten by the next feed and masked out until then. Nothing is recomputed.

`FEDGE_COMPILE=1` (or `LeanDecoder(compile=True)`) turns compilation on; a compilation error falls back
to eager once, with a warning.
"""

from __future__ import annotations

import logging
import os
import time
import weakref

import torch
import torch.nn.functional as F

from fedge.cached_sequence import CachedSequence

log = logging.getLogger(__name__)

WIDTHS = (1, 2, 4, 8, 16)  # compiled step widths; wider feeds (prefill) run eager
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_enabled() -> bool:
    """`FEDGE_COMPILE=1` compiles the steps. Off by default: compiling costs minutes on a loaded
    2-core CPU, which tests and one-off generations never win back; benchmarks and servers turn it on."""
    return os.environ.get("FEDGE_COMPILE", "0").strip().lower() in ("1", "true", "yes", "on")


def supports(model: torch.nn.Module) -> bool:
    """A decoder-only model whose layers are Llama's: pre-norm attention (RoPE, GQA) plus MLP."""
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if config is None or layers is None or getattr(config, "model_type", "") not in ("llama", "qwen2"):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and config.model_type != "llama":
        return False
    attn = layers[0].self_attn
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and not hasattr(attn, "q_norm")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LeanDecoder:
    """The per-model runner: RoPE table, layer references and compiled steps, shared by sequences."""

    def __init__(self, model: torch.nn.Module, compile: bool | None = None):
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a Llama-architecture model")
        config = model.config
        self.model = model
        self.layers = list(model.model.layers)
        self.n_kv = int(config.num_key_value_heads)
        self.n_heads = int(config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.scaling = self.head_dim ** -0.5
        with torch.no_grad():
            probe = model.model.embed_tokens(torch.zeros(1, 1, dtype=torch.long))
        self.dtype = probe.dtype
        self.table_len = 0
        self.cos = self.sin = torch.empty(0)
        self._rope_upto(1024)
        self.compile = compile_enabled() if compile is None else compile
        self._compiled: dict[tuple[int, int, int], object] = {}
        self.warmup_s: dict[str, float] = {}  # "width x span" -> seconds of its first (compiling) call
        self.forward_calls = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> LeanDecoder:
        """One runner per model object, so compiled steps are reused across sequences."""
        decoder = _DECODERS.get(model)
        if decoder is None:
            decoder = _DECODERS[model] = cls(model)
        return decoder

    def _rope_upto(self, length: int) -> None:
        if length <= self.table_len:
            return
        length = max(length, 2 * self.table_len)
        with torch.no_grad():
            dummy = torch.zeros(1, dtype=self.dtype)
            cos, sin = self.model.model.rotary_emb(dummy, torch.arange(length)[None])
        self.cos, self.sin, self.table_len = cos[0], sin[0], length

    def new_cache(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(self.layers), 1, self.n_kv, max_len, self.head_dim)
        self._rope_upto(max_len)
        return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)

    def _step(self, ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              span: int, keep: int) -> torch.Tensor:
        """Feed ids (1, L) at positions pos (L,); attend over cache[:span]; logits of the last `keep`."""
        x = self.model.model.embed_tokens(ids)
        cos = self.cos[pos][None, None].to(x.dtype)
        sin = self.sin[pos][None, None].to(x.dtype)
        mask = torch.arange(span)[None, :] <= pos[:, None]  # (L, span): causal over the cache
        width = ids.shape[1]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, width, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, width, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, width, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_cache[i].index_copy_(2, pos, k.to(k_cache.dtype))
            v_cache[i].index_copy_(2, pos, v.to(v_cache.dtype))
            keys, values = k_cache[i, :, :, :span], v_cache[i, :, :, :span]
            out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                                 scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, width, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.model.model.norm(x[:, -keep:])
        return self.model.lm_head(x)[0].float()

    def forward(self, feed: list[int], start: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                keep: int) -> torch.Tensor:
        """Logits (keep, V) for the last `keep` of `feed`, written into the cache from `start`."""
        n = len(feed)
        width = next((w for w in WIDTHS if w >= n), None)
        self.forward_calls += 1
        with torch.no_grad():
            if not self.compile or width is None:
                ids = torch.tensor([feed], dtype=torch.long)
                return self._step(ids, torch.arange(start, start + n), k_cache, v_cache, start + n, keep)
            # pad to a fixed width: the padding sits past the real tokens (beyond the length pointer),
            # so real queries never see it and the next feed overwrites it
            ids = torch.tensor([feed + [feed[-1]] * (width - n)], dtype=torch.long)
            pos = torch.arange(start, start + width)
            span = k_cache.shape[3]
            logits = self._compiled_call(width, span, keep + width - n, ids, pos, k_cache, v_cache)
            if logits is None:
                return self._step(ids[:, :n], pos[:n], k_cache, v_cache, start + n, keep)
            return logits[:keep]

    def _compiled_call(self, width: int, span: int, keep: int, ids, pos, k_cache, v_cache):
        key = (width, span, keep)
        fn = self._compiled.get(key)
        first = fn is None
        if first:
            fn = self._compiled[key] = torch.compile(self._step, dynamic=False)
        start = time.perf_counter()
        try:
            out = fn(ids, pos, k_cache, v_cache, span, keep)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eager from now on
            log.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
            self.compile = False
            return None
        if first:
            self.warmup_s[f"{width}x{span}/{keep}"] = time.perf_counter() - start
        return out

    def warm_up(self, widths: tuple[int, ...] = WIDTHS, max_len: int = 512) -> float:
        """Compile the steps ahead of time (keep = width, as a verify forward uses); returns seconds."""
        start = time.perf_counter()
        k_cache, v_cache = self.new_cache(max_len)
        for width in widths:
            self.forward([0] * width, 0, k_cache, v_cache, width)
            self.forward([0] * width, 0, k_cache, v_cache, 1)
        return time.perf_counter() - start


class StaticSequence(CachedSequence):
    """CachedSequence's bookkeeping over a preallocated cache: rollback moves the length pointer."""

    def __init__(self, model: torch.nn.Module, prompt_ids: list[int], max_len: int = 512,
                 decoder: LeanDecoder | None = None):
        if not prompt_ids:
            raise ValueError("a session needs at least one prompt token")
        self.model = model
        self.decoder = decoder or LeanDecoder.for_model(model)
        self.tokens = list(prompt_ids)
        self.fed = []
        self.forward_calls = 0
        self.k_cache, self.v_cache = self.decoder.new_cache(self._bucket(max(max_len, len(prompt_ids) + 64)))

    @staticmethod
    def _bucket(length: int) -> int:
        size = 512
        while size < length:
            size *= 2
        return size

    @property
    def max_len(self) -> int:
        return self.k_cache.shape[3]

    def logits(self, extra: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        pending = self.tokens[len(self.fed):]
        if not pending:
            self._crop(len(self.tokens) - 1)
            pending = self.tokens[-1:]
        feed = pending + list(extra)
        start = len(self.fed)
        self._reserve(start + len(feed) + WIDTHS[-1])  # room for the padded width too
        out = self.decoder.forward(feed, start, self.k_cache, self.v_cache, len(extra) + 1)
        self.forward_calls += 1
        self.fed.extend(feed)
        return out

    def _reserve(self, length: int) -> None:
        """Grow the cache (a new, larger bucket) when a sequence outgrows it; rare by design."""
        if length <= self.max_len:
            return
        k_cache, v_cache = self.decoder.new_cache(self._bucket(length))
        k_cache[:, :, :, :self.max_len] = self.k_cache
        v_cache[:, :, :, :self.max_len] = self.v_cache
        self.k_cache, self.v_cache = k_cache, v_cache

    def _crop(self, length: int) -> None:
        del self.fed[length:]  # the pointer moves; stale positions are masked and later overwritten


def make_sequence(model: torch.nn.Module, prompt_ids: list[int], lean: bool | None = None) -> CachedSequence:
    """The lean runner where the model supports it and `FEDGE_LEAN=1`, else CachedSequence.

    Opt-in until its speed against the HF cache is measured on a quiet machine (`fedge bench
    speculative`): outputs are identical either way, only speed differs."""
    if lean is None:
        lean = os.environ.get("FEDGE_LEAN", "0").strip() in ("1", "true", "yes", "on")
    if lean and supports(model):
        return StaticSequence(model, prompt_ids)
    return CachedSequence(model, prompt_ids)
