"""Secure aggregation: what every party of a round agrees on before any key is exchanged.

The round's parameters (`SecAggConfig`), the fixed-point code that turns float updates into
Z_{2^32} so that masks cancel under modular addition (and the scale that keeps a sum of
`max_clients` inputs from wrapping), and the flat-vector layout of a LoRA update's named arrays.
Pure data and numpy: the crypto (`secagg_masks`, `secagg_shamir`) and both roles build on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32
MODULUS = 1 << MODULUS_BITS


class SecAggError(RuntimeError):
    """The protocol cannot continue safely (too few parties, inconsistent or tampered messages)."""


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters every party of one secure-aggregation round must agree on.

    threshold: t, the number of parties whose shares reconstruct a secret; also the minimum number
        of clients that must survive each step (fewer and the round aborts rather than leak).
    clip_range: each coordinate is clipped to [-clip_range, clip_range] before encoding.
    max_clients: an upper bound on the number of summands; it sets the fixed-point scale so that
        the modular sum never wraps.
    vector_length: the number of coordinates in every client's input.
    round_id: bound into every key derivation, so keys and masks of different rounds never collide.
    """

    threshold: int
    clip_range: float
    max_clients: int
    vector_length: int
    round_id: int = 0

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise ValueError(f"threshold must be >= 2 (got {self.threshold}): with 1 a single share is the secret")
        if self.max_clients < self.threshold:
            raise ValueError(f"max_clients ({self.max_clients}) must be >= threshold ({self.threshold})")
        if not (self.clip_range > 0 and np.isfinite(self.clip_range)):
            raise ValueError(f"clip_range must be a positive finite number (got {self.clip_range})")
        if self.vector_length < 1:
            raise ValueError(f"vector_length must be >= 1 (got {self.vector_length})")
        if not 0 <= self.round_id < (1 << 63):
            raise ValueError(f"round_id must be in [0, 2^63) (got {self.round_id})")
        if self.scale < 1.0:
            raise ValueError("clip_range * max_clients is too large for 32-bit fixed point (scale < 1)")

    @property
    def scale(self) -> float:
        """Fixed-point units per 1.0: the largest scale at which max_clients clipped inputs cannot wrap.

        Rounding can push each code up by half a unit, hence the max_clients units of margin.
        """
        return ((1 << (MODULUS_BITS - 1)) - 1 - self.max_clients) / (self.clip_range * self.max_clients)

    def to_dict(self) -> dict[str, int | float]:
        return {"threshold": self.threshold, "clip_range": float(self.clip_range),
                "max_clients": self.max_clients, "vector_length": self.vector_length,
                "round_id": self.round_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, int | float]) -> SecAggConfig:
        return cls(threshold=int(data["threshold"]), clip_range=float(data["clip_range"]),
                   max_clients=int(data["max_clients"]), vector_length=int(data["vector_length"]),
                   round_id=int(data.get("round_id", 0)))


