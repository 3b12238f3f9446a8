"""What the edge's speculative loop needs from a verifier, wherever the verifier runs.

The in-process `fedge.verifier_session.TargetVerifierSession` and the gRPC client both satisfy `Verifier`, so
the edge loop does not know (or import) which one it talks to. Only token ids and scalars cross.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class VerifyReply:
    n_accepted: int  # how many of the draft tokens the target kept
    next_id: int  # the target's own token after them (correction or bonus)
    verify_s: float = 0.0  # time the verifier spent, for the edge's choice of k


class Verifier(Protocol):
    def verify(self, draft_ids: list[int], draft_probs: torch.Tensor | None = None) -> VerifyReply:
        """Score `draft_ids` after the session's accepted tokens; `draft_probs` (k, V) is the
        draft's processed distribution per position when sampling, None when greedy."""
        ...
