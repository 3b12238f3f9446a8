"""Client-level differential privacy for federated rounds (DP-FedAvg, McMahan et al. ICLR 2018).

The unit of privacy is a client: one round's update from one client is clipped to L2 norm C, and the
sum over a round's clients carries Gaussian noise of standard deviation sigma * C (sigma = the noise
multiplier). The RDP accountant of the subsampled Gaussian mechanism (Mironov 2017; Mironov, Talwar
& Zhang 2019) turns (sigma, sampling rate q = clients per round / clients in the population, rounds)
into (epsilon, delta). `PrivacyBudget` refuses a round whose epsilon would pass the budget.

Who adds the noise. Under secure aggregation the server sees only the sum, so the noise must already
be in the sum: each client adds N(0, (sigma C)^2 / n_min) to its clipped update ("distributed noise").
If at least n_min clients survive into the sum, the sum carries variance >= (sigma C)^2. The secure
aggregation threshold t is the natural n_min: a round with fewer survivors aborts anyway. This is
private against the server and everyone downstream, assuming clients follow the protocol; c clients
who collude with the server and strip their own noise lower the protection to that of n_min - c
noise shares (the README states this). With `noise_at="server"` the server adds all the noise after
aggregation instead: private only against those who see the published model, not the server.

Sampling: amplification by subsampling needs the sampling to be random and secret from the
adversary. When the server chooses who trains (Flower's strategies do), it knows who is in each
round and can pick a target every time, so by default (`sampling="server"`) the accountant takes no
credit for it and charges every round at q = 1. `sampling="uniform"` credits q = clients per round /
population (Poisson approximation): only for a trusted sampler, e.g. a simulation's own analysis.
Noise is drawn with numpy's PCG64 seeded from the OS's entropy (floating-point Gaussian sampling has
known side channels in theory, Mironov 2012; acceptable for these experiments, noted in the README).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# Orders used by TensorFlow Privacy and Opacus; a fine grid near 1 and integers up to 256.
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                                              + [128.0, 256.0])


class PrivacyBudgetExceeded(RuntimeError):
    """Running another round would spend more than the allowed epsilon."""


@dataclass(frozen=True)
class DPConfig:
    """Client-level DP for federated rounds.

    clip_norm: C, the L2 bound on one client's update (all tensors together) in one round.
    noise_multiplier: sigma; the sum over a round's clients carries N(0, (sigma C)^2) per coordinate.
    delta: the delta at which epsilon is reported (should be below 1 / number of clients).
    max_epsilon: training stops before a round that would exceed it (inf: report only).
    min_clients: n_min, the fewest clients whose noise shares make up the sum (distributed noise).
    noise_at: "client" (distributed, works under secure aggregation) or "server" (trusted server).
    sampling: "server" (the server picks the clients: account at q = 1, no amplification) or
        "uniform" (a trusted uniform sampler: account at the sampling rate).
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    max_epsilon: float = math.inf
    min_clients: int = 1
    noise_at: str = "client"
    sampling: str = "server"

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not math.isfinite(self.clip_norm):
            raise ValueError(f"clip_norm must be positive and finite (got {self.clip_norm})")
        if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"noise_multiplier must be >= 0 and finite (got {self.noise_multiplier})")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1) (got {self.delta})")
        if not self.max_epsilon > 0:
            raise ValueError(f"max_epsilon must be positive (got {self.max_epsilon})")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1 (got {self.min_clients})")
        if self.noise_at not in ("client", "server"):
            raise ValueError(f"noise_at must be 'client' or 'server' (got {self.noise_at!r})")
        if self.sampling not in ("server", "uniform"):
            raise ValueError(f"sampling must be 'server' or 'uniform' (got {self.sampling!r})")

    @property
    def client_noise_std(self) -> float:
        """Per-coordinate std each client adds when noise is distributed: sigma C / sqrt(n_min)."""
        if self.noise_at != "client":
            return 0.0
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_clients)

    @property
    def server_noise_std(self) -> float:
        """Per-coordinate std the server adds to the sum when it is the trusted noise adder."""
        return self.noise_multiplier * self.clip_norm if self.noise_at == "server" else 0.0


# ----------------------------------------------------------------------------------------------
# update transforms


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all arrays taken together as one vector."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in arrays.values()))