@dataclass(frozen=True)
class ClientPolicy:
    """What a client demands of a round, configured on the device and never taken from the server.

    A malicious server picks t, n and the DP parameters; these floors are what the client refuses to
    go below, checked before it sends anything that depends on its secrets or its data.

    min_threshold: t never below this, however few clients the server claims there are.
    threshold_fraction: t >= ceil(fraction * n) for a roster of n. With 2/3 any two sets of t clients
        overlap in >= n/3 of them, so a server cannot split honest clients into two groups that
        each reach t (Bonawitz et al. 2017 need t > 2n/3 against a malicious server with n/3
        corrupt clients); the signed consistency round then makes all survivors agree on one set.
    require_signatures: key advertisements and survivor sets must be signed by devices in the
        client's roster (False: trust the server to relay keys honestly, semi-honest model only).
    min_noise_multiplier: > 0 refuses rounds without client-side DP noise at least this strong.
    """

    min_threshold: int = 3
    threshold_fraction: float = 2 / 3
    require_signatures: bool = True
    min_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.min_threshold < 2:
            raise ValueError(f"min_threshold must be >= 2 (got {self.min_threshold})")
        if not 0.5 <= self.threshold_fraction <= 1:
            raise ValueError(f"threshold_fraction must be in [0.5, 1] (got {self.threshold_fraction})")

    def required_threshold(self, n: int) -> int:
        return max(self.min_threshold, math.ceil(self.threshold_fraction * n - 1e-9))

    def check_config(self, config: SecAggConfig) -> None:
        """At key advertisement: the server's t against the fixed floor."""
        if config.threshold < self.min_threshold:
            raise SecAggError(f"server asked for threshold {config.threshold}, below this client's minimum "
                              f"{self.min_threshold}: refusing the round")

    def check_roster(self, config: SecAggConfig, n: int) -> None:
        """Before sharing keys: t against the roster size the client actually sees."""
        if n > config.max_clients:
            raise SecAggError(f"roster of {n} exceeds max_clients {config.max_clients}: the sum could wrap")
        needed = self.required_threshold(n)
        if config.threshold < needed:
            raise SecAggError(f"threshold {config.threshold} is below this client's floor {needed} for {n} clients "
                              f"(max({self.min_threshold}, ceil({self.threshold_fraction:.3f} n))): refusing to share")

    def check_dp(self, config: SecAggConfig, noise_multiplier: float | None, noise_shares: int,
                 noise_at: str = "client") -> None:
        """Before masking: the sum of any t survivors must carry the noise DP asks for.

        Each client adds sigma C / sqrt(noise_shares); only a sum of >= noise_shares of them has std
        sigma C, and the server can stop at t survivors, so t must be >= noise_shares.
        """
        if noise_multiplier is None:
            if self.min_noise_multiplier > 0:
                raise SecAggError("this client requires DP noise and the server sent no DP parameters")
            return
        if noise_at != "client" and self.min_noise_multiplier > 0:
            raise SecAggError(f"noise_at={noise_at!r}: the server would add the noise; this client adds its own")
        if noise_multiplier < self.min_noise_multiplier:
            raise SecAggError(f"noise multiplier {noise_multiplier} is below this client's minimum "
                              f"{self.min_noise_multiplier}")
        if noise_at == "client" and config.threshold < noise_shares:
            raise SecAggError(f"threshold {config.threshold} is below the {noise_shares} noise shares DP needs: "
                              "a sum of t survivors would carry too little noise")


def encode_fixed_point(values: np.ndarray, config: SecAggConfig) -> tuple[np.ndarray, int]:
    """Clip, scale and round `values` into Z_{2^32}; returns (uint32 codes, number of clipped coordinates)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape[0] != config.vector_length:
        raise ValueError(f"input has {values.shape[0]} coordinates, config says {config.vector_length}")
    if not np.all(np.isfinite(values)):
        raise ValueError("input contains NaN or infinity; refusing to encode")
    n_clipped = int(np.count_nonzero(np.abs(values) > config.clip_range))
    clipped = np.clip(values, -config.clip_range, config.clip_range)
    codes = np.rint(clipped * config.scale).astype(np.int64)
    return (codes & (MODULUS - 1)).astype(np.uint32), n_clipped


def decode_fixed_point(codes: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """Inverse of `encode_fixed_point` for a sum of up to max_clients encoded vectors (two's complement)."""
    signed = np.asarray(codes, dtype=np.uint32).view(np.int32).astype(np.float64)
    return signed / config.scale


# ----------------------------------------------------------------------------------------------
# flattening named arrays into one vector and back (a LoRA update is many tensors)


@dataclass(frozen=True)
class VectorLayout:
    """Names, shapes and dtypes of the arrays packed into one flat vector, in order."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def length(self) -> int:
        return int(sum(int(np.prod(shape)) for _, shape, _ in self.entries))


def flatten_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, VectorLayout]:
    """Concatenate `arrays` (sorted by name, so every client agrees on the order) into float64."""
    names = sorted(arrays)
    layout = VectorLayout(tuple((n, tuple(np.asarray(arrays[n]).shape), str(np.asarray(arrays[n]).dtype))
                                for n in names))
    if not names:
        return np.zeros(0, dtype=np.float64), layout
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in names]), layout


def unflatten_arrays(vector: np.ndarray, layout: VectorLayout) -> dict[str, np.ndarray]:
    if vector.shape != (layout.length,):
        raise ValueError(f"vector has shape {vector.shape}, layout needs ({layout.length},)")
    out, offset = {}, 0
    for name, shape, dtype in layout.entries:
        size = int(np.prod(shape))
        out[name] = vector[offset:offset + size].reshape(shape).astype(dtype)
        offset += size
    return out
