"""What crosses the verifier engine's boundary: requests, replies, refusals, limits (plain values).

Kept apart from `fedge.cloud.engine` so the engine module holds the state machine only; the engine
re-exports every name, so callers import them from either place. Each dataclass crosses the Ray
boundary between the ingress and a replica as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class RefusalCode(StrEnum):
    """Why a request was refused; each is the name of the gRPC status the client gets."""

    NOT_FOUND = "NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    ABORTED = "ABORTED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class Refusal:
    """A refused request, as a value (crosses the Ray boundary in place of a reply)."""

    code: RefusalCode
    message: str


class VerifierError(Exception):
    """A refused request inside the engine; `refusal()` is what crosses to the ingress."""

    def __init__(self, code: RefusalCode | str, message: str):
        super().__init__(message)
        self.code = RefusalCode(code)
        self.message = message

    def refusal(self) -> Refusal:
        return Refusal(self.code, self.message)


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    position: int
    max_draft_len: int
    max_q_support: int
    prefill_s: float


@dataclass(frozen=True)
class RoundReply:
    n_accepted: int
    next_id: int
    verify_s: float
    batch_size: int
    position: int
    queue_s: float = 0.0  # of verify_s: waiting for other sessions' rounds and for the forward to start
    forward_s: float = 0.0  # of verify_s: the target forward that carried this round


@dataclass(frozen=True)
class ReplicaInfo:
    sessions: int
    vocab_size: int
    forwards: int
    forward_s: float
    tokens_generated: int
    model_fingerprint: str
    tokenizer_fingerprint: str
    mean_batch: float
    process_cpu_s: float = 0.0  # filled in by the replica process
    # the cost curve (forward seconds against positions per forward) and the load phones choose k by
    cost_positions: tuple[int, ...] = ()
    cost_seconds: tuple[float, ...] = ()
    cost_context: int = 0
    load: float = 0.0  # sessions per forward, recent average
    active_sessions: int = 0
    forward_path: str = ""


@dataclass
class Limits:
    max_sessions: int = 64  # per replica
    max_draft_len: int = 16
    max_q_support: int = 64  # sparse q entries per drafted position
    max_session_tokens: int = 4096  # also capped by the model's position embeddings
    idle_timeout_s: float = 300.0
    max_batch: int = 32  # rounds in one forward
    # per authenticated device (mutual TLS), so one device cannot hold every session or all the memory
    max_sessions_per_device: int = 8
    max_tokens_per_device: int = 32768  # tokens held across the device's open sessions
    prefill_chunk: int = 256  # a long prompt is prefilled in chunks; other sessions' rounds run between them
    # lean forward: a prompt up to this long is prefilled in its first round's forward instead, packed
    # beside the other sessions' rounds (sessions opened together then share one forward, not one each)
    prefill_in_round: int = 128


@dataclass
class Round:
    session_id: str
    position: int
    draft_ids: list[int]
    draft_q: list[tuple[list[int], list[float]]] = field(default_factory=list)  # empty when greedy
    device_id: str = ""  # the caller, from its certificate
    arrived: float = 0.0  # time.perf_counter() when the round reached the replica (0: when it is run)
