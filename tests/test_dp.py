"""Client-level DP: clipping, distributed noise, the accountant against published numbers, the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.peft_methods.dp import (
    DEFAULT_RDP_ORDERS,
    ClientDPTransform,
    DPConfig,
    PrivacyBudget,
    PrivacyBudgetExceeded,
    RDPAccountant,
    calibrate_noise_multiplier,
    check_noise_coverage,
    clip_update,
    l2_norm,
)
from fedge.protocol.secagg import SecAggConfig, flatten_arrays, run_in_process, unflatten_arrays


# TensorFlow Privacy, tutorials/README.md ("Select Parameters"): DP-SGD on MNIST, 60000 examples, batch 256,
# delta = 1e-5, epsilon from the RDP accountant with the classic RDP -> (eps, delta) conversion.
@pytest.mark.parametrize("sigma, epochs, published", [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)])
def test_accountant_reproduces_tensorflow_privacy_mnist(sigma, epochs, published):
    accountant = RDPAccountant(conversion="classic")
    accountant.step(sigma, 256 / 60000, steps=epochs * 60000 // 256)
    assert accountant.epsilon(1e-5) == pytest.approx(published, rel=0.005)  # published to 2 decimals
    # the tighter conversion (Balle et al. 2020) never reports more
    tight = RDPAccountant(conversion="tight", history=list(accountant.history))
    assert tight.epsilon(1e-5) < accountant.epsilon(1e-5)


def test_accountant_matches_gaussian_rdp_closed_form_without_sampling():
    # q = 1: the Gaussian mechanism's RDP is alpha / (2 sigma^2) per round (Mironov 2017, Prop. 7)
    sigma, rounds, delta = 2.0, 25, 1e-6
    accountant = RDPAccountant(conversion="classic")
    for _ in range(rounds):
        accountant.step(sigma, 1.0)
    closed_form = min(rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in DEFAULT_RDP_ORDERS)
    assert accountant.epsilon(delta) == pytest.approx(closed_form, rel=1e-9)
    assert accountant.history == [(sigma, 1.0, rounds)]


def test_budget_stops_before_exceeding():
    config = DPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, max_epsilon=4.0, sampling="uniform")
    budget = PrivacyBudget(config)
    epsilons = []
    with pytest.raises(PrivacyBudgetExceeded, match="would bring epsilon"):
        for _ in range(1000):
            budget.check_next_round(sample_rate=0.2)
            epsilons.append(budget.record_round(sample_rate=0.2).epsilon)
    assert 1 < len(epsilons) < 1000
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 4.0
    assert budget.epsilon_after_next(0.2) > 4.0
    assert [r.round for r in budget.rounds] == list(range(1, len(epsilons) + 1))


def test_server_chosen_sampling_gets_no_amplification():
    # the server picks 20% of the clients: it knows who is in the round, so the epsilon must be that of
    # q = 1 (every round charged in full), not of a secret 20% sample
    server = PrivacyBudget(DPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5))
    trusted = PrivacyBudget(DPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, sampling="uniform"))
    full = RDPAccountant()
    for _ in range(5):
        server.record_round(sample_rate=0.2)
        trusted.record_round(sample_rate=0.2)
        full.step(1.0, 1.0)
    assert server.epsilon == pytest.approx(full.epsilon(1e-5), rel=1e-12)
    assert [r.sample_rate for r in server.rounds] == [1.0] * 5
    assert trusted.epsilon < server.epsilon / 2  # the credit a malicious sampler would have been given
    assert server.epsilon_after_next(0.2) == pytest.approx(server.epsilon_after_next(1.0))
    with pytest.raises(ValueError, match="sampling"):
        DPConfig(clip_norm=1.0, noise_multiplier=1.0, sampling="poisson-ish")


def test_calibration_hits_target():
    sigma = calibrate_noise_multiplier(4.0, 1e-5, sample_rate=0.25, rounds=20)
    acc = RDPAccountant()
    acc.step(sigma, 0.25, 20)
    assert 3.8 < acc.epsilon(1e-5) <= 4.0
    assert calibrate_noise_multiplier(math.inf, 1e-5, 0.25, 20) == 0.0
    assert RDPAccountant(history=[(0.0, 0.25, 1)]).epsilon(1e-5) == math.inf


def test_clip_bounds_joint_norm_and_keeps_small_updates():
    update = {"a": np.full(100, 1.0, dtype=np.float32), "b": np.full((10, 10), -2.0, dtype=np.float32)}
    clipped, norm = clip_update(update, 1.5)
    assert norm == pytest.approx(math.sqrt(100 + 400))
    assert l2_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    assert clipped["b"].dtype == np.float32 and clipped["b"].shape == (10, 10)
    small, _ = clip_update({"a": np.full(4, 0.1)}, 1.5)
    np.testing.assert_array_equal(small["a"], np.full(4, 0.1))
    with pytest.raises(ValueError, match="NaN"):
        clip_update({"a": np.array([np.nan])}, 1.0)


def test_distributed_noise_sums_to_the_central_noise_and_survives_secure_aggregation():
    n_min, length = 8, 40_000
    config = DPConfig(clip_norm=0.5, noise_multiplier=1.5, min_clients=n_min)
    rng = np.random.default_rng(0)
    transforms = [ClientDPTransform(config, rng=np.random.default_rng(100 + i)) for i in range(n_min)]
    zero_updates = [{"w": np.zeros(length)} for _ in range(n_min)]
    noised = [t(u) for t, u in zip(transforms, zero_updates, strict=True)]
    vectors = {i + 1: flatten_arrays(u)[0] for i, u in enumerate(noised)}
    secagg = SecAggConfig(threshold=n_min, clip_range=4.0, max_clients=n_min, vector_length=length)
    result = run_in_process(vectors, secagg)
    # the server's sum equals the sum of the noised updates (secure aggregation is exact) ...
    np.testing.assert_allclose(result.total, np.sum(list(vectors.values()), axis=0), atol=1e-5)
    # ... and carries the central noise sigma * C
    assert np.std(result.total) == pytest.approx(1.5 * 0.5, rel=0.03)
    back = unflatten_arrays(result.total, flatten_arrays(noised[0])[1])
    assert back["w"].shape == (length,)
    # a real update is clipped before noise is added
    big = {"w": rng.normal(0, 10, size=length)}
    transforms[0](big)
    assert transforms[0].last_norm > 100


def test_noise_coverage_refuses_too_few_contributors():
    config = DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=5)
    check_noise_coverage(config, 5)
    with pytest.raises(PrivacyBudgetExceeded, match="only 4 clients"):
        check_noise_coverage(config, 4)
    assert DPConfig(clip_norm=1.0, noise_multiplier=1.0, noise_at="server").client_noise_std == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="clip_norm"):
        DPConfig(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="delta"):
        DPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1.0)
    with pytest.raises(ValueError, match="noise_at"):
        DPConfig(clip_norm=1.0, noise_multiplier=1.0, noise_at="nowhere")
    with pytest.raises(ValueError, match="sample_rate"):
        PrivacyBudget(DPConfig(clip_norm=1.0, noise_multiplier=1.0)).check_next_round(0.0)
