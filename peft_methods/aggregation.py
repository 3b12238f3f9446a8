"""LoRA-aware aggregation over peft adapter state dicts.

Naive FedAvg averages the factors: mean(B) mean(A) != mean(B A), so the global update is not the
average of the clients' updates. The exact methods keep A shared within a round (clients train B
only), which makes the client contribution `B_k A` linear in what travels:

- `fedavg`  averages A and B separately (the common, inexact practice, kept for comparison);
- `ffa`     FFA-LoRA: A frozen at a shared seeded init, only B travels; exact;
- `fedsvd`  sum of B_k A_k (exact), re-factorised by SVD into B = U S, A = V^T, so A keeps adapting
            to the directions the federation learned while it stays shared; exact (rank <= r);
- `hetlora` heterogeneous ranks: client k trains the first r_k components of the global adapter;
            updates are zero-padded to the global rank, summed, re-factorised by SVD (ordered by
            singular value) and truncated per client when sent down.

Every method is `global + sum_k p_k * delta_k` followed by an optional re-factorisation, so the sum
(`weighted_sum`) is the only step that sees individual updates: secure aggregation computes it masked
(`fedge.cloud.secagg_server`) and the strategy applies the same `apply_aggregate` to its result.
`fedsvd_dense` is the general form for clients that also train A (exact sum, best rank-r
re-factorisation by Eckart-Young).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]

LORA_A = ".lora_A."
LORA_B = ".lora_B."


class AggregationError(ValueError):
    """Updates that cannot be aggregated (mismatched keys or shapes); the message says which."""


@dataclass
class AggregationInfo:
    method: str
    num_clients: int
    truncation_error: float = 0.0  # relative Frobenius norm lost by re-factorisation (0 = exact)
    notes: list[str] = field(default_factory=list)


def lora_pairs(state: StateDict) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key) for every LoRA-wrapped module in a peft state dict."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in state:
        if LORA_A in key:
            prefix = key.split(LORA_A)[0]
            b_key = key.replace(LORA_A, LORA_B)
            if b_key not in state:
                raise AggregationError(f"{key} has no matching lora_B tensor")
            pairs[prefix] = (key, b_key)
    return pairs


def adapter_rank(state: StateDict) -> int:
    ranks = {state[a].shape[0] for a, _ in lora_pairs(state).values()}
    if len(ranks) != 1:
        raise AggregationError(f"adapter has mixed ranks {sorted(ranks)}")
    return ranks.pop()


def delta_weights(state: StateDict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The dense update each module adds to its base weight: scale * B @ A (float64)."""
    return {p: scale * state[b].double() @ state[a].double() for p, (a, b) in lora_pairs(state).items()}


def truncate_rank(state: StateDict, rank: int) -> StateDict:
    """The first `rank` components (rows of A, columns of B); other tensors unchanged."""
    out = {}
    for key, value in state.items():
        if LORA_A in key:
            out[key] = value[:rank].clone()
        elif LORA_B in key:
            out[key] = value[:, :rank].clone()
        else:
            out[key] = value.clone()
    return out


def pad_rank(state: StateDict, rank: int) -> StateDict:
    """Zero-pad A rows / B columns up to `rank` (a zero component adds nothing to B A)."""
    out = {}
    for key, value in state.items():
        if LORA_A in key and value.shape[0] < rank:
            out[key] = torch.cat([value, value.new_zeros(rank - value.shape[0], value.shape[1])], 0)
        elif LORA_B in key and value.shape[1] < rank:
            out[key] = torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1])], 1)
        else:
            out[key] = value
    return out


def client_delta(trained: StateDict, received: StateDict, trains: Callable[[str], bool]) -> StateDict:
    """What a client sends: trained - received, for the tensors its method trains."""
    return {k: (trained[k] - received[k]).detach().clone() for k in trained if trains(k)}


