"""The edge client's settings and what it returns: tokens with their verified marks, and what
happened on the way (rounds, offline spans, reconnects). Plain dataclasses, no gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedge.edge.cloud_link import NetworkProfile


class EdgeError(RuntimeError):
    """The cloud refused a request for a reason retrying cannot fix (bad input, wrong model)."""


@dataclass
class EdgeConfig:
    server: str = "127.0.0.1:50051"
    k_max: int = 8
    fixed_k: int | None = None
    q_support: int = 32  # top-m of q sent per drafted token when sampling
    rpc_timeout_s: float = 30.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    draft_while_offline: bool = True
    reconcile_wait_s: float = 0.0  # at the end, how long to wait for the cloud to verify the tail
    # the per-token draft time k is chosen with (DraftLengthController.draft_budget_s)
    draft_budget_s: float | None = None
    # an emulated device (simulations): drafting k tokens takes exactly k / this many seconds, however
    # long the real computation took on this machine (a shortfall is waited out, an overrun counted)
    phone_tokens_per_s: float | None = None
    load_aware: bool = True  # choose k from the cloud's cost curve and load (Health), when it reports them
    cost_refresh_s: float = 30.0  # how often the cost curve is asked for again
    network: NetworkProfile | None = None
    # mutual TLS: a `fedge certs create` directory and this device's id (its certificate's CN)
    tls_dir: str | None = None
    device_id: str | None = None


@dataclass
class EdgeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0  # rounds that ended in a rejection: a = accepted / (accepted + rejected)
    offline_tokens: int = 0  # drafted while the cloud was unreachable
    offline_kept: int = 0  # of those, verified by the cloud after reconnecting
    reconnects: int = 0
    reopened: int = 0  # sessions reopened because the cloud had lost them
    reconnect_attempts: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0  # drafting time as the phone sees it (the emulated device's, when one is set)
    draft_compute_s: float = 0.0  # what the drafts really took on this machine
    draft_overrun_s: float = 0.0  # emulated device: real drafting beyond k / phone_tokens_per_s
    draft_replayed: int = 0  # emulated device: rounds whose drafts were computed beforehand
    round_s: float = 0.0
    # where a round's time went: the emulated network, waiting in the cloud (batch fill, the forward
    # lock) and the cloud's forward; round_s minus these is gRPC, Ray and the ingress
    network_s: float = 0.0
    queue_s: float = 0.0
    forward_s: float = 0.0
    ks: list[int] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)  # sessions in the cloud forward of each round
    token_latency_s: list[float] = field(default_factory=list)  # per delivered token

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class EdgeResult:
    token_ids: list[int]
    verified: list[bool]  # per token: confirmed by the target
    offline_spans: list[tuple[int, int]]  # [start, end) of each span drafted while offline
    stats: EdgeStats

    @property
    def unverified_spans(self) -> list[tuple[int, int]]:
        spans, start = [], None
        for i, ok in enumerate([*self.verified, True]):
            if not ok and start is None:
                start = i
            elif ok and start is not None:
                spans.append((start, i))
                start = None
        return spans

    @property
    def fully_verified(self) -> bool:
        return all(self.verified)
