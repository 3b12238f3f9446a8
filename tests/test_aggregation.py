"""The aggregation math: exact methods give delta W = sum_k p_k B_k A_k, naive FedAvg does not."""

from __future__ import annotations

import pytest
import torch

from fedge.peft_methods.aggregation import (
    AggregationError,
    aggregate,
    aggregation_error,
    client_delta,
    delta_weights,
    fedsvd_dense,
    lora_pairs,
    pad_rank,
    refactorize,
    truncate_rank,
    weighted_sum,
)
from fedge.peft_methods.config import MethodSpec

MODULES = {"layers.0.q_proj": (24, 16), "layers.0.v_proj": (8, 16), "layers.1.q_proj": (24, 16)}


def random_adapter(rank: int, seed: int, b_zero: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_dim, in_dim) in MODULES.items():
        state[f"{name}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen, dtype=torch.float64)
        b = torch.randn(out_dim, rank, generator=gen, dtype=torch.float64)
        state[f"{name}.lora_B.weight"] = torch.zeros_like(b) if b_zero else b
    return state


def train_b_only(global_state, rank, seed):
    """A client of an exact method: the received first `rank` components, with only B changed."""
    gen = torch.Generator().manual_seed(seed)
    state = truncate_rank(global_state, rank)
    for key in state:
        if ".lora_B." in key:
            state[key] = state[key] + torch.randn(state[key].shape, generator=gen, dtype=torch.float64)
    return state


def exact_sum(client_states, weights):
    total = sum(weights)
    products = [delta_weights(s) for s in client_states]
    return {p: sum(w / total * prod[p] for w, prod in zip(weights, products, strict=True)) for p in products[0]}


def assert_close(got, want, atol=1e-9):
    for prefix in want:
        torch.testing.assert_close(got[prefix], want[prefix], atol=atol, rtol=1e-9)


WEIGHTS = [3.0, 1.0, 2.0, 5.0]


@pytest.mark.parametrize("method", ["ffa", "fedsvd"])
def test_exact_methods_give_weighted_sum_of_products(method):
    global_state = random_adapter(4, seed=0)
    clients = [train_b_only(global_state, 4, seed=10 + k) for k in range(4)]
    trains = MethodSpec(method).trains
    new_state, info = aggregate(method, global_state, clients, WEIGHTS, trains=trains)
    assert_close(delta_weights(new_state), exact_sum(clients, WEIGHTS))
    assert info.truncation_error < 1e-9
    if method == "ffa":  # A never moves: it is the shared frozen init
        for a_key, _ in lora_pairs(global_state).values():
            assert torch.equal(new_state[a_key], global_state[a_key])
    else:  # FedSVD re-factorises: A has orthonormal rows afterwards
        for a_key, _ in lora_pairs(new_state).values():
            a = new_state[a_key]
            torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=a.dtype), atol=1e-9, rtol=0)


def test_hetlora_is_exact_with_heterogeneous_ranks():
    # global rank 4; clients of ranks 4, 2, 1, 2 train B on their first r_k components
    global_state, _ = refactorize(random_adapter(4, seed=1), 4)  # ordered by singular value
    ranks = [4, 2, 1, 2]
    clients = [train_b_only(global_state, r, seed=20 + k) for k, r in enumerate(ranks)]
    new_state, info = aggregate("hetlora", global_state, clients, WEIGHTS, trains=MethodSpec("hetlora").trains)
    # exact in update form: new = old + sum_k p_k (B_k A_k - B_k^0 A_k^0)
    old = delta_weights(global_state)
    total = sum(WEIGHTS)
    want = {p: old[p].clone() for p in old}
    for w, client, r in zip(WEIGHTS, clients, ranks, strict=True):
        start = delta_weights(truncate_rank(global_state, r))
        trained = delta_weights(client)
        for p in want:
            want[p] += w / total * (trained[p] - start[p])
    assert_close(delta_weights(new_state), want)
    assert info.truncation_error < 1e-9
    # with all clients at full rank, it is the plain weighted sum of products
    full = [train_b_only(global_state, 4, seed=30 + k) for k in range(4)]
    new_full, _ = aggregate("hetlora", global_state, full, WEIGHTS, trains=MethodSpec("hetlora").trains)
    assert_close(delta_weights(new_full), exact_sum(full, WEIGHTS))
    # truncation per client keeps the strongest components: the best rank-r approximation
    low = delta_weights(truncate_rank(new_state, 2))
    for prefix, dense in delta_weights(new_state).items():
        u, s, vh = torch.linalg.svd(dense)
        torch.testing.assert_close(low[prefix], (u[:, :2] * s[:2]) @ vh[:2], atol=1e-9, rtol=1e-9)


