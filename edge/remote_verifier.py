"""The cloud's verifier, seen from the edge: `fedge.speculative.Verifier` over the Verify RPC.

The cloud holds a `TargetVerifierSession` per generation; this object is its edge-side handle. A
round sends the draft's ids (and, when sampling, the sparse q they were drawn from) and gets back
how many the target keeps plus its next token. The session is opened on the first round; if the
cloud lost it (restart, idle expiry) it is reopened with the prompt plus the verified tokens, the
only state a new cloud lacks. A transient failure raises `CloudUnreachable`: what to do then
(draft on, reconcile later) is `fedge.edge.offline_drafting`'s business, not this transport's.
"""

from __future__ import annotations

import time

import grpc

from fedge.edge.client_types import EdgeError, EdgeStats
from fedge.edge.cloud_link import SESSION_LOST, TRANSIENT, CloudLink
from fedge.edge.drafter import SparseQ
from fedge.protocol import fedge_pb2
from fedge.speculative import CostCurve, DraftLengthController, VerifyReply


class CloudUnreachable(Exception):
    """The cloud did not answer (a transient gRPC status): it may come back."""


MAX_REOPENS = 3  # a session lost again right after reopening it is a refusal, not bad luck


def refused(what: str, exc: grpc.RpcError) -> EdgeError:
    """A refusal the edge will not retry, saying which call and why (details cut short)."""
    details = (exc.details() or "")[:300]
    return EdgeError(f"cloud refused {what}: {exc.code().name}: {details}")


class RemoteVerifier:
    """Implements `fedge.speculative.Verifier` against the cloud's session for one generation.

    `open_request` carries everything but the prompt (fingerprints, adapter, sampling, seed);
    `tokens` is the prompt plus every token the target has verified, as on the cloud.

    Load-aware k: with a `controller` and the cloud's `cost_curve` (from Health), every reply's
    batch size (sessions in the forward that verified it) updates the controller's load."""

    def __init__(self, link: CloudLink, open_request: fedge_pb2.OpenSessionRequest, prompt_ids: list[int],
                 k_max: int, stats: EdgeStats, controller: DraftLengthController | None = None,
                 cost_curve: CostCurve | None = None, load: float = 0.0):
        self.controller = controller
        self.load = load
        if controller is not None and cost_curve is not None:
            controller.cost_curve, controller.load = cost_curve, max(load, 1.0)
        self.link = link
        self.open_request = open_request
        self.tokens: list[int] = list(prompt_ids)
        self.k_max = k_max
        self.max_draft_len = k_max  # the cloud's limit, once a session is open
        self.session_id: str | None = None
        self.stats = stats

    def open(self) -> None:
        """Open (or reopen) the cloud session. Any refusal here is final (unknown adapter, session
        limit, mismatched model): reopening again would get the same answer, so it is an EdgeError."""
        request = fedge_pb2.OpenSessionRequest()
        request.CopyFrom(self.open_request)
        request.ClearField("prompt_ids")
        request.prompt_ids.extend(self.tokens)
        try:
            reply = self.link.call("OpenSession", request)
        except grpc.RpcError as exc:
            if exc.code() in TRANSIENT:
                raise CloudUnreachable(exc.code().name) from None
            raise refused("to open a session", exc) from None
        self.session_id = reply.session_id
        self.max_draft_len = min(reply.max_draft_len, self.k_max)
        if self.stats.rounds or self.stats.reconnects:
            self.stats.reopened += 1

    def verify(self, draft_ids: list[int], draft_q: list[SparseQ] | None = None) -> VerifyReply:
        reopens = 0
        while True:
            if self.session_id is None:
                self.open()
            try:
                request = fedge_pb2.VerifyRequest(
                    session_id=self.session_id, position=len(self.tokens), draft_ids=draft_ids,
                    draft_q=[fedge_pb2.SparseDist(ids=i, probs=p) for i, p in draft_q or []])
                start = time.perf_counter()
                reply = self.link.call("Verify", request)
                round_s = time.perf_counter() - start
                break
            except grpc.RpcError as exc:
                code = exc.code()
                if code in SESSION_LOST and reopens < MAX_REOPENS:
                    self.session_id = None  # reopen with the verified prefix and resend the round
                    reopens += 1
                    continue
                if code not in TRANSIENT:
                    raise refused("a round", exc) from None
                raise CloudUnreachable(code.name) from None
        self.tokens.extend(list(draft_ids[:reply.n_accepted]) + [reply.next_id])
        self.stats.rounds += 1
        self.stats.round_s += round_s
        self.stats.queue_s += reply.queue_s
        self.stats.forward_s += reply.forward_s
        self.stats.batch_sizes.append(reply.batch_size)
        self._observe_load(reply.batch_size)
        return VerifyReply(n_accepted=reply.n_accepted, next_id=reply.next_id, verify_s=round_s,
                           cloud_s=reply.verify_s)

    def _observe_load(self, batch_size: int) -> None:
        """Sessions per cloud forward, smoothed: what this phone's k + 1 positions are multiplied by."""
        if batch_size <= 0:
            return
        self.load = float(batch_size) if self.load <= 0 else 0.7 * self.load + 0.3 * batch_size
        if self.controller is not None and self.controller.cost_curve is not None:
            self.controller.load = max(self.load, 1.0)

    def close(self) -> None:
        if self.session_id is None:
            return
        try:
            self.link.call("CloseSession", fedge_pb2.CloseSessionRequest(session_id=self.session_id), 2.0)
        except grpc.RpcError:
            pass  # the cloud expires idle sessions anyway
        self.session_id = None
