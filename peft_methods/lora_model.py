"""Adapters on a base model, token windows from examples, and held-out loss.

Shared by the edge trainer and the cloud evaluator so both see the same adapter shapes and the same
evaluation text. One base model carries one named peft adapter per rank (`r8`, `r4`, ...), so a
process serving heterogeneous-rank clients loads the base weights once.

The base may be given pre-loaded with its own LoRA config factory: an edge client trains on its
quantised draft (`fedge.edge.training_model`) with `quantized_lora.draft_lora_config`, and the
adapter keeps the target's keys and shapes. A truncated draft lacks the layers it dropped;
`get_state(fill_from=received)` completes its state with the received values for those.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fedge.peft_methods.aggregation import StateDict, seed_lora_A_parameters
from fedge.peft_methods.chunked_loss import token_loss_sum
from fedge.peft_methods.config import AdapterSpec, lora_config


def adapter_name(rank: int) -> str:
    return f"r{rank}"


class AdaptedModel:
    """A base causal LM with peft LoRA adapters of the ranks asked for (created lazily)."""

    def __init__(self, model_name: str, spec: AdapterSpec, base_and_tokenizer: tuple | None = None,
                 config_factory: Callable[[AdapterSpec, int | None], object] = lora_config) -> None:
        """`base_and_tokenizer`: a pre-loaded (model, tokenizer), e.g. a draft (default: `load_model`);
        `config_factory(spec, rank)`: the peft config of an adapter (default: `config.lora_config`)."""
        from peft import get_peft_model

        if base_and_tokenizer is None:
            from fedge.models import load_model

            base_and_tokenizer = load_model(model_name)
        base, self.tokenizer = base_and_tokenizer
        self.model_name = model_name
        self.spec = spec
        self.config_factory = config_factory
        torch.manual_seed(spec.init_seed)  # the shared seeded init of A, identical everywhere
        self.model = get_peft_model(base, config_factory(spec, None), adapter_name=adapter_name(spec.rank))
        seed_lora_A_parameters(self.model, spec.init_seed, adapter_name(spec.rank))  # A: the seed alone decides
        self.ranks = {spec.rank}
        self.model.eval()

    def use_rank(self, rank: int) -> None:
        if rank not in self.ranks:
            torch.manual_seed(self.spec.init_seed)
            self.model.add_adapter(adapter_name(rank), self.config_factory(self.spec, rank))
            seed_lora_A_parameters(self.model, self.spec.init_seed, adapter_name(rank))
            self.ranks.add(rank)
        self.model.set_adapter(adapter_name(rank))

    def get_state(self, rank: int | None = None, fill_from: StateDict | None = None) -> StateDict:
        """The adapter's tensors; keys this model lacks (a truncated draft's dropped layers) are
        taken from `fill_from` when given, so the state has the full adapter's keys."""
        from peft import get_peft_model_state_dict

        name = adapter_name(rank or self.spec.rank)
        state = {k: v.detach().clone() for k, v in
                 get_peft_model_state_dict(self.model, adapter_name=name).items()}
        for key, value in (fill_from or {}).items():
            state.setdefault(key, value.detach().clone())
        return state

    def set_state(self, state: StateDict, rank: int | None = None) -> None:
        from peft import set_peft_model_state_dict

        rank = rank or self.spec.rank
        self.use_rank(rank)
        result = set_peft_model_state_dict(self.model, state, adapter_name=adapter_name(rank))
        missing = [k for k in result.missing_keys if "lora_" in k and adapter_name(rank) in k]
        if missing:
            raise ValueError(f"adapter state lacks {len(missing)} tensors, e.g. {missing[0]}")

    def save(self, path: str | Path, state: StateDict) -> None:
        """Write `state` as a peft adapter directory (loadable with PeftModel.from_pretrained)."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state, adapter_name=adapter_name(self.spec.rank))
        self.model.save_pretrained(str(path), selected_adapters=[adapter_name(self.spec.rank)])
        # peft writes a non-default adapter into a subfolder; keep the plain layout at `path`
        sub = Path(path) / adapter_name(self.spec.rank)
        if sub.is_dir():
            for f in sub.iterdir():
                f.replace(Path(path) / f.name)
            sub.rmdir()


def example_text(example, tokenizer) -> str:
    if getattr(example, "prompt", ""):
        messages = [{"role": "user", "content": example.prompt},
                    {"role": "assistant", "content": example.text}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return example.text


def _stable_seed(*parts: object) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def sample_windows(examples: Sequence, tokenizer, count: int, seq_len: int, seed: object) -> list[list[int]]:
    """`count` token windows of up to `seq_len` tokens, from examples and offsets drawn by `seed`."""
    rng = random.Random(_stable_seed("windows", seed))
    windows = []
    for _ in range(count):
        ex = examples[rng.randrange(len(examples))]
        ids = tokenizer(example_text(ex, tokenizer), add_special_tokens=False)["input_ids"]
        start = rng.randrange(max(1, len(ids) - seq_len + 1))
        windows.append(ids[start:start + seq_len])
    return windows


def eval_windows(examples: Sequence, tokenizer, count: int, seq_len: int) -> list[list[int]]:
    """A fixed evaluation set: the first `seq_len` tokens of the first `count` examples."""
    out = []
    for ex in list(examples)[:count]:
        ids = tokenizer(example_text(ex, tokenizer), add_special_tokens=False)["input_ids"][:seq_len]
        if len(ids) >= 2:
            out.append(ids)
    return out


def collate(windows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels (padding masked out of the loss with -100)."""
    length = max(len(w) for w in windows)
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), length), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = torch.tensor(w, dtype=torch.long)
        mask[i, : len(w)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


@torch.no_grad()
def mean_token_loss(model, windows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean next-token cross-entropy over `windows`."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids, mask, labels = collate(windows[i:i + batch_size], pad_id)
        loss_sum, count = token_loss_sum(model, ids, mask, labels)
        total += float(loss_sum)
        tokens += count
    return total / max(tokens, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
