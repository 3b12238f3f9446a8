"""Surviving the loss of the cloud: draft on alone, mark it unverified, reconcile when it returns.

`OfflineTolerantVerifier` wraps the `RemoteVerifier` and is itself a `fedge.speculative.Verifier`,
so the shared loop never sees an outage. When a round cannot reach the cloud its drafts become
unverified text, and until the cloud answers again (retried with exponential backoff) the edge
keeps drafting tokens on its own, also unverified. Once reconnected the lost round is re-sent as
it was (the cloud answers it from its retry cache if it had processed it), and the next rounds
propose the rest of the unverified tail (`Drafter` holds it), so accepted tokens become verified
and the first rejected one is replaced by the target's token.

`Transcript` is the text as the user has seen it, and turns each verdict into what to show:
"verified" tokens, "unverified" ones, or a "rewrite" when the cloud rejected offline text.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from fedge.edge.client_types import EdgeConfig, EdgeStats
from fedge.edge.drafter import Drafter
from fedge.edge.remote_verifier import CloudUnreachable, RemoteVerifier
from fedge.protocol import fedge_pb2
from fedge.speculative import VerifyReply


class OfflineDeadline(Exception):
    """The text is complete but the cloud stayed away past `reconcile_wait_s`: the tail stays unverified."""


class Transcript:
    """Tokens shown so far (verified first, then unverified), offline spans and delivery times."""

    def __init__(self, stats: EdgeStats, emit: Callable[[str, list[int]], None]):
        self.stats = stats
        self.emit = emit
        self.shown: list[int] = []
        self.verified = 0  # shown[:verified] are confirmed by the target
        self.offline: list[list[int]] = []  # [start, end) spans of shown drafted while the cloud was away
        self.last_delivery = time.perf_counter()

    def deliver(self, n: int) -> None:
        now = time.perf_counter()
        self.stats.token_latency_s.extend([(now - self.last_delivery) / n] * n)
        self.last_delivery = now

    def add_unverified(self, ids: list[int], drafted_offline: bool) -> None:
        """Offline text: a lost round's drafts (a span of its own) or a token drafted alone."""
        if drafted_offline and self.offline and self.offline[-1][1] == len(self.shown):
            self.offline[-1][1] += len(ids)
        else:
            self.offline.append([len(self.shown), len(self.shown) + len(ids)])
        self.shown.extend(ids)
        self.stats.offline_tokens += len(ids)
        if drafted_offline:
            self.deliver(len(ids))
        self.emit("unverified", ids)

    def add_verified(self, new: list[int]) -> None:
        """A round's verdict: `new` follows the verified text (it may confirm or replace offline text)."""
        start = self.verified
        overlap = max(0, min(len(self.shown), start + len(new)) - start)
        match = 0
        while match < overlap and new[match] == self.shown[start + match]:
            match += 1
        self.stats.offline_kept += sum(1 for s0, s1 in self.offline for i in range(start, start + match)
                                       if s0 <= i < s1)
        self.verified = start + len(new)
        if match < overlap:  # the target rejected offline text: everything after it is rewritten
            kept = start + match
            del self.shown[kept:]
            self.shown.extend(new[match:])
            self.offline = [[s0, min(s1, kept)] for s0, s1 in self.offline if s0 < kept]
            self.emit("rewrite", list(self.shown))
            return
        beyond = new[overlap:]
        self.shown.extend(beyond)
        if overlap == 0:
            self.deliver(len(new))
        if beyond:
            self.emit("verified", beyond)

    def spans(self, end: int) -> list[tuple[int, int]]:
        return [(s0, min(s1, end)) for s0, s1 in self.offline if s0 < end]


class OfflineTolerantVerifier:
    """Implements `fedge.speculative.Verifier`: the remote verifier, plus offline drafting meanwhile.

    `done()` says whether the text is complete (no more drafting); then the cloud gets
    `reconcile_wait_s` to come back before `OfflineDeadline` ends the generation."""

    def __init__(self, remote: RemoteVerifier, drafter: Drafter, transcript: Transcript, config: EdgeConfig,
                 done: Callable[[], bool]):
        self.remote = remote
        self.drafter = drafter
        self.transcript = transcript
        self.config = config
        self.done = done
        self.stats = transcript.stats
        self.online = True
        self.backoff = config.backoff_initial_s
        self.next_retry = 0.0
        self.end_deadline: float | None = None

    @property
    def max_draft_len(self) -> int:
        return self.remote.max_draft_len

    def verify(self, draft_ids: list[int], draft_q: object = None) -> VerifyReply:
        while True:
            try:
                reply = self.remote.verify(draft_ids, draft_q)
                self.backoff = self.config.backoff_initial_s  # only a verified round proves the cloud well
                return reply
            except CloudUnreachable:
                self.online = False
                self.next_retry = time.perf_counter() + self.backoff
                held = self.drafter.hold_last_proposal()  # the lost round's drafts are offline text now
                if held:
                    self.transcript.add_unverified(held, drafted_offline=False)
                self._draft_until_reconnected()

    def _draft_until_reconnected(self) -> None:
        cfg = self.config
        while True:
            done = self.done()
            if done:
                self.end_deadline = self.end_deadline or time.perf_counter() + cfg.reconcile_wait_s
                if time.perf_counter() >= self.end_deadline:
                    raise OfflineDeadline()
            if time.perf_counter() >= self.next_retry and self._reconnect():
                return
            if done or not cfg.draft_while_offline:
                time.sleep(max(0.0, min(self.next_retry - time.perf_counter(), 0.05)))
                continue
            start = time.perf_counter()
            ids = self.drafter.draft_unverified(1)
            self.stats.draft_s += time.perf_counter() - start
            self.transcript.add_unverified(ids, drafted_offline=True)

    def _reconnect(self) -> bool:
        self.stats.reconnect_attempts += 1
        link = self.remote.link
        try:
            link.connect()
            link.call("Health", fedge_pb2.HealthRequest(), min(2.0, self.config.rpc_timeout_s))
        except grpc.RpcError:
            self.backoff = min(self.backoff * 2, self.config.backoff_max_s)
            self.next_retry = time.perf_counter() + self.backoff
            return False
        # the backoff is not reset here: a cloud that answers Health but fails every round (a
        # status the edge takes for transient) is retried ever more slowly, never in a hot loop
        self.online = True
        self.stats.reconnects += 1
        return True