def test_naive_fedavg_is_not_exact():
    global_state = random_adapter(4, seed=2)
    # FedAvg clients train both factors
    clients = [random_adapter(4, seed=40 + k) for k in range(4)]
    new_state, _ = aggregate("fedavg", global_state, clients, WEIGHTS)
    got, want = delta_weights(new_state), exact_sum(clients, WEIGHTS)
    # it is the product of the averaged factors ...
    total = sum(WEIGHTS)
    for prefix, (a_key, b_key) in lora_pairs(global_state).items():
        mean_a = sum(w / total * c[a_key] for w, c in zip(WEIGHTS, clients, strict=True))
        mean_b = sum(w / total * c[b_key] for w, c in zip(WEIGHTS, clients, strict=True))
        torch.testing.assert_close(got[prefix], mean_b @ mean_a)
        # ... which is far from the average of the products
        assert (got[prefix] - want[prefix]).norm() > 0.1 * want[prefix].norm()


def test_fedsvd_dense_general_clients():
    # clients that trained A as well: the sum of products has rank up to K r
    clients = [random_adapter(2, seed=50 + k) for k in range(4)]
    exact = exact_sum(clients, WEIGHTS)
    full, info = fedsvd_dense(clients, WEIGHTS, rank=8)  # 8 = K r: no truncation, exact
    assert_close(delta_weights(full), exact)
    assert info.truncation_error < 1e-9
    low, info = fedsvd_dense(clients, WEIGHTS, rank=2)  # the Eckart-Young best rank-2 factors
    assert info.truncation_error > 0.01
    for prefix, dense in exact.items():
        u, s, vh = torch.linalg.svd(dense)
        torch.testing.assert_close(delta_weights(low)[prefix], (u[:, :2] * s[:2]) @ vh[:2])


def test_zero_b_init_is_kept_and_ffa_from_zero_is_exact():
    global_state = random_adapter(4, seed=3, b_zero=True)
    same, info = refactorize(global_state, 4)
    for key in global_state:
        assert torch.equal(same[key], global_state[key])
    clients = [train_b_only(global_state, 4, seed=60 + k) for k in range(4)]
    for method in ("ffa", "fedsvd"):
        new_state, _ = aggregate(method, global_state, clients, WEIGHTS, trains=MethodSpec(method).trains)
        assert_close(delta_weights(new_state), exact_sum(clients, WEIGHTS))


def test_mismatched_updates_are_refused():
    a = {"x.lora_B.weight": torch.zeros(3, 2)}
    with pytest.raises(AggregationError, match="shape"):
        weighted_sum([a, {"x.lora_B.weight": torch.zeros(3, 3)}], [0.5, 0.5])
    with pytest.raises(AggregationError, match="keys"):
        weighted_sum([a, {"y.lora_B.weight": torch.zeros(3, 2)}], [0.5, 0.5])
    with pytest.raises(AggregationError, match="weights"):
        aggregate("ffa", random_adapter(2, 0), [random_adapter(2, 1)], [0.0])


def test_aggregation_error_is_zero_for_exact_methods_only():
    global_state, _ = refactorize(random_adapter(4, seed=5), 4)
    ranks = {"ffa": [4] * 4, "fedsvd": [4] * 4, "hetlora": [4, 2, 1, 2], "fedavg": [4] * 4}
    for method, client_ranks in ranks.items():
        if method == "fedavg":
            clients = [random_adapter(4, seed=70 + k) for k in range(4)]
        else:
            clients = [train_b_only(global_state, r, seed=70 + k) for k, r in enumerate(client_ranks)]
        trains = MethodSpec(method).trains
        deltas = [pad_rank(client_delta(c, truncate_rank(global_state, r), trains), 4)
                  for c, r in zip(clients, client_ranks, strict=True)]
        new_state, _ = aggregate(method, global_state, clients, WEIGHTS, trains=trains)
        error = aggregation_error(global_state, deltas, WEIGHTS, new_state)
        if method == "fedavg":
            assert error > 0.1
        else:
            assert error < 1e-9, method
