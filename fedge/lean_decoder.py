"""The lean decode step (gpt-fast style) for Llama-architecture models, eager or compiled.

Why: at batch one on a CPU, a 135M model's forward through Hugging Face's modelling code spends
most of its time in Python and framework overhead (mask building, cache objects, per-layer module
dispatch, seven projection calls per layer), not in reading the weights. `LeanDecoder` runs the same
arithmetic over re-packed weights (`fedge.lean_weights`: q/k/v and gate/up fused) into a
preallocated KV cache, with the fewest ops we can: RoPE on queries and keys at once, grouped-query
attention without expanding the keys, the head only for the rows asked for, the greedy argmax in
the same call.

Compilation (`torch.compile`, inductor on CPU, CUDA graphs via mode "reduce-overhead" on a GPU) is
one graph per model with dynamic widths and spans, so a draft step, a verify over k + 1 positions
and a prefill reuse it: inductor specialises width 1 apart, so a model costs two or three graphs.
The compiled artefacts are cached on disk in fedge's cache (`inductor_cache_dir`), so a second
process only re-traces. Any compiler failure falls back to eager once, with a warning; the warm-up
time of every graph is recorded in `warmup_s`. GPU: the code path exists but is untested here.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fedge.lean_weights import head_projection, layer_weights, module_signature, norm_of

log = logging.getLogger(__name__)
MAX_COMPILED_WIDTH = 16  # wider feeds (prefills) run eager: once per generation, not worth a graph
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its LeanDecoder


def compile_enabled() -> bool:
    """`FEDGE_COMPILE=1` compiles the steps (see `fedge.static_decoder` for why it is not the default)."""
    return os.environ.get("FEDGE_COMPILE", "0").strip().lower() in ("1", "true", "yes", "on")


def inductor_cache_dir() -> Path:
    """Where compiled steps are cached across runs: fedge's cache, one folder per torch version."""
    from fedge.models import cache_dir

    return cache_dir() / "inductor" / f"torch-{torch.__version__}"


def supports(model: torch.nn.Module) -> bool:
    """A decoder-only model whose layers are Llama's: pre-norm attention (RoPE, GQA) plus MLP."""
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if config is None or layers is None or getattr(config, "model_type", "") not in ("llama", "qwen2"):
        return False
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and config.model_type != "llama":
        return False
    attn = layers[0].self_attn
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and not hasattr(attn, "q_norm")


_WEIGHTS = ("self.layers", "self.head", "self.final_norm")


def _skip_weight_guards(entries) -> list[bool]:
    """Keep every guard but the per-tensor checks on the re-packed weights (hundreds of them, ~1 ms a
    call): their shapes and dtypes are the model's own and cannot change under one runner (a cast or
    move re-initialises it, see `refresh`); what they are (types, list lengths) stays guarded, and so
    do the inputs, the caches and the RoPE tables (whose dtype tells a bf16 draft from an fp32 target)."""
    return [not (e.guard_type == "TENSOR_MATCH" and e.name.startswith(_WEIGHTS)) for e in entries]


