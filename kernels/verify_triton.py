"""Triton speculative verification: one streaming pass over the (B, K+1, V) target logits.

Pass 1 (`_row_stats_kernel`, grid rows x vocab splits) reads every logit once and keeps, per row,
either the argmax (greedy) or the running max and sum of exp (sampling, online softmax). Splitting
the vocabulary across programs keeps the GPU busy when B * (K+1) rows are few. The tiny (B, K)
acceptance scan then runs as torch ops. Pass 2 (`_residual_sample_kernel`, sampling only) re-reads
one row per session, the first rejected position or the bonus position, and samples the residual
max(0, p - q) by the Gumbel-max trick, so it needs no normalisation and no second reduction.
Total traffic is about (K+2)/(K+1) of the logits plus one draft row per session.

Temperature sampling is fused; top-k / top-p need a sort, so `fedge.kernels.verify.verify` sends them to
the vectorised torch path instead. Semantics are those of `fedge.kernels.verify_ref.verify_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedge.kernels.verify_ref import VerifyResult, accepted_prefix, check_verify_inputs, rand_on
from fedge.sampling import SamplingParams

INT32_MAX = 2**31 - 1


@triton.jit
def _row_stats_kernel(
    logits_ptr, n_rows, row_stride, vocab, inv_temperature, chunk,
    max_out_ptr, aux_out_ptr, n_splits,
    GREEDY: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # a tile of ROWS rows x BLOCK vocabulary entries; ROWS is 1 on a GPU (the vocabulary split gives
    # the parallelism) and larger under the interpreter, which pays per program
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    split = tl.program_id(1)
    base = logits_ptr + rows.to(tl.int64)[:, None] * row_stride
    start = split * chunk
    end = tl.minimum(start + chunk, vocab)
    best = tl.full((ROWS,), -float("inf"), tl.float32)
    best_idx = tl.full((ROWS,), INT32_MAX, tl.int32)
    total = tl.zeros((ROWS,), tl.float32)
    for offset in range(start, end, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols < end)[None, :]
        x = tl.load(base + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
        if GREEDY:
            # the earliest index wins ties, like torch.argmax: tie-break left inside a block and
            # a strict > across blocks
            block_max, block_idx = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
            better = block_max > best
            best_idx = tl.where(better, offset + block_idx, best_idx)
            best = tl.maximum(block_max, best)
        else:
            x = x * inv_temperature
            new_best = tl.maximum(best, tl.max(x, 1))
            # shift by 0 while everything is -inf so exp never sees -inf - -inf
            shift = tl.where(new_best == -float("inf"), 0.0, new_best)
            total = total * tl.exp(best - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
            best = new_best
    out = rows * n_splits + split
    tl.store(max_out_ptr + out, best, mask=row_ok)
    if GREEDY:
        tl.store(aux_out_ptr + out, best_idx.to(tl.float32), mask=row_ok)
    else:
        tl.store(aux_out_ptr + out, total, mask=row_ok)


@triton.jit
def _residual_sample_kernel(
    logits_ptr, n_sessions, row_stride, row_index_ptr, log_norm_ptr, inv_temperature, vocab, chunk,
    q_ptr, q_row_stride, q_row_index_ptr, draft_token_ptr, rejected_ptr, seed,
    key_out_ptr, idx_out_ptr, fallback_key_out_ptr, fallback_idx_out_ptr, n_splits,
    HAS_Q: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    sessions = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    session_ok = sessions < n_sessions
    split = tl.program_id(1)
    row = tl.load(row_index_ptr + sessions, mask=session_ok, other=0).to(tl.int64)
    log_norm = tl.load(log_norm_ptr + sessions, mask=session_ok, other=0.0)
    rejected = tl.load(rejected_ptr + sessions, mask=session_ok, other=0) != 0
    draft_token = tl.load(draft_token_ptr + sessions, mask=session_ok, other=0)
    q_row = tl.load(q_row_index_ptr + sessions, mask=session_ok, other=0).to(tl.int64)
    start = split * chunk
    end = tl.minimum(start + chunk, vocab)
    best_key = tl.full((ROWS,), -float("inf"), tl.float32)
    best_idx = tl.full((ROWS,), INT32_MAX, tl.int32)
    fallback_key = tl.full((ROWS,), -float("inf"), tl.float32)
    fallback_idx = tl.full((ROWS,), INT32_MAX, tl.int32)
    for offset in range(start, end, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        mask = session_ok[:, None] & (cols < end)[None, :]
        x = tl.load(logits_ptr + row[:, None] * row_stride + cols[None, :], mask=mask,
                    other=-float("inf")).to(tl.float32)
        log_p = x * inv_temperature - log_norm[:, None]
        p = tl.exp(log_p)
        if HAS_Q:
            # bonus rows (nothing rejected) read no q
            q = tl.load(q_ptr + q_row[:, None] * q_row_stride + cols[None, :],
                        mask=mask & rejected[:, None], other=0.0).to(tl.float32)
        else:  # greedy draft: q is one-hot on the drafted token
            q = tl.where((cols[None, :] == draft_token[:, None]) & rejected[:, None], 1.0, 0.0)
        log_w = tl.log(tl.maximum(p - q, 0.0))
        # Gumbel-max: argmax(log w + G) is a sample from w / sum(w); the same noise serves both
        # the residual and the fallback p (used only if the residual is all zero)
        u = tl.rand(seed, sessions.to(tl.int64)[:, None] * vocab + cols[None, :])
        gumbel = -tl.log(-tl.log(u))
        key = tl.where(mask, log_w + gumbel, -float("inf"))
        fkey = tl.where(mask, log_p + gumbel, -float("inf"))
        block_key, block_idx = tl.max(key, 1, return_indices=True, return_indices_tie_break_left=True)
        better = block_key > best_key
        best_idx = tl.where(better, offset + block_idx, best_idx)
        best_key = tl.maximum(block_key, best_key)
        block_key, block_idx = tl.max(fkey, 1, return_indices=True, return_indices_tie_break_left=True)
        better = block_key > fallback_key
        fallback_idx = tl.where(better, offset + block_idx, fallback_idx)
        fallback_key = tl.maximum(block_key, fallback_key)
    out = sessions * n_splits + split
    tl.store(key_out_ptr + out, best_key, mask=session_ok)
    tl.store(idx_out_ptr + out, best_idx, mask=session_ok)
    tl.store(fallback_key_out_ptr + out, fallback_key, mask=session_ok)
    tl.store(fallback_idx_out_ptr + out, fallback_idx, mask=session_ok)


def _launch_shape(
    n_rows: int, vocab: int, block: int, device: torch.device, vocab_splits: int | None = None
) -> tuple[int, int, int, int]:
    """(rows per program, block, chunk, n_splits). On a GPU: one row per program and the vocabulary
    split until there are enough programs to fill the machine. Under the interpreter, which runs
    programs one after another: many rows per program, no split."""
    block = min(block, triton.next_power_of_2(vocab))
    if device.type == "cuda":
        rows_per_program = 1
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        n_splits = max(1, min(triton.cdiv(vocab, block), triton.cdiv(target_programs, max(n_rows, 1))))
    else:
        rows_per_program = min(64, triton.next_power_of_2(max(n_rows, 1)))
        n_splits = 1
    if vocab_splits is not None:
        n_splits = max(1, min(vocab_splits, triton.cdiv(vocab, block)))
    chunk = triton.cdiv(triton.cdiv(vocab, n_splits), block) * block
    return rows_per_program, block, chunk, triton.cdiv(vocab, chunk)


def verify_triton(
    target_logits: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_lens: torch.Tensor,
    params: SamplingParams,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    block: int = 1024,
    vocab_splits: int | None = None,
) -> VerifyResult:
    """Greedy or temperature-sampling verification with the Triton kernels (no top-k / top-p).

    `block` is the vocabulary tile; `vocab_splits` (None: chosen for the device) how many programs
    share one row's vocabulary.
    """
    check_verify_inputs(target_logits, draft_ids, draft_lens, draft_probs)
    if not params.greedy and (params.top_k or params.top_p < 1.0):
        raise ValueError("verify_triton fuses temperature only; use fedge.kernels.verify.verify for top-k/top-p")
    device = target_logits.device
    batch, width, vocab = target_logits.shape
    logits = target_logits.reshape(batch * width, vocab)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    draft_ids = draft_ids.to(device=device, dtype=torch.long)
    draft_lens = draft_lens.to(device=device, dtype=torch.long)
    inv_temperature = 1.0 if params.greedy else 1.0 / params.temperature
    row_max, row_aux = _row_stats(logits, inv_temperature, params.greedy, block, vocab_splits)
    if params.greedy:
        return _greedy_result(row_max, row_aux, draft_ids, draft_lens, width, vocab)
    log_norm = _log_norm(row_max, row_aux).view(batch, width)
    n_accepted, draft_token, q_at = _accept_sampled(target_logits, draft_ids, draft_lens, draft_probs, log_norm,
                                                    inv_temperature, generator)
    rejected = (n_accepted < draft_lens).to(torch.int32)
    sessions = torch.arange(batch, device=device)
    row_index = sessions * width + n_accepted
    seed_device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=seed_device))
    next_ids = _sample_residual(logits, row_index, log_norm.reshape(-1)[row_index].contiguous(), inv_temperature,
                                draft_probs, q_at, draft_token, rejected, seed, block, vocab_splits)
    return VerifyResult(n_accepted=n_accepted, next_ids=next_ids)


def _row_stats(
    logits: torch.Tensor, inv_temperature: float, greedy: bool, block: int, vocab_splits: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 over the (rows, V) logits: per row and vocabulary split, (max, argmax) when greedy,
    else (max, sum of exp below it) of the tempered logits; each (rows, n_splits) float32."""
    n_rows, vocab = logits.shape
    device = logits.device
    rows_per_program, tile, chunk, n_splits = _launch_shape(n_rows, vocab, block, device, vocab_splits)
    row_max = torch.empty(n_rows, n_splits, device=device, dtype=torch.float32)
    row_aux = torch.empty(n_rows, n_splits, device=device, dtype=torch.float32)
    _row_stats_kernel[(triton.cdiv(n_rows, rows_per_program), n_splits)](
        logits, n_rows, logits.stride(0), vocab, inv_temperature, chunk, row_max, row_aux, n_splits,
        GREEDY=greedy, ROWS=rows_per_program, BLOCK=tile,
    )
    return row_max, row_aux


