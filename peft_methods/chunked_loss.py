"""Next-token loss without the [batch, sequence, vocabulary] logits: what lets a phone train in little memory.

A causal LM's training step normally keeps the full logits (batch x tokens x 49152 floats for the
default model: 100 MB at 4 x 128 tokens), their log-softmax and, in the backward, their gradient.
Once the base weights are an int4 draft (95 MB), those buffers and the per-layer activations
dominate a training client's memory. Two standard remedies, both exact:

- the head and the cross-entropy run on a bounded chunk of tokens at a time, each chunk under
  non-reentrant activation checkpointing, so at most one chunk's logits exist, forward or backward
  (the sum over chunks is the loss; only its summation order differs from the one-shot loss);
- the cross-entropy of a chunk keeps only its fp32 logits for the backward and turns them into their
  own gradient in place (softmax minus one-hot), where `F.cross_entropy` keeps the log-softmax and
  allocates two more logits-sized gradients: one 25 MB buffer instead of three at 128 tokens;
- gradient checkpointing of the decoder layers (transformers' own), so only each layer's input is
  kept and the layer is recomputed in the backward: about one more forward per step.

`causal_lm_loss` falls back to the model's own loss for architectures whose head does more than a
linear map (logit soft-capping or scaling), where splitting it off would change the result.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _causal_lm(model) -> torch.nn.Module:
    """The transformers causal LM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_is_linear(causal_lm) -> bool:
    """Whether logits are exactly head(decoder(...).last_hidden_state), so the head may run on chunks."""
    config = getattr(causal_lm, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    if not (hasattr(causal_lm, "get_decoder") and hasattr(causal_lm, "get_output_embeddings")):
        return False
    decoder = causal_lm.get_decoder()
    return decoder is not None and decoder is not causal_lm and causal_lm.get_output_embeddings() is not None


class SumCrossEntropy(torch.autograd.Function):
    """sum over rows of logsumexp(logits) - logits[target], rows with IGNORE_INDEX left out.

    Saves the logits alone (no log-softmax) and overwrites them with their gradient in the backward:
    call it only on logits nothing else keeps (autograd refuses the backward if another node saved them).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
        lse = _row_logsumexp(logits)
        ctx.save_for_backward(logits, lse, targets)
        return ((lse - picked) * valid).sum()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, lse, targets = ctx.saved_tensors
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' own buffer
        rows = torch.arange(targets.numel())
        grad[rows, targets.clamp(min=0)] -= 1.0
        grad.mul_((targets != IGNORE_INDEX)[:, None] * grad_total)
        return grad, None


def _row_logsumexp(logits: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """logsumexp over the last dim, a few rows at a time (its exp temporary is rows x vocabulary)."""
    return torch.cat([torch.logsumexp(logits[i:i + rows], dim=-1) for i in range(0, logits.shape[0], rows)])


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return SumCrossEntropy.apply(logits, targets)


def token_loss_sum(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   chunk_tokens: int = 256) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, their count), the head run in chunks."""
    causal_lm = _causal_lm(model)
    if not _head_is_linear(causal_lm):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:].reshape(-1)
        total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
        return total, int((targets != IGNORE_INDEX).sum())
    hidden = causal_lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX  # padding never reaches the head
    hidden, targets = hidden[keep], targets[keep]
    head = causal_lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, head, hidden[part], targets[part], use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, hidden[part], targets[part])
    return total, int(targets.numel())


def causal_lm_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   chunk_tokens: int = 256) -> torch.Tensor:
    """Mean next-token cross-entropy (transformers' causal-LM loss), the head run in chunks."""
    total, count = token_loss_sum(model, ids, mask, labels, chunk_tokens)
    return total / max(count, 1)


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Turn transformers' decoder-layer checkpointing on or off (non-reentrant: works with frozen inputs)."""
    causal_lm = _causal_lm(model)
    if not getattr(causal_lm, "supports_gradient_checkpointing", False):
        return
    if enabled:
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif causal_lm.is_activation_checkpointing:
        causal_lm.activation_checkpointing_disable()
