"""Local LoRA training on a device's own examples (peft), with FedProx's proximal term."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedge.peft_methods.chunked_loss import causal_lm_loss, set_gradient_checkpointing
from fedge.peft_methods.lora_model import AdaptedModel, adapter_name, collate, pad_token_id, sample_windows


@dataclass(frozen=True)
class LocalTrainConfig:
    steps: int = 4
    batch_size: int = 2
    seq_len: int = 128
    lr: float = 3e-3
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_global||^2 keeps local drift in check
    # memory (fedge.peft_methods.chunked_loss): the head runs on this many tokens at a time, and
    # decoder layers are recomputed in the backward when checkpointing is on (~1 more forward per step)
    loss_chunk_tokens: int = 256
    gradient_checkpointing: bool = False


@dataclass
class LocalTrainResult:
    loss: float  # mean training loss over the steps
    steps: int
    tokens: int


def trainable_parameters(adapted: AdaptedModel, rank: int, trains: Callable[[str], bool]):
    """Mark the active adapter's tensors trainable per the method (e.g. FFA freezes lora_A)."""
    tag = f".{adapter_name(rank)}"
    params = []
    for name, param in adapted.model.named_parameters():
        wanted = tag in name and trains(name.replace(tag, ""))
        param.requires_grad_(wanted)
        if wanted:
            params.append(param)
    if not params:
        raise ValueError(f"no trainable adapter tensors for rank {rank}")
    return params


def train_local(adapted: AdaptedModel, examples: Sequence, rank: int, trains: Callable[[str], bool],
                config: LocalTrainConfig, seed: object,
                progress: Callable[[int, float], None] | None = None) -> LocalTrainResult:
    """Train the adapter of `rank` (already loaded into `adapted`) for `config.steps` steps."""
    if not examples:
        raise ValueError("a client with no training examples cannot train")
    adapted.use_rank(rank)
    params = trainable_parameters(adapted, rank, trains)
    anchors = [p.detach().clone() for p in params] if config.proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    windows = sample_windows(examples, adapted.tokenizer, config.steps * config.batch_size, config.seq_len, seed)
    pad_id = pad_token_id(adapted.tokenizer)
    model = adapted.model
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    model.train()
    losses, tokens = [], 0
    for step in range(config.steps):
        batch = windows[step * config.batch_size:(step + 1) * config.batch_size]
        ids, mask, labels = collate(batch, pad_id)
        loss = causal_lm_loss(model, ids, mask, labels, config.loss_chunk_tokens)
        if anchors is not None:
            loss = loss + config.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors,
                                                                                            strict=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return LocalTrainResult(loss=sum(losses) / len(losses), steps=config.steps, tokens=tokens)