def _greedy_result(
    row_max: torch.Tensor, row_aux: torch.Tensor, draft_ids: torch.Tensor, draft_lens: torch.Tensor,
    width: int, vocab: int,
) -> VerifyResult:
    """Combine the splits' argmaxes into the target's token per position and scan the drafts against them."""
    # highest max, earliest index among equal maxima (indices stored as float32, exact below 2**24,
    # far above any vocabulary)
    overall = row_max.max(dim=1, keepdim=True).values
    candidates = torch.where(row_max == overall, row_aux, float(INT32_MAX))
    target_ids = candidates.min(dim=1).values.long().clamp(max=vocab - 1).view(-1, width)
    n_accepted = accepted_prefix(target_ids[:, : width - 1] == draft_ids, draft_lens)
    sessions = torch.arange(target_ids.shape[0], device=target_ids.device)
    return VerifyResult(n_accepted=n_accepted, next_ids=target_ids[sessions, n_accepted])


def _log_norm(row_max: torch.Tensor, row_aux: torch.Tensor) -> torch.Tensor:
    """log sum exp of each row's tempered logits, from the splits' (max, sum of exp) pairs."""
    overall = row_max.max(dim=1, keepdim=True).values
    shift = torch.where(torch.isinf(overall), 0.0, overall)
    return shift.squeeze(1) + (row_aux * torch.exp(row_max - shift)).sum(1).log()