def clip_update(arrays: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale `arrays` so their joint L2 norm is at most `clip_norm`; returns (clipped, norm before)."""
    norm = l2_norm(arrays)
    if not math.isfinite(norm):
        raise ValueError("update contains NaN or infinity; refusing to clip it")
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v, dtype=np.float64) * factor).astype(np.asarray(v).dtype) for k, v in arrays.items()}, norm


def add_gaussian_noise(arrays: Mapping[str, np.ndarray], std: float,
                       rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Add N(0, std^2) to every coordinate. `rng` defaults to a generator seeded from OS entropy."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0 (got {std})")
    if std == 0:
        return {k: np.array(v, copy=True) for k, v in arrays.items()}
    rng = rng or np.random.default_rng(secrets.randbits(128))
    return {k: (np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(v))).astype(np.asarray(v).dtype)
            for k, v in arrays.items()}


@dataclass
class ClientDPTransform:
    """The client's DP step for one round's update: clip to C, then add its noise share.

    Callable on a dict of named arrays (the LoRA update, i.e. trained - global), so it slots into a
    client-side update-transform pipeline ahead of secure-aggregation masking.
    """

    config: DPConfig
    rng: np.random.Generator | None = None
    last_norm: float = field(default=0.0, init=False)

    def __call__(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        clipped, self.last_norm = clip_update(update, self.config.clip_norm)
        return add_gaussian_noise(clipped, self.config.client_noise_std, self.rng)


def check_noise_coverage(config: DPConfig, n_in_sum: int) -> None:
    """Refuse to release a sum of distributed-noise updates with fewer than n_min contributions."""
    if config.noise_at == "client" and n_in_sum < config.min_clients:
        raise PrivacyBudgetExceeded(
            f"only {n_in_sum} clients in the sum; distributed noise needs >= {config.min_clients} to reach "
            f"sigma = {config.noise_multiplier}: refusing to release this round")


# ----------------------------------------------------------------------------------------------
# accounting


@dataclass
class RDPAccountant:
    """Renyi-DP accountant for the Poisson-subsampled Gaussian mechanism, composed over rounds.

    The RDP of each round comes from Opacus' implementation (`opacus.accountants.analysis.rdp`).
    Conversion to (epsilon, delta): "tight" is Balle et al. 2020 (Opacus' default, smaller epsilon);
    "classic" is Mironov 2017, eps = min_a RDP(a) + log(1/delta) / (a - 1), the one TensorFlow
    Privacy's published MNIST numbers use.
    """

    orders: Sequence[float] = DEFAULT_RDP_ORDERS
    conversion: str = "tight"
    history: list[tuple[float, float, int]] = field(default_factory=list)  # (sigma, q, steps)

    def __post_init__(self) -> None:
        if self.conversion not in ("tight", "classic"):
            raise ValueError(f"conversion must be 'tight' or 'classic' (got {self.conversion!r})")

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        _check_mechanism(noise_multiplier, sample_rate)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, delta: float, extra: Sequence[tuple[float, float, int]] = ()) -> float:
        """Epsilon at `delta` after the recorded rounds (plus `extra` hypothetical ones)."""
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        entries = list(self.history) + list(extra)
        if not entries:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in entries):
            return math.inf
        rdp = sum(np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(self.orders)))
                  for sigma, q, steps in entries)
        if self.conversion == "tight":
            eps, _ = get_privacy_spent(orders=list(self.orders), rdp=rdp, delta=delta)
            return float(eps)
        orders = np.asarray(self.orders, dtype=np.float64)
        return float(np.min(rdp + math.log(1.0 / delta) / (orders - 1.0)))


def _check_mechanism(noise_multiplier: float, sample_rate: float) -> None:
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0 (got {noise_multiplier})")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1] (got {sample_rate})")


@dataclass
class RoundPrivacy:
    round: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float  # the rate the accountant used: 1.0 unless sampling is trusted to be uniform


class PrivacyBudget:
    """Tracks epsilon across federated rounds and refuses the round that would pass `max_epsilon`.

    Usage per round: `budget.check_next_round(sample_rate)` before sampling clients (raises
    PrivacyBudgetExceeded), then `budget.record_round(sample_rate)` once the noisy sum is released.
    """

    def __init__(self, config: DPConfig, conversion: str = "tight") -> None:
        self.config = config
        self.accountant = RDPAccountant(conversion=conversion)
        self.rounds: list[RoundPrivacy] = []

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(self.config.delta)

    def accounted_rate(self, sample_rate: float) -> float:
        """The q the accountant charges: the sampling rate only when sampling is trusted, else 1."""
        _check_mechanism(self.config.noise_multiplier, sample_rate)
        return sample_rate if self.config.sampling == "uniform" else 1.0

    def epsilon_after_next(self, sample_rate: float) -> float:
        q = self.accounted_rate(sample_rate)
        return self.accountant.epsilon(self.config.delta, extra=[(self.config.noise_multiplier, q, 1)])

    def check_next_round(self, sample_rate: float) -> float:
        """Epsilon after one more round; raises PrivacyBudgetExceeded if that passes max_epsilon."""
        projected = self.epsilon_after_next(sample_rate)
        if projected > self.config.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"round {len(self.rounds) + 1} would bring epsilon to {projected:.3f} > max {self.config.max_epsilon} "
                f"(delta={self.config.delta}, spent so far {self.epsilon:.3f} in {len(self.rounds)} rounds)")
        return projected

    def record_round(self, sample_rate: float) -> RoundPrivacy:
        q = self.accounted_rate(sample_rate)
        self.accountant.step(self.config.noise_multiplier, q)
        entry = RoundPrivacy(len(self.rounds) + 1, self.epsilon, self.config.delta, self.config.noise_multiplier, q)
        self.rounds.append(entry)
        return entry


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, rounds: int,
                               conversion: str = "tight", tolerance: float = 0.01) -> float:
    """The smallest sigma (within `tolerance`) whose epsilon after `rounds` rounds is <= target."""
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive (got {target_epsilon})")
    if math.isinf(target_epsilon):
        return 0.0

    def eps(sigma: float) -> float:
        acc = RDPAccountant(conversion=conversion)
        acc.step(sigma, sample_rate, rounds)
        return acc.epsilon(delta)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"epsilon {target_epsilon} is unreachable with q={sample_rate}, {rounds} rounds")
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high