class LeanDecoder:
    """The per-model runner: re-packed weights, RoPE tables and the compiled step, shared by sequences."""

    def __init__(self, model: torch.nn.Module, compile: bool | None = None, backend=None,
                 blocked: bool = True):
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a Llama-architecture model")
        config = model.config
        self._model = weakref.ref(model)  # weak: the registry maps model -> decoder and must not pin it
        self.n_kv = int(config.num_key_value_heads)
        self.n_heads = int(config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.scaling = self.head_dim ** -0.5
        self.blocked = blocked
        with torch.no_grad():
            probe = model.model.embed_tokens(torch.zeros(1, dtype=torch.long))
        self.dtype, self.device = probe.dtype, probe.device
        self.table_len = 0
        self.cos = self.sin = torch.empty(0)
        self._rope_upto(1024)
        self.compile = compile_enabled() if compile is None else compile
        self.backend = backend or "inductor"
        self._compiled = None
        self.warmup_s: dict[str, float] = {}  # graph ("width 1", "width n") -> seconds of its first call
        self.forward_calls = 0
        self._pack()

    @classmethod
    def for_model(cls, model: torch.nn.Module, compile: bool | None = None) -> LeanDecoder:
        """One runner per model object, so re-packed weights and compiled steps are reused across sequences.
        `compile` (default: `FEDGE_COMPILE`) applies when the runner is made, or remade if it differs."""
        decoder = _DECODERS.get(model)
        if decoder is None or (compile is not None and decoder.compile != compile):
            decoder = _DECODERS[model] = cls(model, compile=compile)
        return decoder

    @property
    def model(self) -> torch.nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this LeanDecoder was garbage-collected")
        return model

    def _modules(self) -> list[torch.nn.Module]:
        inner = self.model.model
        return [inner.embed_tokens, inner.norm, self.model.lm_head, *(m for layer in inner.layers for m in (
            layer.input_layernorm, layer.post_attention_layernorm, *layer.self_attn.children(),
            *layer.mlp.children()))]

    def _pack(self) -> None:
        inner = self.model.model
        self.layers = [layer_weights(layer, self.blocked) for layer in inner.layers]
        self.final_norm = norm_of(inner.norm)
        self.head = head_projection(self.model, self.blocked)
        self.embed = inner.embed_tokens
        self._signature = module_signature(self._modules())
        self._compiled = None  # graphs close over the old weights

    def refresh(self) -> bool:
        """Re-pack if the model changed since (a module replaced, a weight changed in place); True if so."""
        if module_signature(self._modules()) == self._signature:
            return False
        with torch.no_grad():
            probe = self.model.model.embed_tokens(torch.zeros(1, dtype=torch.long, device=self.device))
        if (probe.dtype, probe.device) != (self.dtype, self.device):  # moved or cast: start over
            self.__init__(self.model, self.compile, self.backend, self.blocked)
        else:
            self._pack()
        return True

    def _rope_upto(self, length: int) -> None:
        if length <= self.table_len:
            return
        length = max(length, 2 * self.table_len)
        with torch.no_grad():
            dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.model.model.rotary_emb(dummy, torch.arange(length, device=self.device)[None])
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(sin)
        # rotate_half(x) * sin == roll(x, half) * (sign * sin): one roll instead of chunk, neg and cat
        self.cos, self.sin, self.table_len = cos[0], sin[0] * sign, length
        self._positions = torch.arange(length, device=self.device)

    def new_cache(self, max_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values, one (n_kv, max_len, head_dim) float32 tensor per layer. fp32: attention runs in
        fp32 (as SDPA accumulates) and a bf16 draft's keys convert exactly. One tensor per layer: a
        compiled step then writes each in place (views of one big tensor would make it copy the whole)."""
        self._rope_upto(max_len)
        shape = (self.n_kv, max_len, self.head_dim)
        return ([torch.zeros(shape, device=self.device) for _ in self.layers],
                [torch.zeros(shape, device=self.device) for _ in self.layers])

    def _attention(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], pos: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, span: int, bias: torch.Tensor | None
                   ) -> torch.Tensor:
        """Write this step's keys/values at `pos` of one layer's cache, attend over its first `span`."""
        width, hd, nq, nkv = qkv.shape[0], self.head_dim, self.n_heads, self.n_kv
        cos, sin = rope
        qk = qkv[:, : (nq + nkv) * hd].view(width, nq + nkv, hd)
        qk = qk * cos + torch.roll(qk, hd // 2, -1) * sin  # RoPE on queries and keys at once
        k_cache.index_copy_(1, pos, qk[:, nq:].transpose(0, 1).float())
        v_cache.index_copy_(1, pos, qkv[:, (nq + nkv) * hd:].view(width, nkv, hd).transpose(0, 1).float())
        # the queries of one kv head's group attend as one block, (n_kv, group * width, hd): no expanded keys
        q = qk[:, :nq].transpose(0, 1).reshape(nkv, (nq // nkv) * width, hd).float()
        keys, values = k_cache[:, :span], v_cache[:, :span]
        if bias is None:
            scores = torch.bmm(q, keys.transpose(1, 2)).mul_(self.scaling)
        else:
            scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=self.scaling)
        out = torch.bmm(scores.softmax(-1), values)  # (n_kv, group * width, hd)
        return out.view(nq, width, hd).transpose(0, 1).reshape(width, nq * hd).to(qkv.dtype)

    def _step(self, ids: torch.Tensor, pos: torch.Tensor, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
              span: int | torch.Tensor, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ids (L,) at positions pos (L,); attend over cache[:span]; the logits of the last `keep`
        rows (None: all) and the argmax of the last one. A compiled step gets `span` as the length of a
        tensor, so that it is one dynamic size rather than a constant per value."""
        if isinstance(span, torch.Tensor):
            span = span.shape[0]
        x = self.embed(ids)
        width = ids.shape[0]
        rope = self.cos[pos][:, None], self.sin[pos][:, None]
        bias = None  # one query sees the whole span; more are causal among themselves (an additive mask)
        if width > 1:
            visible = torch.arange(span, device=ids.device)[None, :] <= pos[:, None]
            bias = torch.zeros(visible.shape, device=ids.device).masked_fill_(~visible, float("-inf"))
            bias = bias.repeat(self.n_heads // self.n_kv, 1)
        for layer, k_layer, v_layer in zip(self.layers, k_cache, v_cache, strict=True):
            h = layer.qkv(layer.input_norm(x))
            x = x + layer.o(self._attention(h, rope, pos, k_layer, v_layer, span, bias))
            gate, up = layer.gate_up(layer.post_norm(x)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        logits = self.head(self.final_norm(x if keep is None else x[width - keep:])).float()
        return logits, logits[-1].argmax()

    def run(self, feed: list[int], start: int, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
            keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (keep, V) float32, the last row's argmax) for the last `keep` of `feed`, cached from `start`."""
        n = len(feed)
        self.forward_calls += 1
        ids = torch.tensor(feed, dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + n, device=self.device)
        with torch.inference_mode():
            if self.compile and n <= MAX_COMPILED_WIDTH:
                out = self._compiled_call(ids, pos, k_cache, v_cache, start + n, keep)
                if out is not None:
                    return out
            return self._step(ids, pos, k_cache, v_cache, start + n, keep)

    def forward(self, feed: list[int], start: int, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
                keep: int) -> torch.Tensor:
        """Logits (keep, V) for the last `keep` of `feed`, written into the cache from `start`."""
        return self.run(feed, start, k_cache, v_cache, keep)[0]

    def _compiled_call(self, ids, pos, k_cache, v_cache, span: int, keep: int):
        """Graphs for one query (a draft step), two and a few (verifies; a feed's head is computed for all
        its rows and the last `keep` returned, so that `keep` adds no graphs)."""
        if self._compiled is None:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
            # every decoder's graphs hang off the one `_step` code object: room for a few models
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on a GPU
            self._compiled = torch.compile(self._step, backend=self.backend, mode=mode,
                                           options={"guard_filter_fn": _skip_weight_guards})
        width = ids.shape[0]
        graph = "width 1" if width == 1 else "width 2" if width == 2 else "width n"
        span_of = self._positions[:span]  # its length is the span: a dynamic size, not a constant
        torch._dynamo.maybe_mark_dynamic(span_of, 0)
        if width > 1:  # a size of 1 is always its own graph
            torch._dynamo.maybe_mark_dynamic(ids, 0)
            torch._dynamo.maybe_mark_dynamic(pos, 0)
        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        try:
            logits, top = self._compiled(ids, pos, k_cache, v_cache, span_of, None)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eager from now on
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            log.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, first)
            self.compile = False
            return None
        if counters["stats"]["unique_graphs"] > graphs:  # this call compiled a graph: warm-up, not decoding
            label = graph if graph not in self.warmup_s else f"{graph} (recompiled)"
            self.warmup_s[label] = self.warmup_s.get(label, 0.0) + time.perf_counter() - start
            if label != graph:
                log.warning("the lean step recompiled (%s) outside warm-up", graph)
        return logits[width - keep:], top

    def warm_up(self, max_len: int = 512) -> float:
        """Compile ahead of time the graphs a generation uses (draft steps, verifies); seconds. Two
        rows get a graph of their own: inductor guards the wider graph on at least three."""
        start = time.perf_counter()
        k_cache, v_cache = self.new_cache(max_len)
        self.run([0] * 4, 0, k_cache, v_cache, 4)  # a verify
        self.run([0] * 2, 4, k_cache, v_cache, 2)  # a draft's two-token feed, a verify of one draft
        self.run([0], 6, k_cache, v_cache, 1)  # a draft step
        return time.perf_counter() - start