def _accept_sampled(
    target_logits: torch.Tensor, draft_ids: torch.Tensor, draft_lens: torch.Tensor,
    draft_probs: torch.Tensor | None, log_norm: torch.Tensor, inv_temperature: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept draft token x with probability min(1, p(x) / q(x)), reading only the drafted logits.

    Returns (accepted per session, the drafted token at the first rejection, that position clamped
    into the draft)."""
    batch, width, _ = target_logits.shape
    k = width - 1
    device = target_logits.device
    if k == 0:
        n_accepted = torch.zeros(batch, dtype=torch.long, device=device)
        return n_accepted, torch.zeros(batch, dtype=torch.long, device=device), n_accepted
    draft_logits = target_logits[:, :k].gather(-1, draft_ids[..., None]).squeeze(-1).float()
    p_draft = torch.exp(draft_logits * inv_temperature - log_norm[:, :k])
    if draft_probs is not None:
        q_draft = draft_probs.gather(-1, draft_ids[..., None]).squeeze(-1).float()
    else:
        q_draft = torch.ones_like(p_draft)
    ratio = torch.where(q_draft > 0, p_draft / q_draft.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    uniforms = rand_on((batch, k), generator, device)
    n_accepted = accepted_prefix(uniforms < ratio.clamp(max=1.0), draft_lens)
    at = n_accepted.clamp(max=k - 1)
    return n_accepted, draft_ids[torch.arange(batch, device=device), at], at


def _sample_residual(
    logits: torch.Tensor, row_index: torch.Tensor, log_norm: torch.Tensor, inv_temperature: float,
    draft_probs: torch.Tensor | None, at: torch.Tensor, draft_token: torch.Tensor, rejected: torch.Tensor,
    seed: int, block: int, vocab_splits: int | None,
) -> torch.Tensor:
    """Pass 2: one token per session from norm(max(0, p - q)) at its rejected position (or from p at
    the bonus position, or where the residual is all zero), by Gumbel-max over the vocabulary splits."""
    batch, vocab = row_index.shape[0], logits.shape[1]
    device = logits.device
    sessions = torch.arange(batch, device=device)
    if draft_probs is not None:
        k = draft_probs.shape[1]
        q = draft_probs.reshape(batch * k, vocab)
        if q.stride(-1) != 1:
            q = q.contiguous()
        q_row_stride, q_row_index = q.stride(0), sessions * k + at
    else:
        q, q_row_stride, q_row_index = logits, 0, sessions  # unused when HAS_Q is False
    rows_per_program, tile, chunk, n_splits = _launch_shape(batch, vocab, block, device, vocab_splits)
    keys = torch.empty(batch, n_splits, device=device, dtype=torch.float32)
    idx = torch.empty(batch, n_splits, device=device, dtype=torch.int32)
    fallback_keys = torch.empty_like(keys)
    fallback_idx = torch.empty_like(idx)
    _residual_sample_kernel[(triton.cdiv(batch, rows_per_program), n_splits)](
        logits, batch, logits.stride(0), row_index, log_norm, inv_temperature,
        vocab, chunk, q, q_row_stride, q_row_index, draft_token, rejected, seed,
        keys, idx, fallback_keys, fallback_idx, n_splits,
        HAS_Q=draft_probs is not None, ROWS=rows_per_program, BLOCK=tile,
    )
    best = keys.argmax(dim=1, keepdim=True)
    fallback_best = fallback_keys.argmax(dim=1, keepdim=True)
    use_fallback = torch.isinf(keys.gather(1, best)).squeeze(1)  # residual was all zero
    return torch.where(use_fallback, fallback_idx.gather(1, fallback_best).squeeze(1),
                       idx.gather(1, best).squeeze(1)).long()