def weighted_sum(deltas: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """sum_k p_k delta_k with p_k = w_k / sum w."""
    if not deltas:
        raise AggregationError("no updates to aggregate")
    weights = normalized(weights)
    keys = set(deltas[0])
    for i, d in enumerate(deltas[1:], 1):
        if set(d) != keys:
            raise AggregationError(f"update {i} has keys {sorted(set(d) ^ keys)[:3]}... unlike update 0")
    out: StateDict = {}
    for key in deltas[0]:
        acc = torch.zeros_like(deltas[0][key], dtype=torch.float64)
        for d, w in zip(deltas, weights, strict=True):
            if d[key].shape != acc.shape:
                raise AggregationError(f"{key}: shape {tuple(d[key].shape)} != {tuple(acc.shape)}")
            acc += w * d[key].double()
        out[key] = acc.to(deltas[0][key].dtype)
    return out


def normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise AggregationError(f"weights must sum to a positive number, got {list(weights)}")
    return [float(w) / total for w in weights]


def refactorize(state: StateDict, rank: int) -> tuple[StateDict, float]:
    """Re-factorise every module's B @ A by SVD into B = U S, A = V^T, truncated to `rank`.

    Works on the small core (QR of B and A^T), never the dense out x in matrix. Returns the new
    state and the relative Frobenius norm the truncation dropped (0 when rank(B A) <= rank).
    """
    out = dict(state)
    lost_sq, total_sq = 0.0, 0.0
    for a_key, b_key in lora_pairs(state).values():
        a, b = state[a_key].double(), state[b_key].double()
        if not torch.any(b) or not torch.any(a):
            continue  # B A = 0 (the usual B = 0 init): any basis is exact; keep A so training goes on
        q_b, r_b = torch.linalg.qr(b)  # B = Qb Rb
        q_a, r_a = torch.linalg.qr(a.T)  # A^T = Qa Ra  ->  B A = Qb (Rb Ra^T) Qa^T
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        lost_sq += float((s[rank:] ** 2).sum())
        total_sq += float((s**2).sum())
        k = min(rank, s.numel())
        new_b = (q_b @ u[:, :k]) * s[:k]
        new_a = vh[:k] @ q_a.T
        if k < rank:  # fewer components than the rank: pad with zero columns of B, keep A orthonormal
            extra = _orthonormal_complement(new_a, rank - k)
            new_a = torch.cat([new_a, extra], 0)
            new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], rank - k)], 1)
        out[a_key] = new_a.to(state[a_key].dtype).contiguous()
        out[b_key] = new_b.to(state[b_key].dtype).contiguous()
    return out, (lost_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0


def _orthonormal_complement(rows: torch.Tensor, count: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    cand = torch.randn(count, rows.shape[1], generator=gen, dtype=rows.dtype)
    cand -= (cand @ rows.T) @ rows
    q, _ = torch.linalg.qr(cand.T)
    return q.T[:count]


def apply_aggregate(method: str, global_state: StateDict, summed_delta: StateDict,
                    rank: int) -> tuple[StateDict, AggregationInfo]:
    """New global adapter = global + sum_k p_k delta_k, re-factorised for fedsvd and hetlora."""
    info = AggregationInfo(method=method, num_clients=0)
    new_state = {k: v.clone() for k, v in global_state.items()}
    for key, delta in summed_delta.items():
        if key not in new_state:
            raise AggregationError(f"update has a tensor {key} that the global adapter lacks")
        if delta.shape != new_state[key].shape:
            raise AggregationError(f"{key}: update shape {tuple(delta.shape)} != global "
                                   f"{tuple(new_state[key].shape)}")
        new_state[key] = (new_state[key].double() + delta.double()).to(new_state[key].dtype)
    if method in ("fedsvd", "hetlora"):
        new_state, info.truncation_error = refactorize(new_state, rank)
    return new_state, info


def aggregate(method: str, global_state: StateDict, client_states: Sequence[StateDict],
              weights: Sequence[float],
              trains: Callable[[str], bool] | None = None) -> tuple[StateDict, AggregationInfo]:
    """Aggregate full client adapters (each trained from `global_state`, possibly at a lower rank).

    The federated server does the same in steps (clients send deltas); this form is for tests and
    for offline use.
    """
    rank = adapter_rank(global_state)
    weights = normalized(weights)
    deltas = []
    for state in client_states:
        start = truncate_rank(global_state, adapter_rank(state))
        keys = trains or (lambda k: True)
        deltas.append(pad_rank(client_delta(state, start, keys), rank))
    new_state, info = apply_aggregate(method, global_state, weighted_sum(deltas, weights), rank)
    info.num_clients = len(client_states)
    return new_state, info


def aggregation_error(global_state: StateDict, updates: Sequence[StateDict], weights: Sequence[float],
                      new_state: StateDict) -> float:
    """How far an aggregated adapter is from the exact average of the clients' updates.

    exact = sum_k p_k (B_k A_k - B_k0 A_k0), client k's change of its product (B_k0 A_k0: what it
    received, at its rank); got = B_new A_new - B_0 A_0. Returns ||got - exact|| / ||exact|| over
    all modules: 0 for the exact methods, > 0 for naive FedAvg of the factors. `updates` are the
    clients' deltas, zero-padded to the global rank.
    """
    weights = normalized(weights)
    err_sq = ref_sq = 0.0
    for a_key, b_key in lora_pairs(global_state).values():
        a0, b0 = global_state[a_key].double(), global_state[b_key].double()
        exact = torch.zeros(b0.shape[0], a0.shape[1], dtype=torch.float64)
        for update, w in zip(updates, weights, strict=True):
            da = update.get(a_key, torch.zeros_like(a0)).double()
            db = update.get(b_key, torch.zeros_like(b0)).double()
            # a lower-rank client's delta is zero-padded, so this is its own B_k A_k - B_k0 A_k0
            exact += w * ((b0 + db) @ (a0 + da) - b0 @ a0)
        got = new_state[b_key].double() @ new_state[a_key].double() - b0 @ a0
        err_sq += float(((got - exact) ** 2).sum())
        ref_sq += float((exact**2).sum())
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0


def fedsvd_dense(client_states: Sequence[StateDict], weights: Sequence[float],
                 rank: int) -> tuple[StateDict, AggregationInfo]:
    """sum_k p_k B_k A_k for clients that trained both factors, then the best rank-r factors."""
    weights = normalized(weights)
    base = client_states[0]
    out = {k: v.clone() for k, v in base.items() if LORA_A not in k and LORA_B not in k}
    info = AggregationInfo(method="fedsvd", num_clients=len(client_states))
    lost_sq = total_sq = 0.0
    for prefix, (a_key, b_key) in lora_pairs(base).items():
        dense = sum(w * s[b_key].double() @ s[a_key].double() for s, w in zip(client_states, weights,
                                                                              strict=True))
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        lost_sq += float((s[rank:] ** 2).sum())
        total_sq += float((s**2).sum())
        out[b_key] = ((u[:, :rank] * s[:rank]).to(base[b_key].dtype)).contiguous()
        out[a_key] = vh[:rank].to(base[a_key].dtype).contiguous()
        del prefix
    for key in out:
        if LORA_A not in key and LORA_B not in key:
            out[key] = sum(w * s[key].double() for s, w in zip(client_states, weights, strict=True)
                           ).to(base[key].dtype)
    info.truncation_error = (lost_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    return out, info


# ---------------------------------------------------------------- the seeded A (FFA-LoRA's frozen factor)


def _row_seed(seed: int, key: str, row: int) -> int:
    import hashlib

    digest = hashlib.sha256(f"fedge-lora-A:{seed}:{key}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_lora_A(seed: int, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The shared init of the A factor with state-dict key `key`: peft's default distribution (Kaiming
    uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), each row drawn from its own generator seeded by
    (seed, key, row). It depends on nothing else (not the base model, its quantisation, the order
    modules were created in, or the rank: rank r is the first r rows), so a client rebuilds exactly the
    server's A, bit for bit, and FFA-LoRA never sends it."""
    rank, fan_in = shape
    bound = 1.0 / fan_in**0.5
    rows = [torch.rand(fan_in, generator=torch.Generator().manual_seed(_row_seed(seed, key, i)),
                       dtype=torch.float32) for i in range(rank)]
    return ((torch.stack(rows) * 2 - 1) * bound).to(dtype)


def seed_lora_A_parameters(model: torch.nn.Module, seed: int, adapter: str) -> None:
    """Set every `lora_A` weight of `adapter` in a peft model to `seeded_lora_A` of its state-dict key."""
    marker = f".lora_A.{adapter}."
    with torch.no_grad():
        for name, param in model.named_parameters():
            if marker in name:
                key = name.replace(marker, LORA_A)
                param.copy_(seeded_lora_A(seed, key, tuple(param.shape), param.dtype))


def with_seeded_A(state: StateDict, shapes: dict[str, tuple[int, ...]], seed: int) -> StateDict:
    """`state` with the A factor of every B it has and no A for rebuilt from the seed (`shapes`: A key
    -> shape, e.g. from the model's own adapter); the A tensors it has are kept."""
    out = dict(state)
    for key in state:
        if LORA_B in key and (a_key := key.replace(LORA_B, LORA_A)) not in out:
            if a_key not in shapes:
                raise AggregationError(f"no shape known for the frozen factor {a_key}")
            out[a_key] = seeded_lora_A(seed, a_key, shapes[a_key])
    return out
