"""Shamir secret sharing over GF(2^521 - 1), for secure aggregation's dropout recovery.

Each client splits its mask private key and its self-mask seed (32 bytes each) into shares for
its peers; any `threshold` of them reconstruct a secret, fewer reveal nothing. The field is a
Mersenne prime above 2^256, so a 32-byte secret is a single field element (no chunking).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from fedge.protocol.secagg_config import SecAggError

# A Mersenne prime above 2^256: a 32-byte key or seed is a single field element.
FIELD_PRIME = (1 << 521) - 1
FIELD_BYTES = 66


def shamir_split(secret: int, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares of `secret` at the points `xs` (distinct, nonzero): any `threshold` of them reconstruct it."""
    if not 0 <= secret < FIELD_PRIME:
        raise ValueError("secret out of the field")
    if threshold < 1 or threshold > len(xs):
        raise ValueError(f"threshold {threshold} impossible with {len(xs)} share holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < FIELD_PRIME for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    coefficients = [secret] + [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner's rule
            y = (y * x + c) % FIELD_PRIME
        shares[x] = y
    return shares


def shamir_combine(shares: Mapping[int, int], threshold: int) -> int:
    """Lagrange interpolation at 0 from exactly `threshold` shares (extra shares are ignored).

    With fewer than `threshold` shares this refuses: a polynomial of degree t - 1 through t - 1
    points leaves the secret uniformly undetermined, so any answer would be a guess.
    """
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares are below the threshold {threshold}; the secret is hidden")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = (num * -xj) % FIELD_PRIME
                den = (den * (xi - xj)) % FIELD_PRIME
        secret = (secret + yi * num * pow(den, -1, FIELD_PRIME)) % FIELD_PRIME
    return secret
